"""tests/redis_server.py starts and stops a real redis-server, as the tests
that depend on it assume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, fresh_prefix, require_redis_server


def test_a_real_redis_server_starts_on_a_free_port_for_the_tests(redis_server):
    assert redis_server.url.startswith("redis://127.0.0.1:")
    assert redis_server.port > 0
    key = fresh_prefix() + "greeting"
    with redis_server.client() as client:
        assert client.ping()
        assert client.set(key, "hello")
        assert client.get(key) == "hello"
        assert client.config_get("maxmemory-policy") == {
            "maxmemory-policy": "noeviction"
        }
        assert client.config_get("save") == {"save": ""}
        client.delete(key)
    used = redis_server.used_memory()
    assert isinstance(used, int) and used > 0
    assert fresh_prefix() != fresh_prefix()


def test_a_redis_server_on_a_unix_socket_works_and_stop_leaves_no_process(
    tmp_path: Path,
):
    require_redis_server()
    with RedisServer(directory=tmp_path, unix=True) as server:
        assert server.url == f"unix://{tmp_path.resolve()}/redis.sock?db=0"
        assert (tmp_path / "redis.sock").is_socket()
        with server.client() as client:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == "v"
            assert client.config_get("port") == {"port": "0"}
        assert server.used_memory() > 0
        pid = server.pid
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "redis.sock").exists()
    assert not server.tmpdir.exists()
