// The push console's story: sign in with the push token or an API key, and
// see what that key may do: compose a notification while its preview draws
// itself, send it and watch it go out, keep the history and the subscribers
// in view, look a person up to write to them or erase them, and make and
// revoke keys. The API is this page's own origin; the key lives in this
// tab's sessionStorage and nowhere else.

const TOKEN_KEY = "webpush-admin-token";
const CALLER_KEY = "webpush-admin-caller"; // who the key is: {name, scope, topics}
// What each scope may do, as the server's SCOPE_GRANTS says: the page asks
// only for what its key may have, so that nothing it does is refused.
const GRANTS = {
  send: new Set(["send", "own"]),
  read: new Set(["read", "own"]),
  admin: new Set(["send", "own", "read", "admin"]),
};
const FINISHED = new Set(["done", "cancelled", "expired", "failed"]);
const CANCELLABLE = new Set(["scheduled", "queued", "sending"]);
const STATUS_WORDS = {
  scheduled: "Scheduled",
  queued: "Queued",
  sending: "Sending",
  done: "Done",
  cancelled: "Cancelled",
  expired: "Expired",
  failed: "Failed",
  partial: "Some failed", // done, but some push services refused it
};
const POLL_MS = 500;
const REFRESH_MS = 5000;
const DEFAULT_ICON = "/static/icon.png";

const $ = (id) => document.getElementById(id);

// -- talking to the server -----------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status; // 0: the server could not be reached
  }
}

/** One API call; its JSON answer, or an ApiError carrying the server's own words. */
async function api(method, path, { body, token = session(), headers = {} } = {}) {
  headers = { ...headers };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch {
    throw new ApiError("Could not reach the server. Check that it is running and that this device is online, then try again.", 0);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: a proxy's error page, say; described below by its status
  }
  if (!response.ok) {
    const said = data && typeof data.error === "string" ? data.error : `HTTP ${response.status} ${response.statusText}`.trim();
    const error = new ApiError(said, response.status);
    if (response.status === 401 && token && token === session()) {
      signOut("The server no longer accepts this key: it may have been revoked, have expired or been changed. Sign in again.");
    }
    throw error;
  }
  return data;
}

/** An idempotency key, so that a send whose answer was lost can be retried safely. */
function freshKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- small helpers ---------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function say(id, text) {
  $(id).textContent = text || "";
}

function plural(n, one, many = `${one}s`) {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}

const sameDay = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const otherDay = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
const full = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

function shortTime(iso) {
  const date = new Date(iso);
  return (date.toDateString() === new Date().toDateString() ? sameDay : otherDay).format(date);
}

function timeElement(iso) {
  return el("time", { dateTime: iso, title: full.format(new Date(iso)) }, shortTime(iso));
}

/** A wall-clock time with no offset (a datetime-local value, a
 * send_at_local) as a person reads it: "24 Dec 2026, 09:00", the same in
 * every zone. */
const wallClock = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short", timeZone: "UTC" });
function localWords(local) {
  const [date, time] = local.split("T");
  const [year, month, day] = date.split("-").map(Number);
  const [hour, minute] = time.split(":").map(Number);
  return wallClock.format(new Date(Date.UTC(year, month - 1, day, hour, minute)));
}

/** When a wall-clock time comes where it comes first (UTC+14) and last
 * (UTC-12), in milliseconds: between the two it is going out, zone by zone. */
function localSpan(local) {
  const asUtc = new Date(`${local}Z`).getTime();
  return { first: asUtc - 14 * 3600e3, last: asUtc + 12 * 3600e3 };
}

const count = (doc, name) => (Number.isFinite(doc[name]) ? doc[name] : 0);

/** How a notification ended, for its colour and its word: a "done" one with
 * more failures than sends "failed", with some "partial". Subscriptions found
 * gone (removed) are ordinary life, not failures. */
function outcome(doc) {
  if (doc.status !== "done") return doc.status;
  const failed = count(doc, "failed");
  if (failed > count(doc, "sent")) return "failed";
  return failed > 0 ? "partial" : "done";
}

// -- the session ------------------------------------------------------------------

const timers = { refresh: 0, poll: 0 };
let watched = null; // the id of the notification whose progress is shown

function session() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Who the key of this tab is, as GET /key said at sign-in; null if unknown. */
function caller() {
  try {
    const who = JSON.parse(sessionStorage.getItem(CALLER_KEY));
    return who && GRANTS[who.scope] ? who : null;
  } catch {
    return null;
  }
}

/** Whether this tab's key may do what the server calls ``need``. */
function may(need) {
  return Boolean(GRANTS[caller()?.scope]?.has(need));
}

/** What a key may do, in a few words: "can send to deploys". */
function abilities({ scope, topics }) {
  if (scope === "admin") return "can do everything";
  if (scope === "read") return "can look, not send";
  return topics?.length ? `can send to ${topics.join(", ")}` : "can send";
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  say("sign-in-error", "");
  if (!token) {
    say("sign-in-error", "Enter the push token or your key.");
    return $("token").focus();
  }
  if (!/^[\x21-\x7e]+$/.test(token)) {
    say("sign-in-error", "That is not a key: a key is letters, digits and punctuation, without spaces.");
    return $("token").select();
  }
  $("sign-in-button").disabled = true;
  try {
    const who = await api("GET", "/key", { token });
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(CALLER_KEY, JSON.stringify({ name: who.name, scope: who.scope, topics: who.topics ?? null }));
    $("token").value = "";
    enter();
  } catch (error) {
    let message = error.message; // could not reach the server: already a sentence
    if (error.status === 401) message = "That key is not accepted: it may be mistyped, revoked or expired.";
    else if (error.status) message = `The server could not check the key: ${error.message}`;
    say("sign-in-error", message);
    $("token").select();
  } finally {
    $("sign-in-button").disabled = false;
  }
}

