"""What browsers receive, and how a subscription's life ends: docs/notifications.md,
"Payload formats" and "Subscriptions age". Every payload is the
plaintext the decrypting stand-in (tests/push_service.py) got."""

from __future__ import annotations

import time

import pytest

import api
from conftest import AUTH, WAIT, device_token

EVERYTHING = {
    "title": "Sale",
    "body": "Everything half price",
    "url": "/sale?from=push",
    "icon": "/i.png",
    "image": "/big.png",
    "data": {"n": 1},
    "tag": "sale",
    "badge": 3,
    "silent": False,
    "lang": "en-GB",
    "dir": "ltr",
    "require_interaction": True,
    "actions": [
        {"action": "open", "title": "Open", "url": "/sale/1"},
        {"action": "later", "title": "Later", "icon": "/clock.png"},
    ],
}


@pytest.fixture
def declarative(app_with):
    """The app with the shipped default, and a PUBLIC_URL."""
    return app_with(payload_format="declarative", public_url="https://shop.test")


def _push(client, push_service, body: dict) -> tuple[dict, dict]:
    """Push ``body`` to one new subscriber: the final status, and the message
    (its receipt checked and taken out)."""
    sub = push_service.subscriber()
    client.post_json("/subscription", sub.subscription)
    done = client.post_json("/push", body, headers=WAIT).json
    [delivery] = push_service.received(sub)
    message = delivery.message
    key = client.app.config["webpush.receipt_key"]
    record_id = api.endpoint_id(sub.endpoint)
    holder = message["notification"]["data"] if "web_push" in message else message
    assert holder.pop("receipt") == api.receipt(key, done["id"], record_id)
    return done, message


def test_the_default_payload_is_declarative_web_push():
    assert api.Settings().payload_format == "declarative"


def test_a_declarative_message_is_exactly_the_declarative_json(
    declarative, push_service
):
    done, message = _push(declarative, push_service, EVERYTHING)
    assert message == {
        "web_push": 8030,
        "notification": {
            "title": "Sale",
            "navigate": "https://shop.test/sale?from=push",
            "body": "Everything half price",
            "icon": "/i.png",
            "image": "/big.png",
            "tag": "sale",
            "lang": "en-GB",
            "dir": "ltr",
            "silent": False,
            "requireInteraction": True,
            "actions": [
                {
                    "action": "open",
                    "title": "Open",
                    "navigate": "https://shop.test/sale/1",
                },
                {"action": "later", "title": "Later", "icon": "/clock.png"},
            ],
            "data": {"id": done["id"], "data": {"n": 1}},
            "mutable": True,
        },
        "app_badge": 3,
    }


def test_a_declarative_message_needs_only_a_title_and_navigates_to_the_site(
    app_with, push_service
):
    """No PUBLIC_URL: a relative url, or none, is made absolute against the
    request's own origin; mutable: false is kept."""
    client = app_with(payload_format="declarative")
    done, message = _push(client, push_service, {"body": "hi", "mutable": False})
    assert message == {
        "web_push": 8030,
        "notification": {
            "title": "Notification",
            "navigate": "http://localhost:80/",
            "body": "hi",
            "data": {"id": done["id"]},
            "mutable": False,
        },
    }
    _, message = _push(client, push_service, {"title": "t", "url": "https://a.test/x"})
    assert message["notification"]["navigate"] == "https://a.test/x"


def test_a_pushs_format_classic_sends_the_classic_json(declarative, push_service):
    done, message = _push(
        declarative, push_service, {**EVERYTHING, "format": "classic"}
    )
    assert message["title"] == "Sale" and message["url"] == "/sale?from=push"
    assert message["tag"] == "sale" and message["badge"] == 3
    assert message["id"] == done["id"] and "web_push" not in message


