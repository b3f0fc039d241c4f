"""The admin console (static/admin.*) in a real Chromium, driven by Playwright.

Nothing is replaced: the console at ``/admin`` talks to a real server process
with the push token, the server encrypts and sends to the push-service stand-in
(tests/push_service.py), which checks VAPID and decrypts every message, and the
tests read what the console shows and what the server and the stand-in hold.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
import pytest
import requests

from conftest import AUTH, BACKENDS, TOKEN, Server, env_of
from tests.chromium import CHROMIUM, FLAGS, require_chromium

STATIC = Path(__file__).resolve().parent.parent / "static"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# No daylight saving and a half-hour offset: a conversion that forgets the
# offset, or half of it, is caught.
TIMEZONE = "Asia/Kolkata"
OFFSET = timezone(timedelta(hours=5, minutes=30))
TOKEN_KEY = "webpush-admin-token"
CALLER_KEY = "webpush-admin-caller"

require_chromium()

from playwright.sync_api import expect, sync_playwright

# Every element's right edge, against the viewport's width.
OVERFLOWING = """() => {
  const width = document.documentElement.clientWidth;
  return [...document.querySelectorAll("body *")]
    .filter((e) => e.getBoundingClientRect().right > width + 0.5)
    .map((e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + "." + e.className);
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def server(request, tmp_path):
    """A real server on the JSON store, or on each store in turn for the tests
    marked ON_BOTH_STORES: those of the data the console shows (sends,
    progress, cancels, audiences). The others are about the page itself,
    which reads the same API whatever the store."""
    env = env_of(getattr(request, "param", "json"), request)
    server = Server(tmp_path, PUSH_PROCESSES="1", **env).start()
    yield server
    server.stop()


ON_BOTH_STORES = pytest.mark.parametrize("server", BACKENDS, indirect=True)


class Console:
    """The console in a fresh browser context, with its errors, requests and
    responses watched."""

    def __init__(self, browser, server: Server, viewport: dict = DESKTOP, **options):
        self.server = server
        self.context = browser.new_context(
            viewport=viewport, timezone_id=TIMEZONE, locale="en-GB", **options
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.answers: list[tuple[int, str, str]] = []  # status, method, URL
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on(
            "response",
            lambda r: self.answers.append((r.status, r.request.method, r.url)),
        )
        self.page.goto(server.url + "/admin")

    def _console(self, message) -> None:
        # Chromium logs every 4xx and refused connection; the page shows them itself.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    def sign_in(self, key: str = TOKEN, refused: bool = False) -> None:
        """Sign in with the push token or an API key; once the server has
        answered, if ``refused``."""
        self.page.fill("#token", key)
        with self.page.expect_response(lambda r: r.url.endswith("/key")):
            self.page.click("#sign-in-button")
        if not refused:
            expect(self.page.locator("#console")).to_be_visible()

    def forbidden(self) -> list[str]:
        """The requests answered 403: a request the key may not make."""
        return [
            f"{method} {url}" for status, method, url in self.answers if status == 403
        ]

    def compose(self, **fields: str) -> None:
        """Fill in a fresh form: ``title="..."``, ``send_at="2030-01-01T09:00"``..."""
        self.page.eval_on_selector("#compose-form", "form => form.reset()")
        for name, value in fields.items():
            field = "#" + name.replace("_", "-")
            if name == "urgency":
                self.page.select_option(field, value)
            else:
                self.page.fill(field, value)

    def send(self, everyone: bool = False) -> dict:
        """Press Send (or Schedule), and for a send to ``everyone`` say yes
        when asked: the server's answer to the POST /push. A send to a topic
        or a person goes without a question."""
        with self.page.expect_response(
            lambda r: r.url.endswith("/push") and r.request.method == "POST",
            timeout=10_000,
        ) as answer:
            self.page.click("#send")
            if everyone:
                self.page.click("#everyone-yes")
        assert self.page.is_hidden("#everyone-confirm")
        return {"code": answer.value.status, **answer.value.json()}

    def pushes(self) -> list[str]:
        """The POST /push requests the page made."""
        return [url for url in self.urls if url.endswith("/push")]

    def row(self, notification_id: str):
        return self.page.locator(f'#history-table tr[data-id="{notification_id}"]')

    def row_titled(self, title: str):
        return self.page.locator("#history-table tr").filter(
            has=self.page.locator("td.title", has_text=title)
        )

    def cell(self, notification_id: str, label: str) -> str:
        return (
            self.row(notification_id).locator(f'td[data-label="{label}"]').inner_text()
        )

    def storage(self) -> dict:
        return self.page.evaluate(
            "() => ({ session: {...sessionStorage}, local: {...localStorage}, "
            "cookies: document.cookie })"
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser, server):
    console = Console(browser, server)
    yield console
    console.close()
    assert console.errors == []
    assert console.forbidden() == []


def make_key(server: Server, name: str, scope: str, **extra) -> str:
    """What an admin makes with POST /keys: the key, shown this once."""
    body = {"name": name, "scope": scope, **extra}
    response = requests.post(server.url + "/keys", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()["key"]


def who_is(server: Server, key: str) -> requests.Response:
    return requests.get(server.url + "/key", headers={"Authorization": f"Bearer {key}"})


def store(server: Server, subscriber, topics: list[str] = ()) -> None:
    body = {**subscriber.subscription, "topics": list(topics)}
    response = requests.post(server.url + "/subscription", json=body)
    assert response.status_code == 201, response.text


def subscribe(server: Server, push_service, *topics: list[str]) -> list:
    """One subscriber on the stand-in per list of topics, stored on the server."""
    subscribers = [push_service.subscriber() for _ in topics]
    for subscriber, names in zip(subscribers, topics):
        store(server, subscriber, names)
    return subscribers


def notification(server: Server, notification_id: str) -> dict:
    response = requests.get(
        f"{server.url}/notifications/{notification_id}", headers=AUTH
    )
    assert response.status_code == 200, response.text
    return response.json()


def report(server: Server, delivery, event: str) -> None:
    """What a subscriber's service worker posts, with its message's receipt."""
    message = delivery.message
    response = requests.post(
        f"{server.url}/notifications/{message['id']}/events",
        json={"event": event, "receipt": message["receipt"]},
    )
    assert response.status_code == 200, response.text


def test_a_wrong_or_revoked_key_is_refused_in_a_plain_sentence_and_stays_signed_out(
    console, server
):
    revoked = make_key(server, "old", "send")
    assert requests.delete(server.url + "/keys/old", headers=AUTH).status_code == 204
    assert console.page.get_attribute("#token", "type") == "password"
    alert = console.page.locator("#sign-in-error")
    for key in ("nope", revoked):  # the page clears the alert as it asks
        console.sign_in(key, refused=True)
        expect(alert).to_have_text(
            "That key is not accepted: it may be mistyped, revoked or expired."
        )
    assert alert.get_attribute("role") == "alert"
    assert console.page.is_hidden("#console") and console.page.is_hidden("#sign-out")
    assert console.storage()["session"] == {}


def test_the_right_token_signs_in_and_is_kept_in_session_storage_only(console):
    console.sign_in()
    expect(console.page.locator("#who")).to_have_text(
        "Signed in as admin (can do everything)"
    )
    kept = console.storage()
    assert json.loads(kept["session"].pop(CALLER_KEY)) == {
        "name": "admin",
        "scope": "admin",
        "topics": None,
    }
    assert kept == {"session": {TOKEN_KEY: TOKEN}, "local": {}, "cookies": ""}
    console.page.reload()  # the same tab keeps it...
    expect(console.page.locator("#console")).to_be_visible()
    other_tab = console.context.new_page()  # ...and no other one has it
    other_tab.goto(console.server.url + "/admin")
    expect(other_tab.locator("#sign-in")).to_be_visible()
    other_tab.close()
    console.page.click("#sign-out")
    expect(console.page.locator("#sign-in")).to_be_visible()
    assert console.page.is_hidden("#console")
    assert console.storage()["session"] == {}
    console.page.reload()
    expect(console.page.locator("#sign-in")).to_be_visible()
    assert all(TOKEN not in url for url in [*console.urls, console.page.url])


def test_compose_draws_a_live_preview(console, server):
    console.sign_in()
    page = console.page
    title, body, host = (
        page.locator("#preview-title-text"),
        page.locator("#preview-body"),
        page.locator("#preview-host"),
    )
    expect(title).to_have_text("Notification")  # what the server sends without one
    page.locator("#title").press_sequentially("Deploy")
    expect(title).to_have_text("Deploy")
    page.locator("#title").press_sequentially(" done")
    expect(title).to_have_text("Deploy done")
    page.fill("#body", "v2 is live")
    expect(body).to_have_text("v2 is live")
    expect(host).to_have_text(server.url.removeprefix("http://"))
    page.fill("#url", "https://example.org/changelog")
    expect(host).to_have_text("example.org")
    icon = page.locator("#preview-icon")
    expect(icon).to_have_attribute("src", "/static/icon.png")
    page.fill("#icon", "/static/badge.png")
    expect(icon).to_have_attribute("src", server.url + "/static/badge.png")
    page.fill("#icon", "/static/no-such-icon.png")  # a broken icon: the default one
    expect(icon).to_have_attribute("src", server.url + "/static/icon.png")
    expect(page.locator("#send")).to_have_text("Send now")
    page.fill("#send-at", "2030-01-01T09:00")
    expect(page.locator("#send")).to_have_text("Schedule")


@ON_BOTH_STORES
def test_a_scheduled_notification_is_cancelled_from_the_history(
    console, server, push_service
):
    subscribe(server, push_service, [])
    console.sign_in()
    later = (datetime.now(OFFSET) + timedelta(hours=1)).replace(second=0, microsecond=0)
    console.compose(
        title="Maintenance tonight", send_at=later.strftime("%Y-%m-%dT%H:%M")
    )
    answer = console.send(everyone=True)
    assert (answer["code"], answer["status"]) == (202, "scheduled")
    stored = notification(server, answer["id"])
    # The browser's local time, with its offset, is the instant the server keeps.
    sent_at = datetime.fromisoformat(stored["send_at"].replace("Z", "+00:00"))
    assert sent_at == later.astimezone(timezone.utc)
    row = console.row(answer["id"])
    expect(row).to_have_attribute("data-status", "scheduled")
    expect(row.locator(".status")).to_have_text("Scheduled")
    row.get_by_role("button", name="Cancel “Maintenance tonight”").click()
    expect(row).to_have_attribute("data-status", "cancelled")
    expect(row.locator(".status")).to_have_text("Cancelled")
    assert row.get_by_role("button").count() == 0
    assert notification(server, answer["id"])["status"] == "cancelled"
    expect(console.page.locator("#progress-text")).to_contain_text("Cancelled")
    assert push_service.received() == []


@ON_BOTH_STORES
def test_a_send_reaches_every_subscriber_and_its_progress_fills_to_done(
    console, server, push_service
):
    # One push service asks for a retry in 2 s: the console must keep watching.
    slow = push_service.subscriber([(503, {"Retry-After": "2"})])
    store(server, slow)
    subscribers = [slow, *subscribe(server, push_service, [], [])]
    console.sign_in()
    console.compose(
        title="Deploy done",
        body="v2 is live",
        url="/changelog",
        urgency="high",
        ttl="600",
    )
    answer = console.send(everyone=True)
    assert (answer["code"], answer["subscriptions"]) == (202, 3)
    progress = console.page.locator("#progress-text")
    expect(progress).to_contain_text("Sending: 0 of 3")
    expect(progress).to_contain_text("Done: 3 of 3 sent, 0 failed, 0 removed")
    assert console.page.eval_on_selector("#progress-bar", "bar => bar.value") == 1
    deliveries = [d for d in push_service.wait_for(4) if d.status == 201]
    assert sorted(d.subscriber for d in deliveries) == sorted(s.id for s in subscribers)
    for delivery in deliveries:
        assert delivery.error is None
        assert delivery.message["title"] == "Deploy done"
        assert (delivery.message["body"], delivery.message["url"]) == (
            "v2 is live",
            "/changelog",
        )
        assert (delivery.headers["urgency"], delivery.headers["ttl"]) == ("high", "600")
    row = console.row(answer["id"])
    expect(row).to_have_attribute("data-status", "done")
    assert console.cell(answer["id"], "Sent") == "3"
    assert console.cell(answer["id"], "Failed") == "0"
    assert console.cell(answer["id"], "Click rate") == "—"  # nothing delivered yet
    # What the subscribers' service workers report, with the receipts they got.
    for delivery, events in zip(deliveries, [["delivered", "clicked"], ["delivered"]]):
        for event in events:
            report(server, delivery, event)
    console.page.click("#refresh")
    expect(row.locator('td[data-label="Delivered"]')).to_have_text("2")
    assert console.cell(answer["id"], "Clicked") == "1"
    assert console.cell(answer["id"], "Click rate") == "50%"


@ON_BOTH_STORES
def test_a_send_to_nobody_is_done_at_once_saying_there_are_no_subscribers(console):
    console.sign_in()
    console.compose(title="Anyone there?")
    assert console.send(everyone=True)["subscriptions"] == 0
    expect(console.page.locator("#progress-text")).to_contain_text("no subscribers")
    assert console.page.eval_on_selector("#progress-bar", "bar => bar.value") == 1


@ON_BOTH_STORES
def test_the_audience_shows_subscribers_per_topic_and_a_topic_send_reaches_only_them(
    console, server, push_service
):
    _, both, _ = subscribe(server, push_service, ["news"], ["news", "alerts"], [])
    console.sign_in()
    chips = console.page.locator("#topics li")
    expect(chips).to_have_count(3)
    assert chips.all_text_contents() == [
        "Everyone 3 subscribers",
        "alerts 1 subscriber",
        "news 2 subscribers",
    ]
    offered = console.page.eval_on_selector_all(
        "#topic-list option", "options => options.map((o) => o.value)"
    )
    assert offered == ["alerts", "news"]
    console.compose(title="Storm warning", topic="alerts")
    answer = console.send()
    expect(console.page.locator("#progress-text")).to_contain_text("Done: 1 of 1 sent")
    assert [d.subscriber for d in push_service.wait_for(1)] == [both.id]
    assert console.cell(answer["id"], "Topic") == "alerts"


def test_sending_to_everyone_asks_first_with_the_count_and_not_now_sends_nothing(
    console, server, push_service
):
    subscribe(server, push_service, ["news"], [])
    console.sign_in()
    page = console.page
    question = page.locator("#everyone-question")
    console.compose(title="Deploy done", body="v2 is live")
    page.click("#send")
    expect(question).to_have_text("Send “Deploy done” to all 2 subscribers now?")
    expect(page.locator("#everyone-yes")).to_have_text("Send to everyone")
    expect(page.locator("#everyone-no")).to_be_focused()
    page.click("#everyone-no")
    expect(page.locator("#everyone-confirm")).to_be_hidden()
    page.click("#send")  # asked again; a change to the form takes the question back
    expect(question).to_be_visible()
    page.fill("#body", "v2 is live, at last")
    expect(page.locator("#everyone-confirm")).to_be_hidden()
    assert console.pushes() == []
    answer = console.send(everyone=True)
    assert (answer["code"], answer["subscriptions"]) == (202, 2)
    assert len(push_service.wait_for(2)) == 2

    later = (datetime.now(OFFSET) + timedelta(days=1)).strftime("%Y-%m-%dT09:00")
    console.compose(title="Maintenance tonight", send_at=later)
    page.click("#send")
    expect(question).to_contain_text(
        "Schedule “Maintenance tonight” for all 2 subscribers, on "
    )
    expect(page.locator("#everyone-yes")).to_have_text("Schedule for everyone")
    page.click("#everyone-yes")
    expect(console.row_titled("Maintenance tonight")).to_have_attribute(
        "data-status", "scheduled"
    )
    assert len(console.pushes()) == 2


def test_a_send_to_a_topic_or_a_person_goes_at_once_without_asking(console):
    console.sign_in()
    console.compose(title="Storm warning", topic="alerts")
    assert console.send()["code"] == 202
    console.compose(title="Your order shipped", user="ana")
    assert console.send()["code"] == 202


# The colour of an element's right-hand end, as its pixels show it (a progress
# bar's fill is a pseudo-element, which getComputedStyle does not reach).
PAINTED = """async (png) => {
  const image = new Image();
  image.src = "data:image/png;base64," + png;
  await image.decode();
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [image.width, image.height];
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const [r, g, b] = context.getImageData(image.width - 6, image.height >> 1, 1, 1).data;
  return `rgb(${r}, ${g}, ${b})`;
}"""


def painted(page, selector: str) -> str:
    """Asked with reduced motion, so that no transition is under way."""
    png = page.locator(selector).screenshot(animations="disabled")
    return page.evaluate(PAINTED, base64.b64encode(png).decode())


def failing(push_service, refusals: int):
    """A subscriber whose push service refuses its first ``refusals`` messages
    (400: nothing to retry), then takes the rest."""
    return push_service.subscriber([400] * refusals)


def test_a_send_most_push_services_refuse_shows_failed_in_red_and_some_in_amber(
    console, server, push_service
):
    for subscriber in (failing(push_service, 2), failing(push_service, 1)):
        store(server, subscriber)
    console.sign_in()
    page = console.page
    page.emulate_media(reduced_motion="reduce")  # the bar fills at once
    progress = page.locator("#progress-text")
    colour = "(selector) => getComputedStyle(document.querySelector(selector)).color"
    red, amber = page.evaluate(
        "() => ['--error', '--warn'].map((name) => { const probe = "
        "document.createElement('i'); probe.style.color = `var(${name})`; "
        "document.body.append(probe); const c = getComputedStyle(probe).color; "
        "probe.remove(); return c; })"
    )

    outcomes = [
        ("Deploy done", "Failed: 0 of 2 sent, 2 failed, 0 removed", "Failed", red),
        (
            "Deploy done, again",
            "Some failed: 1 of 2 sent, 1 failed, 0 removed",
            "Some failed",
            amber,
        ),
    ]
    for title, said, badge_text, shade in outcomes:
        console.compose(title=title)
        answer = console.send(everyone=True)
        expect(progress).to_contain_text(said)
        assert painted(page, "#progress-bar") == shade
        assert page.evaluate(colour, "#progress-text") == shade
        badge = console.row(answer["id"]).locator(".status")
        expect(badge).to_have_text(badge_text)
        assert page.evaluate(colour, f'tr[data-id="{answer["id"]}"] .status') == shade


# -- people (docs/people.md) --------------------------------------------------------

SECRET = "a-site-backend-secret-0123456789abcdef"


@pytest.fixture(params=BACKENDS)
def people_server(request, tmp_path):
    """A server that knows signed-in people (USER_TOKEN_SECRET), on each store."""
    env = env_of(request.param, request)
    server = Server(tmp_path, PUSH_PROCESSES="1", USER_TOKEN_SECRET=SECRET, **env)
    yield server.start()
    server.stop()


def bind(server: Server, subscriber, user: str) -> None:
    """What a site's page posts for its signed-in user."""
    claims = {"sub": user, "exp": int(time.time()) + 600}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    body = {**subscriber.subscription, "user": user, "user_token": token}
    response = requests.post(server.url + "/subscription", json=body)
    assert response.status_code == 201, response.text


def devices_of(server: Server, user: str) -> int:
    response = requests.get(f"{server.url}/users/{user}", headers=AUTH)
    return len(response.json()["subscriptions"]) if response.status_code == 200 else 0


def test_the_console_looks_a_person_up_writes_to_their_devices_and_erases_them_after_asking(
    browser, people_server, push_service
):
    server = people_server
    ana = [push_service.subscriber(), push_service.subscriber()]
    for subscriber in ana:
        bind(server, subscriber, "ana")
    bind(server, push_service.subscriber(), "bob")
    console = Console(browser, server)
    page = console.page
    console.sign_in()
    expect(page.locator("#people-off")).to_be_hidden()
    page.fill("#person", "ana")
    page.click("#look-up")
    expect(page.locator("#devices li")).to_have_count(2)
    expect(page.locator("#person-summary")).to_have_text(
        "“ana” has 2 devices that can be reached:"
    )
    assert "not reached yet" in page.locator("#devices li").first.inner_text()

    page.click("#write-to-person")
    expect(page.locator("#user")).to_have_value("ana")
    page.fill("#title", "Your order shipped")
    answer = console.send()
    assert (answer["code"], answer["subscriptions"]) == (202, 2)
    expect(page.locator("#progress-text")).to_contain_text("Done: 2 of 2 sent")
    delivered = push_service.wait_for(2)
    assert sorted(d.subscriber for d in delivered) == sorted(s.id for s in ana)
    assert console.cell(answer["id"], "Topic") == "one person"
    page.click("#look-up")
    expect(page.locator("#devices li").first).to_contain_text("last reached")

    page.click("#erase-person")
    question = page.locator("#erase-question")
    expect(question).to_contain_text("Erase “ana”? Their 2 devices")
    expect(question).to_contain_text("cannot be undone")
    page.click("#erase-no")
    expect(page.locator("#erase-confirm")).to_be_hidden()
    assert devices_of(server, "ana") == 2
    page.click("#erase-person")
    page.click("#erase-yes")
    expect(page.locator("#people-done")).to_have_text(
        "“ana” is erased: their devices and what they reported are gone from this server."
    )
    assert (devices_of(server, "ana"), devices_of(server, "bob")) == (0, 1)
    page.fill("#person", "ana")
    page.click("#look-up")
    expect(page.locator("#people-error")).to_contain_text(
        "No device of “ana” can be reached"
    )
    console.close()
    assert console.errors == []


def test_a_topic_and_a_person_at_once_are_refused_in_words_before_sending(console):
    console.sign_in()
    console.compose(title="Hello", topic="news", user="ana")
    console.page.click("#send")
    expect(console.page.locator("#compose-error")).to_have_text(
        "Write to a topic or to a person, not both: clear one of the two."
    )
    assert not any(url.endswith("/push") for url in console.urls)


def test_a_server_that_knows_no_people_says_how_to_turn_them_on(console):
    console.sign_in()
    expect(console.page.locator("#people-off")).to_be_visible()
    expect(console.page.locator("#people-off")).to_contain_text("USER_TOKEN_SECRET")
    console.page.fill("#person", "ana")
    console.page.click("#look-up")
    expect(console.page.locator("#people-error")).to_contain_text(
        "No device of “ana” can be reached"
    )


def test_the_history_refreshes_itself_every_few_seconds(console, server):
    console.page.clock.install()
    console.page.reload()
    console.sign_in()
    expect(console.page.locator("#history-empty")).to_be_visible()
    elsewhere = requests.post(
        server.url + "/push", json={"title": "From a script"}, headers=AUTH
    ).json()
    console.page.clock.run_for(5_500)
    expect(console.row(elsewhere["id"])).to_be_visible()
    assert console.cell(elsewhere["id"], "Title") == "From a script"


def test_a_server_without_topics_says_so_and_the_rest_still_works(console, server):
    """A server from before GET /topics: that card says why it is empty."""
    missing = {"error": "no such route; see README for the API"}
    console.page.route(
        "**/topics",
        lambda route: route.fulfill(status=404, json=missing),
    )
    console.sign_in()
    expect(console.page.locator("#topics-error")).to_contain_text(missing["error"])
    console.compose(title="Still works")
    console.send(everyone=True)
    expect(console.page.locator("#history-table tbody tr")).to_have_count(1)


# -- subscriptions by last success -----------------------------------------------

# Each row of the card: what it says, and its count.
AGE_ROWS = """() => [...document.querySelectorAll("#age-list > div")].map(
  (row) => `${row.querySelector("dt").textContent}: ${row.querySelector("dd").textContent}`)"""


def age_rows(console: Console, first: str) -> list[str]:
    """The card's rows, once its first one reads ``first``."""
    expect(console.page.locator("#age-list > div").first).to_have_text(
        first.replace(": ", "")
    )
    return console.page.evaluate(AGE_ROWS)


@ON_BOTH_STORES
def test_subscriptions_by_last_success_counts_new_ones_in_the_last_day_until_reached(
    console, server, push_service
):
    subscribe(server, push_service, ["news"], [], [])
    console.sign_in()
    expect(console.page.locator("#ages-title")).to_have_text(
        "Subscriptions by last success"
    )
    assert age_rows(console, "Reached in the last day: 3") == [
        "Reached in the last day: 3",
        "1 to 7 days ago: 0",
        "7 to 30 days ago: 0",
        "30 to 60 days ago: 0",
        "Over 60 days ago (removed at the next send): 0",
        "Never reached yet: 3",
    ]
    expect(console.page.locator("#ages-hint")).to_have_text(
        "Counted from each one's last delivery, or from when it was stored if it "
        "has not been reached yet."
    )
    console.compose(title="Hello")
    console.send(everyone=True)
    expect(console.page.locator("#progress-text")).to_contain_text("Done: 3 of 3 sent")
    console.page.click("#refresh")  # with the history, as every few seconds
    # The server answers a count again for 30 times as long as it took (a
    # loaded machine: seconds), then the page's next refresh brings it.
    expect(console.page.get_by_text("Never reached yet")).to_have_count(
        0, timeout=15_000
    )
    assert age_rows(console, "Reached in the last day: 3")[1:] == [
        "1 to 7 days ago: 0",
        "7 to 30 days ago: 0",
        "30 to 60 days ago: 0",
        "Over 60 days ago (removed at the next send): 0",
    ]


def test_without_stale_removal_the_oldest_subscriptions_are_only_older(
    browser, tmp_path, push_service
):
    server = Server(tmp_path, PUSH_PROCESSES="1", STALE_AFTER_DAYS="0").start()
    try:
        subscribe(server, push_service, [])
        console = Console(browser, server)
        console.sign_in()
        assert age_rows(console, "Reached in the last day: 1") == [
            "Reached in the last day: 1",
            "1 to 7 days ago: 0",
            "7 to 30 days ago: 0",
            "Over 30 days ago: 0",
            "Never reached yet: 1",
        ]
        expect(console.page.locator("#ages-hint")).to_contain_text(
            "This server keeps subscriptions however long they go unreached."
        )
        console.close()
        assert console.errors == []
    finally:
        server.stop()


def test_subscriptions_by_last_success_show_to_a_read_key_and_not_to_a_send_key(
    browser, server, push_service
):
    subscribe(server, push_service, [], [])
    for name, scope in (("dashboard", "read"), ("ci", "send")):
        console = Console(browser, server)
        console.sign_in(make_key(server, name, scope))
        expect(console.page.locator("#totals")).not_to_be_empty()  # refreshed
        if scope == "read":
            expect(console.page.locator("#ages")).to_be_visible()
            assert age_rows(console, "Reached in the last day: 2")[-1] == (
                "Never reached yet: 2"
            )
        else:
            expect(console.page.locator("#ages")).to_be_hidden()
        asked = any(url.endswith("/subscriptions/ages") for url in console.urls)
        assert asked == (scope == "read"), scope
        console.close()
        assert console.errors == []
        assert console.forbidden() == []


# -- keys (docs/api-keys.md) ------------------------------------------------------


@ON_BOTH_STORES
def test_an_admin_makes_a_key_sees_it_once_copies_it_and_revokes_it_after_asking(
    browser, server
):
    console = Console(
        browser, server, permissions=["clipboard-read", "clipboard-write"]
    )
    page = console.page
    console.sign_in()
    expect(page.locator("#keys-empty")).to_be_visible()
    page.fill("#key-name", "ci")
    page.check('input[name="key-scope"][value="send"]')
    page.fill("#key-topics", "deploys")
    page.select_option("#key-expiry", label="In 30 days")
    with page.expect_response(
        lambda r: r.url.endswith("/keys") and r.request.method == "POST"
    ) as answer:
        page.click("#make-key")
    made = answer.value.json()
    key = made["key"]
    assert (answer.value.status, made["scope"], made["topics"]) == (
        201,
        "send",
        ["deploys"],
    )
    expect(page.locator("#key-secret")).to_have_value(key)
    expect(page.locator("#key-made-text")).to_contain_text(
        "Copy it now: it will not be shown again."
    )
    page.click("#copy-key")
    expect(page.locator("#copy-done")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == key
    item = page.locator('#key-list li[data-name="ci"]')
    expect(item).to_contain_text("only to deploys")
    expect(item).to_contain_text("last used never")
    expect(item).to_contain_text("expires")
    assert who_is(server, key).json() == {
        "name": "ci",
        "scope": "send",
        "topics": ["deploys"],
    }

    page.reload()  # shown once: the list knows its name, nothing has the key
    expect(item).not_to_contain_text("last used never")
    assert page.is_hidden("#key-made")
    values = page.eval_on_selector_all("input", "inputs => inputs.map((i) => i.value)")
    assert key not in page.content() + json.dumps([values, console.storage()])

    revoke = item.get_by_role("button", name="Revoke “ci”…")
    revoke.click()
    expect(page.locator("#revoke-question")).to_contain_text(
        "Revoke “ci”? Whatever uses it is refused from now on."
    )
    page.click("#revoke-no")
    expect(page.locator("#revoke-confirm")).to_have_count(0)
    expect(revoke).to_be_focused()
    assert who_is(server, key).status_code == 200
    revoke.click()
    page.click("#revoke-yes")
    expect(page.locator("#keys-done")).to_have_text(
        "“ci” is revoked: the server refuses it from now on."
    )
    expect(item).to_have_count(0)
    expect(page.locator("#keys-empty")).to_be_visible()
    assert who_is(server, key).status_code == 401
    console.close()
    assert console.errors == []
    assert console.forbidden() == []


@ON_BOTH_STORES
def test_a_send_key_sees_only_compose_chooses_among_its_topics_and_follows_its_send_to_done(
    browser, server, push_service
):
    deploys, _ = subscribe(server, push_service, ["deploys"], [])
    key = make_key(server, "ci", "send", topics=["deploys", "releases"])
    console = Console(browser, server)
    page = console.page
    console.sign_in(key)
    expect(page.locator("#who")).to_have_text(
        "Signed in as ci (can send to deploys, releases)"
    )
    for shown in ("#compose", "#preview-card"):
        expect(page.locator(shown)).to_be_visible()
    for hidden in ("#history", "#audience", "#people", "#keys", "#topic", "#user"):
        expect(page.locator(hidden)).to_be_hidden()
    expect(page.locator("#compose-scope")).to_have_text(
        "This key may send only to the topics “deploys” and “releases”: "
        "not to everyone, nor to one person."
    )
    offered = page.eval_on_selector_all(
        "#topic-choice option", "options => options.map((o) => o.value)"
    )
    assert offered == ["deploys", "releases"]
    page.fill("#title", "Deploy done")
    page.select_option("#topic-choice", "deploys")
    answer = console.send()
    assert (answer["code"], answer["subscriptions"]) == (202, 1)
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 of 1 sent")
    assert [d.subscriber for d in push_service.wait_for(1)] == [deploys.id]
    console.close()
    assert console.errors == []
    assert console.forbidden() == []
    asked = " ".join(console.urls)
    assert all(route not in asked for route in ("/notifications?", "/topics", "/keys"))


def test_a_read_key_sees_the_history_and_audience_but_cannot_send_cancel_or_manage_keys(
    browser, server, push_service
):
    subscribe(server, push_service, ["news"], [])
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    scheduled = requests.post(
        server.url + "/push",
        json={"title": "Maintenance tonight", "send_at": later.isoformat()},
        headers=AUTH,
    ).json()
    key = make_key(server, "dashboard", "read")
    console = Console(browser, server)
    page = console.page
    console.sign_in(key)
    expect(page.locator("#who")).to_have_text(
        "Signed in as dashboard (can look, not send)"
    )
    row = console.row(scheduled["id"])
    expect(row).to_have_attribute("data-status", "scheduled")
    assert row.get_by_role("button").count() == 0  # no Cancel
    expect(page.locator("#topics li")).to_have_count(2)
    for hidden in ("#compose", "#preview-card", "#keys"):
        expect(page.locator(hidden)).to_be_hidden()
    page.fill("#person", "ana")
    page.click("#look-up")
    expect(page.locator("#people-error")).to_contain_text("No device of “ana”")
    console.close()
    assert console.errors == []
    assert console.forbidden() == []
    assert not any(url.endswith(("/push", "/keys")) for url in console.urls)


EMPTY = "Write a title or a body first: a notification needs something to show."


def test_an_empty_form_asks_for_a_title_or_a_body_before_sending(console):
    console.sign_in()
    console.compose(url="/changelog")
    console.page.click("#send")
    expect(console.page.locator("#compose-error")).to_have_text(EMPTY)
    expect(console.page.locator("#title")).to_be_focused()
    assert console.page.is_hidden("#everyone-confirm")
    assert console.pushes() == []


# What a person commonly gets wrong, put right before anything is sent: the
# field, what they typed, and what the page says.
MISTYPED = [
    (
        "url",
        "javascript:alert(1)",
        (
            "The link must be a web address (https://…) or a "
            "path on your site, such as /changelog."
        ),
    ),
    (
        "icon",
        "ftp://example.org/icon.png",
        (
            "The icon must be the web address of an "
            "image (https://…) or a path on your site, such as /static/icon.png."
        ),
    ),
    (
        "ttl",
        "3000000",
        (
            "“Time to live” is a whole number of seconds, from 0 to "
            "2,419,200 (28 days); or leave it empty for the server's default."
        ),
    ),
]


def test_a_bad_link_icon_or_time_to_live_is_explained_before_sending(console):
    console.sign_in()
    for field, typed, said in MISTYPED:
        console.compose(title="Deploy done", **{field: typed})
        console.page.click("#send")
        expect(console.page.locator("#compose-error")).to_have_text(said)
        expect(console.page.locator("#" + field)).to_be_focused()
    assert console.pushes() == []


# What the console sends for each: the same bytes, so the same answer; and
# what the person reads instead of the server's words for developers.
REFUSED = {
    "a body far over a push message's size": (
        {"title": "Big", "body": "x" * 40000},
        (
            "It is too long to fit in a push message: shorten the body or the title "
            "by about 36,"
        ),
    ),
    "a notification just over a push message's size": (
        {"title": "Long", "body": "x" * 4000},
        (
            "It is too long to fit in a push message: shorten the body or the title "
            "by about "
        ),
    ),
    "a topic's name with a space": (
        {"title": "Hello", "topic": "breaking news"},
        (
            "A topic's name is made of letters, digits, “.”, “_” or “-”, at most 64 "
            "of them, without spaces."
        ),
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_send_the_server_refuses_says_in_plain_words_what_to_change(
    console, server, push_service, case
):
    subscribe(server, push_service, [])
    body, plain = REFUSED[case]
    said = requests.post(
        server.url + "/push",
        data=json.dumps(body, separators=(",", ":")),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert said.status_code in (400, 413)
    console.sign_in()
    console.compose(**{name: str(value) for name, value in body.items()})
    assert console.send(everyone="topic" not in body)["code"] == said.status_code
    alert = console.page.get_by_role("alert").filter(has_text=plain)
    expect(alert).to_be_visible()
    assert alert.get_attribute("id") == "compose-error"
    assert said.json()["error"] not in alert.inner_text()
    expect(console.page.locator("#history-empty")).to_be_visible()
    assert push_service.received() == []


# -- delivery policy (docs/delivery-policy.md) ------------------------------------

PACE = (
    "“Pace” is a whole number of notifications a minute, from 60 to 1,000,000; "
    "or leave it empty to send as fast as possible."
)


@ON_BOTH_STORES
def test_a_time_in_each_subscribers_own_zone_is_sent_as_typed_and_one_past_everywhere_goes_at_once(
    console, server, push_service
):
    subscribe(server, push_service, [], [])
    console.sign_in()
    page = console.page
    expect(page.locator("#send-local-hint")).to_have_text(
        "9:00 means 9:00 where each subscriber is."
    )
    # Some days ahead: scheduled until 9:00 first comes anywhere (UTC+14).
    ahead = (datetime.now(OFFSET) + timedelta(days=3)).strftime("%Y-%m-%dT09:00")
    console.compose(title="Your weekly digest", send_at=ahead)
    page.check("#send-local")
    page.click("#send")
    said = datetime.fromisoformat(ahead).strftime("%-d %b %Y, 09:00")
    expect(page.locator("#everyone-question")).to_have_text(
        f"Schedule “Your weekly digest” for all 2 subscribers, at {said} in each "
        "subscriber's own time zone?"
    )
    answer = console.send(everyone=True)
    assert (answer["code"], answer["status"]) == (202, "scheduled")
    stored = notification(server, answer["id"])
    assert (stored["send_at_local"], stored["rate"]) == (ahead, None)
    first = datetime.fromisoformat(ahead).replace(tzinfo=timezone(timedelta(hours=14)))
    assert stored["send_at"] == first.astimezone(timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z"
    )
    expect(page.locator("#progress-text")).to_contain_text(
        f"Scheduled for {said} in each subscriber's own time zone, to 2 subscribers"
    )
    expect(console.row(answer["id"]).locator("td.when")).to_have_text(
        f"due {said}in each subscriber's own time zone"
    )

    # 9:00 on New Year's Day has come in every zone: it goes out at once.
    console.compose(title="Happy new year", send_at="2026-01-01T09:00")
    expect(page.locator("#send")).to_have_text("Send now")
    page.check("#send-local")
    answer = console.send(everyone=True)
    assert (answer["code"], answer["status"]) == (202, "queued")
    expect(page.locator("#progress-text")).to_contain_text(
        "Done: 2 of 2 sent, 0 failed, 0 removed as gone."
    )
    stored = notification(server, answer["id"])
    assert (stored["status"], stored["sent"], stored["pending"]) == ("done", 2, 0)
    assert stored["send_at_local"] == "2026-01-01T09:00"
    expect(console.row(answer["id"]).locator("td.when")).to_contain_text(
        "for 1 Jan 2026, 09:00 in each subscriber's own time zone"
    )
    assert [d.message["title"] for d in push_service.wait_for(2)] == [
        "Happy new year"
    ] * 2


def test_a_time_in_each_subscribers_own_zone_too_far_ahead_is_refused_in_words(
    console, server, push_service
):
    subscribe(server, push_service, ["news"])
    console.sign_in()
    later = (datetime.now(OFFSET) + timedelta(days=40)).strftime("%Y-%m-%dT09:00")
    console.compose(title="Next quarter", topic="news", send_at=later)
    console.page.check("#send-local")
    assert console.send()["code"] == 400  # the server's refusal, said for a person
    expect(console.page.locator("#compose-error")).to_have_text(
        "“Send at” is too far ahead: a notification can be scheduled at most 30 "
        "days from now."
    )
    expect(console.page.locator("#history-empty")).to_be_visible()
    assert push_service.received() == []


@ON_BOTH_STORES
def test_a_pace_sends_its_rate_and_the_delivery_says_when_it_should_finish(
    console, server, push_service
):
    subscribe(server, push_service, [], [], [])
    console.sign_in()
    page = console.page
    expect(page.locator("#rate-hint")).to_contain_text(
        "Spreads the send so your site is not flooded with visits."
    )
    console.compose(title="New post", url="/blog/tls", rate="60")
    answer = console.send(everyone=True)
    assert (answer["code"], answer["rate"]) == (202, 60)
    progress = page.locator("#progress-text")
    # One a second: under way long enough to say, in the browser's own time
    # zone, when it should be done (in a few seconds: this minute or the next).
    now = datetime.now(OFFSET)
    minutes = "|".join(
        (now + timedelta(minutes=m)).strftime("%H:%M") for m in (-1, 0, 1, 2)
    )
    expect(progress).to_contain_text(
        re.compile(
            rf"At most 60 messages a minute: expected to finish around ({minutes})\."
        )
    )
    expect(progress).to_contain_text("Done: 3 of 3 sent", timeout=20_000)
    assert page.eval_on_selector("#progress-bar", "bar => bar.value") == 1
    stored = notification(server, answer["id"])
    assert (stored["rate"], stored["sent"], stored["finish"]) == (60, 3, None)
    title = console.row(answer["id"]).locator("td.title")
    expect(title).to_have_text("New postat most 60 messages a minute")
    assert len(push_service.wait_for(3)) == 3


def test_a_pace_under_60_a_minute_is_explained_and_nothing_is_sent(
    console, server, push_service
):
    subscribe(server, push_service, ["news"])
    console.sign_in()
    page = console.page
    console.compose(title="New post", topic="news", rate="5")
    page.click("#send")
    expect(page.locator("#compose-error")).to_have_text(PACE)
    expect(page.locator("#rate")).to_be_focused()
    assert console.pushes() == []
    # The server refuses it too, in words for developers: the page says the same.
    page.eval_on_selector("#rate", "input => input.removeAttribute('min')")
    console.compose(title="New post", topic="news", rate="5")
    assert console.send()["code"] == 400
    expect(page.locator("#compose-error")).to_have_text(PACE)
    expect(page.locator("#history-empty")).to_be_visible()
    assert push_service.received() == []


def test_what_the_daily_limit_holds_back_is_counted_as_handled_and_said_in_words(
    browser, tmp_path, push_service
):
    server = Server(tmp_path, PUSH_PROCESSES="1", MAX_PER_DAY="1").start()
    try:
        subscribe(server, push_service, [], [])
        console = Console(browser, server)
        page = console.page
        console.sign_in()
        progress = page.locator("#progress-text")
        console.compose(title="Morning news")
        console.send(everyone=True)
        expect(progress).to_have_text("Done: 2 of 2 sent, 0 failed, 0 removed as gone.")
        console.compose(title="Evening news")
        answer = console.send(everyone=True)
        expect(progress).to_have_text(
            "Done: 0 of 2 sent, 0 failed, 0 removed as gone, 2 held back by the "
            "daily limit."
        )
        assert page.eval_on_selector("#progress-bar", "bar => bar.value") == 1
        assert page.get_attribute("#progress", "data-outcome") == "done"
        row = console.row(answer["id"])
        expect(row.locator("td.title")).to_have_text(
            "Evening news2 held back by the daily limit"
        )
        expect(row.locator(".status")).to_have_text("Done")
        assert notification(server, answer["id"])["capped"] == 2
        assert len(push_service.wait_for(2)) == 2
        console.close()
        assert console.errors == []
    finally:
        server.stop()


def test_a_server_out_of_reach_is_explained_in_a_sentence(console, server):
    console.sign_in()
    expect(console.page.locator("#history-empty")).to_be_visible()
    server.stop()
    console.compose(title="Into the void")
    console.page.click("#send")
    console.page.click("#everyone-yes")  # asked without a count: none can be had
    expect(console.page.locator("#compose-error")).to_contain_text(
        "Could not reach the server"
    )
    console.page.click("#refresh")
    expect(console.page.locator("#history-error")).to_contain_text(
        "Could not reach the server"
    )
    expect(console.page.locator("#topics-error")).to_contain_text(
        "Could not reach the server"
    )
    expect(console.page.locator("#ages-error")).to_contain_text(
        "Could not load how recently subscriptions were reached: Could not reach "
        "the server"
    )


def send_some(console: Console, server: Server, push_service) -> None:
    """A history to look at: one scheduled for tomorrow, then two sent."""
    subscribe(server, push_service, ["news"], ["news", "alerts"], [])
    tomorrow = datetime.now(OFFSET) + timedelta(days=1)
    console.compose(
        title="Weekly digest",
        body="The five stories you missed this week.",
        topic="news",
        send_at=tomorrow.strftime("%Y-%m-%dT09:00"),
    )
    console.send()
    console.compose(
        title="Storm warning", body="Expect gusts after 6 pm.", topic="alerts"
    )
    console.send()
    expect(console.page.locator("#progress-text")).to_contain_text("Done: 1 of 1 sent")
    console.compose(
        title="Deploy done",
        body="Version 2 is live: faster pages and a new dashboard.",
        url="https://example.org/changelog",
    )
    console.send(everyone=True)
    expect(console.page.locator("#progress-text")).to_contain_text("Done: 3 of 3 sent")
    # Every message arrives; two of the three deploy notes are clicked.
    for n, delivery in enumerate(push_service.wait_for(4)):
        events = ["delivered", "clicked"] if n in (1, 2) else ["delivered"]
        for event in events:
            report(server, delivery, event)
    console.page.click("#refresh")
    expect(console.page.locator("#history-table tbody tr")).to_have_count(3)
    expect(console.page.get_by_text("67%")).to_be_visible()


def test_nothing_overflows_sideways_from_a_phone_to_a_desktop(
    browser, server, push_service
):
    console = Console(browser, server, PHONE)
    page = console.page
    assert page.evaluate(OVERFLOWING) == []
    console.sign_in()
    send_some(console, server, push_service)
    assert page.evaluate(OVERFLOWING) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    # A key shown once, and a list of them with a question asked.
    make_key(
        server, "a-rather-long-name-for-the-nightly-deploy-job", "send", topics=["news"]
    )
    page.fill("#key-name", "ci")
    page.click("#make-key")
    expect(page.locator("#key-list li")).to_have_count(2)
    page.locator("#key-list button[data-revoke]").first.click()
    expect(page.locator("#revoke-confirm")).to_be_visible()
    assert page.evaluate(OVERFLOWING) == []
    # One column: every card starts at the same left edge.
    cards = ["#preview-card", "#compose", "#progress", "#audience", "#history", "#keys"]
    lefts = {round(page.locator(card).bounding_box()["x"]) for card in cards}
    assert len(lefts) == 1
    for width in (768, 1024, 1101, 1280):  # a tablet, laptops; the history a table
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate(OVERFLOWING) == [], width
    # A key narrowed to topics, its name long: what it may do, on a phone.
    page.set_viewport_size(PHONE)
    page.click("#sign-out")
    narrowed = make_key(
        server, "deploy-bot-for-the-staging-cluster", "send", topics=["news", "alerts"]
    )
    console.sign_in(narrowed)
    expect(page.locator("#compose-scope")).to_be_visible()
    assert page.evaluate(OVERFLOWING) == []
    console.close()
    assert console.errors == []


def test_the_console_follows_a_dark_system_theme(browser, server):
    console = Console(browser, server, color_scheme="dark")
    background = console.page.evaluate(
        "getComputedStyle(document.body).backgroundColor"
    )
    red, green, blue = (int(v) for v in background[4:-1].split(","))
    assert max(red, green, blue) < 60, background
    console.close()


def test_screenshots_show_the_console_after_a_send(
    browser, server, push_service, tmp_path
):
    """UPDATE_SCREENSHOT=1 refreshes the pictures in static/."""
    update = os.environ.get("UPDATE_SCREENSHOT")
    desktop = Console(browser, server, DESKTOP)
    desktop.sign_in()
    send_some(desktop, server, push_service)
    phone = Console(browser, server, PHONE)
    phone.sign_in()
    phone.compose(title="Back online", body="The service is up again.")
    phone.send(everyone=True)
    expect(phone.page.locator("#progress-text")).to_contain_text("Done: 3 of 3 sent")
    expect(phone.page.locator("#history-table tbody tr")).to_have_count(4)
    phone.page.evaluate(
        "scrollTo(0, document.querySelector('#progress').offsetTop - 12)"
    )
    desktop.page.click("#refresh")
    expect(desktop.page.locator("#history-table tbody tr")).to_have_count(4)
    desktop.page.evaluate("scrollTo(0, 0)")  # the picture shows the page's top
    for name, console in [("desktop", desktop), ("phone", phone)]:
        path = STATIC / f"admin-{name}.png" if update else tmp_path / f"{name}.png"
        console.page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000
        console.close()
        assert console.errors == []