async function enter() {
  if (!caller()) {
    // A tab signed in before the console knew keys: ask the server who it is.
    try {
      const who = await api("GET", "/key");
      sessionStorage.setItem(CALLER_KEY, JSON.stringify({ name: who.name, scope: who.scope, topics: who.topics ?? null }));
    } catch (error) {
      if (session()) signOut(error.message);
      return;
    }
  }
  showScope(caller());
  $("sign-in").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
  refresh();
  loadPeopleSetting();
  clearInterval(timers.refresh);
  timers.refresh = setInterval(() => document.hidden || refresh(), REFRESH_MS);
  if (may("send")) $("title").focus();
}

/** Only the cards and buttons this key may use; a key narrowed to topics
 * chooses among them, and may not write to a person. */
function showScope(who) {
  const narrowed = who.scope === "send" && who.topics?.length > 0;
  say("who", `Signed in as ${who.name} (${abilities(who)})`);
  $("who").hidden = false;
  $("console").dataset.scope = who.scope;
  for (const id of ["compose", "preview-card"]) $(id).hidden = !may("send");
  for (const id of ["audience", "ages", "people", "history"]) $(id).hidden = !may("read");
  $("keys").hidden = !may("admin");
  $("erase-person").hidden = !may("admin");
  $("write-to-person").hidden = !may("send") || narrowed;
  $("topic-field").hidden = $("user-field").hidden = narrowed;
  $("topic-choice-field").hidden = !narrowed;
  $("topic-choice").replaceChildren(...(narrowed ? who.topics : []).map((topic) => el("option", { value: topic }, topic)));
  $("compose-scope").hidden = !narrowed;
  if (narrowed) {
    const topics = who.topics.map((topic) => `“${topic}”`);
    const list = topics.length === 1 ? `the topic ${topics[0]}` : `the topics ${topics.slice(0, -1).join(", ")} and ${topics.at(-1)}`;
    say("compose-scope", `This key may send only to ${list}: not to everyone, nor to one person.`);
  }
}

function signOut(reason = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(CALLER_KEY);
  clearInterval(timers.refresh);
  clearTimeout(timers.poll);
  watched = null;
  $("compose-form").reset();
  closeEveryone();
  drawPreview();
  $("history-table").tBodies[0].replaceChildren();
  $("topics").replaceChildren();
  $("topic-list").replaceChildren();
  $("age-list").replaceChildren();
  for (const id of ["compose-error", "history-error", "topics-error", "ages-error", "ages-hint", "progress-error", "totals", "people-error", "people-done"]) say(id, "");
  $("people-form").reset();
  showPerson(null);
  lastHistory = lastTopics = lastAges = "";
  forgetKeys();
  $("progress").hidden = true;
  $("console").hidden = true;
  $("sign-out").hidden = true;
  $("who").hidden = true;
  say("who", "");
  $("sign-in").hidden = false;
  say("sign-in-error", reason);
  $("token").focus();
}

function refresh() {
  if (!session()) return;
  loadHistory();
  loadAudience();
  loadAges();
  loadKeys();
}

// -- compose and preview -----------------------------------------------------------

let iconTimer = 0;

function linkHost(url) {
  try {
    return new URL(url || "/", location.origin).host;
  } catch {
    return location.host;
  }
}

function drawPreview() {
  $("preview-title-text").textContent = $("title").value.trim() || "Notification";
  $("preview-body").textContent = $("body").value.trim();
  $("preview-host").textContent = linkHost($("url").value.trim());
  // A time already past sends at once, as the server does with it.
  const sendAt = $("send-at").value;
  $("send").textContent = sendAt && dueLater(sendAt, $("send-local").checked) ? "Schedule" : "Send now";
  clearTimeout(iconTimer);
  // A moment's pause, so that a half-typed address is not fetched at each key.
  iconTimer = setTimeout(drawIcon, 300);
}

/** Whether a "Send at" value is still to come: for this device's clock, or,
 * in each subscriber's own time zone, for the last zone on Earth. */
function dueLater(sendAt, local) {
  const when = local ? localSpan(sendAt).last : new Date(sendAt).getTime();
  return when > Date.now();
}

function drawIcon() {
  const image = $("preview-icon");
  let wanted = DEFAULT_ICON;
  try {
    wanted = new URL($("icon").value.trim() || DEFAULT_ICON, location.origin).href;
  } catch {
    // not a URL: the default icon, as a browser would show
  }
  if (image.src !== wanted) image.src = wanted;
}

function previewIconFailed() {
  const fallback = new URL(DEFAULT_ICON, location.origin).href;
  if ($("preview-icon").src !== fallback) $("preview-icon").src = fallback;
}

class InputError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field; // the id of the field to put right
  }
}

const EMPTY = "Write a title or a body first: a notification needs something to show.";
const BAD_LINK = "The link must be a web address (https://…) or a path on your site, such as /changelog.";
const BAD_ICON = "The icon must be the web address of an image (https://…) or a path on your site, such as /static/icon.png.";
const TTL_WORDS = "“Time to live” is a whole number of seconds, from 0 to 2,419,200 (28 days); or leave it empty for the server's default.";
const RATE_WORDS = "“Pace” is a whole number of notifications a minute, from 60 to 1,000,000; or leave it empty to send as fast as possible.";
const LOCAL_WORDS = "“Send at” must be a date and a time, such as 24 Dec at 09:00, for each subscriber to get it when their own clock shows it.";
const tooFar = (days) => `“Send at” is too far ahead: a notification can be scheduled at most ${days} days from now.`;

