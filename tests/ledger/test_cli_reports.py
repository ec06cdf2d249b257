"""``kvgate usage --group-by tenant|key|model|day`` and plan currencies, as a person reads
them (tables) and as a script does (``--json``), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvgate.gateway.ledger import Ledger
from kvgate.gateway.ledger.cli import main

from .conftest import NOW, event


def kvgate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


@pytest.fixture
def seeded(db_url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    """acme (USD, default plan) with two keys, zeit (EUR plan) with one; usage on both."""
    db = ["--db", db_url]
    assert kvgate(capsys, "migrate", *db)[0] == 0
    rc, out, _ = kvgate(capsys, "plans", "create", "euro", "--input", "2000000",
                        "--currency", "eur", "--json", *db)
    assert rc == 0 and json.loads(out)["currency"] == "EUR"
    ids = {}
    for name, plan in (("acme", "default"), ("zeit", "euro")):
        rc, out, _ = kvgate(capsys, "tenants", "create", name, "--plan", plan, "--json", *db)
        ids[name] = json.loads(out)["id"]
    for key, tenant in (("k1", "acme"), ("k2", "acme"), ("k3", "zeit")):
        rc, out, _ = kvgate(capsys, "keys", "create", tenant, "--json", *db)
        ids[key] = json.loads(out)["id"]

    async def record() -> None:
        ledger = await Ledger.open(db_url, migrate=False)
        try:
            for tenant, key, model in (("acme", "k1", "m1"), ("acme", "k2", "m2"),
                                       ("acme", "k2", "m2"), ("zeit", "k3", "m1")):
                await ledger.record(event(ids[tenant], ids[key], model=model, prompt=1000,
                                          completion=0, started_at=NOW))
        finally:
            await ledger.close()

    asyncio.run(record())
    return ids


def test_group_by_tenant_names_tenants_and_currencies(
        db_url: str, seeded: dict[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = kvgate(capsys, "usage", "--group-by", "tenant", "--db", db_url)
    assert rc == 0
    header, *rows = _table(out)
    assert header == ["TENANT_ID", "TENANT_NAME", "REQUESTS", "PROMPT_TOKENS", "CACHED_TOKENS",
                      "CACHE_WRITE_TOKENS", "COMPLETION_TOKENS", "RESERVED_BYTE_SECONDS",
                      "STORED_TOKEN_SECONDS", "COST_MICROS", "CURRENCY"]
    assert rows == [
        [str(seeded["acme"]), "acme", "3", "3000", "0", "0", "0", "0", "0", "3000", "USD"],
        [str(seeded["zeit"]), "zeit", "1", "1000", "0", "0", "0", "0", "0", "2000", "EUR"],
        # two currencies: one TOTAL line each, never a sum across them
        ["TOTAL", "-", "1", "1000", "0", "0", "0", "0", "0", "2000", "EUR"],
        ["TOTAL", "-", "3", "3000", "0", "0", "0", "0", "0", "3000", "USD"]]

    rc, out, _ = kvgate(capsys, "usage", "--group-by", "tenant", "--json", "--db", db_url)
    report = json.loads(out)
    assert report["totals"]["currency"] is None
    assert report["totals"]["cost_micros_by_currency"] == {"EUR": 2000, "USD": 3000}
    assert [(r["tenant_name"], r["currency"]) for r in report["rows"]] == [
        ("acme", "USD"), ("zeit", "EUR")]


def test_group_by_key_model_and_day(db_url: str, seeded: dict[str, int],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = kvgate(capsys, "usage", "--group-by", "key", "--tenant", "acme", "--db",
                        db_url)
    header, *rows = _table(out)
    assert rc == 0 and header[:3] == ["KEY_ID", "KEY_PREFIX", "TENANT_ID"]
    assert [(r[0], r[2], r[3], r[-1]) for r in rows] == [
        (str(seeded["k1"]), str(seeded["acme"]), "1", "USD"),
        (str(seeded["k2"]), str(seeded["acme"]), "2", "USD"),
        ("TOTAL", "-", "3", "USD")]  # one currency: one TOTAL line that names it
    assert all(r[1].startswith("kvg_") for r in rows[:-1])

    rc, out, _ = kvgate(capsys, "usage", "--group-by", "model", "--json", "--db", db_url)
    report = json.loads(out)
    assert [(r["model"], r["currency"], r["requests"]) for r in report["rows"]] == [
        ("m1", "EUR", 1), ("m1", "USD", 1), ("m2", "USD", 2)]

    rc, out, _ = kvgate(capsys, "usage", "--tenant", "zeit", "--since", "2026-03-14T00:00Z",
                        "--until", "2026-03-15", "--db", db_url)
    assert _table(out)[1:] == [["2026-03-14", "1", "1000", "0", "0", "0", "0", "0", "2000", "EUR"],
                               ["TOTAL", "1", "1000", "0", "0", "0", "0", "0", "2000", "EUR"]]


def test_bad_times_and_groups_are_clear_errors(
        db_url: str, seeded: dict[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["usage", "--since", "last tuesday", "--db", db_url])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --since: not a time: 'last tuesday'" in err and "7d" in err
    with pytest.raises(SystemExit):
        main(["usage", "--group-by", "week", "--db", db_url])
    assert "invalid choice: 'week'" in capsys.readouterr().err
    rc, _, err = kvgate(capsys, "usage", "--since", "1d", "--until", "2d", "--db", db_url)
    assert rc == 1 and "must be after since" in err


def test_plans_show_their_currency(db_url: str, seeded: dict[str, int],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = kvgate(capsys, "plans", "list", "--db", db_url)
    header, *rows = _table(out)
    assert header[:3] == ["ID", "NAME", "CURRENCY"]
    assert [r[1:3] for r in rows] == [["default", "USD"], ["euro", "EUR"]]
    rc, _, err = kvgate(capsys, "plans", "create", "x", "--input", "1", "--currency", "EURO",
                        "--db", db_url)
    assert rc == 1 and "ISO 4217" in err
    rc, out, _ = kvgate(capsys, "plans", "update", "euro", "--output", "1", "--json",
                        "--db", db_url)
    assert rc == 0 and json.loads(out)["currency"] == "EUR"
    rc, out, _ = kvgate(capsys, "plans", "update", "euro", "--cache-storage", "7", "--json",
                        "--db", db_url)
    assert rc == 0 and json.loads(out)["cache_storage"] == 7
