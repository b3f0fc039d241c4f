"""The fixtures and helpers of every test module: test_api.py here and those
in tests/. Among them ``settings``, which runs each test that uses it on both
backends (JSON files, and the session's real redis-server from
tests/redis_server.py), the push-service stand-in (tests/push_service.py), and
real ``python api.py`` processes.

Fixtures reach the tests by name, as pytest gives them; the helpers below
them (``Server``, ``pushed``, ``wait_status``...) are imported from here."""

from __future__ import annotations

import contextlib
import dataclasses
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import api
from tests.ports import free_port
from tests.push_service import PushService, b64url
from tests.redis_server import RedisServer, fresh_prefix, require_redis_server

ROOT = Path(__file__).resolve().parent
LOCAL_PUSH = r"^http://127\.0\.0\.1:\d+/"
TOKEN = "test-push-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = {**AUTH, "Prefer": "wait=60"}  # POST /push answers once delivery ended
BACKENDS = ["json", "redis"]  # the stores the API tests run on, as their ids
# Seconds before a retry, doubled for the next: the default (1 s, then 2 s)
# would add a minute and a half to the suite; the promise is the same.
RETRY_BACKOFF = 0.05


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def push_service():
    with PushService() as service:
        yield service


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the whole session, on a free port; tests keep
    apart with ``fresh_prefix()`` instead of paying for a server each. Skipped
    when redis-server is missing, except in CI (CI=true), where it fails."""
    require_redis_server()
    server = RedisServer()
    yield server
    server.stop()


def _json_settings(tmp_path: Path) -> api.Settings:
    return api.Settings.from_env(
        {},
        vapid_dir=str(tmp_path / "vapid"),
        subscriptions_file=str(tmp_path / "subscriptions.json"),
        push_endpoint_pattern=LOCAL_PUSH,
        vapid_subject="mailto:ops@push.test",
        push_token=TOKEN,
        push_timeout=3.0,
        retry_backoff=RETRY_BACKOFF,
        push_processes=1,  # the server-process tests cover delivery processes
        rate_limit=0,  # tests that check it turn it on
        # The tests of other features read the classic JSON; the default,
        # Declarative Web Push, has tests/test_payloads.py.
        payload_format="classic",
    )


@pytest.fixture
def json_settings(tmp_path):
    """The settings of the JSON-lines backend alone: for the tests about its
    files (the store file, the journal, their locks and damage) and for those
    no store takes part in (VAPID keys, the delivery loop)."""
    return _json_settings(tmp_path)


@pytest.fixture(params=BACKENDS)
def settings(request, tmp_path):
    """The settings of each backend in turn, so every test of the API holds on
    both: ``json``, the JSON-lines files in ``tmp_path``, and ``redis``, the
    session's real redis-server under a key prefix of the test's own."""
    settings = _json_settings(tmp_path)
    if request.param == "redis":
        redis_server = request.getfixturevalue("redis_server")
        settings = dataclasses.replace(
            settings, redis_url=redis_server.url, redis_prefix=fresh_prefix()
        )
    return settings


def close_app(application) -> None:
    """Stop an app made with ``api.create_app``: its delivery, files, Redis."""
    application.config["webpush.close"]()


@pytest.fixture
def app(settings):
    application = api.create_app(settings)
    yield webtest.TestApp(application)
    close_app(application)


@pytest.fixture
def app_with(settings):
    """Makes a client of the app on ``settings`` with some changed; all are
    closed after the test."""
    made = []

    def make(**changes) -> webtest.TestApp:
        made.append(api.create_app(dataclasses.replace(settings, **changes)))
        return webtest.TestApp(made[-1])

    yield make
    for application in made:
        close_app(application)


@pytest.fixture
def store(app):
    return app.app.config["webpush.store"]


class Server:
    """A real ``python api.py`` process."""

    def __init__(self, tmp_path: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "VAPID_DIR": str(tmp_path / "vapid"),
            "SUBSCRIPTIONS_FILE": str(tmp_path / "subscriptions.json"),
            "PUSH_ENDPOINT_PATTERN": LOCAL_PUSH,
            "VAPID_SUBJECT": "mailto:ops@push.test",
            "PUSH_TOKEN": TOKEN,
            "RATE_LIMIT": "0",
            "RETRY_BACKOFF": str(RETRY_BACKOFF),
            "PAYLOAD_FORMAT": "classic",  # as in _json_settings
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "api.py")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.output()}")
                try:
                    if requests.get(self.url + "/health", timeout=1).ok:
                        return self
                except requests.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError(f"server did not start: {self.output()}")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@pytest.fixture
def server_factory(tmp_path):
    servers: list[Server] = []

    def make(**env: str) -> Server:
        servers.append(Server(tmp_path, **env))
        return servers[-1]

    yield make
    for server in servers:
        server.stop(signal.SIGKILL)


def env_of(backend: str, request) -> dict[str, str]:
    """What a real ``python api.py`` needs in its environment to run on
    ``backend`` (one of BACKENDS): nothing for the JSON files, REDIS_URL and
    a REDIS_PREFIX of the test's own for Redis."""
    if backend == "json":
        return {}
    redis_server = request.getfixturevalue("redis_server")
    return {"REDIS_URL": redis_server.url, "REDIS_PREFIX": fresh_prefix()}


@pytest.fixture(params=BACKENDS)
def backend_env(request) -> dict[str, str]:
    """:func:`env_of` each backend in turn."""
    return env_of(request.param, request)