/** Whether ``value`` is an address a browser can open (or load, ``schemes``),
 * on its own or as a path on this site. */
function isWebAddress(value, schemes = ["http:", "https:"]) {
  try {
    return schemes.includes(new URL(value, location.origin).protocol);
  } catch {
    return false;
  }
}

/** The POST /push body the form describes. What a person commonly gets wrong
 * is said here, before sending; the server judges the rest. */
function composed() {
  const body = {};
  for (const name of ["title", "body", "url", "icon", "topic", "urgency"]) {
    const value = $(name).value.trim();
    if (value) body[name] = value;
  }
  if (!body.title && !body.body) throw new InputError(EMPTY, "title");
  if (body.url && !isWebAddress(body.url)) throw new InputError(BAD_LINK, "url");
  if (body.icon && !isWebAddress(body.icon, ["http:", "https:", "data:"])) throw new InputError(BAD_ICON, "icon");
  if (!$("topic-choice-field").hidden) body.topic = $("topic-choice").value;
  const user = $("user-field").hidden ? "" : $("user").value.trim();
  if (user && body.topic) throw new InputError("Write to a topic or to a person, not both: clear one of the two.", "topic");
  if (user) body.users = [user];
  const ttl = $("ttl");
  if (!ttl.validity.valid) throw new InputError(TTL_WORDS, "ttl");
  if (ttl.value !== "") body.ttl = Number(ttl.value);
  const rate = $("rate");
  if (!rate.validity.valid) throw new InputError(RATE_WORDS, "rate");
  if (rate.value !== "") body.rate = Number(rate.value);
  const sendAt = $("send-at");
  if (sendAt.validity.badInput) throw new InputError("“Send at” is incomplete: give a date and a time, or clear it to send now.", "send-at");
  if (sendAt.value && $("send-local").checked) {
    // Each subscriber's own wall clock: sent as typed, with no offset.
    if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$/.test(sendAt.value)) throw new InputError(LOCAL_WORDS, "send-at");
    body.send_at_local = sendAt.value;
  } else if (sendAt.value) {
    const when = new Date(sendAt.value); // a datetime-local value is this device's local time
    if (Number.isNaN(when.getTime())) throw new InputError("“Send at” is not a date and time this browser understands.", "send-at");
    body.send_at = when.toISOString();
  }
  return body;
}

/** The server's refusals a person most often meets, in words for them: each
 * a pattern of the server's words, and what to say instead. Any other refusal
 * is shown in the server's own words. */
const REFUSALS = [
  [/^nothing to send/, () => EMPTY],
  [/(\d+) over the \d+-byte limit of an encrypted push message/, (m) => `It is too long to fit in a push message: shorten the body or the title by about ${Number(m[1]).toLocaleString()} characters.`],
  [/^the body is over the/, () => "It is far too long to fit in a push message, which holds about 4,000 characters: shorten the body."],
  [/^'ttl' /, () => TTL_WORDS],
  [/^'url' /, () => BAD_LINK],
  [/^'topic' names must be 1-(\d+)/, (m) => `A topic's name is made of letters, digits, “.”, “_” or “-”, at most ${m[1]} of them, without spaces.`],
  [/^'users' ids must be 1-(\d+)/, (m) => `A person is named by their id on your site: 1 to ${m[1]} characters, on one line.`],
  [/scheduled at most (\d+) days ahead/, (m) => tooFar(m[1])],
  [/^'rate' /, () => RATE_WORDS],
  [/^'send_at_local' may be at most (\d+) days ahead/, (m) => tooFar(m[1])],
  [/^'send_at_local' /, () => LOCAL_WORDS],
  [/^give 'send_at_local' or /, () => "Send it at one moment for everyone or at a time in each subscriber's own time zone, not both."],
  [/may send only to the topics (.+), not to everyone/, (m) => `This key may send only to the topics ${m[1]}: choose one of them.`],
  [/has the scope '(\w+)'/, () => "This key may not send notifications: sign in with a send or admin key."],
  [/try again in (\d+) s$/, (m) => `Too many notifications at once: try again in ${plural(Number(m[1]), "second")}.`],
];

/** A refused send, said for the person at the form. */
function refusal(error) {
  for (const [pattern, words] of REFUSALS) {
    const match = pattern.exec(error.message);
    if (match) return words(match);
  }
  if (error.status >= 500) return `The server could not take it (${error.message}). Try again in a moment: the same notification will not go out twice.`;
  return error.message;
}

let pending = { body: "", key: freshKey() }; // kept while a send may be retried
let asked = null; // the POST /push body whose sending to everyone is being asked

async function send(event) {
  event.preventDefault();
  say("compose-error", "");
  closeEveryone();
  let body;
  try {
    body = composed();
  } catch (error) {
    say("compose-error", error.message);
    return error.field && $(error.field).focus();
  }
  // Nothing narrows it: every subscriber gets it, so the page asks first.
  if (!body.topic && !body.users) return askEveryone(body);
  post(body);
}

/** "Send “Deploy done” to all 1,234 subscribers now?", with the number the
 * server counts at this moment. */
