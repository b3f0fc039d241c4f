"""API keys with scopes: docs/api-keys.md, one test a promise.

The push token is the admin key; ``POST /keys`` makes others, each with a
scope (send, read, admin), a send key perhaps narrowed to topics, perhaps
expiring. They are kept as hashes only, on either store (the ``settings``
fixture runs each test on both), and the command line manages them through
the HTTP API of a real server process."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

import pytest
import redis
import requests
import webtest

import api
from conftest import AUTH, ROOT, TOKEN, Server, env_of, fake_subscription

WEBHOOK_SECRET = "a-webhook-secret-0123456789abcdef"


def make_key(client, name: str, scope: str, status: int = 201, **extra) -> dict:
    body = {"name": name, "scope": scope, **extra}
    return client.post_json("/keys", body, headers=AUTH, status=status).json


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- making, listing, revoking ----------------------------------------------------


def test_a_new_key_is_shown_once_and_listed_without_it(app):
    made = make_key(app, "ci", "send", topics=["deploys"], expires_in=3600)
    assert made["key"].startswith("wpk_") and len(made["key"]) > 40
    assert (made["name"], made["scope"], made["topics"]) == ("ci", "send", ["deploys"])
    assert made["expires"] > made["created"] and made["last_used"] is None
    make_key(app, "dashboard", "read")
    listed = app.get("/keys", headers=AUTH).json["keys"]
    assert [k["name"] for k in listed] == ["ci", "dashboard"]
    for key in listed:
        assert set(key) == {
            "name",
            "scope",
            "topics",
            "created",
            "last_used",
            "expires",
            "expired",
        }
    assert made["key"] not in json.dumps(listed)
    assert app.get("/key", headers=bearer(made["key"])).json == {
        "name": "ci",
        "scope": "send",
        "topics": ["deploys"],
    }


def test_a_revoked_key_is_refused_at_once_and_the_push_token_stays_admin(app):
    key = make_key(app, "ci", "send")["key"]
    app.get("/key", headers=bearer(key), status=200)
    app.delete("/keys/ci", headers=AUTH, status=204)
    error = app.get("/key", headers=bearer(key), status=401).json["error"]
    assert "revoked" in error
    assert app.get("/keys", headers=AUTH).json == {"keys": []}
    app.delete("/keys/ci", headers=AUTH, status=404)
    assert app.get("/key", headers=AUTH).json["scope"] == "admin"


def test_an_expired_key_is_refused_and_listed_as_expired(app):
    key = make_key(app, "short", "read", expires_in=60)["key"]
    app.get("/topics", headers=bearer(key), status=200)
    ring = app.app.config["webpush.keyring"]
    ring.clock = lambda: time.time() + 61
    assert app.get("/topics", headers=bearer(key), status=401).json["error"]
    [listed] = app.get("/keys", headers=AUTH).json["keys"]
    assert listed["expired"] is True


@pytest.mark.parametrize(
    "token",
    ["", "wpk_", "wpk_" + "A" * 43, "not-a-key", "wpk_" + "A" * 500, TOKEN + "x"],
)
def test_an_unknown_key_is_401_saying_how_to_send_one(app, token):
    answer = app.get("/notifications", headers=bearer(token), status=401)
    assert "Authorization: Bearer <key>" in answer.json["error"]
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="push"'


BAD_KEYS = {
    "no name": ({"scope": "send"}, 400, "'name'"),
    "a name with a space": ({"name": "c i", "scope": "send"}, 400, "'name'"),
    "a name of 65 characters": ({"name": "x" * 65, "scope": "send"}, 400, "'name'"),
    "admin, the push token's name": ({"name": "admin", "scope": "read"}, 409, "admin"),
    "no scope": ({"name": "ci"}, 400, "'scope'"),
    "an unknown scope": ({"name": "ci", "scope": "write"}, 400, "'scope'"),
    "topics on a read key": (
        {"name": "ci", "scope": "read", "topics": ["x"]},
        400,
        "'topics'",
    ),
    "an empty topics list": (
        {"name": "ci", "scope": "send", "topics": []},
        400,
        "'topics'",
    ),
    "a bad topic": (
        {"name": "ci", "scope": "send", "topics": ["a b"]},
        400,
        "'topics'",
    ),
    "a negative expiry": (
        {"name": "ci", "scope": "send", "expires_in": -1},
        400,
        "'expires_in'",
    ),
    "a zero expiry": ({"name": "ci", "scope": "send", "expires_in": 0}, 400, "expires"),
    "an expiry as text": (
        {"name": "ci", "scope": "send", "expires_in": "90d"},
        400,
        "'expires_in'",
    ),
    "an expiry of true": (
        {"name": "ci", "scope": "send", "expires_in": True},
        400,
        "'expires_in'",
    ),
    "an unknown field": ({"name": "ci", "scope": "send", "topic": "x"}, 400, "topic"),
}


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_a_bad_key_request_is_a_4xx_naming_the_problem_and_makes_nothing(app, case):
    body, status, says = BAD_KEYS[case]
    error = app.post_json("/keys", body, headers=AUTH, status=status).json["error"]
    assert says in error
    assert app.get("/keys", headers=AUTH).json == {"keys": []}


def test_a_name_in_use_is_409_and_the_first_key_still_works(app):
    first = make_key(app, "ci", "send")["key"]
    assert "exists" in make_key(app, "ci", "read", status=409)["error"]
    assert app.get("/key", headers=bearer(first)).json["scope"] == "send"


# -- scopes -------------------------------------------------------------------------

# Each route a key may or may not call, with what the caller is answered
# when allowed; a refusal is a 403 naming the key's scope.
ROUTES = [
    ("POST", "/push", {"title": "t"}),
    ("GET", "/notifications", None),
    ("GET", "/notifications/{id}", None),
    ("DELETE", "/notifications/{id}", None),
    ("GET", "/topics", None),
    ("GET", "/users/ana", None),
    ("DELETE", "/users/ana", None),
    ("GET", "/metrics", None),
    ("POST", "/keys", {"name": "another", "scope": "read"}),
    ("GET", "/keys", None),
    ("DELETE", "/keys/nobody", None),
    ("GET", "/key", None),
]
ALLOWED = {
    "send": {"POST /push", "GET /key"},
    "read": {
        "GET /notifications",
        "GET /notifications/{id}",
        "GET /topics",
        "GET /users/ana",
        "GET /metrics",
        "GET /key",
    },
    "admin": {f"{method} {path}" for method, path, _ in ROUTES},
}


@pytest.mark.parametrize("scope", api.KEY_SCOPES)
def test_a_key_may_call_exactly_the_routes_of_its_scope(app, scope):
    key = make_key(app, f"a-{scope}-key", scope)["key"]
    # A notification the admin sent, scheduled so that it can be cancelled.
    sent = app.post_json("/push", {"title": "t", "delay": 600}, headers=AUTH).json
    for method, path, body in ROUTES:
        route = f"{method} {path}"
        url = path.format(id=sent["id"])
        answer = app.request(
            url,
            method=method,
            headers={**bearer(key), "Content-Type": "application/json"},
            body=json.dumps(body).encode() if body else b"",
            expect_errors=True,
        )
        if route in ALLOWED[scope]:
            assert answer.status_int not in (401, 403), (route, answer.text)
            assert answer.status_int < 500, (route, answer.text)
        else:
            assert answer.status_int == 403, (route, answer.status_int)
            error = answer.json["error"]
            assert f"has the scope {scope!r}" in error, error
            assert f"may not {method}" in error, error


def test_a_send_key_with_topics_sends_only_to_them(app):
    key = bearer(make_key(app, "ci", "send", topics=["deploys", "ops"])["key"])
    app.post_json("/push", {"title": "t", "topic": "deploys"}, headers=key, status=202)
    app.post_json("/push", {"title": "t", "topic": "ops"}, headers=key, status=202)
    for refused in [
        {"title": "t", "topic": "news"},
        {"title": "t"},
        {"title": "t", "topic": None},
        {"title": "t", "users": ["ana"]},
        {"title": "t", "subscriptions": ["A" * 22]},
    ]:
        error = app.post_json("/push", refused, headers=key, status=403).json["error"]
        assert "may send only to the topics deploys, ops" in error
    assert len(app.get("/notifications", headers=AUTH).json["notifications"]) == 2


def test_a_send_key_reads_its_own_notifications_only(app):
    ci = bearer(make_key(app, "ci", "send")["key"])
    other = bearer(make_key(app, "other", "send")["key"])
    mine = app.post_json("/push", {"title": "mine"}, headers=ci).json["id"]
    theirs = app.post_json("/push", {"title": "theirs"}, headers=other).json["id"]
    assert app.get(f"/notifications/{mine}", headers=ci).json["title"] == "mine"
    error = app.get(f"/notifications/{theirs}", headers=ci, status=403).json["error"]
    assert "scope 'send'" in error
    app.get(f"/notifications/{theirs}", headers=AUTH, status=200)


def test_a_key_reusing_another_keys_idempotency_key_makes_its_own_notification(app):
    ci = bearer(make_key(app, "ci", "send")["key"])
    same = {"Idempotency-Key": "deploy-42"}
    first = app.post_json("/push", {"title": "t"}, headers={**AUTH, **same}).json
    second = app.post_json("/push", {"title": "t"}, headers={**ci, **same}).json
    assert first["id"] != second["id"]
    again = app.post_json("/push", {"title": "t"}, headers={**ci, **same}).json
    assert again["id"] == second["id"]


def test_a_new_key_that_takes_a_revoked_keys_name_owns_none_of_what_it_sent(app):
    old = bearer(make_key(app, "ci", "send")["key"])
    same = {"Idempotency-Key": "deploy-42"}
    first = app.post_json("/push", {"title": "t"}, headers={**old, **same}).json["id"]
    app.delete("/keys/ci", headers=AUTH, status=204)
    new = bearer(make_key(app, "ci", "send")["key"])
    app.get(f"/notifications/{first}", headers=new, status=403)
    second = app.post_json("/push", {"title": "t"}, headers={**new, **same}).json["id"]
    assert second != first  # not a replay of the old key's notification
    document = app.get(f"/notifications/{second}", headers=new).json
    assert document["created_by"] == "ci"
    assert app.get(f"/notifications/{first}", headers=AUTH).json["created_by"] == "ci"


def test_an_admin_idempotency_key_is_never_another_keys(app):
    ci = bearer(make_key(app, "ci", "send")["key"])
    by_admin = {**AUTH, "Idempotency-Key": "ci:x"}
    by_ci = {**ci, "Idempotency-Key": "x"}
    first = app.post_json("/push", {"title": "t"}, headers=by_admin).json["id"]
    second = app.post_json("/push", {"title": "t"}, headers=by_ci).json["id"]
    assert first != second


def test_a_keys_webhook_delivery_id_is_its_own(app_with):
    client = app_with(webhook_secret=WEBHOOK_SECRET)
    ci = bearer(make_key(client, "ci", "send")["key"])
    raw = json.dumps({"title": "from a webhook"}).encode()
    signature = hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    same = {"Content-Type": "application/json", "X-Delivery-Id": "d-1"}
    claimed = client.post("/webhooks/generic", raw, headers={**ci, **same})
    assert claimed.status_int == 202
    signed = {**same, "X-Signature-256": f"sha256={signature}"}
    real = client.post("/webhooks/generic", raw, headers=signed)
    assert real.status_int == 202 and real.json["id"] != claimed.json["id"]


# -- who did what ---------------------------------------------------------------------


def test_each_notification_names_the_key_that_created_it(app_with):
    client = app_with(webhook_secret=WEBHOOK_SECRET)
    ci = bearer(make_key(client, "ci", "send")["key"])
    by_ci = client.post_json("/push", {"title": "t"}, headers=ci).json["id"]
    by_admin = client.post_json("/push", {"title": "t"}, headers=AUTH).json["id"]
    raw = json.dumps({"title": "from a webhook"}).encode()
    signature = hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    signed = client.post(
        "/webhooks/generic",
        raw,
        headers={
            "Content-Type": "application/json",
            "X-Signature-256": f"sha256={signature}",
        },
    ).json["id"]
    by_key_hook = client.post(
        "/webhooks/generic", raw, headers={**ci, "Content-Type": "application/json"}
    ).json["id"]
    documents = {
        i: client.get(f"/notifications/{i}", headers=AUTH).json["created_by"]
        for i in (by_ci, by_admin, signed, by_key_hook)
    }
    assert documents == {
        by_ci: "ci",
        by_admin: "admin",
        signed: None,
        by_key_hook: "ci",
    }


def test_a_key_narrowed_to_topics_cannot_use_a_webhook_to_send_elsewhere(app_with):
    client = app_with(webhook_secret=WEBHOOK_SECRET)
    ci = bearer(make_key(client, "ci", "send", topics=["deploys"])["key"])
    read = bearer(make_key(client, "dash", "read")["key"])
    raw = json.dumps({"title": "everyone!"}).encode()
    headers = {"Content-Type": "application/json"}
    client.post("/webhooks/generic", raw, headers={**ci, **headers}, status=403)
    client.post("/webhooks/generic", raw, headers={**read, **headers}, status=401)
    assert client.get("/notifications", headers=AUTH).json["notifications"] == []


def test_last_used_is_noted_at_most_once_a_minute(app):
    key = bearer(make_key(app, "ci", "read")["key"])
    ring = app.app.config["webpush.keyring"]
    touches = []
    touch = ring.store.touch
    ring.store.touch = lambda name, when: touches.append(name) or touch(name, when)
    for _ in range(5):
        app.get("/topics", headers=key)
    assert touches == ["ci"]
    [listed] = app.get("/keys", headers=AUTH).json["keys"]
    assert listed["last_used"] is not None
    ring.clock = lambda: time.time() + 61
    app.get("/topics", headers=key)
    assert touches == ["ci", "ci"]


# -- stored as hashes -------------------------------------------------------------------


def _everything_stored(settings: api.Settings, tmp_path) -> str:
    """Every byte the server keeps: its files, and its Redis values."""
    found = [
        p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()
    ]
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        for name in client.scan_iter(match=settings.redis_prefix + "*"):
            kind = client.type(name)
            if kind == "string":
                found.append(client.get(name))
            elif kind == "hash":
                found.append(json.dumps(client.hgetall(name)))
            elif kind == "set":
                found.append(json.dumps(sorted(client.smembers(name))))
            elif kind == "zset":
                found.append(json.dumps(client.zrange(name, 0, -1)))
            elif kind == "stream":
                found.append(json.dumps(client.xrange(name)))
            found.append(name)
        client.close()
    return "\n".join(found)


def test_keys_are_kept_only_as_hashes_on_either_store(app, settings, tmp_path):
    keys = [
        make_key(app, f"k{n}", scope)["key"] for n, scope in enumerate(api.KEY_SCOPES)
    ]
    for key in keys:
        app.get("/key", headers=bearer(key))  # used: its last use is noted too
    app.post_json("/subscription", fake_subscription(1))
    stored = _everything_stored(settings, tmp_path)
    for key in keys:
        assert key not in stored
        assert key[4:] not in stored
        assert api.api_key_hash(key) in stored
    if not settings.redis_url:
        mode = os.stat(tmp_path / "vapid" / api.API_KEYS_FILE).st_mode & 0o777
        assert mode == 0o600


def test_keys_outlive_a_restart(settings):
    first = api.create_app(settings)
    key = make_key(webtest.TestApp(first), "ci", "send")["key"]
    first.config["webpush.close"]()
    second = webtest.TestApp(api.create_app(settings))
    try:
        assert second.get("/key", headers=bearer(key)).json["name"] == "ci"
    finally:
        second.app.config["webpush.close"]()


# -- real processes: the command line, two servers on one Redis ----------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=["json", "redis"])
def running(request, tmp_path):
    server = Server(tmp_path, **env_of(request.param, request)).start()
    yield server
    server.stop()


def test_the_keys_command_makes_lists_and_revokes_keys_on_a_running_server(running):
    env = {"WEBPUSH_URL": running.url, "WEBPUSH_TOKEN": TOKEN}
    made = _cli(
        "keys", "create", "--name", "ci", "--scope", "send", "--topics", "deploys",
        "--expires-in", "90d", **env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("wpk_")
    answer = requests.post(
        running.url + "/push",
        json={"title": "v2", "topic": "deploys"},
        headers=bearer(key),
    )
    assert answer.status_code == 202, answer.text
    listed = _cli("keys", "list", **env)
    assert listed.returncode == 0, listed.stderr
    [header, row] = listed.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "SCOPE", "TOPICS"]
    assert row.split()[:3] == ["ci", "send", "deploys"] and key not in listed.stdout
    revoked = _cli("keys", "revoke", "ci", **env)
    assert revoked.returncode == 0, revoked.stderr
    answer = requests.get(running.url + "/key", headers=bearer(key))
    assert answer.status_code == 401
    log = running.output()
    assert "key=ci" in log and "key=admin" in log and key not in log


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["keys", "list"], {"WEBPUSH_TOKEN": "wrong"}, "does not accept WEBPUSH_TOKEN"),
        (["keys", "revoke", "nobody"], {}, "no key is named 'nobody'"),
        (["keys", "create", "--name", "x", "--scope", "read", "--topics", "a"], {}, "'topics'"),
        (["keys", "create", "--name", "x", "--scope", "read", "--expires-in", "soon"], {}, "duration"),
        (["keys", "list"], {"WEBPUSH_URL": "http://127.0.0.1:9"}, "cannot reach"),
        (["keys", "list"], {"WEBPUSH_URL": "push.example.org"}, "WEBPUSH_URL must be"),
    ],
)  # fmt: skip
def test_the_keys_command_says_what_is_wrong_in_one_line(running, args, env, says):
    done = _cli(*args, **{"WEBPUSH_URL": running.url, "WEBPUSH_TOKEN": TOKEN, **env})
    assert done.returncode != 0
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and says in line
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr


def test_a_revocation_holds_on_every_process_on_redis_within_a_second(
    request, tmp_path
):
    env = env_of("redis", request)
    first = Server(tmp_path, **env).start()
    second = Server(tmp_path, **env).start()
    try:
        made = requests.post(
            first.url + "/keys", json={"name": "ci", "scope": "read"}, headers=AUTH
        ).json()
        key = bearer(made["key"])
        assert requests.get(second.url + "/topics", headers=key).status_code == 200
        revoked = requests.delete(first.url + "/keys/ci", headers=AUTH)
        assert revoked.status_code == 204
        started = time.monotonic()
        while requests.get(second.url + "/topics", headers=key).status_code != 401:
            assert time.monotonic() - started < 1.0, "still accepted after 1 s"
        assert time.monotonic() - started < 1.0
    finally:
        first.stop()
        second.stop()
