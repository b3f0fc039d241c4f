"""Tests for api.py, one per promise in the README and docs/.

Everything talks to real parts: the WSGI app through WebTest, a real
``python api.py`` process over HTTP, and a push-service stand-in on 127.0.0.1
(tests/push_service.py) that checks VAPID and decrypts what it receives.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import webtest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import api
from conftest import (
    AUTH,
    LOCAL_PUSH,
    ROOT,
    TOKEN,
    WAIT,
    Server,
    close_app,
    device_token,
    fake_subscription,
    free_port,
    mounted_tmpfs,
    pushed,
    server_pushed,
    stored_state,
    subscription_store,
    wait_status,
)
from tests.connect_proxy import ConnectProxy
from tests.nginx import ECHO_MODULE, NGINX, Nginx
from tests.push_service import PushService, b64url

# -- keys -------------------------------------------------------------------------


def test_first_start_generates_a_vapid_key_pair_with_private_modes(app, settings):
    vapid = Path(settings.vapid_dir)
    assert stat.S_IMODE(vapid.stat().st_mode) == 0o700
    assert stat.S_IMODE((vapid / "private_key.pem").stat().st_mode) == 0o600
    public = app.get("/subscription").json["public_key"]
    assert (vapid / "public_key.txt").read_text().strip() == public
    raw = base64.urlsafe_b64decode(public + "=" * (-len(public) % 4))
    assert len(raw) == 65 and raw[0] == 4 and "=" not in public
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)


def test_later_starts_load_the_same_key_and_never_regenerate(json_settings):
    first = api.VapidKeys.load_or_create(json_settings)
    pem = (Path(json_settings.vapid_dir) / "private_key.pem").read_bytes()
    second = api.VapidKeys.load_or_create(json_settings)
    assert second.public_key == first.public_key
    assert (Path(json_settings.vapid_dir) / "private_key.pem").read_bytes() == pem


def _openssl(directory: Path, *script: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    for line in script:
        subprocess.run(line, shell=True, check=True, cwd=directory, capture_output=True)


BLOG_KEYS = (
    "openssl ecparam -name prime256v1 -genkey -noout -out vapid_private.pem",
    (
        "openssl ec -in vapid_private.pem -outform DER | tail -c +8 | head -c 32 | base64 "
        "| tr -d '=' | tr '/+' '_-' >> private_key.txt"
    ),
    (
        "openssl ec -in vapid_private.pem -pubout -outform DER | tail -c 65 | base64 "
        "| tr -d '=' | tr '/+' '_-' >> public_key.txt"
    ),
)


def test_keys_made_the_blogs_way_with_openssl_are_accepted(tmp_path):
    blog = tmp_path / "blog"
    _openssl(blog, *BLOG_KEYS)
    expected = "".join((blog / "public_key.txt").read_text().split())  # base64 wraps it

    pem_only = tmp_path / "pem-only"
    pem_only.mkdir()
    shutil.copy(blog / "vapid_private.pem", pem_only)
    keys = api.VapidKeys.load_or_create(
        api.Settings.from_env({}, vapid_dir=str(pem_only))
    )
    assert keys.public_key == expected

    txt_only = tmp_path / "txt-only"
    txt_only.mkdir()
    shutil.copy(blog / "private_key.txt", txt_only)
    shutil.copy(blog / "public_key.txt", txt_only)
    keys = api.VapidKeys.load_or_create(
        api.Settings.from_env({}, vapid_dir=str(txt_only))
    )
    assert keys.public_key == expected

    raw = (blog / "private_key.txt").read_text().strip()
    for value in (
        raw,
        str(blog / "vapid_private.pem"),
        (blog / "vapid_private.pem").read_text(),
    ):
        keys = api.VapidKeys.load_or_create(
            api.Settings.from_env(
                {"VAPID_PRIVATE_KEY": value}, vapid_dir=str(tmp_path / "unused")
            )
        )
        assert keys.public_key == expected
    assert not (tmp_path / "unused").exists()


def test_a_pem_with_ec_parameters_first_is_accepted(tmp_path):
    _openssl(
        tmp_path / "k", "openssl ecparam -name prime256v1 -genkey -out private_key.pem"
    )
    assert "EC PARAMETERS" in (tmp_path / "k" / "private_key.pem").read_text()
    keys = api.VapidKeys.load_or_create(
        api.Settings.from_env({}, vapid_dir=str(tmp_path / "k"))
    )
    assert len(keys.public_key) == 87


def test_a_public_key_file_that_does_not_match_stops_the_start(json_settings):
    api.VapidKeys.load_or_create(json_settings)
    other = api.b64url_encode(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )
    (Path(json_settings.vapid_dir) / "public_key.txt").write_text(other)
    with pytest.raises(api.SettingError, match="does not match"):
        api.VapidKeys.load_or_create(json_settings)


def test_a_vapid_private_key_that_is_not_a_key_stops_the_start(tmp_path):
    settings = api.Settings.from_env(
        {"VAPID_PRIVATE_KEY": "not-a-key"}, vapid_dir=str(tmp_path)
    )
    with pytest.raises(api.SettingError, match="VAPID_PRIVATE_KEY"):
        api.VapidKeys.load_or_create(settings)


@pytest.mark.parametrize(
    ("subject", "warns"),
    [
        ("", True),
        ("mailto:admin@localhost", True),
        ("mailto:me@example.com", True),
        ("https://localhost", True),
        ("admin@site.org", True),
        ("mailto:push@mysite.org", False),
        ("https://mysite.org", False),
    ],
)
def test_vapid_subject_warns_when_push_services_would_refuse_it(subject, warns):
    assert (api.subject_warning(subject) is not None) == warns


@pytest.mark.parametrize("subject", ["admin@site.org", "https://site.org/contact"])
def test_a_subject_push_services_would_refuse_stops_the_start(server_factory, subject):
    server = server_factory(VAPID_SUBJECT=subject).start(wait=False)
    assert server.proc.wait(15) == 2
    assert "VAPID_SUBJECT" in server.output() and "mailto:" in server.output()
    assert "Traceback" not in server.output()


def test_the_receipt_key_is_derived_from_the_vapid_key_unless_receipt_key_is_set(
    json_settings,
):
    keys = api.VapidKeys.load_or_create(json_settings)
    derived = api.receipt_key_of(json_settings, keys)
    again = api.VapidKeys.load_or_create(json_settings)  # another process, say
    assert len(derived) == 32 and api.receipt_key_of(json_settings, again) == derived
    other = api.VapidKeys(
        ec.generate_private_key(ec.SECP256R1()), "mailto:a@b.test", "t"
    )
    assert api.receipt_key_of(json_settings, other) != derived
    assert keys.private_pem() not in derived and derived not in keys.private_pem()
    given = dataclasses.replace(json_settings, receipt_key="r" * 16)
    assert api.receipt_key_of(given, keys) == b"r" * 16
    short = dataclasses.replace(json_settings, receipt_key="secret-ish")
    with pytest.raises(api.SettingError) as refused:
        short.check()
    assert "RECEIPT_KEY" in str(refused.value) and "secret-ish" not in str(
        refused.value
    )


def test_vapid_header_is_signed_once_per_audience_with_its_own_claims(json_settings):
    keys = api.VapidKeys.load_or_create(json_settings)
    a = keys.authorization("https://fcm.googleapis.com")
    b = keys.authorization("https://web.push.apple.com")
    assert a != b and keys.authorization("https://fcm.googleapis.com") == a

    def claims(header: str) -> dict:
        jwt = header.split("t=")[1].split(",")[0]
        payload = jwt.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    assert claims(a)["aud"] == "https://fcm.googleapis.com"
    assert claims(b)["aud"] == "https://web.push.apple.com"
    assert 0 < claims(a)["exp"] - time.time() <= 24 * 3600


# -- subscriptions ------------------------------------------------------------------


def test_subscribe_returns_201_then_200_for_the_same_endpoint_without_duplicates(
    app, store
):
    sub = fake_subscription(1)
    first = app.post_json("/subscription", sub)
    assert first.status_int == 201 and first.json["id"]
    sub["keys"]["auth"] = b64url(b"\x07" * 16)
    again = app.post_json("/subscription", {**sub, "topics": ["news"]})
    assert again.status_int == 200 and again.json["id"] == first.json["id"]
    assert len(store) == 1
    record = store.get(first.json["id"])
    assert record["keys"]["auth"] == b64url(b"\x07" * 16) and record["topics"] == [
        "news"
    ]


def test_resubscribing_without_topics_keeps_the_stored_topics(app, store):
    sub = fake_subscription(1)
    sub_id = app.post_json("/subscription", {**sub, "topics": ["news", "alerts"]}).json[
        "id"
    ]
    app.post_json("/subscription", sub)
    assert store.get(sub_id)["topics"] == ["alerts", "news"]
    app.post_json("/subscription", {**sub, "topics": []})
    assert store.get(sub_id)["topics"] == []


@pytest.mark.parametrize("as_string", [False, True])
def test_the_blogs_subscription_token_form_is_accepted(app, store, as_string):
    sub = fake_subscription(2)
    token = json.dumps(sub) if as_string else sub
    response = app.post_json(
        "/subscription", {"subscription_token": token, "topics": ["a"]}
    )
    assert response.status_int == 201
    assert store.get(response.json["id"])["endpoint"] == sub["endpoint"]
    assert store.get(response.json["id"])["topics"] == ["a"]


def test_unsubscribe_returns_204_then_404(app, store):
    sub = fake_subscription(3)
    app.post_json("/subscription", sub)
    assert (
        app.delete_json("/subscription", {"endpoint": sub["endpoint"]}).status_int
        == 204
    )
    assert len(store) == 0
    gone = app.delete_json("/subscription", {"endpoint": sub["endpoint"]}, status=404)
    assert "error" in gone.json


def test_health_counts_subscriptions(app):
    assert app.get("/health").json["subscriptions"] == 0
    app.post_json("/subscription", fake_subscription(4))
    health = app.get("/health").json
    assert health["status"] == "ok" and health["subscriptions"] == 1


def test_get_topics_counts_the_subscribers_of_each_topic_for_the_token_only(app):
    assert app.get("/topics", status=401).json["error"].startswith("send the push")
    assert app.get("/topics", headers=AUTH).json == []
    for n, topics in enumerate([["news", "alerts"], ["news"], [], ["alerts"]]):
        app.post_json("/subscription", {**fake_subscription(n), "topics": topics})
    app.post_json("/subscription", {**fake_subscription(4), "topics": ["news"]})
    expected = [
        {"topic": "alerts", "subscriptions": 2},
        {"topic": "news", "subscriptions": 3},
    ]
    assert app.get("/topics", headers=AUTH).json == expected
    # Moved off a topic, and unsubscribed: the counts follow; an empty topic goes.
    app.post_json("/subscription", {**fake_subscription(3), "topics": ["news"]})
    app.delete_json("/subscription", {"endpoint": fake_subscription(1)["endpoint"]})
    expected = [
        {"topic": "alerts", "subscriptions": 1},
        {"topic": "news", "subscriptions": 3},
    ]
    assert app.get("/topics", headers=AUTH).json == expected
    app.delete_json("/subscription", {"endpoint": fake_subscription(0)["endpoint"]})
    assert app.get("/topics", headers=AUTH).json == [
        {"topic": "news", "subscriptions": 2}
    ]
    # A record that names a topic twice (a hand-edited file) counts once.
    store = app.app.config["webpush.store"]
    store.upsert({**_record(9), "topics": ["twice", "twice"]})
    assert {"topic": "twice", "subscriptions": 1} in app.get(
        "/topics", headers=AUTH
    ).json


def test_everything_is_kept_in_the_json_files_or_with_redis_url_in_redis_alone(
    app, settings, store
):
    app.post_json("/subscription", fake_subscription(5))
    pushed(app, {"title": "t", "topic": "nobody"})  # a notification, sent at once
    files = (Path(settings.subscriptions_file), settings.journal_path)
    if settings.redis_url:
        assert isinstance(store, api.RedisSubscriptionStore)
        assert app.app.config["webpush.journal"] is None
        assert not any(path.exists() for path in files)
        keys = list(stored_state(settings))
        assert keys and all(
            key.startswith(settings.redis_prefix.encode()) for key in keys
        )
    else:
        assert isinstance(store, api.JsonSubscriptionStore)
        assert all(path.stat().st_size for path in files)


def _point(prefix: int, fill: int) -> str:
    return b64url(bytes([prefix]) + bytes([fill]) * 64)


VALID = fake_subscription(99)
KEYS = VALID["keys"]
BAD_SUBSCRIPTIONS = {
    "not json": b"endpoint=x",
    "json array": b"[1, 2]",
    "NaN constant": b'{"endpoint": NaN}',
    "endpoint missing": {"keys": KEYS},
    "endpoint not a string": {"endpoint": 5, "keys": KEYS},
    "endpoint not a push service": {"endpoint": "https://evil.example/x", "keys": KEYS},
    "endpoint too long": {"endpoint": VALID["endpoint"] + "a" * 3000, "keys": KEYS},
    "keys missing": {"endpoint": VALID["endpoint"]},
    "keys not an object": {"endpoint": VALID["endpoint"], "keys": "abc"},
    "p256dh missing": {"endpoint": VALID["endpoint"], "keys": {"auth": KEYS["auth"]}},
    "p256dh not base64url": {
        "endpoint": VALID["endpoint"],
        "keys": {**KEYS, "p256dh": "!!!"},
    },
    "p256dh 64 bytes": {
        "endpoint": VALID["endpoint"],
        "keys": {**KEYS, "p256dh": b64url(b"\x04" * 64)},
    },
    "p256dh compressed": {
        "endpoint": VALID["endpoint"],
        "keys": {**KEYS, "p256dh": _point(2, 1)},
    },
    "p256dh not on the curve": {
        "endpoint": VALID["endpoint"],
        "keys": {**KEYS, "p256dh": _point(4, 1)},
    },
    "auth 15 bytes": {
        "endpoint": VALID["endpoint"],
        "keys": {**KEYS, "auth": b64url(b"a" * 15)},
    },
    "auth a number": {"endpoint": VALID["endpoint"], "keys": {**KEYS, "auth": 16}},
    "expirationTime text": {**VALID, "expirationTime": "tomorrow"},
    "topics not a list": {**VALID, "topics": "news"},
    "topic with a space": {**VALID, "topics": ["bad topic"]},
    "topic too long": {**VALID, "topics": ["a" * 65]},
    "too many topics": {**VALID, "topics": [f"t{i}" for i in range(21)]},
    "topic not a string": {**VALID, "topics": [1]},
    "subscription_token bad json": {"subscription_token": "{nope"},
    "subscription_token a number": {"subscription_token": 7},
}


def _send(app, method: str, path: str, body, status, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return app.request(
        path,
        method=method,
        body=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        status=status,
    )


@pytest.mark.parametrize("case", sorted(BAD_SUBSCRIPTIONS))
def test_bad_subscriptions_get_a_400_json_error_and_store_nothing(app, unchanged, case):
    response = _send(app, "POST", "/subscription", BAD_SUBSCRIPTIONS[case], 400)
    assert response.content_type == "application/json"
    assert isinstance(response.json["error"], str) and response.json["error"]
    assert unchanged()


def test_a_body_over_the_limit_gets_413_and_stores_nothing(app, unchanged):
    big = {**VALID, "padding": "x" * 40000}
    response = _send(app, "POST", "/subscription", big, 413)
    assert "limit" in response.json["error"] and unchanged()


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", {"endpoint": 7}, {"endpoint": ""}],
    ids=["empty", "no endpoint", "number", "blank"],
)
def test_bad_unsubscribes_get_a_400_and_delete_nothing(app, unchanged, body):
    response = _send(app, "DELETE", "/subscription", body, 400)
    assert response.json["error"] and unchanged()


BAD_PUSHES = {
    "nothing to send": {},
    "title a number": {"title": 5},
    "ttl negative": {"title": "t", "ttl": -1},
    "ttl text": {"title": "t", "ttl": "60"},
    "urgency unknown": {"title": "t", "urgency": "urgent"},
    "collapse_key too long": {"title": "t", "collapse_key": "a" * 33},
    "collapse_key with slash": {"title": "t", "collapse_key": "a/b"},
    "topic with a space": {"title": "t", "topic": "a b"},
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_bad_pushes_get_a_400_and_send_nothing(app, unchanged, push_service, case):
    response = _send(app, "POST", "/push", BAD_PUSHES[case], 400, AUTH)
    assert response.json["error"] and unchanged()
    assert push_service.received() == []


def test_a_push_over_the_payload_limit_gets_413_saying_by_how_much(app, push_service):
    app.post_json("/subscription", push_service.subscriber().subscription)
    response = _send(
        app, "POST", "/push", {"title": "t", "body": "x" * 4000}, 413, AUTH
    )
    assert "over" in response.json["error"]
    assert push_service.received() == []


# -- the endpoint allowlist ---------------------------------------------------------

ALLOWED = [
    "https://fcm.googleapis.com/fcm/send/abc:def",
    "https://updates.push.services.mozilla.com/wpush/v2/gAAAA",
    "https://web.push.apple.com/QGx5",
    "https://wns2-par02p.notify.windows.com/w/?token=BQYAAA",
    "https://eu-1.push.services.mozilla.com/wpush/v1/x",
]
REFUSED = [
    "http://fcm.googleapis.com/fcm/send/abc",
    "https://fcm.googleapis.com:8443/fcm/send/abc",
    "https://fcm.googleapis.com@evil.com/x",
    "https://user:pw@fcm.googleapis.com/x",
    "https://fcm.googleapis.com.evil.com/x",
    "https://evil.com/fcm.googleapis.com/x",
    "https://evil.com/?u=https://fcm.googleapis.com/",
    "https://a.b.notify.windows.com/x",
    "https://notify.windows.com/x",
    "https://evilnotify.windows.com/x",
    "https://127.0.0.1/x",
    "https://[::1]/x",
    "https://localhost/x",
    "file:///etc/passwd",
    "https://fcm.googleapis.com\\@evil.com/",
    "https://fcm.googleapis.com./x",
    "https://fcm.googleapis.com:abc/x",
]


@pytest.mark.parametrize("url", ALLOWED)
def test_the_allowlist_accepts_real_push_services(url):
    assert api.endpoint_allowed(url)


@pytest.mark.parametrize("url", REFUSED)
def test_the_allowlist_refuses_everything_else(url):
    assert not api.endpoint_allowed(url)


def test_push_endpoint_pattern_replaces_the_allowlist():
    import re

    pattern = re.compile(LOCAL_PUSH)
    assert api.endpoint_allowed("http://127.0.0.1:8000/push/1", pattern)
    assert not api.endpoint_allowed("https://fcm.googleapis.com/fcm/send/x", pattern)
    assert not api.endpoint_allowed("http://x/http://127.0.0.1:8000/", pattern)


UNSENDABLE = [
    "http://127.0.0.1:9/push/\u4e2d\u6587",  # outside Latin-1
    "http://127.0.0.1:9/push/caf\u00e9",  # Latin-1, not ASCII
    "http://127.0.0.1:9/push/a b",
    "http://127.0.0.1:9/push/a\tb",
    "http://127.0.0.1:9/push/a#b",
    "http://127.0.0.1:9/push/a\\b",
    "http://127.0.0.1:99999/push/x",
    "ftp://127.0.0.1:9/push/x",
    "http://127.0.0%2e1:9/push/x",  # libcurl would decode the %2e in the host
]


@pytest.mark.parametrize("endpoint", UNSENDABLE)
def test_an_endpoint_that_cannot_be_sent_to_is_refused_at_subscribe_time(
    app_with, endpoint
):
    client = app_with(push_endpoint_pattern=".*")  # allows anything it can send to
    answer = client.post_json(
        "/subscription", {**VALID, "endpoint": endpoint}, status=400
    )
    assert "endpoint" in answer.json["error"]
    assert len(client.app.config["webpush.store"]) == 0


def test_one_unsendable_stored_record_never_aborts_a_fan_out_or_its_report(
    app, push_service, store
):
    """A record stored by an older version, before endpoints were checked."""
    gone, fine = push_service.subscriber(script=[410]), push_service.subscriber()
    for sub in (gone, fine):
        app.post_json("/subscription", sub.subscription)
    bad = {**fake_subscription(3), "endpoint": push_service.origin + "/push/\u4e2d"}
    store.upsert({**bad, "id": api.subscription_id(bad["endpoint"]), "topics": []})
    store.upsert({"id": "no-endpoint", "keys": bad["keys"], "topics": []})
    result = pushed(app, {"title": "t"})
    assert (result["sent"], result["removed"], result["failed"]) == (1, 1, 2)
    reasons = sorted(e["reason"] for e in result["errors"] for _ in range(e["count"]))
    assert "cannot send: KeyError" in reasons[0] and "not allowed" in reasons[1]
    assert store.get(api.subscription_id(gone.endpoint)) is None  # report applied
    assert len(store) == 3


@pytest.mark.parametrize("narrowed", [r"^https://only\.", ""])  # "": built-in
def test_a_stored_endpoint_the_allowlist_no_longer_admits_gets_nothing(
    settings, push_service, narrowed
):
    sub = push_service.subscriber()
    first = api.create_app(settings)
    webtest.TestApp(first).post_json("/subscription", sub.subscription)
    close_app(first)
    second = api.create_app(
        dataclasses.replace(settings, push_endpoint_pattern=narrowed)
    )
    try:
        result = pushed(webtest.TestApp(second), {"title": "t"})
        assert (result["sent"], result["failed"]) == (0, 1)
        assert push_service.received() == []
    finally:
        close_app(second)


# -- push -------------------------------------------------------------------------------


def test_push_sends_the_notification_to_every_subscriber_encrypted_and_signed(
    app, push_service
):
    subs = [push_service.subscriber() for _ in range(3)]
    for sub in subs:
        app.post_json("/subscription", sub.subscription)
    body = {
        "title": "Deploy",
        "body": "v2 is live",
        "icon": "/i.png",
        "url": "/news",
        "data": {"n": 1},
    }
    result = pushed(app, body)
    assert (result["sent"], result["failed"], result["removed"]) == (3, 0, 0)
    deliveries = push_service.received()
    assert sorted(d.subscriber for d in deliveries) == sorted(s.id for s in subs)
    key = app.app.config["webpush.receipt_key"]
    for delivery in deliveries:
        assert delivery.error is None and delivery.status == 201
        endpoint = push_service.subscribers[delivery.subscriber].endpoint
        record_id = api.endpoint_id(endpoint)
        assert delivery.message == {
            **body,
            "id": result["id"],
            "receipt": api.receipt(key, result["id"], record_id),
        }
        assert delivery.claims["aud"] == push_service.origin
        assert delivery.claims["sub"] == "mailto:ops@push.test"
        assert delivery.headers["ttl"] == "86400"


def test_push_to_a_topic_reaches_only_its_subscribers(app, push_service):
    news, other = push_service.subscriber(), push_service.subscriber()
    app.post_json("/subscription", {**news.subscription, "topics": ["news"]})
    app.post_json("/subscription", other.subscription)
    result = pushed(app, {"title": "t", "topic": "news"})
    assert result["sent"] == 1
    assert [d.subscriber for d in push_service.received()] == [news.id]


def test_the_legacy_message_form_still_works(app, push_service):
    sub = push_service.subscriber()
    app.post_json("/subscription", sub.subscription)
    assert pushed(app, {"message": "hello"})["sent"] == 1
    message = push_service.received()[0].message
    assert message["body"] == "hello" and message["title"]
    assert set(message) == {"title", "body", "icon", "url", "data", "id", "receipt"}


def test_push_headers_carry_ttl_urgency_and_topic(app, push_service):
    app.post_json("/subscription", push_service.subscriber().subscription)
    body = {"title": "t", "ttl": 60, "urgency": "high", "collapse_key": "build-42"}
    pushed(app, body)
    headers = push_service.received()[0].headers
    assert (headers["ttl"], headers["urgency"], headers["topic"]) == (
        "60",
        "high",
        "build-42",
    )


def test_gone_subscriptions_are_removed_and_failures_kept(app, push_service, store):
    gone = push_service.subscriber(script=[410])
    missing = push_service.subscriber(script=[404])
    refused = push_service.subscriber(script=[403])
    fine = push_service.subscriber()
    for sub in (gone, missing, refused, fine):
        app.post_json("/subscription", sub.subscription)
    result = pushed(app, {"title": "t"})
    assert (result["sent"], result["failed"], result["removed"]) == (1, 1, 2)
    assert len(store) == 2
    assert {api.subscription_id(s.endpoint) for s in (refused, fine)} == {
        r["id"] for r in store.list()
    }


def test_push_with_no_subscribers_sends_nothing(app):
    zero = dict.fromkeys(api.COUNTS, 0)
    result = pushed(app, {"title": "t"})
    assert result["status"] == "done"
    assert {k: result[k] for k in ("total", "pending", *zero)} == {
        "total": 0,
        "pending": 0,
        **zero,
    }
    assert result["channels"] == {"webpush": zero, "fcm": zero}
    assert result["errors"] == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
    ids=["none", "wrong", "no scheme", "basic"],
)
def test_push_without_the_right_token_gets_401(app, push_service, headers):
    app.post_json("/subscription", push_service.subscriber().subscription)
    response = app.post_json("/push", {"title": "t"}, headers=headers, status=401)
    assert response.json["error"] and response.headers["WWW-Authenticate"].startswith(
        "Bearer"
    )
    assert push_service.received() == []


def test_test_notification_goes_only_to_the_caller(app, push_service):
    mine, other = push_service.subscriber(), push_service.subscriber()
    app.post_json("/subscription", mine.subscription)
    app.post_json("/subscription", other.subscription)
    result = app.post_json("/subscription/test", mine.subscription).json
    assert result["sent"] == 1
    assert [d.subscriber for d in push_service.received()] == [mine.id]
    assert push_service.received()[0].message["title"] == "Test notification"


def test_test_notification_needs_a_stored_subscription_and_its_auth_secret(
    app, push_service
):
    sub = push_service.subscriber()
    app.post_json("/subscription/test", sub.subscription, status=404)
    app.post_json("/subscription", sub.subscription)
    forged = {
        **sub.subscription,
        "keys": {**sub.subscription["keys"], "auth": b64url(b"f" * 16)},
    }
    assert (
        "auth" in app.post_json("/subscription/test", forged, status=403).json["error"]
    )
    assert push_service.received() == []


# -- HTTP details -------------------------------------------------------------------------


def test_cors_headers_on_api_answers_errors_and_preflights(app):
    assert app.get("/subscription").headers["Access-Control-Allow-Origin"] == "*"
    assert (
        app.post_json("/push", {}, status=401).headers["Access-Control-Allow-Origin"]
        == "*"
    )
    preflight = app.options("/push", headers={"Origin": "https://site.test"})
    assert preflight.status_int == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"]
    assert "Content-Type" in allowed and "Authorization" in allowed
    assert "Idempotency-Key" in allowed and "Prefer" in allowed


def test_cors_origins_lists_the_sites_allowed(app_with):
    client = app_with(cors_origins="https://a.test, https://b.test")
    ok = client.get("/subscription", headers={"Origin": "https://b.test"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://b.test"
    assert "Origin" in ok.headers["Vary"]
    other = client.get("/subscription", headers={"Origin": "https://evil.test"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_unknown_routes_and_methods_answer_json(app):
    assert app.get("/nope", status=404).json["error"]
    assert app.put("/subscription", status=405).json["error"]


def test_webpush_sw_names_the_push_server_it_came_from_never_public_url(app_with):
    """PUBLIC_URL is the site's address; receipts go to the push server."""
    client = app_with(public_url="https://shop.example.org")
    body = client.get("/webpush-sw.js", headers={"Host": "push.example.org"}).text
    assert 'self.webpushServer || "http://push.example.org";' in body
    assert "shop.example.org" not in body