async function askEveryone(body) {
  asked = body;
  const button = $("send");
  button.disabled = true;
  let everyone = null;
  try {
    const health = await api("GET", "/health", { token: null });
    everyone = count(health, "subscriptions") + count(health, "fcm_tokens");
  } catch {
    // unknown: asked without a number
  } finally {
    button.disabled = false;
  }
  if (asked !== body) return; // the form changed while counting
  const text = body.title || body.body;
  const name = `“${text.length > 60 ? `${text.slice(0, 59).trimEnd()}…` : text}”`;
  const all = everyone === null ? "all subscribers" : everyone === 1 ? "the one subscriber" : `all ${plural(everyone, "subscriber")}`;
  const none = everyone === 0 ? " No one has subscribed yet." : "";
  if (body.send_at_local && dueLater(body.send_at_local, true)) {
    say("everyone-question", `Schedule ${name} for ${all}, at ${localWords(body.send_at_local)} in each subscriber's own time zone?${none}`);
    say("everyone-yes", "Schedule for everyone");
  } else if (body.send_at) {
    say("everyone-question", `Schedule ${name} for ${all}, on ${full.format(new Date(body.send_at))}?${none}`);
    say("everyone-yes", "Schedule for everyone");
  } else {
    say("everyone-question", `Send ${name} to ${all} now?${none}`);
    say("everyone-yes", "Send to everyone");
  }
  $("everyone-confirm").hidden = false;
  $("everyone-no").focus();
}

function closeEveryone() {
  asked = null;
  $("everyone-confirm").hidden = true;
}

async function post(body) {
  const text = JSON.stringify(body);
  if (text !== pending.body) pending = { body: text, key: freshKey() };
  const button = $("send");
  button.disabled = true;
  try {
    const answer = await api("POST", "/push", { body, headers: { "Idempotency-Key": pending.key } });
    pending = { body: "", key: freshKey() }; // done: the same form again is a new notification
    watch(answer);
    loadHistory();
  } catch (error) {
    if (!session()) return; // refused as signed out: signOut said why
    if (error.status === 0) {
      say("compose-error", "Could not reach the server. Check that it is running and that this device is online, then send again: the same notification will not go out twice.");
    } else {
      if (error.status < 500) pending = { body: "", key: freshKey() }; // refused: nothing to retry
      say("compose-error", refusal(error));
    }
  } finally {
    button.disabled = false;
  }
}

// -- progress ---------------------------------------------------------------------

function watch(answer) {
  clearTimeout(timers.poll);
  watched = answer.id;
  $("progress").hidden = false;
  delete $("progress").dataset.outcome;
  $("progress-bar").value = 0;
  say("progress-error", "");
  say("progress-text", answer.status === "scheduled" ? "Scheduled…" : `Queued for ${plural(count(answer, "subscriptions"), "subscriber")}…`);
  poll(answer.id);
}

async function poll(id) {
  let doc;
  try {
    doc = await api("GET", `/notifications/${encodeURIComponent(id)}`);
  } catch (error) {
    if (watched !== id) return;
    say("progress-error", `Could not read its progress: ${error.message}`);
    if (error.status === 0 || error.status >= 500) timers.poll = setTimeout(() => poll(id), POLL_MS * 4);
    return;
  }
  if (watched !== id) return;
  say("progress-error", "");
  drawProgress(doc);
  if (FINISHED.has(doc.status) || doc.status === "scheduled") {
    refresh(); // its row, and the subscribers it found gone
    return; // a scheduled one is followed in the history, where it can be cancelled
  }
  timers.poll = setTimeout(() => poll(id), POLL_MS);
}

/** The words for what the daily limit (MAX_PER_DAY) held back, if any:
 * "2 held back by the daily limit". */
function heldBack(doc) {
  const capped = count(doc, "capped");
  return capped ? `${capped.toLocaleString()} held back by the daily limit` : "";
}

/** When a throttled notification still going out should be done, in this
 * device's time: "expected to finish around 14:05". */
function finishing(doc) {
  if (!doc.rate || !doc.finish || !["queued", "sending"].includes(doc.status)) return "";
  return `expected to finish around ${shortTime(doc.finish)}`;
}

function drawProgress(doc) {
  const total = count(doc, "total");
  // Handled: sent, failed, removed or held back; the rest is still to go.
  const settled = Number.isFinite(doc.pending)
    ? Math.max(0, total - doc.pending)
    : count(doc, "sent") + count(doc, "failed") + count(doc, "removed") + count(doc, "capped");
  const finished = FINISHED.has(doc.status);
  const fraction = total ? Math.min(1, settled / total) : finished ? 1 : 0;
  const bar = $("progress-bar");
  bar.value = fraction;
  bar.setAttribute("aria-valuetext", `${Math.round(fraction * 100)}%`);
  const ended = outcome(doc);
  if (FINISHED.has(doc.status)) $("progress").dataset.outcome = ended;
  else delete $("progress").dataset.outcome;
  const sent = count(doc, "sent");
  const held = heldBack(doc);
  const others = `${count(doc, "failed")} failed, ${count(doc, "removed")} removed as gone${held ? `, ${held}` : ""}`;
  const audience = doc.audience === "users" ? "devices of this person" : doc.topic ? `subscribers of “${doc.topic}”` : "subscribers";
  let text;
  if (doc.status === "scheduled" && doc.send_at_local) {
    text = `Scheduled for ${localWords(doc.send_at_local)} in each subscriber's own time zone, to ${plural(total, "subscriber")} as of now.`;
    if (may("admin")) text += " Cancel it in the history below.";
  } else if (doc.status === "scheduled") {
    text = `Scheduled for ${full.format(new Date(doc.send_at))}, to ${plural(total, "subscriber")} as of now.`;
    if (may("admin")) text += " Cancel it in the history below.";
  } else if (doc.status === "queued") {
    text = `Queued for ${plural(total, "subscriber")}…`;
  } else if (doc.status === "sending") {
    text = `Sending: ${settled.toLocaleString()} of ${total.toLocaleString()} handled (${sent.toLocaleString()} sent, ${others}).`;
    if (doc.send_at_local) text += ` Each subscriber gets it at ${localWords(doc.send_at_local)} on their own clock.`;
  } else if (doc.status === "done") {
    text = total ? `${STATUS_WORDS[ended]}: ${sent.toLocaleString()} of ${total.toLocaleString()} sent, ${others}.` : `Done: there are no ${audience}, so nothing was sent.`;
  } else if (doc.status === "cancelled") {
    text = doc.started ? `Cancelled while sending: ${sent.toLocaleString()} of ${total.toLocaleString()} sent, ${others}.` : "Cancelled: it was never sent.";
  } else if (doc.status === "expired") {
    text = "Expired: its time to live passed before it could be sent.";
  } else {
    text = `${STATUS_WORDS[doc.status] || doc.status}: ${sent.toLocaleString()} of ${total.toLocaleString()} sent, ${others}.`;
  }
  const finish = finishing(doc);
  if (finish) text += ` At most ${plural(doc.rate, "message")} a minute: ${finish}.`;
  const cause = doc.errors?.[0];
  if (cause) text += ` Commonest failure: ${describeError(cause)}.`;
  say("progress-text", text);
}

