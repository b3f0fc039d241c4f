// The demo's service worker is the one any site can have: it takes in the
// push server's handlers. Registered as /sw.js?client=<where the demo's code
// comes from>&api=<the server it talks to>: the page passes only its own
// origin or its <meta name="webpush-api"> as "client", so no link can make
// this worker run code from elsewhere; "api" (maybe from a link) is only
// where its receipts and subscriptions go.
const params = new URL(self.location).searchParams;
self.webpushServer = params.get("api") || undefined;
importScripts(`${params.get("client") || self.location.origin}/webpush-sw.js`);
