"""A push-service stand-in on 127.0.0.1 for tests and benchmarks.

It behaves like a real push service towards the application server (RFC 8030):
it checks the VAPID JWT (RFC 8292: signature, ``aud`` equal to its own origin,
``exp`` within 24 hours), decrypts the aes128gcm body (RFC 8291) with the
subscriber's private key, and answers 201 - or whatever a test scripts for a
subscriber (410, 429 with Retry-After, 500, a hang).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field

import http_ece
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

HANG = "hang"  # a scripted answer: keep the connection open, never answer
MALFORMED = "malformed"  # answer with something that is not HTTP
SLOW_BODY = "slow body"  # send the head, then the body a byte at a time, too slowly
RESET = "reset"  # drop the connection without answering
HUGE = "huge"  # answer 400 with a body of a megabyte
FAULTS = (HANG, MALFORMED, SLOW_BODY, RESET, HUGE)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Subscriber:
    """A browser's side of one subscription: its keys and what it received."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    script: list = field(default_factory=list)  # answers to give, then 201

    @property
    def subscription(self) -> dict:
        """What PushSubscription.toJSON() would give."""
        public = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64url(public), "auth": b64url(self.auth)},
        }

    def decrypt(self, body: bytes) -> bytes:
        return http_ece.decrypt(
            body,
            private_key=self.private_key,
            auth_secret=self.auth,
            version="aes128gcm",
        )


@dataclass
class Delivery:
    """One POST the stand-in received."""

    subscriber: str
    status: int
    headers: dict
    claims: dict | None = None
    plaintext: bytes | None = None
    error: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def message(self) -> dict:
        return json.loads(self.plaintext)


