# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "bottle>=0.13,<0.14",
#     "waitress>=3.0,<4",
#     "pywebpush>=2.0,<3",
#     "http-ece>=1.2,<2",
#     "py-vapid>=1.9,<2",
#     "cryptography>=42",
#     "pycurl>=7.48",
#     "pyfcm>=2.0,<3",
#     "redis>=5.0",
#     "PyJWT>=2.8,<3",
#     "prometheus_client>=0.20",
#     "tzdata>=2024.1",
# ]
# ///
"""A self-hosted Web Push server in one file.

Copy ``api.py``, ``static/`` and ``requirements.txt``, then run ``python api.py``.
It keeps a VAPID key pair in ``vapid/``, stores browser push subscriptions and
native-app FCM tokens in a JSON-lines file, keeps each notification as a
durable job in a journal beside it, fans notifications out to them
(RFC 8030/8291/8292: pywebpush's encryption, py_vapid, libcurl over HTTP/2;
FCM HTTP v1 with pyfcm), and turns signed webhooks into notifications.

Sections, top to bottom, each using only those above it (a test checks):
Configuration (settings), Keys (VAPID, tokens, user tokens), Messages (pure values and
rules: a message, its outcomes, a notification's record and status document,
endpoint rules), Store (the subscription stores and the job stores, JSON and
Redis, behind one interface each), Delivery (web push and FCM: outcomes
only), Notifications (the one engine: policy), Webhooks, Metrics (fed by
outcomes), HTTP (plugins, validation, routes) and Command line.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import errno
import functools
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import secrets
import selectors
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit

import bottle
import http_ece
import pycurl
import waitress
import waitress.channel
import waitress.parser
import waitress.server
import waitress.task
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from py_vapid import Vapid, VapidException

__version__ = "0.1.0"

HERE = Path(__file__).resolve().parent
log = logging.getLogger("webpush")


###############################################################################
# Configuration ###############################################################
###############################################################################


class SettingError(Exception):
    """A setting's value that the server cannot run with; the message says which."""


def _setting(
    default: Any,
    env: str,
    help: str,
    cli: bool = True,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A setting: its default, the environment variable that overrides it, its
    help, and a check of its value (what is wrong with it, or None).

    Secrets have ``cli=False``: command lines are visible to every local user.
    """
    return field(
        default=default,
        metadata={"env": env, "help": help, "cli": cli, "check": check},
    )


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be at least {low}"


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    return lambda value: (
        None if low <= value <= high else f"must be from {low} to {high}"
    )


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: (
        None if value.upper() in choices else f"must be one of {', '.join(choices)}"
    )


def _regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as e:
        return f"is not a regular expression: {e}"
    return None


MIN_RATE, MAX_RATE_ALLOWED = 60, 1_000_000  # messages per minute: rate, MAX_RATE


@functools.lru_cache(maxsize=1024)
def known_timezone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone this machine knows (zoneinfo)."""
    import zoneinfo

    if not isinstance(name, str) or not 1 <= len(name) <= 64 or "\\" in name:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def address_set(text: str) -> frozenset[str]:
    """The addresses of a comma-separated setting (TRUSTED_PROXIES)."""
    return frozenset(p.strip() for p in text.split(",") if p.strip())


def _addresses(value: str) -> str | None:
    import ipaddress

    for part in address_set(value):
        try:
            ipaddress.ip_address(part)
        except ValueError:
            return f"{part!r} is not an IP address"
    return None


@dataclass(frozen=True)
class Settings:
    """Every setting with its default, in one place. Environment variables
    override the defaults; command-line options override both."""

    host: str = _setting("127.0.0.1", "HOST", "address to listen on")
    port: int = _setting(8080, "PORT", "port to listen on", check=_between(1, 65535))
    vapid_dir: str = _setting(
        str(HERE / "vapid"),
        "VAPID_DIR",
        "directory of the VAPID key pair and push token",
    )
    vapid_private_key: str = _setting(
        "",
        "VAPID_PRIVATE_KEY",
        "path of a VAPID private key (PEM or base64url), or the base64url key itself; "
        "overrides the key in VAPID_DIR",
        cli=False,
    )
    vapid_subject: str = _setting(
        "",
        "VAPID_SUBJECT",
        "contact for push services, a mailto: or https: URL (the JWT 'sub')",
    )
    push_token: str = _setting(
        "",
        "PUSH_TOKEN",
        "admin bearer token for POST /push; when unset, one is generated "
        "into VAPID_DIR/push_token",
        cli=False,
    )
    subscriptions_file: str = _setting(
        str(HERE / "subscriptions.json"),
        "SUBSCRIPTIONS_FILE",
        "the subscription store (JSON lines)",
    )
    notifications_file: str = _setting(
        "",
        "NOTIFICATIONS_FILE",
        "the notification journal (JSON lines) [default: beside SUBSCRIPTIONS_FILE: "
        "subscriptions.notifications.json]",
    )
    redis_url: str = _setting(
        "",
        "REDIS_URL",
        "Redis 6.2+ or Valkey (redis://host:6379/0, rediss://..., unix:///path?db=0): "
        "when set, subscriptions, notifications and the work queue live there, shared "
        "by every api.py and --worker process, instead of in the JSON files; give a "
        "password in the environment, not on a command line",
    )
    redis_prefix: str = _setting(
        "webpush:",
        "REDIS_PREFIX",
        "prefix of every Redis key, so several servers can share one Redis",
    )
    worker_timeout: float = _setting(
        30.0,
        "WORKER_TIMEOUT",
        "with Redis: seconds a process may go silent (killed, machine lost) before "
        "the batches it was sending are handed to another",
        check=_between(1, 3600),
    )
    api_delivers: bool = _setting(
        True,
        "API_DELIVERS",
        "with Redis: whether api.py serving HTTP also sends fan-out batches; false "
        "leaves them to the --worker processes",
    )
    notification_retention: int = _setting(
        7 * 86400,
        "NOTIFICATION_RETENTION",
        "seconds an ended notification stays visible in GET /notifications",
        check=_at_least(0),
    )
    payload_format: str = _setting(
        "declarative",
        "PAYLOAD_FORMAT",
        "what browsers receive: declarative (Declarative Web Push, shown without a "
        "service worker where supported) or classic (the JSON of earlier versions, "
        'for a service worker that expects it); a push\'s "format" overrides it',
        check=lambda v: (
            None
            if v in ("declarative", "classic")
            else "must be declarative or classic"
        ),
    )
    public_url: str = _setting(
        "",
        "PUBLIC_URL",
        "the site's URL (https://example.org), against which a relative 'url' is "
        "made absolute for a declarative message; unset: the request's own origin",
        check=lambda v: (
            None
            if not v or re.fullmatch(r"https?://[^/\s]+(/\S*)?", v)
            else "must be an http(s) URL such as https://example.org"
        ),
    )
    prune_after_failures: int = _setting(
        5,
        "PRUNE_AFTER_FAILURES",
        "remove a subscription its push service refused (400, 403, 413) on this "
        "many fan-outs in a row with no success between (0: never)",
        check=_at_least(0),
    )
    max_rate: int = _setting(
        0,
        "MAX_RATE",
        "most messages per minute one notification is sent at, whatever its "
        "'rate' says (0: unlimited)",
        check=lambda v: (
            None
            if v == 0 or MIN_RATE <= v <= MAX_RATE_ALLOWED
            else f"must be 0 or {MIN_RATE} to {MAX_RATE_ALLOWED}"
        ),
    )
    default_timezone: str = _setting(
        "UTC",
        "DEFAULT_TIMEZONE",
        "the time zone (IANA name) of subscribers who gave none, for a push's "
        "send_at_local",
        check=lambda v: None if known_timezone(v) else "is not an IANA time zone",
    )
    max_per_day: int = _setting(
        0,
        "MAX_PER_DAY",
        "most notifications one subscription receives in 24 hours; the next are "
        "not sent to it (counted as capped), but urgency high ones (0: no cap)",
        check=_at_least(0),
    )
    stale_after_days: int = _setting(
        60,
        "STALE_AFTER_DAYS",
        "remove a subscription with no successful delivery for this many days (or "
        "since it was stored) at the next fan-out to it (0: never)",
        check=_at_least(0),
    )
    cors_origins: str = _setting(
        "*",
        "CORS_ORIGINS",
        "origins allowed to call the API: * or a comma-separated list",
    )
    push_endpoint_pattern: str = _setting(
        "",
        "PUSH_ENDPOINT_PATTERN",
        "regular expression, matched from the start of the endpoint URL, that replaces "
        "the built-in push service allowlist (e.g. for a self-hosted push service)",
        check=_regex,
    )
    max_body_bytes: int = _setting(
        32768, "MAX_BODY_BYTES", "largest request body accepted", check=_at_least(1024)
    )
    max_push_bytes: int = _setting(
        1024 * 1024,
        "MAX_PUSH_BYTES",
        "largest POST /push body accepted (10,000 user or subscription ids fit)",
        check=_at_least(1024),
    )
    max_webhook_bytes: int = _setting(
        4 * 1024 * 1024,
        "MAX_WEBHOOK_BYTES",
        "largest webhook body accepted (GitHub's push events can be large)",
        check=_at_least(1024),
    )
    max_topics: int = _setting(
        20, "MAX_TOPICS", "most topics one subscription may name", check=_at_least(1)
    )
    max_topic_length: int = _setting(
        64, "MAX_TOPIC_LENGTH", "longest topic name", check=_between(1, 1024)
    )
    default_ttl: int = _setting(
        86400,
        "DEFAULT_TTL",
        "seconds a push service keeps a message for an offline device",
        check=_between(0, 28 * 86400),
    )
    push_concurrency: int = _setting(
        1000,
        "PUSH_CONCURRENCY",
        "most messages in flight to one push service (split among the delivery "
        "processes; over HTTP/2 they share a few connections)",
        check=_at_least(1),
    )
    push_processes: int = _setting(
        os.cpu_count() or 1,
        "PUSH_PROCESSES",
        "delivery processes a fan-out is split across (1: deliver in the server process)",
        check=_between(1, 256),
    )
    push_timeout: float = _setting(
        10.0,
        "PUSH_TIMEOUT",
        "seconds to wait for one push service answer",
        check=_between(0.1, 3600),
    )
    retry_backoff: float = _setting(
        1.0,
        "RETRY_BACKOFF",
        "seconds before a push that may succeed later (no answer, 429 without "
        "Retry-After, 5xx) is tried again, doubled for the next try; a push "
        "service's Retry-After takes precedence",
        check=_between(0, 30),
    )
    fcm_service_account: str = _setting(
        "",
        "FCM_SERVICE_ACCOUNT",
        "path of the Firebase service-account JSON file; enables FCM device tokens",
    )
    fcm_project_id: str = _setting(
        "",
        "FCM_PROJECT_ID",
        "Firebase project id, when the service-account file lacks it",
    )
    fcm_api_url: str = _setting(
        "https://fcm.googleapis.com",
        "FCM_API_URL",
        "FCM HTTP v1 API base (for an emulator)",
    )
    fcm_threads: int = _setting(
        32, "FCM_THREADS", "FCM messages in flight at once", check=_between(1, 1024)
    )
    max_subscriptions: int = _setting(
        1_000_000,
        "MAX_SUBSCRIPTIONS",
        "most subscriptions and tokens stored (0: no cap)",
        check=_at_least(0),
    )
    rate_limit: int = _setting(
        60,
        "RATE_LIMIT",
        "subscription writes one client may make per minute, in bursts of as many (0: off)",
        check=_at_least(0),
    )
    receipt_rate_limit: int = _setting(
        600,
        "RECEIPT_RATE_LIMIT",
        "receipts (POST /notifications/<id>/events) one client may send per minute, "
        "in bursts of as many (0: off); apart from RATE_LIMIT, as many devices may "
        "share one address",
        check=_at_least(0),
    )
    trusted_proxies: str = _setting(
        "",
        "TRUSTED_PROXIES",
        "comma-separated addresses of reverse proxies whose X-Forwarded-For is believed",
        check=_addresses,
    )
    shutdown_timeout: float = _setting(
        30.0,
        "SHUTDOWN_TIMEOUT",
        "seconds SIGTERM waits for requests and pushes under way",
        check=_at_least(0),
    )
    receipt_key: str = _setting(
        "",
        "RECEIPT_KEY",
        "secret that signs the receipts in each message (at least 16 characters); "
        "when unset, one derived from the VAPID private key",
        cli=False,
        check=lambda v: "must be at least 16 characters" if 0 < len(v) < 16 else None,
    )
    user_token_secret: str = _setting(
        "",
        "USER_TOKEN_SECRET",
        "secret (at least 32 characters) with which the site's backend signs the "
        "tokens (JWT, HS256) that bind a subscription to a signed-in user; when "
        "unset, subscriptions cannot name a user",
        cli=False,
        check=lambda v: "must be at least 32 characters" if 0 < len(v) < 32 else None,
    )
    demo_users: bool = _setting(
        False,
        "DEMO_USERS",
        "the demo page's made-up sign-in: POST /demo/user-token signs a user token "
        "for any name (needs USER_TOKEN_SECRET); never in production",
    )
    metrics_token: str = _setting(
        "",
        "METRICS_TOKEN",
        "bearer token for GET /metrics; when unset, the push token",
        cli=False,
    )
    metrics_port: int = _setting(
        0,
        "METRICS_PORT",
        "with --worker: port of its own GET /metrics, on HOST (0: none)",
        check=_between(0, 65535),
    )
    webhook_secret: str = _setting(
        "",
        "WEBHOOK_SECRET",
        "shared secret that signs webhooks (HMAC-SHA256); webhooks are refused without it",
        cli=False,
    )
    threads: int = _setting(
        16, "THREADS", "HTTP worker threads", check=_between(1, 1024)
    )
    connection_limit: int = _setting(
        4096,
        "CONNECTION_LIMIT",
        "most client connections held open at once (idle ones included); the "
        "open-file limit is raised to fit",
        check=_between(10, 100_000),
    )
    access_log: bool = _setting(
        True,
        "ACCESS_LOG",
        "log one line per request (client, method, path, status, bytes, ms) at INFO",
    )
    log_level: str = _setting(
        "INFO",
        "LOG_LEVEL",
        "DEBUG, INFO, WARNING or ERROR",
        check=_one_of("DEBUG", "INFO", "WARNING", "ERROR"),
    )

    @property
    def journal_path(self) -> Path:
        """NOTIFICATIONS_FILE, or beside SUBSCRIPTIONS_FILE, named after it: the
        journal names that store's subscribers."""
        if self.notifications_file:
            return Path(self.notifications_file)
        subscriptions = Path(self.subscriptions_file)
        return subscriptions.with_name(subscriptions.stem + ".notifications.json")

    def check(self) -> None:
        """SettingError naming the first setting the server cannot run with."""
        for f in dataclasses.fields(self):
            checker = f.metadata["check"]
            problem = checker(getattr(self, f.name)) if checker else None
            if problem:
                shown = "" if f.metadata["cli"] else "(secret, not shown) "
                value = "" if shown else f"={getattr(self, f.name)!r}"
                raise SettingError(f"{f.metadata['env']}{value} {shown}{problem}")

    @classmethod
    def from_env(
        cls, environ: dict[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then environment variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update(overrides)
        return cls(**values)


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False}
BOOLEANS.update({"false": False, "no": False, "off": False})


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = type(f.default)
    if kind is bool:
        if raw.lower() not in BOOLEANS:
            raise SettingError(
                f"{f.metadata['env']}={raw!r} is not one of {', '.join(BOOLEANS)}"
            )
        return BOOLEANS[raw.lower()]
    try:
        value = kind(raw)
    except ValueError:
        raise SettingError(
            f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}"
        ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(f"{f.metadata['env']}={raw!r} is not a finite number")
    return value


###############################################################################
# Keys ########################################################################
###############################################################################

PRIVATE_PEM = "private_key.pem"
PUBLIC_TXT = "public_key.txt"
PUSH_TOKEN_FILE = "push_token"
# Files made "the blog's way" with openssl, accepted as they are.
OPENSSL_PEM = "vapid_private.pem"
OPENSSL_PRIVATE_TXT = "private_key.txt"

VAPID_LIFETIME = 12 * 3600  # JWT exp: push services refuse more than 24 h ahead
VAPID_REFRESH = 3600  # sign a new header when the cached one has less than this left


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding or line breaks; raises ValueError."""
    text = "".join(text.split())
    if not re.fullmatch(r"[A-Za-z0-9_\-]*={0,2}", text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _parse_private_key(text: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM, base64url raw (32 bytes) or base64 DER."""
    text = text.strip()
    if "-----BEGIN" in text:
        # openssl ecparam without -noout puts an EC PARAMETERS block first.
        match = re.search(
            r"-----BEGIN (EC )?PRIVATE KEY-----.*?-----END (EC )?PRIVATE KEY-----",
            text,
            re.DOTALL,
        )
        if not match:
            raise ValueError("no PRIVATE KEY block in the PEM text")
        key = serialization.load_pem_private_key(match.group(0).encode(), password=None)
    else:
        raw = b64url_decode(text.replace("+", "-").replace("/", "_"))
        if len(raw) == 32:
            key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
        else:
            key = serialization.load_der_private_key(raw, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("not a P-256 (prime256v1) EC private key")
    return key


class VapidKeys:
    """The server's VAPID identity (RFC 8292): key pair, subject, signed headers."""

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, subject: str, source: str
    ):
        self._vapid = Vapid(private_key)
        self.subject = subject
        self.source = source
        self.public_key = b64url_encode(
            private_key.public_key().public_bytes(
                serialization.Encoding.X962,
                serialization.PublicFormat.UncompressedPoint,
            )
        )
        self._headers: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._secret = private_key.private_numbers().private_value.to_bytes(32, "big")
        try:  # py_vapid's rule for the subject, checked now rather than at every push
            self.authorization("https://fcm.googleapis.com")
        except VapidException:
            raise SettingError(
                f"VAPID_SUBJECT {subject!r} is not a mailto: address or an https: "
                "origin (e.g. mailto:you@yoursite.org or https://yoursite.org, no path)"
            ) from None

    @classmethod
    def load_or_create(cls, settings: Settings) -> VapidKeys:
        """Load the key from VAPID_PRIVATE_KEY or VAPID_DIR; create one only when
        none exists (a new key would orphan every stored subscription)."""
        subject = settings.vapid_subject or "mailto:webpush@localhost"
        directory = Path(settings.vapid_dir)
        if settings.vapid_private_key:
            value = settings.vapid_private_key
            if os.path.isfile(value):
                return cls(_load_key_file(Path(value)), subject, value)
            try:
                return cls(_parse_private_key(value), subject, "VAPID_PRIVATE_KEY")
            except ValueError as e:
                raise SettingError(
                    f"VAPID_PRIVATE_KEY is neither a file nor a P-256 key ({e})"
                ) from None
        for name in (PRIVATE_PEM, OPENSSL_PEM, OPENSSL_PRIVATE_TXT):
            path = directory / name
            if path.is_file():
                keys = cls(_load_key_file(path), subject, str(path))
                keys._check_public_file(directory / PUBLIC_TXT)
                _keep_private(directory)
                return keys
        return cls._create(directory, subject)

    @classmethod
    def _create(cls, directory: Path, subject: str) -> VapidKeys:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _keep_private(directory)
        keys = cls(
            ec.generate_private_key(ec.SECP256R1()),
            subject,
            str(directory / PRIVATE_PEM),
        )
        _write_secret(directory / PRIVATE_PEM, keys.private_pem())
        (directory / PUBLIC_TXT).write_text(keys.public_key + "\n")
        log.info("generated a new VAPID key pair in %s", directory)
        return keys

    def derived_key(self, purpose: bytes) -> bytes:
        """A 32-byte key for ``purpose``, derived from the private key (HKDF):
        the same in every process with this key, and telling nothing of it."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose)
        return hkdf.derive(self._secret)

    def private_pem(self) -> bytes:
        """The private key as PEM, for delivery processes; never log it."""
        return self._vapid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def _check_public_file(self, path: Path) -> None:
        if not path.is_file():
            path.write_text(self.public_key + "\n")
            return
        try:
            stored = b64url_encode(b64url_decode(path.read_text()))
        except ValueError:
            stored = None
        if stored != self.public_key:
            raise SettingError(
                f"{path} does not match the private key {self.source}; "
                "delete the public key file to have it written anew"
            )

    def authorization(self, audience: str) -> str:
        """The ``Authorization`` header for one push service origin, signed once
        and reused until it nears expiry. Each call gets its own claims dict."""
        now = time.time()
        with self._lock:
            cached = self._headers.get(audience)
            if cached and cached[1] - now > VAPID_REFRESH:
                return cached[0]
            expires = int(now) + VAPID_LIFETIME
            claims = {"aud": audience, "exp": expires, "sub": self.subject}
            header = self._vapid.sign(claims)["Authorization"]
            self._headers[audience] = (header, expires)
            return header


def _keep_private(directory: Path) -> None:
    """Take away group's and others' access to the key directory (0700), as a
    directory made by hand or an older version may have left it (0755)."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        try:
            os.chmod(directory, mode & 0o700)
        except OSError as e:  # not ours, or a read-only mount: say so, go on
            log.warning(
                "%s is mode 0%o and cannot be made 0700: %s", directory, mode, e
            )
        else:
            log.info("%s was mode 0%o; made it 0700", directory, mode)


def _load_key_file(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        return _parse_private_key(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SettingError(
            f"cannot read a VAPID private key from {path}: {e}"
        ) from None


def subject_warning(subject: str) -> str | None:
    """Why push services may refuse this VAPID subject, or None."""
    if not subject:
        return (
            "VAPID_SUBJECT is unset: set it to a mailto: or https: contact; "
            "Apple's push service refuses pushes without one (403 BadJwtToken)"
        )
    if not re.match(r"^(mailto:[^@\s]+@[^@\s]+|https://[^\s/]+)", subject):
        return f"VAPID_SUBJECT {subject!r} is not a mailto: or https: URL"
    host = (
        subject.split("@")[-1]
        if subject.startswith("mailto:")
        else urlsplit(subject).hostname
    )
    host = (host or "").lower().rstrip("/")
    if host in ("localhost", "127.0.0.1", "[::1]") or host.endswith(
        (
            ".localhost",
            ".local",
            "example.com",
            "example.org",
            "example.net",
            ".example",
        )
    ):
        return (
            f"VAPID_SUBJECT {subject!r} is a local or example address: "
            "Apple's push service answers it with 403 BadJwtToken"
        )
    return None


def _load_or_create_secret(given: str, path: Path) -> tuple[str, bool]:
    """A secret from its setting, else from its file in VAPID_DIR, else a new
    one written there (mode 0600); and whether it was just generated."""
    if given:
        return given, False
    if path.is_file():
        secret = path.read_text().strip()
        if secret:
            return secret, False
        raise SettingError(f"{path} is empty; delete it to have a new one made")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    try:
        _write_secret(path, (secret + "\n").encode())
    except FileExistsError:  # another process started at the same moment
        for _ in range(100):
            if path.read_text().strip():
                return path.read_text().strip(), False
            time.sleep(0.01)  # it is still writing it
        raise
    return secret, True


def load_or_create_token(settings: Settings) -> tuple[str, bool]:
    """The admin token and whether it was just generated."""
    return _load_or_create_secret(
        settings.push_token, Path(settings.vapid_dir) / PUSH_TOKEN_FILE
    )


def receipt_key_of(settings: Settings, keys: VapidKeys) -> bytes:
    """The key that signs receipts: RECEIPT_KEY, or else one derived from the
    VAPID private key (HKDF-SHA256), which every process shares already."""
    if settings.receipt_key:
        return settings.receipt_key.encode()
    return keys.derived_key(b"webpush receipt key")


# User tokens: a site's backend says "this browser is signed in as <user>" by
# signing a JWT (HS256) with USER_TOKEN_SECRET; PyJWT checks it, never our code.
USER_TOKEN_MAX_TTL = 30 * 86400  # the furthest ahead a token's exp may be
USER_TOKEN_LEEWAY = 30  # seconds of clock difference between the site and here
MAX_USER_TOKEN = 4096  # characters


def sign_user_token(secret: str, user: str, ttl: int) -> str:
    """A token that binds a subscription to ``user`` for ``ttl`` seconds."""
    import jwt  # PyJWT; imported here, so delivery processes stay smaller

    now = int(time.time())
    return jwt.encode(
        {"sub": user, "iat": now, "exp": now + ttl}, secret, algorithm="HS256"
    )


def user_token_problem(secret: str, token: Any, user: str) -> str | None:
    """Why ``token`` does not prove that the browser is ``user``'s, or None:
    it must be a JWT signed with ``secret`` by HS256 (no other algorithm, not
    "none"), whose ``sub`` is ``user`` and whose ``exp`` is set, not passed,
    and at most 30 days ahead."""
    import jwt

    if not isinstance(token, str) or not token:
        return "'user_token' is missing: the site's backend signs one for its user"
    if len(token) > MAX_USER_TOKEN:
        return f"'user_token' is longer than {MAX_USER_TOKEN} characters"
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["exp", "sub"]},
            leeway=USER_TOKEN_LEEWAY,
        )
    except jwt.ExpiredSignatureError:
        return "'user_token' has expired: the site's backend signs a new one"
    except jwt.MissingRequiredClaimError as e:
        return f"'user_token' has no '{e.claim}' claim"
    except jwt.InvalidTokenError:
        return "'user_token' is not a token signed with this server's USER_TOKEN_SECRET"
    if claims["sub"] != user:
        return "'user_token' was signed for another user than 'user'"
    if claims["exp"] > time.time() + USER_TOKEN_MAX_TTL + USER_TOKEN_LEEWAY:
        return (
            "'user_token' expires more than 30 days ahead; sign one that expires sooner"
        )
    return None


# API keys: the push token is the admin key; others are made with POST /keys,
# each with a scope, and kept only as their SHA-256.
API_KEY_PREFIX = "wpk_"  # so a leaked key is recognised (secret scanners, logs)
ADMIN = "admin"  # the push token's name, in created_by and the access log
KEY_SCOPES = ("send", "read", "admin")
# What each scope may do, by the need a route names (``auth=`` in its config):
# "send" POST /push; "own" GET /notifications/<id> (a send key: its own only);
# "read" the lists and people; "metrics" GET /metrics; "any" GET /key.
SCOPE_GRANTS = {
    "send": frozenset({"send", "own", "any"}),
    "read": frozenset({"read", "own", "metrics", "any"}),
    "admin": frozenset({"send", "own", "read", "metrics", "any", "admin"}),
    "metrics": frozenset({"metrics"}),  # METRICS_TOKEN's: no key has it
}
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_API_KEYS = 1000
MAX_KEY_LIFETIME = 10 * 365 * 86400  # seconds: expires_in at most ten years
KEY_TOUCH_STEP = 60  # seconds: a key's last_used is kept to the minute
MAX_API_KEY = 100  # characters: a longer bearer token is no key of ours


def new_api_key() -> str:
    """A fresh API key: 256 random bits after a recognisable prefix."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def api_key_hash(key: str) -> str:
    """What is kept of an API key. A key is 256 random bits, so its SHA-256
    cannot be reversed or guessed: no salt or slow hash is needed, and a
    lookup by it costs the same whichever key is tried."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who made a request: an API key's name, scope and, for a send key, the
    topics it may send to (None: any). The push token is the admin key
    named "admin". ``id``: the key's own, given when it was made, so a new
    key that takes a revoked one's name is not its owner (keys made before
    ids have none: their name is their owner)."""

    name: str
    scope: str
    topics: tuple[str, ...] | None = None
    id: str = ""

    @property
    def owner(self) -> str:
        """Whose notifications, Idempotency-Keys and webhook ids these are."""
        return self.id or self.name

    def may(self, need: str) -> bool:
        return need in SCOPE_GRANTS[self.scope]

    def may_send_to(self, topic: str | None, named: bool) -> str | None:
        """Why this caller may not send to ``topic`` (None: everyone; named:
        users or subscriptions), or None if it may."""
        if self.topics is None:
            return None
        allowed = ", ".join(self.topics)
        if named or topic is None or topic not in self.topics:
            return (
                f"the key {self.name!r} may send only to the topics {allowed}, "
                "not to everyone, to users or to other topics"
            )
        return None


###############################################################################
# Messages ####################################################################
###############################################################################
# Pure values and the rules about them, which Store, Delivery and
# Notifications all build on: no I/O here.


def endpoint_origin(endpoint: str) -> str:
    """A push endpoint's scheme and host: what one push service shares."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return ""
    return f"{parts.scheme}://{parts.netloc}"


def record_origin(record: dict) -> str:
    """Where a record's messages go: its push service's origin, or "fcm"."""
    if record.get("kind") == "fcm":
        return "fcm"
    return endpoint_origin(record.get("endpoint", ""))


CHANNELS = ("webpush", "fcm")  # a record's ``kind``: the ways messages go


def origin_channel(origin: str) -> str:
    """The channel of a record that sends to ``origin`` (see record_origin)."""
    return "fcm" if origin == "fcm" else "webpush"


MAX_USER_LENGTH = 128  # characters of a user id
MAX_NAMED = 10_000  # users or subscription ids one notification may name


@dataclass(frozen=True)
class Audience:
    """Who a notification goes to: everyone, a topic's subscribers, every
    subscription of some users, or some subscriptions by id (at most one of
    the three is given)."""

    topic: str | None = None
    users: tuple[str, ...] | None = None
    subscriptions: tuple[str, ...] | None = None

    @classmethod
    def of(cls, record: dict) -> Audience:
        """The audience a notification record keeps."""
        users, ids = record.get("users"), record.get("subscriptions")
        return cls(
            record.get("topic"),
            None if users is None else tuple(users),
            None if ids is None else tuple(ids),
        )

    @property
    def kind(self) -> str:
        """ "everyone", "topic", "users" or "subscriptions"."""
        if self.users is not None:
            return "users"
        if self.subscriptions is not None:
            return "subscriptions"
        return "everyone" if self.topic is None else "topic"

    @property
    def named(self) -> tuple[str, ...] | None:
        """The users or subscription ids named, or None for a broadcast."""
        return self.subscriptions if self.users is None else self.users

    def __str__(self) -> str:
        """For a log line: never a user's id."""
        if self.named is not None:
            return f"{len(self.named)} {self.kind}"
        return "everyone" if self.topic is None else f"topic {self.topic}"


# One 4096-byte aes128gcm record, less its header (86), tag and delimiter (17).
MAX_PLAINTEXT = 3993
RECEIPT_LENGTH = 22 + 1 + 22  # see receipt()
PAYLOAD_FORMATS = ("declarative", "classic")
DECLARATIVE_WEB_PUSH = 8030  # the "web_push" member of a declarative message
RECEIPT_EVENTS = ("delivered", "clicked", "closed")
RECEIPT_RE = re.compile(r"([A-Za-z0-9_\-]{22})\.[A-Za-z0-9_\-]{22}")
URGENCIES = ("very-low", "low", "normal", "high")
# The reason of an outcome "unsent": cancelled, or the server stopped first.
UNSENT = "not sent: cancelled, or the server stopped first"


# What a POST /push body may say (the HTTP section's Validator reads them).
CLASSIC_FIELDS = ("title", "body", "icon", "url", "data")  # always there, null or not
OPTIONAL_FIELDS = (
    "tag",
    "badge",
    "silent",
    "lang",
    "dir",
    "require_interaction",
    "actions",
    "image",
)


PUSH_FIELDS = (
    "title",
    "body",
    "message",
    "icon",
    "url",
    "data",
    "topic",
    "ttl",
    "urgency",
    "collapse_key",
    "send_at",
    "delay",
    "format",
    "mutable",
    "users",
    "subscriptions",
    "rate",
    "send_at_local",
    *OPTIONAL_FIELDS,
)


def receipt(key: bytes, notification_id: str, record_id: str) -> str:
    """One subscriber's receipt for one notification: its record id and an
    HMAC of both, so only the server can make one and each names one
    subscriber of one notification."""
    mac = hmac.new(key, f"{notification_id}.{record_id}".encode(), "sha256")
    return f"{record_id}.{b64url_encode(mac.digest()[:16])}"


def receipt_subscriber(key: bytes, notification_id: str, text: Any) -> str | None:
    """The record id a receipt names, or None if the server did not make it
    for this notification."""
    match = RECEIPT_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    expected = receipt(key, notification_id, match[1])
    return match[1] if hmac.compare_digest(expected, text) else None


def personal_payload(message: Message, record_id: str, key: bytes) -> bytes:
    """The JSON one subscriber receives: the message's, with this subscriber's
    receipt where the message left room for it."""
    if message.receipt_at < 0 or not key or not message.notification_id:
        return message.payload
    if len(message.payload) + RECEIPT_LENGTH > MAX_PLAINTEXT:
        return message.payload  # made before receipts had room: sent without one
    mark = receipt(key, message.notification_id, record_id).encode()
    at = message.receipt_at
    return message.payload[:at] + mark + message.payload[at:]


def notification_json(notification: dict) -> bytes:
    return json.dumps(notification, separators=(",", ":"), ensure_ascii=False).encode()


def render_payload(
    notification: dict, payload_format: str, notification_id: str | None = None
) -> tuple[bytes, int]:
    """The JSON a browser receives, and where each subscriber's receipt goes
    in it (-1: nowhere, without a notification id).

    ``classic``: ``{"title", "body", "icon", "url", "data", ...}`` for a
    service worker to show. ``declarative``: Declarative Web Push (the Push
    API's declarative push message): ``{"web_push": 8030, "notification":
    {...}, "app_badge": n}``, which a browser that supports it shows by
    itself, and hands to the service worker first when ``mutable``; the id
    and receipt ride in ``notification.data`` so that worker sees them."""
    given = {
        k: notification[k] for k in OPTIONAL_FIELDS if notification.get(k) is not None
    }
    mark = "" if notification_id is None else secrets.token_hex(16)
    receipts = (
        {} if notification_id is None else {"id": notification_id, "receipt": mark}
    )
    if payload_format == "classic":
        document = {k: notification.get(k) for k in CLASSIC_FIELDS}
        document.update(given, **receipts)
    else:
        shown: dict[str, Any] = {
            "title": notification["title"],
            "navigate": notification["navigate"],
        }
        for name in ("body", "icon", "image", "tag", "lang", "dir", "silent"):
            if notification.get(name) not in (None, ""):
                shown[name] = notification[name]
        if notification.get("require_interaction") is not None:
            shown["requireInteraction"] = notification["require_interaction"]
        if notification.get("actions"):
            shown["actions"] = [
                {
                    "action": a["action"],
                    "title": a["title"],
                    **({"navigate": a["navigate"]} if a.get("navigate") else {}),
                    **({"icon": a["icon"]} if a.get("icon") else {}),
                }
                for a in notification["actions"]
            ]
        data = dict(receipts)
        if notification.get("data") is not None:
            data["data"] = notification["data"]
        if data:
            shown["data"] = data
        shown["mutable"] = bool(notification.get("mutable", True))
        document = {"web_push": DECLARATIVE_WEB_PUSH, "notification": shown}
        if notification.get("badge") is not None:
            document["app_badge"] = notification["badge"]
    payload = notification_json(document)
    if not mark:
        return payload, -1
    at = payload.index(mark.encode())
    return payload[:at] + payload[at + len(mark) :], at


@dataclass
class Message:
    """One notification as sent to every subscriber."""

    notification: dict  # title, body, icon, url, data
    payload: bytes  # the notification as the JSON a browser receives
    ttl: int
    urgency: str | None = None
    topic: str | None = (
        None  # collapse key: a newer message replaces an undelivered older one
    )
    notification_id: str | None = None  # what receipts name; None: no receipts
    receipt_at: int = -1  # where in ``payload`` each subscriber's receipt goes
    format: str = "classic"  # or declarative (PAYLOAD_FORMAT)


@dataclass
class PushOutcome:
    """What happened to one subscriber."""

    record_id: str
    origin: str
    status: int | None  # HTTP status from the push service; None: no answer
    result: str  # sent, failed, removed, or unsent (cancelled or stopped first)
    reason: str = ""
    tries: int = 1
    channel: str = "webpush"  # or fcm
    seconds: float = 0.0  # the push service's answer time, last try; 0: none


@dataclass
class PushReport:
    outcomes: list[PushOutcome] = field(default_factory=list)

    def summary(self, detail: bool = False) -> dict:
        """Counts across both channels, with a breakdown per channel."""
        channels = {
            c: {"sent": 0, "failed": 0, "removed": 0, "retried": 0} for c in CHANNELS
        }
        for outcome in self.outcomes:
            channels[outcome.channel][outcome.result] += 1
            channels[outcome.channel]["retried"] += outcome.tries > 1
        counts = {k: sum(c[k] for c in channels.values()) for k in channels["webpush"]}
        counts["channels"] = channels
        if detail:
            counts["results"] = [
                {
                    "id": o.record_id,
                    "channel": o.channel,
                    "origin": o.origin,
                    "status": o.status,
                    "result": o.result,
                    "reason": o.reason,
                }
                for o in self.outcomes
            ]
        return counts


# Where the server may send: the push services, or PUSH_ENDPOINT_PATTERN.
# printable ASCII but space, '#' and '\\' (parsers disagree on those)
SENDABLE_URL_RE = re.compile(r"[!\"$-\[\]-~]+")
MAX_ENDPOINT_LENGTH = 2048
PUSH_SERVICE_HOSTS = (
    "fcm.googleapis.com",
    "updates.push.services.mozilla.com",
    "web.push.apple.com",
)
PUSH_SERVICE_DOMAINS = (
    "notify.windows.com",
    "push.services.mozilla.com",
)  # one label under


def canonical_endpoint(endpoint: str) -> str | None:
    """The endpoint as the server stores it, signs for it and checks it: scheme
    and host in lower case, the default port dropped. None if the delivery
    cannot send to it: not http(s) with a host, not printable ASCII (a Unicode
    host is refused, not guessed at), userinfo, a bad port, or the characters
    URL parsers disagree on. Every push service's endpoints pass unchanged."""
    if not SENDABLE_URL_RE.fullmatch(endpoint):
        return None
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname  # lower case, IPv6 without its brackets
    if parts.scheme not in ("http", "https") or not host:
        return None
    if "@" in parts.netloc or "%" in parts.netloc:  # libcurl decodes %2e in hosts
        return None
    if port == 0:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port not in (None, 443 if parts.scheme == "https" else 80):
        host += f":{port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


def endpoint_allowed(endpoint: str, pattern: re.Pattern | None = None) -> bool:
    """Whether the server may POST to ``endpoint`` (in its canonical form): a
    known push service, or whatever ``pattern`` (PUSH_ENDPOINT_PATTERN) admits
    instead."""
    canonical = canonical_endpoint(endpoint)
    if canonical is None:
        return False
    if pattern is not None:
        return pattern.match(canonical) is not None
    parts = urlsplit(canonical)
    if parts.scheme != "https" or parts.port is not None:
        return False
    host = parts.hostname or ""
    if host in PUSH_SERVICE_HOSTS:
        return True
    label, _, domain = host.partition(".")
    return (
        domain in PUSH_SERVICE_DOMAINS
        and re.fullmatch(r"[a-z0-9-]{1,63}", label) is not None
    )


EXPIRED = (
    "its expirationTime has passed"  # what no retry changes: counted toward pruning
)


FINISHED = ("done", "cancelled", "expired")
COUNTS = ("sent", "failed", "removed", "capped", "retried")
MAX_SCHEDULE_AHEAD = 30 * 86400
IDEMPOTENCY_SECONDS = 86400
MAX_ERRORS = 10  # causes of failure kept per notification, the commonest


def rfc3339(moment: float | None) -> str | None:
    """A time as RFC 3339 in UTC, to the millisecond."""
    if moment is None:
        return None
    text = datetime.fromtimestamp(moment, timezone.utc).isoformat("T", "milliseconds")
    return text.replace("+00:00", "Z")


# ASCII digits only: \d would take any script's (Arabic-Indic, fullwidth...).
RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(\.[0-9]+)?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 date-time with an offset, or None."""
    match = RFC3339_RE.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, off_hours, off_minutes = match.groups()[6:]
    if second > 60 or (off_minutes and int(off_minutes) > 59):  # 60: a leap second
        return None
    offset = timedelta(0)
    if not zulu:
        offset = timedelta(hours=int(off_hours), minutes=int(off_minutes))
        if sign == "-":
            offset = -offset
    try:
        moment = datetime(
            year, month, day, hour, minute, min(second, 59), tzinfo=timezone(offset)
        )
    except ValueError:  # February 30th, an offset of 24 hours
        return None
    return moment.timestamp() + float(fraction or 0) + (second == 60)


# Delivery policy (a push's "rate" and "send_at_local"; MAX_PER_DAY and
# STALE_AFTER_DAYS), applied by NotificationEngine.
DAY = 86400
# The earliest wall clock on Earth is UTC+14 (Kiritimati): a send_at_local
# is due there first, and nowhere later than at UTC-12.
EARLIEST_OFFSET = 14 * 3600
LOCAL_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?")
STALE = "stale"  # the cause of a removal for STALE_AFTER_DAYS
CAPPED = "MAX_PER_DAY reached"
AGE_BOUNDS = (1, 7, 30)  # days: GET /subscriptions/ages, with STALE_AFTER_DAYS
AGES_REUSE = 30  # a count of GET /subscriptions/ages serves 30 times its cost


@functools.lru_cache(maxsize=4096)
def local_instant(local: str, zone: str) -> float:
    """When the wall-clock time ``local`` (no offset) comes in ``zone`` (an
    IANA name), in seconds since the epoch; a time a clock change skips is
    taken as the clocks show it just after (fold 0, as zoneinfo does)."""
    import zoneinfo

    moment = datetime.fromisoformat(local).replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return moment.timestamp()


def earliest_instant(local: str) -> float:
    """When the wall-clock time ``local`` comes first anywhere (UTC+14)."""
    return local_instant(local, "UTC") - EARLIEST_OFFSET


def _zero_counts() -> dict[str, dict[str, int]]:
    return {channel: dict.fromkeys(COUNTS, 0) for channel in CHANNELS}


def message_of(record: dict, now: float) -> Message:
    """A notification's message as sent now: its TTL counted from when it was
    due, so a message sent late expires when it would have on time; one sent
    late on purpose (a ``rate``, a ``send_at_local``) keeps its whole TTL."""
    spec = record["message"]
    late = 0.0 if record.get("policy") else max(0.0, now - record["due"])
    payload_format = spec.get("format", "classic")  # journals from before formats
    payload, receipt_at = render_payload(
        spec["notification"], payload_format, record["id"]
    )
    return Message(
        spec["notification"],
        payload,
        max(0, spec["ttl"] - int(late)),
        spec["urgency"],
        spec["collapse_key"],
        record["id"],
        receipt_at,
        payload_format,
    )


def new_notification(
    message: Message,
    audience: Audience,
    now: float,
    send_at: float | None,
    key_hash: str | None,
    body_hash: str,
    source: str,
    total: int,
    created_by: str | None = None,
    policy: dict | None = None,
    owner: str | None = None,
) -> dict:
    """A notification as both queues keep it, before anything is sent;
    ``policy``: its ``rate`` and ``send_at_local``, if any."""
    policy = {k: v for k, v in (policy or {}).items() if v is not None}
    if policy.get("send_at_local"):  # due first where that time comes first
        send_at = max(now, earliest_instant(policy["send_at_local"]))
    due = now if send_at is None else send_at
    notification_id = secrets.token_urlsafe(12)
    while notification_id.startswith("-"):  # an id a command line takes for an option
        notification_id = secrets.token_urlsafe(12)
    return {
        "id": notification_id,
        "status": "scheduled" if due > now else "queued",
        "source": source,
        "created_by": created_by,
        "owner": owner or created_by,  # the key's id (Caller.owner)
        "created": now,
        "due": due,
        "send_at": send_at,
        "started": None,
        "finished": None,
        "topic": audience.topic,
        "users": audience.users and list(audience.users),
        "subscriptions": audience.subscriptions and list(audience.subscriptions),
        "message": {
            "notification": message.notification,
            "ttl": message.ttl,
            "urgency": message.urgency,
            "collapse_key": message.topic,
            "format": message.format,
        },
        "idempotency": key_hash and {"key": key_hash, "body": body_hash},
        "policy": policy,
        "total": total,
        "counts": _zero_counts(),
        "errors": [],
    }


def status_document(record: dict, receipts: dict[str, int] | None = None) -> dict:
    """What ``GET /notifications/<id>`` says of a notification, with its
    receipts counted so far."""
    channels = record["counts"]
    for values in channels.values():  # kept before a count was added
        for name in COUNTS:
            values.setdefault(name, 0)
    counts = {name: sum(c[name] for c in channels.values()) for name in COUNTS}
    # Once planned, it goes to those queued; either way not to those who
    # unsubscribed before their batch was sent.
    planned = record.get("planned", False)
    total = record["enqueued"] if planned else record["total"]
    total = max(0, total - record.get("vanished", 0))
    audience = Audience.of(record)
    settled = sum(counts[name] for name in COUNTS if name != "retried")
    pending = max(0, total - settled)
    policy = record.get("policy") or {}
    finish = None  # estimated, for a throttled notification under way
    if policy.get("rate") and record["status"] in UNFINISHED:
        start = max(time.time(), record["due"])
        finish = start + pending * 60 / policy["rate"]
    return {
        "id": record["id"],
        "status": record["status"],
        "title": record["message"]["notification"].get("title"),
        "topic": record["topic"],
        "audience": audience.kind,
        "named": None if audience.named is None else len(audience.named),
        "created_by": record.get("created_by"),
        "created": rfc3339(record["created"]),
        "send_at": rfc3339(record["send_at"]),
        "started": rfc3339(record["started"]),
        "finished": rfc3339(record["finished"]),
        "total": total,
        **counts,
        "pending": pending,
        "rate": policy.get("rate"),
        "send_at_local": policy.get("send_at_local"),
        "finish": rfc3339(finish),
        **{event: (receipts or {}).get(event, 0) for event in RECEIPT_EVENTS},
        "channels": channels,
        "errors": record["errors"][:MAX_ERRORS],
    }


def log_end(document: dict) -> None:
    """One line when a notification ends: its counts."""
    log.info(
        "notification %s %s: sent=%d failed=%d removed=%d retried=%d of %d",
        document["id"],
        document["status"],
        document["sent"],
        document["failed"],
        document["removed"],
        document["retried"],
        document["total"],
    )


def subscription_document(record: dict) -> dict:
    """What ``GET /users/<id>`` says of one of a user's subscriptions."""
    return {
        "id": record["id"],
        "channel": record.get("kind", "webpush"),
        "origin": record_origin(record),
        "created": rfc3339(record.get("created")),
        "last_success": rfc3339(record.get("last_success")),
        "topics": record.get("topics") or [],
    }


@dataclass(frozen=True)
class Batch:
    """Subscribers of one notification who share a push service, handed to
    delivery together."""

    entry: str  # the job store's name for it
    origin: str  # their push service ("fcm" for FCM tokens)
    notification: str
    ids: tuple[str, ...]
    added: float = 0.0  # when it was queued


PLAN_START = "1 0"  # a plan's cursor: CHANNELS' number (from 1), last seq planned
EVERYONE = 2**53  # the plan_max of a notification planned before plans had one
MAX_CAUSES = 100  # causes of failure counted per notification


def _counts_of(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """Counts by "<channel>.<name>" as counts by channel."""
    by_channel = _zero_counts()
    for name, count in counts.items():
        channel, _, result = name.partition(".")
        by_channel[channel][result] += count
    return by_channel


def _add_counts(into: dict, counts: dict) -> None:
    """Add counts by channel to others."""
    for channel, values in counts.items():
        for name, value in values.items():
            into[channel][name] = into[channel].get(name, 0) + value


def _add_causes(into: collections.Counter, causes: dict[tuple, int]) -> None:
    """Count causes of failure, at most MAX_CAUSES different ones."""
    for cause, count in causes.items():
        if cause in into or len(into) < MAX_CAUSES:
            into[cause] += count


def _errors_of(causes: collections.Counter) -> list[dict]:
    """Causes of failure as the status document lists them, commonest first."""
    return [
        {"channel": c, "origin": o, "status": s, "reason": r, "count": n}
        for (c, o, s, r), n in causes.most_common()
    ]


def _causes_of(errors: list[dict]) -> collections.Counter:
    return collections.Counter(
        {
            (e["channel"], e["origin"], e["status"], e["reason"]): e["count"]
            for e in errors
        }
    )


@dataclass
class Tally:
    """What one batch came to, as a job store counts it: the subscribers it
    reached, counts by "<channel>.<result>", causes of failure, the
    subscribers to send to again, and how many were no longer stored."""

    done: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    causes: dict[tuple, int] = field(default_factory=dict)
    again: list[str] = field(default_factory=list)
    vanished: int = 0

    @classmethod
    def of(
        cls, reached: list[PushOutcome], again: list[str] = (), vanished: int = 0
    ) -> Tally:  # type: ignore[assignment]
        counts: collections.Counter[str] = collections.Counter()
        causes: collections.Counter[tuple] = collections.Counter()
        for o in reached:
            counts[f"{o.channel}.{o.result}"] += 1
            counts[f"{o.channel}.retried"] += o.tries > 1
            if o.result == "failed" or o.reason == STALE:
                causes[(o.channel, o.origin, o.status, o.reason)] += 1
        return cls(
            [o.record_id for o in reached],
            {name: n for name, n in counts.items() if n},
            dict(causes),
            list(again),
            vanished,
        )


UNFINISHED = ("scheduled", "queued", "sending")


###############################################################################
# Store #######################################################################
###############################################################################
# Subscriptions (the SubscriptionStore protocol: JsonSubscriptionStore,
# RedisSubscriptionStore) and notifications with their batches (the JobStore
# protocol: JournalJobStore, RedisJobStore). Nothing outside a store touches
# its files or keys.

# A record's last successful delivery is rewritten at most this often (seconds).
# The JSON store keeps each subscription's last success beside its records,
# in a map written whole at most once a minute (and at a clean stop): a
# success rewrites no record line. A crash loses at most that minute's.
LAST_SUCCESS_FLUSH = 60.0


class StoreLocked(Exception):
    """Another process holds the subscription file."""


class StoreDamaged(Exception):
    """The subscription file has a bad record before its last line."""


def _lock_file(path: Path, what: str = "file", setting: str = "") -> Any:
    """Hold an exclusive lock on ``path`` for as long as the returned file is open."""
    handle = open(path, "a+b")  # noqa: SIM115 - it must outlive this function
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            _flock(handle.fileno(), path, what, setting or "SUBSCRIPTIONS_FILE")
    except BaseException:
        handle.close()
        raise
    return handle


def _flock(
    fd: int, path: Path, what: str = "file", setting: str = "SUBSCRIPTIONS_FILE"
) -> None:
    """An exclusive lock on the open file ``fd``, or StoreLocked. It belongs to
    the file itself, so every name of it (a hard link too) meets the same lock."""
    if os.name == "nt":
        return
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StoreLocked(
            f"{path} is locked: another api.py is using this {what}; "
            f"stop it, or give this one another {setting}"
        ) from None


@dataclass(eq=False)
class _Write:
    """Appended lines not yet known to be on disk, and how to undo them."""

    seq: int
    previous: dict[str, bytes | None]  # each id's line before; None: there was none
    lines: int = 0
    failed: bool = False


class JsonLinesStore:
    """Records by id, kept in a JSON-lines journal.

    Each line is one record: ``{"id": ..., ...}`` adds or replaces the record
    with that id, ``{"id": ..., "deleted": true}`` forgets it. The file is
    replayed at start and rewritten (atomically, via a temporary file and
    rename) once it holds more than twice as many lines as live records, so one
    write costs the same whatever the number stored. A write returns only after
    fsync; writers that arrive while an fsync runs share the next one. Records
    are held in memory as their JSON line, a third of the size of a dict.

    A write the disk refuses (full, EIO) raises OSError and changes nothing: a
    partial line is cut off at once, a failed fsync undoes every write it
    covered, in the file and in memory, and a failed compaction leaves the
    journal as it was. The next write simply tries again.
    """

    COMPACT_MIN_LINES = 1000
    WHAT = "file"  # what the messages call it, and the setting that names it
    SETTING = "SUBSCRIPTIONS_FILE"

    def __init__(self, path: str | Path):
        # Resolved, so a symlink meets the same lock file; the lock on the data
        # file itself covers hard links.
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_handle = _lock_file(
            self.path.with_name(self.path.name + ".lock"), self.WHAT, self.SETTING
        )
        self._records: dict[str, bytes] = {}
        self._lines = 0
        self._mutex = threading.Lock()  # order of writes and the in-memory view
        self._sync = threading.Condition()  # group commit of fsync
        self._written = 0  # appends so far
        self._size = 0  # bytes in the file through the last whole line
        self._synced = 0  # appends known to be on disk
        self._synced_size = 0
        self._syncing = False
        self._pending: list[_Write] = []  # appended, not yet synced
        self._dir_synced = True
        self._fd = -1
        try:
            self._fd = self._open_locked(self.path, os.O_CREAT)
            with contextlib.suppress(FileNotFoundError):  # a compaction cut short
                self._tmp_path().unlink()
            self._replay()
            self._end_with_newline()
            self._size = self._synced_size = os.fstat(self._fd).st_size
            if self._lines > max(2 * len(self._records), self.COMPACT_MIN_LINES):
                self._compact()
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            self._lock_handle.close()
            raise

    # -- reading ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._records

    def get(self, record_id: str) -> dict | None:
        """The record with that id (a copy: changing it changes nothing stored)."""
        line = self._records.get(record_id)
        return None if line is None else json.loads(line)

    def ids(self) -> list[str]:
        with self._mutex:
            return list(self._records)

    # -- writing ----------------------------------------------------------------

    def upsert(self, record: dict, replacing: str | None = None) -> bool:
        """Store ``record`` (it must have an ``id``), and forget the record
        ``replacing`` in the same write; True when the id is new."""
        with self._mutex:
            new = record["id"] not in self._records
        self.write([record], [replacing] if replacing else [])
        return new

    def remove(self, record_id: str) -> bool:
        """Forget a record; False when it was not stored."""
        with self._mutex:
            if record_id not in self._records:
                return False
        self.write(removals=[record_id])
        return True

    def write(self, upserts: list[dict] = (), removals: list[str] = ()) -> None:  # type: ignore[assignment]
        """Store and forget several records with one fsync. Lines reach the
        file in order; a crash may keep the first of them without the rest."""
        with self._mutex:  # what _stored adds may depend on what is stored
            records = [self._stored(r) for r in upserts]
            lines = [(r["id"], _record_line(r).encode("utf-8"), r) for r in records]
            write = self._write_locked(lines, list(removals))
        if write is not None:
            self._wait_synced(write)

    def _stored(self, record: dict) -> dict:
        """A record as it is stored (the mutex held): as given, here."""
        return record

    def _write_locked(
        self, lines: list[tuple[str, bytes, dict]], removals: list[str]
    ) -> _Write | None:
        """:meth:`write`'s append, the mutex held: what to wait for, or None
        when there is nothing to write."""
        removals = [i for i in removals if i in self._records]
        if not lines and not removals:
            return None
        data = b"".join(line + b"\n" for _, line, _ in lines)
        data += b"".join(
            json.dumps({"id": i, "deleted": True}).encode() + b"\n" for i in removals
        )
        previous: dict[str, bytes | None] = {}
        for record_id in [i for i, _, _ in lines] + removals:
            previous.setdefault(record_id, self._records.get(record_id))
        write = self._append(data, len(lines) + len(removals), previous)
        for record_id, line, record in lines:
            self._put(record_id, line, record)
        for record_id in removals:
            self._drop(record_id)
        self._compact_if_due()
        return write

    def close(self) -> None:
        while True:
            with self._mutex, self._sync:
                if not self._syncing:  # an fsync's undo may need the mutex
                    if self._fd >= 0:
                        with contextlib.suppress(OSError):  # acknowledged is synced
                            os.fsync(self._fd)
                            self._synced = self._written  # for writers still waiting
                        os.close(self._fd)
                        self._fd = -1
                        self._sync.notify_all()
                    self._lock_handle.close()
                    return
            time.sleep(0.01)

    # -- the view in memory: subclasses index records here -----------------------

    def _put(self, record_id: str, line: bytes, record: dict) -> None:
        self._drop(record_id)
        self._records[record_id] = line

    def _drop(self, record_id: str) -> None:
        self._records.pop(record_id, None)

    def _restore(self, record_id: str, line: bytes | None) -> None:
        if line is None:
            self._drop(record_id)
        else:
            self._put(record_id, line, json.loads(line))

    # -- the file ---------------------------------------------------------------

    def _replay(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        last = len(lines)
        while last and not lines[last - 1].strip():
            last -= 1
        good_end = 0
        for number, raw in enumerate(lines[:last], start=1):
            if raw.strip():
                record = _parse_record(raw)
                if record is None:
                    if number < last:
                        raise StoreDamaged(
                            f"{self.path} line {number} is not a valid record: the file "
                            f"is damaged in the middle. Inspect it (sed -n {number}p "
                            f"{self.path}); `python api.py --repair-store` keeps every "
                            f"valid record and moves the damaged lines to a side file"
                        )
                    log.warning(
                        "%s: skipping the torn last line %d (a write cut short by a crash)",
                        self.path,
                        number,
                    )
                    self._truncate(good_end)
                    break
                self._lines += 1
                if record.get("deleted"):
                    self._drop(record["id"])
                else:
                    self._put(record["id"], raw.strip(), record)
            good_end += len(raw) + 1
        lines.clear()

    def _truncate(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())

    def _tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def _open_locked(self, path: Path, flags: int) -> int:
        """Open ``path`` for appending, under the store's lock."""
        fd = os.open(path, flags | os.O_WRONLY | os.O_APPEND, 0o600)
        try:
            _flock(fd, self.path, self.WHAT, self.SETTING)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _end_with_newline(self) -> None:
        """A file edited by hand may lack its last newline: never glue two records."""
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")
        _fsync_dir(self.path.parent)

    def _append(
        self, data: bytes, lines: int, previous: dict[str, bytes | None]
    ) -> _Write:
        """Append whole lines (the caller holds the mutex). On any failure the
        file is cut back to its last whole line and OSError raised: nothing of
        the refused write remains, and the next one starts clean."""
        self._pending = [w for w in self._pending if w.seq > self._synced]
        try:
            # A tail an earlier failure could not cut off: cut it now.
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                if not written:
                    raise OSError(errno.ENOSPC, "short write: the disk is full")
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        with self._sync:
            self._written += 1
            self._size += len(data)
            write = _Write(self._written, previous, lines)
        self._pending.append(write)
        self._lines += lines
        return write

    def _compact_if_due(self) -> None:
        """Rewrite the file when it is mostly dead lines (caller holds the mutex).
        A compaction that fails changes nothing: the journal stays as it was."""
        if self._lines <= max(2 * len(self._records), self.COMPACT_MIN_LINES):
            return
        with self._sync:
            if self._syncing:  # never swap the fd under a running fsync: later
                return
            try:
                self._compact()
            except OSError as e:
                log.warning(
                    "%s: compaction failed (%s); the journal stays as it is",
                    self.path,
                    e,
                )

    def _compact(self) -> None:
        """Write every live record to a new file, then put it in place of the
        journal; every write so far is then on disk."""
        tmp = self._tmp_path()
        fd = self._open_locked(tmp, os.O_CREAT | os.O_TRUNC)
        size = 0
        try:
            chunk: list[bytes] = []
            for line in self._records.values():
                chunk.append(line + b"\n")
                if len(chunk) == 4096:
                    size += _write_all(fd, b"".join(chunk))
                    chunk.clear()
            size += _write_all(fd, b"".join(chunk))
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self._dir_synced = False  # the rename is durable once its directory is
        with contextlib.suppress(OSError):  # if not now, before the next answer
            _fsync_dir(self.path.parent)
            self._dir_synced = True
        self._lines = len(self._records)
        self._size = self._synced_size = size
        self._synced = self._written
        self._pending.clear()
        log.info("compacted %s to %d records", self.path, self._lines)

    def _wait_synced(self, write: _Write) -> None:
        """Return once ``write`` is on disk, sharing fsyncs; OSError if the
        fsync failed, after every write not yet on disk was undone."""
        with self._sync:
            while self._synced < write.seq and not write.failed:
                if self._syncing:
                    self._sync.wait()
                    continue
                self._syncing = True
                target, size, fd = self._written, self._size, self._fd
                self._sync.release()
                try:
                    os.fsync(fd)
                    if not self._dir_synced:  # a compaction's rename
                        _fsync_dir(self.path.parent)
                        self._dir_synced = True
                except OSError as e:
                    # No other fsync may start before the undo: after a failed
                    # fsync, a later one can succeed without the lost pages.
                    log.error(
                        "%s: fsync failed (%s); undoing unsynced writes", self.path, e
                    )
                    self._roll_back()
                else:
                    with self._sync:
                        self._synced = max(self._synced, target)
                        self._synced_size = max(self._synced_size, size)
                finally:
                    self._sync.acquire()
                    self._syncing = False
                    self._sync.notify_all()
            if write.failed:
                raise OSError(errno.EIO, f"{self.path} could not be synced to disk")

    def _roll_back(self) -> None:
        """Undo every write not yet on disk, newest first, in the file and in
        memory, and mark them failed."""
        with self._mutex, self._sync:
            undone = [w for w in self._pending if w.seq > self._synced]
            with contextlib.suppress(OSError):  # if not now, the next append cuts it
                os.ftruncate(self._fd, self._synced_size)
            for write in reversed(undone):
                for record_id, line in write.previous.items():
                    self._restore(record_id, line)
                write.failed = True
                self._lines -= write.lines
            self._size = self._synced_size
            self._synced = self._written
            self._pending.clear()
            self._sync.notify_all()


class SubscriptionStore(Protocol):
    """Push subscriptions and FCM tokens by id: JsonSubscriptionStore (the
    JSON-lines file) or RedisSubscriptionStore. A record is a dict with an
    ``id``; ``kind`` "fcm" for an FCM token, else a web push subscription
    (``endpoint``, ``keys``); ``topics``. Each record has a place in line,
    given when its id is first stored and kept for life, which a fan-out is
    planned by. Writes raise OSError (StoreUnavailable on Redis) when the
    store refuses them, and change nothing then."""

    def __len__(self) -> int:
        """How many records are stored."""

    def get(self, record_id: str) -> dict | None:
        """The record with that id, or None."""

    def get_many(self, record_ids: list[str]) -> list[dict | None]:
        """The records of ``record_ids``, in order; None for those not stored."""

    def list(self) -> list[dict]:
        """Every record."""

    def upsert(self, record: dict, replacing: str | None = None) -> bool:
        """Store ``record``, and forget ``replacing`` in the same write; True
        when the id is new."""

    def remove(self, record_id: str) -> bool:
        """Forget a record; False when it was not stored."""

    def write(self, upserts: list[dict] = (), removals: list[str] = ()) -> None:  # type: ignore[assignment]
        """Store and forget several records at once."""

    def count(self, kind: str, topic: str | None = None) -> int:
        """How many records of a kind, all or on ``topic`` (kept, not counted)."""

    def topics(self) -> dict[str, int]:
        """How many records (of either kind) each topic has."""

    def sequence(self) -> int:
        """Where the line of records ends now."""

    def page(
        self, kind: str, topic: str | None, after: int, upto: int, limit: int
    ) -> list[tuple[int, str, str]]:
        """The next ``limit`` records of a kind, all or on ``topic``, in line
        after ``after`` and up to ``upto``: (place, id, push service origin)."""

    def of_users(self, users: list[str]) -> list[tuple[int, str, str]]:
        """Every record bound to one of ``users`` (a record's ``user``), from
        an index: (place, id, push service origin)."""

    def placed(self, record_ids: list[str]) -> list[tuple[int, str, str]]:
        """Those of ``record_ids`` stored: (place, id, push service origin)."""

    def note_deliveries(
        self,
        failed: list[str],
        succeeded: list[str],
        limit: int,
        now: float,
        recent: int = 0,
    ) -> list[str]:
        """One more refusal in a row for each of ``failed`` (removed at
        ``limit``); for each of ``succeeded`` none, its ``last_success``
        ``now``, and ``now`` among its ``recent`` (the times of its last
        ``recent`` successes in 24 hours, for MAX_PER_DAY); the ids removed."""

    def seen(self) -> Any:
        """Each record's (created, last_success), either possibly None, a
        list at a time: how long since each was last reached."""

    def close(self) -> None:
        """Close the file or connection."""


def _a_time(value: Any) -> bool:
    """Whether a value read from a side map is a time (a hand-edited one may
    hold anything json takes, NaN and Infinity too)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


class JsonSubscriptionStore(JsonLinesStore):
    """Push subscriptions and FCM tokens by id (see JsonLinesStore), with an
    index of each one's channel, push service origin, topics and place in
    line, so a fan-out is planned and counted without reading every record.

    A record's place in line (``seq``) is given when its id is first stored
    and kept for life, in the record itself: a fan-out goes to the records
    in line up to where the line ended when it started, as on Redis (where
    it is a counter, ``seq``, that Redis keeps).
    """

    WHAT = "subscription file"

    def __init__(self, path: str | Path):
        # id -> (origin, topics, seq), in the order of seq.
        self._index: dict[str, tuple[str, tuple[str, ...], int]] = {}
        self._counts: collections.Counter[tuple[str, str | None]] = (
            collections.Counter()
        )
        self._origins: dict[str, str] = {}  # one string per origin, shared
        self._seq = 0
        self._plans: dict[tuple, tuple[list[int], list[str], list[str]]] = {}
        self._users: dict[str, list[str]] = {}  # user -> ids of their records
        self._user_of: dict[str, str] = {}  # id -> user, for records bound to one
        self._last: dict[str, int] = {}  # id -> last success (LAST_SUCCESS_FLUSH)
        self._recent: dict[str, list[int]] = {}  # id -> success times (MAX_PER_DAY)
        self._last_changed = False
        self._last_written = time.monotonic()
        super().__init__(path)
        self._last = {
            i: int(t) for i, t in self._read_side(".last").items() if _a_time(t)
        }
        self._recent = {
            i: [int(t) for t in times if _a_time(t)]
            for i, times in self._read_side(".recent").items()
            if isinstance(times, list)
        }

    def _side_path(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _read_side(self, suffix: str) -> dict:
        """A map beside the records (id -> times) as it was last written,
        for the records still stored; {} when it is missing or unreadable."""
        path = self._side_path(suffix)
        try:
            kept = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # only times: start without them
            log.warning("ignored %s: %s", path, e)
            return {}
        if not isinstance(kept, dict):
            return {}
        return {i: t for i, t in kept.items() if i in self._records}

    def _write_last(self, force: bool = False) -> None:
        """Write the last successes, if changed, at most every
        LAST_SUCCESS_FLUSH seconds (``force``: now); a failure is logged and
        tried again later (they are times, not what a client was told)."""
        with self._mutex:
            due = time.monotonic() - self._last_written >= LAST_SUCCESS_FLUSH
            if not self._last_changed or not (due or force):
                return
            cut = time.time() - DAY
            self._recent = {
                i: kept
                for i, times in self._recent.items()
                if (kept := [t for t in times if t > cut])
            }
            maps = {".last": self._last, ".recent": self._recent}
            data = {
                k: json.dumps(v, separators=(",", ":")).encode()
                for k, v in maps.items()
            }
            self._last_changed = False
            self._last_written = time.monotonic()
        try:
            for suffix, written in data.items():
                _replace_private(self._side_path(suffix), written)
        except OSError as e:
            log.warning("could not write %s: %s", self._side_path(".last"), e)
            with self._mutex:
                self._last_changed = True

    def close(self) -> None:
        self._write_last(force=True)
        super().close()

    def count(self, kind: str, topic: str | None = None) -> int:
        """How many records of a kind (a record's ``kind``, "webpush" if it has
        none), all or those subscribed to ``topic``."""
        return self._counts[(kind, topic)]

    def sequence(self) -> int:
        """Where the line of records ends now: every record stored has a
        ``seq`` at most this."""
        with self._mutex:
            return self._seq

    def page(
        self, kind: str, topic: str | None, after: int, upto: int, limit: int
    ) -> list[tuple[int, str, str]]:
        """The next ``limit`` records of a kind, all or on ``topic``, in line
        after ``after`` and up to ``upto``: (seq, id, push service origin)."""
        key = (kind, topic, upto)
        plan = self._plans.get(key)
        if plan is None or not after:  # taken once per plan: later ones are past upto
            fcm = kind == "fcm"
            seqs, ids, origins = [], [], []
            with self._mutex:
                for record_id, (origin, topics, seq) in self._index.items():
                    wanted = topic is None or topic in topics
                    if wanted and seq <= upto and (origin == "fcm") == fcm:
                        seqs.append(seq)
                        ids.append(record_id)
                        origins.append(origin)
            if any(a > b for a, b in itertools.pairwise(seqs)):  # one stored again
                order = sorted(range(len(seqs)), key=seqs.__getitem__)
                seqs = [seqs[i] for i in order]
                ids = [ids[i] for i in order]
                origins = [origins[i] for i in order]
            plan = self._plans[key] = (seqs, ids, origins)
            while len(self._plans) > 4:
                del self._plans[next(iter(self._plans))]
        seqs, ids, origins = plan
        start = bisect.bisect_right(seqs, after)
        end = start + limit
        if end >= len(seqs):  # the plan's last page: its memory goes back
            self._plans.pop(key, None)
        return list(zip(seqs[start:end], ids[start:end], origins[start:end]))

    def of_users(self, users: list[str]) -> list[tuple[int, str, str]]:
        """Every record bound to one of ``users``: (seq, id, origin)."""
        with self._mutex:
            ids = [i for user in users for i in self._users.get(user, ())]
            return [(self._index[i][2], i, self._index[i][0]) for i in ids]

    def placed(self, record_ids: list[str]) -> list[tuple[int, str, str]]:
        """Those of ``record_ids`` stored: (seq, id, origin)."""
        with self._mutex:
            found = [(i, self._index.get(i)) for i in record_ids]
            return [(entry[2], i, entry[0]) for i, entry in found if entry]

    def note_deliveries(
        self,
        failed: list[str],
        succeeded: list[str],
        limit: int,
        now: float,
        recent: int = 0,
    ) -> list[str]:
        """One more refusal in a row for each of ``failed`` (removed at
        ``limit``); for each of ``succeeded`` none, its last success ``now``
        and its ``recent`` success times (in maps beside the records, written
        at most once a minute: no line is rewritten for them); the ids
        removed. Read and written under the mutex, so a subscribe in
        between is never undone."""
        with self._mutex:
            upserts, removals = [], []
            for record_id in failed:
                line = self._records.get(record_id)
                if line is None:
                    continue
                record = json.loads(line)
                record["failures"] = record.get("failures", 0) + 1
                if record["failures"] >= limit:
                    removals.append(record_id)
                else:
                    upserts.append(record)
            when = int(now)
            for record_id in succeeded:
                line = self._records.get(record_id)
                if line is None:
                    continue
                self._last[record_id] = when
                self._last_changed = True
                if recent:
                    times = self._recent.get(record_id, [])
                    times = [t for t in times if t > when - DAY][1 - recent :]
                    self._recent[record_id] = [*times, when] if recent > 1 else [when]
                if b'"failures":' in line:
                    record = json.loads(line)
                    record.pop("failures", None)
                    upserts.append(record)
            lines = [(r["id"], _record_line(r).encode("utf-8"), r) for r in upserts]
            write = self._write_locked(lines, removals)
        if write is not None:
            self._wait_synced(write)
        self._write_last()
        return removals

    def topics(self) -> dict[str, int]:
        """How many records (of either kind) each topic has."""
        counts: collections.Counter[str] = collections.Counter()
        with self._mutex:
            for (_, topic), n in self._counts.items():
                if topic is not None and n > 0:
                    counts[topic] += n
        return dict(counts)

    def get(self, record_id: str) -> dict | None:
        """The record with that id (a copy), without its place in line, with
        its last success."""
        record = super().get(record_id)
        if record is not None:
            record.pop("seq", None)
            last = self._last.get(record_id)
            if last is not None and last > (record.get("last_success") or 0):
                record["last_success"] = last
            recent = self._recent.get(record_id)  # the map may be replaced meanwhile
            if recent is not None:
                record["recent"] = list(recent)
        return record

    def list(self) -> list[dict]:
        """Every record."""
        with self._mutex:
            ids = list(self._records)
        return [r for r in map(self.get, ids) if r is not None]

    def get_many(self, record_ids: list[str]) -> list[dict | None]:
        """The records of ``record_ids``, in order; None for those not stored."""
        return [self.get(record_id) for record_id in record_ids]

    def seen(self) -> Any:
        """As SubscriptionStore.seen: from the records and the map beside them."""
        with self._mutex:
            ids = list(self._records)
        for start in range(0, len(ids), 1000):
            records = self.get_many(ids[start : start + 1000])
            yield [(r.get("created"), r.get("last_success")) for r in records if r]

    def _stored(self, record: dict) -> dict:
        """A new id takes the next place in line; a stored one keeps its own.
        Places are microseconds since the epoch (or one more than the last),
        so one is never given twice, even once the record that held the last
        was removed and the file compacted before a restart. A record's
        recent successes stay beside it (what ``get`` gave is not stored)."""
        if "recent" in record:
            record = {k: v for k, v in record.items() if k != "recent"}
        if "seq" in record:
            return record
        known = self._index.get(record["id"])
        if known is None:
            self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return {**record, "seq": known[2] if known else self._seq}

    def _put(self, record_id: str, line: bytes, record: dict) -> None:
        known = self._index.get(record_id)
        last = self._last.get(record_id)
        recent = self._recent.get(record_id)
        super()._put(record_id, line, record)  # by way of _drop: put them back
        if last is not None:
            self._last[record_id] = last
        if recent is not None:
            self._recent[record_id] = recent
        user = record.get("user")
        if user is not None:
            self._user_of[record_id] = user
            self._users.setdefault(user, []).append(record_id)
        kind = record.get("kind", "webpush")
        origin = record_origin(record)
        origin = self._origins.setdefault(origin, origin)
        topics = tuple(dict.fromkeys(record.get("topics") or ()))
        # Records from before places in line get them in the file's order.
        seq = record.get("seq") or (known[2] if known else self._seq + 1)
        self._seq = max(self._seq, seq)
        self._index[record_id] = (origin, topics, seq)
        self._counts[(kind, None)] += 1
        for topic in topics:
            self._counts[(kind, topic)] += 1

    def _drop(self, record_id: str) -> None:
        super()._drop(record_id)
        self._recent.pop(record_id, None)
        if self._last.pop(record_id, None) is not None:
            self._last_changed = True
        user = self._user_of.pop(record_id, None)
        if user is not None:
            self._users[user].remove(record_id)
            if not self._users[user]:
                del self._users[user]
        entry = self._index.pop(record_id, None)
        if entry is not None:
            kind = origin_channel(entry[0])
            self._counts[(kind, None)] -= 1
            for topic in entry[1]:
                self._counts[(kind, topic)] -= 1
                if not self._counts[(kind, topic)]:
                    del self._counts[(kind, topic)]


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def repair_store(path: Path) -> tuple[int, int, Path | None]:
    """Rewrite a damaged store with its valid records, the damaged lines moved to
    ``<file>.damaged-<time>``: (records kept, lines moved, the side file)."""
    path = path.resolve()
    lock = _lock_file(path.with_name(path.name + ".lock"))
    try:
        _lock_file(path).close()  # refused while a server holds the file
        good, bad = [], []
        for raw in path.read_bytes().split(b"\n"):
            if raw.strip():
                (good if _parse_record(raw) is not None else bad).append(raw)
        side = None
        if bad:  # it holds subscriptions' secrets: as private as the store
            side = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            with open(side, "wb", opener=_private_opener) as f:
                f.write(b"\n".join(bad) + b"\n")
        _replace_private(path, b"".join(line + b"\n" for line in good))
    finally:
        lock.close()
    store = JsonSubscriptionStore(path)  # the replay keeps the last state of each id
    kept = len(store)
    store.close()
    return kept, len(bad), side


def _record_line(record: dict) -> str:
    """A record as one line of the store: compact, strict JSON (no NaN)."""
    return json.dumps(
        record, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    return record


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole or not at all (a crash leaves the
    old file or the new one): written to a new private (0600) file beside
    it, synced, renamed over it, its folder synced. OSError, the file
    unchanged, if the disk refuses."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)  # created afresh: 0600 whatever was there
    try:
        with open(temporary, "wb", opener=_private_opener) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class StoreUnavailable(OSError):
    """Redis could not be reached, or refused a write: nothing was stored."""


def redact_url(url: str) -> str:
    """A URL fit for a log line: its password, if any (``:pw@`` or
    ``?password=``), replaced by ***. Read as text, not parsed: a password
    that should have been percent-encoded (``@``, ``/``, ``#``) is hidden
    too, up to the last ``@`` or to the end of the URL."""
    url = re.sub(r"([?&]password=).*", r"\1***", url, flags=re.DOTALL)
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if separator and at:
        user, colon, _ = userinfo.partition(":")
        url = f"{scheme}://{user + ':***' if colon else '***'}@{host}"
    return url


def connect_redis(settings: Settings) -> Any:
    """A redis-py client for REDIS_URL, reachable and new enough (6.2 brought
    XAUTOCLAIM), or SettingError saying what is wrong. redis-py is imported
    only here: the JSON store does without it."""
    try:
        import redis
    except ImportError:
        raise SettingError(
            "REDIS_URL needs redis-py: pip install -r requirements.txt"
        ) from None
    shown = redact_url(settings.redis_url)
    options: dict[str, Any] = {}
    if not settings.redis_url.startswith("unix:"):  # a socket has no keepalive
        options["socket_keepalive"] = True
    try:
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            protocol=2,
            socket_connect_timeout=5,
            socket_timeout=10,  # longer than any BLOCK the workers use
            health_check_interval=30,
            **options,
        )
        info = client.info("server")
    except ValueError as e:
        raise SettingError(
            f"REDIS_URL={shown!r} is not a Redis URL ({e}); "
            "e.g. redis://localhost:6379/0 or unix:///run/redis/redis.sock?db=0"
        ) from None
    except redis.RedisError as e:
        hint = ""
        if settings.redis_url.count("@") > 1 or "#" in settings.redis_url:
            hint = " (a password with @, /, # or % in it must be percent-encoded)"
        raise SettingError(f"cannot reach Redis at {shown}: {e}{hint}") from None
    version = str(info.get("valkey_version") or info.get("redis_version", "0"))
    if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < (6, 2):
        raise SettingError(
            f"Redis {version} at {shown} is too old: 6.2 or later (or Valkey) is needed"
        )
    return client


@contextlib.contextmanager
def _redis_errors(what: str) -> Any:
    """Redis's errors as the OSErrors the JSON store raises: the HTTP layer
    answers 507 when Redis is out of memory, 503 when it cannot be reached
    or refuses for another reason (a read-only replica, MISCONF, NOPERM)."""
    import redis

    try:
        yield
    except redis.ResponseError as e:
        # redis-py names OOM by its class and drops the word from the text.
        # Redis 6.2 wraps it, in a script, as "ERR Error running script ... OOM".
        if isinstance(e, redis.OutOfMemoryError) or "OOM command not" in str(e):
            raise StoreUnavailable(
                errno.ENOSPC, f"Redis is out of memory (maxmemory) while {what}"
            ) from None
        raise StoreUnavailable(
            errno.EIO, f"Redis refused a command while {what}: {e}"
        ) from None
    except redis.RedisError as e:
        raise StoreUnavailable(
            errno.EIO, f"Redis failed while {what}: {str(e).rstrip('.')}"
        ) from None


# One write of records and their indexes, atomic. ARGV: prefix, the number of
# upserts, each as (id, line, kind, origin, user or "", last success or "",
# number of topics, topics...), then the ids to remove. A record keeps its place in the indexes
# (its score, from the ``seq`` counter) for life, so a fan-out being planned
# meets each record once.
SUBSCRIPTION_UNINDEX_LUA = """
local p = ARGV[1]
local subs, counts = p .. 'subs', p .. 'count'
local function unindex(id)
  local old = redis.call('HGET', subs, id)
  if not old then return false, false end
  local record = cjson.decode(old)
  local kind = record['kind'] or 'webpush'
  local score = redis.call('ZSCORE', p .. 'ix:' .. kind, id)
  redis.call('ZREM', p .. 'ix:' .. kind, id)
  if type(record['topics']) == 'table' then
    for _, topic in ipairs(record['topics']) do
      redis.call('ZREM', p .. 'tx:' .. kind .. ':' .. topic, id)
    end
  end
  if type(record['user']) == 'string' then
    redis.call('ZREM', p .. 'ux:' .. record['user'], id)
  end
  redis.call('HINCRBY', counts, kind, -1)
  redis.call('HDEL', p .. 'fails', id)
  redis.call('HDEL', p .. 'origin', id)
  redis.call('HDEL', p .. 'last', id)
  redis.call('HDEL', p .. 'recent', id)
  return true, score
end
"""
SUBSCRIPTION_WRITE_LUA = (
    SUBSCRIPTION_UNINDEX_LUA
    + """
local results, i = {}, 3
for n = 1, tonumber(ARGV[2]) do
  local id, line, kind, user = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local last, topics = ARGV[i + 5], tonumber(ARGV[i + 6])
  if last == '' then last = redis.call('HGET', p .. 'last', id) end
  local recent = redis.call('HGET', p .. 'recent', id)
  local existed, score = unindex(id)
  results[n] = existed and 0 or 1
  if not score then score = redis.call('INCR', p .. 'seq') end
  redis.call('HSET', subs, id, line)
  redis.call('HSET', p .. 'origin', id, ARGV[i + 3])
  redis.call('ZADD', p .. 'ix:' .. kind, score, id)
  if user ~= '' then redis.call('ZADD', p .. 'ux:' .. user, score, id) end
  if last then redis.call('HSET', p .. 'last', id, last) end
  if recent then redis.call('HSET', p .. 'recent', id, recent) end
  for t = 1, topics do
    redis.call('ZADD', p .. 'tx:' .. kind .. ':' .. ARGV[i + 6 + t], score, id)
  end
  redis.call('HINCRBY', counts, kind, 1)
  i = i + 7 + topics
end
for j = i, #ARGV do
  if unindex(ARGV[j]) then
    redis.call('HDEL', subs, ARGV[j])
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
end
return results
"""
)
# Refusals in a row (PRUNE_AFTER_FAILURES), last successes and recent ones
# (MAX_PER_DAY). ARGV: prefix, limit, now, how many recent successes to keep
# (0: none), the number of failed ids, those ids, then the ids that
# succeeded. Returns the ids removed.
SUBSCRIPTION_DELIVERIES_LUA = (
    SUBSCRIPTION_UNINDEX_LUA
    + """
local limit, now, keep = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local failed, removed = tonumber(ARGV[5]), {}
for j = 6, 5 + failed do
  local id = ARGV[j]
  if redis.call('HEXISTS', subs, id) == 1 then
    if redis.call('HINCRBY', p .. 'fails', id, 1) >= limit then
      unindex(id)
      redis.call('HDEL', subs, id)
      removed[#removed + 1] = id
    end
  end
end
if #ARGV > 5 + failed then
  redis.call('HDEL', p .. 'fails', unpack(ARGV, 6 + failed))
  for j = 6 + failed, #ARGV do
    local id = ARGV[j]
    if redis.call('HEXISTS', subs, id) == 1 then
      redis.call('HSET', p .. 'last', id, now)
      if keep > 0 then
        local times, old = {}, redis.call('HGET', p .. 'recent', id)
        for t in string.gmatch(old or '', '[^,]+') do
          if tonumber(t) > tonumber(now) - 86400 then times[#times + 1] = t end
        end
        while #times > keep - 1 do table.remove(times, 1) end
        times[#times + 1] = now
        redis.call('HSET', p .. 'recent', id, table.concat(times, ','))
      end
    end
  end
end
return removed
"""
)


class RedisSubscriptionStore:
    """Push subscriptions and FCM tokens in Redis, shared by every process:
    the SubscriptionStore interface, nothing held in memory.

    Keys, after REDIS_PREFIX: ``subs`` (hash: id -> the record as a JSON
    line), ``count`` (hash: kind -> how many), ``last`` (hash: id -> its
    last successful delivery, apart so a delivery does not rewrite the
    record), and the indexes a fan-out is planned from, page by page:
    ``ix:<kind>``, ``tx:<kind>:<topic>`` and ``ux:<user>`` (sorted sets of
    ids, scored in the order they first subscribed, from the ``seq``
    counter). A write is one Lua script: a record and its indexes change
    together or not at all.
    """

    def __init__(self, client: Any, prefix: str = "webpush:"):
        self.redis = client
        self.prefix = prefix
        self._write = client.register_script(SUBSCRIPTION_WRITE_LUA)
        self._deliveries = client.register_script(SUBSCRIPTION_DELIVERIES_LUA)

    def __len__(self) -> int:
        with _redis_errors("counting subscriptions"):
            return self.redis.hlen(self.prefix + "subs")

    def __contains__(self, record_id: str) -> bool:
        with _redis_errors("reading a subscription"):
            return bool(self.redis.hexists(self.prefix + "subs", record_id))

    def get(self, record_id: str) -> dict | None:
        return self.get_many([record_id])[0]

    def get_many(self, record_ids: list[str]) -> list[dict | None]:
        """The records of ``record_ids``, in order; None for those not stored."""
        if not record_ids:
            return []
        with _redis_errors("reading subscriptions"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(self.prefix + "subs", record_ids)
            pipe.hmget(self.prefix + "last", record_ids)
            pipe.hmget(self.prefix + "recent", record_ids)
            lines, lasts, recents = pipe.execute()
        records = [None if line is None else json.loads(line) for line in lines]
        for record, last, recent in zip(records, lasts, recents):
            if record is not None and last is not None:
                record["last_success"] = int(last)
            if record is not None and recent:
                record["recent"] = [int(t) for t in recent.split(",")]
        return records

    def ids(self) -> list[str]:
        with _redis_errors("listing subscriptions"):
            return self.redis.hkeys(self.prefix + "subs")

    def scan(self, chunk: int = 1000) -> Any:
        """Every record, a list of at most about ``chunk`` at a time."""
        cursor = 0
        while True:
            with _redis_errors("listing subscriptions"):
                cursor, lines = self.redis.hscan(
                    self.prefix + "subs", cursor, count=chunk
                )
            if lines:  # as get_many gives them: with their last success
                yield [r for r in self.get_many(list(lines)) if r is not None]
            if not cursor:
                return

    def upsert(self, record: dict, replacing: str | None = None) -> bool:
        """As JsonSubscriptionStore.upsert, in one script."""
        return bool(self._run([record], [replacing] if replacing else [])[0])

    def remove(self, record_id: str) -> bool:
        """Forget a record; False when it was not stored."""
        return bool(self._run([], [record_id])[0])

    def write(self, upserts: list[dict] = (), removals: list[str] = ()) -> None:  # type: ignore[assignment]
        """Store and forget several records at once, atomically."""
        if upserts or removals:
            self._run(list(upserts), list(removals))

    def _run(self, upserts: list[dict], removals: list[str]) -> list[int]:
        args: list[Any] = [self.prefix, len(upserts)]
        for record in upserts:
            topics = record.get("topics") or []
            last = record.get("last_success")  # kept in ``last``, not the line
            line = _record_line(
                {k: v for k, v in record.items() if k not in ("last_success", "recent")}
            )
            args += [record["id"], line, record.get("kind", "webpush")]
            args += [record_origin(record), record.get("user") or ""]
            args += ["" if last is None else int(last), len(topics), *topics]
        with _redis_errors("storing subscriptions"):
            return self._write(args=args + removals)

    def count(self, kind: str, topic: str | None = None) -> int:
        """How many records of a kind, all or those subscribed to ``topic``."""
        with _redis_errors("counting subscriptions"):
            if topic is None:
                return int(self.redis.hget(self.prefix + "count", kind) or 0)
            return self.redis.zcard(self.index_key(kind, topic))

    def note_deliveries(
        self,
        failed: list[str],
        succeeded: list[str],
        limit: int,
        now: float,
        recent: int = 0,
    ) -> list[str]:
        """As JsonSubscriptionStore.note_deliveries, in one script (the count
        of each is the hash ``fails``, forgotten when it is stored again; the
        last success is the hash ``last``, the recent ones ``recent``)."""
        if not failed and not succeeded:
            return []
        with _redis_errors("counting refusals"):
            return self._deliveries(
                args=[
                    self.prefix,
                    limit,
                    int(now),
                    recent,
                    len(failed),
                    *failed,
                    *succeeded,
                ]
            )

    def seen(self) -> Any:
        """As SubscriptionStore.seen."""
        for records in self.scan():
            yield [(r.get("created"), r.get("last_success")) for r in records]

    def of_users(self, users: list[str]) -> list[tuple[int, str, str]]:
        """As JsonSubscriptionStore.of_users: from the ``ux:<user>`` indexes."""
        with _redis_errors("finding a user's subscriptions"):
            pipe = self.redis.pipeline(transaction=False)
            for user in users:
                pipe.zrange(self.prefix + "ux:" + user, 0, -1, withscores=True)
            found = [pair for pairs in pipe.execute() for pair in pairs]
        return self._with_origins(found)

    def placed(self, record_ids: list[str]) -> list[tuple[int, str, str]]:
        """As JsonSubscriptionStore.placed: scores from the kinds' indexes."""
        if not record_ids:
            return []
        with _redis_errors("finding subscriptions"):
            pipe = self.redis.pipeline(transaction=False)
            for kind in CHANNELS:
                pipe.zmscore(self.index_key(kind, None), record_ids)
            scores = pipe.execute()
        found = []
        for i, record_id in enumerate(record_ids):
            score = next((s[i] for s in scores if s[i] is not None), None)
            if score is not None:
                found.append((record_id, score))
        return self._with_origins(found)

    def _with_origins(
        self, found: list[tuple[str, float]]
    ) -> list[tuple[int, str, str]]:
        """(id, score) pairs as (place, id, origin): the hash ``origin``, or,
        for records stored before it, the record itself."""
        ids = [record_id for record_id, _ in found]
        if not ids:
            return []
        with _redis_errors("reading subscriptions"):
            origins = self.redis.hmget(self.prefix + "origin", ids)
        unknown = [i for i, origin in zip(ids, origins) if origin is None]
        if unknown:
            known = {r["id"]: record_origin(r) for r in self.get_many(unknown) if r}
            origins = [o or known.get(i, "") for i, o in zip(ids, origins)]
        return [
            (int(score), record_id, origin)
            for (record_id, score), origin in zip(found, origins)
        ]

    def topics(self) -> dict[str, int]:
        """How many records (of either kind) each topic has: the sizes of the
        topic indexes (Redis drops an empty one)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "tx:*"
        start = len(self.prefix) + len("tx:")
        counts: collections.Counter[str] = collections.Counter()
        with _redis_errors("counting topics"):
            keys = list(self.redis.scan_iter(match=pattern, count=1000))
            for chunk in _chunks(keys):
                pipe = self.redis.pipeline(transaction=False)
                for key in chunk:
                    pipe.zcard(key)
                for key, size in zip(chunk, pipe.execute()):
                    counts[key[start:].partition(":")[2]] += size
        return {topic: n for topic, n in counts.items() if n}

    def index_key(self, kind: str, topic: str | None) -> str:
        """The sorted set of the records of a kind, all or on a topic."""
        if topic is None:
            return f"{self.prefix}ix:{kind}"
        return f"{self.prefix}tx:{kind}:{topic}"

    def sequence(self) -> int:
        """As JsonSubscriptionStore.sequence: the ``seq`` counter."""
        with _redis_errors("reading the subscription count"):
            return int(self.redis.get(self.prefix + "seq") or 0)

    def page(
        self, kind: str, topic: str | None, after: int, upto: int, limit: int
    ) -> list[tuple[int, str, str]]:
        """As JsonSubscriptionStore.page: from the index, with each record's
        origin from the hash ``origin`` (read from the record itself for
        records stored before it)."""
        with _redis_errors("planning a notification"):
            found = self.redis.zrangebyscore(
                self.index_key(kind, topic),
                f"({after}",
                upto,
                start=0,
                num=limit,
                withscores=True,
            )
        return self._with_origins(found)

    def list(self) -> list[dict]:
        """Every record."""
        return [r for chunk in self.scan() for r in chunk]

    def claim_identity(
        self, public_key: str, token: str | None, receipt_key: bytes | None = None
    ) -> None:
        """Record this process's VAPID public key (and the hashes of its push
        token and receipt key) in Redis, or SettingError if other processes
        there use others: a subscription made with one key is refused by push
        services when signed with another, and a receipt made with one
        receipt key is refused by processes with another."""
        checks = [("vapid_public_key", public_key, "VAPID key")]
        if token is not None:
            digest = hashlib.sha256(token.encode()).hexdigest()
            checks.append(("push_token_sha256", digest, "push token"))
        if receipt_key is not None:
            digest = hashlib.sha256(receipt_key).hexdigest()
            checks.append(("receipt_key_sha256", digest, "receipt key"))
        for name, value, what in checks:
            key = self.prefix + name
            with _redis_errors("checking the shared keys"):
                self.redis.set(key, value, nx=True)
                stored = self.redis.get(key)
            if stored != value:
                ours, theirs = "", ""
                remedy = "PUSH_TOKEN" if what == "push token" else "RECEIPT_KEY"
                if what == "VAPID key":  # public, so worth showing
                    ours, theirs = f" ({value[:12]}...)", f" ({str(stored)[:12]}...)"
                    remedy = "VAPID_PRIVATE_KEY or a copy of one vapid/ directory"
                raise SettingError(
                    f"this process's {what}{ours} is not the one the other "
                    f"processes on this Redis use{theirs}: give every process the "
                    f"same {remedy}, or, if that one is no longer used, delete the "
                    f"key {key}"
                )

    def close(self) -> None:
        self.redis.close()


def open_store(settings: Settings) -> SubscriptionStore:
    """The subscription store the settings name: Redis when REDIS_URL is set,
    else the JSON-lines file."""
    if settings.redis_url:
        return RedisSubscriptionStore(connect_redis(settings), settings.redis_prefix)
    return JsonSubscriptionStore(settings.subscriptions_file)


class KeyStore(Protocol):
    """Where API keys are kept, each as a record: ``name``, ``hash`` (the
    key's SHA-256, never the key), ``scope``, ``topics``, ``created``,
    ``expires`` and ``last_used``. The JSON store keeps them in a file of
    their own (mode 0600), Redis in hashes every process shares."""

    def add(self, record: dict) -> bool:
        """Keep a new key; False if its name is taken (or there are
        MAX_API_KEYS already, then ValueError)."""
        ...

    def find(self, key_hash: str) -> dict | None: ...

    def all(self) -> list[dict]: ...

    def revoke(self, name: str) -> bool:
        """Forget a key at once; False if there was none of that name."""
        ...

    def touch(self, name: str, when: float) -> None:
        """Note when a key was last used (never bringing a revoked one back)."""
        ...


class JsonKeyStore:
    """API keys in a JSON file (mode 0600), rewritten whole, atomically, on
    each change: they are few and change rarely (a key's use is noted at
    most once a minute). This process is the only one that reads them."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._by_name: dict[str, dict] = {}
        self._by_hash: dict[str, dict] = {}
        if path.is_file():
            try:
                for record in json.loads(path.read_text())["keys"]:
                    self._by_name[record["name"]] = record
                    self._by_hash[record["hash"]] = record
            except (ValueError, KeyError, TypeError) as e:
                raise SettingError(
                    f"{path} is not the API keys file this server writes ({e}); "
                    "restore it from a backup, or delete it to revoke every key"
                ) from None

    def _write(self, records: dict[str, dict]) -> None:
        """Replace the file with ``records`` (OSError, the file unchanged, if
        the disk refuses)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({"keys": list(records.values())}, indent=1).encode()
        _replace_private(self.path, data)

    def _changed(self, records: dict[str, dict]) -> None:
        self._write(records)
        self._by_name = records
        self._by_hash = {r["hash"]: r for r in records.values()}

    def add(self, record: dict) -> bool:
        with self._lock:
            if record["name"] in self._by_name:
                return False
            if len(self._by_name) >= MAX_API_KEYS:
                raise ValueError(MAX_API_KEYS)
            self._changed({**self._by_name, record["name"]: record})
            return True

    def find(self, key_hash: str) -> dict | None:
        return self._by_hash.get(key_hash)

    def all(self) -> list[dict]:
        return list(self._by_name.values())

    def revoke(self, name: str) -> bool:
        with self._lock:
            if name not in self._by_name:
                return False
            self._changed({n: r for n, r in self._by_name.items() if n != name})
            return True

    def touch(self, name: str, when: float) -> None:
        with self._lock:
            if name in self._by_name:
                record = {**self._by_name[name], "last_used": when}
                self._changed({**self._by_name, name: record})


# KEYS: names, hashes, used. ARGV: name, hash, record, most.
ADD_KEY_LUA = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
# KEYS: names, hashes, used. ARGV: name.
REVOKE_KEY_LUA = """
local hash = redis.call('HGET', KEYS[1], ARGV[1])
if not hash then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], hash)
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
# KEYS: names, used. ARGV: name, when.
TOUCH_KEY_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
"""


class RedisKeyStore:
    """API keys on Redis, shared by every process: ``keys`` (hash: key hash
    → record), ``keynames`` (name → key hash) and ``keyused`` (name → last
    use). Each request looks its key up there, so a revocation holds on
    every process at once."""

    def __init__(self, client: Any, prefix: str):
        self.redis = client
        self.names, self.hashes = prefix + "keynames", prefix + "keys"
        self.used = prefix + "keyused"
        self._add = client.register_script(ADD_KEY_LUA)
        self._revoke = client.register_script(REVOKE_KEY_LUA)
        self._touch = client.register_script(TOUCH_KEY_LUA)

    def add(self, record: dict) -> bool:
        with _redis_errors("storing an API key"):
            done = self._add(
                keys=[self.names, self.hashes, self.used],
                args=[record["name"], record["hash"], json.dumps(record), MAX_API_KEYS],
            )
        if done == -1:
            raise ValueError(MAX_API_KEYS)
        return done == 1

    def find(self, key_hash: str) -> dict | None:
        with _redis_errors("checking an API key"):
            found = self.redis.hget(self.hashes, key_hash)
        return None if found is None else json.loads(found)

    def all(self) -> list[dict]:
        with _redis_errors("listing the API keys"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hvals(self.hashes)
            pipe.hgetall(self.used)
            records, used = pipe.execute()
        records = [json.loads(r) for r in records]
        for record in records:
            when = _number(used.get(record["name"]))
            record["last_used"] = when if when is not None else record.get("last_used")
        return records

    def revoke(self, name: str) -> bool:
        with _redis_errors("revoking an API key"):
            return (
                self._revoke(keys=[self.names, self.hashes, self.used], args=[name])
                == 1
            )

    def touch(self, name: str, when: float) -> None:
        with _redis_errors("noting an API key's use"):
            self._touch(keys=[self.names, self.used], args=[name, repr(when)])


API_KEYS_FILE = "api_keys.json"


def open_key_store(settings: Settings, store: SubscriptionStore) -> KeyStore:
    """Where API keys live: on Redis beside the subscriptions, else in
    VAPID_DIR/api_keys.json beside the push token."""
    if isinstance(store, RedisSubscriptionStore):
        return RedisKeyStore(store.redis, store.prefix)
    return JsonKeyStore(Path(settings.vapid_dir) / API_KEYS_FILE)


class NotificationJournal(JsonLinesStore):
    """Notifications and their progress (see JsonLinesStore), beside the
    subscription store. A notification is one record; each batch of
    subscribers whose outcomes are known adds a progress record
    (``{"id": "<id>.<n>", "of": "<id>", "done": [...], "counts": ...}``), and
    the notification's final record replaces them when it ends."""

    WHAT = "notification journal"
    SETTING = "NOTIFICATIONS_FILE"


def receipts_path(journal: Path) -> Path:
    """The receipt database of a notification journal: beside it, named after it."""
    return journal.with_name(journal.stem + ".receipts.sqlite")


class ReceiptDatabase:
    """The receipts counted beside the notification journal (the JSON store's
    side; Redis keeps its own): who sent which event for which notification,
    in an SQLite file (Python's own sqlite3), so that set lives on disk and
    not in memory; the counts per notification are kept in memory.

    One thread writes: what arrives together is one transaction (WAL,
    synchronous=FULL), and each answer waits for the commit that holds its
    receipt, or for the one that counted it before. A refused write (a full
    disk) fails every receipt of its transaction and changes nothing.
    """

    def __init__(self, path: str | Path):
        # Imported here: the delivery processes, which never count receipts,
        # stay 2 MB smaller each.
        import sqlite3

        self._sqlite = sqlite3
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS receipts (notification TEXT, event TEXT, "
                "subscriber TEXT, PRIMARY KEY (notification, event, subscriber)) "
                "WITHOUT ROWID"
            )
            rows = self._db.execute(
                "SELECT notification, event, count(*) FROM receipts GROUP BY 1, 2"
            ).fetchall()
        except sqlite3.Error as e:
            raise StoreDamaged(
                f"{self.path}: the receipt database cannot be opened ({e}); move it "
                "aside to start with no receipts counted"
            ) from None
        os.chmod(self.path, 0o600)
        self._counts: dict[str, collections.Counter[str]] = {}
        for notification_id, event, count in rows:
            self._counts.setdefault(notification_id, collections.Counter())[event] = (
                count
            )
        self._work: collections.deque[tuple] = collections.deque()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="receipts", daemon=True)
        self._thread.start()

    def add(self, notification_id: str, event: str, subscriber: str) -> bool:
        """Count one subscriber's event, durably (OSError if the disk refuses);
        False if it was counted before."""
        return self._submit(("add", notification_id, event, subscriber))

    def forget(self, notification_ids: list[str]) -> None:
        """Drop the receipts of these notifications."""
        gone = [i for i in notification_ids if i in self._counts]
        if gone:
            self._submit(("forget", gone))

    def erase(self, subscribers: list[str]) -> int:
        """Drop every receipt these subscribers sent (the counts stay, as
        numbers no longer linked to anyone); how many were dropped."""
        return self._submit(("erase", subscribers)) if subscribers else 0

    def notifications(self) -> list[str]:
        """The notifications that have receipts."""
        with self._lock:
            return list(self._counts)

    def counts(self, notification_id: str) -> dict[str, int]:
        counted = self._counts.get(notification_id, {})
        return {event: counted.get(event, 0) for event in RECEIPT_EVENTS}

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=10)
        with contextlib.suppress(self._sqlite.Error):
            self._db.close()

    def _submit(self, work: tuple) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                raise OSError(errno.EIO, "the receipt database is closed")
            self._work.append((work, future))
            self._lock.notify_all()
        return future.result()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._work and not self._closing:
                    self._lock.wait()
                if not self._work:
                    return
                batch = list(self._work)
                self._work.clear()
            self._commit(batch)

    def _commit(self, batch: list[tuple]) -> None:
        results = []
        added: collections.Counter[tuple[str, str]] = collections.Counter()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for work, _ in batch:
                if work[0] == "add":
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?)", work[1:]
                    )
                    results.append(cursor.rowcount == 1)
                    added[(work[1], work[2])] += cursor.rowcount == 1
                elif work[0] == "erase":
                    cursor = self._db.executemany(
                        "DELETE FROM receipts WHERE subscriber = ?",
                        [(i,) for i in work[1]],
                    )
                    results.append(cursor.rowcount)
                else:
                    self._db.executemany(
                        "DELETE FROM receipts WHERE notification = ?",
                        [(i,) for i in work[1]],
                    )
                    results.append(None)
            self._db.execute("COMMIT")
        except self._sqlite.Error as e:
            with contextlib.suppress(self._sqlite.Error):
                self._db.execute("ROLLBACK")
            full = "full" in str(e).lower()
            error = OSError(errno.ENOSPC if full else errno.EIO, f"receipts: {e}")
            for _, future in batch:
                future.set_exception(error)
            return
        with self._lock:
            for (notification_id, event), count in added.items():
                if count:
                    counted = self._counts.setdefault(
                        notification_id, collections.Counter()
                    )
                    counted[event] += count
            for work, _ in batch:
                if work[0] == "forget":
                    for notification_id in work[1]:
                        self._counts.pop(notification_id, None)
        for (_, future), result in zip(batch, results):
            future.set_result(result)


Plan = list[tuple[str, list[str]]]  # batches planned: (origin, ids) each


class JobStore(Protocol):
    """Where notifications, their batches and their counts are kept, for
    NotificationEngine: the JSON journal (JournalJobStore) or Redis
    (RedisJobStore). Policy (what is due, what a batch holds, what outcomes
    mean) is the engine's; a job store keeps state, and makes each step
    atomic. A notification is a record as ``new_notification`` makes it;
    ``load`` gives it back with its counts, causes of failure, receipts and
    plan (``planned``, ``enqueued``, ``vanished``). Methods raise OSError
    (StoreUnavailable on Redis) when the store refuses."""

    def insert(self, record: dict, key_hash: str | None) -> str | None:
        """Keep a new notification, unless one made with the same
        Idempotency-Key hash in the last IDEMPOTENCY_SECONDS is still kept:
        then that one's id, and nothing is stored."""

    def load(self, notification_id: str) -> dict | None:
        """A notification as status_document reads it, or None."""

    def newest(self, limit: int) -> list[str]:
        """The ids of the newest ``limit`` notifications, newest first."""

    def statuses(self) -> collections.Counter[str]:
        """How many notifications kept have each status."""

    def status_of(self, notification_ids: list[str]) -> list[str | None]:
        """The status of each (None: not kept)."""

    def change(
        self, notification_id: str, status: str, before: tuple[str, ...], now: float
    ) -> bool | None:
        """Give it ``status`` (a finished one) if it has one of ``before``:
        whether it did; None if there is no such notification."""

    def claim_due(self, now: float, lease_until: float) -> str | None:
        """A notification to plan (due, or sending with its plan unfinished
        and its lease over), leased to the caller until ``lease_until``."""

    def start(
        self, notification_id: str, now: float, total: int, plan_max: int
    ) -> tuple[int, str] | None:
        """Start sending a claimed notification (a scheduled or queued one
        becomes sending, with this ``plan_max``); its plan_max and plan
        cursor, or None if there is nothing to plan (it ended)."""

    def enqueue(
        self, notification_id: str, cursor: str, after: str, until: float, batches: Plan
    ) -> int | None:
        """Queue batches and move the cursor to ``after`` (lease the plan
        until ``until``), if the cursor is still ``cursor`` and it is
        sending: how many subscribers it queued (those sent before a
        restart are not queued again), or None if it did not."""

    def planned(self, notification_id: str, cursor: str, now: float) -> int:
        """Its plan is complete: 2 if so is the notification (every batch came
        back), 1 if not, 0 if the cursor moved or it ended."""

    def hand_over(self, notification_id: str, now: float) -> None:
        """Let another planner take its plan over now (this one stops)."""

    def take(
        self, consumer: str, room: Callable[[str], int], block: float
    ) -> list[Batch]:
        """Queued batches for ``consumer``, at most ``room(origin)`` of each
        push service, waiting up to ``block`` seconds for one."""

    def reclaim(
        self, consumer: str, idle: float, room: Callable[[str], int]
    ) -> list[Batch]:
        """Batches other consumers took and said nothing of for ``idle``
        seconds, now the caller's."""

    def keep(self, consumer: str, batches: list[Batch]) -> None:
        """The consumer still works on these: not to be reclaimed yet."""

    def complete(self, batch: Batch, tally: Tally, now: float) -> int:
        """A batch came back, in one step: count its outcomes (the tally's
        counts and causes), queue the tally's ``again`` once more if it is
        still sending; 0 if it was completed before, 2 if the
        notification is done with it, else 1."""

    def backlog(self) -> tuple[int, float]:
        """Batches queued or being sent, and the age of the oldest."""

    def drop_ended(self, now: float, keep_from: float) -> int:
        """Forget notifications that ended before ``keep_from`` and whose
        Idempotency-Key has lapsed, with their receipts; how many."""

    def count_receipt(
        self, notification_id: str, event: str, subscriber: str
    ) -> bool | None:
        """Count a subscriber's receipt once: True if new, False if counted
        before, None if there is no such notification."""

    def erase_receipts(self, subscribers: list[str]) -> int:
        """Drop every receipt these subscribers sent, for every notification
        (the counts stay); how many were dropped."""

    def announce(self, consumer: str, now: float) -> None:
        """The consumer delivers (for ``delivering``)."""

    def leave(self, consumer: str) -> None:
        """The consumer stopped delivering."""

    def delivering(self, since: float) -> int:
        """How many consumers announced themselves since ``since``."""

    def flush(self) -> None:
        """Write what could not be written before (a full disk)."""

    def wake(self) -> None:
        """End a ``take`` that waits now."""

    def close(self) -> None:
        """Close its files or connection (after the engine stopped)."""


@dataclass(eq=False)
class _Held:
    """A notification that has not ended, as JournalJobStore holds it."""

    record: dict
    parts: list[str] = field(default_factory=list)  # its progress records
    done: set[str] = field(default_factory=set)  # sent before a restart
    causes: collections.Counter = field(default_factory=collections.Counter)
    cursor: str | None = None
    planned: bool = False
    lease: float = 0.0
    batches: int = 0
    batches_done: int = 0
    enqueued: int = 0
    vanished: int = 0
    ended: bool = False  # its final record made, to be written


class JournalJobStore:
    """The JobStore of one process, over the notification journal (see
    NotificationJournal) and the receipt database: notifications that have
    not ended and their batches are held in memory; each notification and
    each change of its status is a journal record, and each batch's outcomes
    a progress record (``{"id": "<id>.<n>", "of": "<id>", "done": [...],
    "counts": ..., "errors": ...}``) that the final record replaces.

    After a crash, a notification that was sending is planned again from
    its cursor's start, without the subscribers of its progress records.
    Records the disk refused (full) are kept in order and written when it
    takes them again: what is in memory stays right meanwhile.
    """

    def __init__(self, journal: NotificationJournal, receipts: ReceiptDatabase):
        self.journal = journal
        self.receipts = receipts
        self._held: dict[str, _Held] = {}  # not ended, in order of creation
        self._order: list[tuple[float, str]] = []  # (created, id), oldest first
        self._keys: dict[str, str] = {}  # Idempotency-Key's hash -> id
        self._queues: dict[str, collections.deque[Batch]] = {}  # by origin
        self._taken: dict[str, Batch] = {}  # entry -> batch being sent
        self._entries = itertools.count(1)
        self._unwritten: list[tuple[list[dict], list[str]]] = []
        self._refused = 0.0  # when the disk last refused a write: logged once a minute
        self._lock = threading.Condition()
        self._writing = threading.RLock()  # the journal's order is the changes' order
        self._woken = False
        self._load()

    # -- notifications ------------------------------------------------------------

    def insert(self, record: dict, key_hash: str | None) -> str | None:
        with self._writing:
            if key_hash:
                earlier = self._keys.get(key_hash)
                found = earlier and self.load(earlier)
                if found and found["created"] > time.time() - IDEMPOTENCY_SECONDS:
                    return earlier
            self._write([record], [])
            with self._lock:
                self._held[record["id"]] = _Held(record)
                self._order.append((record["created"], record["id"]))
                if key_hash:
                    self._keys[key_hash] = record["id"]
        return None

    def load(self, notification_id: str) -> dict | None:
        with self._lock:
            held = self._held.get(notification_id)
        if held is not None and held.ended:
            with self._writing:  # its end is shown once its final record's
                pass  # write was tried: written, or kept for a full disk
        with self._lock:
            held = self._held.get(notification_id)
            if held is not None:
                record = {
                    **held.record,
                    "counts": {c: dict(n) for c, n in held.record["counts"].items()},
                    "errors": _errors_of(held.causes),
                    "planned": held.planned,
                    "enqueued": held.enqueued,
                    "vanished": held.vanished,
                }
        if held is None:
            record = self.journal.get(notification_id)
            if record is None or "of" in record:
                return None
        record["receipts"] = self.receipts.counts(notification_id)
        return record

    def newest(self, limit: int) -> list[str]:
        with self._lock:
            return [i for _, i in self._order[-limit:]][::-1]

    def statuses(self) -> collections.Counter[str]:
        with self._lock:
            ids = [i for _, i in self._order]
        return collections.Counter(s for s in self.status_of(ids) if s)

    def status_of(self, notification_ids: list[str]) -> list[str | None]:
        statuses = []
        for notification_id in notification_ids:
            with self._lock:
                held = self._held.get(notification_id)
                status = held and held.record["status"]
            if held is None:
                record = self.journal.get(notification_id)
                status = record and record.get("status")
            statuses.append(status)
        return statuses

    def change(
        self, notification_id: str, status: str, before: tuple[str, ...], now: float
    ) -> bool | None:
        with self._writing:
            with self._lock:
                held = self._held.get(notification_id)
                if held is None:
                    return None if self.load(notification_id) is None else False
                old = held.record["status"], held.record["finished"]
                if old[0] not in before:
                    return False
                # In memory first: a batch that completes meanwhile sees it.
                held.record.update(status=status, finished=now)
                changed = dict(held.record)
            try:
                self._write([changed], [])
            except OSError:  # refused: nothing changed
                with self._lock:
                    held.record.update(status=old[0], finished=old[1])
                raise
            with self._lock:
                for queue in self._queues.values():  # its batches not yet taken
                    mine = [b for b in queue if b.notification == notification_id]
                    for batch in mine:
                        queue.remove(batch)
                    held.batches_done += len(mine)
                final = self._final(held)
            if final:
                self._write_later(*final)
        return True

    def claim_due(self, now: float, lease_until: float) -> str | None:
        with self._lock:
            for notification_id, held in self._held.items():
                status = held.record["status"]
                if held.lease > now:
                    continue
                due = status in ("scheduled", "queued") and held.record["due"] <= now
                if due or (status == "sending" and not held.planned):
                    held.lease = lease_until
                    return notification_id
        return None

    def start(
        self, notification_id: str, now: float, total: int, plan_max: int
    ) -> tuple[int, str] | None:
        with self._writing:
            with self._lock:
                held = self._held.get(notification_id)
                status = held and held.record["status"]
                if status == "sending" and not held.planned:
                    held.cursor = held.cursor or PLAN_START
                    return held.record.get("plan_max", EVERYONE), held.cursor
                if status not in ("scheduled", "queued"):
                    return None
                held.record.update(
                    status="sending", started=now, total=total, plan_max=plan_max
                )
                held.cursor = PLAN_START
                started = dict(held.record)
            self._write_later([started], [])
        return plan_max, PLAN_START

    def enqueue(
        self, notification_id: str, cursor: str, after: str, until: float, batches: Plan
    ) -> int | None:
        with self._lock:
            held = self._held.get(notification_id)
            if held is None or held.cursor != cursor:
                return None
            if held.record["status"] != "sending":
                return None
            queued = 0
            for origin, ids in batches:
                if held.done:  # sent before the restart
                    ids = [i for i in ids if i not in held.done]
                if ids:
                    self._queue(notification_id, origin, ids)
                    held.batches += 1
                    held.enqueued += len(ids)
                    queued += len(ids)
            held.cursor = after
            held.lease = until
            self._lock.notify_all()
            return queued

    def planned(self, notification_id: str, cursor: str, now: float) -> int:
        with self._writing, self._lock:  # an end and its write: see load
            held = self._held.get(notification_id)
            if held is None or held.cursor != cursor:
                return 0
            if held.record["status"] != "sending":
                return 0
            held.planned, held.cursor, held.done = True, "planned", set()
            if held.batches != held.batches_done:
                return 1
            held.record.update(status="done", finished=now)
            final = self._final(held)
            if final:
                self._write_later(*final)
            return 2

    def hand_over(self, notification_id: str, now: float) -> None:
        with self._lock:
            held = self._held.get(notification_id)
            if held is not None:
                held.lease = now

    # -- batches ------------------------------------------------------------------

    def take(
        self, consumer: str, room: Callable[[str], int], block: float
    ) -> list[Batch]:
        deadline = time.monotonic() + block
        with self._lock:
            while True:
                taken = []
                for origin, queue in self._queues.items():
                    for _ in range(min(len(queue), room(origin))):
                        batch = queue.popleft()
                        self._taken[batch.entry] = batch
                        taken.append(batch)
                left = deadline - time.monotonic()
                if taken or self._woken or left <= 0:
                    self._woken = False
                    return taken
                self._lock.wait(left)

    def reclaim(
        self, consumer: str, idle: float, room: Callable[[str], int]
    ) -> list[Batch]:
        return []  # one process: a batch it took comes back or it crashed

    def keep(self, consumer: str, batches: list[Batch]) -> None:
        pass

    def complete(self, batch: Batch, tally: Tally, now: float) -> int:
        with self._writing:  # an end and its write: see load
            part = None
            with self._lock:
                if self._taken.pop(batch.entry, None) is None:
                    return 0
                held = self._held.get(batch.notification)
                if held is None:
                    return 1
                record = held.record
                counts = _counts_of(tally.counts)
                _add_counts(record["counts"], counts)
                _add_causes(held.causes, tally.causes)
                held.vanished += tally.vanished
                if tally.again and record["status"] == "sending":
                    self._queue(batch.notification, batch.origin, tally.again)
                    held.batches += 1
                held.batches_done += 1
                if tally.done:
                    part = {
                        "id": f"{batch.notification}.{len(held.parts)}",
                        "of": batch.notification,
                        "done": sorted(tally.done),
                        "counts": counts,
                        "errors": _errors_of(collections.Counter(tally.causes)),
                    }
                    held.parts.append(part["id"])
                ended = record["status"] == "sending" and held.planned
                ended = ended and held.batches == held.batches_done
                if ended:
                    record.update(status="done", finished=now)
                final = self._final(held)
                self._lock.notify_all()
            if part:
                self._write_later([part], [])
            if final:
                self._write_later(*final)
            return 2 if ended else 1

    def backlog(self) -> tuple[int, float]:
        with self._lock:
            batches = [*self._taken.values()]
            batches += [b for queue in self._queues.values() for b in queue]
        now = time.time()
        return len(batches), now - min((b.added for b in batches), default=now)

    def _queue(self, notification_id: str, origin: str, ids: list[str]) -> None:
        """Queue a batch (the lock held)."""
        entry = str(next(self._entries))
        batch = Batch(entry, origin, notification_id, tuple(ids), time.time())
        self._queues.setdefault(origin, collections.deque()).append(batch)

    def _final(self, held: _Held) -> tuple[list[dict], list[str]] | None:
        """A finished notification with no batch out: its final record, to
        replace its progress; it leaves memory once that is written (the lock
        held)."""
        record = held.record
        if record["status"] not in FINISHED or held.batches != held.batches_done:
            return None
        if held.ended:  # made final already
            return None
        held.ended = True
        final = {
            **record,
            "final": True,
            "errors": _errors_of(held.causes),
            "planned": held.planned,
            "enqueued": held.enqueued,
            "vanished": held.vanished,
        }
        return [final], held.parts

    # -- the journal --------------------------------------------------------------

    def _write(self, upserts: list[dict], removals: list[str]) -> None:
        """Write now, after what waits (``_writing`` held): OSError if refused."""
        self._flush_unwritten()
        self.journal.write(upserts, removals)

    def _write_later(self, upserts: list[dict], removals: list[str]) -> None:
        """Write in order, now if the disk takes it, else when it does."""
        with self._writing:
            self._unwritten.append((upserts, removals))
            try:
                self._flush_unwritten()
            except OSError as e:
                if time.monotonic() - self._refused > 60:
                    self._refused = time.monotonic()
                    log.error(
                        "the notification journal refuses writes (%s): %d kept in "
                        "memory, written when it takes them",
                        e,
                        len(self._unwritten),
                    )

    def _flush_unwritten(self) -> None:
        while self._unwritten:
            upserts, removals = self._unwritten[0]
            self.journal.write(upserts, removals)
            self._unwritten.pop(0)
            with self._lock:
                for record in upserts:
                    held = self._held.get(record["id"])
                    if record.get("final") and held is not None and held.ended:
                        del self._held[record["id"]]
                        self._lock.notify_all()

    def flush(self) -> None:
        with self._writing:
            if not self._unwritten:
                return
            try:
                self._flush_unwritten()
            except OSError:  # logged when it was first refused
                return
            log.info("the notification journal takes writes again")

    def drop_ended(self, now: float, keep_from: float) -> int:
        old = []
        with self._lock:
            for created, notification_id in self._order:
                if created >= keep_from:
                    break
                if notification_id not in self._held:
                    old.append(notification_id)
        drop = []
        for notification_id in old:
            record = self.journal.get(notification_id)
            if record is None:
                drop.append(notification_id)
                continue
            keyed = record.get("idempotency") and (
                record["created"] > now - IDEMPOTENCY_SECONDS
            )
            ended = record["finished"] is not None and record["finished"] < keep_from
            if ended and not keyed:
                drop.append(notification_id)
        if not drop:
            return 0
        self.receipts.forget(drop)  # first: what is dropped has none left
        with self._writing:
            self._write([], drop)
        gone = set(drop)
        with self._lock:
            self._order = [(c, i) for c, i in self._order if i not in gone]
            for key, notification_id in list(self._keys.items()):
                if notification_id in gone:
                    del self._keys[key]
        return len(drop)

    def count_receipt(
        self, notification_id: str, event: str, subscriber: str
    ) -> bool | None:
        with self._lock:
            known = notification_id in self._held
        if not known and self.load(notification_id) is None:
            return None
        return self.receipts.add(notification_id, event, subscriber)

    def erase_receipts(self, subscribers: list[str]) -> int:
        return self.receipts.erase(subscribers)

    def announce(self, consumer: str, now: float) -> None:
        pass

    def leave(self, consumer: str) -> None:
        pass

    def delivering(self, since: float) -> int:
        return 1

    def wake(self) -> None:
        with self._lock:
            self._woken = True
            self._lock.notify_all()

    def close(self) -> None:
        with self._writing:
            with contextlib.suppress(OSError):  # logged when refused before
                self._flush_unwritten()
            if self._unwritten:
                log.error(
                    "the notification journal still refuses writes: %d records "
                    "lost; notifications that were sending resume at the next start",
                    len(self._unwritten),
                )
        self.journal.close()
        self.receipts.close()

    def _load(self) -> None:
        """Rebuild what had not ended from the journal: counts and the
        subscribers done come from the progress records."""
        progress: dict[str, list[dict]] = collections.defaultdict(list)
        orphans = []
        records = []
        for record_id in self.journal.ids():
            record = self.journal.get(record_id)
            if record is None:
                continue
            if "of" in record:
                progress[record["of"]].append(record)
            else:
                records.append(record)
        now = time.time()
        for record in sorted(records, key=lambda r: r["created"]):
            self._order.append((record["created"], record["id"]))
            key = record.get("idempotency")
            if key and record["created"] > now - IDEMPOTENCY_SECONDS:
                self._keys[key["key"]] = record["id"]
            parts = progress.pop(record["id"], [])
            if record.get("final"):
                orphans += [p["id"] for p in parts]
                continue
            held = _Held(record, parts=[p["id"] for p in parts])
            record["counts"] = _zero_counts()
            for part in parts:  # in the order they were written
                held.done.update(part["done"])
                _add_counts(record["counts"], part["counts"])
                _add_causes(held.causes, _causes_of(part["errors"]))
            held.enqueued = len(held.done)
            self._held[record["id"]] = held
            with self._lock:  # ended, but its final record was not written
                final = self._final(held)
            if final:
                self._unwritten.append(final)
            elif record["status"] == "sending":
                log.info(
                    "notification %s resumes: %d subscribers done before the stop",
                    record["id"],
                    len(held.done),
                )
        orphans += [p["id"] for parts in progress.values() for p in parts]
        if orphans:
            with contextlib.suppress(OSError):  # tried again at the next start
                self.journal.write(removals=orphans)
        known = {record["id"] for record in records}
        with contextlib.suppress(OSError):  # of notifications dropped: again later
            self.receipts.forget(
                [i for i in self.receipts.notifications() if i not in known]
            )


# The Lua scripts of RedisJobStore. ARGV[1] is REDIS_PREFIX; times are
# seconds since the epoch. A notification is the hash ``n:<id>``: its fixed
# part as JSON (``doc``), ``status``, ``started``, ``finished``, ``total``,
# the plan's state (``plan_max``, ``cursor``, ``batches``, ``batches_done``,
# ``enqueued``, ``vanished``, ``planned``) and its counts (``webpush.sent``...);
# the causes of failure are counted in ``ne:<id>``. Batches are entries of
# one stream per push service, ``batches:<origin>``, each read by the
# consumer group ``delivery``; the set ``streams`` names them.

# ARGV: prefix, id, idempotency key's hash or '', seconds it is kept, doc,
# status, total, created, due. The id of an earlier notification made with
# the same key that is still kept, else false (this one is stored).
NOTIFICATION_CREATE_LUA = """
local p, id, key = ARGV[1], ARGV[2], ARGV[3]
if key ~= '' then
  local earlier = redis.call('GET', p .. 'idem:' .. key)
  if earlier and redis.call('EXISTS', p .. 'n:' .. earlier) == 1 then
    return earlier
  end
  redis.call('SET', p .. 'idem:' .. key, id, 'EX', ARGV[4])
end
redis.call('HSET', p .. 'n:' .. id, 'doc', ARGV[5], 'status', ARGV[6], 'total', ARGV[7])
redis.call('ZADD', p .. 'notifications', ARGV[8], id)
redis.call('ZADD', p .. 'due', ARGV[9], id)
return false
"""

# ARGV: prefix, now, lease end. One due notification, leased to the caller:
# no other process plans it before the lease ends (the planner renews it).
NOTIFICATION_CLAIM_LUA = """
local p = ARGV[1]
while true do
  local due = redis.call('ZRANGEBYSCORE', p .. 'due', '-inf', ARGV[2], 'LIMIT', 0, 1)
  if #due == 0 then return false end
  if redis.call('EXISTS', p .. 'n:' .. due[1]) == 1 then
    redis.call('ZADD', p .. 'due', ARGV[3], due[1])
    return due[1]
  end
  redis.call('ZREM', p .. 'due', due[1])
end
"""

# ARGV: prefix, id, now, total, plan_max, the plan's first cursor. A queued
# or scheduled notification starts sending. Its plan_max and cursor, or
# false if there is nothing to plan (it ended, or its plan is complete).
NOTIFICATION_START_LUA = """
local p, id = ARGV[1], ARGV[2]
local n = p .. 'n:' .. id
local status = redis.call('HGET', n, 'status')
if status == 'scheduled' or status == 'queued' then
  redis.call('HSET', n, 'status', 'sending', 'started', ARGV[3], 'total', ARGV[4],
             'plan_max', ARGV[5], 'cursor', ARGV[6])
elseif status ~= 'sending' or redis.call('HGET', n, 'planned') == '1' then
  redis.call('ZREM', p .. 'due', id)
  return false
end
return redis.call('HMGET', n, 'plan_max', 'cursor')
"""

# ARGV: prefix, id, the cursor the caller read, the cursor after these
# batches, lease end, then (stream, ids, how many) per batch. The batches
# go on their streams with the cursor that names them, or not at all (0):
# another process took over the plan, or the notification ended.
# Both begin with PLAN_HELD_LUA: nothing (0) unless the plan's cursor is
# still the caller's and the notification is sending.
PLAN_HELD_LUA = """
local p, id = ARGV[1], ARGV[2]
local n = p .. 'n:' .. id
if redis.call('HGET', n, 'cursor') ~= ARGV[3] or redis.call('HGET', n, 'status') ~= 'sending' then
  return 0
end
"""
NOTIFICATION_ENQUEUE_LUA = (
    PLAN_HELD_LUA
    + """
for i = 6, #ARGV, 3 do
  if redis.call('SADD', p .. 'streams', ARGV[i]) == 1 then
    pcall(redis.call, 'XGROUP', 'CREATE', ARGV[i], 'delivery', '0', 'MKSTREAM')
  end
  redis.call('XADD', ARGV[i], '*', 'n', id, 'ids', ARGV[i + 1])
  redis.call('HINCRBY', n, 'batches', 1)
  redis.call('HINCRBY', n, 'enqueued', ARGV[i + 2])
end
redis.call('HSET', n, 'cursor', ARGV[4])
redis.call('ZADD', p .. 'due', 'XX', ARGV[5], id)
return 1
"""
)

# ARGV: prefix, id, the cursor the caller read, now. The plan is complete:
# 2 if so is the notification (every batch came back already), 1 if not,
# 0 if another process took over the plan or the notification ended.
NOTIFICATION_PLANNED_LUA = (
    PLAN_HELD_LUA
    + """
redis.call('HSET', n, 'planned', '1', 'cursor', 'planned')
redis.call('ZREM', p .. 'due', id)
if tonumber(redis.call('HGET', n, 'batches') or '0') == tonumber(redis.call('HGET', n, 'batches_done') or '0') then
  redis.call('HSET', n, 'status', 'done', 'finished', ARGV[4])
  return 2
end
return 1
"""
)

# ARGV: prefix, id, new status, now, the statuses it may change from. 1 if
# it changed, 0 if not, false if there is no such notification.
NOTIFICATION_CHANGE_LUA = """
local n = ARGV[1] .. 'n:' .. ARGV[2]
local status = redis.call('HGET', n, 'status')
if not status then return false end
for i = 5, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', n, 'status', ARGV[3], 'finished', ARGV[4])
    redis.call('ZREM', ARGV[1] .. 'due', ARGV[2])
    return 1
  end
end
return 0
"""

# ARGV: prefix, stream, batch (entry id), notification id, now, ids to send
# again ('' if none), ids that were no longer stored, then (name, increment)
# pairs: counts, and causes of failure (a JSON array). Acknowledging the
# batch and counting its outcomes are one step, so a batch delivered twice
# (its process went silent and another claimed it) is counted once: 0 for
# the second. 2 when the notification is done with this batch.
BATCH_COMPLETE_LUA = """
local p, stream, entry, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('XACK', stream, 'delivery', entry) == 0 then return 0 end
redis.call('XDEL', stream, entry)
local n = p .. 'n:' .. id
if redis.call('EXISTS', n) == 0 then return 1 end
local errors = p .. 'ne:' .. id
for i = 8, #ARGV, 2 do
  local name = ARGV[i]
  if string.sub(name, 1, 1) ~= '[' then
    redis.call('HINCRBY', n, name, ARGV[i + 1])
  elseif redis.call('HEXISTS', errors, name) == 1 or redis.call('HLEN', errors) < 100 then  -- MAX_CAUSES
    redis.call('HINCRBY', errors, name, ARGV[i + 1])
  end
end
if ARGV[7] ~= '0' then redis.call('HINCRBY', n, 'vanished', ARGV[7]) end
local status = redis.call('HGET', n, 'status')
if ARGV[6] ~= '' and status == 'sending' then
  redis.call('XADD', stream, '*', 'n', id, 'ids', ARGV[6])
  redis.call('HINCRBY', n, 'batches', 1)
end
local done = redis.call('HINCRBY', n, 'batches_done', 1)
if status == 'sending' and redis.call('HGET', n, 'planned') == '1'
   and tonumber(redis.call('HGET', n, 'batches')) == done then
  redis.call('HSET', n, 'status', 'done', 'finished', ARGV[5])
  return 2
end
return 1
"""

# ARGV: prefix, a consumer's name or '' for all, idle milliseconds. Removes
# from every stream's consumer group those idle longer that hold no batch
# (nothing is lost: a consumer comes back by itself when it reads again).
# Without this, every start of a process would leave its name for good.
CONSUMERS_PRUNE_LUA = """
local removed = 0
for _, stream in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'streams')) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, 'delivery')
  if ok then
    for _, c in ipairs(consumers) do
      local f = {}
      for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
      if (ARGV[2] == '' or f['name'] == ARGV[2]) and f['pending'] == 0
         and f['idle'] >= tonumber(ARGV[3]) then
        redis.call('XGROUP', 'DELCONSUMER', stream, 'delivery', f['name'])
        removed = removed + 1
      end
    end
  end
end
return removed
"""

# ARGV: consumer, then (stream, entry id) pairs. Their idle time starts
# again, for those the consumer still holds: one another process took over
# (this one was silent too long) stays with it, not taken back.
BATCHES_KEEP_LUA = """
local me = ARGV[1]
for i = 2, #ARGV, 2 do
  local held = redis.call('XPENDING', ARGV[i], 'delivery', ARGV[i + 1], ARGV[i + 1], 1)
  if held[1] and held[1][2] == me then
    redis.call('XCLAIM', ARGV[i], 'delivery', me, 0, ARGV[i + 1], 'JUSTID')
  end
end
return 0
"""

# A receipt, counted once per subscriber and event: the set ``rc:<id>:<event>``
# holds who sent it, the notification's ``r.<event>`` field how many. ARGV:
# prefix, notification id, event, subscriber. -1: no such notification.
RECEIPT_COUNT_LUA = """
local p, id, event, who = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = p .. 'n:' .. id
if redis.call('HEXISTS', key, 'doc') == 0 then return -1 end
if redis.call('SADD', p .. 'rc:' .. id .. ':' .. event, who) == 0 then return 0 end
redis.call('HINCRBY', key, 'r.' .. event, 1)
return 1
"""
CONSUMER_GROUP = "delivery"
DROP_PAGE = 1000  # notifications looked at a time when dropping old ones
CONSUMER_KEPT = 86400  # seconds a consumer holding no batch stays in the group


def _chunks(items: list, size: int = DROP_PAGE) -> Any:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _number(text: str | None) -> float | None:
    return float(text) if text else None


class RedisJobStore:
    """The JobStore in Redis, shared by every ``api.py`` and ``api.py
    --worker`` process (keys in the Lua scripts' comment above). Each step is
    one script, so any process may plan, take, complete or end any
    notification; a batch taken by a process that goes silent is taken over
    by another (XAUTOCLAIM) after WORKER_TIMEOUT."""

    def __init__(self, store: RedisSubscriptionStore):
        import redis

        self.redis = store.redis
        self.prefix = store.prefix
        scripts = {
            "create": NOTIFICATION_CREATE_LUA,
            "claim": NOTIFICATION_CLAIM_LUA,
            "start": NOTIFICATION_START_LUA,
            "enqueue": NOTIFICATION_ENQUEUE_LUA,
            "planned": NOTIFICATION_PLANNED_LUA,
            "change": NOTIFICATION_CHANGE_LUA,
            "complete": BATCH_COMPLETE_LUA,
            "prune": CONSUMERS_PRUNE_LUA,
            "keep": BATCHES_KEEP_LUA,
            "receipt": RECEIPT_COUNT_LUA,
        }
        self._scripts = {k: self.redis.register_script(v) for k, v in scripts.items()}
        # The blocking read has a connection of its own, so a stop can end
        # it at once (CLIENT UNBLOCK) rather than wait for its timeout.
        pool = self.redis.connection_pool
        self._reader = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class,
                max_connections=1,
                **pool.connection_kwargs,
            )
        )
        self._reader_id: int | None = None
        self._woken = False
        self._wakeup = threading.Event()  # ends a wait with no stream to read
        self._streams: list[str] = []
        self._claim_from: dict[str, str] = {}  # where XAUTOCLAIM goes on
        self._next_prune = 0.0
        with _redis_errors("opening the batch streams"):
            legacy = self.prefix + "batches"  # one stream, before one per origin
            if self.redis.exists(legacy):
                self.redis.sadd(self.prefix + "streams", legacy)
            self._make_groups()

    def _stream(self, origin: str) -> str:
        return f"{self.prefix}batches:{origin}"

    def _origin(self, stream: str) -> str:
        return stream[len(self.prefix) + len("batches:") :]

    def _make_groups(self) -> None:
        import redis

        for stream in self.redis.smembers(self.prefix + "streams"):
            try:
                self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _known_streams(self) -> list[str]:
        """The batch streams (one per push service that was ever sent to)."""
        with _redis_errors("listing the batch streams"):
            self._streams = sorted(self.redis.smembers(self.prefix + "streams"))
        return self._streams

    # -- notifications ------------------------------------------------------------

    def insert(self, record: dict, key_hash: str | None) -> str | None:
        fixed = ("id", "source", "created", "due", "send_at", "topic", "message")
        fixed += ("users", "subscriptions", "created_by", "owner", "policy")
        doc = {k: record[k] for k in (*fixed, "idempotency")}
        with _redis_errors("storing a notification"):
            return self._scripts["create"](
                args=[
                    self.prefix,
                    record["id"],
                    key_hash or "",
                    IDEMPOTENCY_SECONDS,
                    _record_line(doc),
                    record["status"],
                    record["total"],
                    record["created"],
                    record["due"],
                ]
            )

    def load(self, notification_id: str) -> dict | None:
        with _redis_errors("reading a notification"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.prefix + "n:" + notification_id)
            pipe.hgetall(self.prefix + "ne:" + notification_id)
            fields, errors = pipe.execute()
        if not fields.get("doc"):
            return None
        record = json.loads(fields["doc"])
        record["status"] = fields.get("status", "queued")
        record["started"] = _number(fields.get("started"))
        record["finished"] = _number(fields.get("finished"))
        for name in ("total", "enqueued", "vanished"):
            record[name] = int(fields.get(name) or 0)
        record["planned"] = fields.get("planned") == "1"
        record["counts"] = {
            channel: {
                name: int(fields.get(f"{channel}.{name}") or 0) for name in COUNTS
            }
            for channel in CHANNELS
        }
        record["receipts"] = {
            event: int(fields.get(f"r.{event}") or 0) for event in RECEIPT_EVENTS
        }
        record["errors"] = _errors_of(
            collections.Counter(
                {tuple(json.loads(cause)): int(n) for cause, n in errors.items()}
            )
        )
        return record

    def newest(self, limit: int) -> list[str]:
        with _redis_errors("listing notifications"):
            return self.redis.zrevrange(self.prefix + "notifications", 0, limit - 1)

    def statuses(self) -> collections.Counter[str]:
        with _redis_errors("counting notifications"):
            ids = self.redis.zrange(self.prefix + "notifications", 0, -1)
        counts: collections.Counter[str] = collections.Counter()
        for chunk in _chunks(ids):
            counts.update(s for s in self.status_of(chunk) if s)
        return counts

    def status_of(self, notification_ids: list[str]) -> list[str | None]:
        with _redis_errors("reading notifications"):
            pipe = self.redis.pipeline(transaction=False)
            for notification_id in notification_ids:
                pipe.hget(self.prefix + "n:" + notification_id, "status")
            return pipe.execute()

    def change(
        self, notification_id: str, status: str, before: tuple[str, ...], now: float
    ) -> bool | None:
        with _redis_errors("changing a notification"):
            changed = self._scripts["change"](
                args=[self.prefix, notification_id, status, now, *before]
            )
        return None if changed is None else bool(changed)

    def claim_due(self, now: float, lease_until: float) -> str | None:
        with _redis_errors("claiming a due notification"):
            return self._scripts["claim"](args=[self.prefix, now, lease_until])

    def start(
        self, notification_id: str, now: float, total: int, plan_max: int
    ) -> tuple[int, str] | None:
        with _redis_errors("starting a notification"):
            started = self._scripts["start"](
                args=[self.prefix, notification_id, now, total, plan_max, PLAN_START]
            )
        if started is None:
            return None
        return int(started[0] or EVERYONE), started[1] or PLAN_START

    def enqueue(
        self, notification_id: str, cursor: str, after: str, until: float, batches: Plan
    ) -> int | None:
        args: list[Any] = [self.prefix, notification_id, cursor, after, until]
        for origin, ids in batches:
            args += [self._stream(origin), ",".join(ids), len(ids)]
        with _redis_errors("planning a notification"):
            queued = bool(self._scripts["enqueue"](args=args))
        if queued and any(self._stream(o) not in self._streams for o, _ in batches):
            self._unblock()  # this process's read waits on the streams it knew
        return sum(len(ids) for _, ids in batches) if queued else None

    def planned(self, notification_id: str, cursor: str, now: float) -> int:
        with _redis_errors("planning a notification"):
            return self._scripts["planned"](
                args=[self.prefix, notification_id, cursor, now]
            )

    def hand_over(self, notification_id: str, now: float) -> None:
        with _redis_errors("handing a plan over"):
            self.redis.zadd(self.prefix + "due", {notification_id: now}, xx=True)

    # -- batches ------------------------------------------------------------------

    def _as_batches(self, reply: list) -> list[Batch]:
        """Stream entries read or claimed, as batches."""
        batches = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                if not fields:  # deleted meanwhile (Redis 6.2 still lists it)
                    with _redis_errors("acknowledging a deleted batch"):
                        self.redis.xack(stream, CONSUMER_GROUP, entry_id)
                    continue
                ids = tuple(i for i in fields.get("ids", "").split(",") if i)
                added = int(entry_id.split("-")[0]) / 1000
                batches.append(
                    Batch(
                        f"{stream} {entry_id}",
                        self._origin(stream),
                        fields.get("n", ""),
                        ids,
                        added,
                    )
                )
        return batches

    def take(
        self, consumer: str, room: Callable[[str], int], block: float
    ) -> list[Batch]:
        rooms = {s: room(self._origin(s)) for s in self._known_streams()}
        rooms = {s: n for s, n in rooms.items() if n > 0}
        if not rooms:  # nothing to read yet, or every push service is busy
            self._wakeup.wait(block)
            self._wakeup.clear()
            return []
        try:
            with _redis_errors("reading batches"):
                pipe = self.redis.pipeline(transaction=False)
                for stream, count in rooms.items():
                    pipe.xreadgroup(CONSUMER_GROUP, consumer, {stream: ">"}, count)
                batches = [b for r in pipe.execute() for b in self._as_batches(r)]
                if batches or self._woken:
                    self._woken = False
                    return batches
                if self._reader_id is None:
                    self._reader_id = self._reader.client_id()
                reply = self._reader.xreadgroup(
                    CONSUMER_GROUP,
                    consumer,
                    dict.fromkeys(rooms, ">"),
                    count=1,
                    block=max(1, int(block * 1000)),
                )
                return self._as_batches(reply)
        except StoreUnavailable as e:
            self._reader_id = None
            if "NOGROUP" in str(e):
                # Redis lost its data (a restart without persistence,
                # FLUSHALL, a failover to an empty replica): without the
                # groups, no process would take a batch again.
                log.warning(
                    "Redis has no batch stream or consumer group any more (did it "
                    "lose its data?): making them anew"
                )
                with _redis_errors("making the batch streams anew"):
                    self._make_groups()
            raise

    def reclaim(
        self, consumer: str, idle: float, room: Callable[[str], int]
    ) -> list[Batch]:
        batches = []
        for stream in self._known_streams():
            count = room(self._origin(stream))
            if count <= 0:
                continue
            with _redis_errors("claiming abandoned batches"):
                reply = self.redis.xautoclaim(
                    stream,
                    CONSUMER_GROUP,
                    consumer,
                    int(idle * 1000),
                    self._claim_from.get(stream, "0-0"),
                    count=count,
                )
            # It looks at 10 x count entries a call: go on from there next time.
            self._claim_from[stream] = reply[0] or "0-0"
            for batch in self._as_batches([(stream, reply[1])]):
                log.warning(
                    "batch %s of notification %s: its process went silent; "
                    "sending it from here",
                    batch.entry,
                    batch.notification,
                )
                batches.append(batch)
        return batches

    def keep(self, consumer: str, batches: list[Batch]) -> None:
        args = [consumer]
        for batch in batches:
            args += batch.entry.split(" ")
        with _redis_errors("keeping batches"):
            self._scripts["keep"](args=args)

    def complete(self, batch: Batch, tally: Tally, now: float) -> int:
        stream, entry_id = batch.entry.split(" ")
        args: list[Any] = [self.prefix, stream, entry_id, batch.notification, now]
        args += [",".join(tally.again), tally.vanished]
        for name, count in tally.counts.items():
            args += [name, count]
        for cause, count in tally.causes.items():
            args += [_record_line(list(cause)), count]
        with _redis_errors("recording a batch"):
            return self._scripts["complete"](args=args)

    def backlog(self) -> tuple[int, float]:
        streams = self._known_streams()
        with _redis_errors("measuring the queue"):
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xlen(stream)
                pipe.xrange(stream, count=1)
            replies = pipe.execute()
        now = time.time()
        length, oldest = 0, now
        for size, first in zip(replies[::2], replies[1::2]):
            length += size
            if first:
                oldest = min(oldest, int(first[0][0].split("-")[0]) / 1000)
        return length, max(0.0, now - oldest)

    # -- the rest -----------------------------------------------------------------

    def drop_ended(self, now: float, keep_from: float) -> int:
        every = self.prefix + "notifications"
        dropped = kept = 0
        with _redis_errors("dropping old notifications"):
            while True:  # past the kept ones (not ended yet, keyed), page by page
                old = self.redis.zrangebyscore(
                    every, "-inf", keep_from, start=kept, num=DROP_PAGE
                )
                pipe = self.redis.pipeline(transaction=False)
                for notification_id in old:
                    pipe.hmget(self.prefix + "n:" + notification_id, "doc", "finished")
                drop = []
                for notification_id, (doc, finished) in zip(old, pipe.execute()):
                    if doc is not None:
                        record = json.loads(doc)
                        keyed = record.get("idempotency") and (
                            record["created"] > now - IDEMPOTENCY_SECONDS
                        )
                        if keyed or not finished or float(finished) >= keep_from:
                            kept += 1
                            continue
                    drop.append(notification_id)
                if drop:
                    pipe = self.redis.pipeline()
                    for notification_id in drop:
                        pipe.delete(
                            self.prefix + "n:" + notification_id,
                            self.prefix + "ne:" + notification_id,
                            *(
                                f"{self.prefix}rc:{notification_id}:{event}"
                                for event in RECEIPT_EVENTS
                            ),
                        )
                    pipe.zrem(every, *drop)
                    pipe.execute()
                    dropped += len(drop)
                if len(old) < DROP_PAGE:
                    return dropped

    def count_receipt(
        self, notification_id: str, event: str, subscriber: str
    ) -> bool | None:
        with _redis_errors("counting a receipt"):
            counted = self._scripts["receipt"](
                args=[self.prefix, notification_id, event, subscriber]
            )
        return None if counted < 0 else bool(counted)

    def erase_receipts(self, subscribers: list[str]) -> int:
        """From the receipt sets of every notification kept (``rc:<id>:<event>``)."""
        if not subscribers:
            return 0
        dropped = 0
        with _redis_errors("erasing receipts"):
            ids = self.redis.zrange(self.prefix + "notifications", 0, -1)
            for chunk in _chunks(ids):
                pipe = self.redis.pipeline(transaction=False)
                for notification_id in chunk:
                    for event in RECEIPT_EVENTS:
                        key = f"{self.prefix}rc:{notification_id}:{event}"
                        pipe.srem(key, *subscribers)
                dropped += sum(pipe.execute())
        return dropped

    def announce(self, consumer: str, now: float) -> None:
        consumers = self.prefix + "consumers"  # who delivers: name -> when last said
        with _redis_errors("saying this process delivers"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(consumers, {consumer: now})
            pipe.zremrangebyscore(consumers, "-inf", now - CONSUMER_KEPT)
            pipe.execute()
            if now >= self._next_prune:  # any process may; once a minute here
                self._next_prune = now + 60
                self._scripts["prune"](args=[self.prefix, "", CONSUMER_KEPT * 1000])

    def leave(self, consumer: str) -> None:
        with _redis_errors("leaving"):
            self.redis.zrem(self.prefix + "consumers", consumer)
            self._scripts["prune"](args=[self.prefix, consumer, 0])

    def delivering(self, since: float) -> int:
        with _redis_errors("counting the delivering processes"):
            return self.redis.zcount(self.prefix + "consumers", since, "+inf")

    def flush(self) -> None:
        pass  # Redis takes a write or refuses it: nothing waits here

    def wake(self) -> None:
        self._woken = True
        self._unblock()

    def _unblock(self) -> None:
        """End the consumer's wait now: a blocking read ends by CLIENT UNBLOCK
        from another connection."""
        self._wakeup.set()
        if self._reader_id is not None:
            with contextlib.suppress(Exception):  # it ends by its timeout then
                self.redis.client_unblock(self._reader_id)

    def close(self) -> None:
        self._reader.close()
        self._reader.connection_pool.disconnect()


###############################################################################
# Delivery ####################################################################
###############################################################################

MAX_RESPONSE_BYTES = 65536  # a push service's answer is a status and a short reason
RETRY_TRIES = 3
RETRY_MAX_WAIT = 30.0
START_BATCH = 64  # messages encrypted and started between two looks at the answers
FLUSH_EVERY = 0.1  # seconds between runs of every transfer while any is under way


def encrypt_message(record: dict, payload: bytes) -> bytes:
    """The push message body for one subscriber: RFC 8291 (aes128gcm), encrypted
    exactly as pywebpush's ``WebPusher.encode`` does it, with http_ece and a
    fresh ephemeral key, without building a WebPusher per subscriber."""
    keys = record["keys"]
    return http_ece.encrypt(
        payload,
        private_key=ec.generate_private_key(ec.SECP256R1()),
        dh=b64url_decode(keys["p256dh"]),
        auth_secret=b64url_decode(keys["auth"]),
        version="aes128gcm",
    )


def _retry_delay(retry_after: str | None, attempt: int, backoff: float) -> float:
    """Seconds to wait before retry ``attempt``: Retry-After when given, else
    ``backoff`` (RETRY_BACKOFF) doubled for each try after the first."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), RETRY_MAX_WAIT)
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(retry_after).timestamp()
            return min(max(when - time.time(), 0.0), RETRY_MAX_WAIT)
        except (TypeError, ValueError):
            pass
    return min(backoff * 2 ** (attempt - 1), RETRY_MAX_WAIT)


def _curl_reason(code: int, text: str, timeout: float) -> tuple[str, bool]:
    """What a libcurl error means for a push, and whether trying again may help."""
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return f"no answer in {timeout:g} s", True
    if code in _CURL_NO_CONNECTION:
        return f"cannot connect: {text}", True
    if code in _CURL_CLOSED:
        return f"connection closed: {text}", True
    if code == pycurl.E_WRITE_ERROR:
        return "the answer is too large", False
    if code in _CURL_TLS:
        return f"TLS: {text}", False  # a certificate does not mend in a second
    if code in _CURL_MALFORMED:
        return f"malformed answer: {text}", False
    return f"{text} (curl error {code})", True


_CURL_NO_CONNECTION = {
    pycurl.E_COULDNT_CONNECT,
    pycurl.E_COULDNT_RESOLVE_HOST,
    pycurl.E_COULDNT_RESOLVE_PROXY,
}
_CURL_CLOSED = {pycurl.E_GOT_NOTHING, pycurl.E_RECV_ERROR, pycurl.E_SEND_ERROR}
_CURL_TLS = {
    pycurl.E_PEER_FAILED_VERIFICATION,
    pycurl.E_SSL_CONNECT_ERROR,
    pycurl.E_SSL_CACERT_BADFILE,
    pycurl.E_SSL_CERTPROBLEM,
}
_CURL_MALFORMED = {
    pycurl.E_UNSUPPORTED_PROTOCOL,  # what libcurl calls an unknown HTTP version
    pycurl.E_FTP_WEIRD_SERVER_REPLY,  # CURLE_WEIRD_SERVER_REPLY, renamed in libcurl
    pycurl.E_HTTP2,
    92,  # CURLE_HTTP2_STREAM, which pycurl does not name
}


def _ca_options() -> dict[int, str]:
    """Where libcurl finds trusted CAs: SSL_CERT_FILE / SSL_CERT_DIR as Python
    and OpenSSL read them, else the system store Python's ssl module uses."""
    paths = ssl.get_default_verify_paths()
    options = {}
    cafile = os.environ.get(paths.openssl_cafile_env) or paths.cafile
    capath = os.environ.get(paths.openssl_capath_env) or paths.capath
    if cafile:
        options[pycurl.CAINFO] = cafile
    if capath:
        options[pycurl.CAPATH] = capath
    return options


@dataclass(eq=False)
class _PushJob:
    """One subscriber's message while it is being delivered."""

    record: dict
    origin: str
    batch: _Batch
    body: bytes = b""
    attempt: int = 0
    answer: bytearray = field(default_factory=bytearray)
    seconds: float = 0.0

    def write(self, data: bytes) -> int | None:
        """libcurl's body callback: keep the answer, refuse one too large."""
        if len(self.answer) + len(data) > MAX_RESPONSE_BYTES:
            return 0  # libcurl ends the transfer with CURLE_WRITE_ERROR
        self.answer += data
        return None


@dataclass(eq=False)
class _Batch:
    """The records of one ``submit`` call and the future of their outcomes."""

    message: Message
    left: int
    future: concurrent.futures.Future
    key: str = ""  # what cancel() names: the notification's id
    cancelled: bool = False
    headers: dict[str, list[str]] = field(default_factory=dict)  # per origin
    outcomes: list[PushOutcome] = field(default_factory=list)


class WebPushDelivery:
    """Delivers web push messages from one process over libcurl (pycurl).

    One thread runs libcurl's multi interface on an epoll loop: HTTP/2 with
    many streams on one connection where the push service offers it (ALPN),
    kept-alive HTTP/1.1 connections where not; proxies from HTTPS_PROXY and
    NO_PROXY as every libcurl program reads them. Each push service origin has
    its own limit of messages in flight, so a slow one fills only its own
    slots. Outcomes only: what to do with the store is the caller's.
    """

    def __init__(
        self,
        keys: VapidKeys,
        per_origin: int,
        timeout: float,
        pattern: str = "",
        receipt_key: bytes = b"",
        retry_backoff: float = 1.0,
    ):
        self.keys = keys
        self.receipt_key = receipt_key
        self.retry_backoff = retry_backoff
        # Checked again at each send: a stored endpoint that a changed allowlist
        # (PUSH_ENDPOINT_PATTERN) no longer admits gets nothing.
        self.pattern = re.compile(pattern) if pattern else None
        self._allowed_origins: dict[str, bool] = {}
        self.per_origin = max(1, per_origin)
        self.timeout = timeout
        # (records, batch, at the front) to start, or (None, key, _) to cancel
        self._inbox: collections.deque[tuple[Any, Any, bool]] = collections.deque()
        self._waiting: dict[str, collections.deque[_PushJob]] = {}
        self._in_flight: dict[str, int] = collections.defaultdict(int)
        self._retries: list[tuple[float, int, _PushJob]] = []  # a heap by due time
        self._free: list[pycurl.Curl] = []
        self._busy: set[pycurl.Curl] = set()  # handles libcurl is working on
        self._ca = _ca_options()
        self._selector = selectors.DefaultSelector()
        self._timer: float | None = None  # when libcurl wants socket_action(TIMEOUT)
        self._next_flush = 0.0  # see _turn
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self._multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, 1000)
        self._multi.setopt(pycurl.M_MAXCONNECTS, max(100, 2 * self.per_origin))
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._wake_read, self._wake_write = os.pipe()
        self._wake_lock = threading.Lock()  # no wake-up once the pipe is closed
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)  # a full pipe wakes it already
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name="push-delivery", daemon=True
        )
        self._thread.start()

    def submit(
        self, records: list[dict], message: Message, key: str = "", first: bool = False
    ) -> concurrent.futures.Future:
        """Deliver ``message`` to ``records``; the future gives their outcomes.
        ``key`` names the batch for :meth:`cancel`; ``first`` puts it ahead of
        the messages waiting for the same push services (a test message)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        batch = _Batch(message, len(records), future, key)
        with self._wake_lock:
            if self._closing:  # nothing will deliver them now
                for record in records:
                    self._settle(_PushJob(record, "", batch), None, UNSENT)
            elif records:
                self._inbox.append((records, batch, first))
                self._wake()
            else:
                future.set_result([])
        return future

    def cancel(self, key: str) -> None:
        """Send nothing more of the batches submitted with ``key``: what waits
        ends as "unsent"; what a push service already has cannot be recalled."""
        with self._wake_lock:
            if not self._closing:
                self._inbox.append((None, key, False))
                self._wake()

    def close(self, timeout: float = 5.0) -> None:
        with self._wake_lock:
            if self._closing:
                return
            self._closing = True
            self._wake()
        self._thread.join(timeout)

    def _wake(self) -> None:
        """Make the loop look at its inbox (the caller holds the wake lock)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")

    # -- the loop, on its own thread ------------------------------------------------

    def _run(self) -> None:
        while not self._closing:
            try:
                self._turn()
            except Exception:  # a bug here must not strand every caller
                log.exception("delivery loop error; it carries on")
                time.sleep(0.1)
        with self._wake_lock:
            self._abandon()
            self._multi.close()
            self._selector.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _turn(self) -> None:
        """One turn of the loop: take new work, start what the limits allow,
        wait for sockets, timers or retries, and settle what finished."""
        self._take_new()
        more = self._start_waiting()
        due = [t for t in (self._timer, self._next_retry()) if t is not None]
        if self._busy:
            due.append(self._next_flush)
        wait = 0.0 if more else None
        if due and not more:
            wait = max(0.0, min(due) - time.monotonic())
        for key, mask in self._selector.select(wait):
            if key.fd == self._wake_read:
                self._drain_wake()
                continue
            flags = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | (
                pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0
            )
            self._multi.socket_action(key.fd, flags)
        if self._timer is not None and self._timer <= time.monotonic():
            self._timer = None
            self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        if self._busy and self._next_flush <= time.monotonic():
            # libcurl (8.23 here) can keep a request's last DATA frame in
            # nghttp2's buffer, stop watching the socket for writing, and wait
            # for an answer the push service cannot give without it: the message
            # waits for PUSH_TIMEOUT and is sent again. Measured with two
            # processes on two busy cores, each sending batches of 250 to a
            # local nginx: 1 batch in 55 to 120. Running every transfer now and
            # then sends what waits.
            self._next_flush = time.monotonic() + FLUSH_EVERY
            self._multi.perform()
        self._finish_done()
        self._requeue_due_retries()

    def _abandon(self) -> None:
        """Settle every message not yet delivered as unsent, so no caller waits
        for ever on a loop that has stopped."""
        self._take_new()
        jobs = [job for waiting in self._waiting.values() for job in waiting]
        jobs += [job for _, _, job in self._retries]
        for handle in self._busy:
            self._multi.remove_handle(handle)
            jobs.append(handle.job)
        for job in jobs:
            self._settle(job, None, UNSENT)

    def _cancel(self, key: str) -> None:
        """Settle the waiting and retrying messages of batches with ``key``;
        those in flight are not tried again."""
        for handle in self._busy:
            if handle.job.batch.key == key:
                handle.job.batch.cancelled = True
        cancelled = []
        for origin, waiting in self._waiting.items():
            if any(job.batch.key == key for job in waiting):
                cancelled += [job for job in waiting if job.batch.key == key]
                self._waiting[origin] = collections.deque(
                    job for job in waiting if job.batch.key != key
                )
        if any(job.batch.key == key for _, _, job in self._retries):
            cancelled += [job for _, _, job in self._retries if job.batch.key == key]
            self._retries = [r for r in self._retries if r[2].batch.key != key]
            heapq.heapify(self._retries)
        for job in cancelled:
            self._settle(job, None, UNSENT)

    def _on_socket(self, what: int, fd: int, multi: Any, data: Any) -> None:
        if what == pycurl.POLL_REMOVE:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
            return
        events = {
            pycurl.POLL_IN: selectors.EVENT_READ,
            pycurl.POLL_OUT: selectors.EVENT_WRITE,
            pycurl.POLL_INOUT: selectors.EVENT_READ | selectors.EVENT_WRITE,
        }[what]
        try:
            self._selector.modify(fd, events)
        except KeyError:
            self._selector.register(fd, events)

    def _on_timer(self, milliseconds: int) -> None:
        self._timer = (
            None if milliseconds < 0 else time.monotonic() + milliseconds / 1000
        )

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass

    def _take_new(self) -> None:
        while self._inbox:
            records, batch, first = self._inbox.popleft()
            if records is None:
                self._cancel(batch)
                continue
            jobs = []
            for record in records:
                job = _PushJob(record, "", batch)
                try:
                    job.origin = endpoint_origin(record["endpoint"])
                    allowed = self._admits(record["endpoint"], job.origin)
                except Exception as e:  # noqa: BLE001 - a bad record fails alone
                    self._settle(job, None, f"cannot send: {type(e).__name__}: {e}")
                    continue
                if not allowed:
                    self._settle(job, None, "the endpoint is not allowed any more")
                    continue
                jobs.append(job)
            for job in reversed(jobs) if first else jobs:
                waiting = self._waiting.setdefault(job.origin, collections.deque())
                if first:
                    waiting.appendleft(job)
                else:
                    waiting.append(job)

    def _admits(self, endpoint: str, origin: str) -> bool:
        """The allowlist, checked again at send time. The built-in one looks at
        the origin alone, so it is decided once per origin, not per message;
        PUSH_ENDPOINT_PATTERN sees the whole endpoint."""
        if self.pattern is not None:
            return endpoint_allowed(endpoint, self.pattern)
        allowed = self._allowed_origins.get(origin)
        if allowed is None:
            allowed = self._allowed_origins[origin] = endpoint_allowed(origin + "/")
        return allowed

    def _start_waiting(self) -> bool:
        """Start what the limits allow, at most START_BATCH a turn, one from
        each push service in turn, so that none waits behind another's
        backlog; True if more could start."""
        ready = [
            waiting
            for origin, waiting in self._waiting.items()
            if waiting and self._in_flight[origin] < self.per_origin
        ]
        started = 0
        while ready:
            for waiting in list(ready):
                if started == START_BATCH:
                    return True
                job = waiting.popleft()
                self._start(job)
                started += 1
                if not waiting or self._in_flight[job.origin] >= self.per_origin:
                    ready.remove(waiting)
        return False

    def _start(self, job: _PushJob) -> None:
        """Encrypt (once) and hand the job to libcurl; a record that cannot be
        sent ends as a failed outcome, never as an error of the whole batch."""
        job.attempt += 1
        job.answer.clear()
        handle = None
        try:
            handle = self._free.pop() if self._free else self._new_handle()
            if not job.body:
                payload = personal_payload(
                    job.batch.message, job.record["id"], self.receipt_key
                )
                job.body = encrypt_message(job.record, payload)
            handle.setopt(pycurl.URL, job.record["endpoint"])
            # Over TLS, wait for ALPN to say whether HTTP/2 can carry this on an
            # open connection; plain http has no ALPN, and the wait would
            # serialise every message on one HTTP/1.1 connection.
            handle.setopt(pycurl.PIPEWAIT, job.origin.startswith("https:"))
            handle.setopt(pycurl.HTTPHEADER, self._headers(job))
            handle.setopt(pycurl.POSTFIELDS, job.body)
            handle.setopt(pycurl.WRITEFUNCTION, job.write)
            handle.job = job
            self._multi.add_handle(handle)
            self._busy.add(handle)
        except Exception as e:  # noqa: BLE001 - one bad record must not stop a fan-out
            if handle is not None:
                self._free.append(handle)
            self._settle(job, None, f"cannot send: {type(e).__name__}: {e}")
            return
        self._in_flight[job.origin] += 1

    def _new_handle(self) -> pycurl.Curl:
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)  # threads
        handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        handle.setopt(pycurl.TIMEOUT_MS, int(self.timeout * 1000))
        handle.setopt(pycurl.USERAGENT, f"webpush/{__version__}")
        for option, value in self._ca.items():
            handle.setopt(option, value)
        return handle

    def _headers(self, job: _PushJob) -> list[str]:
        """The request headers, made once per message and origin; the VAPID
        header is VapidKeys' cached one for that origin."""
        cached = job.batch.headers.get(job.origin)
        vapid = f"Authorization: {self.keys.authorization(job.origin)}"
        if cached is None or cached[0] != vapid:
            message = job.batch.message
            cached = [
                vapid,
                f"TTL: {message.ttl}",
                "Content-Encoding: aes128gcm",
                "Content-Type: application/octet-stream",
                "Expect:",  # no 100-continue round trip for bodies over 1 KB
            ]
            if message.urgency:
                cached.append(f"Urgency: {message.urgency}")
            if message.topic:
                cached.append(f"Topic: {message.topic}")
            job.batch.headers[job.origin] = cached
        return cached

    def _finish_done(self) -> None:
        while True:
            queued, done, failed = self._multi.info_read()
            for handle in done:
                self._finish(handle, None)
            for handle, code, text in failed:
                self._finish(handle, (code, text))
            if not queued:
                return

    def _finish(self, handle: pycurl.Curl, error: tuple[int, str] | None) -> None:
        job: _PushJob = handle.job
        self._multi.remove_handle(handle)
        self._busy.discard(handle)
        handle.job = None
        self._in_flight[job.origin] -= 1
        job.seconds = handle.getinfo(pycurl.TOTAL_TIME)
        if error is not None:
            reason, retryable = _curl_reason(*error, self.timeout)
            status, retry_after = None, None
        else:
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            reason = job.answer[:200].decode("utf-8", "replace").strip()
            retryable = status == 429 or status >= 500
            retry_after = handle.getinfo(pycurl.RETRY_AFTER) or None
        self._free.append(handle)
        if retryable and job.batch.cancelled:
            reason = UNSENT
        elif retryable and job.attempt < RETRY_TRIES:
            delay = _retry_delay(
                retry_after and str(retry_after), job.attempt, self.retry_backoff
            )
            heapq.heappush(self._retries, (time.monotonic() + delay, id(job), job))
            return
        self._settle(job, status, reason)

    def _settle(self, job: _PushJob, status: int | None, reason: str) -> None:
        if reason is UNSENT:
            result = "unsent"
        elif status in (200, 201, 202):
            result, reason = "sent", ""
        elif status in (404, 410):
            result = "removed"
        else:
            result = "failed"
        batch = job.batch
        batch.outcomes.append(
            PushOutcome(
                job.record["id"],
                job.origin,
                status,
                result,
                reason,
                job.attempt,
                seconds=job.seconds,
            )
        )
        batch.left -= 1
        if batch.left == 0:
            batch.future.set_result(batch.outcomes)

    def _next_retry(self) -> float | None:
        return self._retries[0][0] if self._retries else None

    def _requeue_due_retries(self) -> None:
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            job = heapq.heappop(self._retries)[2]
            self._waiting[job.origin].appendleft(job)


class DeliveryStopped(Exception):
    """A batch's delivery process ended before the batch did: none of its
    outcomes are known, so the caller hands its records out again."""


def delivery_process(fd: int) -> int:
    """``api.py --delivery-process FD``, started by the server: batches in over
    the socket ``fd``, each batch's outcomes back as it ends, many batches at
    once. The first message is the key and limits (never on a command line).
    It ends when the server does, even one killed with SIGKILL (EOF)."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group:
    # the server decides when delivery stops, and these end with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = multiprocessing.connection.Connection(fd)
    try:
        pem, subject, *limits = conn.recv()
    except (EOFError, OSError):
        return 0
    key = serialization.load_pem_private_key(pem, password=None)
    keys = VapidKeys(key, subject, "parent process")  # type: ignore[arg-type]
    delivery = WebPushDelivery(keys, *limits)
    replying = threading.Lock()

    # Plain tuples on the socket: the server may know this module by another
    # name (api, or __main__) than this process does.
    def reply(number: int, future: concurrent.futures.Future) -> None:
        outcomes = [
            (o.record_id, o.origin, o.status, o.result, o.reason, o.tries, o.channel)
            + (o.seconds,)
            for o in future.result()
        ]
        with replying, contextlib.suppress(OSError):
            conn.send((number, outcomes))

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone
        if request[0] == "cancel":
            delivery.cancel(request[1])
            continue
        _, number, records, message, batch_key, first = request
        message = Message(*message)
        delivery.submit(records, message, batch_key, first).add_done_callback(
            functools.partial(reply, number)
        )


class _DeliveryProcess:
    """The server's end of one delivery process: batches out, outcomes in.

    ``api.py --delivery-process`` (the module imported, or the file run when
    its name is no module name) on a socket pair rather than
    multiprocessing's spawn, which would add a 14 MB resource tracker process."""

    def __init__(self, args: tuple):
        ours, theirs = socket.socketpair()
        with theirs:
            # Imported, not run as a script: from its cached bytecode, each
            # process is 6 MB smaller than one that compiles the file itself.
            here = Path(__file__).resolve()
            command = [sys.executable, str(here), "--delivery-process"]
            if here.stem.isidentifier():
                start = (
                    f"import sys; sys.path.insert(0, {str(here.parent)!r}); "
                    f"import {here.stem}; sys.exit({here.stem}.main(sys.argv[1:]))"
                )
                command = [sys.executable, "-c", start, "--delivery-process"]
            self.process = subprocess.Popen(
                [*command, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self.conn = multiprocessing.connection.Connection(ours.detach())
        self.conn.send(args)
        self.alive = True
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._numbers = itertools.count()
        self._lock = threading.Lock()  # the futures and ``alive``
        self._sending = threading.Lock()  # one message at a time on the pipe
        threading.Thread(
            target=self._read, name="delivery-outcomes", daemon=True
        ).start()

    def submit(
        self, records: list[dict], message: Message, key: str, first: bool
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            number = next(self._numbers)
            self._futures[number] = future
        message_tuple = dataclasses.astuple(message)
        self._send(("send", number, records, message_tuple, key, first))
        return future

    def cancel(self, key: str) -> None:
        self._send(("cancel", key))

    def close(self, timeout: float = 1.0) -> None:
        self.signal()
        self.join(time.monotonic() + timeout)

    def signal(self) -> None:
        """Tell it to stop (EOF), without waiting for it."""
        self._stop()
        # Shut down, not only closed: _read's recv() on another thread holds
        # the socket open, and the process would not see EOF.
        with (
            contextlib.suppress(OSError, ValueError),
            socket.socket(fileno=os.dup(self.conn.fileno())) as s,
        ):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.conn.close()

    def join(self, deadline: float) -> None:
        """Wait for it to exit until ``deadline`` (time.monotonic()), then kill it."""
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _send(self, request: tuple) -> None:
        try:
            with self._sending:
                self.conn.send(request)
        except (OSError, ValueError):  # it died; _read fails what it had
            self._stop()

    def _read(self) -> None:
        while True:
            try:
                number, outcomes = self.conn.recv()
                outcomes = [PushOutcome(*o) for o in outcomes]
            except (EOFError, OSError, ValueError, TypeError):  # or another version
                break
            with self._lock:
                future = self._futures.pop(number, None)
            if future is not None:
                future.set_result(outcomes)
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            self.alive = False
            futures, self._futures = self._futures, {}
        for future in futures.values():
            future.set_exception(DeliveryStopped("a delivery process stopped"))


def _gather(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """One future of the concatenated results of ``futures``."""
    gathered: concurrent.futures.Future = concurrent.futures.Future()
    if not futures:
        gathered.set_result([])
        return gathered
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_: concurrent.futures.Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        results: list = []
        for future in futures:
            if future.cancelled():  # FcmSender's threads stopped first
                gathered.set_exception(DeliveryStopped("delivery stopped"))
                return
            if future.exception() is not None:
                gathered.set_exception(future.exception())
                return
            result = future.result()
            results += result if isinstance(result, list) else [result]
        gathered.set_result(results)

    for future in futures:
        future.add_done_callback(one_done)
    return gathered


def _one_attempt_fcm(**options: Any) -> Any:
    """pyfcm's client, one attempt per call. Its own ``send_request`` sleeps on
    every Retry-After and tries again without a bound; FcmSender retries
    instead, a bounded number of times. The OAuth token is fetched under a lock
    and shared by all threads while it is valid (pyfcm would refresh the one
    credentials object from every thread at once).

    pyfcm, google-auth and requests are imported only when FCM is configured:
    they would add 12 MB to the server and to every delivery process."""
    import google.auth.exceptions
    import google.auth.transport.requests
    import pyfcm.errors
    from pyfcm import FCMNotification

    class OneAttemptFcm(FCMNotification):
        _token_lock = threading.Lock()

        def _get_access_token(self) -> str:
            with self._token_lock:
                if not self.credentials.valid:
                    try:
                        self.credentials.refresh(
                            google.auth.transport.requests.Request()
                        )
                    except google.auth.exceptions.GoogleAuthError as e:
                        raise pyfcm.errors.InvalidDataError(e) from None
                return self.credentials.token

        def send_request(
            self, payload: bytes | None = None, timeout: float | None = None
        ) -> Any:
            response = self.requests_session.post(
                self.fcm_end_point, data=payload, timeout=timeout
            )
            if self._is_access_token_expired(response):
                self.thread_local.token_expiry = 0  # a new token, then once more
                response = self.requests_session.post(
                    self.fcm_end_point, data=payload, timeout=timeout
                )
            return response

    return OneAttemptFcm(**options)


def fcm_message_options(message: Message) -> dict:
    """The FCM HTTP v1 fields of ``message``, as pyfcm's ``parse_payload`` takes them."""
    note = message.notification
    data = note.get("data")
    values = {}
    if isinstance(data, dict):  # FCM v1 data values must be strings
        values = {
            str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()
        }
    elif data is not None:
        values["data"] = data if isinstance(data, str) else json.dumps(data)
    if note.get("url"):
        values["url"] = note["url"]
    immediate = message.urgency in (None, "normal", "high")
    android: dict = {
        "ttl": f"{message.ttl}s",
        "priority": "HIGH" if message.urgency == "high" else "NORMAL",
    }
    apns_headers = {
        "apns-priority": "10" if immediate else "5",
        "apns-expiration": str(int(time.time()) + message.ttl) if message.ttl else "0",
    }
    if message.topic:
        android["collapse_key"] = message.topic
        apns_headers["apns-collapse-id"] = message.topic
    shown: dict[str, Any] = {}  # AndroidNotification
    aps: dict[str, Any] = {}
    if note.get("tag"):  # a newer one with the same tag replaces it on the device
        shown["tag"] = note["tag"]
        aps["thread-id"] = note["tag"]
    if note.get("badge") is not None:
        shown["notification_count"] = min(note["badge"], 2**31 - 1)
        aps["badge"] = min(note["badge"], 2**31 - 1)
    if shown:
        android["notification"] = shown
    apns: dict[str, Any] = {"headers": apns_headers}
    if aps:
        apns["payload"] = {"aps": aps}
    return {
        "notification_title": note.get("title"),
        "notification_body": note.get("body"),
        "notification_image": note.get("image") or note.get("icon"),
        "data_payload": values or None,
        "android_config": android,
        "apns_config": apns,
    }


class FcmSender:
    """Sends to native-app FCM tokens with pyfcm (FCM HTTP v1), on bounded threads:
    pyfcm is blocking, with one requests session and OAuth token per thread."""

    def __init__(self, settings: Settings, receipt_key: bytes = b""):
        import google.oauth2.service_account
        import pyfcm.errors
        import requests.adapters

        try:
            credentials = (
                google.oauth2.service_account.Credentials.from_service_account_file(
                    settings.fcm_service_account,
                    scopes=["https://www.googleapis.com/auth/firebase.messaging"],
                )
            )
        except (OSError, ValueError) as e:
            raise SettingError(
                f"FCM_SERVICE_ACCOUNT {settings.fcm_service_account}: not a "
                f"service-account JSON file ({e})"
            ) from None
        self.client = _one_attempt_fcm(
            credentials=credentials,
            project_id=settings.fcm_project_id or None,
            adapter=requests.adapters.HTTPAdapter(max_retries=0),  # retries are ours
        )
        self.client.FCM_END_POINT_BASE = (
            settings.fcm_api_url.rstrip("/") + "/v1/projects"
        )
        try:
            log.info("FCM: sending to %s", self.client.fcm_end_point)
        except pyfcm.errors.AuthenticationError:
            raise SettingError(
                "the service-account file names no project: set FCM_PROJECT_ID"
            ) from None
        self.timeout = settings.push_timeout
        self.retry_backoff = settings.retry_backoff
        self.receipt_key = receipt_key
        self._threads = concurrent.futures.ThreadPoolExecutor(
            settings.fcm_threads, thread_name_prefix="fcm"
        )

    def submit(
        self, records: list[dict], message: Message
    ) -> list[concurrent.futures.Future]:
        options = fcm_message_options(message)
        return [
            self._threads.submit(self._send_one, r, self._personal(options, r, message))
            for r in records
        ]

    def _personal(self, options: dict, record: dict, message: Message) -> dict:
        """``options`` with the notification id and the token's receipt in its
        data, as web push messages have them."""
        if not message.notification_id or not self.receipt_key:
            return options
        data = dict(options["data_payload"] or {})
        data["id"] = message.notification_id
        data["receipt"] = receipt(
            self.receipt_key, message.notification_id, record["id"]
        )
        return {**options, "data_payload": data}

    def _send_one(self, record: dict, options: dict) -> PushOutcome:
        import pyfcm.errors
        import requests

        attempt = 0
        while True:
            attempt += 1
            outcome = PushOutcome(
                record["id"], "fcm", None, "failed", "", attempt, "fcm"
            )
            retry_after = None
            try:
                payload = self.client.parse_payload(
                    fcm_token=record["fcm_token"], **options
                )
                began = time.monotonic()
                try:
                    response = self.client.send_request(payload, self.timeout)
                finally:
                    outcome.seconds = time.monotonic() - began
                outcome.status = response.status_code
                outcome.reason = response.text[:200]
                retry_after = response.headers.get("Retry-After")
                self.client.parse_response(response)
                outcome.result, outcome.reason = "sent", ""
                return outcome
            except pyfcm.errors.FCMNotRegisteredError:
                outcome.result = "removed"  # 404 UNREGISTERED: the app was uninstalled
                return outcome
            except pyfcm.errors.InvalidDataError as e:
                if outcome.status is None:  # no OAuth token for the service account
                    outcome.reason = f"cannot get an access token: {e}"
                    log.error("FCM: %s", outcome.reason)
                    return outcome
                if (
                    "registration token" in outcome.reason
                    or "message.token" in outcome.reason
                ):
                    outcome.result = "removed"  # 400 INVALID_ARGUMENT about the token
                return outcome
            except (
                pyfcm.errors.AuthenticationError,
                pyfcm.errors.FCMSenderIdMismatchError,
            ):
                log.error(
                    "FCM refused the service account (%s): check FCM_SERVICE_ACCOUNT and "
                    "that the Firebase Cloud Messaging API is enabled for the project",
                    outcome.status,
                )
                return outcome
            except pyfcm.errors.FCMServerError:
                pass  # 429, 5xx: retried below
            except requests.RequestException as e:
                outcome.reason = f"{type(e).__name__}: {e}"
            if attempt >= RETRY_TRIES:
                return outcome
            time.sleep(_retry_delay(retry_after, attempt, self.retry_backoff))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


class Delivery:
    """Where messages go: web push to the delivery processes, or to one
    WebPushDelivery in this process with PUSH_PROCESSES=1; FCM tokens to
    FcmSender's threads when FCM is configured (skipped when it is not).

    Encryption and TLS are CPU work that one Python process does on one core,
    hence the processes. Each takes many batches at once and keeps a queue per
    push service, so a hung service holds only its own messages. Outcomes only:
    what they mean for the store and the notification is the caller's.
    """

    def __init__(
        self,
        keys: VapidKeys,
        settings: Settings,
        receipt_key: bytes = b"",
        observers: tuple[Callable[[list[PushOutcome]], None], ...] = (),
    ):
        self.processes = max(1, settings.push_processes)
        self.observers = observers  # told every batch's outcomes (metrics)
        # PUSH_CONCURRENCY is per push service, shared by the delivery processes.
        per_origin = max(1, settings.push_concurrency // self.processes)
        self.fcm = (
            FcmSender(settings, receipt_key) if settings.fcm_service_account else None
        )
        self._args = (
            keys.private_pem(),
            keys.subject,
            per_origin,
            settings.push_timeout,
            settings.push_endpoint_pattern,
            receipt_key,
            settings.retry_backoff,
        )
        self._local: WebPushDelivery | None = None
        self._workers: list[_DeliveryProcess] = []
        self._turn = itertools.count()
        self._replacing = threading.Lock()
        self._closed = False
        if self.processes == 1:
            self._local = WebPushDelivery(keys, *self._args[2:])
        else:
            self._workers = [
                _DeliveryProcess(self._args) for _ in range(self.processes)
            ]

    def sends_to(self, origin: str) -> bool:
        """Whether records of this origin ("fcm" for FCM tokens) can be sent."""
        return origin != "fcm" or self.fcm is not None

    def submit(
        self, records: list[dict], message: Message, key: str = "", first: bool = False
    ) -> concurrent.futures.Future:
        """Deliver ``message``; the future gives one PushOutcome per record
        (none for FCM tokens while FCM is not configured), or DeliveryStopped."""
        now_ms = time.time() * 1000
        expired = [
            r for r in records if (r.get("expirationTime") or math.inf) <= now_ms
        ]
        if expired:  # the browser said it stops working then: not sent, removed
            gone = {r["id"] for r in expired}
            records = [r for r in records if r["id"] not in gone]
        web = [r for r in records if r.get("kind", "webpush") == "webpush"]
        tokens = [r for r in records if r.get("kind") == "fcm"]
        futures = self.fcm.submit(tokens, message) if self.fcm and tokens else []
        if expired:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(
                [
                    PushOutcome(
                        r["id"],
                        endpoint_origin(r["endpoint"]),
                        None,
                        "removed",
                        EXPIRED,
                    )
                    for r in expired
                ]
            )
            futures.append(done)
        if web and self._local is not None:
            futures.append(self._local.submit(web, message, key, first))
        elif web:
            futures.append(self._worker().submit(web, message, key, first))
        gathered = _gather(futures)
        gathered.add_done_callback(self._observe)
        return gathered

    def _observe(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            for observe in self.observers:
                observe(future.result())

    def cancel(self, key: str) -> None:
        """Send nothing more of what was submitted with ``key``."""
        if self._local is not None:
            self._local.cancel(key)
        for worker in self._workers:
            worker.cancel(key)

    def _worker(self) -> _DeliveryProcess:
        """The next delivery process in turn; a dead one is replaced."""
        index = next(self._turn) % len(self._workers)
        worker = self._workers[index]
        if not worker.alive and not self._closed:  # closed: its submit fails
            with self._replacing:
                if self._workers[index] is worker:
                    log.error("a delivery process stopped; starting a new one")
                    worker.close()
                    self._workers[index] = _DeliveryProcess(self._args)
                worker = self._workers[index]
        return worker

    def close(self, timeout: float = 1.0) -> None:
        """Stop delivering: what is not yet sent ends as unsent. The delivery
        processes stop together, within ``timeout`` seconds (or are killed)."""
        deadline = time.monotonic() + timeout
        self._closed = True  # a process that stops now is not replaced
        if self.fcm:
            self.fcm.close()
        if self._local is not None:
            self._local.close(timeout)
        for worker in self._workers:
            worker.signal()
        for worker in self._workers:
            worker.join(deadline)


###############################################################################
# Notifications ###############################################################
###############################################################################
# The one engine over a JobStore and a subscription store: every policy of a
# notification's life is written here once, for both stores.

REFUSALS = (400, 403, 413)


def apply_outcomes(
    store: SubscriptionStore,
    outcomes: list[PushOutcome],
    prune_after: int = 0,
    recent: int = 0,
) -> None:
    """What outcomes mean for the store: a subscription its push service says
    is gone (404, 410), whose expirationTime passed, or that is stale, is
    removed; one refused (400, 403, 413) on ``prune_after`` fan-outs in a row
    is removed too; one sent to has its last success now (and its last
    ``recent`` successes kept, for MAX_PER_DAY); failures are logged, one
    line per cause."""
    refused = [
        o
        for o in outcomes
        if prune_after and o.status in REFUSALS and o.result == "failed"
    ]
    sent = [o.record_id for o in outcomes if o.result == "sent"]
    if refused or sent:
        try:
            pruned = store.note_deliveries(
                [o.record_id for o in refused], sent, prune_after, time.time(), recent
            )
        except OSError as e:  # counted at the next fan-out instead
            log.warning("cannot count refused subscriptions yet: %s", e)
        else:
            last = {o.record_id: o for o in refused}
            for record_id in pruned:
                log.warning(
                    "removed subscription %s: %s refused it (%s %s) on %d fan-outs "
                    "in a row (PRUNE_AFTER_FAILURES)",
                    record_id,
                    last[record_id].origin,
                    last[record_id].status,
                    last[record_id].reason[:100],
                    prune_after,
                )
    gone = [o for o in outcomes if o.result == "removed"]
    if gone:
        try:
            store.write(removals=[o.record_id for o in gone])
        except OSError as e:  # kept, and removed at its next 404 or 410
            log.warning("cannot remove %d gone subscriptions yet: %s", len(gone), e)
        else:
            for o in gone:
                log.info(
                    "removed subscription %s: %s",
                    o.record_id,
                    f"{o.origin} answered {o.status}"
                    if o.status
                    else "stale, no successful delivery for STALE_AFTER_DAYS"
                    if o.reason == STALE
                    else o.reason,
                )
    causes = collections.Counter(
        (o.origin, o.status, o.reason) for o in outcomes if o.result == "failed"
    )
    for (origin, status, reason), count in causes.items():
        log.warning(
            "push to %s failed for %d subscription%s: %s",
            origin,
            count,
            "s" if count > 1 else "",
            f"{status} {reason}" if status else reason,
        )


BATCH_SIZE = 250  # subscribers handed to a delivery process at once
BATCHES_PER_PROCESS = 4  # per push service in each process: one sent, more ready
EXPIRY_SLACK = 5.0  # seconds late a TTL 0 notification may still start


class AlreadyFinished(Exception):
    """The notification ended before it could be cancelled."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key already used with another body."""


FCM_ELSEWHERE = (
    "FCM is not configured in this process, but in the one that planned it: "
    "give every process the same FCM_SERVICE_ACCOUNT"
)
TAKE_BLOCK = 0.5  # seconds a consumer waits for a batch before looking again
# A notification to at most PRIORITY_MAX subscribers ("your order shipped")
# has batches of its own lane, PRIORITY_LANE before the origin: slots of their
# own, and sent ahead of what waits, so a large fan-out to the same push
# service does not hold it back.
PRIORITY_MAX = 1000
PRIORITY_LANE = "!"


@dataclass
class PlanCursor:
    """Where a notification's plan is, as the job store keeps it (text):
    the channel (CHANNELS' number, from 1) and the last place in line
    planned; for a ``send_at_local``, the pass under way, which plans the
    subscribers whose wall-clock time came in (``lo``, ``hi``], and the
    soonest later one it met (``later``: the next pass); for a ``rate``,
    when its next second's worth is due (``turn``). 0 is "not yet"."""

    index: int = 1
    after: int = 0
    lo: float = -math.inf
    hi: float = 0.0
    later: float = math.inf
    turn: float = 0.0

    @classmethod
    def parse(cls, text: str) -> PlanCursor:
        parts = text.split(" ")
        index, after = int(parts[0]), 0 if parts[1] == "-inf" else int(float(parts[1]))
        if len(parts) < 6:  # a plan as earlier versions kept it
            return cls(index, after)
        lo, hi, later, turn = (float(p) for p in parts[2:6])
        return cls(index, after, lo, hi, later, turn)

    def __str__(self) -> str:
        if not self.hi and not self.turn:
            return f"{self.index} {self.after}"
        times = (repr(float(t)) for t in (self.lo, self.hi, self.later, self.turn))
        return f"{self.index} {self.after} {' '.join(times)}"


class NotificationEngine:
    """Notifications as durable jobs, on either job store: accepted at once,
    planned, delivered in batches, counted, resumed after a crash.

    Four threads per process (the planner alone when it does not deliver).
    The planner claims a due notification (leased for WORKER_TIMEOUT, so
    one process plans it; if that one dies, another resumes from the
    cursor), pages through the subscribers it goes to (those stored when it
    started) and queues them in batches of at most BATCH_SIZE that share a
    push service. The consumer takes batches, at most ``BATCHES_PER_PROCESS
    x PUSH_PROCESSES`` of each push service at a time, so a hung push
    service holds only its own batches; it takes over batches a silent
    process held for WORKER_TIMEOUT. The recorder applies each batch's
    outcomes to the subscription store and counts them with the step that
    completes the batch: delivery is at least once, counts exactly once, and
    the duplicates a crash causes are at most the batches in flight. The
    keeper tells the job store every second that this process still works
    on its batches, stops those of notifications cancelled elsewhere, and
    writes what a full disk refused.
    """

    def __init__(
        self,
        jobs: JobStore,
        store: SubscriptionStore,
        delivery: Delivery,
        settings: Settings,
        consume: bool = True,
    ):
        self.jobs = jobs
        self.store = store
        self.delivery = delivery
        self.retention = settings.notification_retention
        self.prune_after = settings.prune_after_failures
        self.default_zone = settings.default_timezone
        self.max_per_day = settings.max_per_day
        self.stale_after = settings.stale_after_days * DAY
        self._ages_lock = threading.Lock()
        self._ages: tuple[float, dict | None] = (0.0, None)
        self.lease = settings.worker_timeout
        self.batch_size = BATCH_SIZE
        self.per_origin = BATCHES_PER_PROCESS * delivery.processes
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._lock = threading.Condition()
        self._in_flight: dict[str, Batch] = {}  # entry -> batch
        self._out: collections.Counter[str] = collections.Counter()  # by origin
        self._completed: collections.deque[tuple] = collections.deque()
        # Ended while this process had or may take its batches: told to the
        # delivery already; forgotten after a minute.
        self._cancelled: dict[str, float] = {}
        self._messages: dict[str, tuple[float, str | None, Message | None]] = {}
        self._created = threading.Event()  # made here: plan it without waiting
        self._stopping = False
        self._complained = 0.0
        if consume:  # delivering from now on: /health counts this process at once
            jobs.announce(self.consumer, time.time())
        loops = [(self._plan_loop, "notification-planner")]
        if consume:  # else the batches are left to the other processes
            loops += [
                (self._consume_loop, "batch-consumer"),
                (self._record_loop, "batch-recorder"),
                (self._keep_loop, "batch-keeper"),
            ]
        self._threads = [
            threading.Thread(target=target, name=name, daemon=True)
            for target, name in loops
        ]
        for thread in self._threads:
            thread.start()

    # -- what the HTTP routes call ----------------------------------------------

    def create(
        self,
        message: Message,
        audience: Audience,
        send_at: float | None = None,
        key: str | None = None,
        body_hash: str = "",
        source: str = "api",
        created_by: str | None = None,
        policy: dict | None = None,
        owner: str | None = None,
    ) -> tuple[dict, bool]:
        """Keep a notification (OSError if the store refuses); its status
        document, and whether it is an earlier one with the same
        Idempotency-Key (IdempotencyConflict if that one had another body)."""
        key_hash = hashlib.sha256(key.encode()).hexdigest() if key else None
        while True:
            record = new_notification(
                message,
                audience,
                time.time(),
                send_at,
                key_hash,
                body_hash,
                source,
                self.subscribers(audience),
                created_by,
                policy,
                owner,
            )
            earlier = self.jobs.insert(record, key_hash)
            if earlier is None:
                self._created.set()
                return status_document(record), False
            found = self.jobs.load(earlier)
            if found is None:  # dropped since: its key is free now
                continue
            if found["idempotency"]["body"] != body_hash:
                raise IdempotencyConflict(earlier)
            return status_document(found, found["receipts"]), True

    def subscribers(self, audience: Audience) -> int:
        """How many subscribers a notification to ``audience`` goes to now."""
        if audience.named is not None:
            return len(self._named(audience))
        kinds = [k for k in CHANNELS if self.delivery.sends_to(k)]
        return sum(self.store.count(kind, audience.topic) for kind in kinds)

    def erase(self, user: str) -> tuple[int, int]:
        """Forget every subscription of ``user`` and the receipts they sent
        (OSError if a store refuses): how many of each."""
        removed = receipts = 0
        while found := self.store.of_users([user]):  # and any bound meanwhile
            ids = [record_id for _, record_id, _ in found]
            receipts += self.jobs.erase_receipts(ids)
            self.store.write(removals=ids)
            removed += len(ids)
        return removed, receipts

    def get(self, notification_id: str) -> dict | None:
        record = self.jobs.load(notification_id)
        return None if record is None else status_document(record, record["receipts"])

    def owner(self, notification_id: str) -> str | None:
        """Whose a notification is (Caller.owner of the key that made it)."""
        record = self.jobs.load(notification_id)
        return record and (record.get("owner") or record.get("created_by"))

    def count_receipt(
        self, notification_id: str, event: str, subscriber: str
    ) -> bool | None:
        """Count a subscriber's receipt once: True if it was new, False if
        counted before, None if there is no such notification."""
        return self.jobs.count_receipt(notification_id, event, subscriber)

    def list(self, limit: int) -> list[dict]:
        """The newest ``limit`` notifications, newest first."""
        return [d for d in map(self.get, self.jobs.newest(limit)) if d is not None]

    def status_counts(self) -> collections.Counter[str]:
        """How many notifications are kept with each status."""
        return self.jobs.statuses()

    def backlog(self) -> tuple[int, float]:
        """Batches queued or being sent, and how long the oldest has waited."""
        return self.jobs.backlog()

    def cancel(self, notification_id: str) -> dict:
        """Send no more of it: KeyError if there is no such notification,
        AlreadyFinished if it has ended, OSError if the store refuses. Other
        processes stop sending its batches within a second."""
        changed = self.jobs.change(
            notification_id, "cancelled", UNFINISHED, time.time()
        )
        if changed is None:
            raise KeyError(notification_id)
        if not changed:
            raise AlreadyFinished(notification_id)
        self._stop_sending(notification_id, "cancelled")
        log.info("notification %s cancelled", notification_id)
        try:
            return self.get(notification_id) or {}
        except StoreUnavailable:  # cancelled all the same: say so
            return {"id": notification_id, "status": "cancelled"}

    def wait(self, notification_id: str, timeout: float) -> dict | None:
        """Its status document once it has ended, or after ``timeout`` seconds
        (sooner if the server is stopping, or the store fails meanwhile: the
        last one read, or None)."""
        deadline = time.monotonic() + timeout
        pause = 0.02
        document = None
        while True:
            try:
                document = self.get(notification_id)
            except StoreUnavailable:  # it exists: the caller answers 202 for it
                return document
            left = deadline - time.monotonic()
            if document is None or document["status"] in FINISHED or left <= 0:
                return document
            with self._lock:
                if self._stopping:
                    return document
                self._lock.wait(min(pause, left))  # woken by an end here
            pause = min(pause * 2, 0.25)

    def ages(self) -> dict:
        """How long since each subscription was last reached (or stored, if
        never): how many in each span of days, up to STALE_AFTER_DAYS and
        beyond (``GET /subscriptions/ages``). A count is a pass over every
        subscription (1.7 s at 100,000 on the JSON store), so one is
        answered for AGES_REUSE times as long as it took, however many
        consoles ask: at most a thirtieth of a core, and fresh when few."""
        with self._ages_lock:
            until, answer = self._ages
            if answer is None or time.monotonic() >= until:
                started = time.monotonic()
                answer = self._count_ages()
                took = time.monotonic() - started
                self._ages = (time.monotonic() + AGES_REUSE * took, answer)
            return answer

    def _count_ages(self) -> dict:
        stale_days = self.stale_after // DAY
        bounds = [days for days in AGE_BOUNDS if not stale_days or days < stale_days]
        bounds += [stale_days] if stale_days else []  # beyond it: stale
        counts = [0] * (len(bounds) + 1)
        never = unknown = 0
        now = time.time()
        for chunk in self.store.seen():
            for created, last in chunk:
                never += not last
                if not (last or created):  # stored before times were kept
                    unknown += 1
                    continue
                days = (now - (last or created)) / DAY
                counts[bisect.bisect_left(bounds, days)] += 1
        return {
            "stale_after_days": stale_days or None,
            "never_reached": never,
            "unknown": unknown,
            "ages": [
                {"up_to_days": days, "subscriptions": n}
                for days, n in zip([*bounds, None], counts)
            ],
        }

    def delivering(self) -> int:
        """How many processes said in the last WORKER_TIMEOUT seconds that they
        deliver: the workers, and the api.py processes that deliver."""
        return self.jobs.delivering(time.time() - self.lease)

    def send_now(
        self, record: dict, message: Message, timeout: float
    ) -> list[PushOutcome]:
        """One message to one subscriber ahead of every fan-out's messages to
        its push service (``POST /subscription/test``): its outcome within
        ``timeout`` seconds, applied to the store as a fan-out's are."""
        try:
            future = self.delivery.submit([record], message, first=True)
            outcomes = future.result(timeout)
        except (concurrent.futures.TimeoutError, DeliveryStopped) as e:
            reason = (
                f"no answer from the push service within {timeout:g} s"
                if isinstance(e, concurrent.futures.TimeoutError)
                else "the server is stopping"
            )
            outcomes = [
                PushOutcome(record["id"], record_origin(record), None, "failed", reason)
            ]
        apply_outcomes(self.store, outcomes, self.prune_after, self.max_per_day)
        return outcomes

    def stop(self, timeout: float) -> bool:
        """Take no more batches; what this process has not sent goes back to
        the job store (for the others, or for the next start); wait up to
        ``timeout`` seconds for the batches in flight to be recorded."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            sending = {batch.notification for batch in self._in_flight.values()}
        self._created.set()
        self.jobs.wake()
        for notification_id in sending:
            self.delivery.cancel(notification_id)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            return False
        if self._threads[1:]:  # it delivered: it leaves
            # Should the store fail now, it forgets this process in a day.
            with contextlib.suppress(OSError):
                self.jobs.leave(self.consumer)
        return True

    def close(self) -> None:
        """Close the job store (after :meth:`stop`)."""
        self.jobs.close()

    # -- the planner ----------------------------------------------------------------

    def _plan_loop(self) -> None:
        next_sweep = 0.0
        while not self._stopping:
            try:
                now = time.time()
                if now >= next_sweep:
                    next_sweep = now + 60
                    self._drop_old(now)
                claimed = self.jobs.claim_due(now, now + self.lease)
                if claimed is None:
                    self._created.wait(0.25)
                    self._created.clear()
                    continue
                self._plan(claimed)
            except Exception as e:  # noqa: BLE001 - _complain logs it
                self._complain("notification planner", e)

    def _plan(self, notification_id: str) -> None:
        """Start a claimed notification, or expire it; queue its batches."""
        record = self.jobs.load(notification_id)
        if record is None:
            return
        now = time.time()
        policy = record.get("policy") or {}
        late = now - record["due"] > record["message"]["ttl"] + EXPIRY_SLACK
        late = late and not policy.get("send_at_local")  # late for no one yet
        if late and record["status"] in ("scheduled", "queued"):
            if self.jobs.change(
                notification_id, "expired", ("scheduled", "queued"), now
            ):
                log.warning(
                    "notification %s expired: due %s, its TTL of %d s passed "
                    "before it could be sent",
                    notification_id,
                    rfc3339(record["due"]),
                    record["message"]["ttl"],
                )
                self._ended(notification_id)
            return
        audience = Audience.of(record)
        plan_max = self.store.sequence()
        named = None if audience.named is None else self._named(audience)
        total = self.subscribers(audience) if named is None else len(named)
        started = self.jobs.start(notification_id, now, total, plan_max)
        if started is None:
            return
        plan_max, cursor = started
        if record["status"] != "sending":
            log.info(
                "notification %s: sending to %d subscribers (%s)",
                notification_id,
                total,
                audience,
            )
            if total and not self.delivering():
                log.warning(
                    "notification %s waits: no process has said for %g s that it "
                    "delivers (API_DELIVERS=false and no python3 api.py --worker "
                    "running?)",
                    notification_id,
                    self.lease,
                )
        lane = PRIORITY_LANE if total <= PRIORITY_MAX else ""
        complete = self._plan_pages(
            notification_id, cursor, policy, audience, named, plan_max, lane
        )
        if complete and self.jobs.planned(notification_id, complete, time.time()) == 2:
            self._ended(notification_id)

    def _plan_pages(
        self,
        notification_id: str,
        cursor: str,
        policy: dict,
        audience: Audience,
        named: list[tuple[int, str, str]] | None,
        plan_max: int,
        lane: str,
    ) -> str | None:
        """Queue a notification's subscribers in batches from ``cursor``
        on: its whole plan, or as much as its policy allows now (a second's
        worth at its ``rate``; for a ``send_at_local``, those whose time has
        come), leasing it to whichever process plans the rest when it is due.
        The cursor of a complete plan, or None (the rest is for later, or it
        was cancelled, or another process plans it now)."""
        local = policy.get("send_at_local")
        per_second = (policy.get("rate") or 0) / 60
        place = PlanCursor.parse(cursor)
        now = time.time()
        if local and not place.hi:  # the first pass: all whose time has come
            place.hi = now
        budget = math.inf
        if per_second:
            if place.turn > now:  # handed over early: wait for its turn
                self.jobs.enqueue(notification_id, cursor, cursor, place.turn, [])
                return None
            if place.turn < now - 1:  # the first turn, or late (a restart): no burst
                place.turn = now
            budget = max(1, round(per_second))
        used = 0
        while True:
            if self._stopping:  # another process takes the plan over now
                self.jobs.hand_over(notification_id, time.time())
                return None
            if place.index > len(CHANNELS):
                if local and place.later < math.inf:  # the next zone's turn
                    after = PlanCursor(
                        1, 0, place.hi, place.later, math.inf, place.turn
                    )
                    self.jobs.enqueue(
                        notification_id, cursor, str(after), place.later, []
                    )
                    return None
                return cursor
            kind = CHANNELS[place.index - 1]
            page: list[tuple[int, str, str]] = []
            if self.delivery.sends_to(kind):
                size = int(min(self.batch_size * 4, budget - used))
                if named is None:
                    page = self.store.page(
                        kind, audience.topic, place.after, plan_max, size
                    )
                else:  # as the store pages a topic: in line, after last, to plan_max
                    page = [
                        p
                        for p in named
                        if origin_channel(p[2]) == kind
                        and place.after < p[0] <= plan_max
                    ][:size]
            after = dataclasses.replace(place)
            after.index, after.after = (
                (place.index, page[-1][0]) if page else (place.index + 1, 0)
            )
            if local:
                page, soonest = self._come(page, local, place.lo, place.hi)
                after.later = min(place.later, soonest)
            queued = self.jobs.enqueue(
                notification_id,
                cursor,
                str(after),
                time.time() + self.lease,
                self._batches(page, lane),
            )
            if queued is None:
                return None  # cancelled, or another process plans it now
            cursor, place = str(after), after
            used += queued  # not those a restart found sent already
            if used >= budget:  # the next second's worth, when it is due
                paced = dataclasses.replace(place, turn=place.turn + used / per_second)
                self.jobs.enqueue(notification_id, cursor, str(paced), paced.turn, [])
                return None

    def _come(
        self, page: list[tuple[int, str, str]], local: str, lo: float, hi: float
    ) -> tuple[list[tuple[int, str, str]], float]:
        """Those of ``page`` whose wall clock showed ``local`` in (lo, hi] (in
        their ``timezone``, or DEFAULT_TIMEZONE), and the soonest instant
        after ``hi`` of the others."""
        records = self.store.get_many([record_id for _, record_id, _ in page])
        come, soonest = [], math.inf
        for placed, record in zip(page, records):
            if record is None:  # unsubscribed since: in no pass
                continue
            zone = record.get("timezone") or self.default_zone
            if not known_timezone(zone):  # gone from this machine's database
                zone = self.default_zone
            instant = local_instant(local, zone)
            if lo < instant <= hi:
                come.append(placed)
            elif instant > hi:
                soonest = min(soonest, instant)
        return come, soonest

    def _named(self, audience: Audience) -> list[tuple[int, str, str]]:
        """The subscribers a notification to users or subscription ids goes
        to now, from the store's indexes, in line: (place, id, origin)."""
        named = list(audience.named or ())
        if audience.users is not None:
            found = self.store.of_users(named)
        else:
            found = self.store.placed(named)
        sends = [p for p in found if self.delivery.sends_to(origin_channel(p[2]))]
        return sorted(set(sends))

    def _batches(self, page: list[tuple[int, str, str]], lane: str) -> Plan:
        """A page of subscribers as batches that each share a push service (in
        ``lane``); a small list is shared among the delivery processes too."""
        by_origin: dict[str, list[str]] = {}
        for _, record_id, origin in page:
            by_origin.setdefault(lane + origin, []).append(record_id)
        batches = []
        for origin, ids in by_origin.items():
            size = min(self.batch_size, -(-len(ids) // self.delivery.processes))
            batches += [(origin, ids[i : i + size]) for i in range(0, len(ids), size)]
        return batches

    def _drop_old(self, now: float) -> None:
        """Forget notifications ended NOTIFICATION_RETENTION seconds ago (kept
        while their Idempotency-Key is, 24 hours). Any process may do it."""
        try:
            dropped = self.jobs.drop_ended(now, now - self.retention)
        except OSError as e:
            log.warning("cannot drop old notifications yet: %s", e)
            return
        if dropped:
            log.info("dropped %d notifications older than the retention", dropped)

    def _ended(self, notification_id: str) -> None:
        """A notification ended here: its line in the log; waiters wake."""
        with self._lock:
            self._lock.notify_all()
        document = self.get(notification_id)
        if document is not None:
            log_end(document)

    # -- the consumer -------------------------------------------------------------

    def _room(self, origin: str) -> int:
        return self.per_origin - self._out[origin]

    def _consume_loop(self) -> None:
        next_claim = 0.0
        while not self._stopping:
            try:
                batches: list[Batch] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + min(1.0, self.lease / 4)
                    batches = self.jobs.reclaim(self.consumer, self.lease, self._room)
                if not batches:
                    batches = self.jobs.take(self.consumer, self._room, TAKE_BLOCK)
            except Exception as e:  # noqa: BLE001 - _complain logs it
                self._complain("batch consumer", e)
                continue
            for batch in batches:  # each on its own: one failing strands none
                try:
                    self._start_batch(batch)
                except Exception as e:  # noqa: BLE001 - _complain logs it
                    self._complain(f"starting batch {batch.entry}", e, pause=0)
                    with contextlib.suppress(Exception):  # else reclaimed later
                        self._complete(batch, [], list(batch.ids), 0)

    def _start_batch(self, batch: Batch) -> None:
        ids = list(batch.ids)
        if self._stopping:  # taken as the process stops: back to the store now
            self._complete(batch, [], ids, 0)
            return
        status, message = self._message(batch.notification)
        if status != "sending" or message is None:  # cancelled, ended, dropped
            self._complete(batch, [], [], 0)
            return
        present = [r for r in self.store.get_many(ids) if r is not None]
        vanished = len(ids) - len(present)  # unsubscribed since the plan
        sendable, failed = self._policy(present, message, batch.notification)
        if not sendable:
            self._settle(failed)
            self._complete(batch, failed, [], vanished)
            return
        with self._lock:
            # With the check, one step: the recorder and keeper stop only once
            # nothing is in flight, so a batch started after would go unrecorded.
            stopping = self._stopping
            if not stopping:
                self._in_flight[batch.entry] = batch
                self._out[batch.origin] += 1
        if stopping:
            self._complete(batch, [], ids, 0)
            return
        try:
            first = batch.origin.startswith(PRIORITY_LANE)
            future = self.delivery.submit(
                sendable, message, batch.notification, first=first
            )
        except Exception:  # no delivery process could start: it goes back
            self._landed(batch)
            raise
        if batch.notification in self._cancelled:  # cancelled while it started
            self.delivery.cancel(batch.notification)
        sent_to = [r["id"] for r in sendable] + [o.record_id for o in failed]
        future.add_done_callback(
            functools.partial(self._batch_done, batch, sent_to, vanished, failed)
        )

    def _policy(
        self, records: list[dict], message: Message, notification_id: str
    ) -> tuple[list[dict], list[PushOutcome]]:
        """Of the subscribers a batch goes to, those to send to, and the
        outcomes of the others: stale (no success in STALE_AFTER_DAYS:
        removed), capped (MAX_PER_DAY reached, and the message is not of
        urgency high), or planned by a process with FCM settings, and this
        one has none (failed, visibly, rather than back to the store for ever)."""
        now = time.time()
        capping = self.max_per_day and message.urgency != "high"
        sendable: list[dict] = []
        settled: list[PushOutcome] = []
        for record in records:
            channel = record.get("kind", "webpush")
            seen = record.get("last_success") or record.get("created")
            if not self.delivery.sends_to(channel):
                verdict = ("failed", FCM_ELSEWHERE)
            elif self.stale_after and seen and seen < now - self.stale_after:
                verdict = ("removed", STALE)
            elif capping and self.max_per_day <= sum(
                t > now - DAY for t in record.get("recent", ())
            ):
                verdict = ("capped", CAPPED)
            else:
                sendable.append(record)
                continue
            outcome = (record["id"], record_origin(record), None, *verdict)
            settled.append(PushOutcome(*outcome, channel=channel))
        if any(o.reason == FCM_ELSEWHERE for o in settled):
            log.warning("notification %s: %s", notification_id, FCM_ELSEWHERE)
        return sendable, settled

    def _settle(
        self, settled: list[PushOutcome], delivered: list[PushOutcome] = ()
    ) -> None:
        """Apply a batch's outcomes, those ``_policy`` decided (a stale one is
        removed) with the ``delivered`` ones, and count the former as the
        delivery counts the latter (metrics), once: when their batch is
        recorded, not when it goes back to the store."""
        outcomes = [*settled, *delivered]
        apply_outcomes(self.store, outcomes, self.prune_after, self.max_per_day)
        if settled:
            for observe in self.delivery.observers:
                observe(settled)

    def _message(self, notification_id: str) -> tuple[str | None, Message | None]:
        """A notification's status (read at most once a second) and message
        (made once)."""
        if notification_id in self._cancelled:
            return "cancelled", None
        now = time.monotonic()
        cached = self._messages.get(notification_id)
        if cached and cached[0] > now:
            return cached[1], cached[2]
        record = self.jobs.load(notification_id)
        status = record and record["status"]
        message = cached[2] if cached else None
        if message is None and status == "sending":
            message = message_of(record, time.time())
        if len(self._messages) > 1000:
            for key in [k for k, v in list(self._messages.items()) if v[0] <= now]:
                self._messages.pop(key, None)
        self._messages[notification_id] = (now + 1, status, message)
        return status, message

    def _stop_sending(self, notification_id: str, status: str) -> None:
        """Send nothing more of a notification that ended (here or elsewhere)."""
        self._cancelled[notification_id] = time.monotonic()
        # Its next batches must not start from a cached "sending".
        self._messages[notification_id] = (time.monotonic() + 1, status, None)
        self.delivery.cancel(notification_id)

    # -- the recorder -------------------------------------------------------------

    def _batch_done(self, *completed: Any) -> None:
        with self._lock:
            self._completed.append(completed)
            self._lock.notify_all()

    def _landed(self, batch: Batch) -> None:
        with self._lock:
            self._in_flight.pop(batch.entry, None)
            full = self._out[batch.origin] >= self.per_origin
            self._out[batch.origin] -= 1
            if self._out[batch.origin] <= 0:
                del self._out[batch.origin]
            self._lock.notify_all()
        if full:  # the consumer may wait with every push service busy
            self.jobs.wake()

    def _record_loop(self) -> None:
        while True:
            with self._lock:
                while not self._completed:
                    if self._stopping and not self._in_flight:
                        return
                    self._lock.wait(0.5)
                completed = list(self._completed)
                self._completed.clear()
            for item in completed:
                batch = item[0]
                try:
                    if len(item) == 5:  # back from delivery: its outcomes, once
                        item = self._applied(*item)
                    self._complete(*item)
                except StoreUnavailable as e:
                    # Redis blinked: count it again, still in flight (the
                    # keeper keeps it ours), rather than have it sent twice.
                    self._complain(f"recording batch {batch.entry}", e)
                    with self._lock:
                        self._completed.append(item)
                    continue
                except Exception as e:  # noqa: BLE001 - _complain logs it
                    # A bug: left out; on Redis another process claims it later.
                    self._complain(f"recording batch {batch.entry}", e)
                self._landed(batch)

    def _applied(
        self,
        batch: Batch,
        ids: list[str],
        vanished: int,
        failed: list[PushOutcome],
        future: Any,
    ) -> tuple[Batch, list[PushOutcome], list[str], int]:
        """Apply a batch's outcomes (and ``failed``, those it could not send)
        to the store: what to count, and the subscribers it did not reach,
        who go back to be sent again."""
        try:
            outcomes: list[PushOutcome] = future.result()
        except DeliveryStopped:
            outcomes = []
        except Exception:  # a bug: the batch goes back, not lost
            log.exception("notification %s: a batch failed", batch.notification)
            outcomes = []
        reached = [o for o in outcomes if o.result != "unsent"]
        self._settle(failed, reached)
        reached = failed + reached
        done = {o.record_id for o in reached}
        return batch, reached, [i for i in ids if i not in done], vanished

    def _complete(
        self, batch: Batch, reached: list[PushOutcome], again: list[str], vanished: int
    ) -> None:
        tally = Tally.of(reached, again, vanished)
        if self.jobs.complete(batch, tally, time.time()) == 2:
            self._ended(batch.notification)

    # -- the keeper ---------------------------------------------------------------

    def _keep_loop(self) -> None:
        """Every second: tell the job store this process delivers and still
        works on its batches, stop sending those of notifications that ended
        elsewhere, and write what the disk refused before."""
        interval = min(1.0, self.lease / 3)
        next_turn = time.monotonic() + interval
        while True:
            with self._lock:
                # Woken by every batch's end: a turn a second all the same.
                while True:
                    if self._stopping and not self._in_flight:
                        return
                    left = next_turn - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                next_turn = time.monotonic() + interval
                batches = list(self._in_flight.values())
            try:
                if not self._stopping:
                    self.jobs.announce(self.consumer, time.time())
                self.jobs.flush()
                if batches:
                    self.jobs.keep(self.consumer, batches)
                    notifications = sorted({b.notification for b in batches})
                    statuses = self.jobs.status_of(notifications)
                    for notification_id, status in zip(notifications, statuses):
                        if (
                            status != "sending"
                            and notification_id not in self._cancelled
                        ):
                            self._stop_sending(notification_id, status)
                old = time.monotonic() - 60
                for notification_id, when in list(self._cancelled.items()):
                    if when < old:
                        self._cancelled.pop(notification_id, None)
            except Exception as e:  # noqa: BLE001 - _complain logs it
                # No pause: its turns are paced, and a late one lets batches
                # go to others (WORKER_TIMEOUT may be as short as a second).
                self._complain("batch keeper", e, pause=0)

    def _complain(self, what: str, error: Exception, pause: float = 1.0) -> None:
        """A background thread's error, logged at most every 10 s (Redis
        unreachable would otherwise log one line per turn); then a pause, so
        that the thread does not spin (a stop ends it)."""
        if time.monotonic() - self._complained > 10:
            self._complained = time.monotonic()
            if isinstance(error, OSError):
                log.error("%s: %s; retrying", what, error)
            else:
                log.error("%s; it carries on", what, exc_info=error)
        with self._lock:
            if not self._stopping and pause:
                self._lock.wait(pause)


###############################################################################
# Webhooks ####################################################################
###############################################################################

WebhookHandler = Callable[[dict], "dict | None"]
WEBHOOK_HANDLERS: dict[tuple[str, str], WebhookHandler] = {}


@dataclass(frozen=True)
class WebhookSource:
    """How one service signs its webhooks and names their events."""

    signature_header: (
        str  # "sha256=<hex HMAC-SHA256 of the raw body with WEBHOOK_SECRET>"
    )
    event_header: str | None  # None: every delivery is the event "notify"
    delivery_header: str  # a delivery id; a repeated one is sent once
    token_allowed: bool = False  # the push token may stand in for a signature


WEBHOOK_SOURCES = {
    "github": WebhookSource(
        "X-Hub-Signature-256", "X-GitHub-Event", "X-GitHub-Delivery"
    ),
    "generic": WebhookSource(
        "X-Signature-256", None, "X-Delivery-Id", token_allowed=True
    ),
}


def on_webhook(source: str, event: str) -> Callable[[WebhookHandler], WebhookHandler]:
    """Register a function that turns one event's payload into a notification:
    a dict of ``title``, ``body``, ``url``, ``topic`` (any POST /push fields),
    or None to send nothing."""

    def register(handler: WebhookHandler) -> WebhookHandler:
        WEBHOOK_HANDLERS[(source, event)] = handler
        return handler

    return register


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is ``sha256=`` and the HMAC-SHA256 of ``body``."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header[7:].strip().encode())


def _short(text: str | None, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


@on_webhook("generic", "notify")
def generic_notification(payload: dict) -> dict:
    """A generic webhook's body is POST /push's, all of it: a field POST /push
    does not know is refused as it would be there."""
    return dict(payload)


def _github(payload: dict, what: str, body: Any, url: Any) -> dict:
    """A GitHub event as a notification: "<owner/repo>: <what>"."""
    return {
        "title": f"{payload['repository']['full_name']}: {what}",
        "body": body,
        "url": url,
    }


@on_webhook("github", "push")
def github_push(payload: dict) -> dict | None:
    commits = payload.get("commits") or []
    if payload.get("deleted") or not commits:
        return None
    branch = payload.get("ref", "").removeprefix("refs/heads/")
    head = payload.get("head_commit") or commits[-1]
    who = (payload.get("pusher") or {}).get("name", "someone")
    count = f"{len(commits)} commit{'s' if len(commits) != 1 else ''}"
    body = f"{who}: {_short(head.get('message'))}"
    url = payload.get("compare") or head.get("url")
    return _github(payload, f"{count} pushed to {branch}", body, url)


@on_webhook("github", "pull_request")
def github_pull_request(payload: dict) -> dict | None:
    pr, action = payload["pull_request"], payload.get("action")
    if action == "closed":
        action = "merged" if pr.get("merged") else "closed"
    if action not in ("opened", "reopened", "ready_for_review", "merged", "closed"):
        return None
    what = f"pull request #{pr['number']} {action.replace('_', ' ')}"
    return _github(payload, what, _short(pr.get("title")), pr.get("html_url"))


@on_webhook("github", "issues")
def github_issue(payload: dict) -> dict | None:
    issue, action = payload["issue"], payload.get("action")
    if action not in ("opened", "reopened", "closed"):
        return None
    what = f"issue #{issue['number']} {action}"
    return _github(payload, what, _short(issue.get("title")), issue.get("html_url"))


@on_webhook("github", "release")
def github_release(payload: dict) -> dict | None:
    release = payload["release"]
    if payload.get("action") != "published":
        return None
    body = _short(release.get("name") or release.get("body"))
    what = f"release {release.get('tag_name')}"
    return _github(payload, what, body, release.get("html_url"))


@on_webhook("github", "workflow_run")
def github_failed_workflow(payload: dict) -> dict | None:
    run = payload["workflow_run"]
    if payload.get("action") != "completed" or run.get("conclusion") != "failure":
        return None
    body = f"on {run.get('head_branch')}: {_short(run.get('display_title'))}"
    what = f"{run.get('name', 'workflow')} failed"
    return _github(payload, what, body, run.get("html_url"))


###############################################################################
# Metrics #####################################################################
###############################################################################

ANSWER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_ORIGIN_LABELS = 20


class Metrics:
    """What ``/metrics`` gives, with prometheus_client, in a registry of this
    process: counters that delivery and the routes add to, and gauges read
    from the store and the queue at each scrape (the sources). Delivery
    processes hand every outcome, with its answer time, back to this
    process, so its counters count theirs; a ``--worker`` has its own (on
    METRICS_PORT)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self._prom = prom
        self.registry = prom.CollectorRegistry()
        by_service = ["channel", "origin"]
        self.messages = prom.Counter(
            "webpush_messages",
            "Messages by channel, push service origin and result (sent, failed, "
            "removed)",
            [*by_service, "result"],
            registry=self.registry,
        )
        self.retries = prom.Counter(
            "webpush_retries",
            "Tries of a message beyond its first (429, 5xx, no answer)",
            by_service,
            registry=self.registry,
        )
        self.answer_seconds = prom.Histogram(
            "webpush_push_service_seconds",
            "Push service answer time of each message's last try",
            by_service,
            buckets=ANSWER_BUCKETS,
            registry=self.registry,
        )
        self.requests = prom.Counter(
            "webpush_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.receipts = prom.Counter(
            "webpush_receipts",
            "Receipts counted (each subscriber's once), by event",
            ["event"],
            registry=self.registry,
        )
        for event in RECEIPT_EVENTS:
            self.receipts.labels(event)  # listed at 0 before the first
        self._sources: list[Callable[[], list]] = []
        self._origins: set[str] = set()
        self.registry.register(self)

    def observe(self, outcomes: list[PushOutcome]) -> None:
        """Count a batch's outcomes (those not sent are counted when they are)."""
        messages: collections.Counter[tuple] = collections.Counter()
        retries: collections.Counter[tuple] = collections.Counter()
        for o in outcomes:
            if o.result == "unsent":
                continue
            origin = self.origin_label(o.origin)
            messages[(o.channel, origin, o.result)] += 1
            retries[(o.channel, origin)] += o.tries - 1
            if o.seconds > 0:
                self.answer_seconds.labels(o.channel, origin).observe(o.seconds)
        for labels, count in messages.items():
            self.messages.labels(*labels).inc(count)
        for labels, count in retries.items():
            if count:
                self.retries.labels(*labels).inc(count)

    def origin_label(self, origin: str) -> str:
        """A push service origin as a label, from a bounded set: anyone may
        subscribe, and each *.notify.windows.com host would be a new series.
        A service of many hosts is one label; past MAX_ORIGIN_LABELS others,
        the rest are "other"."""
        host = urlsplit(origin).hostname or ""
        for domain in PUSH_SERVICE_DOMAINS:
            if host.endswith("." + domain):
                return f"https://*.{domain}"
        if origin in self._origins:
            return origin
        if len(self._origins) < MAX_ORIGIN_LABELS:
            self._origins.add(origin)
            return origin
        return "other"

    def gauge(self, name: str, help: str, label: str | None = None) -> Any:
        """A gauge family for a source to fill (``add_metric``)."""
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(name, help, labels=[label] if label else None)

    def add_source(self, source: Callable[[], list]) -> None:
        """A function giving metric families, called at each scrape."""
        self._sources.append(source)

    def describe(self) -> list:
        return []  # registered without being collected

    def collect(self) -> Any:
        for source in self._sources:
            try:
                yield from source()
            except OSError as e:  # Redis away: the counters still answer
                log.warning("metrics: %s", e)

    def exposition(self) -> bytes:
        return self._prom.generate_latest(self.registry)


###############################################################################
# HTTP ########################################################################
###############################################################################


def metrics_response(metrics: Metrics) -> bottle.HTTPResponse:
    """``GET /metrics``: the Prometheus text format (its route needs
    METRICS_TOKEN, or the push token: see AuthPlugin)."""
    return bottle.HTTPResponse(
        metrics.exposition(),
        status=200,
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


class MetricsPlugin:
    """Bottle plugin: counts every routed request by route, method and status."""

    name = "metrics"
    api = 2

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        counter = self.metrics.requests

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = callback(*args, **kwargs)
            except bottle.HTTPResponse as e:
                counter.labels(route.rule, route.method, e.status_code).inc()
                raise
            except Exception:
                counter.labels(route.rule, route.method, 500).inc()
                raise
            status = (
                result.status_code
                if isinstance(result, bottle.HTTPResponse)
                else bottle.response.status_code
            )
            counter.labels(route.rule, route.method, status).inc()
            return result

        return wrapper


TOPIC_RE = re.compile(r"[A-Za-z0-9_.\-]+")
FCM_TOKEN_RE = re.compile(r"[A-Za-z0-9_:.\-]{1,4096}")
COLLAPSE_KEY_RE = re.compile(r"[A-Za-z0-9_\-]{1,32}")
LANGUAGE_TAG_RE = re.compile(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*")
DIRECTIONS = ("auto", "ltr", "rtl")
MAX_TAG_LENGTH = 64
MAX_ACTIONS = 2
MAX_BADGE = 2**63 - 1  # the Push API's app badge range
IDEMPOTENCY_KEY_RE = re.compile(r"[!-~][ -~]{0,253}[!-~]|[!-~]")
NOTIFICATION_ID_RE = re.compile(r"[A-Za-z0-9_\-]{16}")
SUBSCRIPTION_ID_RE = re.compile(r"[A-Za-z0-9_\-]{22}")  # see subscription_id()
MAX_PREFER_WAIT = 60
# A Host (or X-Forwarded-Host): a name or an IPv6 literal in brackets, and a port.
HOST_RE = re.compile(
    r"([A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\.?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
)
TEST_WAIT = 10.0  # seconds POST /subscription/test waits for its push service
DEMO_TOKEN_TTL = 86400  # seconds a demo sign-in's user token lasts
TEST_NOTIFICATION = {  # what POST /subscription/test sends
    "title": "Test notification",
    "body": "Push works for this browser.",
    "url": "/",
    "data": {"test": True},
    "urgency": "high",
}
MAX_TTL = 28 * 86400
STATIC_DIR = HERE / "static"
# Headers of a static file, by its path under static/, whatever route reaches
# it. The console holds the push token: never in another site's frame, and
# its address never sent on as a Referer.
STATIC_HEADERS = {
    "admin.html": {
        "Content-Security-Policy": "frame-ancestors 'none'",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    },
}

# The fields of each request body; any other is refused (_only_known), as a
# misspelled one ignored would change the request's meaning ("topics" in a
# push: sent to everyone). POST /push's are PUSH_FIELDS; ``data`` stays free.
PUSH_SUBSCRIPTION_FIELDS = ("endpoint", "expirationTime", "keys")  # its toJSON()
SUBSCRIPTION_KEYS = ("p256dh", "auth")
SUBSCRIPTION_TOKEN_FIELDS = ("subscription_token", "topics")  # the blog's wrapper
USER_FIELDS = ("user", "user_token")  # a subscription's binding to a user
FCM_TOKEN_FIELDS = ("fcm_token", "topics", "timezone", "replaces", *USER_FIELDS)
# An endpoint or a token; the rest of a PushSubscription may come with it.
UNSUBSCRIBE_FIELDS = ("endpoint", "fcm_token", "expirationTime", "keys")
ACTION_FIELDS = ("action", "title", "url", "icon")
RECEIPT_FIELDS = ("event", "receipt")


class ApiError(Exception):
    """An answer other than success: status and a message that says how to fix it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(raw: bytes) -> dict:
    """A JSON object, or ApiError (400)."""
    body = strict_json(raw, "the body")
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


# The deepest nesting a body may have. json.loads recurses once per level,
# and a body nested near Python's recursion limit leaves no stack for anything
# the collector finalizes meanwhile (its errors surface as "Exception ignored"),
# so depth is bounded before parsing; real bodies and webhooks nest under 20.
MAX_JSON_DEPTH = 100
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests arrays and objects deeper than ``limit`` (brackets
    inside strings do not count). Two counts suffice for almost every body."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    steps = (1 if c in "[{" else -1 for c in brackets)
    return max(itertools.accumulate(steps), default=0) > limit


def strict_json(raw: bytes | str, what: str) -> Any:
    """JSON that can be stored and sent on as it is, or ApiError (400): UTF-8,
    no NaN or Infinity (nor a number too large for a float), no lone surrogate
    escapes, nesting at most MAX_JSON_DEPTH deep."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if json_depth_exceeds(text):
            raise ValueError("nested too deeply")
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float
        )
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ApiError(
            400,
            f"{what} is not valid JSON (UTF-8, finite numbers, no lone surrogates, "
            f"nested at most {MAX_JSON_DEPTH} deep); "
            "send Content-Type: application/json",
        ) from None
    return value


def _only_known(body: dict, known: tuple[str, ...], where: str = "") -> None:
    """ApiError (400) naming the first field of ``body`` not in ``known``, with
    the known one it is closest to, if any (``where``: the path of ``body``)."""
    for name in body:
        if name not in known:
            prefix = f"{where}." if where else ""
            cut = name if len(name) <= 64 else name[:63] + "…"
            shown = json.dumps(prefix + cut, ensure_ascii=False)
            close = difflib.get_close_matches(name, known, n=1)
            hint = (
                f"did you mean {json.dumps(prefix + close[0])}?"
                if close
                else f"the known fields are {', '.join(known)}"
            )
            raise ApiError(400, f"unknown field {shown}; {hint}")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large")
    return number


def subscription_id(endpoint: str) -> str:
    """A stable id: the same endpoint always maps to the same record."""
    return b64url_encode(hashlib.sha256(endpoint.encode("utf-8")).digest()[:16])


def endpoint_id(endpoint: str) -> str:
    """The record id of an endpoint as a client spells it: its canonical form's."""
    return subscription_id(canonical_endpoint(endpoint) or endpoint)


class Validator:
    """Turns request bodies into clean values, or raises ApiError(400)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pattern = (
            re.compile(settings.push_endpoint_pattern)
            if settings.push_endpoint_pattern
            else None
        )

    def fcm_token(self, body: dict) -> dict:
        """A stored-record dict from ``{"fcm_token": ..., "topics": [...]}``."""
        _only_known(body, FCM_TOKEN_FIELDS)
        if not self.settings.fcm_service_account:
            raise ApiError(
                400,
                "FCM is not configured on this server: set FCM_SERVICE_ACCOUNT to the "
                "Firebase service-account JSON file (Firebase console, Project settings, "
                "Service accounts, Generate new private key) and restart",
            )
        token = body["fcm_token"]
        if not isinstance(token, str) or not FCM_TOKEN_RE.fullmatch(token):
            raise ApiError(
                400, "'fcm_token' must be the device's FCM registration token"
            )
        return {
            "id": subscription_id("fcm:" + token),
            "kind": "fcm",
            "fcm_token": token,
            "topics": self.topics(body.get("topics")),
        }

    def subscription(self, body: dict, also: tuple[str, ...] = ()) -> dict:
        """A stored-record dict from a PushSubscription body (or the blog's
        ``{"subscription_token": ...}`` form); ``also``: the fields the route
        takes besides the subscription's."""
        sub, where = body, ""
        if "subscription_token" in body:
            _only_known(body, (*SUBSCRIPTION_TOKEN_FIELDS, *also))
            sub, where = body["subscription_token"], "subscription_token."
            if isinstance(sub, str):
                sub = strict_json(sub, "subscription_token")
        else:
            fields = (*PUSH_SUBSCRIPTION_FIELDS, "topics", *also, "subscription_token")
            _only_known(body, fields)
        if not isinstance(sub, dict):
            raise ApiError(
                400,
                "the subscription must be a JSON object, as PushSubscription.toJSON() gives it",
            )
        if sub is not body:
            _only_known(
                sub, (*PUSH_SUBSCRIPTION_FIELDS, "topics"), "subscription_token"
            )
        if isinstance(sub.get("keys"), dict):
            _only_known(sub["keys"], SUBSCRIPTION_KEYS, where + "keys")
        endpoint = sub.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise ApiError(
                400, "missing 'endpoint': send the browser's PushSubscription.toJSON()"
            )
        if len(endpoint) > MAX_ENDPOINT_LENGTH:
            raise ApiError(
                400, f"'endpoint' is longer than {MAX_ENDPOINT_LENGTH} characters"
            )
        endpoint = canonical_endpoint(endpoint)
        if endpoint is None:
            raise ApiError(
                400,
                "'endpoint' must be an http or https URL in printable ASCII, as push "
                "services give it (no spaces, userinfo, '\\' or '#')",
            )
        if not endpoint_allowed(endpoint, self.pattern):
            raise ApiError(
                400,
                "'endpoint' is not a known push service (https on the default port at "
                "fcm.googleapis.com, *.push.services.mozilla.com, web.push.apple.com or "
                "*.notify.windows.com); set PUSH_ENDPOINT_PATTERN for another one",
            )
        keys = sub.get("keys")
        if not isinstance(keys, dict):
            raise ApiError(400, "missing 'keys': an object with 'p256dh' and 'auth'")
        p256dh = self._key(keys, "p256dh", 65)
        if p256dh[0] != 4:
            raise ApiError(
                400,
                "'keys.p256dh' is not an uncompressed P-256 point (it must start with 0x04)",
            )
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
        except ValueError:
            raise ApiError(
                400, "'keys.p256dh' is not a point on the P-256 curve"
            ) from None
        auth = self._key(keys, "auth", 16)
        expiration = sub.get("expirationTime")
        if expiration is not None and (
            isinstance(expiration, bool) or not isinstance(expiration, (int, float))
        ):
            raise ApiError(
                400, "'expirationTime' must be null or a number (milliseconds)"
            )
        if expiration is not None and expiration <= time.time() * 1000:
            raise ApiError(
                400,
                "'expirationTime' has passed: the browser says this subscription no "
                "longer works; subscribe again for a new one",
            )
        return {
            "id": subscription_id(endpoint),
            "endpoint": endpoint,
            "keys": {"p256dh": b64url_encode(p256dh), "auth": b64url_encode(auth)},
            "expirationTime": expiration,
            "topics": self.topics(body.get("topics", sub.get("topics"))),
        }

    def unsubscribe(self, body: dict) -> str:
        """The record id a DELETE /subscription body names: its endpoint's, or
        its FCM token's."""
        _only_known(body, UNSUBSCRIBE_FIELDS)
        endpoint, token = body.get("endpoint"), body.get("fcm_token")
        if isinstance(endpoint, str) and endpoint:
            return endpoint_id(endpoint)
        if isinstance(token, str) and token:
            return subscription_id("fcm:" + token)
        raise ApiError(
            400,
            'send {"endpoint": "..."} of the subscription to delete, '
            'or {"fcm_token": "..."} of the device',
        )

    def replaces(self, body: dict) -> tuple[str, str | None]:
        """The record id of what a rotated subscription replaces, and the
        ``auth`` secret the post gives of it, if any: the old endpoint (or
        the old subscription's toJSON()) of a web push one
        (pushsubscriptionchange), the old token of an FCM one (a refreshed
        token, which proves itself). Never a record of the other kind."""
        old = body["replaces"]
        if "fcm_token" in body:
            if not isinstance(old, str) or not FCM_TOKEN_RE.fullmatch(old):
                raise ApiError(400, "'replaces' must be the device's old FCM token")
            return subscription_id("fcm:" + old), old
        auth = None
        if isinstance(old, dict):
            _only_known(old, PUSH_SUBSCRIPTION_FIELDS, "replaces")
            keys = old.get("keys")
            if isinstance(keys, dict):
                _only_known(keys, SUBSCRIPTION_KEYS, "replaces.keys")
                auth = keys.get("auth")
            old = old.get("endpoint")
        if not isinstance(old, str) or not 0 < len(old) <= MAX_ENDPOINT_LENGTH:
            raise ApiError(
                400,
                "'replaces' must be the endpoint of the old subscription (or its "
                "toJSON())",
            )
        if auth is not None and not isinstance(auth, str):
            raise ApiError(400, "'replaces.keys.auth' must be a base64url string")
        return endpoint_id(old), auth

    def _key(self, keys: dict, name: str, size: int) -> bytes:
        value = keys.get(name)
        if not isinstance(value, str):
            raise ApiError(400, f"missing 'keys.{name}': a base64url string")
        try:
            raw = b64url_decode(value)
        except ValueError:
            raise ApiError(400, f"'keys.{name}' is not base64url") from None
        if len(raw) != size:
            raise ApiError(
                400, f"'keys.{name}' must decode to {size} bytes, not {len(raw)}"
            )
        return raw

    def topics(self, value: Any) -> list[str] | None:
        """Clean topic names; None when none were given."""
        if value is None:
            return None
        if not isinstance(value, list):
            raise ApiError(400, "'topics' must be a list of names")
        if len(value) > self.settings.max_topics:
            raise ApiError(
                400, f"'topics' may name at most {self.settings.max_topics} topics"
            )
        for topic in value:
            self.topic(topic, "topics")
        return sorted(set(value))

    def topic(self, value: Any, where: str = "topic") -> str:
        longest = self.settings.max_topic_length
        if (
            not isinstance(value, str)
            or not TOPIC_RE.fullmatch(value)
            or len(value) > longest
        ):
            raise ApiError(
                400,
                f"'{where}' names must be 1-{longest} letters, digits, '.', '_' or '-' "
                "(MAX_TOPIC_LENGTH)",
            )
        return value

    def push(self, body: dict, base: str = "") -> tuple[Message, Audience]:
        """The message and audience of a POST /push body; ``base`` is what a
        relative ``url`` is made absolute against (PUBLIC_URL, or the
        request's origin) for a declarative message's ``navigate``."""
        _only_known(body, PUSH_FIELDS)
        text = {}
        for name in ("title", "body", "icon", "url", "message", "image", "tag"):
            value = body.get(name)
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"'{name}' must be a string")
            text[name] = value
        if text["body"] is None:
            text["body"] = text["message"]
        if not text["title"] and not text["body"]:
            raise ApiError(
                400,
                "nothing to send: give a 'title' or a 'body' (or the legacy 'message')",
            )
        payload_format = body.get("format", self.settings.payload_format)
        if payload_format not in PAYLOAD_FORMATS:
            raise ApiError(400, f"'format' must be one of {', '.join(PAYLOAD_FORMATS)}")
        notification = {
            "title": text["title"] or "Notification",
            "body": text["body"] or "",
            "icon": text["icon"],
            "url": text["url"],
            "data": body.get("data"),
            "navigate": self._absolute(text["url"] or "/", base, "url"),
            **self._display(body, text, base),
        }
        payload, _ = render_payload(notification, payload_format, "x" * 16)
        size = len(payload) + RECEIPT_LENGTH  # as sent: with its id and receipt
        if size > MAX_PLAINTEXT:
            raise ApiError(
                413,
                f"the notification is {size} bytes as sent ({payload_format} JSON "
                f"with its id and receipt), {size - MAX_PLAINTEXT} over the "
                f"{MAX_PLAINTEXT}-byte limit of an encrypted push message; shorten it",
            )
        payload, _ = render_payload(notification, payload_format)
        ttl = body.get("ttl", self.settings.default_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL:
            raise ApiError(400, f"'ttl' must be whole seconds from 0 to {MAX_TTL}")
        urgency = body.get("urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise ApiError(400, f"'urgency' must be one of {', '.join(URGENCIES)}")
        collapse_key = body.get("collapse_key")
        if collapse_key is not None and (
            not isinstance(collapse_key, str)
            or not COLLAPSE_KEY_RE.fullmatch(collapse_key)
        ):
            raise ApiError(
                400,
                "'collapse_key' must be 1-32 base64url characters (A-Z a-z 0-9 - _)",
            )
        message = Message(
            notification, payload, ttl, urgency, collapse_key, format=payload_format
        )
        return message, self.audience(body)

    def audience(self, body: dict) -> Audience:
        """Who a push goes to: at most one of ``topic``, ``users`` (user ids)
        and ``subscriptions`` (ids POST /subscription gave); none (or null)
        is everyone."""
        given = [
            n for n in ("topic", "users", "subscriptions") if body.get(n) is not None
        ]
        if len(given) > 1:
            raise ApiError(
                400,
                f"give one of 'topic', 'users' and 'subscriptions', not "
                f"{' and '.join(repr(n) for n in given)}; none sends to everyone",
            )
        if given == ["topic"]:
            return Audience(topic=self.topic(body["topic"]))
        if given == ["users"]:
            return Audience(users=self._named(body["users"], "users", self.user))
        if given == ["subscriptions"]:
            return Audience(
                subscriptions=self._named(
                    body["subscriptions"], "subscriptions", self.subscription_ref
                )
            )
        return Audience()

    def _named(self, value: Any, name: str, check: Callable) -> tuple[str, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_NAMED:
            raise ApiError(400, f"'{name}' must be a list of 1 to {MAX_NAMED:,} ids")
        for item in value:
            check(item, name)
        return tuple(dict.fromkeys(value))

    def api_key(self, body: dict) -> tuple[str, str, list[str] | None, int | None]:
        """The name, scope, topics and lifetime (seconds; None: for good) of
        a ``POST /keys`` body."""
        _only_known(body, ("name", "scope", "topics", "expires_in"))
        name, scope = body.get("name"), body.get("scope")
        if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
            raise ApiError(
                400,
                "'name' is needed: 1-64 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit",
            )
        if name == ADMIN:
            raise ApiError(409, "'admin' is the push token's name; choose another")
        if scope not in KEY_SCOPES:
            raise ApiError(400, f"'scope' must be one of: {', '.join(KEY_SCOPES)}")
        topics = self.topics(body.get("topics"))
        if topics is not None and scope != "send":
            raise ApiError(400, "'topics' narrows a key of the scope 'send' only")
        if topics == []:
            raise ApiError(400, "'topics' names at least one topic, or is left out")
        expires_in = body.get("expires_in")
        if expires_in is not None and (
            not isinstance(expires_in, int)
            or isinstance(expires_in, bool)
            or not 1 <= expires_in <= MAX_KEY_LIFETIME
        ):
            raise ApiError(
                400,
                f"'expires_in' must be a whole number of seconds from 1 to "
                f"{MAX_KEY_LIFETIME} (ten years), or left out for a key that "
                "does not expire",
            )
        return name, scope, topics, expires_in

    def user(self, value: Any, where: str = "user") -> str:
        """A user id: 1-128 printable characters."""
        if (
            not isinstance(value, str)
            or not 1 <= len(value) <= MAX_USER_LENGTH
            or not value.isprintable()
        ):
            raise ApiError(
                400,
                f"'{where}' ids must be 1-{MAX_USER_LENGTH} printable characters "
                "(the site's own id of the user)",
            )
        return value

    def subscription_ref(self, value: Any, where: str = "subscriptions") -> str:
        """A subscription id, as POST /subscription returned it."""
        if not isinstance(value, str) or not SUBSCRIPTION_ID_RE.fullmatch(value):
            raise ApiError(
                400,
                f"'{where}' ids must be the 22-character ids POST /subscription "
                "returned",
            )
        return value

    def _display(self, body: dict, text: dict, base: str) -> dict:
        """The optional display fields of a push, checked; only those given."""
        shown: dict[str, Any] = {}
        if text["tag"] is not None:
            if not 1 <= len(text["tag"]) <= MAX_TAG_LENGTH:
                raise ApiError(400, f"'tag' must be 1-{MAX_TAG_LENGTH} characters")
            shown["tag"] = text["tag"]
        if text["image"] is not None:
            shown["image"] = text["image"]
        badge = body.get("badge")
        if badge is not None:
            if (
                isinstance(badge, bool)
                or not isinstance(badge, int)
                or not (0 <= badge <= MAX_BADGE)
            ):
                raise ApiError(400, "'badge' must be a whole number from 0 (none) up")
            shown["badge"] = badge
        for name in ("silent", "require_interaction", "mutable"):
            if body.get(name) is not None:
                if not isinstance(body[name], bool):
                    raise ApiError(400, f"'{name}' must be true or false")
                shown[name] = body[name]
        lang = body.get("lang")
        if lang is not None:
            if not isinstance(lang, str) or not LANGUAGE_TAG_RE.fullmatch(lang):
                raise ApiError(
                    400, "'lang' must be a language tag (BCP 47) such as en or pt-BR"
                )
            shown["lang"] = lang
        direction = body.get("dir")
        if direction is not None:
            if direction not in DIRECTIONS:
                raise ApiError(400, f"'dir' must be one of {', '.join(DIRECTIONS)}")
            shown["dir"] = direction
        actions = body.get("actions")
        if actions is not None:
            shown["actions"] = self._actions(actions, base)
        return shown

    def _actions(self, actions: Any, base: str) -> list[dict]:
        if not isinstance(actions, list) or len(actions) > MAX_ACTIONS:
            raise ApiError(
                400, f"'actions' must be a list of at most {MAX_ACTIONS} actions"
            )
        checked = []
        for n, action in enumerate(actions):
            where = f"actions[{n}]"
            if not isinstance(action, dict):
                raise ApiError(
                    400, f"'{where}' must be an object with 'action' and 'title'"
                )
            _only_known(action, ACTION_FIELDS, where)
            name, title = action.get("action"), action.get("title")
            if not isinstance(name, str) or not 1 <= len(name) <= MAX_TAG_LENGTH:
                raise ApiError(
                    400,
                    f"'{where}.action' must be a name of 1-{MAX_TAG_LENGTH} characters",
                )
            if not isinstance(title, str) or not title:
                raise ApiError(400, f"'{where}.title' must be the text of its button")
            entry = {"action": name, "title": title}
            for field_name in ("url", "icon"):
                value = action.get(field_name)
                if value is not None and not isinstance(value, str):
                    raise ApiError(400, f"'{where}.{field_name}' must be a string")
                if value:
                    entry[field_name] = value
            if entry.get("url"):
                entry["navigate"] = self._absolute(entry["url"], base, f"{where}.url")
            checked.append(entry)
        if len({a["action"] for a in checked}) < len(checked):
            raise ApiError(400, "'actions' must have different 'action' names")
        return checked

    @staticmethod
    def _absolute(url: str, base: str, where: str) -> str:
        """``url`` made absolute against ``base``: an http(s) URL, or ApiError."""
        try:
            absolute = urllib.parse.urljoin(base, url) if base else url
            parts = urlsplit(absolute)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:  # "http://[::1", "https://[x]y"
            raise ApiError(
                400,
                f"'{where}' is not a URL ({e}); a host in brackets must be an "
                "IPv6 address, and a port a number",
            ) from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ApiError(
                400,
                f"'{where}' must be an http(s) URL, or a path on the site "
                "(PUBLIC_URL, or this server's address)",
            )
        return absolute

    def send_at(self, body: dict) -> float | None:
        """When a POST /push body schedules it (``send_at`` or ``delay``), or None."""
        send_at, delay = body.get("send_at"), body.get("delay")
        if send_at is not None and delay is not None:
            raise ApiError(400, "give 'send_at' or 'delay', not both")
        now = time.time()
        if send_at is not None:
            when = parse_rfc3339(send_at) if isinstance(send_at, str) else None
            if when is None:
                raise ApiError(
                    400,
                    "'send_at' must be an RFC 3339 date-time with an offset, "
                    "like 2026-12-01T09:00:00Z or 2026-12-01T10:00:00+01:00",
                )
        elif delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                raise ApiError(400, "'delay' must be a number of seconds")
            if delay < 0:
                raise ApiError(400, "'delay' must not be negative")
            when = now + min(delay, MAX_SCHEDULE_AHEAD + 1)
        else:
            return None
        when = max(when, now)  # a time already past: now (and no year 0 to show)
        if when - now > MAX_SCHEDULE_AHEAD:
            raise ApiError(
                400,
                f"a notification can be scheduled at most {MAX_SCHEDULE_AHEAD // 86400} "
                "days ahead",
            )
        return when

    def policy(self, body: dict) -> dict:
        """A POST /push body's delivery policy: its ``rate`` (messages per
        minute, capped by MAX_RATE, which is also the rate of those that give
        none) and ``send_at_local`` (a wall-clock time, no offset)."""
        rate = body.get("rate")
        if rate is not None and (
            isinstance(rate, bool)
            or not isinstance(rate, int)
            or not MIN_RATE <= rate <= MAX_RATE_ALLOWED
        ):
            raise ApiError(
                400,
                f"'rate' must be whole messages per minute from {MIN_RATE} to "
                f"{MAX_RATE_ALLOWED:,}",
            )
        if self.settings.max_rate:
            rate = min(rate or self.settings.max_rate, self.settings.max_rate)
        local = body.get("send_at_local")
        if local is not None:
            given = [n for n in ("send_at", "delay") if body.get(n) is not None]
            if given:
                raise ApiError(400, f"give 'send_at_local' or '{given[0]}', not both")
            try:
                if not isinstance(local, str) or not LOCAL_TIME_RE.fullmatch(local):
                    raise ValueError
                earliest = earliest_instant(local)
            except (ValueError, OverflowError):
                raise ApiError(
                    400,
                    "'send_at_local' must be a date and time without an offset, "
                    "like 2026-12-24T09:00: each subscriber gets it when their own "
                    "clock shows it",
                ) from None
            if earliest - time.time() > MAX_SCHEDULE_AHEAD:
                raise ApiError(
                    400,
                    f"'send_at_local' may be at most {MAX_SCHEDULE_AHEAD // DAY} "
                    "days ahead",
                )
        return {"rate": rate, "send_at_local": local}

    def timezone(self, value: Any) -> str:
        """A subscription's time zone: an IANA name zoneinfo knows."""
        if not isinstance(value, str) or not known_timezone(value):
            raise ApiError(
                400,
                "'timezone' must be an IANA time zone name, like Europe/Paris (what "
                "Intl.DateTimeFormat().resolvedOptions().timeZone gives)",
            )
        return value

    def receipt(self, body: dict) -> tuple[str, str]:
        """The event and receipt of a POST /notifications/<id>/events body."""
        _only_known(body, RECEIPT_FIELDS)
        event = body.get("event")
        if event not in RECEIPT_EVENTS:
            raise ApiError(400, f"'event' must be one of {', '.join(RECEIPT_EVENTS)}")
        if not isinstance(body.get("receipt"), str):
            raise ApiError(400, "'receipt' must be the string the message carried")
        return event, body["receipt"]

    def idempotency_key(self, header: str | None) -> str | None:
        if header is None:
            return None
        if not IDEMPOTENCY_KEY_RE.fullmatch(header):
            raise ApiError(
                400, "'Idempotency-Key' must be 1-255 printable ASCII characters"
            )
        return header


class JsonApiPlugin:
    """Bottle plugin for API routes: ApiError and crashes become JSON errors,
    dicts become JSON (Bottle already does that), and the body is read with a
    size limit."""

    name = "json_api"
    api = 2

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        if not route.config.get("api"):
            return callback

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except ApiError as e:
                bottle.response.status = e.status
                return {"error": e.message}
            except bottle.HTTPResponse:
                raise
            except OSError as e:
                log.error(
                    "storage error in %s %s: %s",
                    bottle.request.method,
                    logged_path(bottle.request.path),
                    e,
                )
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    bottle.response.status = 507
                    full = (
                        "Redis is out of memory (maxmemory)"
                        if isinstance(e, StoreUnavailable)
                        else "the server's disk is full"
                    )
                    return {
                        "error": f"{full}: nothing was stored; try again once "
                        "space is freed"
                    }
                bottle.response.status = 503
                if isinstance(e, StoreUnavailable):
                    return {
                        "error": "Redis cannot be reached or refused the request, "
                        "so nothing was stored or changed; see the server log"
                    }
                return {
                    "error": "the subscription store cannot be written, so nothing "
                    "was stored; see the server log"
                }
            except Exception:
                log.exception(
                    "error in %s %s",
                    bottle.request.method,
                    logged_path(bottle.request.path),
                )
                bottle.response.status = 500
                return {"error": "internal error; see the server log"}

        return wrapper


def key_document(record: dict, now: float) -> dict:
    """What ``GET /keys`` says of a key: never the key, nor its hash."""
    expires = record.get("expires")
    return {
        "name": record["name"],
        "scope": record["scope"],
        "topics": record.get("topics"),
        "created": rfc3339(record["created"]),
        "last_used": rfc3339(record.get("last_used")),
        "expires": rfc3339(expires),
        "expired": expires is not None and expires <= now,
    }


class KeyRing:
    """Who a bearer token is: the push token (the admin key), METRICS_TOKEN
    (``GET /metrics`` only), or an API key found by its hash; and the keys'
    life, made, listed and revoked. A key's use is noted at most once a
    minute per process."""

    def __init__(
        self, push_token: str, metrics_token: str = "", store: KeyStore | None = None
    ):
        self.push_token = push_token
        self.metrics_token = metrics_token
        self.store = store
        self.clock = time.time  # what expiry is judged by
        self._touched: dict[str, float] = {}

    def identify(self, given: str) -> Caller | None:
        """The caller ``given`` (a bearer token) is, or None."""
        if not given:
            return None
        if self.push_token and _same_text(given, self.push_token):
            return Caller(ADMIN, "admin")
        if self.metrics_token and _same_text(given, self.metrics_token):
            return Caller("METRICS_TOKEN", "metrics")
        if (
            self.store is None
            or not given.startswith(API_KEY_PREFIX)
            or len(given) > MAX_API_KEY
        ):
            return None
        record = self.store.find(api_key_hash(given))
        now = self.clock()
        if record is None or record["expires"] is not None and record["expires"] <= now:
            return None
        name = record["name"]
        if now - self._touched.get(name, 0.0) >= KEY_TOUCH_STEP:
            self._touched[name] = now
            try:
                self.store.touch(name, now)
            except OSError as e:  # the key still works; its last use is older
                log.warning("could not note the use of API key %r: %s", name, e)
        topics = record.get("topics")
        return Caller(
            name, record["scope"], topics and tuple(topics), record.get("id", "")
        )

    def create(
        self, name: str, scope: str, topics: list[str] | None, expires_in: int | None
    ) -> tuple[str, dict]:
        """A new key and its record (ApiError 409 if the name is taken)."""
        key, now = new_api_key(), self.clock()
        record = {
            "name": name,
            "id": secrets.token_urlsafe(9),  # never reused, as a name may be
            "hash": api_key_hash(key),
            "scope": scope,
            "topics": topics,
            "created": now,
            "expires": None if expires_in is None else now + expires_in,
            "last_used": None,
        }
        try:
            added = self.store.add(record)
        except ValueError:
            raise ApiError(
                409, f"there are {MAX_API_KEYS} keys already: revoke one first"
            ) from None
        if not added:
            raise ApiError(
                409,
                f"a key named {name!r} exists: revoke it first, or choose another name",
            )
        log.info("made API key %r (scope %s)", name, scope)
        return key, record


def _rule() -> str:
    """This request's route as README names it: ``/users/<id>``."""
    return re.sub(r"<(\w+):\w+>", r"<\1>", bottle.request.route.rule)


def _same_text(given: str, secret: str) -> bool:
    """Whether ``given`` is ``secret``, in constant time."""
    return hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8"))


class AuthPlugin:
    """Bottle plugin: a route marked ``auth=<need>`` needs a bearer token
    whose scope grants that need (SCOPE_GRANTS): none, or an unknown,
    revoked or expired one, is a 401 that says how to send one; a known key
    outside its scope is a 403 that names its scope."""

    name = "auth"
    api = 2

    def __init__(self, ring: KeyRing):
        self.ring = ring

    def caller(self) -> Caller | None:
        """Who made this request, by its bearer token (None: nobody known)."""
        environ = bottle.request.environ
        if "webpush.caller" not in environ:
            scheme, _, given = request_header("Authorization", "").partition(" ")
            bearer = scheme.lower() == "bearer"
            environ["webpush.caller"] = (
                self.ring.identify(given.strip()) if bearer else None
            )
        return environ["webpush.caller"]

    def check(self, need: str) -> Caller:
        """This request's caller, if it may do what ``need`` names; else
        ApiError 401 or 403."""
        caller = self.caller()
        method, path = bottle.request.method, logged_path(bottle.request.path)
        if caller is None:
            bottle.response.set_header("WWW-Authenticate", 'Bearer realm="push"')
            log.warning(
                "refused %s %s from %s: wrong or missing token",
                method,
                path,
                bottle.request.remote_addr,
            )
            which = "the push token or an API key"
            if need == "metrics":
                which = "METRICS_TOKEN, the push token or a read key"
            raise ApiError(
                401,
                f"send {which} as 'Authorization: Bearer <key>'; "
                "this one is missing, unknown, revoked or expired",
            )
        if not caller.may(need):
            log.warning(
                "refused %s %s to key %r: outside its scope", method, path, caller.name
            )
            able = [scope for scope in KEY_SCOPES if need in SCOPE_GRANTS[scope]]
            raise ApiError(
                403,
                f"the key {caller.name!r} has the scope {caller.scope!r}, which may "
                f"not {method} {_rule()}: that needs "
                f"the scope {' or '.join(repr(s) for s in able)}",
            )
        return caller

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        need = route.config.get("auth")
        if not need:
            return callback

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.check(need)
            return callback(*args, **kwargs)

        return wrapper


def client_address(environ: dict, trusted_proxies: frozenset[str]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy,
    the nearest untrusted address in X-Forwarded-For (clients can forge the rest)."""
    address = environ.get("REMOTE_ADDR") or "?"
    if address not in trusted_proxies:
        return address
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if hop not in trusted_proxies:
            return hop
    return address


# A token bucket in Redis. ARGV: key, per minute (the bucket's size), now.
# The seconds to wait, or 0 with a token taken.
RATE_LIMIT_LUA = """
local size, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = size / 60
local bucket = redis.call('HMGET', ARGV[1], 'tokens', 'when')
local tokens = tonumber(bucket[1]) or size
local when = tonumber(bucket[2]) or now
tokens = math.min(size, tokens + math.max(0, now - when) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', ARGV[1], 'tokens', tostring(tokens), 'when', tostring(now))
redis.call('EXPIRE', ARGV[1], 61)
return tostring(wait)
"""


class RateLimitPlugin:
    """Bottle plugin: a token bucket per client on routes marked ``rate_limited``
    (subscription writes), and another on those marked ``rate_limited="receipts"``;
    over the limit, 429 with Retry-After."""

    name = "rate_limit"
    api = 2
    WHAT: ClassVar[dict] = {True: "subscription changes", "receipts": "receipts"}

    def __init__(
        self,
        per_minute: int,
        trusted_proxies: str,
        redis_client: Any = None,
        prefix: str = "",
        receipts_per_minute: int = 0,
    ):
        self.limits = {True: per_minute, "receipts": receipts_per_minute}
        self.trusted = address_set(trusted_proxies)
        self._buckets: dict[str, tuple[float, float]] = {}  # client: (tokens, when)
        self._lock = threading.Lock()
        # With Redis, one bucket per client shared by every process.
        self._redis_take = redis_client and redis_client.register_script(RATE_LIMIT_LUA)
        self._prefix = prefix + "rate:"

    def take(self, client: str, per_minute: int) -> float:
        """0 when ``client`` may go on, else the seconds until it may."""
        if self._redis_take:
            try:
                with _redis_errors("counting a client's writes"):
                    return float(
                        self._redis_take(
                            args=[self._prefix + client, per_minute, time.time()]
                        )
                    )
            except StoreUnavailable as e:
                if e.errno != errno.ENOSPC:
                    raise
                # A full Redis cannot count, but an unsubscribe still frees
                # memory; a write that needs room is refused by the store.
                return 0.0
        now = time.monotonic()
        rate = per_minute / 60
        with self._lock:
            if (
                len(self._buckets) > 100_000
            ):  # forget clients whose buckets are full again
                full = now - 60
                self._buckets = {c: b for c, b in self._buckets.items() if b[1] > full}
            tokens, when = self._buckets.get(client, (per_minute, now))
            tokens = min(per_minute, tokens + (now - when) * rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / rate
            self._buckets[client] = (tokens - 1, now)
            return 0.0

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        kind = route.config.get("rate_limited")
        per_minute = self.limits.get(kind, 0) if kind else 0
        if not per_minute:
            return callback
        bucket = "receipts:" if kind == "receipts" else ""  # apart from the writes

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = client_address(bottle.request.environ, self.trusted)
            wait = self.take(bucket + client, per_minute)
            if wait:
                bottle.response.set_header("Retry-After", str(math.ceil(wait)))
                log.warning(
                    "rate limit: %s %s from %s",
                    bottle.request.method,
                    logged_path(bottle.request.path),
                    client,
                )
                raise ApiError(
                    429,
                    f"too many {self.WHAT[kind]} from {client}; try again in "
                    f"{math.ceil(wait)} s",
                )
            return callback(*args, **kwargs)

        return wrapper


class InFlight:
    """WSGI wrapper that counts requests under way and, once draining, answers
    new ones 503, so a shutdown can wait for the rest."""

    def __init__(self, app: Callable):
        self.app = app
        self.draining = False
        self._count = 0
        self._idle = threading.Condition()

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        if self.draining:
            start_response(  # no Connection header: hop-by-hop, waitress's own
                "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Retry-After", "5")],
            )
            return [b'{"error": "the server is shutting down; try again shortly"}']
        self.begin()
        try:
            return self.app(environ, start_response)
        finally:
            self.end()

    def begin(self) -> None:
        """One more piece of work under way; ``end()`` it when done."""
        with self._idle:
            self._count += 1

    def end(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    @property
    def idle(self) -> bool:
        return self._count == 0

    def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for work under way; False on timeout."""
        self.draining = True
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


def logged_path(path: str) -> str:
    """A request path as logs show it: a user's id is personal data, so
    ``/users/<id>`` never names it."""
    return "/users/<id>" if path.startswith("/users/") else path


class AccessLog:
    """WSGI wrapper that logs one line per request once its answer is sent:
    client, method, path (never the query, which may carry secrets), status,
    bytes, milliseconds, and the API key's name (never the key)."""

    def __init__(self, app: Callable, trusted_proxies: str):
        self.app = app
        self.trusted = address_set(trusted_proxies)
        self.log = logging.getLogger("webpush.access")

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        started = time.monotonic()
        status = ["-"]

        def recording(line: str, headers: list, exc_info: Any = None) -> Any:
            status[0] = line.split(" ", 1)[0]
            return start_response(line, headers, exc_info)

        return self._logged(self.app(environ, recording), environ, status, started)

    def _logged(self, body: Any, environ: dict, status: list, started: float) -> Any:
        sent = 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            caller = environ.get("webpush.caller")
            self.log.info(
                '%s "%s %s" %s %d %.0fms%s',
                client_address(environ, self.trusted),
                environ.get("REQUEST_METHOD", "-")[:16],
                # escaped: a %0a in a path must not forge a line of its own
                logged_path(environ.get("PATH_INFO", "-"))[:200]
                .encode("unicode_escape")
                .decode(),
                status[0],
                sent,
                (time.monotonic() - started) * 1000,
                f" key={caller.name}" if caller else "",
            )


class JsonErrorTask(waitress.task.ErrorTask):
    """waitress's own refusals, made before the app runs (a body over the
    largest limit, refused from its Content-Length or as a chunked body passes
    it; a malformed request), as the JSON error every other answer has."""

    def execute(self) -> None:
        error = self.request.error
        message = f"{error.reason}: {error.body}"
        if error.code == 413:
            largest = self.channel.server.adj.max_request_body_size
            message = (
                f"the body is over {largest} bytes, more than this server takes "
                "(MAX_BODY_BYTES, MAX_WEBHOOK_BYTES)"
            )
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class StrictRequestParser(waitress.parser.HTTPRequestParser):
    """waitress's request parser, with a Content-Length of over 4,300 digits
    a 400 like any other bad one: waitress's int() raised on it, which
    dropped the connection unanswered and logged a traceback."""

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except ValueError:
            raise waitress.parser.ParsingError("Content-Length is invalid") from None


class JsonErrorChannel(waitress.channel.HTTPChannel):
    error_task_class = JsonErrorTask
    parser_class = StrictRequestParser


class RequestThreads(waitress.task.ThreadedTaskDispatcher):
    """waitress's request threads, whose shutdown waits for the requests
    under way until ``deadline`` (time.monotonic(), within SHUTDOWN_TIMEOUT)
    rather than waitress's own 5 seconds more."""

    deadline: float | None = None

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        if self.deadline is not None:
            timeout = max(0.0, self.deadline - time.monotonic())
        return super().shutdown(cancel_pending, timeout)


def closing_time(shutdown_timeout: float) -> float:
    """The seconds of SHUTDOWN_TIMEOUT kept, after waiting for what is in
    flight, for closing the delivery processes, the queue and the store."""
    return min(0.5, shutdown_timeout / 4)


def _raise_open_file_limit(wanted: int) -> None:
    """Idle connections are open files: let the process hold ``wanted``."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class CorsPlugin:
    """Bottle plugin that adds CORS headers to API responses (CORS_ORIGINS)."""

    name = "cors"
    api = 2
    methods = "GET, POST, DELETE, OPTIONS"
    headers = "Content-Type, Authorization, Idempotency-Key, Prefer"

    def __init__(self, origins: str):
        self.origins = {o.strip() for o in origins.split(",") if o.strip()}

    def add_headers(self) -> None:
        origin = request_header("Origin")
        if "*" in self.origins:
            bottle.response.set_header("Access-Control-Allow-Origin", "*")
        elif origin in self.origins:
            bottle.response.set_header("Access-Control-Allow-Origin", origin)
            bottle.response.add_header("Vary", "Origin")

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        if not route.config.get("api"):
            return callback

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = callback(*args, **kwargs)
            self.add_headers()
            return result

        return wrapper

    def preflight(self) -> None:
        """The answer to an OPTIONS preflight on an API route."""
        bottle.response.status = 204
        bottle.response.set_header("Access-Control-Allow-Methods", self.methods)
        bottle.response.set_header("Access-Control-Allow-Headers", self.headers)
        bottle.response.set_header("Access-Control-Max-Age", "86400")


def request_header(name: str, default: str | None = None) -> str | None:
    """A request header as the client sent it (WSGI's Latin-1 string). Bottle's
    own lookup decodes it as UTF-8 and raises on other bytes: a 500."""
    key = "HTTP_" + name.upper().replace("-", "_")
    return bottle.request.environ.get(key, default)


def read_json(max_bytes: int, setting: str = "MAX_BODY_BYTES") -> dict:
    """The request body as a JSON object, or ApiError (400, 413)."""
    return parse_json(read_body(max_bytes, setting))


def read_body(max_bytes: int, setting: str = "MAX_BODY_BYTES") -> bytes:
    """The raw request body, or ApiError (413) naming the ``setting`` that limits it."""
    length = bottle.request.content_length
    if length > max_bytes:
        raise ApiError(
            413,
            f"the body is {length} bytes; the limit is {max_bytes} ({setting})",
        )
    raw = bottle.request.body.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(413, f"the body is over the {max_bytes}-byte limit ({setting})")
    return raw


def prefer_wait(header: str | None) -> int | None:
    """The seconds of RFC 7240's ``Prefer: wait=N``, at most 60; None if absent
    (a preference the server does not understand is ignored, as 7240 says)."""
    for preference in re.split(r"[,;]", header or ""):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait" and re.fullmatch(r"[0-9]+", value.strip()):
            # Capped before int(): Python refuses to convert over 4,300 digits.
            digits = value.strip().lstrip("0") or "0"
            if len(digits) > len(str(MAX_PREFER_WAIT)):
                return MAX_PREFER_WAIT
            return min(int(digits), MAX_PREFER_WAIT)
    return None


def body_hash(body: Any) -> str:
    """What makes two request bodies the same for an Idempotency-Key."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class Services:
    """What a process serves from: the stores, delivery, the engine, metrics."""

    store: SubscriptionStore
    journal: NotificationJournal | None  # the JSON store's, None on Redis
    delivery: Delivery
    engine: NotificationEngine
    metrics: Metrics


def build_services(
    settings: Settings,
    keys: VapidKeys,
    receipt_key: bytes,
    store: SubscriptionStore,
    journal: NotificationJournal | None = None,
    consume: bool | None = None,
) -> Services:
    """Delivery, the job store and the engine over ``store``, for ``api.py``,
    ``api.py --worker`` and the tests alike. Without Redis this process is
    the only one, so it delivers whatever API_DELIVERS says."""
    metrics = Metrics()
    delivery = Delivery(keys, settings, receipt_key, observers=(metrics.observe,))
    try:
        jobs: JobStore
        if isinstance(store, RedisSubscriptionStore):
            jobs = RedisJobStore(store)
        else:
            if journal is None:
                journal = NotificationJournal(settings.journal_path)
            receipts = ReceiptDatabase(receipts_path(journal.path))
            jobs = JournalJobStore(journal, receipts)
        if consume is None:
            consume = settings.api_delivers or not isinstance(
                store, RedisSubscriptionStore
            )
        engine = NotificationEngine(jobs, store, delivery, settings, consume=consume)
    except BaseException:
        delivery.close()
        raise
    return Services(store, journal, delivery, engine, metrics)


@dataclass(eq=False)
class Http:
    """What the routes share: the settings, the services they call, the
    checks of what comes in, and two small pools of HTTP threads (test
    notifications, ``Prefer: wait``) so neither can take them all."""

    settings: Settings
    services: Services
    keys: VapidKeys
    receipt_key: bytes
    auth: AuthPlugin
    validate: Validator
    started: float = field(default_factory=time.time)
    test_slots: threading.BoundedSemaphore = field(init=False)
    wait_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.test_slots = threading.BoundedSemaphore(max(1, self.settings.threads // 4))
        self.wait_slots = threading.BoundedSemaphore(max(1, self.settings.threads // 4))

    def public_base(self) -> str:
        """What a relative ``url`` is relative to: PUBLIC_URL, else this
        request's origin (behind a proxy, the Host it forwarded)."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/") + "/"
        return self.own_base()

    def own_base(self) -> str:
        """This server's address as this request reached it (behind a
        proxy, the Host it forwarded), or ApiError 400 for a Host that is
        not a host name and port."""
        parts = bottle.request.urlparts
        # A chain of proxies may list hosts (X-Forwarded-Host): the first is
        # the one the client asked for.
        netloc = parts.netloc.split(",")[0].strip()
        base = f"{parts.scheme}://{netloc}/"
        try:
            urlsplit(base).port  # noqa: B018 - raises on "[fff]", port 99999
            valid = parts.scheme.lower() in ("http", "https") and HOST_RE.fullmatch(
                netloc
            )
        except ValueError:
            valid = False
        if not valid:
            raise ApiError(
                400,
                "the Host header is not a host name and port, so no absolute URL "
                "can be made of this request; send a valid Host, or set PUBLIC_URL",
            )
        return base

    def accept(
        self,
        fields: dict,
        key: str | None,
        body: str,
        source: str = "api",
        caller: Caller | None = None,
    ) -> tuple[Message, dict, bool]:
        """The one way a notification comes in (``POST /push`` and webhooks):
        its fields checked, and the caller's right to send to its audience
        (None: a signed webhook's sender may send anything); kept by the
        engine; its message, status document, and whether it was made before
        with the same key (IdempotencyConflict if with another body)."""
        message, audience = self.validate.push(fields, self.public_base())
        send_at = self.validate.send_at(fields)
        policy = self.validate.policy(fields)
        if caller is not None:
            refused = caller.may_send_to(audience.topic, audience.named is not None)
            if refused:
                raise ApiError(403, refused)
        document, replayed = self.services.engine.create(
            message,
            audience,
            send_at,
            key,
            body,
            source,
            caller and caller.name,
            policy,
            caller and caller.owner,
        )
        if not replayed:
            log.info(
                "notification %s (%s) %s for %d subscribers (%s)",
                document["id"],
                source,
                document["status"],
                document["total"],
                audience,
            )
        return message, document, replayed

    def bound_user(
        self,
        body: dict,
        record: dict,
        previous: dict,
        replaced: dict | None,
        old_auth: str | None,
    ) -> str | None:
        """The user a posted subscription is bound to: the ``user`` a valid
        ``user_token`` names (sign-in, as anyone the site signs for), none
        for ``"user": null`` (sign-out), else the one it had, if the post
        proves it is the same subscription (its ``auth`` secret; an FCM
        token proves itself), or the one of what it ``replaces``, if the post
        proves that one. ApiError 400 or 403 otherwise."""
        if "user" not in body:
            if "user_token" in body:
                raise ApiError(
                    400, "'user_token' goes with the 'user' it was signed for"
                )
            if previous and _same_secret(previous, record.get("keys", {}).get("auth")):
                return previous.get("user")
            if replaced and _same_secret(replaced, old_auth):
                return replaced.get("user")
            return None
        if body["user"] is None:
            if body.get("user_token") is not None:
                raise ApiError(400, "'user_token' goes with a 'user', not with null")
            return None
        secret = self.settings.user_token_secret
        if not secret:
            raise ApiError(
                400,
                "this server binds no subscription to a user: USER_TOKEN_SECRET is "
                "not set (see the README, Notify one person)",
            )
        user = self.validate.user(body["user"])
        problem = user_token_problem(secret, body.get("user_token"), user)
        if problem:
            log.warning(
                "refused to bind a subscription to a user from %s: %s",
                bottle.request.remote_addr,
                problem,
            )
            raise ApiError(403, problem)
        return user

    def answer(self, document: dict, wait: int | None, replayed: bool) -> dict:
        """A new notification's answer: 202 naming it, or 200 with its final
        status document if it ended within ``Prefer: wait``."""
        # Waiting holds an HTTP thread: a few at most, the rest answer at once.
        if (
            wait
            and document["status"] not in FINISHED
            and self.wait_slots.acquire(False)
        ):
            try:
                document = self.services.engine.wait(document["id"], wait) or document
            finally:
                self.wait_slots.release()
        if wait is not None:
            bottle.response.set_header("Preference-Applied", f"wait={wait}")
        if replayed:
            bottle.response.set_header("Idempotent-Replayed", "true")
        if wait and document["status"] in FINISHED:
            return document
        bottle.response.status = 202
        bottle.response.set_header("Location", f"/notifications/{document['id']}")
        policy = {k: document[k] for k in ("rate", "send_at_local") if document[k]}
        return {
            "id": document["id"],
            "status": document["status"],
            "subscriptions": document["total"],
            **policy,  # when given
        }


def _same_secret(stored: dict, auth: str | None) -> bool:
    """Whether a post proves it holds the stored subscription: its ``auth``
    secret (web push); an FCM record's id is its token's, which proves itself."""
    if stored.get("kind") == "fcm":
        return True
    known = stored.get("keys", {}).get("auth", "")
    return isinstance(auth, str) and hmac.compare_digest(known.encode(), auth.encode())


def _gauges(services: Services) -> Callable[[], list]:
    """The store's and the engine's figures, read at each scrape."""
    metrics, store, engine = services.metrics, services.store, services.engine

    def gauges() -> list:
        subscriptions = metrics.gauge(
            "webpush_subscriptions", "Subscriptions stored, by channel", "channel"
        )
        for kind in CHANNELS:
            subscriptions.add_metric([kind], store.count(kind))
        notifications = metrics.gauge(
            "webpush_notifications", "Notifications kept, by status", "status"
        )
        counts = engine.status_counts()
        for status in ("scheduled", "queued", "sending", *FINISHED):
            notifications.add_metric([status], counts.get(status, 0))
        batches, age = engine.backlog()
        depth = metrics.gauge(
            "webpush_queue_batches", "Fan-out batches due and not yet delivered"
        )
        depth.add_metric([], batches)
        oldest = metrics.gauge(
            "webpush_queue_oldest_seconds", "How long the oldest of them has waited"
        )
        oldest.add_metric([], age)
        return [subscriptions, notifications, depth, oldest]

    return gauges


# -- routes, by resource ----------------------------------------------------------


def subscription_routes(app: bottle.Bottle, http: Http) -> None:
    """``/subscription``: the public key, subscribe, unsubscribe, a test."""
    settings, validate, store = http.settings, http.validate, http.services.store

    @app.get("/subscription", api=True)
    def get_public_key() -> dict:
        return {
            "public_key": http.keys.public_key,
            "users": bool(settings.user_token_secret),  # user_token is checked
        }

    @app.post("/subscription", api=True, rate_limited=True)
    def subscribe() -> dict:
        body = read_json(settings.max_body_bytes)
        if "fcm_token" in body:
            record = validate.fcm_token(body)
        else:
            # fcm_token is never in this body: named for the misspelled one
            record = validate.subscription(
                body, also=("replaces", "fcm_token", "timezone", *USER_FIELDS)
            )
        previous = store.get(record["id"]) or {}
        replaced, old_auth = None, None
        if "replaces" in body:
            old_id, old_auth = validate.replaces(body)
            replaced = store.get(old_id)
        if replaced and (
            replaced["id"] == record["id"]
            or replaced.get("kind", "webpush") != record.get("kind", "webpush")
        ):
            replaced = None
        user = http.bound_user(body, record, previous, replaced, old_auth)
        if (
            not previous
            and not replaced
            and settings.max_subscriptions
            and len(store) >= settings.max_subscriptions
        ):
            log.warning(
                "refused a new subscription: MAX_SUBSCRIPTIONS (%d) reached", len(store)
            )
            raise ApiError(
                429,
                "this server stores no more subscriptions (MAX_SUBSCRIPTIONS reached); "
                "try again later",
            )
        record["created"] = previous.get("created", int(time.time()))
        if previous.get("last_success"):
            record["last_success"] = previous["last_success"]
        if record["topics"] is None:  # re-posted, or rotated by its push service
            record["topics"] = (previous or replaced or {}).get("topics", [])
        zone = None
        if "timezone" not in body:  # kept, as topics are ("timezone": null drops it)
            zone = (previous or replaced or {}).get("timezone")
        elif body["timezone"] is not None:
            zone = validate.timezone(body["timezone"])
        if zone is not None:
            record["timezone"] = zone
        if user is not None:
            record["user"] = user
        created = store.upsert(record, replaced and replaced["id"])
        bottle.response.status = 201 if created else 200
        log.info(
            "%s subscription %s (%s) topics=%s%s",
            "new" if created else "updated",
            record["id"],
            record_origin(record),
            ",".join(record["topics"]) or "-",
            " of a signed-in user" if user is not None else "",
        )
        return {"id": record["id"], "user": user}

    @app.delete("/subscription", api=True, rate_limited=True)
    def unsubscribe() -> None:
        record_id = validate.unsubscribe(read_json(settings.max_body_bytes))
        if not store.remove(record_id):
            raise ApiError(404, "no subscription with that endpoint or token is stored")
        log.info("deleted subscription %s", record_id)
        bottle.response.status = 204

    @app.post("/subscription/test", api=True, rate_limited=True)
    def test_notification() -> dict:
        given = validate.subscription(read_json(settings.max_body_bytes))
        stored = store.get(given["id"])
        if stored is None:
            raise ApiError(
                404, "this subscription is not stored; POST /subscription first"
            )
        if not hmac.compare_digest(stored["keys"]["auth"], given["keys"]["auth"]):
            raise ApiError(
                403, "the 'auth' secret does not match the stored subscription"
            )
        message, _ = validate.push(TEST_NOTIFICATION, http.public_base())
        # On a few HTTP threads at most, and never longer than TEST_WAIT.
        if not http.test_slots.acquire(blocking=False):
            bottle.response.set_header("Retry-After", "5")
            raise ApiError(
                429, "too many test notifications under way; try again in a few seconds"
            )
        try:
            outcomes = http.services.engine.send_now(stored, message, TEST_WAIT)
        finally:
            http.test_slots.release()
        return PushReport(outcomes).summary(detail=True)


def notification_routes(app: bottle.Bottle, http: Http) -> None:
    """``/push`` and ``/notifications``: send, list, look at, cancel, and the
    receipts service workers report."""
    settings, validate, engine = http.settings, http.validate, http.services.engine

    @app.post("/push", api=True, auth="send")
    def push() -> dict:
        body = read_json(settings.max_push_bytes, "MAX_PUSH_BYTES")
        key = validate.idempotency_key(request_header("Idempotency-Key"))
        wait = prefer_wait(request_header("Prefer"))
        caller = http.auth.caller()
        # "push:", apart from webhook deliveries' ids, and each key's apart
        # from another's: none swallows, or shows, another's notification.
        if key:
            # "pushkey:", never a prefix of "push:": no Idempotency-Key of the
            # admin's ("ci:x") is another key's ("x" of "ci").
            key = (
                f"push:{key}"
                if caller.name == ADMIN
                else f"pushkey:{caller.owner}:{key}"
            )
        try:
            _, document, replayed = http.accept(
                body, key, body_hash(body), caller=caller
            )
        except IdempotencyConflict as e:
            raise ApiError(
                422,
                f"this Idempotency-Key was used for notification {e} with another "
                "body in the last 24 hours; use a new key for a new notification",
            ) from None
        return http.answer(document, wait, replayed)

    @app.get("/notifications", api=True, auth="read")
    def list_notifications() -> dict:
        raw = bottle.request.query.get("limit", "20")
        if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= 1000:
            raise ApiError(400, "'limit' must be a whole number from 1 to 1000")
        return {"notifications": engine.list(int(raw))}

    @app.get("/notifications/<id>", api=True, auth="own")
    def get_notification(id: str) -> dict:
        document = engine.get(id_in_path(id))
        if document is None:
            raise ApiError(404, "no such notification; it may be past its retention")
        caller = http.auth.caller()
        if not caller.may("read") and engine.owner(id) != caller.owner:
            raise ApiError(
                403,
                f"the key {caller.name!r} has the scope 'send', which may not GET "
                "a notification that another key sent",
            )
        return document

    @app.delete("/notifications/<id>", api=True, auth="admin")
    def cancel_notification(id: str) -> dict:
        try:
            return engine.cancel(id_in_path(id))
        except KeyError:
            raise ApiError(404, "no such notification") from None
        except AlreadyFinished:
            status = (engine.get(id) or {}).get("status", "ended")
            raise ApiError(
                409,
                f"the notification has ended ({status}); there is nothing to cancel",
            ) from None

    @app.post("/notifications/<id>/events", api=True, rate_limited="receipts")
    def receipt_event(id: str) -> dict:
        id_in_path(id)
        event, given = validate.receipt(read_json(settings.max_body_bytes))
        subscriber = receipt_subscriber(http.receipt_key, id, given)
        if subscriber is None:
            raise ApiError(403, "this receipt was not made for this notification")
        counted = engine.count_receipt(id, event, subscriber)
        if counted is None:
            raise ApiError(404, "no such notification; it may be past its retention")
        if counted:
            http.services.metrics.receipts.labels(event).inc()
        return {"event": event, "counted": counted}


def user_routes(app: bottle.Bottle, http: Http) -> None:
    """``/users/<id>``: a person's devices, and erasing them. The id is the
    site's own (a subscription's ``user``), never logged."""
    validate, store, engine = http.validate, http.services.store, http.services.engine

    @app.get("/users/<id:path>", api=True, auth="read")
    def get_user(id: str) -> dict:
        user = validate.user(id, "the user")
        found = sorted(store.of_users([user]))
        records = store.get_many([record_id for _, record_id, _ in found])
        devices = [subscription_document(r) for r in records if r is not None]
        if not devices:
            raise ApiError(404, "no subscription is bound to this user")
        return {"user": user, "subscriptions": devices}

    @app.delete("/users/<id:path>", api=True, auth="admin")
    def erase_user(id: str) -> None:
        user = validate.user(id, "the user")
        removed, receipts = engine.erase(user)
        if not removed:
            raise ApiError(
                404, "no subscription is bound to this user; nothing to erase"
            )
        log.info(
            "erased a user (id not logged): %d subscriptions, %d receipts",
            removed,
            receipts,
        )
        bottle.response.status = 204


def key_routes(app: bottle.Bottle, http: Http) -> None:
    """``/keys``: API keys with scopes, made, listed and revoked by an admin;
    ``/key``: what the calling key may do."""
    ring = http.auth.ring

    @app.post("/keys", api=True, auth="admin")
    def create_key() -> dict:
        name, scope, topics, expires_in = http.validate.api_key(
            read_json(http.settings.max_body_bytes)
        )
        key, record = ring.create(name, scope, topics, expires_in)
        bottle.response.status = 201
        bottle.response.set_header("Location", f"/keys/{name}")
        bottle.response.set_header("Cache-Control", "no-store")
        return {**key_document(record, ring.clock()), "key": key}

    @app.get("/keys", api=True, auth="admin")
    def list_keys() -> dict:
        now = ring.clock()
        records = sorted(ring.store.all(), key=lambda r: r["name"])
        return {"keys": [key_document(r, now) for r in records]}

    @app.delete("/keys/<name>", api=True, auth="admin")
    def revoke_key(name: str) -> None:
        if not ring.store.revoke(name):
            raise ApiError(404, f"no key is named {name!r}")
        log.info("revoked API key %r", name)
        bottle.response.status = 204

    @app.get("/key", api=True, auth="any")
    def own_key() -> dict:
        caller = http.auth.caller()
        return {"name": caller.name, "scope": caller.scope, "topics": caller.topics}


def demo_routes(app: bottle.Bottle, http: Http) -> None:
    """The demo page's made-up sign-in (DEMO_USERS=true with
    USER_TOKEN_SECRET): a user token for whatever name is typed. It lets
    anyone be anyone, so it exists only when asked for."""

    @app.post("/demo/user-token", api=True, rate_limited=True)
    def demo_user_token() -> dict:
        body = read_json(http.settings.max_body_bytes)
        _only_known(body, ("user",))
        user = http.validate.user(body.get("user"))
        token = sign_user_token(http.settings.user_token_secret, user, DEMO_TOKEN_TTL)
        return {"user": user, "user_token": token}


def webhook_routes(app: bottle.Bottle, http: Http) -> None:
    """``/webhooks/<source>``: signed events that become notifications."""
    settings = http.settings

    @app.post("/webhooks/<source>", api=True)
    def webhook(source: str) -> dict:
        kind = WEBHOOK_SOURCES.get(source)
        if kind is None:
            raise ApiError(
                404,
                f"no webhook source {source!r}; there are: {', '.join(WEBHOOK_SOURCES)}",
            )
        if not settings.webhook_secret:
            raise ApiError(
                503,
                "webhooks are off: set WEBHOOK_SECRET to the secret the sender signs with",
            )
        raw = read_body(settings.max_webhook_bytes, "MAX_WEBHOOK_BYTES")
        signature = request_header(kind.signature_header)
        # A valid signature: the sender may send anything (no caller). Where
        # allowed, a key that may send stands in for it, within its topics.
        signed = signature_valid(settings.webhook_secret, raw, signature)
        caller = None if signed or not kind.token_allowed else http.auth.caller()
        if not signed and not (caller and caller.may("send")):
            log.warning(
                "refused webhook %s from %s: bad signature",
                source,
                bottle.request.remote_addr,
            )
            how = f"{kind.signature_header}: sha256=<HMAC-SHA256 of the body with WEBHOOK_SECRET>"
            if kind.token_allowed:
                how += ", or Authorization: Bearer <a send or admin key>"
            raise ApiError(401, f"missing or wrong signature: send {how}")
        payload = parse_json(raw)
        event = request_header(kind.event_header, "") if kind.event_header else "notify"
        if event == "ping":
            return {"pong": True}
        handler = WEBHOOK_HANDLERS.get((source, event))
        if handler is None:
            log.info("webhook %s event %r has no handler: ignored", source, event)
            bottle.response.status = 202
            return {"ignored": f"no handler for {source} event {event!r}"}
        try:
            fields = handler(payload)
        except (KeyError, TypeError, AttributeError):
            raise ApiError(
                400, f"the {source} {event!r} payload lacks fields its handler needs"
            ) from None
        if fields is None:
            bottle.response.status = 202
            return {"ignored": f"{source} {event!r} of this kind sends no notification"}
        delivery_id = request_header(kind.delivery_header)
        # A key's delivery ids are its own: none can claim, or see, another's.
        sender = f"{caller.owner}:" if caller else ""
        key = f"webhook:{source}:{sender}{delivery_id}" if delivery_id else None
        try:  # a redelivery has the same id: it makes no second notification
            message, document, replayed = http.accept(
                fields,
                key,
                hashlib.sha256(raw).hexdigest(),
                f"webhook {source}/{event}",
                caller,
            )
        except IdempotencyConflict as e:
            return {"duplicate": delivery_id, "id": str(e)}
        if replayed:
            return {"duplicate": delivery_id, "id": document["id"]}
        bottle.response.status = 202
        bottle.response.set_header("Location", f"/notifications/{document['id']}")
        return {
            "accepted": event,
            "id": document["id"],
            "status": document["status"],
            "title": message.notification["title"],
            "subscriptions": document["total"],
        }


def operation_routes(app: bottle.Bottle, http: Http) -> None:
    """What operators look at: ``/health``, ``/topics``, ``/metrics``."""
    store, engine = http.services.store, http.services.engine

    @app.get("/health", api=True)
    def health() -> dict:
        answer = {
            "status": "ok",
            "subscriptions": store.count("webpush"),
            "fcm_tokens": store.count("fcm"),
            "version": __version__,
            "uptime_seconds": int(time.time() - http.started),
        }
        if isinstance(store, RedisSubscriptionStore):
            answer["workers"] = engine.delivering()
        return answer

    @app.get("/topics", api=True, auth="read")
    def list_topics() -> str:
        counts = store.topics()
        bottle.response.content_type = "application/json"
        # A list: Bottle turns only dicts into JSON itself.
        return json.dumps(
            [{"topic": t, "subscriptions": counts[t]} for t in sorted(counts)]
        )

    @app.get("/subscriptions/ages", api=True, auth="read")
    def subscription_ages() -> dict:
        return engine.ages()

    @app.get("/metrics", api=True, auth="metrics")
    def get_metrics() -> bottle.HTTPResponse:
        return metrics_response(http.services.metrics)


# In static/webpush-sw.js, what /webpush-sw.js replaces with the server's URL.
WORKER_SERVER_MARK = "self.location.origin; // the server's URL, written in when served"


def _for_any_site(response: bottle.HTTPResponse) -> bottle.HTTPResponse:
    """A script of the client: any site may load it (CORS, for a module), and
    browsers keep it five minutes before they ask again (ETag: a 304)."""
    response.set_header("Access-Control-Allow-Origin", "*")
    response.set_header("Content-Type", "text/javascript; charset=utf-8")
    response.set_header("Cache-Control", "public, max-age=300")
    return response


def page_routes(app: bottle.Bottle, http: Http) -> None:
    """What people open: the demo page, the console, their files; and the
    client any site takes in (docs/client.md): ``/webpush.js`` for its
    pages, ``/webpush-sw.js`` for its service worker."""

    @app.get("/")
    def index() -> bottle.HTTPResponse:
        return serve_static("index.html")

    @app.get("/admin")
    def admin() -> bottle.HTTPResponse:
        return serve_static("admin.html")

    @app.get("/sw.js")
    def service_worker() -> bottle.HTTPResponse:
        return serve_static("sw.js")

    @app.get("/static/<name:path>")
    def static(name: str) -> bottle.HTTPResponse:
        return serve_static(name)

    @app.get("/webpush.js")
    def client_module() -> bottle.HTTPResponse:
        return _for_any_site(serve_static("webpush.js"))

    @app.get("/webpush-sw.js")
    def client_worker() -> bottle.HTTPResponse:
        # A site's worker takes this in from another origin, where it cannot
        # tell where it came from: the server writes in its own address, as
        # this request reached it (PUBLIC_URL is the site's, not ours).
        try:
            server = http.own_base().rstrip("/")
        except ApiError as e:
            return bottle.HTTPResponse(e.message + "\n", status=e.status)
        path = STATIC_DIR / "webpush-sw.js"
        if not path.is_file():  # api.py copied without static/
            log.warning("GET /webpush-sw.js: %s is missing", path)
            return bottle.HTTPResponse("static/webpush-sw.js is missing\n", status=404)
        source = path.read_text(encoding="utf-8")
        body = source.replace(WORKER_SERVER_MARK, json.dumps(server) + ";", 1).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        modified = formatdate(path.stat().st_mtime, usegmt=True)
        headers = {"ETag": etag, "Last-Modified": modified}
        if request_header("If-None-Match") == etag:
            answer = _for_any_site(bottle.HTTPResponse(status=304, **headers))
        else:
            answer = _for_any_site(bottle.HTTPResponse(body, **headers))
        # Made from this request's Host: no shared cache may hand one
        # client's copy to another; browsers revalidate it (a 304).
        answer.set_header("Cache-Control", "no-cache")
        answer.set_header("Vary", "Host, X-Forwarded-Host, X-Forwarded-Proto")
        return answer


def id_in_path(value: str) -> str:
    """A notification id from a path, or 404 when it cannot be one."""
    if not NOTIFICATION_ID_RE.fullmatch(value):
        raise ApiError(404, "no such notification (ids are 16 characters)")
    return value


def create_app(
    settings: Settings | None = None,
    keys: VapidKeys | None = None,
    store: SubscriptionStore | None = None,
    token: str | None = None,
    journal: NotificationJournal | None = None,
    receipt_key: bytes | None = None,
) -> bottle.Bottle:
    """The WSGI application. Anything not given is made from ``settings``;
    ``app.config["webpush.close"](timeout)`` stops its delivery and files."""
    settings = settings or Settings.from_env()
    keys = keys if keys is not None else VapidKeys.load_or_create(settings)
    token = token if token is not None else load_or_create_token(settings)[0]
    if receipt_key is None:
        receipt_key = receipt_key_of(settings, keys)
    if store is None:
        store = open_store(settings)
    services = build_services(settings, keys, receipt_key, store, journal)
    ring = KeyRing(token, settings.metrics_token, open_key_store(settings, store))
    auth = AuthPlugin(ring)
    http = Http(settings, services, keys, receipt_key, auth, Validator(settings))
    delivery, engine = services.delivery, services.engine

    def close(timeout: float = 0, rest: float = 1.0) -> bool:
        """Stop: batches in flight get ``timeout`` seconds to be recorded, and
        the rest of the stop takes ``rest`` seconds at most."""
        recorded = engine.stop(timeout)
        closed_by = time.monotonic() + rest
        delivery.close(rest)  # what it still had comes back unsent...
        # ...and the engine ends once it has seen it
        engine.stop(max(0.0, closed_by - time.monotonic()))
        engine.close()
        store.close()
        return recorded

    services.metrics.add_source(_gauges(services))
    cors = CorsPlugin(settings.cors_origins)
    app = bottle.Bottle()
    app.install(MetricsPlugin(services.metrics))  # outermost: it sees every answer
    app.install(cors)  # then CORS, so it wraps the JSON errors too
    app.install(JsonApiPlugin())
    app.install(
        RateLimitPlugin(
            settings.rate_limit,
            settings.trusted_proxies,
            store.redis if isinstance(store, RedisSubscriptionStore) else None,
            settings.redis_prefix,
            settings.receipt_rate_limit,
        )
    )
    app.install(auth)
    app.config.update(
        {
            "webpush.store": store,
            "webpush.journal": services.journal,
            "webpush.queue": engine,
            "webpush.delivery": delivery,
            "webpush.keys": keys,
            "webpush.keyring": ring,
            "webpush.receipt_key": receipt_key,
            "webpush.close": close,
        }
    )
    bottle.BaseRequest.MEMFILE_MAX = settings.max_body_bytes
    subscription_routes(app, http)
    notification_routes(app, http)
    user_routes(app, http)
    key_routes(app, http)
    webhook_routes(app, http)
    operation_routes(app, http)
    if settings.demo_users and settings.user_token_secret:
        demo_routes(app, http)
    page_routes(app, http)
    app.config["webpush.in_flight"] = InFlight(app)  # what a shutdown waits for
    for rule in {route.rule for route in app.routes if route.config.get("api")}:
        app.route(rule, "OPTIONS", cors.preflight, api=True)

    def json_error(error: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        cors.add_headers()
        messages = {
            404: "no such route; see README for the API",
            405: "method not allowed on this route",
        }
        return json.dumps({"error": messages.get(error.status_code, error.status_line)})

    for status in (400, 404, 405, 413, 500):
        app.error(status)(json_error)
    return app


# What "/" and "/admin" answer when api.py was copied without static/.
NO_STATIC_PAGE = """<!doctype html>
<html lang="en"><meta charset="utf-8"><title>Page missing</title>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto">
<h1>This page is missing</h1>
<p>The push server is running, but the <code>static/</code> folder is not
next to <code>api.py</code>, so the demo page and the console cannot be
shown. Copy <code>static/</code> from the same place as <code>api.py</code>
(the project's repository) into the folder that holds <code>api.py</code>,
then reload.</p>
<p>The API works without it: <a href="/health">/health</a>.</p>
</body></html>
"""
PAGES = ("index.html", "admin.html")


def serve_static(name: str) -> bottle.HTTPResponse:
    """A file from static/, never one outside it (no '..', no symlinks out);
    for a missing page, one that says where static/ comes from."""
    if name in PAGES and not (STATIC_DIR / name).is_file():
        page = NO_STATIC_PAGE  # the folder's path is for the log, not for visitors
        return bottle.HTTPResponse(
            page, 404, {"Content-Type": "text/html; charset=utf-8"}
        )
    root = STATIC_DIR.resolve()
    if "\0" in name:  # no file has one; the OS would refuse the name
        return bottle.HTTPError(404, "Not found")
    path = (root / name).resolve()
    if root not in path.parents or any(
        part.startswith(".") for part in Path(name).parts
    ):
        return bottle.HTTPError(404, "Not found")
    mimetype: str | bool = "application/javascript" if path.suffix == ".js" else True
    if path.suffix == ".webmanifest":
        mimetype = "application/manifest+json"
    relative = path.relative_to(root).as_posix()
    response = bottle.static_file(relative, root=str(root), mimetype=mimetype)
    # Revalidated (a 304 when unchanged): an upgrade never pairs a new page
    # with an old script from the browser's cache.
    response.set_header("Cache-Control", "no-cache")
    for header, value in STATIC_HEADERS.get(relative, {}).items():
        response.set_header(header, value)
    return response


###############################################################################
# Command line ################################################################
###############################################################################


def parse_args(argv: list[str] | None = None) -> tuple[Settings, dict[str, Any]]:
    """Settings from the command line over the environment over the defaults,
    and what to do instead of serving: ``repair_store``, ``worker``,
    ``migrate_store``."""
    env_defaults = Settings.from_env()
    epilog = [
        "settings only read from the environment (secrets stay off command lines):"
    ]
    parser = argparse.ArgumentParser(
        prog="api.py",
        description="A self-hosted Web Push server: VAPID keys, subscriptions, fan-out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(Settings):
        env, help_text = f.metadata["env"], f.metadata["help"]
        if not f.metadata["cli"]:
            epilog.append(f"  {env:<18} {help_text} [default: unset]")
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            metavar=type(f.default).__name__.upper(),
            help=f"{help_text} (env {env}; default: {f.default!r})",
        )
    parser.epilog = "\n".join(epilog)
    parser.add_argument("--version", action="version", version=__version__)
    mode = parser.add_mutually_exclusive_group()  # one thing to do at a time
    mode.add_argument(
        "--repair-store",
        action="store_true",
        help="rewrite a damaged SUBSCRIPTIONS_FILE with its valid records, move the "
        "damaged lines to a side file, and exit (stop the server first)",
    )
    mode.add_argument(
        "--worker",
        action="store_true",
        help="deliver only, without HTTP: take batches of notifications from Redis "
        "(needs REDIS_URL); run as many as the fan-outs need, on any machines",
    )
    mode.add_argument(
        "--migrate-store",
        metavar="TARGET",
        help="copy the subscriptions and exit: from SUBSCRIPTIONS_FILE into the Redis "
        "at TARGET (redis://..., rediss://..., unix://...), or from REDIS_URL into "
        "the JSON file TARGET; copying again changes only what differs",
    )
    args = vars(parser.parse_args(argv))
    modes = {
        name: args.pop(name) for name in ("repair_store", "worker", "migrate_store")
    }
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    given = {
        name: _convert(fields[name], raw)
        for name, raw in args.items()
        if raw is not None
    }
    return dataclasses.replace(env_defaults, **given), modes


def store_name(settings: Settings) -> str:
    """Where the subscriptions are, for a log line (no password)."""
    if settings.redis_url:
        return f"Redis {redact_url(settings.redis_url)} (keys {settings.redis_prefix}*)"
    return settings.subscriptions_file


def existing_vapid_key(settings: Settings) -> str | None:
    """The VAPID public key of VAPID_PRIVATE_KEY or VAPID_DIR, if one exists:
    never makes one."""
    names = (PRIVATE_PEM, OPENSSL_PEM, OPENSSL_PRIVATE_TXT)
    directory = Path(settings.vapid_dir)
    if settings.vapid_private_key or any((directory / n).is_file() for n in names):
        return VapidKeys.load_or_create(settings).public_key
    return None


def _without_recent(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "recent"}


def migrate_store(settings: Settings, target: str) -> int:
    """``--migrate-store TARGET``: copy every subscription from the JSON file
    into the Redis at TARGET, or from REDIS_URL into the JSON file TARGET.
    Records are written by id and only where they differ, so running it
    again copies what changed and duplicates nothing. Into Redis, the
    subscriptions bring the VAPID key they were made for: a Redis whose
    processes use another is refused. The server must be stopped (the JSON
    file is locked)."""
    to_redis = target.startswith(("redis://", "rediss://", "unix://"))
    if not to_redis and "://" in target:
        log.error(
            "--migrate-store %s: give a redis://, rediss:// or unix:// URL to copy "
            "into Redis, or a JSON file's path to copy REDIS_URL's subscriptions to",
            redact_url(target),
        )
        return 2
    if not to_redis and not settings.redis_url:
        log.error(
            "--migrate-store %s: a JSON file is copied from Redis: set REDIS_URL "
            "(or give a redis:// URL to copy SUBSCRIPTIONS_FILE into Redis)",
            target,
        )
        return 2
    json_path = settings.subscriptions_file if to_redis else target
    if to_redis and not Path(json_path).is_file():
        log.error(
            "--migrate-store: SUBSCRIPTIONS_FILE %s does not exist: nothing to copy "
            "(set SUBSCRIPTIONS_FILE to the store's path)",
            json_path,
        )
        return 2
    redis_settings = (
        dataclasses.replace(settings, redis_url=target) if to_redis else settings
    )
    try:
        redis_store = RedisSubscriptionStore(
            connect_redis(redis_settings), settings.redis_prefix
        )
    except SettingError as e:
        log.error("%s", e)
        return 2
    try:
        public_key = existing_vapid_key(settings) if to_redis else None
        if public_key is not None:
            redis_store.claim_identity(public_key, None)
        json_store = JsonSubscriptionStore(json_path)
    except (StoreLocked, StoreDamaged, SettingError, OSError) as e:
        log.error("%s", e)
        redis_store.close()
        return 2
    destination = redis_store if to_redis else json_store
    copied = unchanged = 0
    try:
        if to_redis:
            ids = json_store.ids()
            chunks: Any = (
                [json_store.get(i) for i in ids[start : start + 1000]]
                for start in range(0, len(ids), 1000)
            )
        else:
            chunks = redis_store.scan(1000)
        for chunk in chunks:
            # A day's success times (MAX_PER_DAY) stay where they were counted.
            records = [_without_recent(r) for r in chunk if r is not None]
            there = (
                redis_store.get_many([r["id"] for r in records])
                if to_redis
                else [json_store.get(r["id"]) for r in records]
            )
            there = [old and _without_recent(old) for old in there]
            changed = [r for r, old in zip(records, there) if old != r]
            destination.write(changed)
            copied += len(changed)
            unchanged += len(records) - len(changed)
    except OSError as e:
        log.error("copy stopped after %d subscriptions: %s; run it again", copied, e)
        return 2
    finally:
        json_store.close()
        redis_store.close()
    log.info(
        "copied %d subscriptions (%d already there, unchanged) from %s to %s",
        copied,
        unchanged,
        json_path if to_redis else store_name(settings),
        store_name(redis_settings) if to_redis else json_path,
    )
    if public_key is None and to_redis:
        log.warning(
            "no VAPID key in VAPID_DIR %s or VAPID_PRIVATE_KEY: give the processes "
            "on this Redis the key these subscriptions were made for",
            settings.vapid_dir,
        )
    return 0


def run_worker(settings: Settings) -> int:
    """``api.py --worker``: delivery without HTTP, taking batches from Redis,
    until SIGTERM or SIGINT; then what it has not sent goes back to Redis
    for the other processes (at most SHUTDOWN_TIMEOUT seconds)."""
    try:
        store = open_store(settings)
    except SettingError as e:
        log.error("%s", e)
        return 2
    try:
        keys = VapidKeys.load_or_create(settings)
        receipt_key = receipt_key_of(settings, keys)
        store.claim_identity(keys.public_key, None, receipt_key)  # type: ignore[union-attr]
        _raise_open_file_limit(settings.push_concurrency + 256)
        services = build_services(settings, keys, receipt_key, store, consume=True)
    except (OSError, SettingError) as e:  # StoreUnavailable is an OSError
        log.error("%s", e)
        store.close()
        return 2
    delivery, queue = services.delivery, services.engine
    log.info(
        "worker %s: delivering from %s with %d delivery process%s",
        queue.consumer,
        store_name(settings),
        delivery.processes,
        "es" if delivery.processes > 1 else "",
    )
    metrics_server = None
    if settings.metrics_port:
        try:
            metrics_server = serve_worker_metrics(settings, services.metrics)
        except (OSError, SettingError) as e:
            log.error("METRICS_PORT=%d: %s", settings.metrics_port, e)
            queue.stop(0)
            delivery.close()
            store.close()
            return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1):
        pass
    log.info(
        "stopping: what is not sent goes back to Redis (%g s at most)",
        settings.shutdown_timeout,
    )
    closing = closing_time(settings.shutdown_timeout)
    deadline = time.monotonic() + settings.shutdown_timeout
    queue.stop(settings.shutdown_timeout - closing)
    delivery.close(max(0.0, deadline - time.monotonic()))
    queue.stop(max(0.0, deadline - time.monotonic()))
    store.close()
    if metrics_server is not None:
        metrics_server.close()
    log.info("stopped")
    return 0


def serve_worker_metrics(settings: Settings, metrics: Metrics) -> Any:
    """A --worker's ``GET /metrics`` on HOST:METRICS_PORT, in a thread: its
    own counters (the gauges of the store and queue are the API's)."""
    token = settings.push_token
    if not token and (Path(settings.vapid_dir) / PUSH_TOKEN_FILE).is_file():
        token = load_or_create_token(settings)[0]
    if not (token or settings.metrics_token):
        raise SettingError(
            "give the worker METRICS_TOKEN (or PUSH_TOKEN) to guard its metrics"
        )
    app = bottle.Bottle()
    app.install(JsonApiPlugin())
    app.install(AuthPlugin(KeyRing(token, settings.metrics_token)))

    @app.get("/metrics", api=True, auth="metrics")
    def get_metrics() -> bottle.HTTPResponse:
        return metrics_response(metrics)

    @app.error(404)
    def not_found(error: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "only GET /metrics is served here"})

    server = waitress.create_server(
        app, host=settings.host, port=settings.metrics_port, threads=2
    )
    threading.Thread(target=server.run, name="metrics", daemon=True).start()
    log.info("metrics: http://%s:%d/metrics", settings.host, settings.metrics_port)
    return server


CLIENT_COMMANDS = ("user-token", "keys", "send", "status", "notifications")
DURATION_RE = re.compile(r"([0-9]{1,10})([smhdw]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
CLIENT_TIMEOUT = 30  # seconds a command waits for the server's answer


class ClientError(Exception):
    """What a client command says went wrong: one line for a person."""


class ApiClient:
    """The commands' way to the HTTP API: WEBPUSH_URL (default: this machine's
    server, on PORT) with WEBPUSH_TOKEN (default, for this machine's server
    only: the push token in VAPID_DIR). Every failure is a ClientError."""

    def __init__(self, environ: dict[str, str]):
        self.url = environ.get("WEBPUSH_URL", "").rstrip("/")
        self.token = environ.get("WEBPUSH_TOKEN", "")
        if not self.url:
            port = environ.get("PORT", "8080")
            self.url = f"http://127.0.0.1:{port}"
            vapid_dir = environ.get("VAPID_DIR") or str(HERE / "vapid")
            token_file = Path(vapid_dir) / PUSH_TOKEN_FILE
            if not self.token and token_file.is_file():
                with contextlib.suppress(OSError):
                    self.token = token_file.read_text().strip()
        try:
            parts = urlsplit(self.url)
        except ValueError:  # "http://[::1", say
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(
                f"WEBPUSH_URL must be the server's http or https address, such as "
                f"https://push.example.org, not {self.url!r}"
            )
        if not self.token:
            raise ClientError(
                f"set WEBPUSH_TOKEN to an API key (or the push token) for {self.url}"
            )
        if not (self.token.isascii() and self.token.isprintable()):
            raise ClientError(
                "WEBPUSH_TOKEN holds a character no key has (a curly quote, a "
                "space?): copy the key again"
            )

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The JSON answer of one request, or ClientError in words."""
        import requests

        try:
            response = requests.request(
                method,
                self.url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
                timeout=CLIENT_TIMEOUT,
            )
        except requests.RequestException as e:
            cause = type(e).__name__
            raise ClientError(
                f"cannot reach the push server at {self.url} ({cause}): is it "
                "running, and is WEBPUSH_URL its address?"
            ) from None
        try:
            answer = response.json() if response.content else None
        except ValueError:
            answer = None
        said = answer.get("error") if isinstance(answer, dict) else None
        if response.status_code == 401:
            raise ClientError(
                f"the server at {self.url} does not accept WEBPUSH_TOKEN: it is "
                "unknown, revoked or expired"
            )
        if response.status_code >= 400:
            raise ClientError(
                said or f"the server answered HTTP {response.status_code}"
            )
        if response.status_code != 204 and not isinstance(answer, dict):
            raise ClientError(
                f"{self.url} answered with something other than the push server's "
                "JSON: is WEBPUSH_URL the push server's address?"
            )
        return answer


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows, the first a header, in columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _duration(text: str) -> int:
    """Seconds in ``90d``, ``12h``, ``30m``, ``2w`` or ``3600``."""
    match = DURATION_RE.fullmatch(text.strip())
    if not match:
        raise ClientError(
            f"--expires-in {text!r} is not a duration: give a number with s, m, h, "
            "d or w after it, such as 90d"
        )
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def _keys_command(args: argparse.Namespace, client: ApiClient) -> None:
    """``keys create|list|revoke``: what they print."""
    if args.action == "create":
        body: dict[str, Any] = {"name": args.name, "scope": args.scope}
        if args.topics:
            body["topics"] = [t for given in args.topics for t in given.split(",") if t]
        if args.expires_in:
            body["expires_in"] = _duration(args.expires_in)
        made = client.call("POST", "/keys", body)
        topics = f", topics {', '.join(made['topics'])}" if made["topics"] else ""
        expires = f"; expires {made['expires']}" if made["expires"] else ""
        print(
            f"Made the key {made['name']!r} (scope {made['scope']}{topics}{expires})."
        )
        print("It is shown this once: keep it now.")
        print(made["key"])
    elif args.action == "list":
        keys = client.call("GET", "/keys")["keys"]
        if not keys:
            print("No API keys yet (the push token is the admin key).")
            return
        rows = [("NAME", "SCOPE", "TOPICS", "CREATED", "LAST USED", "EXPIRES")]
        for key in keys:
            expires = key["expires"] or "never"
            rows.append(
                (
                    key["name"],
                    key["scope"],
                    ",".join(key["topics"] or []) or "-",
                    key["created"],
                    key["last_used"] or "never",
                    f"{expires} (expired)" if key["expired"] else expires,
                )
            )
        _print_table(rows)
    else:
        client.call("DELETE", f"/keys/{urllib.parse.quote(args.name, safe='')}")
        print(f"Revoked the key {args.name!r}: it no longer works.")


WAIT_POLL = 0.5  # seconds between looks at a notification's progress


def _outcome(document: dict) -> str:
    """A notification's outcome in a line, with its commonest error."""
    line = (
        f"{document['status']}: {document['sent']} sent, {document['failed']} "
        f"failed, {document['removed']} removed (gone) of {document['total']}"
    )
    if document.get("capped"):
        line += f", {document['capped']} not sent (their daily limit, MAX_PER_DAY)"
    if document["errors"]:
        cause = document["errors"][0]
        status = f" ({cause['status']})" if cause.get("status") else ""
        line += (
            f"; commonest error: {cause.get('reason') or 'refused'}{status} from "
            f"{cause.get('origin')}, {cause['count']} times"
        )
    return line


def _audience_words(document: dict) -> str:
    if document["audience"] in ("users", "subscriptions"):
        return f"{document['named']} {document['audience']}"
    return f"topic {document['topic']}" if document["topic"] else "everyone"


def _follow(client: ApiClient, notification_id: str, out: Any) -> dict:
    """Poll a notification until it ends, drawing its progress on ``out``:
    a bar on a terminal, else a plain line whenever it moves."""
    path = f"/notifications/{notification_id}"
    terminal, said = out.isatty(), None
    while True:
        document = client.call("GET", path)
        total = document["total"]
        done = total - document["pending"]
        if document["status"] == "scheduled":
            line = f"scheduled for {document['send_at']}; waiting"
        else:
            line = f"{document['status']}: {done} of {total} handled"
        if terminal:
            filled = round(30 * done / total) if total else 30
            bar = "#" * filled + "." * (30 - filled)
            out.write(f"\r[{bar}] {line}\033[K")
            out.flush()
        elif line != said:
            print(line, file=out, flush=True)
        said = line
        if document["status"] in FINISHED:
            if terminal:
                out.write("\n")
            return document
        time.sleep(WAIT_POLL)


def _send_command(args: argparse.Namespace, client: ApiClient) -> int:
    """``send``: the notification's id first (for scripts), then, with
    --wait, its progress and outcome; 1 when it reached none of its
    subscribers."""
    body: dict[str, Any] = {"title": args.title}
    for name in ("body", "url", "topic", "ttl", "urgency", "rate"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.local_time:
        body["send_at_local"] = args.local_time
    if args.user:
        body["users"] = args.user
    if args.subscription:
        body["subscriptions"] = args.subscription
    if args.at:
        when = DURATION_RE.fullmatch(args.at.strip())
        if when:
            body["delay"] = _duration(args.at)
        else:
            body["send_at"] = args.at
    key = {"Idempotency-Key": secrets.token_hex(16)}  # a retried request sends once
    answer = client.call("POST", "/push", body, key)
    print(answer["id"], flush=True)
    if not args.wait:
        print(
            f"{answer['status']} for {answer['subscriptions']} subscribers; "
            f"'python3 api.py status {answer['id']}' shows how it goes",
            file=sys.stderr,
        )
        return 0
    document = _follow(client, answer["id"], sys.stderr)
    print(_outcome(document))
    return 1 if document["total"] and not document["sent"] else 0


def _status_command(args: argparse.Namespace, client: ApiClient) -> int:
    path = f"/notifications/{urllib.parse.quote(args.id, safe='')}"
    document = client.call("GET", path)
    print(f"{document['title'] or '(no title)'} ({document['id']})")
    print(f"  to {_audience_words(document)}, by {document['created_by'] or '-'}")
    print(f"  created {document['created']}, finished {document['finished'] or '-'}")
    print(f"  {_outcome(document)}; {document['pending']} pending")
    print(
        f"  receipts: {document['delivered']} delivered, {document['clicked']} "
        f"clicked, {document['closed']} closed"
    )
    return 0


def _notifications_command(args: argparse.Namespace, client: ApiClient) -> int:
    found = client.call("GET", f"/notifications?limit={args.limit}")["notifications"]
    if not found:
        print("No notifications yet.")
        return 0
    rows = [("ID", "STATUS", "SENT", "FAILED", "TOTAL", "CREATED", "TITLE")]
    for d in found:
        rows.append(
            (
                d["id"],
                d["status"],
                str(d["sent"]),
                str(d["failed"]),
                str(d["total"]),
                d["created"],
                d["title"] or "-",
            )
        )
    _print_table(rows)
    return 0


def _user_token_command(args: argparse.Namespace) -> None:
    secret = os.environ.get("USER_TOKEN_SECRET", "")
    if len(secret) < 32:
        raise ClientError(
            "USER_TOKEN_SECRET is not set: set it (at least 32 characters) to the "
            "server's secret"
            if not secret
            else "USER_TOKEN_SECRET must be at least 32 characters"
        )
    if not 1 <= args.ttl <= USER_TOKEN_MAX_TTL:
        raise ClientError(
            f"--ttl must be from 1 to {USER_TOKEN_MAX_TTL} seconds (30 days)"
        )
    if not 1 <= len(args.user) <= MAX_USER_LENGTH or not args.user.isprintable():
        raise ClientError(
            f"the user id must be 1-{MAX_USER_LENGTH} printable characters"
        )
    print(sign_user_token(secret, args.user, args.ttl))


def _command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="api.py")
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser(
        "user-token",
        help="print a user token signed with USER_TOKEN_SECRET (for scripts and tests)",
        description="Print a token that binds a subscription to USER: what a "
        "site's backend makes for its signed-in user (JWT, HS256, signed with "
        "USER_TOKEN_SECRET from the environment).",
    )
    token.add_argument("user", help="the site's own id of the user")
    token.add_argument(
        "--ttl",
        type=int,
        default=86400,
        metavar="SECONDS",
        help="how long it lasts, at most 30 days (default: 86400, a day)",
    )
    keys = commands.add_parser(
        "keys",
        help="make, list and revoke API keys (needs an admin key)",
        description="API keys on the server at WEBPUSH_URL (default: this "
        "machine's, on PORT), with WEBPUSH_TOKEN (an admin key; default, for "
        "this machine's server: the push token in VAPID_DIR).",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; it is printed last, once")
    create.add_argument("--name", required=True, help="what the key is for, e.g. ci")
    create.add_argument("--scope", required=True, choices=KEY_SCOPES)
    create.add_argument(
        "--topics",
        action="append",
        metavar="TOPIC[,TOPIC]",
        help="a send key may send only to these topics",
    )
    create.add_argument(
        "--expires-in", metavar="DURATION", help="e.g. 90d, 12h, 30m (default: never)"
    )
    actions.add_parser("list", help="every key: name, scope, last used, expiry")
    revoke = actions.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("name")
    client = "on the server at WEBPUSH_URL with WEBPUSH_TOKEN (see 'keys --help')"
    send = commands.add_parser(
        "send",
        help="send a notification",
        description=f"Send a notification {client}. Prints its id; with --wait, "
        "its progress and outcome (exit status 1 when it reached none of its "
        "subscribers).",
    )
    send.add_argument("title")
    send.add_argument("--body")
    send.add_argument("--url", help="what a click opens")
    audience = send.add_mutually_exclusive_group()
    audience.add_argument("--topic", help="only this topic's subscribers")
    audience.add_argument(
        "--user", action="extend", nargs="+", metavar="ID", help="only these users"
    )
    audience.add_argument(
        "--subscription",
        action="extend",
        nargs="+",
        metavar="ID",
        help="only these subscriptions",
    )
    send.add_argument("--ttl", type=int, metavar="SECONDS")
    send.add_argument("--urgency", choices=("very-low", "low", "normal", "high"))
    send.add_argument(
        "--at",
        metavar="TIME",
        help="when: 2026-12-24T09:00:00+01:00, or a delay such as 30m",
    )
    send.add_argument(
        "--local-time",
        metavar="TIME",
        help="when each subscriber's own clock shows TIME, such as 2026-12-24T09:00",
    )
    send.add_argument(
        "--rate",
        type=int,
        metavar="N",
        help="at most N messages a minute (60 to 1000000), so clicks come gradually",
    )
    send.add_argument(
        "--wait", action="store_true", help="follow it until it ends, then say how"
    )
    status = commands.add_parser(
        "status",
        help="how a notification went",
        description=f"A notification {client}.",
    )
    status.add_argument("id")
    listing = commands.add_parser(
        "notifications",
        help="the newest notifications",
        description=f"The newest notifications {client}.",
    )
    listing.add_argument("--limit", type=int, default=20, metavar="N")
    return parser


def run_command(argv: list[str]) -> int:
    """``python3 api.py user-token|keys ...``: the commands that do not
    serve; a problem is one line on stderr and a non-zero exit status."""
    # An id made before ids avoided a leading "-" is an id, not an option.
    if argv[:1] == ["status"] and len(argv) == 2 and argv[1] not in ("-h", "--help"):
        argv = ["status", "--", argv[1]]
    args = _command_parser().parse_args(argv)
    commands = {
        "send": _send_command,
        "status": _status_command,
        "notifications": _notifications_command,
        "keys": _keys_command,
    }
    try:
        if args.command == "user-token":
            _user_token_command(args)
            return 0
        return commands[args.command](args, ApiClient(dict(os.environ))) or 0
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if args.command == "user-token" else 1
    except KeyboardInterrupt:  # Ctrl-C while --wait follows it: it goes on
        print("\nstopped following; the notification goes on", file=sys.stderr)
        return 130
    except BrokenPipeError:  # "| head": the reader has all it wanted
        sys.stderr.close()
        return 0


def port_problem(host: str, port: int) -> str | None:
    """Why this process could not listen on ``host:port`` (another program
    holds it, say), found before anything is printed or made; None if free."""
    name = host.strip("[]")  # as waitress takes them: "[::1]", and "*" for all
    try:
        found = socket.getaddrinfo(
            None if name in ("", "*") else name,
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except (socket.gaierror, UnicodeError) as e:
        return f"HOST={host!r} is not an address of this machine ({e})"
    for family, kind, protocol, _, address in found:  # waitress binds them all
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as waitress: IPv6 apart from IPv4
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"port {port} is in use by another program: stop it, or start "
                    f"this server with another PORT (PORT={port + 1} python3 api.py)"
                )
            if e.errno == errno.EAFNOSUPPORT:  # no IPv6 here: waitress says so
                continue
            return f"cannot listen on {host}:{port}: {e.strerror}"
    return None


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena, which
    keeps what it once held: with the engine's threads, 9 MB more at the peak
    of a 100,000-subscriber fan-out (bench/fanout.py). Two are enough here
    (M_ARENA_MAX, as MALLOC_ARENA_MAX=2 would); elsewhere nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # -8: M_ARENA_MAX


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "MALLOC_ARENA_MAX" not in os.environ:  # an operator's own choice wins
        _few_malloc_arenas()
    if argv[:1] == ["--delivery-process"]:  # started by the server, not by people
        return delivery_process(int(argv[1]))
    if argv[:1] and argv[0] in CLIENT_COMMANDS:
        return run_command(argv)
    try:
        settings, modes = parse_args(argv)
        settings.check()
        if modes["worker"] and not settings.redis_url:
            raise SettingError(
                "--worker takes its work from Redis: set REDIS_URL (with the JSON "
                "store, python api.py delivers by itself)"
            )
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serving = not any(modes.values())
    problem = port_problem(settings.host, settings.port) if serving else None
    if problem:  # said first: no key made, no token printed for a server that is not
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # waitress warns at every queued request once its threads are busy: noise under load.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if settings.demo_users:
        log.warning(
            "DEMO_USERS=true: %s",
            "POST /demo/user-token lets anyone sign in as anyone; never in production"
            if settings.user_token_secret
            else "ignored, as USER_TOKEN_SECRET is not set",
        )
    if modes["migrate_store"]:
        return migrate_store(settings, modes["migrate_store"])
    if modes["worker"]:
        return run_worker(settings)
    if modes["repair_store"]:
        for path in (Path(settings.subscriptions_file), settings.journal_path):
            if not path.exists():
                continue
            try:
                kept, moved, side = repair_store(path)
            except (StoreLocked, OSError) as e:
                log.error("cannot repair %s: %s", path, e)
                return 2
            log.info(
                "%s: %d records kept, %d damaged lines moved to %s",
                path,
                kept,
                moved,
                side or "(none)",
            )
        return 0
    try:
        store = open_store(settings)
    except (StoreLocked, StoreDamaged, SettingError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # an unwritable directory, say
        log.error("cannot open the store %s: %s", settings.subscriptions_file, e)
        return 2
    journal = None
    try:
        if not settings.redis_url:
            journal = NotificationJournal(settings.journal_path)
    except (StoreLocked, StoreDamaged, OSError) as e:
        log.error("cannot open the notification journal: %s", e)
        store.close()
        return 2
    try:
        keys = VapidKeys.load_or_create(settings)
        token, generated = load_or_create_token(settings)
        receipt_key = receipt_key_of(settings, keys)
        if isinstance(store, RedisSubscriptionStore):
            store.claim_identity(keys.public_key, token, receipt_key)
    except (OSError, SettingError) as e:
        if isinstance(e, OSError) and not isinstance(e, StoreUnavailable):
            log.error("cannot read or write the keys in %s: %s", settings.vapid_dir, e)
        else:
            log.error("%s", e)
        store.close()
        if journal is not None:
            journal.close()
        return 2
    warning = subject_warning(settings.vapid_subject)
    if warning:
        log.warning("%s", warning)
    if not settings.api_delivers and not settings.redis_url:
        log.warning(
            "API_DELIVERS=false is for Redis, where --worker processes deliver: "
            "with the JSON store this process delivers all the same"
        )
    if settings.push_endpoint_pattern:
        log.warning(
            "push endpoint allowlist replaced by PUSH_ENDPOINT_PATTERN=%r",
            settings.push_endpoint_pattern,
        )
    # Before create_app: its delivery processes inherit the limit.
    _raise_open_file_limit(settings.connection_limit + settings.push_concurrency + 256)
    try:
        app = create_app(settings, keys, store, token, journal, receipt_key)
    except (SettingError, StoreUnavailable, StoreDamaged) as e:  # FCM, Redis, receipts
        log.error("%s", e)
        store.close()
        if journal is not None:
            journal.close()
        return 2

    url = f"http://{settings.host}:{settings.port}"
    log.info("VAPID key: %s (public %s...)", keys.source, keys.public_key[:12])
    log.info("store: %s, %d subscriptions", store_name(settings), len(store))
    token_file = Path(settings.vapid_dir) / PUSH_TOKEN_FILE
    if settings.push_token:
        log.info("push token: from PUSH_TOKEN")
        shown_token = "$PUSH_TOKEN"
    elif generated:
        print(
            f"Generated a push token, kept in {token_file} (mode 0600):\n  {token}",
            flush=True,
        )
        shown_token = token
    else:
        log.info("push token: %s", token_file)
        shown_token = f"$(cat {token_file})"
    print(
        f"Send a notification to every subscriber:\n"
        f'  curl -X POST {url}/push -H "Authorization: Bearer {shown_token}" '
        f"-H 'Prefer: wait=10' "
        f'-H \'Content-Type: application/json\' -d \'{{"title": "Hello", "body": "It works"}}\'',
        flush=True,
    )

    in_flight = app.config["webpush.in_flight"]
    request_threads = RequestThreads()
    request_threads.set_thread_count(settings.threads)
    try:
        wsgi = AccessLog(in_flight, settings.trusted_proxies)
        server = waitress.create_server(
            wsgi if settings.access_log else in_flight,
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
            _dispatcher=request_threads,  # waitress's way to give its threads
            ident="webpush",
            # waitress drops X-Forwarded-For unless told not to; the rate limit
            # believes it only from TRUSTED_PROXIES (client_address).
            clear_untrusted_proxy_headers=not settings.trusted_proxies,
            # Idle and slow connections cost a socket each, no thread; poll(),
            # unlike select(), takes file descriptors past 1024.
            connection_limit=settings.connection_limit,
            asyncore_use_poll=True,
            channel_timeout=60,
            # Refused from the Content-Length (or as a chunked body passes it),
            # before the rest is read; each route's own limit is checked after.
            max_request_body_size=max(
                settings.max_body_bytes, settings.max_webhook_bytes
            ),
        )
        for listener in getattr(server, "map", {}).values() or [server]:
            if isinstance(listener, waitress.server.BaseWSGIServer):
                listener.channel_class = JsonErrorChannel
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, e)
        request_threads.shutdown(timeout=0)
        app.config["webpush.close"]()
        return 2
    if (STATIC_DIR / "index.html").is_file():  # bound and listening
        log.info("serving on %s (demo page at %s/, console at %s/admin)", url, url, url)
    else:
        log.info(
            "serving on %s; no static/ beside api.py, so no demo page or console "
            "(the API works without them)",
            url,
        )

    stopping = threading.Event()  # a signal came: drain, then stop
    drained = threading.Event()  # drained (or timed out): stop the loop now
    # The whole stop ends by one deadline: SHUTDOWN_TIMEOUT after the signal.
    stop_by = math.inf

    def on_signal(signum: int, frame: Any) -> None:
        """SIGTERM or SIGINT: drain in a thread; once it is done (or at a second
        signal), end waitress's loop from here, the main thread. Handled
        explicitly, so it works when started in the background, where SIGINT
        arrives ignored."""
        if drained.is_set() or stopping.is_set():
            if not drained.is_set():  # a second signal: stop at once
                request_threads.deadline = time.monotonic()
            drained.set()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: not in the cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise SystemExit  # waitress's run() returns on it
        stopping.set()
        threading.Thread(target=drain, name="shutdown", daemon=True).start()

    def drain() -> None:
        nonlocal stop_by
        log.info(
            "stopping: finishing requests and messages in flight (%g s at most)",
            settings.shutdown_timeout,
        )
        deadline = stop_by = time.monotonic() + settings.shutdown_timeout
        # The waits end early enough to close everything by the deadline; a
        # request still under way then has half of that time to be answered.
        closing = closing_time(settings.shutdown_timeout)
        waits_end = deadline - closing
        request_threads.deadline = deadline - closing / 2
        in_flight.draining = True  # new requests get 503 from now
        if not app.config["webpush.queue"].stop(max(0.0, waits_end - time.monotonic())):
            log.warning(
                "messages still in flight after SHUTDOWN_TIMEOUT: their subscribers "
                "get them again at the next start"
            )
        if not in_flight.drain(max(0.0, waits_end - time.monotonic())):
            log.warning(
                "requests still under way after SHUTDOWN_TIMEOUT; stopping anyway"
            )
            # Those waiting on delivery (test notifications) are answered now.
            app.config["webpush.delivery"].close(closing / 2)
        if not drained.is_set():  # a second signal may have stopped it already
            drained.set()
            os.kill(os.getpid(), signal.SIGTERM)  # wake the main thread's handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()  # returns on SystemExit, after its threads finish
    finally:
        left = stop_by - time.monotonic()
        app.config["webpush.close"](0, max(0.0, left) if left < math.inf else 1.0)
    log.info("stopped")
    if not in_flight.idle:  # abandoned after SHUTDOWN_TIMEOUT: exit without
        logging.shutdown()  # waiting for it, as the interpreter's exit would
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
