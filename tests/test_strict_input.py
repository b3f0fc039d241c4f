"""Strict input: a field a route does not know is refused with 400 naming it
(and the known field it is closest to), and changes nothing. Ignored, a
misspelled ``topics`` sent a push meant for a topic to everyone."""

import json

import pytest

from test_api import (
    AUTH,
    KEYS,
    SECRET,
    _send,
    fake_subscription,
    pushed,
    sign,
    stored_state,
)

SUBSCRIBED = fake_subscription(50)  # the one the ``unchanged`` fixture stores


def nothing_sent(client) -> bool:
    """No notification was made, so nothing is or will be sent."""
    return client.get("/notifications", headers=AUTH).json["notifications"] == []


# -- POST /push ---------------------------------------------------------------------


@pytest.mark.parametrize("misspelt", ["topics", "topic_", "tpoic"])
def test_a_misspelt_topic_is_refused_naming_it_and_sends_nothing(
    app, unchanged, misspelt
):
    body = {"title": "x", misspelt: "news"}
    error = _send(app, "POST", "/push", body, 400, AUTH).json["error"]
    assert error == f'unknown field "{misspelt}"; did you mean "topic"?'
    assert unchanged() and nothing_sent(app)


def test_an_unknown_field_is_named_before_what_it_leaves_missing(app, unchanged):
    error = _send(app, "POST", "/push", {"titel": "x"}, 400, AUTH).json["error"]
    assert error == 'unknown field "titel"; did you mean "title"?'
    assert unchanged() and nothing_sent(app)


def test_an_unknown_field_of_an_action_is_refused(app, unchanged):
    body = {"title": "x", "actions": [{"action": "open", "titel": "Open"}]}
    error = _send(app, "POST", "/push", body, 400, AUTH).json["error"]
    assert error == 'unknown field "actions[0].titel"; did you mean "actions[0].title"?'
    assert unchanged() and nothing_sent(app)


def test_a_field_far_from_every_known_one_gets_the_list_of_them(app, unchanged):
    error = _send(app, "POST", "/push", {"title": "x", "zz": 1}, 400, AUTH).json[
        "error"
    ]
    assert error.startswith('unknown field "zz"; the known fields are title, body')
    assert unchanged() and nothing_sent(app)


def test_data_stays_free_form(app, push_service):
    app.post_json("/subscription", push_service.subscriber().subscription)
    data = {"topics": "anything", "nested": {"tpoic": [1, None]}}
    assert pushed(app, {"title": "x", "data": data})["sent"] == 1
    assert push_service.received()[0].message["data"] == data


# -- POST /subscription --------------------------------------------------------------

MISSPELT_SUBSCRIPTIONS = {
    "PushSubscription": (
        {**fake_subscription(1), "topic": ["news"]},
        'unknown field "topic"; did you mean "topics"?',
    ),
    "FCM token": (
        {"fcm_token": "dQw4w9WgXcQ:APA91b", "topic": ["news"]},
        'unknown field "topic"; did you mean "topics"?',
    ),
    "FCM token misspelt": (
        {"fcm_tokn": "dQw4w9WgXcQ:APA91b", "topics": ["news"]},
        'unknown field "fcm_tokn"; did you mean "fcm_token"?',
    ),
    "subscription_token's wrapper": (
        {"subscription_token": fake_subscription(1), "topic": ["news"]},
        'unknown field "topic"; did you mean "topics"?',
    ),
    "inside subscription_token": (
        {"subscription_token": {**fake_subscription(1), "topic": ["news"]}},
        (
            'unknown field "subscription_token.topic"; did you mean '
            '"subscription_token.topics"?'
        ),
    ),
    "inside subscription_token as a string": (
        {"subscription_token": json.dumps({**fake_subscription(1), "topic": "x"})},
        (
            'unknown field "subscription_token.topic"; did you mean '
            '"subscription_token.topics"?'
        ),
    ),
    "in keys": (
        {
            **fake_subscription(1),
            "keys": {"auth": fake_subscription(1)["keys"]["auth"], "p256": "B"},
        },
        'unknown field "keys.p256"; did you mean "keys.p256dh"?',
    ),
    "in keys inside subscription_token": (
        {"subscription_token": {**fake_subscription(1), "keys": {**KEYS, "x": 1}}},
        'unknown field "subscription_token.keys.x"; the known fields are p256dh, auth',
    ),
}


