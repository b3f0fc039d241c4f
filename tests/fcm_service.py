"""Stand-ins for Google: an OAuth 2.0 token endpoint and the FCM HTTP v1 API.

No Google at all: ``FcmService.service_account(path)`` writes a service-account
file with a freshly generated RSA key whose ``token_uri`` points here. The token
endpoint verifies the signed JWT assertion (RS256, issuer, audience, FCM scope)
before it issues an access token; the FCM endpoint accepts only such tokens and
checks each message's shape, as FCM does: a ``token``, string-only ``data``,
``android.ttl`` in seconds. Answers can be scripted per device token.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.push_service import unb64url

PROJECT = "demo-project"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
UNREGISTERED = (
    404,
    {
        "error": {
            "code": 404,
            "message": "Requested entity was not found.",
            "status": "NOT_FOUND",
            "details": [
                {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "UNREGISTERED",
                }
            ],
        }
    },
)
INVALID_TOKEN = (
    400,
    {
        "error": {
            "code": 400,
            "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT",
        }
    },
)


@dataclass
class FcmMessage:
    token: str
    message: dict
    status: int
    at: float = field(default_factory=time.monotonic)


class FcmService:
    """``with FcmService() as fcm:``; ``fcm.url`` is FCM_API_URL."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.client_email = f"push@{PROJECT}.iam.gserviceaccount.com"
        self.tokens: set[str] = set()  # access tokens issued
        self.messages: list[FcmMessage] = []
        self.scripts: dict[str, list] = {}  # device token -> answers to give, then 200
        self.refused_assertions = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def service_account(self, path: Path) -> Path:
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": PROJECT,
                    "private_key_id": "test-key-1",
                    "private_key": key_pem,
                    "client_email": self.client_email,
                    "client_id": "1",
                    "token_uri": f"{self.url}/token",
                }
            )
        )
        return path

    def script(self, token: str, *answers: int | tuple) -> None:
        self.scripts[token] = list(answers)

    def received(self, token: str | None = None) -> list[FcmMessage]:
        with self._lock:
            return [m for m in self.messages if token is None or m.token == token]

    def __enter__(self) -> FcmService:  # noqa: PYI034 - typing.Self needs 3.11
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/token":
                    status, answer, extra = service._token(body)
                else:
                    status, answer, extra = service._send(self.path, self.headers, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _token(self, body: bytes) -> tuple[int, dict, dict]:
        """OAuth 2.0 JWT bearer grant (RFC 7523), as google-auth sends it."""
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        try:
            assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
            signing_input, _, signature = form["assertion"].rpartition(".")
            header = json.loads(unb64url(signing_input.split(".")[0]))
            claims = json.loads(unb64url(signing_input.split(".")[1]))
            assert header["alg"] == "RS256"
            self.key.public_key().verify(
                unb64url(signature),
                signing_input.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
            assert claims["iss"] == self.client_email
            assert (
                claims["aud"] == GOOGLE_TOKEN_AUDIENCE
            )  # what Google checks, whatever token_uri
            assert (
                "https://www.googleapis.com/auth/firebase.messaging" in claims["scope"]
            )
            assert claims["exp"] > time.time()
        except (KeyError, ValueError, AssertionError, InvalidSignature):
            self.refused_assertions += 1
            return 400, {"error": "invalid_grant"}, {}
        token = "ya29." + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return (
            200,
            {"access_token": token, "expires_in": 3600, "token_type": "Bearer"},
            {},
        )

    def _send(self, path: str, headers, body: bytes) -> tuple[int, dict, dict]:
        if path != f"/v1/projects/{PROJECT}/messages:send":
            return 404, {"error": {"code": 404, "status": "NOT_FOUND"}}, {}
        bearer = headers.get("Authorization", "").removeprefix("Bearer ")
        if bearer not in self.tokens:
            return 401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, {}
        message = json.loads(body)["message"]
        token = message.get("token", "")
        problem = _shape_problem(message)
        if problem:
            status, answer, extra = (
                400,
                {"error": {"code": 400, "message": problem}},
                {},
            )
        else:
            script = self.scripts.get(token)
            scripted = script.pop(0) if script else 200
            if isinstance(scripted, int):
                scripted = (scripted, {"error": {"code": scripted}}, {})
            status, answer, extra = (list(scripted) + [{}])[:3]
            if status == 200:
                answer = {
                    "name": f"projects/{PROJECT}/messages/{secrets.randbelow(10**12)}"
                }
        with self._lock:
            self.messages.append(FcmMessage(token, message, status))
        return status, answer, extra


def _shape_problem(message: dict) -> str | None:
    """What FCM v1 would refuse in a message, or None."""
    if not message.get("token"):
        return "message.token is required"
    data = message.get("data", {})
    if not all(isinstance(v, str) for v in data.values()):
        return "message.data values must be strings"
    ttl = message.get("android", {}).get("ttl", "0s")
    if not (ttl.endswith("s") and ttl[:-1].isdigit()):
        return f"message.android.ttl {ttl!r} is not a duration"
    return None
