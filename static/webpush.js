// Web Push for any site, from its push server (docs/client.md):
//
//   import * as webpush from "https://push.example.org/webpush.js";
//   await webpush.init({ serviceWorker: "/sw.js" });
//   await webpush.subscribe({ topics: ["news"] });
//
// Four verbs: init, subscribe, unsubscribe, state. Every failure is an Error
// with a `code` (one of ERROR_CODES) and a `message` a person can read.

/** How long the browser's push service or the push server may take to answer. */
const TIMEOUT_MS = 10_000;

/** What `state()` may answer. */
export const STATES = ["unsupported", "insecure", "needs-home-screen", "denied", "default", "subscribed", "unsubscribed"];

/** Every `code` an Error from this module may carry. */
export const ERROR_CODES = ["unsupported", "insecure", "needs-home-screen", "denied", "dismissed", "private-window", "push-service", "timeout", "server"];

const MESSAGES = {
  unsupported: "This browser does not support Web Push, so it can't receive notifications. A recent Chrome, Edge, Firefox or Safari can.",
  insecure: "Push needs a secure context: open this page over https, or on http://localhost.",
  "needs-home-screen":
    "On iPhone and iPad, notifications work only for sites added to the Home Screen (iOS 16.4 or later): tap Share, then Add to Home Screen, and open it from there.",
  denied: "Notifications are blocked for this site. Allow them in the browser's site settings, then try again.",
  dismissed: "The question about notifications was closed without an answer. Try again, and choose Allow.",
  "private-window": "Private windows can't receive notifications. Open this page in a normal window.",
  "push-service": "The browser's push service could not be reached. Check the internet connection, then try again.",
  server: "The push server could not be reached. Try again in a moment.",
};

const WAITED_FOR = { "push-service": "the browser's push service", server: "the push server" };

/** An Error with a `code` from ERROR_CODES (and `status`, the HTTP status, for code "server"). */
export class WebPushError extends Error {
  constructor(code, message = MESSAGES[code], extra = {}) {
    super(message);
    this.name = "WebPushError";
    this.code = code;
    Object.assign(this, extra);
  }
}

let setup = null; // a promise of {server, registration}, from init(): a click before it has settled waits for it

// -- what the browser can do ------------------------------------------------------------

const isIOS = () => /iPad|iPhone|iPod/.test(navigator.userAgent) || (navigator.platform === "MacIntel" && navigator.maxTouchPoints > 1);

/** Why push cannot work in this browser ("insecure", ...), or null. */
function unsupported() {
  if (!window.isSecureContext) return "insecure";
  if (!("serviceWorker" in navigator) || !("PushManager" in window) || !("Notification" in window)) {
    // Safari on iOS has push only in a web app opened from the Home Screen.
    return isIOS() && !navigator.standalone ? "needs-home-screen" : "unsupported";
  }
  return null;
}

function refuseIfUnsupported() {
  const reason = unsupported();
  if (reason) throw new WebPushError(reason);
}

/** The answer of `work` (a promise), or a "timeout" error after TIMEOUT_MS. */
function inTime(work, code, abort) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => {
      abort?.abort();
      reject(new WebPushError("timeout", `No answer from ${WAITED_FOR[code]} within ${TIMEOUT_MS / 1000} seconds. Check the internet connection, then try again.`));
    }, TIMEOUT_MS);
  });
  return Promise.race([work, late]).finally(() => clearTimeout(timer));
}

// -- the push server --------------------------------------------------------------------