def test_demo_page_and_service_worker_are_served(app):
    page = app.get("/")
    assert page.content_type == "text/html" and "main.js" in page.text
    worker = app.get("/sw.js")
    assert worker.content_type == "application/javascript"
    assert "/webpush-sw.js" in worker.text  # the handlers any site takes in
    assert "showNotification" in app.get("/webpush-sw.js").text
    assert app.get("/static/main.js").content_type == "application/javascript"
    assert app.get("/static/manifest.webmanifest").json["start_url"] == "/"


def test_the_console_is_served_at_admin_never_framed_nor_referred(app):
    page = app.get("/admin")
    assert page.content_type == "text/html"
    assert '<script type="module" src="/static/admin.js">' in page.text
    assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Referrer-Policy"] == "no-referrer"


def test_pages_and_static_files_are_revalidated_so_an_upgrade_takes_at_once(app):
    for path in ("/", "/admin", "/sw.js", "/static/admin.js", "/static/style.css"):
        response = app.get(path)
        assert response.headers["Cache-Control"] == "no-cache", path
        since = {"If-Modified-Since": response.headers["Last-Modified"]}
        assert app.get(path, headers=since, status=304).body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/static/../api.py",
        "/static/..%2fapi.py",
        "/static/%2e%2e/vapid/private_key.pem",
        "/static/.hidden",
        "/static/index.html%00.png",
    ],
)
def test_static_files_cannot_reach_outside_static(app, path):
    response = app.get(path, status=404, expect_errors=True)
    assert b"PRIVATE KEY" not in response.body and b"import" not in response.body


