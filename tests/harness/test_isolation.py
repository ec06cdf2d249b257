"""Tenant isolation of the prefix cache, seen from outside: B replaying A's exact prompt
learns nothing, neither from ``cached_tokens`` nor from its time to first token.

The timing check follows the published prompt-cache audits: two samples of TTFT (B on A's
cached prompts, and B on fresh prompts of the same length) compared with a two-sample
Kolmogorov–Smirnov test. A real cross-tenant hit would make the first sample faster and
the test reject; alpha is small so scheduler noise on a shared machine does not.
"""

from __future__ import annotations

import random
import time

import aiohttp
from scipy.stats import ks_2samp

from testkit import Admin, ProcessServer, Tenant, aiter_sse, request_body

TRIALS = 14
PROMPT_CHARS = 700
ALPHA = 0.001


async def _ttft(session: aiohttp.ClientSession, url: str, tenant: Tenant,
                text: str) -> tuple[float, int]:
    """Streamed: the server sends headers with the first token, so headers = first token."""
    path, body = request_body("chat-stream", text, 1)
    t0 = time.perf_counter()
    async with session.post(url + path, json=body, headers=tenant.headers) as resp:
        ttft = time.perf_counter() - t0
        assert resp.status == 200, await resp.text()
        usage = [ev.payload["usage"] async for ev in aiter_sse(resp)
                 if not ev.done and ev.payload.get("usage")]
    return ttft, usage[-1]["prompt_tokens_details"]["cached_tokens"]


def _prompt(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PROMPT_CHARS))


async def test_other_tenant_gets_no_hit_and_no_timing_signal(
        server: ProcessServer, admin: Admin) -> None:
    a, b = admin.tenant("iso-a"), admin.tenant("iso-b")
    rng = random.Random(1234)
    cross: list[float] = []
    cold: list[float] = []
    hits: list[float] = []
    async with aiohttp.ClientSession() as s:
        await _ttft(s, server.url, b, _prompt(rng))  # warm-up: first-request costs
        for _ in range(TRIALS):
            secret = _prompt(rng)
            _, cached = await _ttft(s, server.url, a, secret)
            assert cached == 0
            hit_ttft, cached = await _ttft(s, server.url, a, secret)
            hits.append(hit_ttft)
            assert cached > 0, "tenant A's own repeat must hit its cache"
            # B on A's prompt and B on a fresh prompt, in random order against drift
            order = [("cross", secret), ("cold", _prompt(rng))]
            rng.shuffle(order)
            for label, text in order:
                ttft, cached = await _ttft(s, server.url, b, text)
                assert cached == 0, f"tenant B got {cached} cached tokens from A's prompt"
                (cross if label == "cross" else cold).append(ttft)
    print(f"KS cross/cold p={ks_2samp(cross, cold).pvalue:.3g}, hit/cold p="
          f"{ks_2samp(hits, cold).pvalue:.3g}; medians ms: cross "
          f"{1e3 * sorted(cross)[TRIALS // 2]:.1f} cold {1e3 * sorted(cold)[TRIALS // 2]:.1f} "
          f"hit {1e3 * sorted(hits)[TRIALS // 2]:.1f}")
    result = ks_2samp(cross, cold)
    assert result.pvalue > ALPHA, (
        f"B's TTFT on A's prompts differs from a cold miss (KS p={result.pvalue:.2g}); "
        f"cross={sorted(cross)} cold={sorted(cold)}")
