"""Signed receipts in the ledger: written in the usage row's transaction from the same event
(so the counts and the cost agree with the row), readable by their tenant only, kept
through the spool, and refused by the verifier once any field is changed."""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from kvgate.gateway.ledger import Ledger, NotFound
from kvgate.gateway.ledger.models import ReceiptRow, UsageRow
from kvgate.gateway.ledger.receipts import (
    ReceiptKey,
    ReceiptKeyError,
    load_public_key,
    new_receipt_id,
    parse,
    verify,
)
from kvgate.gateway.usage import CacheDetail
from tests.ledger.conftest import event
from tests.ledger.test_spool import readonly_writer, until

KEY = ReceiptKey.generate()
DETAIL = CacheDetail(read=((b"\x01" * 16, "device"), (b"\x02" * 16, "host")),
                     written=((b"\x03" * 16, 300),))


def receipted(tenant: int, **kw: Any):  # type: ignore[no-untyped-def]
    return dataclasses.replace(event(tenant, **kw), receipt_id=new_receipt_id(), cache=DETAIL)


async def usage_row(ledger: Ledger, request_id: str) -> Any:
    async with ledger.engine.connect() as conn:
        return (await conn.execute(select(UsageRow).where(UsageRow.request_id == request_id))
                ).one()


def tampered(receipt: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The receipt with one field changed, for every field (nested ones too)."""
    out = []

    def walk(node: Any, path: list[Any]) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if path == [] and k == "signature":
                continue
            if isinstance(v, dict | list) and v:
                walk(v, [*path, k])
                continue
            changed = copy.deepcopy(receipt)
            target = changed
            for p in path:
                target = target[p]
            target[k] = (v + 1 if isinstance(v, int) and not isinstance(v, bool)
                         else "x" if v != "x" else "y")
            out.append(("/".join(map(str, [*path, k])), changed))
    walk(receipt, [])
    return out


async def test_the_receipt_states_what_the_row_billed_and_only_its_tenant_reads_it(
        ledger: Ledger) -> None:
    ledger.receipt_key = KEY
    tenant = (await ledger.create_tenant("acme"))["id"]
    other = (await ledger.create_tenant("other"))["id"]
    e = receipted(tenant, prompt=100, cached=32, w5m=16, completion=7)
    billed = await ledger.record(e)
    assert e.receipt_id is not None
    receipt = await ledger.receipt(e.receipt_id, tenant)
    row = await usage_row(ledger, e.request_id)
    assert receipt["id"] == e.receipt_id and receipt["request_id"] == e.request_id
    assert receipt["cost_micros"] == row.cost_micros == billed.cost_micros
    assert receipt["currency"] == row.currency
    t = receipt["tokens"]
    assert (t["prompt"], t["cached"], t["cache_write_5m"], t["cache_write_1h"],
            t["completion"]) == (row.prompt_tokens, row.cached_tokens,
                                 row.cache_write_5m_tokens, row.cache_write_1h_tokens,
                                 row.completion_tokens)
    assert t["uncached"] == 100 - 32 - 16
    assert receipt["plan"]["name"] == "default" and receipt["plan"]["prices"]["input"] > 0
    assert receipt["blocks"] == DETAIL.to_json()
    assert verify(receipt, KEY.public) is None
    with pytest.raises(NotFound):
        await ledger.receipt(e.receipt_id, other)
    with pytest.raises(NotFound):
        await ledger.receipt(new_receipt_id(), tenant)
    # a retried request id bills nothing and stores no second receipt
    again = dataclasses.replace(e, receipt_id=new_receipt_id())
    assert (await ledger.record(again)).new is False
    with pytest.raises(NotFound):
        await ledger.receipt(again.receipt_id or "", tenant)
    async with ledger.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(ReceiptRow))).scalar() == 1


async def test_an_event_without_a_receipt_id_or_key_stores_none(ledger: Ledger) -> None:
    tenant = (await ledger.create_tenant("acme"))["id"]
    e = receipted(tenant)
    await ledger.record(e)  # no key set: the usage row only
    await ledger.record(event(tenant))
    async with ledger.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(ReceiptRow))).scalar() == 0


def test_changing_any_field_breaks_the_signature() -> None:
    e = receipted(1, prompt=64, cached=32, completion=3)
    from kvgate.gateway.ledger.billing import DEFAULT_PRICES, Billed, PlanPrices, cost_micros
    from kvgate.gateway.ledger.receipts import payload

    plan = PlanPrices(DEFAULT_PRICES, "USD", 1, "default")
    receipt = KEY.sign(payload(e, Billed(True, cost_micros(e.usage, DEFAULT_PRICES), "USD"),
                               plan))
    assert verify(receipt, KEY.public) is None
    variants = tampered(receipt)
    assert len(variants) > 25
    for where, changed in variants:
        assert verify(changed, KEY.public) is not None, where
    assert "key" in (verify(receipt, ReceiptKey.generate().public) or "")
    forged = ReceiptKey.generate()
    assert verify({**forged.sign({k: v for k, v in receipt.items()
                                  if k not in ("signature", "key_id", "signature_alg")}),
                   "key_id": KEY.key_id}, KEY.public) is not None
    with pytest.raises(ValueError, match="repeats"):
        parse('{"cost_micros": 1, "cost_micros": 2}')
    assert load_public_key(KEY.public_pem()) is not None
    import json
    assert verify(receipt, load_public_key(json.dumps({"jwk": KEY.jwk()}))) is None
    # one spelling of the signature only: the standard alphabet, padding, or other spare
    # bits in its last character do not verify
    sig = receipt["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = alphabet[alphabet.index(sig[-1]) + 1]  # same bytes: only unused bits differ
    for other in (sig.replace("-", "+").replace("_", "/"), sig + "=", sig[:-1] + spare,
                  " " + sig):
        if other != sig:
            assert verify({**receipt, "signature": other}, KEY.public) is not None, other


async def test_a_spooled_receipt_is_stored_when_the_spool_replays(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = await Ledger.open(url, spool_dir=tmp_path / "spool")
    ledger.receipt_key = KEY
    tenant = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tenant))  # the tenant's prices are known from here
    await readonly_writer(ledger, True)
    e = receipted(tenant, prompt=500, cached=64, completion=20)
    billed = await ledger.record(e)
    assert billed.spooled
    assert e.receipt_id is not None
    with pytest.raises(NotFound):  # waiting in the spool: not yet readable
        await ledger.receipt(e.receipt_id, tenant)
    await readonly_writer(ledger, False)
    await until(lambda: ledger.spool_depth() == 0, "the spool replayed")
    receipt = await ledger.receipt(e.receipt_id, tenant)
    row = await usage_row(ledger, e.request_id)
    assert receipt["cost_micros"] == row.cost_micros == billed.cost_micros
    assert receipt["blocks"] == DETAIL.to_json() and receipt["tokens"]["cached"] == 64
    assert verify(receipt, KEY.public) is None
    await ledger.close()


def test_a_generated_key_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "receipt-key.pem"
    first = ReceiptKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ReceiptKey.load_or_create(path).key_id == first.key_id
    path.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ReceiptKeyError, match="not a PEM private key"):
        ReceiptKey.load_or_create(path)
    with pytest.raises(ReceiptKeyError, match="cannot read"):
        ReceiptKey.load(tmp_path / "missing.pem")