@pytest.mark.parametrize("case", sorted(MISSPELT_SUBSCRIPTIONS))
def test_a_subscription_with_an_unknown_field_is_refused_and_stores_nothing(
    app, unchanged, case
):
    body, expected = MISSPELT_SUBSCRIPTIONS[case]
    assert _send(app, "POST", "/subscription", body, 400).json["error"] == expected
    assert unchanged()


# -- DELETE /subscription, POST /subscription/test, receipts ------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"endpoint": SUBSCRIBED["endpoint"], "topics": ["news"]},
            'unknown field "topics"',  # not "leave this topic": refused
        ),
        ({"endpiont": SUBSCRIBED["endpoint"]}, 'did you mean "endpoint"?'),
        ({"fcm_tokn": "dQw4w9WgXcQ:APA91b"}, 'did you mean "fcm_token"?'),
    ],
    ids=["topics", "endpiont", "fcm_tokn"],
)
def test_unsubscribing_with_an_unknown_field_is_refused_and_deletes_nothing(
    app, unchanged, body, expected
):
    assert expected in _send(app, "DELETE", "/subscription", body, 400).json["error"]
    assert unchanged()


def test_unsubscribing_with_the_whole_push_subscription_still_works(app, store):
    app.post_json("/subscription", fake_subscription(1))
    _send(app, "DELETE", "/subscription", fake_subscription(1), 204)
    assert len(store) == 0


def test_a_test_notification_with_an_unknown_field_is_refused_and_sends_nothing(
    app, unchanged
):
    body = {**SUBSCRIBED, "expirationtime": None}
    error = _send(app, "POST", "/subscription/test", body, 400).json["error"]
    assert error == 'unknown field "expirationtime"; did you mean "expirationTime"?'
    assert unchanged()  # a test sent to its dead port would count a failure


def test_a_receipt_with_an_unknown_field_is_refused_and_counts_nothing(
    app, push_service
):
    app.post_json("/subscription", push_service.subscriber().subscription)
    notification = pushed(app, {"title": "x"})
    receipt = push_service.received()[0].message["receipt"]
    body = {"event": "clicked", "receipt": receipt, "evnet": "closed"}
    path = f"/notifications/{notification['id']}/events"
    error = _send(app, "POST", path, body, 400).json["error"]
    assert error == 'unknown field "evnet"; did you mean "event"?'
    counts = app.get(f"/notifications/{notification['id']}", headers=AUTH).json
    assert (counts["clicked"], counts["closed"]) == (0, 0)


# -- webhooks -------------------------------------------------------------------------


def test_a_generic_webhook_with_an_unknown_field_is_refused_and_sends_nothing(
    app_with, settings
):
    hooks = app_with(webhook_secret=SECRET)
    hooks.post_json("/subscription", fake_subscription(1))
    before = stored_state(settings)
    body = json.dumps({"title": "Backup done", "topics": "ops"}).encode()
    error = hooks.post(
        "/webhooks/generic", body, headers={"X-Signature-256": sign(body)}, status=400
    ).json["error"]
    assert error == 'unknown field "topics"; did you mean "topic"?'
    assert stored_state(settings) == before and nothing_sent(hooks)


def test_a_long_unknown_field_is_named_cut_short(app, unchanged):
    body = {"title": "x", "y" * 10_000: 1}
    error = _send(app, "POST", "/push", body, 400, AUTH).json["error"]
    assert error.startswith('unknown field "' + "y" * 63 + '…"') and len(error) < 500
    assert unchanged()
