"""The fixtures of test_api.py, for the test modules in tests/: among them the
session's real redis-server (tests/redis_server.py) and ``settings``, which
runs each test that uses it on both backends, JSON files and Redis."""

from test_api import (  # noqa: F401
    app,
    app_with,
    backend_env,
    json_settings,
    push_service,
    redis_server,
    server_factory,
    settings,
    store,
    unchanged,
)
