"""Retention classes and cache keys through the official SDKs: OpenAI's
``prompt_cache_retention`` / ``prompt_cache_options`` / ``prompt_cache_key``, Anthropic's
``cache_control.ttl`` order and ``metadata.user_id``; each write billed by its class, a
retention beyond the tenant's maximum refused, a key kept with the bill and never shared."""

from __future__ import annotations

import anthropic
import openai
import pytest

from kvgate.gateway.ledger import cost_micros
from kvgate.gateway.ledger.billing import DEFAULT_PRICES
from kvgate.gateway.usage import Usage
from testkit import Admin, Tenant, ThreadServer

LONG = "A system prompt long enough to fill several cache blocks of sixteen tokens. " * 8


def _openai(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def _anthropic(server: ThreadServer, tenant: Tenant) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)


def _row(server: ThreadServer, tenant: Tenant) -> dict:
    rows = list(server.ledger_rows(tenant.id).values())
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize(("retention", "column"), [("in_memory", "cache_write_5m_tokens"),
                                                   ("24h", "cache_write_24h_tokens")])
def test_prompt_cache_retention_sets_the_write_class(
        server: ThreadServer, admin: Admin, model_id: str, retention: str, column: str) -> None:
    tenant = admin.tenant()
    with _openai(server, tenant) as client:
        r = client.chat.completions.create(
            model=model_id, max_tokens=1, messages=[{"role": "user", "content": LONG}],
            extra_body={"prompt_cache_retention": retention, "prompt_cache_key": "team-a"})
    row = _row(server, tenant)
    written = r.usage.prompt_tokens_details.cache_write_tokens
    assert written > 0 and row[column] == row["cache_write_tokens"] == written
    assert row["cache_key"] == "team-a"
    usage = Usage(prompt_tokens=row["prompt_tokens"], cached_tokens=row["cached_tokens"],
                  cache_writes={86400 if retention == "24h" else 300: written},
                  completion_tokens=row["completion_tokens"])
    assert row["cost_micros"] == cost_micros(usage, DEFAULT_PRICES)


def test_prompt_cache_options_keep_writes_half_an_hour(
        server: ThreadServer, admin: Admin, model_id: str) -> None:
    tenant = admin.tenant()
    with _openai(server, tenant) as client:
        client.responses.create(model=model_id, max_output_tokens=1, input=LONG,
                                extra_body={"prompt_cache_options": {"ttl": "30m"}})
    row = _row(server, tenant)
    assert row["cache_write_1h_tokens"] == row["cache_write_tokens"] > 0


def test_a_retention_beyond_the_tenants_maximum_or_unknown_is_refused(
        server: ThreadServer, admin: Admin, model_id: str) -> None:
    tenant = admin.tenant(cache_max_ttl_seconds=3600)
    with _openai(server, tenant) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model_id, max_tokens=1, messages=[{"role": "user", "content": "hi"}],
                extra_body={"prompt_cache_retention": "24h"})
        assert err.value.body["param"] == "prompt_cache_retention"
        assert "at most 1 h" in err.value.body["message"]
        for bad in ({"prompt_cache_retention": "forever"}, {"prompt_cache_retention": 86400},
                    {"prompt_cache_options": {"ttl": "1h"}},
                    {"prompt_cache_options": {"mode": "explicit"}},
                    {"prompt_cache_key": "k" * 65}, {"prompt_cache_key": 7},
                    # kept in the ledger and shown in receipts: printable text only (a NUL
                    # would be refused by PostgreSQL at commit, after the answer)
                    {"prompt_cache_key": "a\x00b"}, {"prompt_cache_key": "a\u202eb"},
                    {"prompt_cache_key": "line\nbreak"}, {"prompt_cache_key": "\x1b[31m"}):
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model=model_id, max_tokens=1, prompt="hi",
                                          extra_body=bad)
    with _anthropic(server, tenant) as client:
        client.messages.create(model=model_id, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "text", "text": LONG, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}])
        low = admin.tenant(cache_max_ttl_seconds=300)
    with _anthropic(server, low) as client, pytest.raises(anthropic.BadRequestError,
                                                          match="longer than this tenant"):
        client.messages.create(model=model_id, max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "text", "text": LONG, "cache_control": {
                "type": "ephemeral", "ttl": "1h"}}]}])
    with _anthropic(server, low) as client, pytest.raises(anthropic.BadRequestError,
                                                          match="printable"):
        client.messages.create(model=model_id, max_tokens=1, metadata={"user_id": "u\x00"},
                               messages=[{"role": "user", "content": "hi"}])
    assert server.ledger_rows(low.id) == {}  # refused before any work: nothing billed


def test_anthropic_longer_ttls_come_first(server: ThreadServer, admin: Admin,
                                          model_id: str) -> None:
    tenant = admin.tenant()
    with _anthropic(server, tenant) as client:
        with pytest.raises(anthropic.BadRequestError, match="longer TTLs come first"):
            client.messages.create(
                model=model_id, max_tokens=1,
                system=[{"type": "text", "text": LONG,
                         "cache_control": {"type": "ephemeral", "ttl": "5m"}}],
                messages=[{"role": "user", "content": [{"type": "text", "text": "and more " * 20,
                           "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}])
        r = client.messages.create(
            model=model_id, max_tokens=1, metadata={"user_id": "end-user-42"},
            system=[{"type": "text", "text": LONG,
                     "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "and more " * 20,
                       "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}])
    assert r.usage.cache_creation.ephemeral_1h_input_tokens > 0
    assert r.usage.cache_creation.ephemeral_5m_input_tokens > 0
    assert _row(server, tenant)["cache_key"] == "end-user-42"


def test_a_cache_key_never_reaches_across_tenants(server: ThreadServer, admin: Admin,
                                                  model_id: str) -> None:
    """Same key, same prompt, two tenants: the second reads nothing the first wrote."""
    first, second = admin.tenant(), admin.tenant()
    prompt = "shared words under one key " * 12
    for tenant in (first, second):
        with _openai(server, tenant) as client:
            r = client.chat.completions.create(
                model=model_id, max_tokens=1, messages=[{"role": "user", "content": prompt}],
                extra_body={"prompt_cache_key": "same-key"})
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    with _openai(server, first) as client:  # its own second request does read it
        r = client.chat.completions.create(
            model=model_id, max_tokens=1, messages=[{"role": "user", "content": prompt}],
            extra_body={"prompt_cache_key": "same-key"})
    assert r.usage.prompt_tokens_details.cached_tokens > 0