# -- the store ---------------------------------------------------------------------------
# Most tests here are of the JSON store's file, and so JSON only: its
# compaction, torn and damaged lines, lock and refused writes, which Redis
# does not have (a Redis that refuses writes, is full or lost its data:
# tests/test_scale_out.py). What any store promises runs on both.


def _record(n: int) -> dict:
    sub = fake_subscription(n)
    return {"id": api.subscription_id(sub["endpoint"]), **sub, "topics": []}


def test_store_survives_reopen_and_compacts_when_mostly_dead(tmp_path):
    """JSON only: compaction rewrites the store file; that subscriptions
    survive a restart is tested on both by
    test_server_process_keeps_subscriptions_across_restarts."""
    path = tmp_path / "subs.json"
    store = api.JsonSubscriptionStore(path)
    for n in range(1200):
        store.upsert(_record(n % 100))
    store.remove(_record(0)["id"])
    store.close()
    lines = path.read_text().splitlines()
    assert len(lines) <= 2 * 99 + api.JsonSubscriptionStore.COMPACT_MIN_LINES
    reopened = api.JsonSubscriptionStore(path)
    assert len(reopened) == 99 and reopened.get(_record(5)["id"])["endpoint"].endswith(
        "fake-5"
    )
    assert reopened.get(_record(0)["id"]) is None
    reopened.close()


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "subs.json"
    store = api.JsonSubscriptionStore(path)
    store.upsert(_record(1))
    store.close()
    with open(path, "ab") as f:
        f.write(b'{"id":"torn","endpoint":"http://127.0.0.1:9/x","ke')
    store = api.JsonSubscriptionStore(path)
    assert len(store) == 1 and "torn last line" in caplog.text
    store.upsert(_record(2))
    store.close()
    store = api.JsonSubscriptionStore(path)
    assert len(store) == 2
    store.close()


def damaged_store(path: Path, records: int, second_line: bytes) -> None:
    """A store of ``records`` records whose second line is ``second_line``."""
    store = api.JsonSubscriptionStore(path)
    for n in range(records):
        store.upsert(_record(n))
    store.close()
    lines = path.read_bytes().split(b"\n")
    lines[1] = second_line
    path.write_bytes(b"\n".join(lines))


def test_damage_in_the_middle_stops_the_start_with_the_line_number(tmp_path):
    path = tmp_path / "subs.json"
    damaged_store(path, 3, b"garbage")
    with pytest.raises(api.StoreDamaged, match="line 2"):
        api.JsonSubscriptionStore(path)


def test_a_second_store_on_the_same_file_is_refused(tmp_path):
    store = api.JsonSubscriptionStore(tmp_path / "subs.json")
    with pytest.raises(api.StoreLocked, match="another api.py"):
        api.JsonSubscriptionStore(tmp_path / "subs.json")
    store.close()


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_second_store_through_another_name_of_the_file_is_refused(tmp_path, link):
    path = tmp_path / "subscriptions.json"
    store = api.JsonSubscriptionStore(path)
    store.upsert(_record(1))
    other = tmp_path / "elsewhere" / "subs.json"
    other.parent.mkdir()
    if link == "symlink":
        other.symlink_to(path)
    else:
        os.link(path, other)
    with pytest.raises(api.StoreLocked):
        api.JsonSubscriptionStore(other)
    store.close()
    api.JsonSubscriptionStore(other).close()  # free once the first one closed


def _store_lines(path: Path) -> list[dict]:
    """Every line of a store file, parsed strictly: no partial line, no NaN."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [
        json.loads(line, parse_constant=api._refuse_constant)
        for line in raw.splitlines()
    ]


@pytest.fixture
def failing(monkeypatch):
    """Makes the next ``count`` calls of ``os.<name>`` in api.py fail with ``error``."""

    def fail(name: str, error: int, count: int = 1, after: int = 0) -> None:
        real = getattr(os, name)
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if after < calls["n"] <= after + count:
                if name == "write":  # a disk that fills mid-line writes part of it
                    real(args[0], bytes(args[1])[:7])
                raise OSError(error, os.strerror(error))
            return real(*args, **kwargs)

        monkeypatch.setattr(api.os, name, flaky)

    return fail


@pytest.mark.parametrize(
    ("call", "error"),
    [("write", errno.ENOSPC), ("fsync", errno.EIO), ("fsync", errno.ENOSPC)],
)
def test_a_refused_write_changes_nothing_and_the_next_one_works(
    tmp_path, failing, call, error
):
    """JSON only: the file's write or fsync fails; Redis refusing a write is
    tests/test_scale_out.py's (read-only, full)."""
    path = tmp_path / "subs.json"
    store = api.JsonSubscriptionStore(path)
    store.upsert(_record(1))
    store.upsert(_record(2))
    before = path.read_bytes()
    failing(call, error)
    with pytest.raises(OSError):
        store.upsert({**_record(1), "topics": ["changed"]})
    assert store.get(_record(1)["id"])["topics"] == []  # the refused change undone
    assert path.read_bytes() == before  # no partial line, no unsynced line left
    store.remove(_record(2)["id"])  # the next write works
    store.upsert(_record(3))
    store.close()
    reopened = api.JsonSubscriptionStore(path)
    assert sorted(r["id"] for r in reopened.list()) == sorted(
        [_record(1)["id"], _record(3)["id"]]
    )
    assert reopened.get(_record(1)["id"])["topics"] == []
    assert len(_store_lines(path)) >= 2
    reopened.close()


@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
def test_a_failed_compaction_keeps_the_journal_and_the_write(tmp_path, failing, call):
    path = tmp_path / "subs.json"
    store = api.JsonSubscriptionStore(path)
    for n in range(api.JsonSubscriptionStore.COMPACT_MIN_LINES):
        store.upsert(_record(n % 10))
    failing(call, errno.ENOSPC, after=1 if call == "write" else 0)
    store.remove(_record(0)["id"])  # its append works; the compaction it starts fails
    assert store.get(_record(0)["id"]) is None
    assert not (tmp_path / "subs.json.tmp").exists()
    store.upsert(_record(11))  # the store still works: no 503 until a restart
    store.close()
    reopened = api.JsonSubscriptionStore(path)
    assert len(reopened) == 10 and reopened.get(_record(0)["id"]) is None
    reopened.close()


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KB tmpfs, mounted for the test (root only: CI is)."""
    with mounted_tmpfs(tmp_path, "256k") as mount:
        yield mount


def test_a_full_disk_refuses_writes_with_507_loses_nothing_and_recovers(
    server_factory, small_disk
):
    """JSON only: the disk is a 256 KB tmpfs holding the store's files, whose
    lines and names are checked; a full Redis is
    tests/test_scale_out.py's test_a_full_redis_refuses_writes_...."""
    store_file = small_disk / "subscriptions.json"
    server = server_factory(SUBSCRIPTIONS_FILE=str(store_file)).start()
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # fill the disk up, then leave about 24 KB
            f.write(b"x" * 4096)
    os.truncate(filler, filler.stat().st_size - 24 * 1024)
    stored, refused = [], None
    for n in range(1000):
        sub = fake_subscription(n)
        answer = requests.post(server.url + "/subscription", json=sub)
        if answer.status_code != 201:
            refused = answer
            break
        stored.append(api.subscription_id(sub["endpoint"]))
    assert refused is not None and refused.status_code == 507, refused
    assert "disk is full" in refused.json()["error"]
    notification = requests.post(
        server.url + "/push", json={"title": "t"}, headers=AUTH
    )
    assert notification.status_code == 507, notification.text  # not journaled
    listed = requests.get(server.url + "/notifications", headers=AUTH).json()
    assert listed["notifications"] == []
    assert len(stored) > 10
    assert [line["id"] for line in _store_lines(store_file)] == stored
    assert requests.get(server.url + "/health").json()["subscriptions"] == len(stored)
    filler.unlink()  # space comes back: service resumes by itself
    extra = fake_subscription(5000)
    assert requests.post(server.url + "/subscription", json=extra).status_code == 201
    server.stop(signal.SIGKILL)
    server.start()
    assert (
        requests.get(server.url + "/health").json()["subscriptions"] == len(stored) + 1
    )
    journal = small_disk / "subscriptions.notifications.json"
    assert sorted(small_disk.iterdir()) == sorted(
        [
            store_file,
            small_disk / "subscriptions.json.lock",
            journal,
            small_disk / "subscriptions.notifications.json.lock",
            small_disk / "subscriptions.notifications.receipts.sqlite",
            small_disk / "subscriptions.notifications.receipts.sqlite-shm",
            small_disk / "subscriptions.notifications.receipts.sqlite-wal",
        ]
    )


def test_a_receipt_on_a_full_disk_gets_507_and_counts_once_space_is_back(
    server_factory, small_disk
):
    """JSON only: receipts go to the SQLite file beside the journal, on a
    256 KB tmpfs; on Redis there is no disk of the server's to fill."""
    server = server_factory(SUBSCRIPTIONS_FILE=str(small_disk / "s.json")).start()
    answer = requests.post(server.url + "/push", json={"title": "t"}, headers=AUTH)
    notification_id = answer.json()["id"]
    settings = api.Settings(
        vapid_dir=server.env["VAPID_DIR"], vapid_subject="mailto:ops@push.test"
    )
    key = api.receipt_key_of(settings, api.VapidKeys.load_or_create(settings))
    url = f"{server.url}/notifications/{notification_id}/events"

    def report(n: int) -> requests.Response:
        subscriber = api.subscription_id(f"subscriber-{n}")
        body = {
            "event": "delivered",
            "receipt": api.receipt(key, notification_id, subscriber),
        }
        return requests.post(url, json=body)

    def delivered() -> int:
        document = requests.get(
            f"{server.url}/notifications/{notification_id}", headers=AUTH
        )
        return document.json()["delivered"]

    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"x" * 4096)
    counted, refused = 0, None
    for n in range(2000):
        answer = report(n)
        if answer.status_code != 200:
            refused = answer
            break
        counted += 1
    assert refused is not None and refused.status_code == 507, refused
    assert "disk is full" in refused.json()["error"]
    assert delivered() == counted  # the refused one changed nothing
    filler.unlink()
    assert report(counted).json() == {"event": "delivered", "counted": True}
    assert report(counted).json()["counted"] is False
    server.stop(signal.SIGKILL)
    server.start()
    assert delivered() == counted + 1


