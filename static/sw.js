// The service worker: only event handlers. Registered as /sw.js?api=<server URL>.
"use strict";

const API = new URL(self.location).searchParams.get("api") || self.location.origin;

// Receipts: each message names its notification ("id") and carries this
// subscriber's "receipt"; sending it back counts the event once. A plain-text
// body keeps it a simple request: no CORS preflight, even across origins.
function report(data, event) {
  if (!data?.id || !data?.receipt) return Promise.resolve();
  return fetch(`${API}/notifications/${encodeURIComponent(data.id)}/events`, {
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
    icon: f.icon || "/static/icon.png",
    image: f.image,
    tag: f.tag,
    lang: f.lang,
    dir: f.dir,
    silent: f.silent,
    requireInteraction: f.requireInteraction,
    actions: f.actions.map(({ action, title, icon }) => ({ action, title, icon })),
    badge: "/static/badge.png",
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
  const { title, options, badge } = shown(data);
  event.waitUntil(
    Promise.all([
      self.registration.showNotification(title, options),
      report(options.data, "delivered"),
      setBadge(badge),
    ]),
  );
});

// A declarative message marked "mutable", in a browser that shows those by
// itself: it asks the worker first. This one shows it as it came (so its
// clicks and closes reach the handlers below) and reports it delivered; a
// worker that shows nothing leaves the browser to show the declarative one.
self.addEventListener("pushnotification", (event) => {
  const declared = { web_push: 8030, notification: event.notification, app_badge: event.appBadge };
  const { title, options, badge } = shown(declared);
  event.waitUntil(
    Promise.all([
      self.registration.showNotification(title, options),
      report(options.data, "delivered"),
      setBadge(badge ?? undefined),
    ]),
  );
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

self.addEventListener("pushsubscriptionchange", (event) => {
  event.waitUntil(
    (async () => {
      let key = event.oldSubscription?.options?.applicationServerKey;
      if (!key) {
        const response = await fetch(`${API}/subscription`);
        const { public_key } = await response.json();
        const base64 = (public_key + "=".repeat((4 - (public_key.length % 4)) % 4)).replace(/-/g, "+").replace(/_/g, "/");
        key = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
      }
      const subscription =
        event.newSubscription ||
        (await self.registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key }));
      await fetch(`${API}/subscription`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        // "replaces" lets the server carry the old subscription's topics over.
        body: JSON.stringify({ ...subscription.toJSON(), replaces: event.oldSubscription?.endpoint }),
      });
    })(),
  );
});