class PushService:
    """Run with ``with PushService() as service:``; ``service.subscriber()``
    makes a subscription that points here."""

    def __init__(self, latency: float = 0.0, tls: bool = False, verify_every: int = 1):
        self.latency = latency
        self.tls = tls
        # Check VAPID and decrypt every Nth message (benchmarks sample to keep up).
        self.verify_every = verify_every
        self.requests = 0
        self.subscribers: dict[str, Subscriber] = {}
        self.deliveries: list[Delivery] = []
        self.port = 0
        self.ca_file: str | None = None
        # Set by a front that proxies here (tests/nginx.py): subscriber endpoints
        # and the VAPID aud check then use the front's origin instead of ours.
        self.public_origin: str | None = None
        self._lock = threading.Condition()
        self._counter = 0
        self._loop = asyncio.new_event_loop()

    @property
    def origin(self) -> str:
        """Where clients reach us: ``public_origin`` when a front is set, else us."""
        if self.public_origin:
            return self.public_origin
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def subscriber(self, script: list | None = None) -> Subscriber:
        with self._lock:
            self._counter += 1
            sub_id = f"s{self._counter}-{os.urandom(6).hex()}"
        sub = Subscriber(
            id=sub_id,
            endpoint=f"{self.origin}/push/{sub_id}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth=os.urandom(16),
            script=list(script or []),
        )
        self.subscribers[sub_id] = sub
        return sub

    def received(self, subscriber: Subscriber | None = None) -> list[Delivery]:
        with self._lock:
            return [
                d
                for d in self.deliveries
                if subscriber is None or d.subscriber == subscriber.id
            ]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.deliveries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(self.deliveries)} of {count} deliveries arrived"
                    )
                self._lock.wait(left)
            return list(self.deliveries)

    # -- the server ---------------------------------------------------------------

    def __enter__(self) -> PushService:  # noqa: PYI034 - typing.Self needs 3.11
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("push service stand-in did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        def stop() -> None:
            self._server.close()
            for transport in list(self._transports):
                transport.abort()
            self._loop.stop()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)
        if self.ca_file:
            os.unlink(self.ca_file)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._transports: set[asyncio.BaseTransport] = set()
        self._server = self._loop.run_until_complete(
            self._loop.create_server(
                lambda: _PushProtocol(self),
                "127.0.0.1",
                0,
                ssl=self._tls_context() if self.tls else None,
            )
        )
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def _tls_context(self) -> ssl.SSLContext:
        """A throwaway CA and a certificate for 127.0.0.1 signed by it; the CA goes
        to ``ca_file`` for SSL_CERT_FILE."""
        ca_cert, cert_pem, key_pem = make_certificate()
        fd, self.ca_file = tempfile.mkstemp(suffix="-ca.pem")
        with os.fdopen(fd, "wb") as f:
            f.write(ca_cert)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as chain:
            chain.write(cert_pem + key_pem)
            chain.flush()
            context.load_cert_chain(chain.name)
        return context

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple | str:
        """The answer to one POST: (status, extra headers), or one of FAULTS."""
        sub_id = path.rsplit("/", 1)[-1] if path.startswith("/push/") else ""
        sub = self.subscribers.get(sub_id)
        if sub is None:
            return self._record(
                Delivery("?", 404, headers, error="unknown subscription")
            )
        answer = sub.script.pop(0) if sub.script else 201
        self.requests += 1
        if self.requests % self.verify_every and answer not in FAULTS:  # not sampled
            return (answer, {}) if isinstance(answer, int) else answer
        claims, error = self._check_vapid(headers.get("authorization", ""))
        if error:
            return self._record(Delivery(sub.id, 403, headers, claims, error=error))
        if headers.get("content-encoding") != "aes128gcm":
            return self._record(
                Delivery(sub.id, 400, headers, claims, error="not aes128gcm")
            )
        try:
            plaintext = sub.decrypt(body)
        except (ValueError, http_ece.ECEException) as e:  # the server's bug
            return self._record(
                Delivery(sub.id, 400, headers, claims, error=f"decrypt: {e!r}")
            )
        if answer in FAULTS:
            self._record(Delivery(sub.id, 0, headers, claims, plaintext, error=answer))
            return answer
        status, extra = (answer, {}) if isinstance(answer, int) else answer
        return self._record(Delivery(sub.id, status, headers, claims, plaintext), extra)

    def _record(self, delivery: Delivery, extra: dict | None = None) -> tuple:
        with self._lock:
            self.deliveries.append(delivery)
            self._lock.notify_all()
        return delivery.status, extra or {}

    def _check_vapid(self, header: str) -> tuple[dict | None, str | None]:
        """RFC 8292: ``vapid t=<JWT>, k=<public key>``; returns (claims, error)."""
        scheme, _, params = header.partition(" ")
        if scheme.lower() != "vapid":
            return None, f"Authorization scheme {scheme!r} is not vapid"
        fields = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
        try:
            signing_input, _, signature = fields["t"].rpartition(".")
            claims = json.loads(unb64url(signing_input.split(".")[1]))
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), unb64url(fields["k"])
            )
            raw = unb64url(signature)
            der = encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            public.verify(der, signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        except (KeyError, IndexError, ValueError, InvalidSignature) as e:
            return None, f"bad VAPID token: {e!r}"
        if claims.get("aud") != self.origin:
            return claims, f"aud {claims.get('aud')!r} is not {self.origin!r}"
        if not time.time() < claims.get("exp", 0) <= time.time() + 86400:
            return claims, f"exp {claims.get('exp')} is not within 24 hours"
        if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
            return claims, "sub is not a mailto: or https: URL"
        return claims, None


def make_certificate() -> tuple[bytes, bytes, bytes]:
    """(CA PEM, server certificate PEM, server key PEM) for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "push stand-in test CA")]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


class _PushProtocol(asyncio.Protocol):
    """Just enough HTTP/1.1 server: keep-alive POSTs with a Content-Length."""

    def __init__(self, service: PushService):
        self.service = service
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.service._transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.service._transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", 0))
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            path = lines[0].split(" ")[1]
            answer = self.service.handle(path, headers, body)
            if answer in FAULTS:
                self._fault(answer)
            else:
                if self.service.latency:
                    asyncio.get_running_loop().call_later(
                        self.service.latency, self._respond, *answer
                    )
                else:
                    self._respond(*answer)

    def _fault(self, fault: str) -> None:
        if fault == MALFORMED:
            self.transport.write(b"HTTP/9 banana\r\nno colon here\r\n\r\n")
        elif fault == RESET:
            self.transport.abort()
        elif fault == HUGE:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 1048576\r\n\r\n"
                + b"x" * 1048576
            )
        elif fault == SLOW_BODY:
            self.transport.write(
                b"HTTP/1.1 201 Created\r\nContent-Length: 1000\r\n\r\n"
            )
            self._trickle(1000)

    def _trickle(self, left: int) -> None:
        if left and not self.transport.is_closing():
            self.transport.write(b"x")
            asyncio.get_running_loop().call_later(0.2, self._trickle, left - 1)

    def _respond(self, status: int, extra: dict) -> None:
        if self.transport.is_closing():
            return
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Length: 0\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in extra.items())
        self.transport.write((head + "\r\n").encode("latin-1"))


REASONS = {
    201: "Created",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    410: "Gone",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