@contextlib.contextmanager
def subscription_store(env: dict[str, str], tmp_path: Path):
    """The subscription store a real server on ``env`` (a ``backend_env``)
    keeps, opened by the test while no server runs: the JSON store file in
    ``tmp_path`` (as Server names it), or the store under REDIS_PREFIX."""
    if env.get("REDIS_URL"):
        client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
        store = api.RedisSubscriptionStore(client, env["REDIS_PREFIX"])
    else:
        store = api.JsonSubscriptionStore(tmp_path / "subscriptions.json")
    try:
        yield store
    finally:
        store.close()


def preload(
    env: dict[str, str], tmp_path: Path, subscriptions: list[dict], topics=()
) -> None:
    """Stores ``subscriptions`` (as browsers send them), on ``topics``, before
    a real server on ``env`` starts: far faster than thousands of POSTs, and
    through the store itself, so on either backend."""
    records = [
        {"id": api.subscription_id(sub["endpoint"]), **sub, "topics": list(topics)}
        for sub in subscriptions
    ]
    with subscription_store(env, tmp_path) as store:
        store.write(records)


def fake_subscription(n: int, port: int = 9) -> dict:
    """A valid subscription that points at a local port nobody answers on."""
    key = ec.derive_private_key(1000 + n, ec.SECP256R1()).public_key()
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {
        "endpoint": f"http://127.0.0.1:{port}/push/fake-{n}",
        "expirationTime": None,
        "keys": {"p256dh": b64url(point), "auth": b64url(n.to_bytes(16, "big"))},
    }


def pushed(client: webtest.TestApp, body: dict, headers: dict = WAIT) -> dict:
    """POST /push and wait for its delivery to end: the notification's final
    status document (counts, channels, the commonest causes of failure)."""
    response = client.post_json("/push", body, headers=headers)
    assert response.status_int == 200, response.json
    return response.json


def server_pushed(server: Server, body: dict, headers: dict = WAIT) -> dict:
    """:func:`pushed`, through a real server process."""
    response = requests.post(server.url + "/push", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def status_document(target: webtest.TestApp | Server, notification_id: str) -> dict:
    """GET /notifications/<id> of an app or of a real server process."""
    path = f"/notifications/{notification_id}"
    if isinstance(target, Server):
        return requests.get(target.url + path, headers=AUTH, timeout=10).json()
    return target.get(path, headers=AUTH).json


def wait_status(
    target: webtest.TestApp | Server,
    notification_id: str,
    *statuses: str,
    timeout: float = 30,
) -> dict:
    """The notification's status document once its status is one of
    ``statuses`` (any that has ended, when none is named): what a test waits
    for, rather than sleeping and hoping delivery was quick enough."""
    wanted = statuses or api.FINISHED
    deadline = time.monotonic() + timeout
    while True:
        document = status_document(target, notification_id)
        if document["status"] in wanted:
            return document
        assert time.monotonic() < deadline, f"not {' or '.join(wanted)}: {document}"
        time.sleep(0.05)


def stored_state(settings: api.Settings) -> dict:
    """Everything stored on ``settings``' backend, byte for byte, to compare
    before and after: the store's file and the journal's (JSON), or every key
    under the Redis prefix, as DUMP gives it. A stream is compared by its
    entries and its consumer groups' positions instead, as its DUMP also holds
    when each consumer last read, which an idle app changes; likewise
    ``consumers`` by its members, as each process renews its time there."""
    if not settings.redis_url:
        return {
            path.name: path.read_bytes() if path.exists() else None
            for path in (
                Path(settings.subscriptions_file),
                settings.journal_path,
                api.receipts_path(settings.journal_path),
                api.receipts_path(settings.journal_path).with_suffix(".sqlite-wal"),
            )
        }
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", settings.redis_prefix) + "*"
    state: dict = {}
    with redis.Redis.from_url(settings.redis_url) as client:
        for key in sorted(client.scan_iter(match=pattern, count=1000)):
            if key == settings.redis_prefix.encode() + b"consumers":
                state[key] = client.zrange(key, 0, -1)
            elif client.type(key) == b"stream":
                groups = client.xinfo_groups(key)
                state[key] = (
                    client.xrange(key),
                    [(g["name"], g["pending"], g["last-delivered-id"]) for g in groups],
                )
            else:
                state[key] = client.dump(key)
    return state


@pytest.fixture
def fcm():
    from tests.fcm_service import FcmService

    with FcmService() as service:
        yield service


@pytest.fixture
def fcm_app(app_with, fcm, tmp_path):
    account = fcm.service_account(tmp_path / "service-account.json")
    return app_with(fcm_service_account=str(account), fcm_api_url=fcm.url)


def device_token(n: int) -> str:
    return f"dev{n}:APA91b" + os.urandom(40).hex()


@pytest.fixture
def unchanged(app, settings):
    """One subscription stored; returns a function that checks nothing stored
    changed since, on either backend."""
    app.post_json("/subscription", fake_subscription(50))
    before = stored_state(settings)
    store = app.app.config["webpush.store"]
    assert before and len(store) == 1

    def unchanged() -> bool:
        return stored_state(settings) == before and len(store) == 1

    return unchanged


@contextlib.contextmanager
def mounted_tmpfs(tmp_path: Path, size: str):
    """A real tmpfs of ``size`` (``256k``, ``4m``), mounted in ``tmp_path`` for
    a full-disk test (root only: CI is), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must mount a tmpfs: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here (not root?): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
