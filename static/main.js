// The demo is a user of webpush.js, the client any site takes in from the
// push server: read the state, subscribe or unsubscribe; and, with a made-up
// sign-in, bind this browser to a person the server can write to.

const SIGN_IN_KEY = "webpush-demo-user";

// Code comes from the page's own origin or the server its <meta> names;
// ?api= in a link only says which server to talk to, never whose code to run.
const CLIENT = (document.querySelector('meta[name="webpush-api"]')?.content || location.origin).replace(/\/+$/, "");
const API = (new URLSearchParams(location.search).get("api") || CLIENT).replace(/\/+$/, "");
const $ = (id) => document.getElementById(id);
let webpush; // the client, from the push server: main() imports it

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

async function currentSubscription() {
  const registration = await navigator.serviceWorker.getRegistration();
  return (await registration?.pushManager.getSubscription()) || null;
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
  return who ? { user: who.user, userToken: who.user_token } : {};
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

async function signIn() {
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
  if ((await webpush.state()) === "subscribed") await webpush.subscribe(person());
  return token.user;
}

async function signOut() {
  const { user } = signedIn() || {};
  localStorage.removeItem(SIGN_IN_KEY);
  // Its own keys prove it is this browser's subscription: the server unbinds it.
  if ((await webpush.state()) === "subscribed") await webpush.subscribe({ user: null });
  return user;
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

async function subscribe() {
  try {
    await webpush.subscribe({ topics: topics(), ...person() });
  } catch (error) {
    if (error.status !== 403 || !signedIn()) throw error;
    localStorage.removeItem(SIGN_IN_KEY); // the made-up sign-in expired
    await webpush.subscribe({ topics: topics() });
  }
  localStorage.setItem("webpush-topics", $("topics").value);
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

  try {
    webpush = await import(`${CLIENT}/webpush.js`);
  } catch {
    return say("The push server could not be reached. Reload the page in a moment.", "error");
  }
  await webpush.init({ server: API, serviceWorker: `/sw.js?client=${encodeURIComponent(CLIENT)}&api=${encodeURIComponent(API)}` });
  let usersKnown = false;
  const act = (button, work) =>
    $(button).addEventListener("click", async () => {
      $(button).disabled = true;
      try {
        await work();
      } catch (error) {
        say(error.message, "error");
      } finally {
        const subscription = await currentSubscription();
        show(subscription);
        showPerson(usersKnown, Boolean(subscription));
      }
    });

  act("enable", async () => {
    say("Subscribing…");
    await subscribe();
    say("Push is enabled. Try “Send test notification”.", "ok");
  });
  act("disable", async () => {
    await webpush.unsubscribe();
    say("Push is disabled: this browser is unsubscribed and the server forgot it.", "ok");
  });
  act("sign-in", async () => {
    const user = await signIn();
    say(`Signed in as ${user}.`, "ok");
  });
  act("sign-out", async () => {
    const user = await signOut();
    say(`Signed out: this browser no longer gets ${user}'s notifications.`, "ok");
  });
  act("test", async () => {
    const result = await api("POST", "/subscription/test", (await currentSubscription()).toJSON());
    if (result.sent) say("Test notification sent. It should appear in a moment.", "ok");
    else say(`The push service did not accept the test: ${result.results?.[0]?.reason || "see the server log"}`, "error");
  });

  // Everything is known and every button listens before any button is
  // enabled: a click can never meet a page still starting.
  const current = await currentSubscription();
  usersKnown = (await api("GET", "/subscription")).users;
  if (!usersKnown) localStorage.removeItem(SIGN_IN_KEY);
  if ((await webpush.state()) === "denied") {
    say("Notifications are blocked for this site. Allow them in the browser's site settings to subscribe.", "error");
  } else {
    say(current ? "Push is enabled for this browser." : "Push is off. Press “Enable push” to subscribe.");
  }
  showPerson(usersKnown, Boolean(current));
  show(current);
}

main().catch((error) => say(error.message, "error"));
