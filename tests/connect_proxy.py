"""A minimal HTTP CONNECT proxy on 127.0.0.1 for tests (HTTPS_PROXY=proxy.url).

``with ConnectProxy() as proxy:`` listens on a free port. Each ``CONNECT
host:port`` is recorded in ``proxy.tunnels``, answered ``200 Connection
established`` and then piped both ways, byte for byte, until either side
closes. Any other request (a client that sends plain requests to the proxy, as
with HTTP_PROXY) is recorded in ``proxy.refused`` and answered 405. A target
that cannot be reached is answered 502 (and still recorded in ``tunnels``).
"""

from __future__ import annotations

import asyncio
import threading

MAX_HEAD = 16384


class ConnectProxy:
    """Run with ``with ConnectProxy() as proxy:``; point clients at ``proxy.url``."""

    def __init__(self) -> None:
        self.port = 0
        self.tunnels: list[str] = []  # CONNECT targets, "127.0.0.1:443" style
        self.refused: list[str] = []  # other requests' lines, "GET http://x/ HTTP/1.1"
        self._lock = threading.Condition()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        """The tunnels once at least ``count`` were opened."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.tunnels) >= count, timeout):
                raise TimeoutError(f"{len(self.tunnels)} of {count} tunnels opened")
            return list(self.tunnels)

    def __enter__(self) -> ConnectProxy:  # noqa: PYI034 - typing.Self needs 3.11
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("CONNECT proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    # -- the server ---------------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopped.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = line.partition(" ")
            target = rest.rpartition(" ")[0] or rest
            if method.upper() != "CONNECT":
                with self._lock:
                    self.refused.append(line)
                    self._lock.notify_all()
                writer.write(
                    b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
            with self._lock:
                self.tunnels.append(target)
                self._lock.notify_all()
            host, _, port = target.rpartition(":")
            try:
                up_reader, upstream = await asyncio.open_connection(
                    host.strip("[]"), int(port)
                )
            except (OSError, ValueError):
                writer.write(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()
