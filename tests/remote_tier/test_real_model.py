"""The real model (smollm2) across two replicas sharing one Valkey: the second replica
reads the prompt's blocks from the remote tier and answers exactly as the first did (the
first's greedy answer equals transformers' ``generate()``: tests/engine/test_real_model.py)."""

from __future__ import annotations

from pathlib import Path

import openai

from testkit.server import ThreadServer
from tests.remote_tier.conftest import RedisServer

SYSTEM = ("You are a geography teacher. You answer in one short sentence. " * 6).strip()


def test_a_remote_tier_hit_answers_like_the_miss(tmp_path: Path, valkey: RedisServer) -> None:
    flags = {"db": f"sqlite:///{tmp_path / 'ledger.db'}", "shared_tier_url": valkey.url,
             "shared_tier_timeout_ms": 500, "host_cache_bytes": 0, "model": "smollm2",
             "device": "cpu", "device_cache_bytes": 32 << 20}
    answers, cached = [], []
    with ThreadServer(tmp_path / "one", **flags) as one:
        tenant = one.admin.tenant("geo")
        for server in (one, None):
            if server is None:
                remote = one.state.engine.remote
                assert remote is not None and remote.drain()
                server = ThreadServer(tmp_path / "two", **flags).start()
            try:
                client = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key,
                                       max_retries=0)
                r = client.chat.completions.create(model="smollm2", max_tokens=30, messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "What is the capital of France?"}])
                answers.append(r.choices[0].message.content)
                cached.append(r.usage.prompt_tokens_details.cached_tokens)
                prompt_tokens = r.usage.prompt_tokens
            finally:
                if server is not one:
                    server.close()
    assert cached[0] == 0
    assert cached[1] == (prompt_tokens - 1) // 16 * 16 > 0  # every full block, from Valkey
    assert answers[1] == answers[0] and "Paris" in (answers[0] or "")
