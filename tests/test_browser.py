"""The demo client (static/) in a real Chromium, driven by Playwright.

Chromium cannot reach a real push service here, so only
``PushManager.prototype.subscribe`` / ``getSubscription`` are replaced, by an
init script that returns a subscription on the push-service stand-in with keys
this test holds. Everything else is real: the page fetches the key and posts the
subscription to a real server process, the server encrypts and sends, the
stand-in decrypts, and the test hands the plaintext to the service worker
through the DevTools protocol (``ServiceWorker.deliverPushMessage``) and reads
the notification it shows.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests

import api
from conftest import (
    AUTH,
    BACKENDS,
    TOKEN,
    Server,
    env_of,
    server_pushed,
    subscription_store,
)
from tests.chromium import CHROMIUM, FLAGS, require_chromium
from tests.push_service import PushService

SCREENSHOT = Path(__file__).resolve().parent.parent / "static" / "screenshot.png"

require_chromium()

from playwright.sync_api import sync_playwright

STUB_PUSH_MANAGER = """
(({endpoint, p256dh, auth}) => {
  let current = null;
  const bytes = (b64) => Uint8Array.from(
    atob(b64.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (b64.length % 4)) % 4)),
    (c) => c.charCodeAt(0)).buffer;
  PushManager.prototype.subscribe = async function (options) {
    if (!options || !options.userVisibleOnly || !options.applicationServerKey) {
      throw new DOMException("userVisibleOnly and applicationServerKey are required", "NotAllowedError");
    }
    current = {
      endpoint, expirationTime: null,
      options: { userVisibleOnly: true, applicationServerKey: options.applicationServerKey },
      getKey: (name) => bytes(name === "p256dh" ? p256dh : auth),
      toJSON: () => ({ endpoint, expirationTime: null, keys: { p256dh, auth } }),
      unsubscribe: async () => { current = null; return true; },
    };
    window.__subscribeOptions = options;
    return current;
  };
  PushManager.prototype.getSubscription = async function () { return current; };
})
"""

NOTIFICATIONS = """async () => {
  const registration = await navigator.serviceWorker.ready;
  const shown = await registration.getNotifications();
  return shown.map((n) => ({ title: n.title, body: n.body, icon: n.icon, tag: n.tag, data: n.data }));
}"""


@pytest.fixture
def push_service():
    with PushService() as service:
        yield service


@pytest.fixture
def server(request, tmp_path):
    """A real server on the JSON store, or on each store in turn for the tests
    marked ON_BOTH_STORES: those where what the page does is kept (a
    subscription stored and deleted, receipts counted). The others are about
    the page and the service worker, which talk to the same API whatever the
    store."""
    env = env_of(getattr(request, "param", "json"), request)
    server = Server(tmp_path, PUSH_PROCESSES="1", **env).start()
    yield server
    server.stop()


ON_BOTH_STORES = pytest.mark.parametrize("server", BACKENDS, indirect=True)


@pytest.fixture
def browser():
    """A Chromium of each test's own: notifications shown by one must not be
    seen, nor held up, by the next."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


