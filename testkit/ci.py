"""What a test does when a tool it drives is missing: outside CI it skips, saying why; in
CI (``CI=true``, where ``.ci/run`` installs every such tool) it fails, since CI must run
what it claims to."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def cannot_run(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason)
