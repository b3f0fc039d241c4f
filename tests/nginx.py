"""Debian's nginx as an HTTPS (+ HTTP/2) front on 127.0.0.1 for tests and benchmarks.

``with Nginx(upstream=service) as front:`` runs ``/usr/sbin/nginx`` in the
foreground (``daemon off``) on a free port, with everything it writes - config,
pid, logs, temp paths, certificate, key, CA file - in a temporary directory that
is removed on exit. Nothing touches /etc/nginx, /var/log/nginx or /var/lib/nginx.

- ``/push/<id>`` is proxied (HTTP/1.1, keep-alive upstream connections, request
  body buffered so the upstream always gets a Content-Length) to ``upstream``, a
  ``tests.push_service.PushService``. While the front runs, the service's
  ``public_origin`` is the front's origin: its subscribers' endpoints are
  ``https://127.0.0.1:<front port>/push/<id>`` and it checks VAPID ``aud``
  against the front's origin, as a push service behind a load balancer would
  (make subscribers after entering the front). Scripted answers pass through;
  of the faults, RESET becomes a 502, HANG waits for nginx's 60 s
  proxy_read_timeout, and MALFORMED looks like a hang too (nginx takes the
  garbage for an HTTP/0.9 answer and waits for the end of it).
- ``/fast/<anything>`` is answered 201 with an empty body (Content-Length: 0) by
  nginx itself, after ``latency`` seconds when latency > 0 (echo module's
  ``echo_sleep``, a timer, not a blocked worker). Request bodies are discarded.
  ``set_latency()`` changes it with a reload.

Tuned to serve >10,000 requests/s to a benchmark from one worker process: no
request limits per connection, long keep-alive, ``access_log=False`` to skip
logging. nginx missing is an error (``NginxError``), not a skip: callers decide.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from tests.ports import free_port
from tests.push_service import PushService, make_certificate

NGINX = "/usr/sbin/nginx"
# Debian's libnginx-mod-http-echo (echo-nginx-module 0.63).
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"

# One JSON object per request, written by nginx as soon as the request ends
# (there is no ``buffer=``, so ``requests()`` sees every finished request).
LOG_FORMAT = (
    '{"time":$msec,"protocol":"$server_protocol","http2":"$http2",'
    '"method":"$request_method","uri":"$request_uri","status":$status,'
    '"remote_port":$remote_port,"connection":$connection,'
    '"connection_requests":$connection_requests,"request_length":$request_length,'
    '"body_bytes_sent":$body_bytes_sent,"request_time":$request_time,'
    '"upstream_status":"$upstream_status",'
    '"upstream_response_time":"$upstream_response_time",'
    '"content_length":"$content_length"}'
)


class NginxError(RuntimeError):
    """nginx is missing, would not start, or would not reload."""


class Nginx:
    """Run with ``with Nginx(upstream=service) as front:``; see the module doc."""

    def __init__(
        self,
        upstream: PushService | None = None,
        latency: float = 0.0,
        http2: bool = True,
        max_streams: int = 128,
        access_log: bool = True,
    ):
        self.upstream = upstream
        self.latency = latency
        self.http2 = http2
        self.max_streams = max_streams
        self.access_log = access_log
        self.port = 0
        self.pid = 0  # the master process; workers: worker_pids()
        self.dir = ""  # the temporary directory holding every file of this nginx
        self.ca_file = ""  # the CA PEM that verifies the front's certificate
        self._process: subprocess.Popen | None = None
        self._previous_origin: str | None = None

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def fast_endpoint(self, name: str) -> str:
        """A URL nginx answers 201 itself, after ``latency`` seconds."""
        return f"{self.origin}/fast/{name}"

    # -- running ------------------------------------------------------------------

    def __enter__(self) -> Nginx:  # noqa: PYI034 - typing.Self needs 3.11
        if not os.access(NGINX, os.X_OK):
            raise NginxError(f"{NGINX} is missing: apt-get install nginx-light")
        if self.upstream is not None and not self.upstream.port:
            raise NginxError("start the upstream PushService before the Nginx front")
        self.dir = tempfile.mkdtemp(prefix="nginx-front-")
        try:
            self._write_certificate()
            for attempt in range(5):  # the free port may be taken before nginx binds
                self.port = free_port()
                self._write_config()
                if self._start(last_try=attempt == 4):
                    break
        except BaseException:
            self._stop()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        if self.upstream is not None:
            self._previous_origin = self.upstream.public_origin
            self.upstream.public_origin = self.origin
        return self

    def __exit__(self, *exc: object) -> None:
        if self.upstream is not None:
            self.upstream.public_origin = self._previous_origin
        try:
            self._stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def set_latency(self, latency: float, timeout: float = 10.0) -> None:
        """Change ``/fast/``'s latency: rewrite the config, reload (SIGHUP) and
        wait until the old workers are gone, so every new request sees it.

        Takes ~0.1 s, or ~1 s (``worker_shutdown_timeout``) when a client keeps
        an idle HTTP/2 connection: nginx 1.22's old worker keeps those open until
        the timeout, and would answer on them with the old latency. Clients then
        reconnect, so call it between benchmark runs, not during one.
        """
        old_latency, self.latency = self.latency, latency
        try:
            self._write_config()
            check = subprocess.run(
                [NGINX, *self._args(), "-t", "-q"],
                check=False,
                capture_output=True,
                text=True,
            )
            if check.returncode:
                raise NginxError(f"new nginx config rejected:\n{check.stderr}")
        except BaseException:
            self.latency = old_latency
            self._write_config()
            raise
        old = set(self.worker_pids())
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            workers = set(self.worker_pids())
            if workers and not workers & old:
                return
            if time.monotonic() > deadline:
                raise NginxError(
                    f"nginx did not reload in {timeout}s: workers {workers}, "
                    f"old {old}\n{self.error_log()}"
                )
            time.sleep(0.01)

    # -- what happened --------------------------------------------------------------

    def requests(self, count: int = 0, timeout: float = 5.0) -> list[dict]:
        """The access log, one dict per finished request (see LOG_FORMAT): e.g.
        ``protocol`` "HTTP/2.0", ``method``, ``uri``, ``status``, ``remote_port``,
        ``connection`` (nginx's connection serial). nginx writes a line just
        after the response went out, so wait for at least ``count`` lines."""
        if not self.access_log:
            raise NginxError("this Nginx runs with access_log=False")
        deadline = time.monotonic() + timeout
        while True:
            with open(os.path.join(self.dir, "access.log")) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "error.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def worker_pids(self) -> list[int]:
        """The master's children (worker processes, old ones still draining too)."""
        if not self.pid:
            return []
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except FileNotFoundError:  # no CONFIG_PROC_CHILDREN, or the master is gone
            return [pid for pid in _all_pids() if _stat(pid)[1] == self.pid]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) nginx used so far: the master, its live
        workers, and workers that already exited (the master's cutime/cstime)."""
        ticks = 0
        for pid in [self.pid, *self.worker_pids()]:
            fields = _stat(pid)[0]
            if fields:
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
                if pid == self.pid:
                    ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    # -- internals ------------------------------------------------------------------

    def _args(self) -> list[str]:
        return [
            "-p",
            self.dir + "/",
            "-c",
            os.path.join(self.dir, "nginx.conf"),
            "-e",
            os.path.join(self.dir, "error.log"),
        ]

    def _write_certificate(self) -> None:
        ca, cert, key = make_certificate()
        self.ca_file = os.path.join(self.dir, "ca.pem")
        for name, pem in (("ca.pem", ca), ("cert.pem", cert), ("key.pem", key)):
            fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        os.chmod(self.ca_file, 0o644)

    def _write_config(self) -> None:
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(self._config())

    def _config(self) -> str:
        d = self.dir
        if self.latency > 0:
            if not os.path.exists(ECHO_MODULE):
                raise NginxError(
                    f"{ECHO_MODULE} is missing (apt-get install "
                    "libnginx-mod-http-echo): needed for latency > 0"
                )
            # echo_status 201 would answer chunked (no Content-Length) on HTTP/1.1:
            # after the timer, hand over to the same `return 201` as latency 0.
            fast = f"echo_sleep {max(self.latency, 0.001):.3f};\n            echo_exec @created;"
        else:
            fast = "return 201;"
        load = f"load_module {ECHO_MODULE};" if os.path.exists(ECHO_MODULE) else ""
        if os.geteuid() == 0:
            # Workers would run as nobody and could not enter our 0700 directory.
            user = (
                f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
            )
        else:
            user = ""  # nginx ignores (and warns about) `user` when not root
        if self.upstream is not None:
            scheme = "https" if self.upstream.tls else "http"
            upstream = f"""
    upstream push_service {{
        server 127.0.0.1:{self.upstream.port};
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 600s;
    }}"""
            push = f"""proxy_pass {scheme}://push_service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_next_upstream off;
            proxy_ssl_verify off;"""
        else:
            upstream, push = "", "return 404;"
        log = f"{d}/access.log front" if self.access_log else "off"
        # Old workers (after a reload or at exit) keep idle HTTP/2 connections
        # until this timeout - nginx 1.22 closes only idle HTTP/1.1 ones - so keep
        # it short, but long enough for an in-flight /fast/ request to finish.
        shutdown_ms = max(1000, round(self.latency * 4000))
        return f"""# Written by tests/nginx.py; lives and dies with {d}
{load}
{user}
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log warn;
worker_shutdown_timeout {shutdown_ms}ms;

events {{
    worker_connections 4096;
    multi_accept on;
}}

http {{
    log_format front escape=json '{LOG_FORMAT}';
    access_log {log};
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    default_type application/octet-stream;
    server_tokens off;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    http2_max_concurrent_streams {self.max_streams};
    client_max_body_size 64k;
    client_body_buffer_size 64k;
{upstream}

    server {{
        listen 127.0.0.1:{self.port} ssl{" http2" if self.http2 else ""};
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:front:1m;

        location /push/ {{
            {push}
        }}
        location /fast/ {{
            {fast}
        }}
        location @created {{
            return 201;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""

    def _start(self, last_try: bool) -> bool:
        """Start nginx and wait until it serves; False if the port was taken."""
        with open(os.path.join(self.dir, "stderr.log"), "ab") as out:
            self._process = subprocess.Popen(
                [NGINX, *self._args()],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self.pid = self._process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.error_log()
                self._process = None
                self.pid = 0
                if "Address already in use" in log and not last_try:
                    os.unlink(os.path.join(self.dir, "error.log"))
                    return False
                with open(os.path.join(self.dir, "stderr.log")) as f:
                    raise NginxError(f"nginx exited at start:\n{log}{f.read()}")
            if self.worker_pids() and _accepts(self.port):
                return True
            time.sleep(0.01)
        raise NginxError(f"nginx did not start serving in 10s:\n{self.error_log()}")

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        # nginx's fast shutdown (SIGTERM: close every connection, the master waits
        # for its workers and removes its pid file); SIGQUIT, the graceful one,
        # would wait worker_shutdown_timeout for clients' idle HTTP/2 connections.
        # SIGKILL if that hangs.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            workers = self.worker_pids()
            process.kill()
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(5)
        self.pid = 0


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[list[str], int]:
    """(the fields of /proc/<pid>/stat after the command name, parent pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return [], 0
    return fields, int(fields[1])