def test_payload_format_classic_sends_the_classic_json_unless_a_push_says(
    app_with, push_service
):
    classic = app_with(payload_format="classic")
    _, message = _push(classic, push_service, {"title": "t"})
    assert set(message) == {"title", "body", "icon", "url", "data", "id"}
    _, message = _push(classic, push_service, {"title": "t", "format": "declarative"})
    assert message["web_push"] == 8030


def test_the_size_limit_is_checked_on_the_declarative_json_as_sent(
    declarative, push_service
):
    fixed = {"title": "t", "url": "/"}
    notification = {**fixed, "body": "b", "icon": None, "data": None}
    notification["navigate"] = "https://shop.test/"
    one, _ = api.render_payload(notification, "declarative", "x" * 16)
    room = api.MAX_PLAINTEXT - (len(one) - 1) - api.RECEIPT_LENGTH  # body bytes
    too_long = {**fixed, "body": "b" * (room + 1)}
    error = declarative.post_json("/push", too_long, headers=AUTH, status=413).json
    assert "1 over the 3993-byte limit" in error["error"]
    assert "declarative" in error["error"]
    sub = push_service.subscriber()
    declarative.post_json("/subscription", sub.subscription)
    declarative.post_json("/push", {**fixed, "body": "b" * room}, headers=WAIT)
    [delivery] = push_service.received(sub)
    assert delivery.error is None and len(delivery.plaintext) == api.MAX_PLAINTEXT


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("format", "xml", "'format' must be one of"),
        ("tag", "t" * 65, "'tag' must be 1-64"),
        ("tag", 7, "'tag' must be a string"),
        ("badge", -1, "'badge' must be a whole number"),
        ("badge", True, "'badge' must be a whole number"),
        ("silent", "yes", "'silent' must be true or false"),
        ("require_interaction", 1, "'require_interaction' must be true or false"),
        ("mutable", None, None),  # null is "not given"
        ("lang", "en_GB", "'lang' must be a language tag"),
        ("dir", "up", "'dir' must be one of auto, ltr, rtl"),
        ("image", 5, "'image' must be a string"),
        ("actions", [{"action": "a", "title": "A"}] * 3, "at most 2 actions"),
        ("actions", [{"action": "a"}], "'actions[0].title'"),
        ("actions", [{"title": "A"}], "'actions[0].action'"),
        ("actions", "open", "must be a list"),
        ("actions", [{"action": "a", "title": "A"}] * 2, "different 'action' names"),
        ("actions", [{"action": "a", "title": "A", "url": 3}], "'actions[0].url'"),
        ("url", "javascript:alert(1)", "'url' must be an http(s) URL"),
    ],
)
def test_bad_push_fields_get_a_400_and_send_nothing(
    declarative, push_service, field, value, words
):
    declarative.post_json("/subscription", push_service.subscriber().subscription)
    answer = declarative.post_json(
        "/push", {"title": "t", field: value}, headers=AUTH, expect_errors=True
    )
    if words is None:
        assert answer.status_int == 202
        return
    assert answer.status_int == 400 and words in answer.json["error"]
    assert declarative.get("/notifications", headers=AUTH).json["notifications"] == []
    assert push_service.received() == []  # no notification, so nothing to send


def test_a_bad_public_url_or_payload_format_stops_the_start():
    for setting, value in (("public_url", "shop.test"), ("payload_format", "xml")):
        with pytest.raises(api.SettingError):
            api.Settings(**{setting: value}).check()


def test_tag_badge_and_image_reach_fcm_tokens_mapped(fcm_app, fcm):
    token = device_token(1)
    fcm_app.post_json("/subscription", {"fcm_token": token})
    fcm_app.post_json("/push", EVERYTHING, headers=WAIT)
    message = fcm.received(token)[0].message
    assert message["notification"]["image"] == "/big.png"  # image, else the icon
    assert message["android"]["notification"] == {
        "tag": "sale",
        "notification_count": 3,
    }
    assert message["apns"]["payload"] == {"aps": {"thread-id": "sale", "badge": 3}}


# -- a subscription's life ----------------------------------------------------------


