"""People, not only browsers: docs/people.md, one test a promise.

A subscription is bound to a user by a token the site's backend signs
(USER_TOKEN_SECRET, HS256, checked by PyJWT); a push goes to users or to
subscription ids; ``/users/<id>`` lists a person's devices and erases them.
Every test runs on both stores (the ``settings`` fixture), against the
decrypting push stand-in and the FCM stand-in."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import pytest
import redis
import requests
import webtest

import api
from conftest import (
    AUTH,
    ROOT,
    TOKEN,
    WAIT,
    close_app,
    device_token,
    fake_subscription,
    preload,
    pushed,
    stored_state,
)

SECRET = "a-site-backend-secret-0123456789abcdef"


@pytest.fixture
def settings(settings):
    """The conftest's settings (each store in turn), with users on."""
    return dataclasses.replace(settings, user_token_secret=SECRET)


@pytest.fixture
def people(app_with, fcm, tmp_path):
    """The app with FCM configured too, so users have web and native devices."""
    account = fcm.service_account(tmp_path / "service-account.json")
    return app_with(fcm_service_account=str(account), fcm_api_url=fcm.url)


def token_for(user: str, ttl: int = 3600, **claims) -> str:
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bind(client, subscription: dict, user: str, status: int | str = "*", **extra):
    body = {**subscription, "user": user, "user_token": token_for(user), **extra}
    return client.post_json("/subscription", body, status=status)


def devices(client, user: str, status: int = 200) -> list[dict] | dict:
    answer = client.get(f"/users/{user}", headers=AUTH, status=status).json
    return answer["subscriptions"] if status == 200 else answer


# -- binding ----------------------------------------------------------------------


def test_a_subscription_is_bound_to_the_user_its_token_names(app, push_service):
    sub = push_service.subscriber()
    answer = bind(app, {**sub.subscription, "topics": ["news"]}, "ana", status=201)
    assert answer.json == {"id": api.endpoint_id(sub.endpoint), "user": "ana"}
    [device] = devices(app, "ana")
    assert device["id"] == answer.json["id"]
    assert device["channel"] == "webpush" and device["origin"].startswith("http://127")
    assert device["topics"] == ["news"]
    assert device["created"].endswith("Z") and device["last_success"] is None
    assert app.get("/subscription").json["users"] is True


def _none_token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "exp": now + 60}, None, algorithm="none")


