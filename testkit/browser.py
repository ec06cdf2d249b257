"""Where the system's Chromium is: the console tests and ``bench.console`` drive it through
Playwright (no browser download)."""

from __future__ import annotations

import os
import shutil


def find_chromium() -> str | None:
    """``KVGATE_TEST_CHROMIUM`` if set, else the first Chromium or Chrome on ``PATH``."""
    for candidate in (os.environ.get("KVGATE_TEST_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome", "google-chrome-stable"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None
