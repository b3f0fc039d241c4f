// The demo's story: detect support, register the worker, read the state,
// subscribe or unsubscribe, and tell the server; and, with a made-up
// sign-in, bind this browser to a person the server can write to.
"use strict";

const SIGN_IN_KEY = "webpush-demo-user";

const API = apiBase();
const $ = (id) => document.getElementById(id);

function apiBase() {
  const fromQuery = new URLSearchParams(location.search).get("api");
  const fromMeta = document.querySelector('meta[name="webpush-api"]')?.content;
  return (fromQuery || fromMeta || location.origin).replace(/\/+$/, "");
}

function say(text, kind = "info") {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
}

async function api(method, path, body) {
  const response = await fetch(API + path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const error = new Error(data.error || `${method} ${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// -- the made-up sign-in -------------------------------------------------------------

/** Who is signed in on this demo: {user, user_token}, or null. */
function signedIn() {
  try {
    return JSON.parse(localStorage.getItem(SIGN_IN_KEY)) || null;
  } catch {
    return null;
  }
}

/** What the page adds to its subscription: the signed-in person, if any. */
function person() {
  const who = signedIn();
  return who ? { user: who.user, user_token: who.user_token } : {};
}

function showPerson(usersKnown, subscribed) {
  const who = signedIn();
  $("demo-user").disabled = !usersKnown || Boolean(who);
  $("sign-in").disabled = !usersKnown || Boolean(who);
  $("sign-out").disabled = !who;
  if (who) $("demo-user").value = who.user;
  let text = "";
  if (!usersKnown) {
    text = "This server does not know signed-in people yet. Start it with USER_TOKEN_SECRET set, and DEMO_USERS=true for this made-up sign-in.";
  } else if (who && subscribed) {
    text = `Signed in as ${who.user}. This browser gets ${who.user}'s notifications: write to them from the console's People, or with the command above.`;
  } else if (who) {
    text = `Signed in as ${who.user}. Enable push above, and this browser will get ${who.user}'s notifications.`;
  }
  $("people-status").textContent = text;
  showCurl();
}

async function signIn(registration) {
  const user = $("demo-user").value.trim();
  if (!user) throw new Error("Type a name to sign in as.");
  let token;
  try {
    token = await api("POST", "/demo/user-token", { user });
  } catch (error) {
    if (error.status === 404) {
      throw new Error("This server does not offer the made-up sign-in. Start it with DEMO_USERS=true to try it; never on a real site, where it would let anyone be anyone.");
    }
    throw error;
  }
  localStorage.setItem(SIGN_IN_KEY, JSON.stringify(token));
  const subscription = await registration.pushManager.getSubscription();
  if (subscription) await api("POST", "/subscription", { ...subscription.toJSON(), ...person() });
  return token.user;
}

async function signOut(registration) {
  const { user } = signedIn() || {};
  localStorage.removeItem(SIGN_IN_KEY);
  const subscription = await registration.pushManager.getSubscription();
  // Its own keys prove it is this browser's subscription: the server unbinds it.
  if (subscription) await api("POST", "/subscription", { ...subscription.toJSON(), user: null });
  return user;
}

function unsupportedReason() {
  if (!window.isSecureContext) {
    return "Push needs a secure context: open this page over https, or on http://localhost.";
  }
  if (!("serviceWorker" in navigator) || !("PushManager" in window) || !("Notification" in window)) {
    const iOS = /iPad|iPhone|iPod/.test(navigator.userAgent);
    return iOS
      ? "On iPhone and iPad, push works only for sites added to the Home Screen (iOS 16.4 or later): tap Share, then Add to Home Screen, and open it from there."
      : "This browser does not support Web Push (service workers, PushManager and notifications are all needed).";
  }
  return null;
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

function topics() {
  return $("topics").value.split(",").map((t) => t.trim()).filter(Boolean);
}

function show(subscription) {
  const on = Boolean(subscription);
  $("enable").disabled = on;
  $("disable").disabled = !on;
  $("test").disabled = !on;
  $("subscription").textContent = on ? JSON.stringify(subscription.toJSON(), null, 2) : "Not subscribed.";
}

async function subscribe(registration) {
  const permission = await Notification.requestPermission();
  if (permission !== "granted") {
    throw new Error("Notifications are blocked for this site. Allow them in the browser's site settings, then try again.");
  }
  const { public_key } = await api("GET", "/subscription");
  const serverKey = keyBytes(public_key);
  let subscription = await registration.pushManager.getSubscription();
  if (subscription && !sameKey(subscription.options.applicationServerKey, serverKey)) {
    await subscription.unsubscribe(); // made for another server key: it would never receive
    subscription = null;
  }
  subscription ||= await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: serverKey });
  try {
    await api("POST", "/subscription", { ...subscription.toJSON(), topics: topics(), ...person() });
  } catch (error) {
    if (error.status !== 403) throw error;
    localStorage.removeItem(SIGN_IN_KEY); // the made-up sign-in expired
    await api("POST", "/subscription", { ...subscription.toJSON(), topics: topics() });
  }
  localStorage.setItem("webpush-topics", $("topics").value);
  return subscription;
}