def test_an_expired_subscription_is_not_sent_to_and_is_removed(app, push_service):
    soon, later = push_service.subscriber(), push_service.subscriber()
    expires = (time.time() + 1.0) * 1000
    app.post_json("/subscription", {**soon.subscription, "expirationTime": expires})
    far = (time.time() + 3600) * 1000
    app.post_json("/subscription", {**later.subscription, "expirationTime": far})
    time.sleep(max(0.0, expires / 1000 - time.time()) + 0.05)  # it has passed
    done = app.post_json("/push", {"title": "t"}, headers=WAIT).json
    assert (done["sent"], done["removed"]) == (1, 1)
    assert [d.subscriber for d in push_service.received()] == [later.id]
    assert app.get("/health").json["subscriptions"] == 1
    again = {**soon.subscription, "expirationTime": expires}
    error = app.post_json("/subscription", again, status=400).json["error"]
    assert "'expirationTime' has passed" in error


def test_a_subscription_refused_on_five_fan_outs_in_a_row_is_removed(
    app, push_service, caplog
):
    stubborn = push_service.subscriber(script=[403] * 5)
    healthy = push_service.subscriber()
    for sub in (stubborn, healthy):
        app.post_json("/subscription", sub.subscription)
    for n in range(4):
        done = app.post_json("/push", {"title": f"n{n}"}, headers=WAIT).json
        assert (done["failed"], done["sent"]) == (1, 1)
    assert app.get("/health").json["subscriptions"] == 2  # four: kept
    done = app.post_json("/push", {"title": "n4"}, headers=WAIT).json
    assert done["failed"] == 1
    assert app.get("/health").json["subscriptions"] == 1
    assert "on 5 fan-outs in a row (PRUNE_AFTER_FAILURES)" in caplog.text
    assert api.endpoint_id(stubborn.endpoint) in caplog.text


def test_a_success_between_refusals_starts_the_count_again(app_with, push_service):
    client = app_with(prune_after_failures=2)
    flaky = push_service.subscriber(script=[400, 201, 400, 201, 400])
    client.post_json("/subscription", flaky.subscription)
    for n in range(5):
        client.post_json("/push", {"title": f"n{n}"}, headers=WAIT)
    assert client.get("/health").json["subscriptions"] == 1
    client.post_json("/push", {"title": "n5"}, headers=WAIT)  # 201: script over
    assert client.get("/health").json["subscriptions"] == 1


def test_refusals_that_a_retry_could_change_are_not_counted(app_with, push_service):
    client = app_with(prune_after_failures=1)
    busy = push_service.subscriber(script=[429, 429, 429, 500, 500, 500, 401])
    client.post_json("/subscription", busy.subscription)
    for n in range(3):
        done = client.post_json("/push", {"title": f"n{n}"}, headers=WAIT).json
        assert done["failed"] == 1
    assert client.get("/health").json["subscriptions"] == 1


def test_prune_after_failures_0_never_prunes(app_with, push_service):
    client = app_with(prune_after_failures=0)
    client.post_json(
        "/subscription", push_service.subscriber(script=[403] * 3).subscription
    )
    for n in range(3):
        client.post_json("/push", {"title": f"n{n}"}, headers=WAIT)
    assert client.get("/health").json["subscriptions"] == 1


def test_subscribing_again_starts_the_refusal_count_again(app_with, push_service):
    client = app_with(prune_after_failures=2)
    sub = push_service.subscriber(script=[403, 403, 403])
    client.post_json("/subscription", sub.subscription)
    client.post_json("/push", {"title": "n0"}, headers=WAIT)
    client.post_json("/subscription", sub.subscription)  # the browser is alive
    client.post_json("/push", {"title": "n1"}, headers=WAIT)
    assert client.get("/health").json["subscriptions"] == 1
    client.post_json("/push", {"title": "n2"}, headers=WAIT)
    assert client.get("/health").json["subscriptions"] == 0
