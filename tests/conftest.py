"""Test-suite wide settings. Layer-specific fixtures live in each tests/<layer>/conftest.py."""

import os

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
