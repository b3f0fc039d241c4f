"""A real redis-server (Debian's /usr/bin/redis-server) for tests and benchmarks.

``with RedisServer() as redis_server:`` runs ``redis-server`` in the foreground
on a free TCP port on 127.0.0.1 (or, with ``unix=True``, on a unix socket and no
TCP port), configured on the command line only: no config file, no RDB or AOF
persistence, no eviction, and its working directory and log in a temporary
directory that is removed on exit. Nothing touches /etc/redis or /var/lib/redis.

Tests share one server per session (the ``redis_server`` fixture in
conftest.py) and keep apart by key prefix: ``fresh_prefix()``.
``require_redis_server()`` skips a test when redis-server is not installed,
except in CI (``CI=true``), where .ci/run installs it and its absence is a failure.

pytest is imported only inside ``require_redis_server()``, so benchmarks can use
``RedisServer`` without it.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107

_prefixes = itertools.count()


def require_redis_server() -> None:
    """Skip the calling test when redis-server is missing; fail instead in CI,
    where .ci/run installs it, so a broken install cannot pass as skips."""
    if Path(REDIS_SERVER).exists() and os.access(REDIS_SERVER, os.X_OK):
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(
            f"{REDIS_SERVER} is missing: CI must install redis-server (apt-get)"
        )
    pytest.skip("redis-server is not installed: apt-get install redis-server")


def fresh_prefix() -> str:
    """A key prefix no other caller in this process gets, like ``t3-9f2c1a0b:``,
    so tests sharing one server each see only their own keys."""
    return f"t{next(_prefixes)}-{secrets.token_hex(4)}:"


class RedisServer:
    """A redis-server process of its own, so tests exercise the real protocol,
    commands and memory accounting instead of a fake, and never touch a redis
    that something else on the machine uses: it listens on a free port (or a
    unix socket), keeps nothing on disk, and goes away on ``stop()``/exit."""

    def __init__(self, directory: Path | None = None, unix: bool = False):
        self.unix = unix
        self.tmpdir = Path(tempfile.mkdtemp(prefix="redis-server-"))
        self.directory = Path(directory) if directory is not None else self.tmpdir
        self.log_file = self.tmpdir / "redis.log"
        self.output_file = self.tmpdir / "redis.out"
        self.port = 0
        self.socket_path: Path | None = None
        self.url = ""
        self.pid = 0
        self._process: subprocess.Popen | None = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- lifecycle ---------------------------------------------------------

    def _command(self) -> list[str]:
        command = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.tmpdir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_file),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.socket_path is not None:
            command += [
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        return command

    def _start(self) -> None:
        if not (Path(REDIS_SERVER).exists() and os.access(REDIS_SERVER, os.X_OK)):
            raise RuntimeError(
                f"{REDIS_SERVER} is missing: apt-get install redis-server"
            )
        if self.unix:
            self.socket_path = self.directory.resolve() / "redis.sock"
            if len(os.fsencode(self.socket_path)) > MAX_UNIX_SOCKET_PATH:
                raise ValueError(
                    f"unix socket path too long for Linux: {self.socket_path}"
                )
            self.port = 0
            self.url = f"unix://{self.socket_path}?db=0"
            self._launch()
            return
        # The free port can be taken between free_port() and redis-server's
        # bind; try a few ports before giving up.
        for attempt in range(3):
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            try:
                self._launch()
                return
            except RuntimeError:
                in_use = "Address already in use" in self._log_tail()
                if attempt == 2 or not in_use:
                    raise

    def _launch(self) -> None:
        """Start the process and wait for PING, or raise with the log's tail."""
        self._kill()
        self.log_file.unlink(missing_ok=True)
        with open(self.output_file, "wb") as output:
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.tmpdir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.pid = self._process.pid
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(
                    f"redis-server exited with {code} on start:\n{self._log_tail()}"
                )
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1.0) as client:
                    if client.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(
                    f"redis-server did not answer PING on {self.url} within "
                    f"{START_TIMEOUT:.0f} s:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _log_tail(self, lines: int = 30) -> str:
        """The end of redis-server's log and of what it printed (command-line
        errors come before the log file is opened, on stdout)."""
        parts = []
        for path in (self.output_file, self.log_file):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(
                    f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:])
                )
        return "\n".join(parts) or "(redis-server wrote nothing)"

    def _kill(self) -> None:
        """SIGTERM (redis shuts down, removes its socket), SIGKILL after 5 s."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the server and remove its temporary directory; idempotent."""
        self._kill()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:  # noqa: PYI034 - typing.Self needs 3.11
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- use ---------------------------------------------------------------

    def client(self) -> redis.Redis:
        """A new client (str replies); the caller closes it."""
        return redis.Redis.from_url(self.url, decode_responses=True)

    def used_memory(self) -> int:
        """INFO memory's used_memory: bytes the server has allocated now."""
        with self.client() as client:
            return int(client.info("memory")["used_memory"])

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, pid={self.pid})"
