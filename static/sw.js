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
  const title = data.title || "New notification";
  const receipt = { id: data.id ?? null, receipt: data.receipt ?? null };
  event.waitUntil(
    Promise.all([
      self.registration.showNotification(title, {
        body: data.body || "",
        icon: data.icon || "/static/icon.png",
        badge: "/static/badge.png",
        data: { url: data.url || "/", data: data.data ?? null, ...receipt },
      }),
      report(data, "delivered"),
    ]),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const reported = report(event.notification.data, "clicked");
  const url = new URL(event.notification.data?.url || "/", self.location.origin).href;
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
