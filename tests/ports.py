"""Ports for the servers the tests start.

Each comes from below the kernel's ephemeral range (32768 and up, where
``bind(0)`` and outgoing connections take theirs), so nothing the kernel
hands out can hold it, and from a block of its own for each pytest-xdist
worker (``PYTEST_XDIST_WORKER``), so two workers never pick the same one.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading

BASE = 20000
BLOCK = 3000  # ports per worker: gw0 to gw3 fit below 32768

_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_index = int(_worker) if _worker.isdigit() else 0
if _index >= 4:  # a fifth block would reach into the ephemeral range
    raise RuntimeError(
        "tests/ports.py has port blocks for 4 workers: run -n 4 or fewer"
    )
_start = BASE + _index * BLOCK
_ports = itertools.cycle(range(_start, _start + BLOCK))
_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with _lock:
        for _ in range(BLOCK):
            port = next(_ports)
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free port in {_start}-{_start + BLOCK - 1}")
