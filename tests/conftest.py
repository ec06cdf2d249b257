"""Test-suite wide settings. Layer-specific fixtures live in each tests/<layer>/conftest.py."""

import os
import shutil

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU the Triton kernels can only run in Triton's interpreter. It must be chosen
# before anything imports triton, and any test module may do that at collection time.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
