"""Kernel tests run the Triton kernels on CUDA when there is one, else in the interpreter.

``TRITON_INTERPRET`` is read when a kernel is defined, so it is set here, before any test
imports the Triton modules (``kernels`` itself imports them lazily).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
