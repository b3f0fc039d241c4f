// The push server's service worker handlers, for any site's own worker:
//
//   importScripts("https://push.example.org/webpush-sw.js");
//
// Only event handlers: "push" (and Safari's "pushnotification") shows the
// message, in either payload format; "notificationclick" and
// "notificationclose" report receipts and open the link;
// "pushsubscriptionchange" tells the server about the browser's new
// subscription. See docs/client.md.
(() => {
  "use strict";

  // Served as /webpush-sw.js, the line below names the server that served it,
  // so a worker on another origin reports to it (read from static/ as it is:
  // the worker's own origin). A worker whose server is not where its code
  // came from (the demo with ?api=) says so first, in self.webpushServer.
  const SERVER = self.webpushServer || self.location.origin; // the server's URL, written in when served

  // Receipts: each message names its notification ("id") and carries this
  // subscriber's "receipt"; sending it back counts the event once. A
  // plain-text body keeps it a simple request: no CORS preflight, even across
  // origins.
  function report(data, event) {
    if (!data?.id || !data?.receipt) return Promise.resolve();
    return fetch(`${SERVER}/notifications/${encodeURIComponent(data.id)}/events`, {
      method: "POST",
      body: JSON.stringify({ event, receipt: data.receipt }),
      keepalive: true,
    }).catch(() => {}); // a lost receipt costs a count, never the notification
  }

  // What to show for a message, in either format the server sends:
  // Declarative Web Push ({"web_push": 8030, "notification": {...}}), which a
  // browser that supports it shows by itself and hands here only when it is
  // "mutable" (as the "pushnotification" event), or the classic JSON. First
  // the fields both formats have, under one set of names.
  function fields(data) {
    const common = (o) => ({ title: o.title, body: o.body, icon: o.icon, image: o.image, tag: o.tag, lang: o.lang, dir: o.dir, silent: o.silent });
    if (data.web_push === 8030 && typeof data.notification === "object" && data.notification) {
      const n = data.notification;
      const extra = n.data && typeof n.data === "object" ? n.data : {};
      return {
        ...common(n),
        requireInteraction: n.requireInteraction,
        url: n.navigate,
        actions: (n.actions || []).map(({ action, title, icon, navigate }) => ({ action, title, icon, url: navigate })),
        data: extra.data,
        id: extra.id,
        receipt: extra.receipt,
        badge: data.app_badge,
      };
    }
    return {
      ...common(data),
      requireInteraction: data.require_interaction,
      url: data.url,
      actions: data.actions || [],
      data: data.data,
      id: data.id,
      receipt: data.receipt,
      badge: data.badge,
    };
  }

  function shown(data) {
    const f = fields(data);
    const options = {
      body: f.body || "",
      icon: f.icon || `${SERVER}/static/icon.png`,
      image: f.image,
      tag: f.tag,
      lang: f.lang,
      dir: f.dir,
      silent: f.silent,
      requireInteraction: f.requireInteraction,
      actions: f.actions.map(({ action, title, icon }) => ({ action, title, icon })),
      badge: `${SERVER}/static/badge.png`,
      data: {
        url: f.url || "/",
        actions: Object.fromEntries(f.actions.map((a) => [a.action, a.url])),
        data: f.data ?? null,
        id: f.id ?? null,
        receipt: f.receipt ?? null,
      },
    };
    for (const name of Object.keys(options)) if (options[name] === undefined) delete options[name];
    return { title: f.title || "New notification", options, badge: f.badge };
  }

  function setBadge(count) {
    if (typeof count !== "number" || !("setAppBadge" in self.navigator)) return Promise.resolve();
    return (count ? self.navigator.setAppBadge(count) : self.navigator.clearAppBadge()).catch(() => {});
  }

  function display(message) {
    const { title, options, badge } = shown(message);
    return Promise.all([
      self.registration.showNotification(title, options),
      report(options.data, "delivered"),
      setBadge(badge ?? undefined),
    ]);
  }

  self.addEventListener("push", (event) => {
    let data = {};
    if (event.data) {
      try {
        data = event.data.json();
      } catch {
        data = { body: event.data.text() };
      }
    }
    if (typeof data !== "object" || data === null) data = { body: String(data) };
    event.waitUntil(display(data));
  });

  // A declarative message marked "mutable", in a browser that shows those by
  // itself: it asks the worker first. This one shows it as it came (so its
  // clicks and closes reach the handlers below) and reports it delivered; a
  // worker that shows nothing leaves the browser to show the declarative one.
  self.addEventListener("pushnotification", (event) => {
    event.waitUntil(display({ web_push: 8030, notification: event.notification, app_badge: event.appBadge }));
  });

  self.addEventListener("notificationclick", (event) => {
    event.notification.close();
    const data = event.notification.data || {};
    const reported = report(data, "clicked");
    const target = (event.action && data.actions?.[event.action]) || data.url || "/";
    const url = new URL(target, self.location.origin).href;
    event.waitUntil(
      (async () => {
        const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
        const open = windows.find((client) => client.url === url);
        await (open ? open.focus() : self.clients.openWindow(url));
        await reported;
      })(),
    );
  });

  self.addEventListener("notificationclose", (event) => {
    event.waitUntil(report(event.notification.data, "closed"));
  });

  function keyBytes(base64url) {
    const base64 = (base64url + "=".repeat((4 - (base64url.length % 4)) % 4)).replace(/-/g, "+").replace(/_/g, "/");
    return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  }

  // The browser rotated the subscription: post the new one with the old one
  // it "replaces" (its toJSON(), whose auth secret proves it), and the server
  // moves the old one's topics, time zone and person over to it.
  self.addEventListener("pushsubscriptionchange", (event) => {
    event.waitUntil(
      (async () => {
        const server = await (await fetch(`${SERVER}/subscription`)).json();
        const subscription =
          event.newSubscription ||
          (await self.registration.pushManager.subscribe({
            userVisibleOnly: true,
            applicationServerKey: event.oldSubscription?.options?.applicationServerKey || keyBytes(server.public_key),
          }));
        const body = { ...subscription.toJSON() };
        if (event.oldSubscription) body.replaces = event.oldSubscription.toJSON();
        await fetch(`${SERVER}/subscription`, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
      })(),
    );
  });
})();