STRANGERS = {
    "no token": lambda: None,
    "an empty token": lambda: "",
    "a number": lambda: 42,
    "garbage": lambda: "not-a-token",
    "three dots of garbage": lambda: "a.b.c",
    "forged with another secret": lambda: jwt.encode(
        {"sub": "ana", "exp": int(time.time()) + 60},
        "another-secret-of-at-least-32-characters",
        algorithm="HS256",
    ),
    "expired": lambda: token_for("ana", ttl=-120),
    "for another user": lambda: token_for("bob"),
    "without exp": lambda: jwt.encode({"sub": "ana"}, SECRET, algorithm="HS256"),
    "without sub": lambda: jwt.encode(
        {"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    ),
    "alg none": lambda: _none_token("ana"),
    "HS512, another algorithm": lambda: jwt.encode(
        {"sub": "ana", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"
    ),
    "over 30 days": lambda: token_for("ana", ttl=31 * 86400),
    "over 4096 characters": lambda: token_for("ana", pad="x" * 5000),
}


@pytest.mark.parametrize("case", sorted(STRANGERS))
def test_strangers_cannot_bind_a_subscription_to_a_user(app, unchanged, case):
    body = {**fake_subscription(7), "user": "ana", "user_token": STRANGERS[case]()}
    answer = app.post_json("/subscription", body, status=403).json
    assert "user_token" in answer["error"]
    assert unchanged()
    assert devices(app, "ana", status=404) == {
        "error": "no subscription is bound to this user"
    }


def test_without_user_token_secret_a_user_is_refused_with_400_naming_it(app_with):
    client = app_with(user_token_secret="")
    body = {**fake_subscription(1), "user": "ana", "user_token": token_for("ana")}
    error = client.post_json("/subscription", body, status=400).json["error"]
    assert "USER_TOKEN_SECRET is not set" in error
    assert client.get("/subscription").json["users"] is False
    assert client.get("/health").json["subscriptions"] == 0


@pytest.mark.parametrize(
    "user", ["", "x" * 129, "line\nbreak", "tab\there", 7, ["ana"], {"id": 1}]
)
def test_a_user_id_must_be_1_to_128_printable_characters(app, unchanged, user):
    body = {**fake_subscription(2), "user": user, "user_token": token_for("ana")}
    error = app.post_json("/subscription", body, status=400).json["error"]
    assert "printable" in error
    assert unchanged()


def test_a_user_token_without_a_user_is_refused(app, unchanged):
    body = {**fake_subscription(2), "user_token": token_for("ana")}
    assert "'user'" in app.post_json("/subscription", body, status=400).json["error"]
    assert unchanged()


def test_signing_in_as_another_user_moves_the_subscription(app):
    sub = fake_subscription(3)
    bind(app, sub, "ana")
    bind(app, sub, "bob", status=200)
    devices(app, "ana", status=404)
    assert len(devices(app, "bob")) == 1


def test_signing_out_unbinds_the_subscription_and_keeps_it(app):
    sub = fake_subscription(4)
    bind(app, sub, "ana")
    answer = app.post_json("/subscription", {**sub, "user": None}, status=200).json
    assert answer["user"] is None
    devices(app, "ana", status=404)
    assert app.get("/health").json["subscriptions"] == 1


def test_a_repost_keeps_its_user_only_with_the_same_auth_secret(app):
    sub = fake_subscription(5)
    bind(app, {**sub, "topics": ["a"]}, "ana")
    assert app.post_json("/subscription", sub).json["user"] == "ana"  # same keys
    other_keys = {
        **sub,
        "keys": {**sub["keys"], "auth": fake_subscription(6)["keys"]["auth"]},
    }
    assert app.post_json("/subscription", other_keys).json["user"] is None
    devices(app, "ana", status=404)


def test_a_rotated_subscription_keeps_its_user_only_when_the_post_proves_the_old_one(
    app,
):
    old, new, newer, newest = (fake_subscription(n) for n in (10, 11, 12, 13))
    bind(app, old, "ana")
    # the old one's toJSON(), with its auth: proven, so the user goes along
    answer = app.post_json("/subscription", {**new, "replaces": old}).json
    assert answer["user"] == "ana"
    [device] = devices(app, "ana")
    assert device["id"] == answer["id"]
    # only the old endpoint: anyone who saw it could say so; the user stays behind
    answer = app.post_json("/subscription", {**newer, "replaces": new["endpoint"]}).json
    assert answer["user"] is None
    devices(app, "ana", status=404)
    # a wrong auth proves nothing either
    bind(app, newer, "bob")
    wrong = {**newer, "keys": {**newer["keys"], "auth": old["keys"]["auth"]}}
    assert (
        app.post_json("/subscription", {**newest, "replaces": wrong}).json["user"]
        is None
    )
    devices(app, "bob", status=404)


def test_a_refreshed_fcm_token_keeps_its_user(people):
    old, new = device_token(1), device_token(2)
    bind(people, {"fcm_token": old}, "ana", status=201)
    answer = people.post_json("/subscription", {"fcm_token": new, "replaces": old}).json
    assert answer["user"] == "ana"
    [device] = devices(people, "ana")
    assert (device["id"], device["channel"], device["origin"]) == (
        answer["id"],
        "fcm",
        "fcm",
    )


# -- sending to people ------------------------------------------------------------


def test_a_push_to_users_reaches_exactly_their_devices_across_web_push_and_fcm(
    people, push_service, fcm
):
    ana_web = [push_service.subscriber() for _ in range(2)]
    bob_web, stranger = push_service.subscriber(), push_service.subscriber()
    for sub in ana_web:
        bind(people, sub.subscription, "ana")
    bind(people, bob_web.subscription, "bob")
    people.post_json("/subscription", stranger.subscription)
    ana_phone, carl_phone = device_token(1), device_token(2)
    bind(people, {"fcm_token": ana_phone}, "ana")
    bind(people, {"fcm_token": carl_phone}, "carl")
    result = pushed(people, {"title": "Your order shipped", "users": ["ana", "carl"]})
    assert (result["audience"], result["named"]) == ("users", 2)
    assert (result["total"], result["sent"], result["failed"]) == (4, 4, 0)
    assert result["channels"]["webpush"]["sent"] == 2
    assert result["channels"]["fcm"]["sent"] == 2
    reached = {d.subscriber for d in push_service.received()}
    assert reached == {sub.id for sub in ana_web}
    assert {m.token for m in fcm.received()} == {ana_phone, carl_phone}


def test_a_push_to_one_subscription_id_reaches_only_that_device(app, push_service):
    subs = [push_service.subscriber() for _ in range(3)]
    ids = [app.post_json("/subscription", s.subscription).json["id"] for s in subs]
    result = pushed(app, {"title": "Only you", "subscriptions": [ids[1]]})
    assert (result["audience"], result["named"], result["sent"]) == (
        "subscriptions",
        1,
        1,
    )
    [delivery] = push_service.received()
    assert delivery.subscriber == subs[1].id
    assert delivery.message["title"] == "Only you"


def test_a_push_to_users_with_no_devices_is_done_with_nothing_sent(app):
    result = pushed(app, {"title": "t", "users": ["nobody"]})
    assert (result["status"], result["total"], result["sent"]) == ("done", 0, 0)


def test_a_push_to_users_counts_what_it_will_reach_when_accepted(app):
    bind(app, fake_subscription(1), "ana")
    bind(app, fake_subscription(2), "ana")
    answer = app.post_json(
        "/push", {"title": "t", "users": ["ana"], "delay": 3600}, headers=AUTH
    )
    assert answer.status_int == 202 and answer.json["subscriptions"] == 2


BAD_AUDIENCES = {
    "topic and users": {"topic": "news", "users": ["ana"]},
    "users and subscriptions": {"users": ["ana"], "subscriptions": ["A" * 22]},
    "an empty users list": {"users": []},
    "an empty subscriptions list": {"subscriptions": []},
    "a user that is not a string": {"users": [42]},
    "users as a string": {"users": "ana"},
    "a user of 129 characters": {"users": ["x" * 129]},
    "too many users": {"users": [f"u{n}" for n in range(10_001)]},
    "a subscription id of the wrong shape": {"subscriptions": ["short"]},
    "too many subscriptions": {"subscriptions": ["A" * 22] * 10_001},
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIENCES))
def test_a_push_names_one_audience_or_gets_400(app, settings, case):
    before = stored_state(settings)
    body = {"title": "t", **BAD_AUDIENCES[case]}
    error = app.post_json("/push", body, headers=AUTH, status=400).json["error"]
    assert error
    assert stored_state(settings) == before
    assert app.get("/notifications", headers=AUTH).json["notifications"] == []


def test_a_push_naming_10000_uuids_is_accepted(app, push_service):
    sub = push_service.subscriber()
    bind(app, sub.subscription, "the-one")
    users = [str(uuid.uuid4()) for _ in range(9_999)] + ["the-one"]
    body = {"title": "t", "users": users}
    assert len(json.dumps(body)) > api.Settings().max_body_bytes * 10
    result = pushed(app, body)
    assert (result["named"], result["total"], result["sent"]) == (10_000, 1, 1)
    assert [d.subscriber for d in push_service.received()] == [sub.id]


def test_a_push_over_max_push_bytes_gets_413_naming_it(app_with):
    client = app_with(max_push_bytes=4096)
    body = {"title": "t", "users": [str(uuid.uuid4()) for _ in range(200)]}
    error = client.post_json("/push", body, headers=AUTH, status=413).json["error"]
    assert "MAX_PUSH_BYTES" in error


def test_a_signed_webhook_can_send_to_users(app_with, push_service):
    import hashlib
    import hmac

    client = app_with(webhook_secret="hook-secret")
    sub = push_service.subscriber()
    bind(client, sub.subscription, "ana")
    client.post_json("/subscription", push_service.subscriber().subscription)
    body = json.dumps({"title": "Hi Ana", "users": ["ana"]}).encode()
    mac = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    client.post(
        "/webhooks/generic",
        body,
        headers={
            "Content-Type": "application/json",
            "X-Signature-256": f"sha256={mac}",
        },
        status=202,
    )
    [delivery] = push_service.wait_for(1)
    assert delivery.subscriber == sub.id


# -- a person's devices, and erasure ----------------------------------------------


def test_users_routes_need_the_push_token(app):
    bind(app, fake_subscription(1), "ana")
    app.get("/users/ana", status=401)
    app.delete("/users/ana", status=401)
    assert len(devices(app, "ana")) == 1


def test_a_delivery_sets_last_success_and_a_user_id_may_hold_any_printable_character(
    app, push_service
):
    user = "ana/ü 42@site"
    sub = push_service.subscriber()
    bind(app, sub.subscription, user)
    pushed(app, {"title": "t", "users": [user]})
    path = "/users/" + requests.utils.quote(user, safe="")
    [device] = app.get(path, headers=AUTH).json["subscriptions"]
    last = api.parse_rfc3339(device["last_success"])
    assert last is not None and abs(last - time.time()) < 60
    assert api.parse_rfc3339(device["created"]) <= last


def test_last_success_outlives_a_restart_and_rewrites_no_subscription_line(
    settings, push_service
):
    """On the JSON store a success is noted beside the records (written at
    most once a minute and at a stop), never by rewriting a record's line."""
    first = api.create_app(settings)
    client = webtest.TestApp(first)
    bind(client, push_service.subscriber().subscription, "ana")
    store_file = Path(settings.subscriptions_file)
    size = store_file.stat().st_size if not settings.redis_url else None
    pushed(client, {"title": "t", "users": ["ana"]})
    [device] = client.get("/users/ana", headers=AUTH).json["subscriptions"]
    assert device["last_success"] is not None
    if size is not None:
        assert store_file.stat().st_size == size
    close_app(first)
    again = webtest.TestApp(api.create_app(settings))
    try:
        [after] = again.get("/users/ana", headers=AUTH).json["subscriptions"]
        assert after["last_success"] == device["last_success"]
    finally:
        close_app(again.app)


def _receipt_rows(settings: api.Settings, subscriber: str) -> int:
    """How many receipts the store keeps that name ``subscriber``."""
    if not settings.redis_url:
        path = api.receipts_path(settings.journal_path)
        with sqlite3.connect(path) as db:
            query = "SELECT count(*) FROM receipts WHERE subscriber = ?"
            return db.execute(query, (subscriber,)).fetchone()[0]
    with redis.Redis.from_url(settings.redis_url) as client:
        keys = client.scan_iter(match=settings.redis_prefix + "rc:*", count=1000)
        return sum(client.sismember(k, subscriber) for k in keys)


def test_erasing_a_user_removes_their_subscriptions_and_receipts_and_logs_no_id(
    app, settings, push_service, caplog
):
    user = "erase-me-7f3a"
    mine = [push_service.subscriber() for _ in range(2)]
    ids = [bind(app, s.subscription, user).json["id"] for s in mine]
    other = push_service.subscriber()
    other_id = app.post_json("/subscription", other.subscription).json["id"]
    result = pushed(app, {"title": "t"})
    for delivery in push_service.received():
        app.post_json(
            f"/notifications/{result['id']}/events",
            {"event": "delivered", "receipt": delivery.message["receipt"]},
        )
    assert [_receipt_rows(settings, i) for i in ids] == [1, 1]
    with caplog.at_level(logging.INFO):
        app.delete(f"/users/{user}", headers=AUTH, status=204)
    devices(app, user, status=404)
    store = app.app.config["webpush.store"]
    assert [store.get(i) for i in ids] == [None, None]
    assert store.get(other_id) is not None
    assert [_receipt_rows(settings, i) for i in ids] == [0, 0]
    assert _receipt_rows(settings, other_id) == 1
    counted = app.get(f"/notifications/{result['id']}", headers=AUTH).json
    assert counted["delivered"] == 3  # numbers, linked to no one
    assert "erased a user" in caplog.text and "2 subscriptions" in caplog.text
    assert user not in caplog.text
    app.delete(f"/users/{user}", headers=AUTH, status=404)


def test_nothing_logs_a_user_id(app, push_service, caplog):
    user = "private-name-31"
    with caplog.at_level(logging.DEBUG):
        bind(app, push_service.subscriber().subscription, user)
        pushed(app, {"title": "t", "users": [user]})
        devices(app, user)
        app.delete(f"/users/{user}", headers=AUTH)
    assert user not in caplog.text
    assert api.logged_path(f"/users/{user}") == "/users/<id>"


def test_subscriptions_stored_before_users_are_read_without_loss(
    backend_env, tmp_path, server_factory, push_service
):
    """Records as earlier versions wrote them (no created, user or
    last_success) are served, sent to, and can be bound."""
    sub = push_service.subscriber()
    preload(backend_env, tmp_path, [sub.subscription])
    server = server_factory(USER_TOKEN_SECRET=SECRET, **backend_env).start()
    body = {**sub.subscription, "user": "ana", "user_token": token_for("ana")}
    answer = requests.post(server.url + "/subscription", json=body)
    assert answer.status_code == 200 and answer.json()["user"] == "ana"
    result = requests.post(
        server.url + "/push", json={"title": "t", "users": ["ana"]}, headers=WAIT
    ).json()
    assert result["sent"] == 1
    [device] = requests.get(server.url + "/users/ana", headers=AUTH).json()[
        "subscriptions"
    ]
    assert device["created"] is not None and device["last_success"] is not None


def test_the_user_index_survives_a_restart_and_kill_9(
    backend_env, server_factory, push_service
):
    env = {"USER_TOKEN_SECRET": SECRET, **backend_env}
    server = server_factory(**env).start()
    subs = [push_service.subscriber() for _ in range(3)]
    for n, sub in enumerate(subs):
        body = {
            **sub.subscription,
            "user": f"u{n % 2}",
            "user_token": token_for(f"u{n % 2}"),
        }
        assert requests.post(server.url + "/subscription", json=body).ok
    server.stop(9)
    server = server_factory(**env).start()
    result = requests.post(
        server.url + "/push", json={"title": "t", "users": ["u0"]}, headers=WAIT
    ).json()
    assert (result["total"], result["sent"]) == (2, 2)
    assert {d.subscriber for d in push_service.received()} == {subs[0].id, subs[2].id}


# -- the command line and the demo -------------------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "USER_TOKEN_SECRET"}
    return subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_user_token_command_prints_a_token_that_binds(app):
    done = _cli("user-token", "ana", "--ttl", "120", USER_TOKEN_SECRET=SECRET)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "ana" and 100 <= claims["exp"] - time.time() <= 120
    body = {**fake_subscription(1), "user": "ana", "user_token": token}
    assert app.post_json("/subscription", body).json["user"] == "ana"


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["ana"], {}, "USER_TOKEN_SECRET is not set"),
        (["ana"], {"USER_TOKEN_SECRET": "short"}, "at least 32 characters"),
        (["ana", "--ttl", "2592001"], {"USER_TOKEN_SECRET": SECRET}, "--ttl"),
        (["bad\tid"], {"USER_TOKEN_SECRET": SECRET}, "printable"),
    ],
)
def test_the_user_token_command_says_what_is_wrong_in_one_line(args, env, says):
    done = _cli("user-token", *args, **env)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr


