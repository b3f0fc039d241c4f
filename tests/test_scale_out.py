"""Scaling out on Redis (docs/scaling-out.md): several ``python api.py`` and
``python api.py --worker`` processes on one real redis-server share the
subscriptions, the notifications and the work, and survive one of them dying.

Every process here is real, started the way docs/scaling-out.md says; the push service is
the decrypting stand-in on 127.0.0.1.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
import webtest

import api
from conftest import (
    AUTH,
    LOCAL_PUSH,
    ROOT,
    TOKEN,
    WAIT,
    Server,
    fake_subscription,
    free_port,
    stored_state,
)
from tests.push_service import PushService
from tests.redis_server import RedisServer, fresh_prefix

# What one worker may have in flight, so what a kill -9 may send twice
# (docs/scaling-out.md): BATCHES_PER_PROCESS batches per delivery process of BATCH_SIZE.
WORKER_BOUND = api.BATCHES_PER_PROCESS * api.BATCH_SIZE  # PUSH_PROCESSES=1


class Worker:
    """A real ``python api.py --worker`` process."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str):
        self.log = tmp_path / f"worker-{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "api.py"), "--worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while "delivering from" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)


@pytest.fixture
def cluster(tmp_path, redis_server):
    """Makes HTTP processes and workers on one Redis prefix, with one VAPID
    key given to all of them (VAPID_PRIVATE_KEY) and one push token."""
    key = api.b64url_encode(
        api.ec.generate_private_key(api.ec.SECP256R1())
        .private_numbers()
        .private_value.to_bytes(32, "big")
    )
    prefix = fresh_prefix()
    started: list = []

    class Cluster:
        env = {  # noqa: RUF012 - one cluster per test
            "REDIS_URL": redis_server.url,
            "REDIS_PREFIX": prefix,
            "VAPID_PRIVATE_KEY": key,
            "WORKER_TIMEOUT": "2",
            "PUSH_PROCESSES": "1",
            "PUSH_TIMEOUT": "5",
        }
        store = api.RedisSubscriptionStore(redis_server.client(), prefix)

        def http(self, **env: str) -> Server:
            server = Server(tmp_path, **self.env, **env)
            started.append(server)
            return server.start()

        def worker(self, name: str, **env: str) -> Worker:
            worker_env = {
                **os.environ,
                "VAPID_DIR": str(tmp_path / "vapid"),
                "PUSH_ENDPOINT_PATTERN": LOCAL_PUSH,
                "VAPID_SUBJECT": "mailto:ops@push.test",
                "PYTHONUNBUFFERED": "1",
                **self.env,
                **env,
            }
            worker = Worker(tmp_path, worker_env, name)
            started.append(worker)
            worker.wait_ready()
            return worker

    yield Cluster()
    for process in started:
        process.stop(signal.SIGKILL)
    Cluster.store.close()


def stored(push_service: PushService, store, count: int) -> list:
    """``count`` subscribers of the stand-in, written straight into Redis."""
    validate = api.Validator(
        api.Settings.from_env({}, push_endpoint_pattern=LOCAL_PUSH)
    )
    subscribers = [push_service.subscriber() for _ in range(count)]
    records = []
    for subscriber in subscribers:
        record = validate.subscription(subscriber.subscription)
        record.update(created=int(time.time()), topics=record["topics"] or [])
        records.append(record)
    for start in range(0, len(records), 1000):
        store.write(records[start : start + 1000])
    return subscribers