/** Who a notification goes to, in words: a status document's audience. */
function audienceWords(doc) {
  const named = count(doc, "named");
  if (doc.audience === "users") return named === 1 ? "one person" : plural(named, "person", "people");
  if (doc.audience === "subscriptions") return plural(named, "device");
  return doc.topic ? doc.topic : null;
}

function describeError(cause) {
  const status = cause.status ? ` (${cause.status})` : "";
  const origin = cause.origin ? ` from ${cause.origin}` : "";
  return `${cause.reason || "refused"}${status}${origin}, ${plural(cause.count || 0, "time")}`;
}

// -- history ----------------------------------------------------------------------

const turns = {}; // per list, the latest load: only its answer is drawn, however they arrive

/** GET `path` and draw the answer, or say in `errorId` why `what` could not be loaded. */
async function loadList(list, path, draw, errorId, what) {
  const turn = (turns[list] = (turns[list] || 0) + 1);
  try {
    const answer = await api("GET", path);
    if (turn !== turns[list]) return;
    say(errorId, "");
    draw(answer);
  } catch (error) {
    if (turn === turns[list] && session()) say(errorId, `Could not load ${what}: ${error.message}`);
  }
}

let lastHistory = "";

async function loadHistory() {
  if (!may("read")) return;
  await loadList("history", "/notifications?limit=50", ({ notifications }) => drawHistory(notifications || []), "history-error", "the history");
}

function drawHistory(docs) {
  const text = JSON.stringify(docs);
  if (text === lastHistory) return; // unchanged: keep the rows, and the focus in them
  lastHistory = text;
  const focused = document.activeElement?.dataset?.cancel;
  const rows = docs.map(historyRow);
  $("history-table").tBodies[0].replaceChildren(...rows);
  $("history-empty").hidden = docs.length > 0;
  $("history-table").hidden = docs.length === 0;
  if (focused) document.querySelector(`[data-cancel="${CSS.escape(focused)}"]`)?.focus();
}

function historyRow(doc) {
  const delivered = count(doc, "delivered");
  const clicked = count(doc, "clicked");
  const rate = delivered ? `${Math.round((clicked / delivered) * 100)}%` : "—";
  const scheduled = doc.status === "scheduled" && doc.send_at;
  const note = (text) => (text ? el("span", { className: "note" }, text) : null);
  let when = scheduled ? ["due ", timeElement(doc.send_at)] : [timeElement(doc.started || doc.created)];
  if (doc.send_at_local) {
    // Each subscriber's own wall clock: the same words in every zone.
    const local = localWords(doc.send_at_local);
    when = scheduled ? [`due ${local}`, note("in each subscriber's own time zone")] : [...when, note(`for ${local} in each subscriber's own time zone`)];
  }
  const finish = finishing(doc);
  const notes = [
    doc.rate ? note(`at most ${plural(doc.rate, "message")} a minute${finish ? `, ${finish}` : ""}`) : null,
    note(heldBack(doc)),
  ];
  const cause = doc.errors?.[0] ? el("span", { className: "cause" }, describeError(doc.errors[0])) : null;
  const cell = (props, ...content) => el("td", { role: "cell", ...props }, ...content);
  const number = (label, value) => cell({ className: "num", dataset: { label } }, value.toLocaleString());
  const cancel = CANCELLABLE.has(doc.status) && may("admin")
    ? el("button", { type: "button", className: "quiet", dataset: { cancel: doc.id }, "aria-label": `Cancel “${doc.title || doc.id}”` }, "Cancel")
    : null;
  return el(
    "tr",
    { role: "row", dataset: { id: doc.id, status: doc.status } },
    cell({ className: "status-cell", dataset: { label: "Status" } }, el("span", { className: `status ${outcome(doc)}` }, STATUS_WORDS[outcome(doc)] || doc.status)),
    cell({ className: "title", dataset: { label: "Title" } }, doc.title || "(no title)", ...notes, cause),
    cell({ className: "topic", dataset: { label: "Topic" } }, audienceWords(doc) || el("span", { className: "topic-none" }, "everyone")),
    cell({ className: "when", dataset: { label: "Time" } }, ...when),
    number("Sent", count(doc, "sent")),
    number("Failed", count(doc, "failed")),
    number("Removed", count(doc, "removed")),
    number("Delivered", delivered),
    number("Clicked", clicked),
    cell({ className: "num", dataset: { label: "Click rate" } }, rate),
    cell({ className: "actions" }, cancel),
  );
}

