// The demo's service worker is the one any site can have: it takes in the
// push server's handlers. Registered as /sw.js?api=<server URL>.
importScripts(`${new URL(self.location).searchParams.get("api") || self.location.origin}/webpush-sw.js`);