class Demo:
    """The demo page in a fresh browser context, with its console watched."""

    def __init__(
        self,
        browser,
        server: Server,
        subscriber,
        query: str = "",
        site: str | None = None,
        script: str = "",
        timezone_id: str | None = None,
    ):
        """``site``: the page's origin when it is not the server's (a shop
        that takes in the client); ``script``: more of an init script, run
        after the stand-in push manager's; ``timezone_id``: the browser's time
        zone, when not the machine's."""
        self.server = server
        self.site = site or server.url
        options = {"timezone_id": timezone_id} if timezone_id else {}
        self.context = browser.new_context(
            viewport={"width": 420, "height": 900}, **options
        )
        self.context.grant_permissions(["notifications"], origin=self.site)
        keys = subscriber.subscription["keys"]
        stub = {
            "endpoint": subscriber.endpoint,
            "p256dh": keys["p256dh"],
            "auth": keys["auth"],
        }
        self.context.add_init_script(f"({STUB_PUSH_MANAGER})({json.dumps(stub)})")
        if script:
            self.context.add_init_script(script)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console", lambda m: m.type == "error" and self.errors.append(m.text)
        )
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(self.site + "/" + query)
        self.page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        self.page.wait_for_function(
            "!document.querySelector('#status').textContent.startsWith('Checking')"
        )
        self.cdp = self.context.new_cdp_session(self.page)
        self.registrations: dict[str, str] = {}
        self.cdp.on("ServiceWorker.workerRegistrationUpdated", self._registrations)
        self.cdp.send("ServiceWorker.enable")

    def _registrations(self, event: dict) -> None:
        for registration in event["registrations"]:
            if not registration["isDeleted"]:
                self.registrations[registration["scopeURL"]] = registration[
                    "registrationId"
                ]

    def status(self) -> str:
        return self.page.inner_text("#status")

    def click(self, button: str, status_contains: str) -> None:
        self.page.click(button)
        self.page.wait_for_function(
            "text => document.querySelector('#status').textContent.includes(text)",
            arg=status_contains,
        )

    def deliver(self, data: str) -> None:
        """What Chromium does when its push service hands it a message."""
        deadline = time.monotonic() + 10
        while not self.registrations and time.monotonic() < deadline:
            self.page.wait_for_timeout(50)
        scope = self.site + "/"
        self.cdp.send(
            "ServiceWorker.deliverPushMessage",
            {
                "origin": self.site,
                "registrationId": self.registrations[scope],
                "data": data,
            },
        )

    def notifications(self, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = self.page.evaluate(NOTIFICATIONS)
            if len(shown) >= count:
                return shown
            self.page.wait_for_timeout(50)
        raise AssertionError(f"{count} notification(s) expected, saw {shown}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def demo(browser, server, push_service):
    subscriber = push_service.subscriber()
    demo = Demo(browser, server, subscriber)
    demo.subscriber = subscriber
    yield demo
    demo.close()


def stored(server: Server) -> int:
    return requests.get(server.url + "/health").json()["subscriptions"]


@ON_BOTH_STORES
def test_enabling_push_subscribes_with_the_servers_key_and_stores_the_subscription(
    demo, server
):
    assert "Push is off" in demo.status()
    demo.page.fill("#topics", "news, alerts")
    demo.click("#enable", "Push is enabled")
    options = demo.page.evaluate(
        "() => ({ visible: __subscribeOptions.userVisibleOnly, "
        "key: btoa(String.fromCharCode(...new Uint8Array(__subscribeOptions.applicationServerKey))) })"
    )
    public_key = requests.get(server.url + "/subscription").json()["public_key"]
    assert options["visible"] is True
    assert options["key"].rstrip("=").replace("+", "-").replace("/", "_") == public_key
    assert stored(server) == 1
    topics = requests.get(server.url + "/topics", headers=AUTH).json()
    assert topics == [
        {"topic": "alerts", "subscriptions": 1},
        {"topic": "news", "subscriptions": 1},
    ]
    shown = json.loads(demo.page.inner_text("#subscription"))
    assert shown["endpoint"] == demo.subscriber.endpoint
    assert demo.errors == []


def test_a_push_from_the_server_is_shown_as_a_notification(demo, server, push_service):
    demo.click("#enable", "Push is enabled")
    body = {"title": "Deploy done", "body": "v2 is live", "url": "/static/index.html"}
    assert server_pushed(server, body)["sent"] == 1
    delivery = push_service.wait_for(1)[0]
    assert delivery.error is None
    demo.deliver(delivery.plaintext.decode())
    [notification] = demo.notifications()
    assert (notification["title"], notification["body"]) == (
        "Deploy done",
        "v2 is live",
    )
    assert notification["data"]["url"] == "/static/index.html"
    assert notification["icon"].endswith("/static/icon.png")
    assert demo.errors == []


def test_an_empty_or_non_json_push_still_shows_a_generic_notification(demo):
    demo.click("#enable", "Push is enabled")
    demo.deliver("")
    demo.deliver("plain text, not JSON")
    shown = demo.notifications(2)
    assert {n["title"] for n in shown} == {"New notification"}
    assert "plain text, not JSON" in {n["body"] for n in shown}
    assert demo.errors == []


def test_the_test_button_sends_a_notification_to_this_browser_only(demo, push_service):
    demo.click("#enable", "Push is enabled")
    demo.click("#test", "Test notification sent")
    delivery = push_service.wait_for(1)[0]
    assert delivery.subscriber == demo.subscriber.id
    demo.deliver(delivery.plaintext.decode())
    [notification] = demo.notifications()
    assert notification["title"] == "Test notification"


@ON_BOTH_STORES
def test_disabling_push_unsubscribes_and_deletes_the_subscription_on_the_server(
    demo, server
):
    demo.click("#enable", "Push is enabled")
    assert stored(server) == 1
    demo.click("#disable", "Push is disabled")
    assert stored(server) == 0
    assert demo.page.is_enabled("#enable") and not demo.page.is_enabled("#test")
    assert demo.errors == []


# -- the made-up sign-in (docs/people.md: the demo) -------------------------------------

DEMO_SECRET = "a-site-backend-secret-0123456789abcdef"


@pytest.fixture(params=BACKENDS)
def demo_people(request, tmp_path, browser, push_service):
    """The demo page on a server with the made-up sign-in on, on each store."""
    env = env_of(request.param, request)
    server = Server(
        tmp_path,
        PUSH_PROCESSES="1",
        USER_TOKEN_SECRET=DEMO_SECRET,
        DEMO_USERS="true",
        **env,
    ).start()
    subscriber = push_service.subscriber()
    demo = Demo(browser, server, subscriber)
    demo.subscriber = subscriber
    yield demo
    demo.close()
    server.stop()


def devices_of(server: Server, user: str) -> list[str]:
    response = requests.get(f"{server.url}/users/{user}", headers=AUTH)
    if response.status_code == 404:
        return []
    return [device["id"] for device in response.json()["subscriptions"]]


def test_the_demo_signs_a_subscribed_browser_in_and_out_and_a_push_to_that_person_reaches_it(
    demo_people, push_service
):
    demo, server = demo_people, demo_people.server
    demo.click("#enable", "Push is enabled")
    stored_id = api.endpoint_id(demo.subscriber.endpoint)
    assert devices_of(server, "ana") == []
    demo.page.fill("#demo-user", "ana")
    demo.click("#sign-in", "Signed in as ana")
    assert demo.page.inner_text("#people-status").startswith(
        "Signed in as ana. This browser gets ana's notifications"
    )
    assert devices_of(server, "ana") == [stored_id]
    assert '"users": ["ana"]' in demo.page.inner_text("#curl")
    body = {"title": "Your order shipped", "users": ["ana"]}
    assert server_pushed(server, body)["sent"] == 1
    assert [d.subscriber for d in push_service.wait_for(1)] == [demo.subscriber.id]

    demo.click(
        "#sign-out", "Signed out: this browser no longer gets ana's notifications"
    )
    assert devices_of(server, "ana") == []
    assert stored(server) == 1  # still subscribed, to everyone's notifications
    assert demo.page.is_enabled("#sign-in") and not demo.page.is_enabled("#sign-out")
    assert demo.errors == []


def test_signing_in_before_enabling_push_binds_the_new_subscription(demo_people):
    demo, server = demo_people, demo_people.server
    demo.page.fill("#demo-user", "bob")
    demo.click("#sign-in", "Signed in as bob")
    assert "Enable push above" in demo.page.inner_text("#people-status")
    demo.click("#enable", "Push is enabled")
    assert devices_of(server, "bob") == [api.endpoint_id(demo.subscriber.endpoint)]
    demo.page.reload()
    demo.page.wait_for_function(
        "document.querySelector('#people-status').textContent.includes('Signed in as bob')"
    )
    assert demo.errors == []


def test_the_demo_says_when_the_server_knows_no_people_or_offers_no_made_up_sign_in(
    browser, tmp_path, push_service
):
    plain = Server(tmp_path, PUSH_PROCESSES="1").start()
    demo = Demo(browser, plain, push_service.subscriber())
    assert demo.page.inner_text("#people-status").startswith(
        "This server does not know signed-in people yet."
    )
    assert not demo.page.is_enabled("#sign-in")
    demo.close()
    plain.stop()
    secret_only = Server(
        tmp_path, PUSH_PROCESSES="1", USER_TOKEN_SECRET=DEMO_SECRET
    ).start()
    demo = Demo(browser, secret_only, push_service.subscriber())
    demo.page.fill("#demo-user", "ana")
    demo.click("#sign-in", "does not offer the made-up sign-in")
    assert "DEMO_USERS=true" in demo.status()
    assert demo.page.is_enabled("#sign-in")
    demo.close()
    secret_only.stop()


def test_the_page_shows_the_curl_command_and_reads_well_on_a_phone(
    demo, server, tmp_path
):
    demo.click("#enable", "Push is enabled")
    curl = demo.page.inner_text("#curl")
    assert f"{server.url}/push" in curl and "Bearer <PUSH_TOKEN>" in curl
    width = demo.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 420  # no sideways scrolling at phone width
    # UPDATE_SCREENSHOT=1 refreshes the picture in docs/console.md.
    path = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "demo.png"
    demo.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_denied_permission_is_explained(browser, server, push_service):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.evaluate("Notification.requestPermission = async () => 'denied'")
    page.click("#enable")
    page.wait_for_function("document.querySelector('#status').className === 'error'")
    assert "blocked" in page.inner_text("#status")
    assert stored(server) == 0
    context.close()


def test_a_page_hosted_elsewhere_uses_the_api_across_origins(
    browser, server, tmp_path, push_service
):
    api_server = Server(tmp_path / "api", PUSH_PROCESSES="1")
    api_server.log.parent.mkdir()
    api_server.start()
    try:
        subscriber = push_service.subscriber()
        demo = Demo(browser, server, subscriber, query=f"?api={api_server.url}")
        demo.click("#enable", "Push is enabled")
        assert (stored(api_server), stored(server)) == (1, 0)
        assert api_server.url in demo.page.inner_text("#curl")
        demo.click("#test", "Test notification sent")
        assert push_service.wait_for(1)[0].subscriber == subscriber.id
        # A link's ?api= names the server to talk to, never whose code runs.
        loaded = demo.page.evaluate(
            "performance.getEntriesByType('resource').map((e) => e.name)"
        )
        assert f"{server.url}/webpush.js" in loaded
        assert not [
            url for url in loaded if url.startswith(api_server.url + "/webpush")
        ]
        assert demo.errors == []
        demo.close()
    finally:
        api_server.stop()


def test_an_insecure_origin_is_explained(browser, server):
    """http:// on a real host name is no secure context (127.0.0.1 would be)."""
    port = server.url.rsplit(":", 1)[1]
    rules = "--host-resolver-rules=MAP push.test 127.0.0.1"
    mapped = browser.browser_type.launch(executable_path=CHROMIUM, args=[*FLAGS, rules])
    page = mapped.new_page()
    page.goto(f"http://push.test:{port}/")
    assert page.evaluate("window.isSecureContext") is False
    page.wait_for_function("document.querySelector('#status').className === 'error'")
    assert "secure context" in page.inner_text("#status")
    assert page.is_disabled("#enable")
    mapped.close()


def test_a_browser_without_web_push_is_told_so(browser, server):
    context = browser.new_context()
    context.add_init_script("delete window.PushManager")
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#status').className === 'error'")
    assert "does not support Web Push" in page.inner_text("#status")
    assert page.is_disabled("#enable")
    context.close()


def _receipts_of(server: Server, notification_id: str, wanted: dict) -> dict:
    """The notification's receipt counts once they are ``wanted`` (or after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        document = requests.get(
            f"{server.url}/notifications/{notification_id}", headers=AUTH
        ).json()
        counts = {k: document[k] for k in ("delivered", "clicked", "closed")}
        if counts == wanted or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


# The OS would fire these; a test dispatches them in the worker. The worker
# must send its receipt before anything that needs a real (trusted) event.
# Dispatches a made-up event in the worker and resolves, once what its
# handler gave event.waitUntil has settled, with its error (null if none): a
# made-up event does not keep the worker alive, so the test must, or a
# loaded machine may stop the worker mid-way (a notification never shown, a
# receipt never sent).
UNTIL = """const until = (event) => {
  let given = Promise.resolve();
  Object.defineProperty(event, "waitUntil", { value: (p) => { given = Promise.resolve(p); } });
  self.dispatchEvent(event);
  return given.then(() => null, (error) => String(error));
};"""

DISPATCH = (
    """async (type) => {
  const [shown] = await self.registration.getNotifications();
  """
    + UNTIL
    + """
  // A made-up click may not open a window (no user gesture): its error is
  // given back, and its receipt is sent first all the same.
  return await until(new NotificationEvent(type, { notification: shown }));
}"""
)


@ON_BOTH_STORES
def test_the_service_worker_reports_delivered_clicked_and_closed_once_each_and_the_console_shows_them(
    demo, server, push_service
):
    demo.click("#enable", "Push is enabled")
    answer = server_pushed(server, {"title": "Sale", "url": "/static/index.html"})
    delivery = push_service.wait_for(1)[0]
    demo.deliver(delivery.plaintext.decode())
    [shown] = demo.notifications()
    assert shown["data"]["id"] == answer["id"]
    none = {"delivered": 0, "clicked": 0, "closed": 0}
    delivered = {**none, "delivered": 1}
    assert _receipts_of(server, answer["id"], delivered) == delivered
    [worker] = demo.context.service_workers
    worker.evaluate(DISPATCH, "notificationclick")
    clicked = {**delivered, "clicked": 1}
    assert _receipts_of(server, answer["id"], clicked) == clicked
    demo.deliver(delivery.plaintext.decode())  # the same message again
    demo.notifications()
    worker.evaluate(DISPATCH, "notificationclose")
    closed = {**clicked, "closed": 1}
    assert _receipts_of(server, answer["id"], closed) == closed
    time.sleep(0.5)  # a second delivered receipt would have landed by now
    assert _receipts_of(server, answer["id"], closed) == closed
    # And the console's history shows them, with the click rate.
    console = demo.context.new_page()
    console.goto(server.url + "/admin")
    console.fill("#token", TOKEN)
    console.click("#sign-in-button")
    row = console.locator(f'#history-table tr[data-id="{answer["id"]}"]')
    for label, shown in (("Delivered", "1"), ("Clicked", "1"), ("Click rate", "100%")):
        cell = row.locator(f'td[data-label="{label}"]')
        cell.wait_for()
        assert cell.inner_text() == shown, label


def test_a_declarative_message_is_shown_by_the_demo_worker_with_its_link_and_tag(
    demo, server, push_service
):
    """Chromium has no Declarative Web Push yet: it hands the message to the
    service worker, which shows what it declares."""
    demo.click("#enable", "Push is enabled")
    body = {
        "format": "declarative",
        "title": "Sale",
        "body": "Everything half price",
        "url": "/static/index.html",
        "icon": "/static/badge.png",
        "tag": "sale",
    }
    answer = server_pushed(server, body)
    delivery = push_service.wait_for(1)[0]
    assert delivery.message["web_push"] == 8030
    demo.deliver(delivery.plaintext.decode())
    [shown] = demo.notifications()
    assert (shown["title"], shown["body"], shown["tag"]) == (
        "Sale",
        "Everything half price",
        "sale",
    )
    assert shown["icon"] == server.url + "/static/badge.png"
    assert shown["data"]["url"] == server.url + "/static/index.html"  # absolute
    delivered = {"delivered": 1, "clicked": 0, "closed": 0}
    assert _receipts_of(server, answer["id"], delivered) == delivered
    assert demo.errors == []


def test_a_newer_notification_with_the_same_tag_replaces_the_older(
    demo, server, push_service
):
    demo.click("#enable", "Push is enabled")
    pushes = [
        {"format": "declarative", "title": "Score 1-0", "tag": "match"},
        {"format": "classic", "title": "Score 2-0", "tag": "match"},
        {"format": "declarative", "title": "Weather", "tag": "weather"},
    ]
    for n, body in enumerate(pushes, start=1):
        server_pushed(server, body)
        delivery = push_service.wait_for(n)[n - 1]
        demo.deliver(delivery.plaintext.decode())
        deadline = time.monotonic() + 10
        while body["title"] not in [n["title"] for n in demo.notifications()]:
            assert time.monotonic() < deadline, demo.notifications()  # in order
            demo.page.wait_for_timeout(20)
    shown = demo.notifications(2)
    assert sorted((n["tag"], n["title"]) for n in shown) == [
        ("match", "Score 2-0"),
        ("weather", "Weather"),
    ]
    assert demo.errors == []


# Safari's "pushnotification" event (a mutable declarative message, where the
# browser shows those itself), which Chromium does not fire: dispatched here
# with the declared notification, as the Push API builds it.
PUSH_NOTIFICATION = (
    """async (message) => {
  """
    + UNTIL
    + """
  const event = new ExtendableEvent("pushnotification");
  const declared = message.notification;
  Object.defineProperty(event, "notification", { value: { ...declared } });
  Object.defineProperty(event, "appBadge", { value: message.app_badge ?? null });
  const error = await until(event);
  if (error) throw new Error(error);
}"""
)


def test_a_mutable_declarative_message_lets_the_worker_show_it_and_report_it(
    demo, server, push_service
):
    demo.click("#enable", "Push is enabled")
    body = {"format": "declarative", "title": "Flash", "body": "Now", "tag": "flash"}
    answer = server_pushed(server, body)
    message = push_service.wait_for(1)[0].message
    assert message["notification"]["mutable"] is True
    [worker] = demo.context.service_workers
    worker.evaluate(PUSH_NOTIFICATION, message)
    [shown] = demo.notifications()
    assert (shown["title"], shown["body"], shown["tag"]) == ("Flash", "Now", "flash")
    assert shown["data"]["receipt"] == message["notification"]["data"]["receipt"]
    delivered = {"delivered": 1, "clicked": 0, "closed": 0}
    assert _receipts_of(server, answer["id"], delivered) == delivered


def test_a_declarative_message_that_is_not_mutable_still_reports_where_the_worker_runs(
    demo, server, push_service
):
    """Chromium runs the worker for every push, declarative or not."""
    demo.click("#enable", "Push is enabled")
    body = {"format": "declarative", "title": "Fixed", "mutable": False}
    answer = server_pushed(server, body)
    delivery = push_service.wait_for(1)[0]
    assert delivery.message["notification"]["mutable"] is False
    demo.deliver(delivery.plaintext.decode())
    [shown] = demo.notifications()
    assert shown["title"] == "Fixed"
    delivered = {"delivered": 1, "clicked": 0, "closed": 0}
    assert _receipts_of(server, answer["id"], delivered) == delivered


# -- the client any site takes in: webpush.js and webpush-sw.js (docs/client.md) --------

SHOP_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>A shop</title>
<link rel="icon" href="data:,">
<p id="status">Checking…</p>
<script type="module">
  import * as webpush from "{server}/webpush.js";
  window.webpush = webpush;
  await webpush.init({{ serviceWorker: "/sw.js" }});
  document.querySelector("#status").textContent = await webpush.state();
</script>
"""

SHOP_WORKER = 'importScripts("{server}/webpush-sw.js");\n'


@contextlib.contextmanager
def shop_site(directory: Path, server: Server):
    """A shop on an origin of its own (another port): a page that imports the
    server's webpush.js, and its own service worker that takes in
    webpush-sw.js. Served by Python's http.server, which knows nothing of push."""
    directory.mkdir()
    (directory / "index.html").write_text(SHOP_PAGE.format(server=server.url))
    (directory / "sw.js").write_text(SHOP_WORKER.format(server=server.url))

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


def test_a_shop_on_another_origin_subscribes_a_signed_in_user_with_webpush_js_and_its_worker_shows_the_push_and_reports_it(
    browser, tmp_path, push_service
):
    server = Server(tmp_path, PUSH_PROCESSES="1", USER_TOKEN_SECRET=DEMO_SECRET)
    server.start()
    try:
        with shop_site(tmp_path / "shop", server) as site:
            subscriber = push_service.subscriber()
            shop = Demo(browser, server, subscriber, site=site)
            assert site != server.url and shop.status() == "unsubscribed"
            claims = {"sub": "ana", "exp": int(time.time()) + 600}
            token = jwt.encode(claims, DEMO_SECRET, algorithm="HS256")
            answer = shop.page.evaluate(
                "token => webpush.subscribe({ topics: ['deals'], user: 'ana', userToken: token })",
                token,
            )
            assert answer == {"id": api.endpoint_id(subscriber.endpoint), "user": "ana"}
            assert devices_of(server, "ana") == [answer["id"]]

            pushed = server_pushed(
                server, {"title": "Your order shipped", "users": ["ana"]}
            )
            delivery = push_service.wait_for(1)[0]
            shop.deliver(delivery.plaintext.decode())
            [shown] = shop.notifications()
            assert shown["title"] == "Your order shipped"
            delivered = {"delivered": 1, "clicked": 0, "closed": 0}
            assert _receipts_of(server, pushed["id"], delivered) == delivered
            assert shop.errors == []
            shop.close()
    finally:
        server.stop()


STATE = "async () => (await import('/webpush.js')).state()"

# What a call of the client rejects with: its code and its sentence.
FAILURE = """async (verb) => {
  const webpush = await import('/webpush.js');
  try {
    await webpush[verb]({ serviceWorker: '/sw.js' });
  } catch (error) {
    return { code: error.code, message: error.message, isError: error instanceof Error };
  }
  return null;
}"""


def test_state_answers_unsubscribed_then_subscribed(demo):
    assert demo.page.evaluate(STATE) == "unsubscribed"
    demo.click("#enable", "Push is enabled")
    assert demo.page.evaluate(STATE) == "subscribed"


DENIED = """
Object.defineProperty(Notification, "permission", { get: () => "denied" });
Notification.requestPermission = async () => "denied";
"""


def test_denied_permission_is_the_state_and_the_error_denied_with_a_sentence(
    browser, server, push_service
):
    demo = Demo(browser, server, push_service.subscriber(), script=DENIED)
    assert demo.page.evaluate(STATE) == "denied"
    failure = demo.page.evaluate(FAILURE, "subscribe")
    assert failure["isError"] and failure["code"] == "denied"
    assert failure["message"].startswith("Notifications are blocked for this site.")
    assert stored(server) == 0
    demo.close()


def test_a_browser_without_push_is_the_state_and_the_error_unsupported_with_a_sentence(
    browser, server
):
    context = browser.new_context()
    context.add_init_script("delete window.PushManager")
    page = context.new_page()
    page.goto(server.url + "/")
    assert page.evaluate(STATE) == "unsupported"
    for verb in ("init", "subscribe"):
        failure = page.evaluate(FAILURE, verb)
        assert failure["isError"] and failure["code"] == "unsupported", verb
        assert "does not support Web Push" in failure["message"]
    context.close()


# Chrome's answer in a private window, where notifications can be allowed but
# there is no push service; and its answer when the push service is down.
REFUSING_PUSH = """
PushManager.prototype.subscribe = async () => {{
  throw new DOMException({message!r}, {name!r});
}};
"""


@pytest.mark.parametrize(
    "name, message, explained",
    [
        (
            "NotAllowedError",
            "Registration failed - permission denied",
            "Private windows can't receive notifications. Open this page in a normal window.",
        ),
        (
            "AbortError",
            "Registration failed - push service not available",
            "The browser's push service could not be reached.",
        ),
    ],
    ids=["private window", "push service down"],
)
def test_the_demo_explains_a_private_window_and_an_unreachable_push_service(
    browser, server, push_service, name, message, explained
):
    script = REFUSING_PUSH.format(name=name, message=message)
    demo = Demo(browser, server, push_service.subscriber(), script=script)
    demo.click("#enable", explained)
    assert demo.page.get_attribute("#status", "class") == "error"
    assert demo.page.is_enabled("#enable")
    assert stored(server) == 0
    demo.close()


NEVER_ANSWERING = """
PushManager.prototype.subscribe = () => {
  window.__subscribing = true;
  return new Promise(() => {});
};
"""


def test_the_demo_gives_up_on_a_silent_push_service_after_10_seconds_and_says_so(
    browser, server, push_service
):
    demo = Demo(browser, server, push_service.subscriber(), script=NEVER_ANSWERING)
    demo.page.clock.install()  # the page's timers, moved on by the test
    demo.page.click("#enable")
    demo.page.wait_for_function("window.__subscribing === true")
    assert demo.status() == "Subscribing…"
    demo.page.clock.run_for(9_000)
    assert demo.status() == "Subscribing…"
    demo.page.clock.run_for(1_000)
    demo.page.wait_for_function(
        "document.querySelector('#status').className === 'error'"
    )
    assert demo.status().startswith(
        "No answer from the browser's push service within 10 seconds."
    )
    assert demo.page.is_enabled("#enable")
    demo.close()


def test_webpush_js_and_webpush_sw_js_are_served_to_any_site_and_cached(server):
    """The worker's script is made from the request's Host: browsers
    revalidate it, and no shared cache hands one client's copy to another."""
    caching = {
        "/webpush.js": ("public, max-age=300", None),
        "/webpush-sw.js": ("no-cache", "Host, X-Forwarded-Host, X-Forwarded-Proto"),
    }
    for path, (cache_control, vary) in caching.items():
        response = requests.get(server.url + path)
        assert response.status_code == 200, path
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert response.headers["Cache-Control"] == cache_control
        assert response.headers.get("Vary") == vary
        assert response.headers["Last-Modified"]
        again = requests.get(
            server.url + path, headers={"If-None-Match": response.headers["ETag"]}
        )
        assert again.status_code == 304, path
    worker = requests.get(server.url + "/webpush-sw.js").text
    assert f'|| "{server.url}";' in worker  # its receipts reach it from anywhere
    assert (
        "export async function subscribe"
        in requests.get(server.url + "/webpush.js").text
    )


def stored_record(server: Server, tmp_path: Path, endpoint: str) -> dict:
    """What ``server`` (on the JSON store in ``tmp_path``) stored for the
    subscription of ``endpoint``, read from its store once it has stopped."""
    server.stop()
    with subscription_store({}, tmp_path) as store:
        return store.get(api.endpoint_id(endpoint))


def test_webpush_js_stores_the_browsers_time_zone_with_its_subscription(
    browser, server, push_service, tmp_path
):
    subscriber = push_service.subscriber()
    demo = Demo(browser, server, subscriber, timezone_id="Pacific/Kiritimati")
    demo.click("#enable", "Push is enabled")
    assert demo.errors == []
    demo.close()
    record = stored_record(server, tmp_path, subscriber.endpoint)
    assert record["timezone"] == "Pacific/Kiritimati"


# A browser whose zone database names a zone this server's does not know.
UNKNOWN_ZONE = """
const resolved = Intl.DateTimeFormat.prototype.resolvedOptions;
Intl.DateTimeFormat.prototype.resolvedOptions = function () {
  return { ...resolved.call(this), timeZone: "Mars/Olympus_Mons" };
};
"""


def test_a_time_zone_the_server_does_not_know_still_subscribes_the_browser_without_it(
    browser, server, push_service, tmp_path
):
    subscriber = push_service.subscriber()
    demo = Demo(browser, server, subscriber, script=UNKNOWN_ZONE)
    demo.click("#enable", "Push is enabled")
    demo.close()
    record = stored_record(server, tmp_path, subscriber.endpoint)
    assert record["endpoint"] == subscriber.endpoint
    assert "timezone" not in record


# The browser rotating a subscription, as the Push API builds the event (the
# test cannot make real PushSubscription objects: these have their toJSON()).
SUBSCRIPTION_CHANGE = (
    """async ([old, renewed]) => {
  """
    + UNTIL
    + """
  const subscription = (json) => ({ ...json, options: {}, toJSON: () => json });
  const event = new ExtendableEvent("pushsubscriptionchange");
  Object.defineProperty(event, "oldSubscription", { value: subscription(old) });
  Object.defineProperty(event, "newSubscription", { value: subscription(renewed) });
  const error = await until(event);
  if (error) throw new Error(error);
}"""
)


def test_a_rotated_subscription_is_reposted_by_the_worker_and_keeps_its_topics_and_person(
    demo_people, push_service
):
    demo, server = demo_people, demo_people.server
    demo.page.fill("#topics", "news")
    demo.click("#enable", "Push is enabled")
    demo.page.fill("#demo-user", "ana")
    demo.click("#sign-in", "Signed in as ana")
    renewed = push_service.subscriber()
    [worker] = demo.context.service_workers
    worker.evaluate(
        SUBSCRIPTION_CHANGE, [demo.subscriber.subscription, renewed.subscription]
    )
    new_id = api.endpoint_id(renewed.endpoint)
    deadline = time.monotonic() + 10
    while devices_of(server, "ana") != [new_id] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert devices_of(server, "ana") == [new_id]
    topics = requests.get(server.url + "/topics", headers=AUTH).json()
    assert topics == [{"topic": "news", "subscriptions": 1}]
    assert stored(server) == 1