async function call(method, path, body) {
  const abort = new AbortController();
  const asked = (async () => {
    let response;
    try {
      response = await fetch((await setup).server + path, {
        method,
        headers: body ? { "Content-Type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
        signal: abort.signal,
      });
    } catch (error) {
      if (abort.signal.aborted) throw error; // the timeout has answered
      throw new WebPushError("server", MESSAGES.server, { cause: error });
    }
    const text = await response.text();
    let data = {};
    try {
      data = text ? JSON.parse(text) : {};
    } catch {
      // not JSON: a proxy's error page, say
    }
    if (!response.ok) {
      const why = data.error ? `: ${data.error}` : ` (HTTP ${response.status})`;
      throw new WebPushError("server", `The push server refused${why}.`, { status: response.status, error: data.error });
    }
    return data;
  })();
  return inTime(asked, "server", abort);
}

// -- the browser's push service ---------------------------------------------------------

/** A failed PushManager.subscribe() as one of ERROR_CODES. */
function pushServiceError(error) {
  if (error instanceof WebPushError) return error;
  const text = `${error?.name}: ${error?.message}`;
  // Notifications are allowed, yet the browser refuses: Chrome's and
  // Firefox's private windows have no push service.
  if (Notification.permission === "granted" && (/NotAllowedError/.test(text) || /permission denied/i.test(text))) {
    return new WebPushError("private-window", MESSAGES["private-window"], { cause: error });
  }
  if (Notification.permission === "denied") return new WebPushError("denied", MESSAGES.denied, { cause: error });
  return new WebPushError("push-service", MESSAGES["push-service"], { cause: error });
}

function keyBytes(base64url) {
  const base64 = (base64url + "=".repeat((4 - (base64url.length % 4)) % 4)).replace(/-/g, "+").replace(/_/g, "/");
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
}

function sameKey(buffer, bytes) {
  if (!buffer) return false;
  const a = new Uint8Array(buffer);
  return a.length === bytes.length && a.every((v, i) => v === bytes[i]);
}

function askPermission() {
  if (Notification.permission !== "default") return Promise.resolve(Notification.permission);
  // Older Safari answers through a callback only.
  return new Promise((resolve) => Notification.requestPermission(resolve)?.then(resolve));
}

// The site's worker did not start: most often, its importScripts() of
// webpush-sw.js could not reach the push server.
const NO_WORKER = "The part of this site that shows notifications could not be loaded. Reload the page in a moment.";

/** The registration once its worker is active (push needs one). */
function activated(registration) {
  if (registration.active) return Promise.resolve(registration);
  const worker = registration.installing || registration.waiting;
  if (!worker) return Promise.reject(new WebPushError("server", NO_WORKER));
  return new Promise((resolve, reject) => {
    worker.addEventListener("statechange", () => {
      if (worker.state === "activated") resolve(registration);
      if (worker.state === "redundant") reject(new WebPushError("server", NO_WORKER));
    });
  });
}

async function ready() {
  if (!setup) throw new TypeError("webpush: call init() first");
  return setup;
}

// -- the four verbs -------------------------------------------------------------------

/**
 * Registers the site's own service worker (which takes in webpush-sw.js).
 * `server`: the push server's URL, by default where this module came from.
 * Rejects with "unsupported", "insecure" or "needs-home-screen", or with
 * "server" when the worker does not start (its importScripts() failed).
 */
export function init({ server, serviceWorker, scope } = {}) {
  const base = (server || new URL(".", import.meta.url).href).replace(/\/+$/, "");
  setup = (async () => {
    refuseIfUnsupported();
    if (!serviceWorker) throw new TypeError("webpush.init: name the site's service worker, e.g. { serviceWorker: '/sw.js' }");
    let registration;
    try {
      registration = await navigator.serviceWorker.register(serviceWorker, scope ? { scope } : undefined);
    } catch (error) {
      throw new WebPushError("server", NO_WORKER, { cause: error });
    }
    // A worker whose importScripts() hangs is a timeout, not a wait forever.
    return { server: base, registration: await inTime(activated(registration), "server") };
  })();
  return setup;
}

/** One of STATES. */
export async function state() {
  const reason = unsupported();
  if (reason) return reason;
  if (Notification.permission === "denied") return "denied";
  const registration = (await setup?.catch(() => null))?.registration || (await navigator.serviceWorker.getRegistration());
  const subscription = await registration?.pushManager.getSubscription();
  if (subscription && Notification.permission === "granted") return "subscribed";
  return Notification.permission === "default" ? "default" : "unsubscribed";
}

/**
 * Asks permission, subscribes with the server's key and stores the
 * subscription on the server with its `topics` (kept as they were when not
 * given) and, when given, the signed-in `user` and the `userToken` the site
 * signed for them (`user: null` unbinds), and with the browser's time zone
 * (for messages sent at a local hour). Resolves to the server's answer,
 * {id, user}.
 */
export async function subscribe({ topics, user, userToken } = {}) {
  refuseIfUnsupported();
  // Asked first, while the person's click still counts (Safari and Firefox
  // show the prompt only then), before waiting on the worker.
  const permission = await askPermission();
  if (permission === "denied") throw new WebPushError("denied");
  if (permission !== "granted") throw new WebPushError("dismissed");
  const { registration } = await ready();
  const about = await call("GET", "/subscription");
  const serverKey = keyBytes(about.public_key);
  let subscription;
  try {
    subscription = await inTime(
      (async () => {
        let current = await registration.pushManager.getSubscription();
        if (current && !sameKey(current.options.applicationServerKey, serverKey)) {
          await current.unsubscribe(); // made for another server key: it would never receive
          current = null;
        }
        return current || (await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: serverKey }));
      })(),
      "push-service",
    );
  } catch (error) {
    throw pushServiceError(error);
  }
  const body = { ...subscription.toJSON() };
  if (topics !== undefined) body.topics = topics;
  if (user !== undefined) body.user = user;
  if (userToken !== undefined) body.user_token = userToken;
  const zone = timeZone();
  if (!zone) return call("POST", "/subscription", body);
  try {
    return await call("POST", "/subscription", { ...body, timezone: zone });
  } catch (error) {
    // A server that does not know this zone (its zone database is older than
    // the browser's) or the field itself (an older server) refuses it: the
    // subscription matters more than its local time, so it is posted again
    // without.
    if (error.status !== 400 || !/timezone/.test(error.error || "")) throw error;
    return call("POST", "/subscription", body);
  }
}

/** The browser's IANA time zone ("Europe/Paris"), or null when it has none. */
function timeZone() {
  try {
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    return typeof zone === "string" && zone ? zone : null;
  } catch {
    return null;
  }
}

/** Unsubscribes this browser, and has the server forget it. */
export async function unsubscribe() {
  refuseIfUnsupported();
  const { registration } = await ready();
  const subscription = await registration.pushManager.getSubscription();
  if (!subscription) return;
  const { endpoint } = subscription;
  await subscription.unsubscribe();
  try {
    await call("DELETE", "/subscription", { endpoint });
  } catch (error) {
    if (error.status !== 404) throw error; // 404: already gone on the server
  }
}
