"""The fixtures of test_api.py, for the test modules in tests/."""

from test_api import app, push_service, server_factory, settings  # noqa: F401
