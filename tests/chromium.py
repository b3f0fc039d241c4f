"""Debian's Chromium for the browser tests, driven by Playwright.

Playwright's own browser download does not work here, so tests launch the system
``/usr/bin/chromium`` with ``FLAGS``. ``require_chromium()``, called at the top
of a test module, skips the module when Chromium is not installed, except in CI
(``CI=true``), where .ci/run installs it and its absence is a failure.
"""

from __future__ import annotations

import os
import shutil

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    import pytest

    if shutil.which(CHROMIUM):
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: CI must install Debian's chromium")
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)
