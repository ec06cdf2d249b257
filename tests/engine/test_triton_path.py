"""The engine on the Triton kernels (the CUDA path), run by Triton's CPU interpreter.

A subprocess, because ``TRITON_INTERPRET`` must be set before triton defines the kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvgate.gateway.engine import GenerateRequest

from .conftest import collect, greedy

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, json
from kvgate.gateway.engine import EngineConfig, GenerateRequest, SamplingParams, TokenEvent
from kvgate.gateway.engine.engine import Engine

async def main():
    engine = Engine(EngineConfig(device_cache_bytes=4 << 20, host_cache_bytes=0, kv_dtype=KV_DTYPE))
    await engine.start()
    prompt = engine.render_chat([{"role": "user", "content": "hello there, friend"}])
    runs = []
    for rid in ("miss", "hit"):
        ids, cached = [], None
        req = GenerateRequest(rid, "t", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        async for ev in engine.generate(req):
            if isinstance(ev, TokenEvent):
                ids += ev.token_ids
            else:
                cached = ev.usage.cached_tokens
        runs.append({"ids": ids, "cached": cached})
    await engine.stop()
    print(json.dumps({"prompt": prompt, "runs": runs}))

asyncio.run(main())
"""


def _run(kv_dtype: str) -> dict:
    env = {**os.environ, "KVGATE_FORCE_TRITON": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    script = SCRIPT.replace("KV_DTYPE", repr(kv_dtype))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_triton_kernels_through_the_engine_match_oracle(oracle):
    out = _run("auto")
    want = oracle(out["prompt"], 3)
    miss, hit = out["runs"]
    assert miss == {"ids": want, "cached": 0}
    assert hit == {"ids": want, "cached": (len(out["prompt"]) - 1) // 16 * 16}


async def test_triton_kernels_on_fp8_pages_match_the_torch_path(make_engine):
    """Quantized pages through the Triton store and attention: the same tokens as the
    torch path on the same pages (the stores write the same bytes), and the hit cached."""
    out = _run("fp8")
    engine = await make_engine(kv_dtype="fp8", device_cache_bytes=4 << 20, host_cache_bytes=0)
    for rid, run in zip(("miss", "hit"), out["runs"], strict=True):
        req = GenerateRequest(rid, "t", out["prompt"], greedy(3))
        ids, _, fin = await collect(engine, req)
        assert run == {"ids": ids, "cached": fin.usage.cached_tokens}
    assert out["runs"][1]["cached"] == (len(out["prompt"]) - 1) // 16 * 16