def test_concurrent_writers_lose_no_update(settings):
    store = api.open_store(settings)

    def write(start: int) -> None:
        for n in range(start, start + 150):
            store.upsert(_record(n))
            if n % 3 == 0:
                store.remove(_record(n)["id"])

    threads = [threading.Thread(target=write, args=(i * 150,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {_record(n)["id"] for n in range(1200) if n % 3}
    assert {r["id"] for r in store.list()} == expected
    store.close()
    reopened = api.open_store(settings)
    assert {r["id"] for r in reopened.list()} == expected
    assert len(reopened) == len(expected)
    reopened.close()


# -- the real server process ------------------------------------------------------------


def test_server_process_keeps_subscriptions_across_restarts(
    server_factory, push_service, backend_env
):
    server = server_factory(**backend_env).start()
    sub = push_service.subscriber()
    assert (
        requests.post(
            server.url + "/subscription", json={**sub.subscription, "topics": ["x"]}
        ).status_code
        == 201
    )
    server.stop()
    server.start()
    assert requests.get(server.url + "/health").json()["subscriptions"] == 1
    result = server_pushed(server, {"title": "after restart", "topic": "x"})
    assert result["sent"] == 1
    assert push_service.received()[0].message["title"] == "after restart"
    if backend_env:  # with REDIS_URL, the JSON files are not used
        directory = Path(server.env["SUBSCRIPTIONS_FILE"]).parent
        assert not list(directory.glob("subscriptions*"))


def test_a_second_server_on_the_same_file_fails_fast(server_factory, tmp_path):
    """JSON only: the promise is the store file's lock; on Redis several
    servers share one store on purpose (tests/test_scale_out.py)."""
    server_factory().start()
    second = server_factory().start(wait=False)
    assert second.proc.wait(15) != 0
    assert "another api.py" in second.output()


def test_concurrent_subscribes_through_the_server_are_all_stored(
    server_factory, backend_env
):
    server = server_factory(THREADS="8", **backend_env).start()
    subs = [fake_subscription(n) for n in range(400)]
    statuses: list[int] = []

    def post(chunk: list[dict]) -> None:
        with requests.Session() as http:
            for sub in chunk:
                statuses.append(
                    http.post(server.url + "/subscription", json=sub).status_code
                )

    threads = [threading.Thread(target=post, args=(subs[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(201) == 400
    server.stop()
    server.start()
    assert requests.get(server.url + "/health").json()["subscriptions"] == 400


def _subscribe_until(
    url: str, first: int, stop: threading.Event, acknowledged: set[str]
) -> None:
    """POST new subscriptions until ``stop``; add each one answered 201."""
    n = first
    with requests.Session() as http:
        while not stop.is_set():
            sub = fake_subscription(n)
            n += 1
            try:
                response = http.post(url + "/subscription", json=sub, timeout=5)
            except requests.RequestException:
                return
            if response.status_code == 201:
                acknowledged.add(sub["endpoint"])  # set.add is atomic


def test_kill_9_loses_no_acknowledged_subscription(
    server_factory, backend_env, tmp_path
):
    server = server_factory(THREADS="8", **backend_env)
    acknowledged: set[str] = set()
    for round_ in range(3):
        server.start()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=_subscribe_until,
                args=(server.url, round_ * 100000 + w * 10000, stop, acknowledged),
            )
            for w in range(8)
        ]
        for t in threads:
            t.start()
        enough = len(acknowledged) + 40  # killed with writes under way
        deadline = time.monotonic() + 30
        while len(acknowledged) < enough:
            assert time.monotonic() < deadline, len(acknowledged)
            time.sleep(0.01)
        server.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join()
    assert len(acknowledged) > 100
    with subscription_store(backend_env, tmp_path) as store:
        stored = {r["endpoint"] for r in store.list()}
    assert acknowledged <= stored


def test_first_start_prints_the_token_and_a_curl_command_and_keeps_it_private(
    server_factory, tmp_path
):
    server = server_factory()
    server.env.pop("PUSH_TOKEN")
    server.start()
    token_file = tmp_path / "vapid" / "push_token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    output = server.output()
    assert token in output and "curl -X POST" in output
    assert requests.post(
        server.url + "/push",
        json={"title": "t"},
        headers={"Authorization": f"Bearer {token}"},
    ).ok
    server.stop()
    first_run = len(output)
    server.start()
    later = server.output()[first_run:]
    assert token not in later and f"$(cat {token_file})" in later


def test_help_lists_every_option_and_environment_variable():
    result = subprocess.run(
        [sys.executable, str(ROOT / "api.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for f in api.Settings.__dataclass_fields__.values():
        assert f.metadata["env"] in result.stdout
        if f.metadata["cli"]:
            assert "--" + f.name.replace("_", "-") in result.stdout


def test_a_busy_port_is_a_clear_error(server_factory):
    first = server_factory().start()
    second = Server(Path(first.env["VAPID_DIR"]).parent / "other", PORT=str(first.port))
    second.log.parent.mkdir()
    second.start(wait=False)
    assert second.proc.wait(15) == 2
    assert "is in use by another program" in second.output()
    assert "serving on" not in second.output()  # logged once the port is bound
    assert "serving on" in first.output()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("PORT", "99999"),
        ("PORT", "0"),
        ("PORT", "http"),
        ("THREADS", "0"),
        ("PUSH_PROCESSES", "0"),
        ("PUSH_CONCURRENCY", "-1"),
        ("PUSH_TIMEOUT", "nan"),
        ("PUSH_TIMEOUT", "inf"),
        ("RETRY_BACKOFF", "-1"),
        ("SHUTDOWN_TIMEOUT", "-5"),
        ("LOG_LEVEL", "LOUD"),
        ("PUSH_ENDPOINT_PATTERN", "(unclosed"),
        ("TRUSTED_PROXIES", "proxy.internal"),
        ("MAX_BODY_BYTES", "10"),
        ("DEFAULT_TTL", "99999999"),
        ("SUBSCRIPTIONS_FILE", "{file}/subscriptions.json"),
        ("VAPID_DIR", "{file}/vapid"),
    ],
)
@pytest.mark.parametrize("how", ["env", "option"])
def test_a_bad_setting_stops_the_start_with_one_line_and_status_2(
    tmp_path, setting, value, how
):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    value = value.format(file=a_file)
    server = Server(tmp_path)
    env, argv = dict(server.env), []
    if how == "env":
        env[setting] = value
    else:
        argv = [f"--{setting.lower().replace('_', '-')}={value}"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1 and setting in output or "cannot" in output


# -- the README and docs/ -------------------------------------------------------------
# The README is for newcomers; the reference is in docs/, one page a subject.

DOCS = ROOT / "docs"
README_MAX_LINES = 250


def _documentation() -> dict[Path, str]:
    """The README and every page of docs/, by path."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    return {page: page.read_text() for page in pages}


def _links(text: str) -> list[str]:
    """The targets of a page's Markdown links and images, outside code."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(
        r'<img src="([^"]+)"', prose
    )


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    headings = re.findall(r"^#{1,6} (.+)$", prose, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_documents_every_setting_and_route(app):
    """Every setting's row and every API route is in the README or a page of
    docs/, and the README keeps the quick start's two commands."""
    documentation = "\n".join(_documentation().values())
    for f in api.Settings.__dataclass_fields__.values():
        assert f"| `{f.metadata['env']}` |" in documentation, f.metadata["env"]
    for route in app.app.routes:
        if route.config.get("api") and route.method != "OPTIONS":
            rule = re.sub(r"<(\w+):\w+>", r"<\1>", route.rule)  # /users/<id:path>
            assert f"`{route.method} {rule}`" in documentation, route.rule
    readme = (ROOT / "README.md").read_text()
    assert RUN_COMMAND in readme and TEST_COMMAND in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"{len(lines)} lines: move text to docs/"


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    linked = {target.split("#")[0] for target in _links(readme)}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages, "docs/ has no pages"
    assert pages - linked == set(), "pages of docs/ the README does not link to"


def test_every_link_of_the_readme_and_docs_reaches_its_page_and_heading():
    """Relative links (pages, pictures, #anchors) of the README and docs/
    lead somewhere."""
    documentation = _documentation()
    for page, text in documentation.items():
        for target in _links(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            assert where.exists(), f"{page.name}: {target} leads nowhere"
            if anchor:
                assert anchor in _anchors(where.read_text()), f"{page.name}: {target}"


def test_the_documented_commands_run_on_a_stock_debian():
    """Debian has python3, not python: every command says python3 or
    .venv/bin/python."""
    for page, text in _documentation().items():
        bare = re.findall(r"(?<![\w/.-])python [\w./-]+", text)
        assert bare == [], f"{page.name}: {bare}"


def test_the_push_fields_are_one_table_with_every_field():
    """docs/api.md's table of POST /push fields is one table (a paragraph
    inside it would show its second half as raw text), naming every field."""
    section = (DOCS / "api.md").read_text().split("## `POST /push`", 1)[1]
    section = section.split("\n## ", 1)[0]
    table = section[section.index("| field | meaning |") :].split("\n\n", 1)[0]
    rows = table.splitlines()
    assert all(row.startswith("| ") and row.endswith(" |") for row in rows)
    named = set(re.findall(r"^\| ([^|]+) \|", table, flags=re.MULTILINE))
    fields = {f for cell in named for f in re.findall(r"`(\w+)`", cell)}
    assert set(api.PUSH_FIELDS) - fields == {"message"}  # the legacy body
    assert '{"message": "text"}' in table


def _readme_snippet(language: str, section: str) -> str:
    """The first ```language block of the README's ``## section``."""
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = text.split(f"```{language}\n", 1)[1].split("```")[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 5, code
    return code


def _the_one_notification(server: Server) -> dict:
    answer = requests.get(server.url + "/notifications", headers=AUTH)
    [notification] = answer.json()["notifications"]
    return notification


def test_the_readme_python_requests_snippet_sends_through_a_real_server(
    server_factory, monkeypatch, capsys
):
    """README "Send from your backend": five lines of Python with requests,
    reading WEBPUSH_URL and WEBPUSH_TOKEN, make a notification."""
    server = server_factory().start()
    monkeypatch.setenv("WEBPUSH_URL", server.url)
    monkeypatch.setenv("WEBPUSH_TOKEN", TOKEN)
    code = _readme_snippet("python", "Send from your backend")
    exec(code, {})  # noqa: S102 - the README's own code
    status, notification_id = capsys.readouterr().out.split()
    assert status == "202"
    notification = _the_one_notification(server)
    assert (notification["id"], notification["title"]) == (
        notification_id,
        "Deploy done",
    )


def test_the_readme_node_fetch_snippet_sends_through_a_real_server(server_factory):
    """README "Send from your backend": five lines of Node 18+ with its global
    fetch, as an ES module, make a notification."""
    if not shutil.which("node"):
        if os.environ.get("CI"):
            pytest.fail("node is missing: CI machines have it")
        pytest.skip("node is not installed")
    server = server_factory().start()
    done = subprocess.run(
        [
            "node",
            "--input-type=module",
            "-e",
            _readme_snippet("js", "Send from your backend"),
        ],
        env={**os.environ, "WEBPUSH_URL": server.url, "WEBPUSH_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    status, notification_id = done.stdout.split()
    assert status == "202"
    notification = _the_one_notification(server)
    assert (notification["id"], notification["title"]) == (
        notification_id,
        "Deploy done",
    )


RUN_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt "
    "&& .venv/bin/python api.py"
)
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt "
    "&& .venv/bin/python -m pytest"
)


def test_api_py_carries_its_requirements_for_uv_run_and_pipx_run():
    """PEP 723 metadata, read as the PEP's reference code reads it, lists
    exactly requirements.txt."""
    tomllib = pytest.importorskip("tomllib")
    text = (ROOT / "api.py").read_text()
    match = re.search(
        r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$",
        text,
    )
    assert match and match["type"] == "script"
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in match["content"].splitlines(keepends=True)
    )
    metadata = tomllib.loads(content)
    required = [
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert metadata["dependencies"] == required
    assert metadata["requires-python"] == ">=3.10"


# -- fan-out: origins, retries, faults, TLS ------------------------------------------------


def test_one_fan_out_signs_each_push_service_origin_with_its_own_audience(app):
    with PushService() as second, PushService() as third, PushService() as first:
        services = (first, second, third)
        subs = [service.subscriber() for service in services for _ in range(3)]
        for sub in subs:
            app.post_json("/subscription", sub.subscription)
        result = pushed(app, {"title": "t"})
        assert result["sent"] == 9 and result["failed"] == 0
        for service in services:
            deliveries = service.received()
            assert len(deliveries) == 3
            assert all(
                d.error is None and d.claims["aud"] == service.origin
                for d in deliveries
            )


def test_429_is_retried_after_the_retry_after_it_names(app, push_service):
    busy = push_service.subscriber(script=[(429, {"Retry-After": "1"}), 201])
    app.post_json("/subscription", busy.subscription)
    result = pushed(app, {"title": "t"})
    assert (result["sent"], result["retried"]) == (1, 1)
    first, second = push_service.received(busy)
    assert (first.status, second.status) == (429, 201)
    assert second.at - first.at >= 0.95


def test_5xx_is_retried_with_backoff_then_sent(app, push_service, settings):
    flaky = push_service.subscriber(script=[500, 503])
    app.post_json("/subscription", flaky.subscription)
    result = pushed(app, {"title": "t"})
    assert (result["sent"], result["retried"], result["failed"]) == (1, 1, 0)
    first, second, third = push_service.received(flaky)
    assert [d.status for d in (first, second, third)] == [500, 503, 201]
    backoff = settings.retry_backoff
    assert second.at - first.at >= backoff * 0.95  # RETRY_BACKOFF, then twice it
    assert third.at - second.at >= 2 * backoff * 0.95


def test_retries_wait_1_s_then_2_s_unless_retry_backoff_says_otherwise():
    backoff = api.Settings().retry_backoff
    assert [api._retry_delay(None, n, backoff) for n in (1, 2)] == [1.0, 2.0]
    assert [api._retry_delay(None, n, 0.25) for n in (1, 2)] == [0.25, 0.5]
    assert api._retry_delay("3", 1, 0.25) == 3.0  # the push service's Retry-After


def test_a_push_service_that_keeps_failing_is_reported_and_kept(
    app, push_service, store
):
    broken = push_service.subscriber(script=[500, 500, 500, 500])
    fine = push_service.subscriber()
    for sub in (broken, fine):
        app.post_json("/subscription", sub.subscription)
    result = pushed(app, {"title": "t"})
    assert (result["sent"], result["failed"]) == (1, 1)
    [failure] = result["errors"]
    assert failure["status"] == 500 and failure["origin"] == push_service.origin
    assert (failure["channel"], failure["count"]) == ("webpush", 1)
    assert len(store) == 2


def test_a_hung_push_service_times_out_and_the_rest_is_delivered(
    app_with, push_service
):
    from tests.push_service import HANG

    client = app_with(push_timeout=0.5)
    hung = push_service.subscriber(script=[HANG, HANG, HANG])
    fine = push_service.subscriber()
    for sub in (hung, fine):
        client.post_json("/subscription", sub.subscription)
    started = time.monotonic()
    result = pushed(client, {"title": "t"})
    assert time.monotonic() - started < 10
    assert (result["sent"], result["failed"]) == (1, 1)
    [failure] = result["errors"]
    assert failure["status"] is None and "no answer" in failure["reason"]
    assert failure["count"] == 1
    assert len(push_service.received(hung)) == 3  # tried, retried, given up


def test_a_slow_push_service_fills_only_its_own_slots(app_with):
    """PUSH_CONCURRENCY is per push service: one that never answers holds its
    own slots, and every other push service's messages go out at once."""
    from tests.push_service import HANG

    client = app_with(push_concurrency=4, push_timeout=2.0)
    with PushService() as hung, PushService() as healthy:
        for _ in range(8):
            sub = hung.subscriber(script=[HANG])  # then answers when retried
            client.post_json("/subscription", sub.subscription)
        for _ in range(5):
            client.post_json("/subscription", healthy.subscriber().subscription)
        answer: dict = {}
        pushing = threading.Thread(
            target=lambda: answer.update(pushed(client, {"title": "t"}))
        )
        started = time.monotonic()
        pushing.start()
        healthy.wait_for(5, timeout=1.5)  # well before the hung ones' PUSH_TIMEOUT
        assert time.monotonic() - started < 1.5
        hung.wait_for(4, timeout=1)
        time.sleep(0.3)
        assert len(hung.received()) == 4  # its limit, and no more, while it hangs
        assert time.monotonic() - started < 2  # all of that before the timeout
        pushing.join(60)
        assert (answer["sent"], answer["retried"], answer["failed"]) == (13, 8, 0)


def test_a_refused_connection_is_retried_then_reported(app):
    app.post_json("/subscription", fake_subscription(7, port=free_port()))
    result = pushed(app, {"title": "t"})
    assert (result["failed"], result["retried"]) == (1, 1)
    [failure] = result["errors"]
    assert "connect" in failure["reason"] and failure["count"] == 1


def test_push_services_are_reached_over_tls_verified_with_ssl_cert_file(
    settings, monkeypatch
):
    with PushService(tls=True) as service:
        sub = service.subscriber()
        tls_settings = api.Settings(
            **{
                **settings.__dict__,
                "push_endpoint_pattern": r"^https://127\.0\.0\.1:\d+/",
            }
        )
        untrusted = api.create_app(tls_settings)
        try:
            client = webtest.TestApp(untrusted)
            client.post_json("/subscription", sub.subscription)
            result = pushed(client, {"title": "t"})
            assert (
                result["failed"] == 1
                and "unable to get local issuer certificate"
                in result["errors"][0]["reason"]
            )
            assert result["retried"] == 0  # a certificate does not mend in a second
        finally:
            close_app(untrusted)
        monkeypatch.setenv("SSL_CERT_FILE", service.ca_file)
        trusted = api.create_app(tls_settings)
        try:
            result = pushed(webtest.TestApp(trusted), {"title": "t"})
            assert result["sent"] == 1
            assert service.received(sub)[-1].message["title"] == "t"
        finally:
            close_app(trusted)


@pytest.fixture
def front(push_service):
    """Debian's nginx on 127.0.0.1: TLS with HTTP/2 (ALPN), proxying to the
    decrypting push service stand-in, which then checks VAPID for nginx's origin."""
    made = []

    def make(**options) -> Nginx:
        for path in (NGINX, ECHO_MODULE):
            if not Path(path).exists():
                if os.environ.get("CI"):
                    pytest.fail(f"{path} is missing: CI must install nginx-light")
                pytest.skip(f"{path} is not installed (apt-get install nginx-light)")
        made.append(Nginx(upstream=push_service, **options).__enter__())
        return made[-1]

    yield make
    for nginx in made:
        nginx.__exit__(None, None, None)


def test_push_services_that_speak_http2_get_every_message_multiplexed_and_reused(
    server_factory, push_service, front
):
    nginx = front()
    server = server_factory(SSL_CERT_FILE=nginx.ca_file, PUSH_PROCESSES="1")
    server.env["PUSH_ENDPOINT_PATTERN"] = r"^https://127\.0\.0\.1:\d+/"
    server.start()
    subs = [push_service.subscriber() for _ in range(30)]
    for sub in subs:
        requests.post(server.url + "/subscription", json=sub.subscription)
    for title in ("first", "second"):
        assert server_pushed(server, {"title": title})["sent"] == 30
    log = nginx.requests(60)
    assert {entry["protocol"] for entry in log} == {"HTTP/2.0"}
    # every message of both pushes on one connection, kept between them
    assert len({entry["connection"] for entry in log}) == 1
    received = push_service.received()
    assert len(received) == 60 and all(d.error is None for d in received)
    assert {d.claims["aud"] for d in received} == {nginx.origin}
    assert (
        sorted(d.message["title"] for d in received) == ["first"] * 30 + ["second"] * 30
    )


def test_push_services_without_http2_get_kept_alive_http1_connections(
    app_with, push_service, front, monkeypatch
):
    nginx = front(http2=False)
    monkeypatch.setenv("SSL_CERT_FILE", nginx.ca_file)
    client = app_with(
        push_endpoint_pattern=r"^https://127\.0\.0\.1:\d+/", push_concurrency=4
    )
    for _ in range(20):
        client.post_json("/subscription", push_service.subscriber().subscription)
    for _ in range(2):
        assert pushed(client, {"title": "t"})["sent"] == 20
    log = nginx.requests(40)
    assert {entry["protocol"] for entry in log} == {"HTTP/1.1"}
    assert len({entry["connection"] for entry in log}) <= 4  # PUSH_CONCURRENCY
    assert all(d.error is None for d in push_service.received())


def test_https_proxy_carries_pushes_and_no_proxy_bypasses_it(
    app_with, push_service, front, monkeypatch
):
    nginx = front()
    monkeypatch.setenv("SSL_CERT_FILE", nginx.ca_file)
    sub = push_service.subscriber()
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        through = app_with(push_endpoint_pattern=r"^https://127\.0\.0\.1:\d+/")
        through.post_json("/subscription", sub.subscription)
        assert pushed(through, {"title": "a"})["sent"] == 1
        assert proxy.tunnels == [f"127.0.0.1:{nginx.port}"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # libcurl reads it per transfer
        assert pushed(through, {"title": "b"})["sent"] == 1
        assert len(proxy.tunnels) == 1
    assert [d.message["title"] for d in push_service.received(sub)] == ["a", "b"]


def test_encryption_is_pywebpush_s_own_and_fills_one_4096_byte_record(push_service):
    from pywebpush import WebPusher

    sub = push_service.subscriber()
    record = sub.subscription
    plaintext = json.dumps({"title": "é", "body": "x" * 3000}).encode()
    ours = api.encrypt_message(record, plaintext)
    theirs = WebPusher(record).encode(plaintext)["body"]
    assert sub.decrypt(ours) == sub.decrypt(theirs) == plaintext
    assert len(ours) == len(theirs)
    largest = api.encrypt_message(record, b"x" * api.MAX_PLAINTEXT)
    assert len(largest) == 4096 and sub.decrypt(largest) == b"x" * api.MAX_PLAINTEXT


def push_under_way(
    server: Server, slow: PushService, browsers: int
) -> tuple[threading.Thread, dict]:
    """Subscribe ``browsers`` on a slow push service, start a push to them in the
    background, waiting for its delivery to end (``Prefer: wait``), and return
    once the fan-out has begun: (its thread, its answer: the JSON, with the
    HTTP status as ``http_status``)."""
    for _ in range(browsers):
        requests.post(server.url + "/subscription", json=slow.subscriber().subscription)
    answer: dict = {}

    def push() -> None:
        response = requests.post(
            server.url + "/push", json={"title": "t"}, headers=WAIT
        )
        answer.update(response.json(), http_status=response.status_code)

    pushing = threading.Thread(target=push)
    pushing.start()
    slow.wait_for(2)
    return pushing, answer


def test_health_answers_while_a_fan_out_is_under_way(server_factory, backend_env):
    with PushService(latency=0.5) as slow:  # 16 at 4 at a time: 2 s
        server = server_factory(
            PUSH_CONCURRENCY="4", PUSH_PROCESSES="2", **backend_env
        ).start()
        pushing, result = push_under_way(server, slow, 16)
        health = requests.get(server.url + "/health", timeout=5)
        assert health.json()["status"] == "ok"
        assert pushing.is_alive()  # answered before the push ended
        pushing.join(30)
        assert result["http_status"] == 200 and result["sent"] == 16


# -- native apps through FCM -------------------------------------------------------------


def test_fcm_tokens_are_refused_with_a_how_to_when_fcm_is_not_configured(
    app, unchanged
):
    response = app.post_json(
        "/subscription", {"fcm_token": device_token(1)}, status=400
    )
    assert "FCM_SERVICE_ACCOUNT" in response.json["error"] and unchanged()


def test_fcm_tokens_register_once_and_delete(fcm_app):
    token = device_token(1)
    first = fcm_app.post_json("/subscription", {"fcm_token": token, "topics": ["news"]})
    assert first.status_int == 201
    assert fcm_app.post_json("/subscription", {"fcm_token": token}).json == first.json
    health = fcm_app.get("/health").json
    assert (health["fcm_tokens"], health["subscriptions"]) == (1, 0)
    assert fcm_app.delete_json("/subscription", {"fcm_token": token}).status_int == 204
    fcm_app.delete_json("/subscription", {"fcm_token": token}, status=404)
    assert fcm_app.get("/health").json["fcm_tokens"] == 0


def test_a_refreshed_fcm_token_replaces_the_old_one_and_keeps_its_topics(
    fcm_app, push_service
):
    old, new = device_token(1), device_token(2)
    fcm_app.post_json("/subscription", {"fcm_token": old, "topics": ["news"]})
    fcm_app.post_json("/subscription", {"fcm_token": new, "replaces": old})
    topics = json.loads(fcm_app.get("/topics", headers=AUTH).text)
    assert topics == [{"topic": "news", "subscriptions": 1}]
    assert fcm_app.get("/health").json["fcm_tokens"] == 1
    fcm_app.delete_json("/subscription", {"fcm_token": old}, status=404)


def test_an_fcm_token_never_replaces_a_web_push_subscription(fcm_app, push_service):
    browser = push_service.subscriber().subscription
    fcm_app.post_json("/subscription", {**browser, "topics": ["news"]})
    fcm_app.post_json(
        "/subscription",
        {"fcm_token": device_token(3), "replaces": browser["endpoint"]},
        status=400,
    )
    fcm_app.post_json("/subscription", {"fcm_token": device_token(4)})
    health = fcm_app.get("/health").json
    assert (health["subscriptions"], health["fcm_tokens"]) == (1, 1)


@pytest.mark.parametrize(
    "token", ["", "has space", "x" * 4097, 12], ids=["empty", "space", "long", "number"]
)
def test_bad_fcm_tokens_get_a_400(fcm_app, token):
    assert fcm_app.post_json("/subscription", {"fcm_token": token}, status=400).json[
        "error"
    ]
    assert fcm_app.get("/health").json["fcm_tokens"] == 0


def test_push_reaches_browsers_and_fcm_tokens_with_the_fields_mapped(
    fcm_app, fcm, push_service
):
    browser = push_service.subscriber()
    tokens = [device_token(n) for n in range(20)]
    fcm_app.post_json("/subscription", browser.subscription)
    for token in tokens:
        fcm_app.post_json("/subscription", {"fcm_token": token})
    body = {
        "title": "Deploy",
        "body": "v2 is live",
        "icon": "https://site.test/i.png",
        "url": "https://site.test/v2",
        "data": {"build": 42, "ok": True, "who": "ci"},
        "ttl": 60,
        "urgency": "high",
        "collapse_key": "deploys",
    }
    result = pushed(fcm_app, body)
    assert (result["sent"], result["failed"]) == (21, 0)
    assert (
        result["channels"]["webpush"]["sent"] == 1
        and result["channels"]["fcm"]["sent"] == 20
    )
    assert {m.token for m in fcm.received()} == set(tokens)
    message = fcm.received(tokens[0])[0].message
    assert message["notification"] == {
        "title": "Deploy",
        "body": "v2 is live",
        "image": "https://site.test/i.png",
    }
    assert message["data"] == {
        "build": "42",
        "ok": "true",
        "who": "ci",
        "url": "https://site.test/v2",
        "id": result["id"],  # and the token's receipt, as in web push messages
        "receipt": api.receipt(
            fcm_app.app.config["webpush.receipt_key"],
            result["id"],
            api.subscription_id("fcm:" + tokens[0]),
        ),
    }
    assert message["android"] == {
        "ttl": "60s",
        "priority": "HIGH",
        "collapse_key": "deploys",
    }
    apns = message["apns"]["headers"]
    assert (apns["apns-priority"], apns["apns-collapse-id"]) == ("10", "deploys")
    assert 0 < int(apns["apns-expiration"]) - time.time() <= 60
    assert push_service.received(browser)[0].message["title"] == "Deploy"


def test_a_topic_push_reaches_only_the_tokens_on_that_topic(fcm_app, fcm):
    news, other = device_token(1), device_token(2)
    fcm_app.post_json("/subscription", {"fcm_token": news, "topics": ["news"]})
    fcm_app.post_json("/subscription", {"fcm_token": other})
    assert pushed(fcm_app, {"title": "t", "topic": "news"})["sent"] == 1
    assert [m.token for m in fcm.received()] == [news]


def test_unregistered_and_invalid_tokens_are_removed(fcm_app, fcm):
    from tests.fcm_service import INVALID_TOKEN, UNREGISTERED

    gone, invalid, fine = device_token(1), device_token(2), device_token(3)
    fcm.script(gone, UNREGISTERED)
    fcm.script(invalid, INVALID_TOKEN)
    for token in (gone, invalid, fine):
        fcm_app.post_json("/subscription", {"fcm_token": token})
    result = pushed(fcm_app, {"title": "t"})
    assert (result["sent"], result["removed"]) == (1, 2)
    assert fcm_app.get("/health").json["fcm_tokens"] == 1


def test_fcm_429_and_5xx_are_retried_honouring_retry_after(fcm_app, fcm):
    busy, flaky = device_token(1), device_token(2)
    fcm.script(busy, (429, {"error": {"code": 429}}, {"Retry-After": "1"}))
    fcm.script(flaky, 503)
    for token in (busy, flaky):
        fcm_app.post_json("/subscription", {"fcm_token": token})
    result = pushed(fcm_app, {"title": "t"})
    assert (result["sent"], result["retried"], result["failed"]) == (2, 2, 0)
    first, second = fcm.received(busy)
    assert (first.status, second.status) == (429, 200) and second.at - first.at >= 0.95
    assert [m.status for m in fcm.received(flaky)] == [503, 200]


@pytest.mark.parametrize("status", [401, 403])
def test_fcm_auth_refusals_fail_loudly_and_keep_the_token(fcm_app, fcm, status, caplog):
    token = device_token(1)
    fcm.script(token, status)
    fcm_app.post_json("/subscription", {"fcm_token": token})
    result = pushed(fcm_app, {"title": "t"})
    assert (result["failed"], result["removed"]) == (1, 0)
    assert fcm_app.get("/health").json["fcm_tokens"] == 1
    assert "FCM refused the service account" in caplog.text


def test_a_service_account_with_the_wrong_key_fails_without_removing(
    app_with, fcm, tmp_path, caplog
):
    from cryptography.hazmat.primitives.asymmetric import rsa

    account = fcm.service_account(tmp_path / "service-account.json")
    fcm.key = rsa.generate_private_key(
        public_exponent=65537, key_size=2048
    )  # Google's view changes
    client = app_with(fcm_service_account=str(account), fcm_api_url=fcm.url)
    client.post_json("/subscription", {"fcm_token": device_token(1)})
    result = pushed(client, {"title": "t"})
    assert (result["failed"], result["removed"]) == (1, 0)
    assert fcm.refused_assertions >= 1 and fcm.received() == []
    [failure] = result["errors"]
    assert failure["channel"] == "fcm" and "access token" in failure["reason"]


def test_the_server_process_sends_to_fcm_when_configured(
    server_factory, backend_env, fcm, tmp_path
):
    account = fcm.service_account(tmp_path / "service-account.json")
    server = server_factory(
        FCM_SERVICE_ACCOUNT=str(account), FCM_API_URL=fcm.url, **backend_env
    ).start()
    token = device_token(1)
    assert (
        requests.post(
            server.url + "/subscription", json={"fcm_token": token}
        ).status_code
        == 201
    )
    result = server_pushed(server, {"title": "hi"})
    assert result["channels"]["fcm"]["sent"] == 1
    assert fcm.received(token)[0].message["notification"]["title"] == "hi"


def test_a_bad_service_account_file_stops_the_start(server_factory, tmp_path):
    (tmp_path / "broken.json").write_text("{}")
    server = server_factory(FCM_SERVICE_ACCOUNT=str(tmp_path / "broken.json")).start(
        wait=False
    )
    assert server.proc.wait(15) == 2
    assert "FCM_SERVICE_ACCOUNT" in server.output()
    assert "Traceback" not in server.output()


# -- hardening: hostile input, limits, faults, crashes, secrets, shutdown ----------------


# Text as attackers write it: lone surrogates, characters outside the BMP,
# look-alikes that case-fold into ASCII, controls and a trailing newline.
HOSTILE_TEXT = st.text(
    alphabet=st.sampled_from(
        ["\ud800", "\udfff", "\U0001f600", "\u212a", "\u0130", "\x00", "\n", "a"]
    )
    | st.characters(),
    max_size=30,
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | HOSTILE_TEXT,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
# Bodies shaped like the real ones, with every value hostile, reach deeper than random JSON.
SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "endpoint": JSON | st.sampled_from(ALLOWED + REFUSED),
        "keys": JSON
        | st.fixed_dictionaries(
            {}, optional={"p256dh": JSON | st.text(), "auth": JSON}
        ),
        "topics": JSON | st.lists(st.text(max_size=70), max_size=25),
        "subscription_token": JSON | st.text(),
        "fcm_token": JSON,
        "replaces": JSON | st.sampled_from(ALLOWED),
        "expirationTime": JSON,
        "title": JSON,
        "body": JSON,
        "ttl": JSON,
        "urgency": JSON,
        "collapse_key": JSON,
        "topic": JSON,
        "data": JSON,
    },
)
HOSTS = st.sampled_from(
    ["fcm.googleapis.com", "FCM.GoogleAPIs.com", "\u212a.push.services.mozilla.com"]
)
PORTS = st.sampled_from(["", ":", ":443", ":0443", ":0", ":99999", ":+443", ": 443"])
ENDPOINTS = st.builds(lambda h, p: f"https://{h}{p}/fcm/send/x", HOSTS, PORTS)


def _hostile_bodies(value: str) -> list[bytes]:
    """Bodies carrying ``value`` where a JSON library would never write it."""
    token = json.dumps(VALID)[:-1] + ', "x": ' + value + "}"
    return [
        b'{"endpoint": "http://127.0.0.1:9/x", "expirationTime": %s}' % value.encode(),
        b'{"title": "t", "ttl": %s}' % value.encode(),
        b'{"subscription_token": %s}' % json.dumps(token).encode(),
        b'{"data": %s, "title": "t"}' % value.encode(),
    ]


# Non-finite numbers, and nesting deeper than any parser's stack, as a value or
# inside the subscription_token string.
RAW_HOSTILE = st.sampled_from(
    ["1e999", "-1e999", "NaN", "Infinity", "[" * 50_000 + "]" * 50_000]
).flatmap(lambda value: st.sampled_from(_hostile_bodies(value)))
# Misspellings of the real field names, as people make them: a letter
# dropped, added, swapped with the next or in the other case.
FIELD_NAMES = sorted(
    {
        *api.PUSH_FIELDS,
        *api.PUSH_SUBSCRIPTION_FIELDS,
        *api.SUBSCRIPTION_TOKEN_FIELDS,
        *api.FCM_TOKEN_FIELDS,
        *api.UNSUBSCRIBE_FIELDS,
        *api.RECEIPT_FIELDS,
    }
)


def _misspelt(name: str, edit: str, at: int, letter: str) -> str:
    at %= len(name)
    if edit == "drop":
        return name[:at] + name[at + 1 :]
    if edit == "add":
        return name[:at] + letter + name[at:]
    if edit == "swap":
        return name[:at] + name[at + 1 : at + 2] + name[at] + name[at + 2 :]
    return name[:at] + name[at].swapcase() + name[at + 1 :]


MISSPELT = st.builds(
    _misspelt,
    st.sampled_from(FIELD_NAMES),
    st.sampled_from(["drop", "add", "swap", "case"]),
    st.integers(0, 40),
    st.sampled_from("aeiost_-"),
)
ROUTES = [
    ("POST", "/subscription"),
    ("DELETE", "/subscription"),
    ("POST", "/subscription/test"),
    ("POST", "/push"),
    ("GET", "/health"),
    ("GET", "/subscription"),
]


@hypothesis_settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    route=st.sampled_from(ROUTES),
    body=st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | SHAPED.map(lambda v: json.dumps(v).encode())
    | ENDPOINTS.map(lambda e: json.dumps({"endpoint": e, "keys": KEYS}).encode())
    | st.tuples(MISSPELT, JSON, SHAPED).map(
        lambda t: json.dumps({t[0]: t[1], **t[2]}).encode()
    )
    | RAW_HOSTILE,
)
def test_fuzzed_requests_never_give_a_5xx_or_store_anything(app, settings, route, body):
    method, path = route
    store = app.app.config["webpush.store"]
    response = app.request(
        path, method=method, body=body, headers=AUTH, expect_errors=True
    )
    assert response.status_int < 500, response.body
    if response.status_int >= 400:
        assert isinstance(response.json["error"], str)
    assert len(store) == 0 and store.ids() == []
    assert [store.count(kind) for kind in api.CHANNELS] == [0, 0]
    path = Path(settings.subscriptions_file)
    assert not path.exists() or path.stat().st_size == 0
    assert app.get("/health").json["status"] == "ok"


# The fields each route with a body takes: a misspelling that spells one of
# them is no misspelling there.
SUBSCRIPTION = {*api.PUSH_SUBSCRIPTION_FIELDS, *api.SUBSCRIPTION_TOKEN_FIELDS}
BODY_FIELDS = {
    ("POST", "/subscription"): {*SUBSCRIPTION, *api.FCM_TOKEN_FIELDS},
    ("DELETE", "/subscription"): set(api.UNSUBSCRIBE_FIELDS),
    ("POST", "/subscription/test"): SUBSCRIPTION,
    ("POST", "/push"): set(api.PUSH_FIELDS),
    ("POST", "/notifications/AAAAAAAAAAAAAAAA/events"): set(api.RECEIPT_FIELDS),
}


def _stored_but_rate_limits(settings: api.Settings) -> dict:
    """stored_state, less the rate limiter's buckets in Redis: a refused
    receipt still takes a token from its client's."""
    buckets = settings.redis_prefix.encode() + b"rate:"
    return {
        key: value
        for key, value in stored_state(settings).items()
        if not (isinstance(key, bytes) and key.startswith(buckets))
    }


@hypothesis_settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    route=st.sampled_from(sorted(BODY_FIELDS)),
    misspelt=MISSPELT,
    value=JSON,
    rest=SHAPED | st.just(VALID) | st.just({"title": "t"}),
)
def test_fuzzed_bodies_with_a_misspelt_field_get_a_400_naming_it_and_change_nothing(
    app, settings, route, misspelt, value, rest
):
    assume(misspelt not in BODY_FIELDS[route])
    method, path = route
    try:  # no Infinity: that is refused before the names are read
        text = json.dumps(
            {misspelt: value, **rest}, allow_nan=False, ensure_ascii=False
        )
        body = text.encode()  # nor a lone surrogate
    except ValueError:
        assume(False)
    app.post_json("/subscription", VALID)  # someone a push would reach
    before = _stored_but_rate_limits(settings)
    response = app.request(
        path, method=method, body=body, headers=AUTH, expect_errors=True
    )
    assert response.status_int == 400, response.body
    assert response.json["error"].startswith(f"unknown field {json.dumps(misspelt)};")
    assert _stored_but_rate_limits(settings) == before
    assert app.get("/notifications", headers=AUTH).json["notifications"] == []


SURROGATE = "\ud800"
DEEP = "[" * 15_000 + "]" * 15_000  # within MAX_BODY_BYTES, past any stack
HOSTILE = {
    "lone surrogate in the endpoint": (
        "POST",
        "/subscription",
        {**VALID, "endpoint": VALID["endpoint"] + SURROGATE},
    ),
    "lone surrogate in replaces": (
        "POST",
        "/subscription",
        {**fake_subscription(7), "replaces": SURROGATE},
    ),
    "lone surrogate in a topic": (
        "POST",
        "/subscription",
        {**fake_subscription(7), "topics": ["a" + SURROGATE]},
    ),
    "lone surrogate in a key": (
        "POST",
        "/subscription",
        {**VALID, "keys": {**KEYS, "auth": SURROGATE}},
    ),
    "lone surrogate in the title": ("POST", "/push", {"title": SURROGATE}),
    "lone surrogate in the data": (
        "POST",
        "/push",
        {"title": "t", "data": [SURROGATE]},
    ),
    "lone surrogate in the DELETE body": (
        "DELETE",
        "/subscription",
        {"endpoint": SURROGATE},
    ),
    "lone surrogate in a test notification": (
        "POST",
        "/subscription/test",
        {**VALID, "endpoint": SURROGATE},
    ),
    "deep nesting in subscription_token": (
        "POST",
        "/subscription",
        {"subscription_token": DEEP},
    ),
    "deep nesting in the body": ("POST", "/push", DEEP.encode()),
    "NaN in subscription_token": (
        "POST",
        "/subscription",
        {"subscription_token": json.dumps(VALID)[:-1] + ', "expirationTime": NaN}'},
    ),
    "expirationTime 1e999": (
        "POST",
        "/subscription",
        json.dumps(fake_subscription(7))
        .replace('"expirationTime": null', '"expirationTime": 1e999')
        .encode(),
    ),
    "ttl 1e999": ("POST", "/push", b'{"title": "t", "ttl": 1e999}'),
    "a topic with a trailing newline": (
        "POST",
        "/subscription",
        {**fake_subscription(7), "topics": ["news\n"]},
    ),
    "a push topic with a trailing newline": (
        "POST",
        "/push",
        {"title": "t", "topic": "news\n"},
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_surrogates_nesting_and_non_finite_numbers_get_a_400_and_change_nothing(
    app, unchanged, push_service, case
):
    method, path, body = HOSTILE[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = app.request(
        path,
        method=method,
        body=data,
        headers={"Content-Type": "application/json", **AUTH},
        expect_errors=True,
    )
    assert answer.status_int == 400, answer.body
    assert isinstance(answer.json["error"], str)
    assert unchanged()
    assert push_service.received() == []


def nested(depth: int, inner: str = "1") -> str:
    return '{"a": ' * depth + inner + "}" * depth


def test_bodies_nest_at_most_100_deep_and_brackets_in_strings_do_not_count():
    assert not api.json_depth_exceeds(nested(100))
    assert api.json_depth_exceeds(nested(101))
    assert not api.json_depth_exceeds("[" * 99 + '"[[[{{{"' + "]" * 99)
    assert not api.json_depth_exceeds(json.dumps(["[{" * 500, '\\"[' * 500]))
    assert not api.json_depth_exceeds(json.dumps([[1]] * 5000))  # wide, not deep
    with pytest.raises(api.ApiError, match="nested at most 100 deep"):
        api.strict_json(nested(101), "the body")
    assert api.strict_json(nested(100), "the body")["a"]["a"]


def test_a_push_whose_data_nests_100_deep_is_sent(app, push_service):
    app.post_json("/subscription", push_service.subscriber().subscription)
    body = '{"title": "deep", "data": ' + nested(99) + "}"
    headers = {**AUTH, "Content-Type": "application/json"}
    assert app.post("/push", body, headers=headers).status_int == 202
    message = push_service.wait_for(1)[0].message
    assert message["data"] == json.loads(nested(99))


def test_a_generic_webhook_with_a_lone_surrogate_gets_a_400(hook_app, push_service):
    body = json.dumps({"title": SURROGATE}).encode()
    answer = hook_app.post(
        "/webhooks/generic",
        body,
        headers={"X-Signature-256": sign(body)},
        expect_errors=True,
    )
    assert answer.status_int == 400 and "error" in answer.json


@pytest.mark.parametrize(
    "spelling",
    [
        "https://FCM.GoogleAPIs.com/fcm/send/x",
        "HTTPS://fcm.googleapis.com/fcm/send/x",
        "https://fcm.googleapis.com:443/fcm/send/x",
        "https://fcm.googleapis.com:0443/fcm/send/x",
        "https://fcm.googleapis.com:/fcm/send/x",
    ],
)
def test_endpoints_are_stored_signed_and_found_in_their_canonical_form(
    app_with, spelling
):
    client = app_with(push_endpoint_pattern="")  # the built-in allowlist
    store = client.app.config["webpush.store"]
    canonical = "https://fcm.googleapis.com/fcm/send/x"
    first = client.post_json("/subscription", {**VALID, "endpoint": canonical})
    again = client.post_json("/subscription", {**VALID, "endpoint": spelling})
    assert (first.status_int, again.status_int) == (201, 200)
    assert first.json["id"] == again.json["id"]
    assert [r["endpoint"] for r in store.list()] == [canonical]
    assert (
        api.endpoint_origin(store.list()[0]["endpoint"]) == "https://fcm.googleapis.com"
    )
    client.request(
        "/subscription",
        method="DELETE",
        body=json.dumps({"endpoint": spelling}).encode(),
        headers={"Content-Type": "application/json"},
        status=204,
    )
    assert len(store) == 0


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://\u212a.push.services.mozilla.com/wpush/v2/x",  # Kelvin sign
        "https://fcm.googleapis.com:0/fcm/send/x",
        "https://fcm.googleapis.com:8443/fcm/send/x",
        "https://fcm.googleapis.com:+443/fcm/send/x",
        "https://fcm.googleapis.com: 443/fcm/send/x",
    ],
)
def test_look_alike_hosts_and_other_ports_are_refused(app_with, endpoint):
    client = app_with(push_endpoint_pattern="")
    client.post_json("/subscription", {**VALID, "endpoint": endpoint}, status=400)
    assert len(client.app.config["webpush.store"]) == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://142.250.185.10/fcm/send/x",
        "https://[2a00:1450:4001::200a]/x",
        "https://xn--fcm-googleapis-0ub.com/x",
        "https://fcm.googleapis.c\u03bfm/x",
        "https://web.push.apple.com:443@evil.test/x",
        "https://web.push.apple.com%2eevil.test/x",
        "HTTPS://EVIL.TEST/web.push.apple.com",
        "https://fcm.googleapis.com#@evil.test/",
    ],
)
def test_the_allowlist_refuses_literals_and_look_alikes(url):
    assert not api.endpoint_allowed(url)


def test_rate_limit_counts_subscription_writes_per_client(app_with):
    application = app_with(rate_limit=3).app  # one app, several clients
    client = webtest.TestApp(application, extra_environ={"REMOTE_ADDR": "203.0.113.7"})
    for n in range(3):
        client.post_json("/subscription", fake_subscription(n))
    refused = client.post_json("/subscription", fake_subscription(9), status=429)
    assert (
        int(refused.headers["Retry-After"]) >= 1
        and "203.0.113.7" in refused.json["error"]
    )
    assert len(application.config["webpush.store"]) == 3
    forged = {"X-Forwarded-For": "198.51.100.1"}  # the peer is no trusted proxy
    client.post_json("/subscription", fake_subscription(9), headers=forged, status=429)
    other = webtest.TestApp(application, extra_environ={"REMOTE_ADDR": "203.0.113.8"})
    other.post_json("/subscription", fake_subscription(9))
    assert client.get("/health").status_int == 200  # reads are not limited


def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(app_with):
    proxy = app_with(rate_limit=1, trusted_proxies="10.0.0.2")
    proxy.extra_environ["REMOTE_ADDR"] = "10.0.0.2"
    first = {"X-Forwarded-For": "forged, 198.51.100.1"}
    proxy.post_json("/subscription", fake_subscription(1), headers=first)
    proxy.post_json("/subscription", fake_subscription(2), headers=first, status=429)
    second = {"X-Forwarded-For": "forged, 198.51.100.2"}
    proxy.post_json("/subscription", fake_subscription(2), headers=second)


@pytest.mark.parametrize("trusted", [True, False])
def test_trusted_proxies_works_in_a_real_server_process(server_factory, trusted):
    """waitress itself drops X-Forwarded-For unless told not to."""
    env = {"RATE_LIMIT": "5"}
    if trusted:
        env["TRUSTED_PROXIES"] = "127.0.0.1"  # the test client is the proxy
    server = server_factory(**env).start()
    answers = [
        requests.post(
            server.url + "/subscription",
            json=fake_subscription(n),
            headers={"X-Forwarded-For": f"198.51.100.{n}"},
        ).status_code
        for n in range(20)
    ]
    if trusted:  # twenty clients, one write each
        assert answers == [201] * 20
    else:  # one client, the proxy, forging nothing
        assert answers == [201] * 5 + [429] * 15


def test_max_subscriptions_caps_new_ones_but_not_updates(app_with):
    client = app_with(max_subscriptions=2)
    for n in range(2):
        client.post_json("/subscription", fake_subscription(n))
    assert (
        "MAX_SUBSCRIPTIONS"
        in client.post_json("/subscription", fake_subscription(5), status=429).json[
            "error"
        ]
    )
    assert (
        client.post_json(
            "/subscription", {**fake_subscription(1), "topics": ["a"]}
        ).status_int
        == 200
    )
    assert len(client.app.config["webpush.store"]) == 2


def test_faulty_push_services_fail_each_message_within_the_time_bound(
    app_with, push_service, settings
):
    from tests.push_service import HANG, HUGE, MALFORMED, RESET, SLOW_BODY

    client = app_with(push_timeout=0.5)
    faulty = {
        # A service that keeps failing. libcurl itself tries a reset connection
        # again, fresh, within one try of ours: hence more answers than tries.
        fault: push_service.subscriber(script=[fault] * 30)
        for fault in (HANG, MALFORMED, RESET, SLOW_BODY, HUGE)
    }
    storm = [push_service.subscriber(script=[500, 503, 502]) for _ in range(20)]
    fine = push_service.subscriber()
    for sub in [*faulty.values(), *storm, fine]:
        client.post_json("/subscription", sub.subscription)
    started = time.monotonic()
    result = pushed(client, {"title": "t"})
    # bound: 3 tries of PUSH_TIMEOUT each and the pauses between them
    # (RETRY_BACKOFF, then twice it), with 2 s to spare
    assert time.monotonic() - started < 3 * 0.5 + 3 * settings.retry_backoff + 2
    assert (result["sent"], result["failed"], result["removed"]) == (1, 25, 0)

    def failed_with(words: str) -> int:
        return sum(e["count"] for e in result["errors"] if words in e["reason"])

    # one cause each; the storm's 20 fail with the 5xx of their last try
    assert failed_with("no answer") == 2  # HANG and SLOW_BODY
    assert failed_with("malformed") == 1  # MALFORMED
    assert failed_with("closed") == 1  # RESET
    assert failed_with("too large") == 1  # HUGE
    assert sum(e["count"] for e in result["errors"]) == 25
    assert len(push_service.received(faulty[HUGE])) == 1  # not retried
    assert len(client.app.config["webpush.store"]) == 26  # failures are kept


def test_repair_store_keeps_the_valid_records_and_sets_the_damage_aside(
    tmp_path, server_factory
):
    """JSON only: --repair-store mends a damaged store file; a Redis store has
    no lines to damage."""
    damaged_store(tmp_path / "subscriptions.json", 4, b'{"id": "cut sh')
    server = server_factory().start(wait=False)
    assert server.proc.wait(15) != 0 and "--repair-store" in server.output()
    repair = subprocess.run(
        [sys.executable, str(ROOT / "api.py"), "--repair-store"],
        check=False,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert repair.returncode == 0, repair.stderr
    [side] = tmp_path.glob("subscriptions.json.damaged-*")
    assert side.read_bytes() == b'{"id": "cut sh\n'
    assert stat.S_IMODE(side.stat().st_mode) == 0o600  # it may hold auth secrets
    server.start()
    assert requests.get(server.url + "/health").json()["subscriptions"] == 3


def test_static_files_never_follow_a_symlink_out_of_static(app, tmp_path, monkeypatch):
    static = tmp_path / "static"
    static.mkdir()
    (static / "ok.txt").write_text("fine")
    secret = tmp_path / "vapid" / "private_key.pem"
    (static / "key.txt").symlink_to(secret)
    (static / "vapid").symlink_to(secret.parent, target_is_directory=True)
    monkeypatch.setattr(api, "STATIC_DIR", static)
    assert app.get("/static/ok.txt").text == "fine"
    for path in (
        "/static/key.txt",
        "/static/vapid/private_key.pem",
        "/static/%2e%2e/vapid/private_key.pem",
    ):
        assert b"PRIVATE KEY" not in app.get(path, status=404).body


def test_secrets_never_reach_the_log(server_factory, backend_env, push_service):
    token = "Zq9Xw7" + "v" * 26  # no part of it may be logged, not even a prefix
    server = server_factory(LOG_LEVEL="DEBUG", PUSH_TOKEN=token, **backend_env).start()
    sub = push_service.subscriber()
    requests.post(server.url + "/subscription", json=sub.subscription)
    server_pushed(
        server,
        {"title": "t"},
        headers={"Authorization": f"Bearer {token}", "Prefer": "wait=60"},
    )
    requests.post(
        server.url + "/push",
        json={"title": "t"},
        headers={"Authorization": "Bearer nope"},
    )
    server.stop()
    log_text = server.output()
    key = (Path(server.env["VAPID_DIR"]) / "private_key.pem").read_text()
    body = "".join(key.splitlines()[1:-1])
    assert token[:4] not in log_text and body[:40] not in log_text
    assert sub.subscription["keys"]["auth"] not in log_text


def test_sigterm_lets_messages_in_flight_finish_keeps_the_store_whole_and_resumes_later(
    server_factory, backend_env, tmp_path
):
    with PushService(latency=1.0) as slow:
        server = server_factory(PUSH_CONCURRENCY="4", **backend_env).start()
        pushing, result = push_under_way(server, slow, 8)
        server.proc.send_signal(signal.SIGTERM)
        pushing.join(30)
        # the push under way is answered, not cut off: its notification goes on
        assert result["http_status"] == 202 and result["status"] == "sending"
        assert server.proc.wait(30) == 0
        assert "stopped" in server.output()
        with subscription_store(backend_env, tmp_path) as store:
            assert len(store) == 8
        server.start()
        finished = wait_status(server, result["id"])
        assert (finished["status"], finished["sent"], finished["failed"]) == (
            "done",
            8,
            0,
        )
        # what was in flight at the stop was recorded: nobody gets it twice
        received = [d.subscriber for d in slow.received()]
        assert len(received) == len(set(received)) == 8


def _wait_until_serving(url: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, "the server exited"
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(url + "/health", timeout=1).ok:
                return
        time.sleep(0.05)
    raise TimeoutError("the server did not start")


def test_while_draining_new_requests_get_the_json_503(server_factory, backend_env):
    with PushService(latency=1.0) as slow:
        server = server_factory(PUSH_CONCURRENCY="4", **backend_env).start()
        pushing, result = push_under_way(server, slow, 4)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (refused := requests.get(server.url + "/health", timeout=5)).ok:
            assert time.monotonic() < deadline, "still serving"
            time.sleep(0.02)
        assert refused.status_code == 503
        assert refused.headers["Content-Type"] == "application/json"
        assert "shutting down" in refused.json()["error"]
        pushing.join(30)
        assert result["http_status"] == 202  # answered at the stop, not cut off
        assert server.proc.wait(30) == 0
        # the messages in flight were let finish and recorded: after a restart,
        # the rest is sent, and nobody gets it twice
        server.start()
        assert wait_status(server, result["id"])["sent"] == 4
        received = [d.subscriber for d in slow.received()]
        assert len(received) == len(set(received)) == 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_server_started_in_the_background_by_a_script_stops_on_a_signal(
    tmp_path, sig
):
    """`sh -c 'python api.py &'` starts it with SIGINT ignored."""
    server = Server(tmp_path)
    started = subprocess.run(
        [
            "sh",
            "-c",
            f'"{sys.executable}" "{ROOT / "api.py"}" >"{server.log}" 2>&1 & echo $!',
        ],
        env=server.env,
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(started.stdout)
    try:
        _wait_until_serving(server.url)
        os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), server.output()
        assert "stopped" in server.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _live_in_group(group: int) -> list[int]:
    """Processes of a process group that have not exited (zombies have)."""
    live = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                live.append(int(stat_file.parent.name))
    return live


def _delivery_processes(pid: int, count: int) -> list[int]:
    """The delivery processes of the server ``pid``, once it has ``count``
    of them up: its live children that run ``api.py --delivery-process`` and
    have got as far as ignoring SIGINT (the server decides when they stop)."""
    deadline = time.monotonic() + 15
    while True:
        workers = []
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{child}/cmdline").read_bytes()
                status = Path(f"/proc/{child}/status").read_text()
                ignored = int(re.search(r"SigIgn:\s*(\w+)", status)[1], 16)
                if (
                    b"--delivery-process" in command
                    and "State:\tZ" not in status
                    and ignored & 1 << (signal.SIGINT - 1)
                ):
                    workers.append(int(child))
        if len(workers) == count:
            return workers
        assert time.monotonic() < deadline, f"{len(workers)} delivery processes"
        time.sleep(0.02)


def test_ctrl_c_stops_every_process_without_a_traceback(tmp_path):
    server = Server(tmp_path, PUSH_PROCESSES="2")
    with open(server.log, "wb") as log:
        proc = subprocess.Popen(  # its own process group, as a terminal gives it
            [sys.executable, str(ROOT / "api.py")],
            env=server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_serving(server.url, proc)
        _delivery_processes(proc.pid, 2)  # they are up, and get the SIGINT too
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole group
        assert proc.wait(15) == 0
        deadline = time.monotonic() + 5
        while _live_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _live_in_group(proc.pid) == []  # no delivery process is left
        output = server.output()  # all of it: every writer has exited
        assert "Traceback" not in output and "KeyboardInterrupt" not in output
        assert "stopped" in output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_delivery_process_killed_while_idle_is_replaced_without_a_500(
    server_factory, backend_env, push_service
):
    server = server_factory(PUSH_PROCESSES="2", **backend_env).start()
    sub = push_service.subscriber()
    requests.post(server.url + "/subscription", json=sub.subscription)
    workers = _delivery_processes(server.proc.pid, 2)
    os.kill(workers[0], signal.SIGKILL)
    _delivery_processes(server.proc.pid, 1)  # dead: the server sees its socket close
    answers = [
        requests.post(server.url + "/push", json={"title": "t"}, headers=WAIT)
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[-1].json()["sent"] == 1  # the new processes deliver
    assert "a delivery process stopped; starting a new one" in server.output()


def test_work_submitted_after_the_delivery_loop_stopped_comes_back_unsent_at_once(
    json_settings,
):
    keys = api.VapidKeys.load_or_create(json_settings)
    delivery = api.WebPushDelivery(keys, 10, 1.0)
    delivery.close()
    record = {**fake_subscription(1), "id": "x"}
    message = api.Message({"title": "t"}, b"{}", 60)
    [outcome] = delivery.submit([record], message).result(timeout=1)
    assert outcome.result == "unsent"  # handed out again at the next start
    delivery.close()  # twice is fine


def test_sigterm_stops_within_shutdown_timeout_whatever_is_being_delivered(
    server_factory, backend_env
):
    from tests.push_service import HANG

    with PushService() as hung:
        server = server_factory(
            SHUTDOWN_TIMEOUT="2", PUSH_TIMEOUT="60", PUSH_PROCESSES="2", **backend_env
        ).start()
        for _ in range(4):
            sub = hung.subscriber(script=[HANG] * 3)
            requests.post(server.url + "/subscription", json=sub.subscription)

        def push() -> None:
            with contextlib.suppress(requests.RequestException):  # cut off: expected
                requests.post(server.url + "/push", json={"title": "t"}, headers=WAIT)

        pushing = threading.Thread(target=push)
        pushing.start()
        hung.wait_for(4)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - started < 2 + 9  # SHUTDOWN_TIMEOUT, a few seconds
        pushing.join(10)


def _raw_request(port: int, data: bytes, timeout: float = 5) -> tuple[bytes, float]:
    """Send ``data`` while reading the answer, as a client that streams a body
    does: (the whole answer, seconds until it came)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may close meanwhile
                s.sendall(data)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
        seconds = time.monotonic() - started
        with contextlib.suppress(OSError):  # stops the sender, if still sending
            s.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
    return answer, seconds


def test_a_thousand_idle_or_slow_connections_leave_health_answering_in_a_second(
    server_factory,
):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = server_factory().start()
    held = []
    try:
        for n in range(1000):  # one client: idle, slow headers, idle keep-alive
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            held.append(s)
            if n % 3 == 1:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            elif n % 3 == 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in held[2::3]:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        for _ in range(5):
            started = time.monotonic()
            answer = requests.get(server.url + "/health", timeout=1)
            assert answer.json()["status"] == "ok"
            assert time.monotonic() - started < 1
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_refused_before_it_is_read(server_factory, chunked):
    server = server_factory().start()
    head = (
        b"POST /subscription HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    )
    if chunked:  # no Content-Length: refused as the stream passes the limit
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        data = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 128  # 8 MB
    else:  # announces 200 MB, sends 256 KB of it
        data = head + b"Content-Length: 209715200\r\n\r\n" + b" " * 262144
    answer, seconds = _raw_request(server.port, data)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head_part
    assert "MAX_WEBHOOK_BYTES" in json.loads(body)["error"]
    assert seconds < 1
    assert requests.get(server.url + "/health").json()["subscriptions"] == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_the_access_log_has_one_line_per_request_and_no_query(server_factory, enabled):
    env = {} if enabled else {"ACCESS_LOG": "off"}
    server = server_factory(**env).start()
    requests.get(server.url + "/health?token=secret-in-a-query")
    requests.post(server.url + "/subscription", json=fake_subscription(1))
    requests.get(server.url + "/nowhere%0aforged 200")
    server.stop()
    lines = [line for line in server.output().splitlines() if "webpush.access" in line]
    if not enabled:
        assert lines == []
        return
    lines = lines[-3:]  # before them, the test's wait for the server's start
    assert re.search(r'127\.0\.0\.1 "GET /health" 200 \d+ \d+ms$', lines[0])
    assert re.search(r'"POST /subscription" 201 \d+ \d+ms$', lines[1])
    assert '"GET /nowhere\\nforged 200" 404' in lines[2]
    assert "secret-in-a-query" not in server.output()


# -- webhooks ------------------------------------------------------------------------------

SECRET = "webhook-secret-for-tests"
FIXTURES = ROOT / "tests" / "fixtures" / "github"


@pytest.fixture
def hook_app(app_with):
    return app_with(webhook_secret=SECRET)


def sign(body: bytes, secret: str = SECRET) -> str:
    import hashlib
    import hmac

    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github(
    app, event: str, fixture: str | None = None, delivery: str | None = None, **kw
):
    body = (FIXTURES / f"{fixture or event}.json").read_bytes()
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or os.urandom(8).hex(),
        "X-Hub-Signature-256": sign(body),
        "Content-Type": "application/json",
        **kw.pop("headers", {}),
    }
    return app.request(
        "/webhooks/github", method="POST", body=body, headers=headers, **kw
    )


@pytest.mark.parametrize(
    ("event", "fixture", "title", "url"),
    [
        (
            "push",
            None,
            "octo-org/hello-world: 2 commits pushed to main",
            "https://github.com/octo-org/hello-world/compare/6113728f27ae...0d1a26e67d8f",
        ),
        (
            "pull_request",
            None,
            "octo-org/hello-world: pull request #42 opened",
            "https://github.com/octo-org/hello-world/pull/42",
        ),
        (
            "issues",
            None,
            "octo-org/hello-world: issue #7 opened",
            "https://github.com/octo-org/hello-world/issues/7",
        ),
        (
            "release",
            None,
            "octo-org/hello-world: release v2.0.0",
            "https://github.com/octo-org/hello-world/releases/tag/v2.0.0",
        ),
        (
            "workflow_run",
            "workflow_run_failure",
            "octo-org/hello-world: CI failed",
            "https://github.com/octo-org/hello-world/actions/runs/30433642",
        ),
    ],
)
def test_github_events_become_notifications(
    hook_app, push_service, event, fixture, title, url
):
    sub = push_service.subscriber()
    hook_app.post_json("/subscription", sub.subscription)
    response = github(hook_app, event, fixture)
    assert response.status_int == 202 and response.json["title"] == title
    message = push_service.wait_for(1)[0].message
    assert (message["title"], message["url"]) == (title, url)
    assert message["body"]


def test_a_push_notification_names_the_pusher_and_the_head_commit(
    hook_app, push_service
):
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    github(hook_app, "push")
    assert push_service.wait_for(1)[0].message["body"] == "mona: Fix the login redirect"


def test_github_ping_answers_200_and_sends_nothing(hook_app, push_service):
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    assert github(hook_app, "ping").json == {"pong": True}
    assert hook_app.get("/notifications", headers=AUTH).json["notifications"] == []
    assert push_service.received() == []


@pytest.mark.parametrize(
    ("event", "fixture"), [("workflow_run", "workflow_run_success"), ("star", "ping")]
)
def test_events_without_a_notification_are_accepted_and_ignored(
    hook_app, push_service, event, fixture
):
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    response = github(hook_app, event, fixture)
    assert response.status_int == 202 and "ignored" in response.json
    assert hook_app.get("/notifications", headers=AUTH).json["notifications"] == []
    assert push_service.received() == []


@pytest.mark.parametrize(
    "signature",
    [None, "sha256=" + "0" * 64, "sha1=abc", sign(b"other body")],
    ids=["none", "zeros", "sha1", "other body"],
)
def test_github_webhooks_with_a_missing_or_wrong_signature_get_401(
    hook_app, push_service, signature
):
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    headers = (
        {"X-Hub-Signature-256": signature} if signature else {"X-Hub-Signature-256": ""}
    )
    response = github(hook_app, "push", headers=headers, status=401)
    assert "X-Hub-Signature-256" in response.json["error"]
    assert hook_app.get("/notifications", headers=AUTH).json["notifications"] == []
    assert push_service.received() == []


def test_a_repeated_delivery_is_sent_once(hook_app, push_service):
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    first = github(hook_app, "issues", delivery="d-1")
    assert first.status_int == 202
    again = github(hook_app, "issues", delivery="d-1")
    assert again.status_int == 200
    assert again.json == {"duplicate": "d-1", "id": first.json["id"]}
    other = github(hook_app, "issues", delivery="d-2")
    assert other.status_int == 202 and other.json["id"] != first.json["id"]
    for answer in (first, other):
        assert wait_status(hook_app, answer.json["id"])["sent"] == 1
    listed = hook_app.get("/notifications", headers=AUTH).json["notifications"]
    assert len(listed) == 2 and len(push_service.received()) == 2


def test_webhooks_are_refused_without_a_secret(app):
    body = (FIXTURES / "push.json").read_bytes()
    response = app.request(
        "/webhooks/github",
        method="POST",
        body=body,
        headers={"X-Hub-Signature-256": sign(body)},
        status=503,
    )
    assert "WEBHOOK_SECRET" in response.json["error"]
    assert (
        "WEBHOOK_SECRET"
        in app.post_json(
            "/webhooks/generic", {"title": "t"}, headers=AUTH, status=503
        ).json["error"]
    )


def test_the_generic_source_takes_a_signature_or_the_push_token(hook_app, push_service):
    news = push_service.subscriber()
    hook_app.post_json("/subscription", {**news.subscription, "topics": ["news"]})
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    body = json.dumps(
        {"title": "Backup done", "body": "3 GB", "url": "/backups", "topic": "news"}
    ).encode()
    signed = hook_app.request(
        "/webhooks/generic",
        method="POST",
        body=body,
        headers={"X-Signature-256": sign(body)},
    )
    assert signed.status_int == 202 and signed.json["subscriptions"] == 1
    assert push_service.wait_for(1)[0].message["title"] == "Backup done"
    assert push_service.received()[0].subscriber == news.id
    assert (
        hook_app.post_json("/webhooks/generic", {"title": "t"}, headers=AUTH).status_int
        == 202
    )
    hook_app.post_json("/webhooks/generic", {"title": "t"}, status=401)
    hook_app.post_json("/webhooks/generic", {"title": 5}, headers=AUTH, status=400)
    hook_app.post_json("/webhooks/nope", {"title": "t"}, headers=AUTH, status=404)


def test_the_generic_webhook_carries_every_push_field(hook_app, push_service):
    sub = push_service.subscriber()
    hook_app.post_json("/subscription", sub.subscription)
    fields = {
        "title": "Backup",
        "message": "done",
        "icon": "/i.png",
        "url": "/b",
        "data": {"n": 1},
        "ttl": 60,
        "urgency": "high",
        "collapse_key": "backup",
        "delay": 1,
        "format": "classic",
        "mutable": False,
        "tag": "backups",
        "badge": 3,
        "silent": True,
        "lang": "en-GB",
        "dir": "ltr",
        "require_interaction": True,
        "actions": [{"action": "open", "title": "Open", "url": "/b/1"}],
        "image": "/big.png",
        "rate": 600,
    }
    # "body" is "message", "send_at" and "send_at_local" are "delay" other
    # ways; topic is tested above, users and subscriptions in
    # tests/test_users.py
    audiences = {"topic", "users", "subscriptions"}
    others = {"body", "send_at", "send_at_local"}
    assert set(fields) | others | audiences == set(api.PUSH_FIELDS)
    started = time.monotonic()
    answer = hook_app.post_json("/webhooks/generic", fields, headers=AUTH, status=202)
    assert answer.json["status"] == "scheduled"
    [delivery] = push_service.wait_for(1)
    assert delivery.at - started >= 0.9
    endpoint = push_service.subscribers[delivery.subscriber].endpoint
    message = delivery.message
    assert message.pop("receipt").startswith(api.endpoint_id(endpoint))
    assert message == {
        "title": "Backup",
        "body": "done",
        "icon": "/i.png",
        "url": "/b",
        "data": {"n": 1},
        "tag": "backups",
        "badge": 3,
        "silent": True,
        "lang": "en-GB",
        "dir": "ltr",
        "require_interaction": True,
        "actions": [
            {
                "action": "open",
                "title": "Open",
                "url": "/b/1",
                "navigate": "http://localhost:80/b/1",
            }
        ],
        "image": "/big.png",
        "id": answer.json["id"],
    }
    headers = delivery.headers
    assert (headers["ttl"], headers["urgency"], headers["topic"]) == (
        "60",
        "high",
        "backup",
    )


def test_a_webhook_is_answered_before_its_fan_out_ends(settings):
    with PushService(latency=3.0) as slow:
        application = api.create_app(
            api.Settings(**{**settings.__dict__, "webhook_secret": SECRET})
        )
        try:
            client = webtest.TestApp(application)
            client.post_json("/subscription", slow.subscriber().subscription)
            started = time.monotonic()
            response = github(client, "release")
            assert response.status_int == 202
            assert (
                time.monotonic() - started < 2.0
            )  # the push service answers after 3 s
            # its fan-out is a notification like any other, followed by its id
            notification_id = response.json["id"]
            location = response.headers["Location"]
            assert location.endswith(f"/notifications/{notification_id}")
            under_way = client.get(location, headers=AUTH).json
            assert under_way["status"] in ("queued", "sending")
            slow.wait_for(1)
        finally:
            close_app(application)


def test_a_new_event_is_one_decorated_function(hook_app, push_service):
    @api.on_webhook("github", "star")
    def starred(payload: dict) -> dict:
        return {"title": f"{payload['repository']['full_name']} got a star"}

    try:
        hook_app.post_json("/subscription", push_service.subscriber().subscription)
        assert github(hook_app, "star", "ping").status_int == 202
        assert (
            push_service.wait_for(1)[0].message["title"]
            == "octo-org/hello-world got a star"
        )
    finally:
        del api.WEBHOOK_HANDLERS[("github", "star")]


def test_topic_names_are_limited_to_max_topic_length(app_with):
    client = app_with(max_topic_length=5)
    client.post_json("/subscription", {**fake_subscription(1), "topics": ["short"]})
    error = client.post_json(
        "/subscription", {**fake_subscription(2), "topics": ["longer"]}, status=400
    )
    assert "MAX_TOPIC_LENGTH" in error.json["error"]


def test_a_rotated_subscription_replaces_the_old_one_and_keeps_its_topics(app, store):
    old, new = fake_subscription(1), fake_subscription(2)
    old_id = app.post_json("/subscription", {**old, "topics": ["news"]}).json["id"]
    new_id = app.post_json("/subscription", {**new, "replaces": old["endpoint"]}).json[
        "id"
    ]
    assert store.get(old_id) is None and store.get(new_id)["topics"] == ["news"]
    assert len(store) == 1
    app.post_json("/subscription", {**fake_subscription(3), "replaces": 7}, status=400)
    assert len(store) == 1


def test_large_github_payloads_are_accepted_up_to_max_webhook_bytes(
    hook_app, push_service
):
    hook_app.post_json("/subscription", push_service.subscriber().subscription)
    payload = json.loads((FIXTURES / "push.json").read_text())
    commit = payload["commits"][0]
    payload["commits"] = [
        {**commit, "modified": [f"src/file{i}.py" for i in range(50)]}
    ] * 200
    body = json.dumps(payload).encode()
    assert len(body) > 32768  # over MAX_BODY_BYTES
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "big",
        "X-Hub-Signature-256": sign(body),
    }
    assert (
        hook_app.request(
            "/webhooks/github", method="POST", body=body, headers=headers
        ).status_int
        == 202
    )
    assert (
        push_service.wait_for(1)[0]
        .message["title"]
        .endswith("200 commits pushed to main")
    )
    huge = b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(huge)}
    response = hook_app.request(
        "/webhooks/github", method="POST", body=huge, headers=headers, status=413
    )
    assert "MAX_WEBHOOK_BYTES" in response.json["error"]