def test_the_demo_sign_in_exists_only_with_demo_users_and_the_secret(
    app_with, tmp_path
):
    for n, changes in enumerate(({}, {"demo_users": True, "user_token_secret": ""})):
        file = str(tmp_path / f"off-{n}.json")
        client = app_with(subscriptions_file=file, **changes)
        client.post_json("/demo/user-token", {"user": "ana"}, status=404)
    client = app_with(demo_users=True)
    token = client.post_json("/demo/user-token", {"user": "ana"}).json["user_token"]
    body = {**fake_subscription(1), "user": "ana", "user_token": token}
    assert client.post_json("/subscription", body).json["user"] == "ana"
    client.post_json("/demo/user-token", {"user": ""}, status=400)
    client.post_json("/demo/user-token", {"user": "a", "admin": True}, status=400)


def test_a_server_process_sends_to_a_user_and_erases_them(
    backend_env, server_factory, push_service
):
    user = "ana-2e9b"
    server = server_factory(USER_TOKEN_SECRET=SECRET, **backend_env).start()
    sub = push_service.subscriber()
    token = token_for(user)
    body = {**sub.subscription, "user": user, "user_token": token}
    requests.post(server.url + "/subscription", json=body).raise_for_status()
    result = requests.post(
        server.url + "/push", json={"title": "t", "users": [user]}, headers=WAIT
    ).json()
    assert result["sent"] == 1
    gone = requests.delete(server.url + f"/users/{user}", headers=AUTH)
    assert gone.status_code == 204
    assert requests.get(server.url + f"/users/{user}", headers=AUTH).status_code == 404
    server.stop()
    output = server.output()
    assert "erased a user" in output and "GET /users/<id>" in output
    for secret in (user, token, SECRET, TOKEN):
        assert secret not in output