async function cancel(button) {
  const id = button.dataset.cancel;
  button.disabled = true;
  say("history-error", "");
  try {
    await api("DELETE", `/notifications/${encodeURIComponent(id)}`);
    if (watched === id) {
      clearTimeout(timers.poll);
      poll(id);
    }
  } catch (error) {
    button.disabled = false;
    say("history-error", `Could not cancel it: ${error.message}`);
  }
  loadHistory();
}

// -- the audience -----------------------------------------------------------------

let lastTopics = "";
let audienceTurn = 0;

async function loadAudience() {
  const turn = ++audienceTurn;
  const [health, topics] = await Promise.allSettled([api("GET", "/health", { token: null }), may("read") ? api("GET", "/topics") : null]);
  if (turn !== audienceTurn || !session()) return;
  if (health.status === "fulfilled") {
    const { subscriptions = 0, fcm_tokens = 0, version } = health.value;
    say("totals", `${plural(subscriptions, "browser")}, ${plural(fcm_tokens, "app")}${version ? ` · server ${version}` : ""}`);
  } else {
    say("totals", health.reason.status === 0 ? "Server out of reach" : "");
  }
  if (!may("read")) return; // the totals only
  if (topics.status === "fulfilled") {
    say("topics-error", "");
    const list = Array.isArray(topics.value) ? topics.value : topics.value?.topics || [];
    drawTopics(list, health.status === "fulfilled" ? health.value : null);
  } else if (session()) {
    say("topics-error", `Could not load the topics: ${topics.reason.message}`);
  }
}

function drawTopics(topics, health) {
  const everyone = health ? count(health, "subscriptions") + count(health, "fcm_tokens") : null;
  const text = JSON.stringify([topics, everyone]);
  if (text === lastTopics) return;
  lastTopics = text;
  const chip = (name, n, className = "") =>
    el("li", { className, dataset: { topic: name } }, el("span", { className: "chip-name" }, name), " ", el("span", { className: "chip-count" }, n.toLocaleString(), el("span", { className: "visually-hidden" }, n === 1 ? " subscriber" : " subscribers")));
  const chips = topics.map((t) => chip(t.topic, count(t, "subscriptions")));
  if (everyone !== null) chips.unshift(chip("Everyone", everyone, "everyone"));
  $("topics").replaceChildren(...chips);
  $("topics-empty").hidden = topics.length > 0;
  $("topic-list").replaceChildren(...topics.map((t) => el("option", { value: t.topic }, plural(count(t, "subscriptions"), "subscriber"))));
}

// -- subscriptions by last success ------------------------------------------------

let lastAges = "";

async function loadAges() {
  if (!may("read")) return;
  await loadList("ages", "/subscriptions/ages", drawAges, "ages-error", "how recently subscriptions were reached");
}

/** Each span of days as a person says it ("Reached in the last day", "1 to 7
 * days ago"), the oldest saying that the next send removes them, when this
 * server removes subscriptions that go unreached. */
function ageRows({ stale_after_days: stale, ages = [] }) {
  let since = 0; // where the span starts, in days ago
  return ages.map(({ up_to_days: days, subscriptions }) => {
    const n = Number.isFinite(subscriptions) ? subscriptions : 0;
    if (days === null) {
      const over = `Over ${plural(since, "day")} ago`;
      return { words: stale ? `${over} (removed at the next send)` : over, n, stale: Boolean(stale) };
    }
    let words = `${since.toLocaleString()} to ${plural(days, "day")} ago`;
    if (!since) words = days === 1 ? "Reached in the last day" : `Reached in the last ${plural(days, "day")}`;
    since = days;
    return { words, n };
  });
}

function drawAges(answer) {
  answer ||= {};
  const text = JSON.stringify(answer);
  if (text === lastAges) return; // unchanged: keep what is drawn
  lastAges = text;
  const rows = ageRows(answer);
  const never = count(answer, "never_reached");
  const unknown = count(answer, "unknown");
  // Not spans of days: counts of their own, set apart.
  if (never) rows.push({ words: "Never reached yet", n: never, apart: true });
  if (unknown) rows.push({ words: "Not known (stored before the server kept dates)", n: unknown, apart: !never });
  const row = ({ words, n, stale, apart }) =>
    el("div", { className: [stale && n ? "stale" : "", apart ? "apart" : ""].join(" ").trim() }, el("dt", {}, words), el("dd", {}, n.toLocaleString()));
  $("age-list").replaceChildren(...rows.map(row));
  const kept = answer.stale_after_days ? "" : " This server keeps subscriptions however long they go unreached.";
  say("ages-hint", `Counted from each one's last delivery, or from when it was stored if it has not been reached yet.${kept}`);
}

// -- people -----------------------------------------------------------------------

let person = null; // the person looked up: {user, subscriptions}

/** Whether the server knows signed-in people (USER_TOKEN_SECRET is set). */
async function loadPeopleSetting() {
  if (!may("read")) return;
  try {
    const { users } = await api("GET", "/subscription", { token: null });
    $("people-off").hidden = users !== false;
  } catch {
    $("people-off").hidden = true; // unknown: the look-up says what is wrong
  }
}

