"""``kvgate plan --trace`` reads the gateway's own request log, its billing receipts: the
receipts of real requests (fetched as a tenant fetches them) replayed at the size the
server ran with give back the cache reads the server billed."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import openai
import pytest
import requests

from kvgate.gateway.cli import main
from testkit import ThreadServer
from testkit.server import MiB


def test_receipts_replayed_at_the_served_size_read_what_was_billed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    system = f"You plan capacity {uuid.uuid4().hex}. " * 8  # ~370 tokens, shared
    other = f"Another tenant's own system prompt {uuid.uuid4().hex}. " * 6
    flags = {"device": "cpu", "dtype": "float32", "device_cache_bytes": 64 * MiB,
             "host_cache_bytes": 0, "block_size": 16}
    with ThreadServer(tmp_path / "server", **flags) as server:
        tenants = [server.admin.tenant("plan"), server.admin.tenant("plan")]
        turns = [(0, system, "first question"), (0, system, "second question, longer"),
                 (1, other, "hello"), (0, system, "third"), (1, other, "hello again")]
        receipts = []
        for who, sys_text, user in turns:
            t = tenants[who]
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=t.key, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model=server.state.engine.model_id, max_tokens=2,
                messages=[{"role": "system", "content": sys_text},
                          {"role": "user", "content": user}])
            r = requests.get(f"{server.url}/v1/receipts/{raw.headers['kvgate-receipt-id']}",
                             headers=t.headers, timeout=30)
            assert r.status_code == 200, r.text
            receipts.append(r.json())
    prompt = sum(r["tokens"]["prompt"] for r in receipts)
    cached = sum(r["tokens"]["cached"] for r in receipts)
    assert cached >= 3 * 16 * 20  # the later turns read their system prompt's blocks
    log = tmp_path / "receipts.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in reversed(receipts)))  # any order

    rc = main(["plan", "--model", "demo", "--dtype", "float32", "--kv-dtype", "auto",
               "--device-cache-bytes", "64MiB", "--host-cache-bytes", "0", "--trace", str(log),
               "--tier-sizes", "64MiB", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    trace = json.loads(out)["trace"]
    assert (trace["requests"], trace["prompt_tokens"], trace["block_tokens"]) == \
        (len(receipts), prompt, 16)
    (row,) = trace["rows"]
    assert row["cache_read_share"] == round(cached / prompt, 4)
    assert trace["unbounded_read_share"] == round(cached / prompt, 4)
    assert row["hit_rate"] == round(cached // 16 / sum(r["tokens"]["prompt"] // 16
                                                       for r in receipts), 4)
