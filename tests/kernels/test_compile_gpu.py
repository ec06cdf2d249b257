"""The GPU code path compiles for sm_90 (tensor-core dots, no register spills)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90_without_spills():
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "cuobjdump").exists()):
        pytest.skip("triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "tests.kernels.compile_gpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 10, done.stdout  # 4 plain kernels, 3 per quantized dtype
    for line in lines:
        stack = re.search(r"STACK:(\d+)", line)
        assert stack is not None and stack.group(1) == "0", f"register spills: {line}"