async function unsubscribe(registration) {
  const subscription = await registration.pushManager.getSubscription();
  if (!subscription) return;
  const { endpoint } = subscription;
  await subscription.unsubscribe();
  try {
    await api("DELETE", "/subscription", { endpoint });
  } catch (error) {
    if (!/no subscription/.test(error.message)) throw error; // already gone on the server
  }
}

function showCurl() {
  const who = signedIn();
  const to = who ? `, "users": [${JSON.stringify(who.user)}]` : "";
  $("curl").textContent =
    `curl -X POST ${API}/push \\\n  -H "Authorization: Bearer <PUSH_TOKEN>" \\\n  -H "Content-Type: application/json" \\\n  -H "Prefer: wait=10" \\\n  -d '{"title": "Hello", "body": "Sent with curl", "url": "/"${to}}'`;
}

async function main() {
  showCurl();
  $("topics").value = localStorage.getItem("webpush-topics") || "";

  const reason = unsupportedReason();
  if (reason) return say(reason, "error");

  const registration = await navigator.serviceWorker.register(`/sw.js?api=${encodeURIComponent(API)}`);
  await navigator.serviceWorker.ready;
  const current = await registration.pushManager.getSubscription();
  show(current);
  const { users: usersKnown } = await api("GET", "/subscription");
  if (!usersKnown) localStorage.removeItem(SIGN_IN_KEY);
  showPerson(usersKnown, Boolean(current));

  if (Notification.permission === "denied") {
    say("Notifications are blocked for this site. Allow them in the browser's site settings to subscribe.", "error");
  } else {
    say(current ? "Push is enabled for this browser." : "Push is off. Press “Enable push” to subscribe.");
  }

  const act = (button, work) =>
    $(button).addEventListener("click", async () => {
      $(button).disabled = true;
      try {
        await work();
      } catch (error) {
        say(error.message, "error");
      } finally {
        const subscription = await registration.pushManager.getSubscription();
        show(subscription);
        showPerson(usersKnown, Boolean(subscription));
      }
    });

  act("enable", async () => {
    say("Subscribing…");
    await subscribe(registration);
    say("Push is enabled. Try “Send test notification”.", "ok");
  });
  act("disable", async () => {
    await unsubscribe(registration);
    say("Push is disabled: this browser is unsubscribed and the server forgot it.", "ok");
  });
  act("sign-in", async () => {
    const user = await signIn(registration);
    say(`Signed in as ${user}.`, "ok");
  });
  act("sign-out", async () => {
    const user = await signOut(registration);
    say(`Signed out: this browser no longer gets ${user}'s notifications.`, "ok");
  });
  act("test", async () => {
    const subscription = await registration.pushManager.getSubscription();
    const result = await api("POST", "/subscription/test", subscription.toJSON());
    if (result.sent) say("Test notification sent. It should appear in a moment.", "ok");
    else say(`The push service did not accept the test: ${result.results?.[0]?.reason || "see the server log"}`, "error");
  });
}

main().catch((error) => say(error.message, "error"));