const PUSH_SERVICES = [
  [/(^|\.)fcm\.googleapis\.com$/, "Chrome, Edge or another Chromium browser"],
  [/(^|\.)push\.services\.mozilla\.com$/, "Firefox"],
  [/(^|\.)push\.apple\.com$/, "Safari"],
  [/(^|\.)notify\.windows\.com$/, "Edge (Windows)"],
];

/** What a person would call a device: their app, or the browser its push service serves. */
function deviceName(device) {
  if (device.channel === "fcm") return "The app";
  let host = "";
  try {
    host = new URL(device.origin).hostname;
  } catch {
    // no origin: said below as "a browser"
  }
  const known = PUSH_SERVICES.find(([pattern]) => pattern.test(host));
  return known ? known[1] : host ? `A browser (push service ${host})` : "A browser";
}

function deviceItem(device) {
  const detail = [`added ${shortTime(device.created)}`];
  detail.push(device.last_success ? `last reached ${shortTime(device.last_success)}` : "not reached yet");
  if (device.topics?.length) detail.push(`topics: ${device.topics.join(", ")}`);
  return el(
    "li",
    { dataset: { id: device.id } },
    el("span", { className: "device-name" }, deviceName(device)),
    el("span", { className: "device-detail" }, detail.join(" · ")),
  );
}

function showPerson(found) {
  person = found;
  $("person-card").hidden = !found;
  $("erase-confirm").hidden = true;
  if (!found) return $("devices").replaceChildren();
  const n = found.subscriptions.length;
  say("person-summary", `“${found.user}” has ${n === 1 ? "one device" : plural(n, "device")} that can be reached:`);
  $("devices").replaceChildren(...found.subscriptions.map(deviceItem));
}

async function lookUp(event) {
  event?.preventDefault();
  say("people-error", "");
  say("people-done", "");
  const user = $("person").value.trim();
  if (!user) {
    showPerson(null);
    say("people-error", "Type the person's id, as your site knows them, then look them up.");
    return $("person").focus();
  }
  $("look-up").disabled = true;
  try {
    showPerson(await api("GET", `/users/${encodeURIComponent(user)}`));
  } catch (error) {
    showPerson(null);
    if (error.status === 404) {
      say("people-error", `No device of “${user}” can be reached: they have not allowed notifications while signed in to your site, or they were erased.`);
    } else {
      say("people-error", `Could not look them up: ${error.message}`);
    }
  } finally {
    $("look-up").disabled = false;
  }
}

function writeToPerson() {
  $("compose-form").reset();
  closeEveryone();
  $("user").value = person.user;
  drawPreview();
  say("compose-error", "");
  $("title").focus();
}

function askToErase() {
  const n = person.subscriptions.length;
  say("erase-question", `Erase “${person.user}”? Their ${n === 1 ? "device" : plural(n, "device")} will no longer get notifications, and what they reported (delivered, clicked) is deleted. This cannot be undone.`);
  $("erase-confirm").hidden = false;
  $("erase-no").focus();
}

async function erasePerson() {
  const { user } = person;
  $("erase-yes").disabled = true;
  try {
    await api("DELETE", `/users/${encodeURIComponent(user)}`);
    showPerson(null);
    $("people-form").reset();
    say("people-done", `“${user}” is erased: their devices and what they reported are gone from this server.`);
    refresh();
  } catch (error) {
    say("people-error", `Could not erase them: ${error.message}`);
  } finally {
    $("erase-yes").disabled = false;
  }
}

// -- keys -------------------------------------------------------------------------

const SCOPE_WORDS = { send: "Send", read: "Read", admin: "Admin" };
let lastKeys = "";
let revoking = null; // the name of the key whose revocation is being asked

async function loadKeys() {
  if (!may("admin")) return;
  await loadList("keys", "/keys", ({ keys }) => drawKeys(keys || []), "keys-error", "the keys");
}

function drawKeys(keys) {
  if (revoking) return; // not under the question being asked; drawn once it is answered
  const text = JSON.stringify(keys);
  if (text === lastKeys) return; // unchanged: keep the focus where it is
  lastKeys = text;
  const focused = document.activeElement?.dataset?.revoke;
  $("key-list").replaceChildren(...keys.map(keyItem));
  $("keys-empty").hidden = keys.length > 0;
  if (focused) document.querySelector(`[data-revoke="${CSS.escape(focused)}"]`)?.focus();
}

function keyItem(key) {
  const detail = [key.topics?.length ? `only to ${key.topics.join(", ")}` : null, `made ${shortTime(key.created)}`];
  detail.push(key.last_used ? `last used ${shortTime(key.last_used)}` : "last used never");
  if (key.expires) detail.push(`${key.expired ? "expired" : "expires"} ${shortTime(key.expires)}`);
  else detail.push("never expires");
  return el(
    "li",
    { dataset: { name: key.name }, className: key.expired ? "expired" : "" },
    el(
      "div",
      { className: "key-head" },
      el("span", { className: "key-name" }, key.name),
      el("span", { className: `status scope-${key.scope}` }, SCOPE_WORDS[key.scope] || key.scope),
      key.expired ? el("span", { className: "status expired" }, "Expired") : null,
      el("button", { type: "button", className: "quiet danger", dataset: { revoke: key.name }, "aria-label": `Revoke “${key.name}”…` }, "Revoke…"),
    ),
    el("span", { className: "device-detail" }, detail.filter(Boolean).join(" · ")),
  );
}

