"""Billing receipts through the official SDKs against a real server: every billed answer,
streamed or not, names its receipt; the receipt states what the ledger row billed and what
the client was told, names the cache blocks behind the counts, verifies with the published
key (``kvgate receipts verify`` too) and stops verifying once anything is changed; another
tenant cannot tell it exists. The key survives a restart; a bad key file stops ``serve``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import openai
import requests

from kvgate.gateway.ledger.receipts import load_public_key, verify
from testkit import Admin, Tenant, ThreadServer
from testkit.server import ROOT, server_settings

HEADER = "kvgate-receipt-id"
SYSTEM = "You are the receipts test. Answer briefly and plainly, always. " * 6


def oai(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def receipt_of(server: ThreadServer, tenant: Tenant, receipt_id: str) -> dict[str, Any]:
    r = requests.get(f"{server.url}/v1/receipts/{receipt_id}", headers=tenant.headers,
                     timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def published_key(server: ThreadServer) -> dict[str, Any]:
    r = requests.get(server.url + "/.well-known/kvgate-receipt-key", timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def agrees(receipt: dict[str, Any], row: dict[str, Any], prompt: int, cached: int,
           completion: int) -> None:
    """The receipt, the ledger row and what the client saw say the same."""
    t = receipt["tokens"]
    assert (t["prompt"], t["cached"], t["completion"]) == (prompt, cached, completion)
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == \
        (prompt, cached, completion)
    assert t["cache_write_5m"] + t["cache_write_1h"] == row["cache_write_tokens"]
    assert receipt["cost_micros"] == row["cost_micros"] > 0
    assert receipt["request_id"] == row["request_id"] and row["n"] == 1
    assert len(receipt["blocks"]["read"]) * 16 == cached
    written = sum(16 for _ in receipt["blocks"]["written"])
    assert written == t["cache_write_5m"] + t["cache_write_1h"]


def test_openai_answers_carry_receipts_that_match_the_ledger(server: ThreadServer,
                                                             tenant: Tenant,
                                                             model_id: str) -> None:
    client = oai(server, tenant)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    raw = client.chat.completions.with_raw_response.create(
        model=model_id, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    first_id = raw.headers[HEADER]
    completion = raw.parse()
    assert raw.http_response.json()["receipt_id"] == first_id
    with client.chat.completions.with_streaming_response.create(
            model=model_id, messages=messages, max_tokens=4,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True}) as resp:
        second_id = resp.headers[HEADER]
        chunks = list(resp.parse())
    usage = [c.usage for c in chunks if c.usage is not None][-1]
    assert first_id != second_id and first_id.startswith("rcpt_")

    rows = {r["request_id"]: r for r in server.ledger_rows(tenant.id).values()}
    first = receipt_of(server, tenant, first_id)
    second = receipt_of(server, tenant, second_id)
    u1 = completion.usage
    assert u1 is not None and u1.prompt_tokens_details is not None
    agrees(first, rows[first["request_id"]], u1.prompt_tokens,
           u1.prompt_tokens_details.cached_tokens or 0, u1.completion_tokens)
    assert usage.prompt_tokens_details is not None
    agrees(second, rows[second["request_id"]], usage.prompt_tokens,
           usage.prompt_tokens_details.cached_tokens or 0, usage.completion_tokens)
    # the second read what the first wrote: the same blocks, by hash, from the device
    written = [b["hash"] for b in first["blocks"]["written"]]
    read = [b["hash"] for b in second["blocks"]["read"]]
    assert read and read == written[:len(read)]
    assert {b["tier"] for b in second["blocks"]["read"]} == {"device"}
    assert first["blocks"]["read"] == []
    assert first["endpoint"] == second["endpoint"] and first["tenant_id"] == tenant.id

    key = published_key(server)
    public = load_public_key(key["public_key_pem"])
    assert first["key_id"] == key["key_id"]
    for receipt in (first, second):
        assert verify(receipt, public) is None
        changed = copy.deepcopy(receipt)
        changed["tokens"]["cached"] += 16
        assert verify(changed, public) is not None


def test_anthropic_messages_carry_receipts(server: ThreadServer, tenant: Tenant,
                                           model_id: str) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)
    body: Any = {"model": model_id, "max_tokens": 4, "system": SYSTEM,
                 "messages": [{"role": "user", "content": "hi"}]}
    raw = client.messages.with_raw_response.create(**body)
    message = raw.parse()
    receipt = receipt_of(server, tenant, raw.headers[HEADER])
    assert raw.http_response.json()["receipt_id"] == receipt["id"]
    row = server.ledger_rows(tenant.id)[receipt["request_id"]]
    u = message.usage
    prompt = u.input_tokens + (u.cache_read_input_tokens or 0) + \
        (u.cache_creation_input_tokens or 0)
    agrees(receipt, row, prompt, u.cache_read_input_tokens or 0, u.output_tokens)
    with client.messages.with_streaming_response.create(**body, stream=True) as resp:
        streamed_id = resp.headers[HEADER]
        list(resp.iter_lines())
    streamed = receipt_of(server, tenant, streamed_id)
    assert streamed["tokens"]["cached"] > 0 and streamed["endpoint"] == receipt["endpoint"]
    public = load_public_key(json.dumps(published_key(server)))
    assert verify(receipt, public) is None and verify(streamed, public) is None


def test_another_tenant_and_an_unknown_id_get_the_same_404(server: ThreadServer,
                                                           admin: Admin, tenant: Tenant,
                                                           model_id: str) -> None:
    raw = oai(server, tenant).completions.with_raw_response.create(
        model=model_id, prompt="receipts are private", max_tokens=2)
    receipt_id = raw.headers[HEADER]
    receipt_of(server, tenant, receipt_id)
    other = admin.tenant()
    answers = [requests.get(f"{server.url}/v1/receipts/{rid}", headers=other.headers,
                            timeout=30) for rid in (receipt_id, "rcpt_" + "0" * 32)]
    assert [a.status_code for a in answers] == [404, 404]
    assert [a.json()["error"]["code"] for a in answers] == ["receipt_not_found"] * 2
    assert requests.get(f"{server.url}/v1/receipts/{receipt_id}", timeout=30
                        ).status_code == 401
    # listing: each tenant sees its own receipts only; the admin lists any tenant's
    mine = requests.get(f"{server.url}/v1/receipts", headers=tenant.headers, timeout=30).json()
    assert receipt_id in [r["id"] for r in mine["data"]]
    theirs = requests.get(f"{server.url}/v1/receipts", headers=other.headers, timeout=30)
    assert theirs.status_code == 200 and theirs.json()["data"] == []
    listed = admin.http.get("/admin/receipts", params={"tenant_id": tenant.id}).json()["data"]
    assert listed == mine["data"]
    for bad in ("0", "201", "x", "-1"):
        r = requests.get(f"{server.url}/v1/receipts", params={"limit": bad},
                         headers=tenant.headers, timeout=30)
        assert r.status_code == 400, (bad, r.text)
    assert requests.get(f"{server.url}/admin/receipts", params={"tenant_id": tenant.id},
                        headers=tenant.headers, timeout=30).status_code == 403


def test_the_cli_verifies_and_refuses_a_changed_receipt(server: ThreadServer,
                                                        tenant: Tenant, model_id: str,
                                                        tmp_path: Path) -> None:
    raw = oai(server, tenant).responses.with_raw_response.create(
        model=model_id, input="a receipt for the command line", max_output_tokens=4)
    receipt = receipt_of(server, tenant, raw.headers[HEADER])
    key_file = tmp_path / "key.pem"
    key_file.write_text(published_key(server)["public_key_pem"])
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(receipt))
    bad.write_text(json.dumps({**receipt, "cost_micros": receipt["cost_micros"] - 1}))

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "receipts", *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              input=stdin)
    ok = cli("verify", str(good), "--key", str(key_file))
    assert ok.returncode == 0 and ok.stdout.startswith("valid"), ok.stderr
    assert cli("verify", "-", "--url", server.url, stdin=good.read_text()).returncode == 0
    refused = cli("verify", str(bad), "--url", server.url)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "invalid: the signature does not match the receipt's contents"]


def test_the_key_survives_a_restart_and_a_bad_key_file_stops_serve(tmp_path: Path) -> None:
    with ThreadServer(tmp_path / "one") as srv:
        key_id = published_key(srv)["key_id"]
        srv.stop()
        srv.start()
        assert published_key(srv)["key_id"] == key_id
    assert (tmp_path / "one" / "ledger.db-spool" / "receipt-key.pem").exists()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    settings = server_settings(tmp_path / "two")
    proc = subprocess.run(
        [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--model", "demo",
         "--port", "0", "--db", settings.ledger.db, "--receipt-key-file", str(bad)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvgate: --receipt-key-file:")
    assert str(bad) in lines[0]