# -- docs/people.md's snippets, as a site's backend runs them -----------------------


def _readme_block(language: str, after: str) -> str:
    """The first ```language block of docs/people.md ("Notify one person", in
    full; the README has its short version) after ``after``."""
    page = (ROOT / "docs" / "people.md").read_text()
    return page.split(after, 1)[1].split(f"```{language}\n", 1)[1].split("```")[0]


def test_the_readme_python_token_snippet_makes_a_token_that_binds(
    app, push_service, monkeypatch
):
    monkeypatch.setenv("USER_TOKEN_SECRET", SECRET)
    scope: dict = {}
    exec(_readme_block("python", "In Python"), scope)  # noqa: S102 - README's own code
    body = {**push_service.subscriber().subscription, "user": "ana"}
    body["user_token"] = scope["push_user_token"]("ana")
    assert app.post_json("/subscription", body, status=201).json["user"] == "ana"


@pytest.fixture(scope="session")
def jsonwebtoken(tmp_path_factory) -> str:
    """A directory with npm's jsonwebtoken installed, as docs/people.md tells a Node site."""
    npm = shutil.which("npm")
    if not (npm and shutil.which("node")):
        if os.environ.get("CI"):
            pytest.fail("node and npm are missing: CI machines have them")
        pytest.skip("node and npm are not installed")
    where = tmp_path_factory.mktemp("node-site")
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "jsonwebtoken@9"],
        cwd=where,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return str(where)


def test_the_readme_node_token_snippet_makes_a_token_that_binds(
    app, push_service, jsonwebtoken
):
    script = _readme_block("js", "In Node") + '\nconsole.log(pushUserToken("ana"));\n'
    done = subprocess.run(
        ["node", "-e", script],
        cwd=jsonwebtoken,
        check=False,
        env={**os.environ, "USER_TOKEN_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    body = {**push_service.subscriber().subscription, "user": "ana"}
    body["user_token"] = done.stdout.strip()
    assert app.post_json("/subscription", body, status=201).json["user"] == "ana"