/** The POST /keys body the form describes (the server judges the name). */
function keyWanted() {
  const body = { name: $("key-name").value.trim(), scope: document.querySelector('input[name="key-scope"]:checked').value };
  if (!body.name) throw new InputError("Give the key a name: who or what will use it, such as “ci”.");
  const topics = $("key-topics").value.split(",").map((t) => t.trim()).filter(Boolean);
  if (body.scope === "send" && topics.length) body.topics = topics;
  const expiry = $("key-expiry").value;
  if (expiry) body.expires_in = Number(expiry);
  return body;
}

function showKeyScope() {
  const scope = document.querySelector('input[name="key-scope"]:checked').value;
  $("key-topics-field").hidden = scope !== "send";
}

async function makeKey(event) {
  event.preventDefault();
  say("key-error", "");
  say("keys-done", "");
  let body;
  try {
    body = keyWanted();
  } catch (error) {
    say("key-error", error.message);
    return $("key-name").focus();
  }
  $("make-key").disabled = true;
  try {
    const made = await api("POST", "/keys", { body });
    $("key-form").reset();
    showKeyScope();
    say("key-made-text", `Here is the key “${made.name}”, which ${abilities(made)}. Copy it now: it will not be shown again.`);
    $("key-secret").value = made.key;
    say("copy-done", "");
    $("key-made").hidden = false;
    $("copy-key").focus();
    loadKeys();
  } catch (error) {
    say("key-error", `Could not make the key: ${error.message}`);
  } finally {
    $("make-key").disabled = false;
  }
}

async function copyKey() {
  const field = $("key-secret");
  say("copy-done", "");
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    // No clipboard here (a page served over plain HTTP has none): selected
    // for the person to copy.
    field.focus();
    field.select();
    $("copy-done").className = "hint";
    return say("copy-done", "This browser does not let the page copy it: it is selected, so copy it with Ctrl+C (⌘C on a Mac).");
  }
  $("copy-done").className = "ok";
  say("copy-done", "Copied.");
}

function askToRevoke(name) {
  closeRevoke();
  const item = [...$("key-list").children].find((li) => li.dataset.name === name);
  if (!item) return;
  revoking = name;
  const self = caller()?.name === name ? " You are signed in with it, so you will be signed out." : "";
  item.append(
    el(
      "div",
      { id: "revoke-confirm", className: "confirm", role: "group", "aria-labelledby": "revoke-question" },
      el("p", { id: "revoke-question" }, `Revoke “${name}”? Whatever uses it is refused from now on. This cannot be undone.${self}`),
      el(
        "div",
        { className: "buttons" },
        el("button", { id: "revoke-yes", type: "button", className: "danger" }, "Revoke it"),
        el("button", { id: "revoke-no", type: "button", className: "quiet" }, "Keep it"),
      ),
    ),
  );
  $("revoke-no").focus();
}

function closeRevoke() {
  $("revoke-confirm")?.remove();
  const name = revoking;
  revoking = null;
  return name;
}

async function revokeKey() {
  const name = revoking;
  $("revoke-yes").disabled = true;
  say("keys-error", "");
  say("keys-done", "");
  try {
    await api("DELETE", `/keys/${encodeURIComponent(name)}`);
  } catch (error) {
    if (!session()) return; // refused as signed out: signOut said why
    $("revoke-yes").disabled = false;
    say("keys-error", `Could not revoke it: ${error.message}`);
    return;
  }
  if (caller()?.name === name) return signOut(`The key “${name}” is revoked: sign in with another.`);
  closeRevoke();
  say("keys-done", `“${name}” is revoked: the server refuses it from now on.`);
  loadKeys();
}

function forgetKeys() {
  closeRevoke();
  lastKeys = "";
  $("key-form").reset();
  showKeyScope();
  $("key-secret").value = "";
  $("key-made").hidden = true;
  $("key-list").replaceChildren();
  for (const id of ["key-error", "keys-error", "keys-done", "copy-done", "key-made-text"]) say(id, "");
}

// -- wiring -----------------------------------------------------------------------

function main() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("compose-form").addEventListener("submit", send);
  $("compose-form").addEventListener("input", drawPreview);
  // A question about what the form said before: asked again on Send.
  $("compose-form").addEventListener("input", closeEveryone);
  $("everyone-yes").addEventListener("click", () => {
    const body = asked;
    closeEveryone();
    $("send").focus();
    if (body) post(body);
  });
  $("everyone-no").addEventListener("click", () => {
    closeEveryone();
    $("send").focus();
  });
  $("preview-icon").addEventListener("error", previewIconFailed);
  $("refresh").addEventListener("click", refresh);
  $("people-form").addEventListener("submit", lookUp);
  $("write-to-person").addEventListener("click", writeToPerson);
  $("erase-person").addEventListener("click", askToErase);
  $("erase-yes").addEventListener("click", erasePerson);
  $("erase-no").addEventListener("click", () => {
    $("erase-confirm").hidden = true;
    $("erase-person").focus();
  });
  $("key-form").addEventListener("submit", makeKey);
  $("key-form").addEventListener("change", showKeyScope);
  $("copy-key").addEventListener("click", copyKey);
  $("key-list").addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.dataset.revoke) askToRevoke(button.dataset.revoke);
    else if (button.id === "revoke-yes") revokeKey();
    else if (button.id === "revoke-no") {
      const name = closeRevoke();
      document.querySelector(`[data-revoke="${CSS.escape(name)}"]`)?.focus();
      loadKeys(); // what changed while asking
    }
  });
  $("history-table").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-cancel]");
    if (button) cancel(button);
  });
  document.addEventListener("visibilitychange", () => document.hidden || refresh());
  drawPreview();
  if (session()) enter();
  else $("token").focus();
}

main();