def status(server: Server, notification_id: str) -> dict:
    response = requests.get(
        f"{server.url}/notifications/{notification_id}", headers=AUTH, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def _api(
    *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    """``python api.py ARGS`` to its end, with no REDIS_URL but ``env``'s."""
    return subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *args],
        env={**{k: v for k, v in os.environ.items() if k != "REDIS_URL"}, **env},
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def _migrate(target: str, **env: str) -> subprocess.CompletedProcess:
    return _api("--migrate-store", target, **env)


def test_two_http_processes_and_two_workers_share_redis_and_survive_a_kill_9(
    cluster,
):
    with PushService() as push_service:
        first = cluster.http(API_DELIVERS="false")  # the workers do the sending
        second = cluster.http(API_DELIVERS="false")
        doomed, survivor = cluster.worker("doomed"), cluster.worker("survivor")
        subscribers = stored(push_service, cluster.store, 10_000)

        added = push_service.subscriber()
        response = requests.post(f"{first.url}/subscription", json=added.subscription)
        assert response.status_code == 201
        gone = subscribers.pop()
        response = requests.delete(
            f"{second.url}/subscription", json={"endpoint": gone.endpoint}
        )
        assert response.status_code == 204
        subscribers.append(added)
        assert requests.get(f"{second.url}/health").json()["subscriptions"] == 10_000

        response = requests.post(
            f"{first.url}/push", json={"title": "Scaled out"}, headers=AUTH
        )
        assert response.status_code == 202
        notification_id = response.json()["id"]
        assert response.json()["subscriptions"] == 10_000
        push_service.wait_for(2_000, timeout=60)
        doomed.stop(signal.SIGKILL)  # in the middle of its batches

        deadline = time.monotonic() + 120
        while status(second, notification_id)["status"] != "done":
            assert time.monotonic() < deadline, status(second, notification_id)
            time.sleep(0.2)
        for server in (first, second):
            document = status(server, notification_id)
            assert document["status"] == "done"
            assert document["total"] == document["sent"] == 10_000
            assert document["failed"] == document["removed"] == document["pending"] == 0

    received = collections.Counter(d.subscriber for d in push_service.received())
    assert all(d.error is None for d in push_service.received())
    assert {s.id for s in subscribers} == set(received)  # everyone, and only them
    assert gone.id not in received
    duplicates = sum(received.values()) - len(received)
    assert duplicates <= WORKER_BOUND, duplicates
    assert "its process went silent" in survivor.output()


def test_a_scheduled_notification_fires_exactly_once_however_many_processes_run(
    cluster,
):
    with PushService() as push_service:
        servers = [cluster.http(), cluster.http()]
        cluster.worker("a")
        cluster.worker("b")
        subscribers = stored(push_service, cluster.store, 300)
        response = requests.post(
            f"{servers[0].url}/push",
            json={"title": "Later", "delay": 2},
            headers=AUTH,
        )
        assert response.json()["status"] == "scheduled"
        notification_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while (document := status(servers[1], notification_id))["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert document["sent"] == document["total"] == 300  # one fan-out, counted once
    received = collections.Counter(d.subscriber for d in push_service.received())
    assert received == {s.id: 1 for s in subscribers}


def test_a_stopped_worker_hands_its_batches_back_at_once(cluster):
    with PushService(latency=0.05) as push_service:
        server = cluster.http(API_DELIVERS="false")
        leaving = cluster.worker("leaving", PUSH_CONCURRENCY="20")
        stored(push_service, cluster.store, 2_000)
        response = requests.post(
            f"{server.url}/push", json={"title": "t"}, headers=AUTH
        )
        notification_id = response.json()["id"]
        push_service.wait_for(100, timeout=30)
        leaving.stop()  # SIGTERM: what it has not sent goes back to Redis
        assert leaving.proc.returncode == 0
        client, prefix = cluster.store.redis, cluster.env["REDIS_PREFIX"]
        group = [  # and it leaves no name in any push service's stream
            consumer
            for stream in client.smembers(prefix + "streams")
            for consumer in client.xinfo_consumers(stream, "delivery")
        ]
        delivering = client.zrange(prefix + "consumers", 0, -1)
        mine = f"-{leaving.proc.pid}-"
        assert not [c for c in group if mine in c["name"]], group
        assert not [name for name in delivering if mine in name], delivering
        cluster.worker("staying", WORKER_TIMEOUT="3600")  # it claims nothing
        deadline = time.monotonic() + 60
        while (document := status(server, notification_id))["status"] != "done":
            assert time.monotonic() < deadline, document
            time.sleep(0.2)
    assert document["sent"] == document["total"] == 2_000
    received = collections.Counter(d.subscriber for d in push_service.received())
    assert len(received) == 2_000


def test_health_counts_the_processes_that_deliver_and_the_log_says_when_none_does(
    cluster,
):
    with PushService() as push_service:
        server = cluster.http(API_DELIVERS="false")
        health = functools.partial(requests.get, f"{server.url}/health")
        assert health().json()["workers"] == 0
        subscriber = stored(push_service, cluster.store, 1)[0]
        response = requests.post(
            f"{server.url}/push", json={"title": "t"}, headers=AUTH
        )
        notification_id = response.json()["id"]
        deadline = time.monotonic() + 10
        while "no process has said for 2 s that it delivers" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        assert status(server, notification_id)["status"] == "sending"
        cluster.worker("late")
        assert health().json()["workers"] == 1
        deadline = time.monotonic() + 30
        while status(server, notification_id)["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(push_service.received(subscriber)) == 1
        delivering = cluster.http()  # API_DELIVERS=true: it takes batches too
        deadline = time.monotonic() + 5  # it reads the stream every half second
        while requests.get(f"{delivering.url}/health").json()["workers"] != 2:
            assert time.monotonic() < deadline, health().json()
            time.sleep(0.05)


def test_the_rate_limit_is_shared_by_every_http_process(cluster):
    first = cluster.http(RATE_LIMIT="3")
    second = cluster.http(RATE_LIMIT="3")
    answers = [
        requests.post(f"{server.url}/subscription", json=fake_subscription(n))
        for n, server in enumerate([first, second, first, second])
    ]
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    assert answers[-1].json()["error"].startswith("too many subscription changes")


def test_a_process_with_another_vapid_key_is_refused(cluster, tmp_path):
    cluster.http()
    other = Server(tmp_path, **{**cluster.env, "VAPID_PRIVATE_KEY": ""})
    other.env["VAPID_DIR"] = str(tmp_path / "another-vapid")
    other.start(wait=False)
    assert other.proc.wait(30) == 2
    assert re.search(
        r"VAPID key \(\S{12}\.\.\.\) is not the one the other processes on this "
        r"Redis use \(\S{12}\.\.\.\)",
        other.output(),
    ), other.output()


def test_worker_without_redis_url_is_a_clear_error():
    result = _api("--worker")
    assert result.returncode == 2
    assert "--worker takes its work from Redis: set REDIS_URL" in result.stderr


def test_api_delivers_false_without_redis_is_a_warning_and_it_still_delivers(
    tmp_path,
):
    with PushService() as push_service:
        server = Server(tmp_path, API_DELIVERS="false").start()
        try:
            subscriber = push_service.subscriber()
            requests.post(f"{server.url}/subscription", json=subscriber.subscription)
            pushed = requests.post(
                f"{server.url}/push", json={"title": "t"}, headers=WAIT
            ).json()
            assert pushed["sent"] == 1, pushed
            assert "API_DELIVERS=false is for Redis" in server.output()
        finally:
            server.stop(signal.SIGKILL)


def test_an_unreachable_redis_stops_the_start_with_one_clear_line(tmp_path):
    with RedisServer() as redis_server:
        url = redis_server.url
    server = Server(tmp_path, REDIS_URL=url).start(wait=False)
    assert server.proc.wait(30) == 2
    assert f"cannot reach Redis at {url}" in server.output()


def test_when_redis_goes_away_requests_get_503_json_not_500(tmp_path):
    with RedisServer() as redis_server:
        server = Server(
            tmp_path,
            REDIS_URL=redis_server.url,
            REDIS_PREFIX="x:",
            WEBHOOK_SECRET="a-webhook-secret",
        )
        server.start()
        try:
            assert (
                requests.post(
                    f"{server.url}/subscription", json=fake_subscription(1)
                ).status_code
                == 201
            )
            redis_server.stop()
            response = requests.post(
                f"{server.url}/subscription", json=fake_subscription(2)
            )
            assert response.status_code == 503
            assert "nothing was stored" in response.json()["error"]
            response = requests.post(
                f"{server.url}/push", json={"title": "t"}, headers=WAIT
            )
            assert response.status_code == 503, response.text
            for method, path, body, headers in [
                ("GET", "/health", None, {}),
                ("GET", "/notifications", None, AUTH),
                ("GET", "/notifications/AAAAAAAAAAAAAAAA", None, AUTH),
                ("DELETE", "/notifications/AAAAAAAAAAAAAAAA", None, AUTH),
                ("DELETE", "/subscription", fake_subscription(1), {}),
                ("POST", "/subscription/test", fake_subscription(1), {}),
                ("POST", "/webhooks/generic", {"title": "t"}, AUTH),
            ]:
                response = requests.request(
                    method, server.url + path, json=body, headers=headers
                )
                assert response.status_code == 503, (path, response.text)
                assert (
                    "Redis" in response.json()["error"]
                    or "store" in (response.json()["error"])
                ), (path, response.text)
            assert "Traceback" not in server.output()
        finally:
            server.stop(signal.SIGKILL)


def test_a_full_redis_refuses_writes_with_507_changes_nothing_and_recovers(tmp_path):
    with RedisServer() as redis_server:  # its own: maxmemory is server-wide
        server = Server(
            tmp_path, REDIS_URL=redis_server.url, REDIS_PREFIX="full:", RATE_LIMIT="60"
        )
        server.start()
        settings = api.Settings.from_env(
            {}, redis_url=redis_server.url, redis_prefix="full:"
        )
        try:
            subscribe = functools.partial(requests.post, f"{server.url}/subscription")
            assert subscribe(json=fake_subscription(1)).status_code == 201
            with redis_server.client() as client:
                # Below what it holds: noeviction refuses every write (OOM).
                client.config_set("maxmemory", client.info("memory")["used_memory"])
                before = stored_state(settings)
                refused = subscribe(json=fake_subscription(2))
                assert refused.status_code == 507, refused.text
                assert "Redis is out of memory" in refused.json()["error"]
                push = requests.post(
                    f"{server.url}/push", json={"title": "t"}, headers=AUTH
                )
                assert push.status_code == 507, push.text
                assert stored_state(settings) == before
                gone = requests.delete(  # an unsubscribe frees room: allowed
                    f"{server.url}/subscription", json=fake_subscription(1)
                )
                assert gone.status_code == 204, gone.text
                client.config_set("maxmemory", 0)  # room again: it recovers
            assert subscribe(json=fake_subscription(2)).status_code == 201
            assert requests.get(f"{server.url}/health").json()["subscriptions"] == 1
            assert "Traceback" not in server.output()
        finally:
            server.stop(signal.SIGKILL)


def _json_store_with(path: Path, count: int) -> list[dict]:
    store = api.JsonSubscriptionStore(path)
    records = []
    for n in range(count):
        record = api.Validator(
            api.Settings.from_env({}, push_endpoint_pattern=LOCAL_PUSH)
        ).subscription(fake_subscription(n))
        record.update(created=1_700_000_000 + n, topics=["news"] if n % 2 else [])
        records.append(record)
    store.write(records)
    store.close()
    return records


def test_migrate_store_copies_json_into_redis_and_back_idempotently_with_last_successes(
    tmp_path, redis_server
):
    source = tmp_path / "subscriptions.json"
    records = _json_store_with(source, 2_500)
    prefix = fresh_prefix()
    env = {
        "SUBSCRIPTIONS_FILE": str(source),
        "REDIS_PREFIX": prefix,
        "VAPID_DIR": str(tmp_path / "vapid"),
    }
    result = _migrate(redis_server.url, **env)
    assert result.returncode == 0, result.stderr
    assert "copied 2500 subscriptions (0 already there" in result.stderr
    again = _migrate(redis_server.url, **env)  # nothing doubles, nothing rewritten
    assert "copied 0 subscriptions (2500 already there" in again.stderr
    redis_store = api.RedisSubscriptionStore(redis_server.client(), prefix)
    assert len(redis_store) == 2_500
    assert redis_store.count("webpush", "news") == 1_250
    assert sorted(redis_store.list(), key=lambda r: r["id"]) == sorted(
        records, key=lambda r: r["id"]
    )
    redis_store.remove(records[0]["id"])
    reached = 1_700_000_000  # a last success, and a recent one, go back too
    redis_store.note_deliveries([], [records[2]["id"]], 5, reached, 2)
    back = tmp_path / "back.json"
    result = _migrate(str(back), **env, REDIS_URL=redis_server.url)
    assert result.returncode == 0, result.stderr
    assert "copied 2499 subscriptions" in result.stderr
    size = back.stat().st_size
    result = _migrate(str(back), **env, REDIS_URL=redis_server.url)
    assert "copied 0 subscriptions (2499 already there" in result.stderr
    assert back.stat().st_size == size
    copy = api.JsonSubscriptionStore(back)
    assert len(copy) == 2_499
    assert copy.get(records[1]["id"]) == records[1]
    assert copy.get(records[2]["id"]) == {**records[2], "last_success": reached}
    copy.close()
    redis_store.close()


def test_migrate_store_brings_the_vapid_key_and_refuses_a_redis_with_another(
    tmp_path, redis_server
):
    source = tmp_path / "subscriptions.json"
    _json_store_with(source, 10)
    keys = api.VapidKeys.load_or_create(
        api.Settings.from_env({}, vapid_dir=str(tmp_path / "vapid"))
    )
    env = {"SUBSCRIPTIONS_FILE": str(source), "VAPID_DIR": str(tmp_path / "vapid")}
    taken, free = fresh_prefix(), fresh_prefix()
    with redis_server.client() as client:
        client.set(taken + "vapid_public_key", "another-servers-key")
        refused = _migrate(redis_server.url, **env, REDIS_PREFIX=taken)
        assert refused.returncode == 2
        assert "is not the one the other processes on this Redis use (another-ser" in (
            refused.stderr
        )
        assert client.hlen(taken + "subs") == 0
        result = _migrate(redis_server.url, **env, REDIS_PREFIX=free)
        assert result.returncode == 0, result.stderr
        assert client.get(free + "vapid_public_key") == keys.public_key
        assert client.hlen(free + "subs") == 10


@pytest.mark.parametrize(
    ("target", "env", "message"),
    [
        ("x.json", {}, "a JSON file is copied from Redis: set REDIS_URL"),
        ("http://127.0.0.1:6379/0", {}, "give a redis://, rediss:// or unix:// URL"),
        (
            "redis://127.0.0.1:9/0",
            {"SUBSCRIPTIONS_FILE": "no/such/subscriptions.json"},
            "SUBSCRIPTIONS_FILE no/such/subscriptions.json does not exist",
        ),
    ],
    ids=["json without redis_url", "not a redis url", "no such json file"],
)
def test_migrate_store_mistakes_are_one_clear_line_and_create_nothing(
    tmp_path, target, env, message
):
    result = _api("--migrate-store", target, cwd=tmp_path, **env)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_worker_and_migrate_store_together_are_refused(tmp_path):
    result = _api("--worker", "--migrate-store", "x", cwd=tmp_path)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_push_token_differing_between_http_processes_is_refused(cluster, tmp_path):
    cluster.http()
    other = Server(tmp_path, **{**cluster.env, "PUSH_TOKEN": TOKEN + "-other"})
    other.start(wait=False)
    assert other.proc.wait(30) == 2
    assert "push token is not the one the other processes" in other.output()


def test_the_redis_password_is_never_logged(tmp_path, redis_server):
    # This redis-server has no password, so the start fails on AUTH: the
    # messages about it must still hide the password.
    url = redis_server.url.replace("redis://", "redis://:hunter2-secret@")
    server = Server(tmp_path, REDIS_URL=url).start(wait=False)
    assert server.proc.wait(30) == 2
    output = server.output()
    assert "cannot reach Redis at redis://:***@127.0.0.1" in output
    assert "hunter2" not in output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://default:pw@h/0", "redis://default:***@h/0"),
        ("rediss://u:p%40ss@h/0", "rediss://u:***@h/0"),
        ("redis://:p@ss/w#rd%41@h:6379/0", "redis://:***@h:6379/0"),  # not encoded
        ("redis://h:6379/0?password=p@ss/w#rd", "redis://h:6379/0?password=***"),
        ("redis://h/0?db=1&password=pw&x=1", "redis://h/0?db=1&password=***"),
        (
            "unix:///run/redis.sock?db=0&password=pw",
            "unix:///run/redis.sock?db=0&password=***",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
    ],
)
def test_a_redis_url_in_a_log_line_hides_its_password_however_written(url, shown):
    assert api.redact_url(url) == shown


def test_a_unix_socket_redis_url_serves_and_delivers(tmp_path):
    with RedisServer(unix=True) as redis_server, PushService() as push_service:
        server = Server(tmp_path, REDIS_URL=redis_server.url).start()
        try:
            subscriber = push_service.subscriber()
            answer = requests.post(
                f"{server.url}/subscription", json=subscriber.subscription
            )
            assert answer.status_code == 201, answer.text
            pushed = requests.post(
                f"{server.url}/push", json={"title": "t"}, headers=WAIT
            ).json()
            assert pushed["status"] == "done" and pushed["sent"] == 1, pushed
            assert len(push_service.received(subscriber)) == 1
        finally:
            server.stop(signal.SIGKILL)


def test_a_redis_that_lost_its_data_is_delivered_from_again(tmp_path):
    with RedisServer() as redis_server, PushService() as push_service:
        server = Server(tmp_path, REDIS_URL=redis_server.url).start()
        subscribe = functools.partial(requests.post, f"{server.url}/subscription")
        try:
            assert subscribe(json=push_service.subscriber().subscription).ok
            with redis_server.client() as client:
                client.flushall()  # a restart without persistence, say
            subscriber = push_service.subscriber()
            assert subscribe(json=subscriber.subscription).status_code == 201
            pushed = requests.post(
                f"{server.url}/push", json={"title": "t"}, headers=WAIT
            ).json()
            assert pushed["status"] == "done" and pushed["sent"] == 1, pushed
            assert len(push_service.received(subscriber)) == 1
            # The first batch after the loss makes its stream and group anew.
            assert "Traceback" not in server.output()
        finally:
            server.stop(signal.SIGKILL)


def test_a_read_only_redis_answers_503_json_and_changes_nothing(tmp_path):
    with RedisServer() as redis_server:
        server = Server(tmp_path, REDIS_URL=redis_server.url, REDIS_PREFIX="ro:")
        server.start()
        settings = api.Settings.from_env(
            {}, redis_url=redis_server.url, redis_prefix="ro:"
        )
        subscribe = functools.partial(requests.post, f"{server.url}/subscription")
        try:
            assert subscribe(json=fake_subscription(1)).status_code == 201
            with redis_server.client() as client:
                before = stored_state(settings)
                # A replica of a master that is not there: read-only, data kept.
                client.replicaof("127.0.0.1", str(free_port()))
                for response in (
                    subscribe(json=fake_subscription(2)),
                    requests.post(
                        f"{server.url}/push", json={"title": "t"}, headers=AUTH
                    ),
                ):
                    assert response.status_code == 503, response.text
                    assert "Redis" in response.json()["error"]
                assert stored_state(settings) == before
                client.replicaof("NO", "ONE")
            assert subscribe(json=fake_subscription(2)).status_code == 201
            assert "Traceback" not in server.output()
        finally:
            server.stop(signal.SIGKILL)


def test_a_batch_whose_recording_redis_refuses_is_recorded_again_not_sent_twice(
    json_settings, redis_server, push_service, monkeypatch
):
    settings = dataclasses.replace(
        json_settings, redis_url=redis_server.url, redis_prefix=fresh_prefix()
    )
    application = api.create_app(settings)
    try:
        client = webtest.TestApp(application)
        for _ in range(3):
            subscriber = push_service.subscriber()
            client.post_json("/subscription", subscriber.subscription)
        queue = application.config["webpush.queue"]
        complete, refusals = queue.jobs._scripts["complete"], []

        def blinking(*args, **kwargs):  # Redis drops the first two completions
            if len(refusals) < 2:
                refusals.append(1)
                raise redis.ConnectionError("Connection reset by peer")
            return complete(*args, **kwargs)

        monkeypatch.setitem(queue.jobs._scripts, "complete", blinking)
        answer = client.post_json("/push", {"title": "t"}, headers=WAIT).json
        assert answer["status"] == "done" and answer["sent"] == 3, answer
        assert len(refusals) == 2
        received = collections.Counter(d.subscriber for d in push_service.received())
        assert sorted(received.values()) == [1, 1, 1]
    finally:
        application.config["webpush.close"]()


def test_a_cancel_through_one_process_stops_the_workers_within_a_second(cluster):
    with PushService(latency=0.05) as push_service:
        server = cluster.http(API_DELIVERS="false")
        cluster.worker("busy", PUSH_CONCURRENCY="20")
        stored(push_service, cluster.store, 5_000)
        response = requests.post(
            f"{server.url}/push", json={"title": "t"}, headers=AUTH
        )
        notification_id = response.json()["id"]
        push_service.wait_for(300, timeout=30)
        other = cluster.http(API_DELIVERS="false")
        cancelled = requests.delete(
            f"{other.url}/notifications/{notification_id}", headers=AUTH
        )
        assert cancelled.status_code == 200, cancelled.text
        at_cancel = len(push_service.received())
        time.sleep(1)
        within_a_second = len(push_service.received())
        # Every batch has come back (a batch leaves the stream once recorded),
        # and a cancelled notification is planned no further: none is left to
        # send, whether a process held it or had yet to read it.
        batches = cluster.env["REDIS_PREFIX"] + "batches"
        deadline = time.monotonic() + 10
        while cluster.store.redis.xlen(batches):
            assert time.monotonic() < deadline, cluster.store.redis.xlen(batches)
            time.sleep(0.05)
        assert len(push_service.received()) == within_a_second
        # In a second: what was under way, at 20 at a time and 50 ms each.
        assert within_a_second - at_cancel < 500, (at_cancel, within_a_second)
        assert status(server, notification_id)["status"] == "cancelled"


def test_a_process_keeps_only_the_batches_it_still_holds(redis_server):
    prefix = fresh_prefix()
    stream = prefix + "batches:https://push.test"
    with redis_server.client() as client:
        client.xgroup_create(stream, "delivery", id="0", mkstream=True)
        first, second = (client.xadd(stream, {"n": "x", "ids": "a"}) for _ in "12")
        client.xreadgroup("delivery", "silent", {stream: ">"}, count=2)
        time.sleep(0.05)
        client.xclaim(stream, "delivery", "other", 0, [first], justid=True)
        keep = client.register_script(api.BATCHES_KEEP_LUA)
        keep(args=["silent", stream, first, stream, second])  # back from its pause
        held = {
            p["message_id"]: (p["consumer"], p["time_since_delivered"])
            for p in client.xpending_range(stream, "delivery", "-", "+", 10)
        }
        assert held[first][0] == "other"  # not taken back
        assert held[second][0] == "silent" and held[second][1] < 50  # kept


def test_fcm_tokens_a_worker_without_fcm_settings_is_given_fail_visibly(
    cluster, tmp_path
):
    from tests.fcm_service import FcmService

    with PushService() as push_service, FcmService() as fcm:
        account = fcm.service_account(tmp_path / "service-account.json")
        server = cluster.http(
            API_DELIVERS="false", FCM_SERVICE_ACCOUNT=str(account), FCM_API_URL=fcm.url
        )
        cluster.worker("without-fcm")
        subscriber = stored(push_service, cluster.store, 1)[0]
        token = {"fcm_token": "dev1:APA91b" + os.urandom(40).hex()}
        assert requests.post(f"{server.url}/subscription", json=token).ok
        response = requests.post(
            f"{server.url}/push", json={"title": "t"}, headers=AUTH
        )
        notification_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while (document := status(server, notification_id))["status"] != "done":
            assert time.monotonic() < deadline, document
            time.sleep(0.1)
    assert document["channels"]["webpush"]["sent"] == 1
    assert document["channels"]["fcm"]["failed"] == 1
    [error] = document["errors"]
    assert "give every process the same FCM_SERVICE_ACCOUNT" in error["reason"]
    assert len(push_service.received(subscriber)) == 1


def test_a_workers_figures_reach_prometheus_on_its_metrics_port(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    port = free_port()
    with PushService() as push_service:
        guard = {"METRICS_TOKEN": "metrics-token-0123456789"}
        metrics_auth = {"Authorization": f"Bearer {guard['METRICS_TOKEN']}"}
        server = cluster.http(API_DELIVERS="false", **guard)
        cluster.worker("w", METRICS_PORT=str(port), **guard)
        for _ in range(5):
            requests.post(
                server.url + "/subscription",
                json=push_service.subscriber().subscription,
            )
        done = requests.post(server.url + "/push", json={"title": "t"}, headers=WAIT)
        assert done.json()["sent"] == 5
        url = f"http://127.0.0.1:{port}/metrics"
        assert requests.get(url).status_code == 401
        found = samples(requests.get(url, headers=metrics_auth).text)
        service = (("channel", "webpush"), ("origin", push_service.origin))
        assert found[("webpush_messages_total", (*service, ("result", "sent")))] == 5
        # The API process delivered none: its own counters have none.
        api_text = requests.get(server.url + "/metrics", headers=metrics_auth).text
        api_found = samples(api_text)
        sent = ("webpush_messages_total", (*service, ("result", "sent")))
        assert sent not in api_found
        assert api_found[("webpush_notifications", (("status", "done"),))] == 1
