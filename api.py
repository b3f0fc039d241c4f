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
# ]
# ///
"""A self-hosted Web Push server in one file.

Copy ``api.py``, ``static/`` and ``requirements.txt``, then run ``python api.py``.
It keeps a VAPID key pair in ``vapid/``, stores browser push subscriptions and
native-app FCM tokens in a JSON-lines file, fans notifications out to them
(RFC 8030/8291/8292: pywebpush's encryption, py_vapid, libcurl over HTTP/2;
FCM HTTP v1 with pyfcm),
and turns signed webhooks into notifications.

Sections, top to bottom, each using only those above it:
Configuration, Keys, Store, Delivery, Webhooks, HTTP, Command line.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import heapq
import hmac
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
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import bottle
import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.service_account
import http_ece
import pycurl
import pyfcm.errors
import requests
import requests.adapters
import waitress
import waitress.channel
import waitress.server
import waitress.task
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid, VapidException
from pyfcm import FCMNotification

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

    def check(self) -> None:
        """SettingError naming the first setting the server cannot run with."""
        for f in dataclasses.fields(self):
            checker = f.metadata["check"]
            problem = checker(getattr(self, f.name)) if checker else None
            if problem:
                raise SettingError(
                    f"{f.metadata['env']}={getattr(self, f.name)!r} {problem}"
                )

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
                return keys
        return cls._create(directory, subject)

    @classmethod
    def _create(cls, directory: Path, subject: str) -> VapidKeys:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        keys = cls(
            ec.generate_private_key(ec.SECP256R1()),
            subject,
            str(directory / PRIVATE_PEM),
        )
        _write_secret(directory / PRIVATE_PEM, keys.private_pem())
        (directory / PUBLIC_TXT).write_text(keys.public_key + "\n")
        log.info("generated a new VAPID key pair in %s", directory)
        return keys

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


def load_or_create_token(settings: Settings) -> tuple[str, bool]:
    """The admin token and whether it was just generated."""
    if settings.push_token:
        return settings.push_token, False
    path = Path(settings.vapid_dir) / PUSH_TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, False
        raise SettingError(f"{path} is empty; delete it to have a new token made")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    _write_secret(path, (token + "\n").encode())
    return token, True


###############################################################################
# Store #######################################################################
###############################################################################


class StoreLocked(Exception):
    """Another process holds the subscription file."""


class StoreDamaged(Exception):
    """The subscription file has a bad record before its last line."""


def _lock_file(path: Path, what: str = "file") -> Any:
    """Hold an exclusive lock on ``path`` for as long as the returned file is open."""
    handle = open(path, "a+b")  # noqa: SIM115 - it must outlive this function
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            _flock(handle.fileno(), path, what)
    except BaseException:
        handle.close()
        raise
    return handle


def _flock(fd: int, path: Path, what: str = "file") -> None:
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
            "stop it, or give this one another SUBSCRIPTIONS_FILE"
        ) from None


@dataclass(eq=False)
class _Write:
    """Appended lines not yet known to be on disk, and how to undo them."""

    seq: int
    previous: dict[str, bytes | None]  # each id's line before; None: there was none
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
    WHAT = "file"  # what the messages call it

    def __init__(self, path: str | Path):
        # Resolved, so a symlink meets the same lock file; the lock on the data
        # file itself covers hard links.
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_handle = _lock_file(
            self.path.with_name(self.path.name + ".lock"), self.WHAT
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

    def upsert(self, record: dict) -> bool:
        """Store ``record`` (it must have an ``id``); True when the id is new."""
        with self._mutex:
            new = record["id"] not in self._records
        self.write([record])
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
        lines = [(r["id"], _record_line(r).encode("utf-8"), r) for r in upserts]
        with self._mutex:
            removals = [i for i in removals if i in self._records]
            if not lines and not removals:
                return
            data = b"".join(line + b"\n" for _, line, _ in lines)
            data += b"".join(
                json.dumps({"id": i, "deleted": True}).encode() + b"\n"
                for i in removals
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
        self._wait_synced(write)

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
            _flock(fd, self.path, self.WHAT)
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
            write = _Write(self._written, previous)
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
                self._lines -= len(write.previous)
            self._size = self._synced_size
            self._synced = self._written
            self._pending.clear()
            self._sync.notify_all()


class SubscriptionStore(JsonLinesStore):
    """Push subscriptions and FCM tokens by id (see JsonLinesStore), with an
    index of each one's channel, push service origin and topics, so a fan-out
    can be planned without reading every record."""

    WHAT = "subscription file"

    def __init__(self, path: str | Path):
        self._index: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._kinds: collections.Counter[str] = collections.Counter()
        self._origins: dict[str, str] = {}  # one string per origin, shared
        super().__init__(path)

    def count(self, kind: str) -> int:
        """How many records of a kind (a record's ``kind``, "webpush" if it has none)."""
        return self._kinds[kind]

    def list(self, topic: str | None = None) -> list[dict]:
        """The records, all or those subscribed to ``topic``."""
        with self._mutex:
            lines = [
                self._records[i]
                for i, (_, topics) in self._index.items()
                if topic is None or topic in topics
            ]
        return [json.loads(line) for line in lines]

    def ids_by_origin(self, topic: str | None = None) -> dict[str, list[str]]:
        """The ids of the records, all or those subscribed to ``topic``, by push
        service origin ("fcm" for FCM tokens)."""
        plan: dict[str, list[str]] = {}
        with self._mutex:
            for record_id, (origin, topics) in self._index.items():
                if topic is None or topic in topics:
                    plan.setdefault(origin, []).append(record_id)
        return plan

    def _put(self, record_id: str, line: bytes, record: dict) -> None:
        super()._put(record_id, line, record)
        kind = record.get("kind", "webpush")
        origin = "fcm" if kind == "fcm" else endpoint_origin(record.get("endpoint", ""))
        origin = self._origins.setdefault(origin, origin)
        self._index[record_id] = (origin, tuple(record.get("topics") or ()))
        self._kinds[kind] += 1

    def _drop(self, record_id: str) -> None:
        super()._drop(record_id)
        entry = self._index.pop(record_id, None)
        if entry is not None:
            self._kinds["fcm" if entry[0] == "fcm" else "webpush"] -= 1


def endpoint_origin(endpoint: str) -> str:
    """A push endpoint's scheme and host: what one push service shares."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return ""
    return f"{parts.scheme}://{parts.netloc}"


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
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb", opener=_private_opener) as f:
            f.write(b"".join(line + b"\n" for line in good))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        lock.close()
    store = SubscriptionStore(path)  # the replay keeps the last state of each id
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


###############################################################################
# Delivery ####################################################################
###############################################################################

# One 4096-byte aes128gcm record, less its header (86), tag and delimiter (17).
MAX_PLAINTEXT = 3993
MAX_RESPONSE_BYTES = 65536  # a push service's answer is a status and a short reason
URGENCIES = ("very-low", "low", "normal", "high")
RETRY_TRIES = 3
CHANNELS = ("webpush", "fcm")
RETRY_MAX_WAIT = 30.0
START_BATCH = 64  # messages encrypted and started between two looks at the answers


# What a POST /push body may say (the HTTP section's Validator reads them).
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
)


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


@dataclass
class PushOutcome:
    """What happened to one subscriber."""

    record_id: str
    origin: str
    status: int | None  # HTTP status from the push service; None: no answer
    result: str  # sent, failed or removed
    reason: str = ""
    tries: int = 1
    channel: str = "webpush"  # or fcm


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


def _retry_delay(retry_after: str | None, attempt: int) -> float:
    """Seconds to wait before retry ``attempt``: Retry-After when given, else backoff."""
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
    return min(0.5 * 2**attempt, RETRY_MAX_WAIT)


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
        self, keys: VapidKeys, per_origin: int, timeout: float, pattern: str = ""
    ):
        self.keys = keys
        # Checked again at each send: a stored endpoint that a changed allowlist
        # (PUSH_ENDPOINT_PATTERN) no longer admits gets nothing.
        self.pattern = re.compile(pattern) if pattern else None
        self._allowed_origins: dict[str, bool] = {}
        self.per_origin = max(1, per_origin)
        self.timeout = timeout
        self._inbox: collections.deque[tuple[list[dict], _Batch]] = collections.deque()
        self._waiting: dict[str, collections.deque[_PushJob]] = {}
        self._in_flight: dict[str, int] = collections.defaultdict(int)
        self._retries: list[tuple[float, int, _PushJob]] = []  # a heap by due time
        self._free: list[pycurl.Curl] = []
        self._busy: set[pycurl.Curl] = set()  # handles libcurl is working on
        self._ca = _ca_options()
        self._selector = selectors.DefaultSelector()
        self._timer: float | None = None  # when libcurl wants socket_action(TIMEOUT)
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
        self, records: list[dict], message: Message
    ) -> concurrent.futures.Future:
        """Deliver ``message`` to ``records``; the future gives their outcomes."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        batch = _Batch(message, len(records), future)
        with self._wake_lock:
            if self._closing:  # nothing will deliver them now
                for record in records:
                    self._settle(_PushJob(record, "", batch), None, "stopping")
            elif records:
                self._inbox.append((records, batch))
                self._wake()
            else:
                future.set_result([])
        return future

    def close(self) -> None:
        with self._wake_lock:
            if self._closing:
                return
            self._closing = True
            self._wake()
        self._thread.join(timeout=5)

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
            self._abandon("the server stopped before it was sent")
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
        self._finish_done()
        self._requeue_due_retries()

    def _abandon(self, reason: str) -> None:
        """Settle every message not yet delivered as failed, so no caller waits
        for ever on a loop that has stopped."""
        self._take_new()
        jobs = [job for waiting in self._waiting.values() for job in waiting]
        jobs += [job for _, _, job in self._retries]
        for handle in self._busy:
            self._multi.remove_handle(handle)
            jobs.append(handle.job)
        for job in jobs:
            self._settle(job, None, reason)

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
            records, batch = self._inbox.popleft()
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
                self._waiting.setdefault(job.origin, collections.deque()).append(job)

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
        """Start what the limits allow, a batch at a time; True if more could start."""
        started = 0
        for origin, waiting in self._waiting.items():
            while waiting and self._in_flight[origin] < self.per_origin:
                if started == START_BATCH:
                    return True
                self._start(waiting.popleft())
                started += 1
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
                job.body = encrypt_message(job.record, job.batch.message.payload)
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
        if error is not None:
            reason, retryable = _curl_reason(*error, self.timeout)
            status, retry_after = None, None
        else:
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            reason = job.answer[:200].decode("utf-8", "replace").strip()
            retryable = status == 429 or status >= 500
            retry_after = handle.getinfo(pycurl.RETRY_AFTER) or None
        self._free.append(handle)
        if retryable and job.attempt < RETRY_TRIES:
            delay = _retry_delay(retry_after and str(retry_after), job.attempt)
            heapq.heappush(self._retries, (time.monotonic() + delay, id(job), job))
            return
        self._settle(job, status, reason)

    def _settle(self, job: _PushJob, status: int | None, reason: str) -> None:
        if status in (200, 201, 202):
            result, reason = "sent", ""
        elif status in (404, 410):
            result = "removed"
        else:
            result = "failed"
        batch = job.batch
        batch.outcomes.append(
            PushOutcome(
                job.record["id"], job.origin, status, result, reason, job.attempt
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


def _start_delivery_process(
    pem: bytes, subject: str, per_origin: int, timeout: float, pattern: str
) -> None:
    """Initializer of a delivery process: build its delivery loop once, and make
    the process end with the server, even one killed with SIGKILL."""
    global _process_delivery
    # Ctrl-C and a service manager's SIGTERM reach the whole process group:
    # the server decides when delivery stops, and these end with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent.sentinel,), daemon=True
        ).start()
    key = serialization.load_pem_private_key(pem, password=None)
    keys = VapidKeys(key, subject, "parent process")  # type: ignore[arg-type]
    _process_delivery = WebPushDelivery(keys, per_origin, timeout, pattern)


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _deliver_in_process(records: list[dict], message: Message) -> list[PushOutcome]:
    return _process_delivery.submit(records, message).result()


_process_delivery: WebPushDelivery


class _OneAttemptFcm(FCMNotification):
    """pyfcm, one attempt per call. Its own ``send_request`` sleeps on every
    Retry-After and tries again without a bound; FcmSender retries instead, a
    bounded number of times. The OAuth token is fetched under a lock and shared
    by all threads while it is valid (pyfcm would refresh the one credentials
    object from every thread at once)."""

    _token_lock = threading.Lock()

    def _get_access_token(self) -> str:
        with self._token_lock:
            if not self.credentials.valid:
                try:
                    self.credentials.refresh(google.auth.transport.requests.Request())
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
            self.thread_local.token_expiry = 0  # fetch a new token, then once more
            response = self.requests_session.post(
                self.fcm_end_point, data=payload, timeout=timeout
            )
        return response


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
    return {
        "notification_title": note.get("title"),
        "notification_body": note.get("body"),
        "notification_image": note.get("icon"),
        "data_payload": values or None,
        "android_config": android,
        "apns_config": {"headers": apns_headers},
    }


class FcmSender:
    """Sends to native-app FCM tokens with pyfcm (FCM HTTP v1), on bounded threads:
    pyfcm is blocking, with one requests session and OAuth token per thread."""

    def __init__(self, settings: Settings):
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
        self.client = _OneAttemptFcm(
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
        self._threads = concurrent.futures.ThreadPoolExecutor(
            settings.fcm_threads, thread_name_prefix="fcm"
        )

    def submit(
        self, records: list[dict], message: Message
    ) -> list[concurrent.futures.Future]:
        options = fcm_message_options(message)
        return [self._threads.submit(self._send_one, r, options) for r in records]

    def _send_one(self, record: dict, options: dict) -> PushOutcome:
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
                response = self.client.send_request(payload, self.timeout)
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
            time.sleep(_retry_delay(retry_after, attempt))

    def close(self, wait: bool = True) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=True)


class PushSender:
    """Fans a message out to web push subscriptions and FCM tokens, both at
    once, and applies the outcomes to the store.

    Encryption and TLS are CPU work that one Python process does on one core,
    so with PUSH_PROCESSES > 1 each web push fan-out is split across that many
    delivery processes, each with its own WebPushDelivery; with 1, one
    WebPushDelivery in this process delivers. FCM tokens go through
    FcmSender's threads when FCM is configured, and are skipped when it is
    not. HTTP worker threads call :meth:`send` and wait only for their own push.
    """

    def __init__(self, keys: VapidKeys, store: SubscriptionStore, settings: Settings):
        self.store = store
        self.keys = keys
        self.settings = settings
        self.processes = max(1, settings.push_processes)
        # PUSH_CONCURRENCY is per push service, shared by the delivery processes.
        self.per_origin = max(1, settings.push_concurrency // self.processes)
        self.fcm = FcmSender(settings) if settings.fcm_service_account else None
        if self.processes > 1:
            self._replacing = threading.Lock()
            self._executor = self._start_processes()
        else:
            self._delivery = WebPushDelivery(
                keys,
                self.per_origin,
                settings.push_timeout,
                settings.push_endpoint_pattern,
            )

    def _start_processes(self) -> concurrent.futures.ProcessPoolExecutor:
        executor = concurrent.futures.ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_delivery_process,
            initargs=(
                self.keys.private_pem(),
                self.keys.subject,
                self.per_origin,
                self.settings.push_timeout,
                self.settings.push_endpoint_pattern,
            ),
        )
        for _ in range(self.processes):  # start them now, not on the first push
            executor.submit(time.sleep, 0.05)
        return executor

    def send(self, records: list[dict], message: Message) -> PushReport:
        """Deliver ``message`` to every record and wait for all outcomes."""
        web = [r for r in records if r.get("kind", "webpush") == "webpush"]
        tokens = [r for r in records if r.get("kind") == "fcm"]
        fcm_futures = self.fcm.submit(tokens, message) if self.fcm and tokens else []
        if self.processes > 1:
            outcomes = self._send_in_processes(web, message)
        else:
            outcomes = self._delivery.submit(web, message).result()
        outcomes += [future.result() for future in fcm_futures]
        for outcome in outcomes:
            if outcome.result == "removed":
                try:
                    self.store.remove(outcome.record_id)
                except OSError as e:  # kept, and removed at its next 404 or 410
                    log.warning("cannot remove %s yet: %s", outcome.record_id, e)
                    continue
                log.info(
                    "removed subscription %s: %s answered %s",
                    outcome.record_id,
                    outcome.origin,
                    outcome.status,
                )
            elif outcome.result == "failed":
                log.warning(
                    "push to %s failed (subscription %s): %s %s",
                    outcome.origin,
                    outcome.record_id,
                    outcome.status or "no answer",
                    outcome.reason,
                )
        return PushReport(outcomes)

    def _send_in_processes(
        self, records: list[dict], message: Message
    ) -> list[PushOutcome]:
        """Split round-robin, so each process gets a share of every push service."""
        parts = [records[i :: self.processes] for i in range(self.processes)]
        executor = self._executor
        futures = []
        for part in filter(None, parts):
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:  # a process that died while idle breaks the pool: submit raises
                future = executor.submit(_deliver_in_process, part, message)
            except concurrent.futures.process.BrokenProcessPool as e:
                future.set_exception(e)
            futures.append((part, future))
        outcomes: list[PushOutcome] = []
        for part, future in futures:
            try:
                outcomes += future.result()
            except concurrent.futures.process.BrokenProcessPool:
                outcomes += [
                    PushOutcome(
                        r["id"],
                        endpoint_origin(r["endpoint"]),
                        None,
                        "failed",
                        "a delivery process died",
                    )
                    for r in part
                ]
                self._replace_broken(executor)
        return outcomes

    def _replace_broken(self, executor: concurrent.futures.Executor) -> None:
        with self._replacing:
            if self._executor is executor:  # not already replaced by another push
                log.error("a delivery process died; starting new ones")
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._start_processes()

    def close(self, wait: bool = True) -> None:
        """Stop delivering; ``wait=False`` abandons what is under way (the
        delivery processes end with this one)."""
        if self.fcm:
            self.fcm.close(wait)
        if self.processes > 1:
            self._executor.shutdown(wait=wait, cancel_futures=True)
        else:
            self._delivery.close()


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
    """A generic webhook's body is POST /push's, every field of it."""
    return {k: payload[k] for k in PUSH_FIELDS if k in payload}


@on_webhook("github", "push")
def github_push(payload: dict) -> dict | None:
    commits = payload.get("commits") or []
    if payload.get("deleted") or not commits:
        return None
    branch = payload.get("ref", "").removeprefix("refs/heads/")
    head = payload.get("head_commit") or commits[-1]
    who = (payload.get("pusher") or {}).get("name", "someone")
    count = f"{len(commits)} commit{'s' if len(commits) != 1 else ''}"
    return {
        "title": f"{payload['repository']['full_name']}: {count} pushed to {branch}",
        "body": f"{who}: {_short(head.get('message'))}",
        "url": payload.get("compare") or head.get("url"),
    }


@on_webhook("github", "pull_request")
def github_pull_request(payload: dict) -> dict | None:
    pr, action = payload["pull_request"], payload.get("action")
    if action == "closed":
        action = "merged" if pr.get("merged") else "closed"
    if action not in ("opened", "reopened", "ready_for_review", "merged", "closed"):
        return None
    return {
        "title": f"{payload['repository']['full_name']}: pull request #{pr['number']} {action.replace('_', ' ')}",
        "body": _short(pr.get("title")),
        "url": pr.get("html_url"),
    }


@on_webhook("github", "issues")
def github_issue(payload: dict) -> dict | None:
    issue, action = payload["issue"], payload.get("action")
    if action not in ("opened", "reopened", "closed"):
        return None
    return {
        "title": f"{payload['repository']['full_name']}: issue #{issue['number']} {action}",
        "body": _short(issue.get("title")),
        "url": issue.get("html_url"),
    }


@on_webhook("github", "release")
def github_release(payload: dict) -> dict | None:
    release = payload["release"]
    if payload.get("action") != "published":
        return None
    return {
        "title": f"{payload['repository']['full_name']}: release {release.get('tag_name')}",
        "body": _short(release.get("name") or release.get("body")),
        "url": release.get("html_url"),
    }


@on_webhook("github", "workflow_run")
def github_failed_workflow(payload: dict) -> dict | None:
    run = payload["workflow_run"]
    if payload.get("action") != "completed" or run.get("conclusion") != "failure":
        return None
    return {
        "title": f"{payload['repository']['full_name']}: {run.get('name', 'workflow')} failed",
        "body": f"on {run.get('head_branch')}: {_short(run.get('display_title'))}",
        "url": run.get("html_url"),
    }


class DeliveryIds:
    """The last ``size`` delivery ids seen, so a repeated delivery is sent once."""

    def __init__(self, size: int = 10_000):
        self.size = size
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, delivery: str) -> bool:
        with self._lock:
            if delivery in self._seen:
                return False
            self._seen[delivery] = None
            if len(self._seen) > self.size:
                self._seen.popitem(last=False)
            return True


###############################################################################
# HTTP ########################################################################
###############################################################################

TOPIC_RE = re.compile(r"[A-Za-z0-9_.\-]+")
FCM_TOKEN_RE = re.compile(r"[A-Za-z0-9_:.\-]{1,4096}")
COLLAPSE_KEY_RE = re.compile(r"[A-Za-z0-9_\-]{1,32}")
MAX_TTL = 28 * 86400
STATIC_DIR = HERE / "static"


def notification_json(notification: dict) -> bytes:
    """What a browser's service worker receives."""
    return json.dumps(notification, separators=(",", ":"), ensure_ascii=False).encode()


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


def strict_json(raw: bytes | str, what: str) -> Any:
    """JSON that can be stored and sent on as it is, or ApiError (400): UTF-8,
    no NaN or Infinity (nor a number too large for a float), no lone surrogate
    escapes, nesting within Python's recursion limit."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float
        )
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ApiError(
            400,
            f"{what} is not valid JSON (UTF-8, finite numbers, no lone surrogates); "
            "send Content-Type: application/json",
        ) from None
    return value


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

    def subscription(self, body: dict) -> dict:
        """A stored-record dict from a PushSubscription body (or the blog's
        ``{"subscription_token": ...}`` form)."""
        sub = body
        if "subscription_token" in body:
            sub = body["subscription_token"]
            if isinstance(sub, str):
                sub = strict_json(sub, "subscription_token")
        if not isinstance(sub, dict):
            raise ApiError(
                400,
                "the subscription must be a JSON object, as PushSubscription.toJSON() gives it",
            )
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
        return {
            "id": subscription_id(endpoint),
            "endpoint": endpoint,
            "keys": {"p256dh": b64url_encode(p256dh), "auth": b64url_encode(auth)},
            "expirationTime": expiration,
            "topics": self.topics(body.get("topics", sub.get("topics"))),
        }

    def replaces(self, body: dict) -> str:
        """The record id of the old endpoint a rotated subscription replaces
        (pushsubscriptionchange)."""
        old = body["replaces"]
        if not isinstance(old, str) or not 0 < len(old) <= MAX_ENDPOINT_LENGTH:
            raise ApiError(
                400, "'replaces' must be the endpoint of the old subscription"
            )
        return endpoint_id(old)

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

    def push(self, body: dict) -> tuple[Message, str | None]:
        """The message and topic of a POST /push body."""
        text = {}
        for name in ("title", "body", "icon", "url", "message"):
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
        notification = {
            "title": text["title"] or "Notification",
            "body": text["body"] or "",
            "icon": text["icon"],
            "url": text["url"],
            "data": body.get("data"),
        }
        payload = notification_json(notification)
        if len(payload) > MAX_PLAINTEXT:
            raise ApiError(
                413,
                f"the notification is {len(payload)} bytes as JSON, {len(payload) - MAX_PLAINTEXT} "
                f"over the {MAX_PLAINTEXT}-byte limit of an encrypted push message; shorten it",
            )
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
        topic = body.get("topic")
        if topic is not None:
            self.topic(topic)
        return Message(notification, payload, ttl, urgency, collapse_key), topic


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
                    bottle.request.path,
                    e,
                )
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    bottle.response.status = 507
                    return {
                        "error": "the server's disk is full: nothing was stored; "
                        "try again once space is freed"
                    }
                bottle.response.status = 503
                return {
                    "error": "the subscription store cannot be written, so nothing "
                    "was stored; see the server log"
                }
            except Exception:
                log.exception(
                    "error in %s %s", bottle.request.method, bottle.request.path
                )
                bottle.response.status = 500
                return {"error": "internal error; see the server log"}

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


class RateLimitPlugin:
    """Bottle plugin: a token bucket per client on routes marked ``rate_limited``;
    over the limit, 429 with Retry-After."""

    name = "rate_limit"
    api = 2

    def __init__(self, per_minute: int, trusted_proxies: str):
        self.per_minute = per_minute
        self.trusted = address_set(trusted_proxies)
        self._buckets: dict[str, tuple[float, float]] = {}  # client: (tokens, when)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when ``client`` may go on, else the seconds until it may."""
        now = time.monotonic()
        rate = self.per_minute / 60
        with self._lock:
            if (
                len(self._buckets) > 100_000
            ):  # forget clients whose buckets are full again
                full = now - self.per_minute / rate
                self._buckets = {c: b for c, b in self._buckets.items() if b[1] > full}
            tokens, when = self._buckets.get(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - when) * rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / rate
            self._buckets[client] = (tokens - 1, now)
            return 0.0

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        if not self.per_minute or not route.config.get("rate_limited"):
            return callback

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = client_address(bottle.request.environ, self.trusted)
            wait = self.take(client)
            if wait:
                bottle.response.set_header("Retry-After", str(math.ceil(wait)))
                log.warning(
                    "rate limit: %s %s from %s",
                    bottle.request.method,
                    bottle.request.path,
                    client,
                )
                raise ApiError(
                    429,
                    f"too many subscription changes from {client}; try again in {math.ceil(wait)} s",
                )
            return callback(*args, **kwargs)

        return wrapper


class InFlight:
    """WSGI wrapper that counts work under way (requests, and the background
    fan-outs webhooks start) and, once draining, answers new requests 503, so a
    shutdown can wait for the rest."""

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


class AccessLog:
    """WSGI wrapper that logs one line per request once its answer is sent:
    client, method, path (never the query, which may carry secrets), status,
    bytes and milliseconds."""

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
            self.log.info(
                '%s "%s %s" %s %d %.0fms',
                client_address(environ, self.trusted),
                environ.get("REQUEST_METHOD", "-")[:16],
                # escaped: a %0a in a path must not forge a line of its own
                environ.get("PATH_INFO", "-")[:200].encode("unicode_escape").decode(),
                status[0],
                sent,
                (time.monotonic() - started) * 1000,
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


class JsonErrorChannel(waitress.channel.HTTPChannel):
    error_task_class = JsonErrorTask


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
    headers = "Content-Type, Authorization"

    def __init__(self, origins: str):
        self.origins = {o.strip() for o in origins.split(",") if o.strip()}

    def add_headers(self) -> None:
        origin = bottle.request.headers.get("Origin")
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


def read_json(max_bytes: int) -> dict:
    """The request body as a JSON object, or ApiError (400, 413)."""
    return parse_json(read_body(max_bytes))


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


def create_app(
    settings: Settings | None = None,
    keys: VapidKeys | None = None,
    store: SubscriptionStore | None = None,
    token: str | None = None,
) -> bottle.Bottle:
    """The WSGI application. Anything not given is made from ``settings``."""
    settings = settings or Settings.from_env()
    keys = keys if keys is not None else VapidKeys.load_or_create(settings)
    store = (
        store if store is not None else SubscriptionStore(settings.subscriptions_file)
    )
    token = token if token is not None else load_or_create_token(settings)[0]
    sender = PushSender(keys, store, settings)
    validate = Validator(settings)
    cors = CorsPlugin(settings.cors_origins)
    started = time.time()

    app = bottle.Bottle()
    app.install(cors)  # installed first, so it wraps the JSON errors too
    app.install(JsonApiPlugin())
    app.install(RateLimitPlugin(settings.rate_limit, settings.trusted_proxies))
    app.config.update(
        {"webpush.store": store, "webpush.sender": sender, "webpush.keys": keys}
    )
    bottle.BaseRequest.MEMFILE_MAX = settings.max_body_bytes

    def bearer_ok() -> bool:
        header = bottle.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8"), token.encode("utf-8")
        )

    def require_token() -> None:
        if not bearer_ok():
            bottle.response.set_header("WWW-Authenticate", 'Bearer realm="push"')
            log.warning(
                "refused POST /push from %s: wrong or missing token",
                bottle.request.remote_addr,
            )
            raise ApiError(
                401, "send the push token as 'Authorization: Bearer <PUSH_TOKEN>'"
            )

    @app.get("/subscription", api=True)
    def get_public_key() -> dict:
        return {"public_key": keys.public_key}

    @app.post("/subscription", api=True, rate_limited=True)
    def subscribe() -> dict:
        body = read_json(settings.max_body_bytes)
        if "fcm_token" in body:
            record = validate.fcm_token(body)
        else:
            record = validate.subscription(body)
        previous = store.get(record["id"]) or {}
        replaced = store.get(validate.replaces(body)) if "replaces" in body else None
        if replaced and replaced["id"] == record["id"]:
            replaced = None
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
        if record["topics"] is None:  # re-posted, or rotated by its push service
            record["topics"] = (previous or replaced or {}).get("topics", [])
        created = store.upsert(record)
        if replaced:
            store.remove(replaced["id"])
        bottle.response.status = 201 if created else 200
        log.info(
            "%s subscription %s (%s) topics=%s",
            "new" if created else "updated",
            record["id"],
            endpoint_origin(record["endpoint"]) if "endpoint" in record else "fcm",
            ",".join(record["topics"]) or "-",
        )
        return {"id": record["id"]}

    @app.delete("/subscription", api=True, rate_limited=True)
    def unsubscribe() -> None:
        body = read_json(settings.max_body_bytes)
        endpoint, token = body.get("endpoint"), body.get("fcm_token")
        if isinstance(endpoint, str) and endpoint:
            record_id = endpoint_id(endpoint)
        elif isinstance(token, str) and token:
            record_id = subscription_id("fcm:" + token)
        else:
            raise ApiError(
                400,
                'send {"endpoint": "..."} of the subscription to delete, '
                'or {"fcm_token": "..."} of the device',
            )
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
        notification = {
            "title": "Test notification",
            "body": "Push works for this browser.",
            "icon": None,
            "url": "/",
            "data": {"test": True},
        }
        message = Message(
            notification, notification_json(notification), settings.default_ttl, "high"
        )
        report = sender.send([stored], message)
        return report.summary(detail=True)

    @app.post("/push", api=True)
    def push() -> dict:
        require_token()
        body = read_json(settings.max_body_bytes)
        message, topic = validate.push(body)
        records = store.list(topic)
        started_at = time.monotonic()
        report = sender.send(records, message)
        summary = report.summary(detail=bool(body.get("detail")) or len(records) <= 10)
        log.info(
            "push%s to %d subscriptions in %.2fs: sent=%d failed=%d removed=%d retried=%d",
            f" (topic {topic})" if topic else "",
            len(records),
            time.monotonic() - started_at,
            summary["sent"],
            summary["failed"],
            summary["removed"],
            summary["retried"],
        )
        return summary

    webhook_pushes = concurrent.futures.ThreadPoolExecutor(
        4, thread_name_prefix="webhook"
    )
    app.config["webpush.webhook_pushes"] = webhook_pushes
    deliveries = DeliveryIds()

    in_flight = InFlight(app)  # a shutdown waits for webhooks' fan-outs too
    app.config["webpush.in_flight"] = in_flight

    def push_in_background(records: list[dict], message: Message, what: str) -> None:
        try:
            summary = sender.send(records, message).summary()
        except Exception:
            log.exception("webhook %s: the fan-out failed", what)
            return
        finally:
            in_flight.end()
        log.info(
            "webhook %s pushed to %d: sent=%d failed=%d removed=%d",
            what,
            len(records),
            summary["sent"],
            summary["failed"],
            summary["removed"],
        )

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
        signature = bottle.request.headers.get(kind.signature_header)
        if not signature_valid(settings.webhook_secret, raw, signature) and not (
            kind.token_allowed and bearer_ok()
        ):
            log.warning(
                "refused webhook %s from %s: bad signature",
                source,
                bottle.request.remote_addr,
            )
            how = f"{kind.signature_header}: sha256=<HMAC-SHA256 of the body with WEBHOOK_SECRET>"
            if kind.token_allowed:
                how += ", or Authorization: Bearer <PUSH_TOKEN>"
            raise ApiError(401, f"missing or wrong signature: send {how}")
        payload = parse_json(raw)
        event = (
            bottle.request.headers.get(kind.event_header, "")
            if kind.event_header
            else "notify"
        )
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
        message, topic = validate.push(fields)
        delivery = bottle.request.headers.get(kind.delivery_header)
        if delivery and not deliveries.first_time(f"{source}:{delivery}"):
            return {"duplicate": delivery}
        records = store.list(topic)
        in_flight.begin()  # counted from now, not from when a thread takes it
        webhook_pushes.submit(push_in_background, records, message, f"{source}/{event}")
        bottle.response.status = 202
        return {
            "accepted": event,
            "title": message.notification["title"],
            "subscriptions": len(records),
        }

    @app.get("/health", api=True)
    def health() -> dict:
        return {
            "status": "ok",
            "subscriptions": store.count("webpush"),
            "fcm_tokens": store.count("fcm"),
            "version": __version__,
            "uptime_seconds": int(time.time() - started),
        }

    @app.get("/")
    def index() -> bottle.HTTPResponse:
        return serve_static("index.html")

    @app.get("/sw.js")
    def service_worker() -> bottle.HTTPResponse:
        response = serve_static("sw.js")
        response.set_header("Cache-Control", "no-cache")
        return response

    @app.get("/static/<name:path>")
    def static(name: str) -> bottle.HTTPResponse:
        return serve_static(name)

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


def serve_static(name: str) -> bottle.HTTPResponse:
    """A file from static/, never one outside it (no '..', no symlinks out)."""
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
    return bottle.static_file(
        str(path.relative_to(root)), root=str(root), mimetype=mimetype
    )


###############################################################################
# Command line ################################################################
###############################################################################


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """Settings from the command line over the environment over the defaults,
    and whether to repair the store instead of serving."""
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
    parser.add_argument(
        "--repair-store",
        action="store_true",
        help="rewrite a damaged SUBSCRIPTIONS_FILE with its valid records, move the "
        "damaged lines to a side file, and exit (stop the server first)",
    )
    args = vars(parser.parse_args(argv))
    repair = args.pop("repair_store")
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    given = {
        name: _convert(fields[name], raw)
        for name, raw in args.items()
        if raw is not None
    }
    return dataclasses.replace(env_defaults, **given), repair


def main(argv: list[str] | None = None) -> int:
    try:
        settings, repair = parse_args(argv)
        settings.check()
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # waitress warns at every queued request once its threads are busy: noise under load.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if repair:
        try:
            kept, moved, side = repair_store(Path(settings.subscriptions_file))
        except (StoreLocked, OSError) as e:
            log.error("cannot repair %s: %s", settings.subscriptions_file, e)
            return 2
        log.info(
            "%s: %d records kept, %d damaged lines moved to %s",
            settings.subscriptions_file,
            kept,
            moved,
            side or "(none)",
        )
        return 0
    try:
        store = SubscriptionStore(settings.subscriptions_file)
    except (StoreLocked, StoreDamaged) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # an unwritable directory, say
        log.error("cannot open the store %s: %s", settings.subscriptions_file, e)
        return 2
    try:
        keys = VapidKeys.load_or_create(settings)
        token, generated = load_or_create_token(settings)
    except OSError as e:
        log.error("cannot read or write the keys in %s: %s", settings.vapid_dir, e)
        store.close()
        return 2
    except SettingError as e:
        log.error("%s", e)
        store.close()
        return 2
    warning = subject_warning(settings.vapid_subject)
    if warning:
        log.warning("%s", warning)
    if settings.push_endpoint_pattern:
        log.warning(
            "push endpoint allowlist replaced by PUSH_ENDPOINT_PATTERN=%r",
            settings.push_endpoint_pattern,
        )
    # Before create_app: its delivery processes inherit the limit.
    _raise_open_file_limit(settings.connection_limit + settings.push_concurrency + 256)
    try:
        app = create_app(settings, keys, store, token)
    except SettingError as e:  # FCM_SERVICE_ACCOUNT, say
        log.error("%s", e)
        store.close()
        return 2

    url = f"http://{settings.host}:{settings.port}"
    log.info("VAPID key: %s (public %s...)", keys.source, keys.public_key[:12])
    log.info("store: %s, %d subscriptions", settings.subscriptions_file, len(store))
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
        f'-H \'Content-Type: application/json\' -d \'{{"title": "Hello", "body": "It works"}}\'',
        flush=True,
    )

    in_flight = app.config["webpush.in_flight"]
    try:
        wsgi = AccessLog(in_flight, settings.trusted_proxies)
        server = waitress.create_server(
            wsgi if settings.access_log else in_flight,
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
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
        app.config["webpush.sender"].close()
        store.close()
        return 2
    log.info("serving on %s (demo page at %s/)", url, url)  # bound and listening

    stopping = threading.Event()  # a signal came: drain, then stop
    drained = threading.Event()  # drained (or timed out): stop the loop now

    def on_signal(signum: int, frame: Any) -> None:
        """SIGTERM or SIGINT: drain in a thread; once it is done (or at a second
        signal), end waitress's loop from here, the main thread. Handled
        explicitly, so it works when started in the background, where SIGINT
        arrives ignored."""
        if drained.is_set() or stopping.is_set():
            drained.set()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: not in the cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise SystemExit  # waitress's run() returns on it
        stopping.set()
        threading.Thread(target=drain, name="shutdown", daemon=True).start()

    def drain() -> None:
        log.info(
            "stopping: finishing requests and pushes under way (%g s at most)",
            settings.shutdown_timeout,
        )
        if not in_flight.drain(settings.shutdown_timeout):
            log.warning(
                "requests still under way after SHUTDOWN_TIMEOUT; stopping anyway"
            )
        if not drained.is_set():  # a second signal may have stopped it already
            drained.set()
            os.kill(os.getpid(), signal.SIGTERM)  # wake the main thread's handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()  # returns on SystemExit, after its threads finish
    finally:
        app.config["webpush.webhook_pushes"].shutdown(wait=False, cancel_futures=True)
        app.config["webpush.sender"].close(wait=in_flight.idle)
        store.close()
    log.info("stopped")
    if not in_flight.idle:  # abandoned after SHUTDOWN_TIMEOUT: exit without
        logging.shutdown()  # waiting for it, as the interpreter's exit would
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
