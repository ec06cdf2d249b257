"""``kvgate migrate | tenants | keys | plans | usage`` on a real database.

The commands are driven through the ledger's own parser (the same ``register`` that
``kvgate`` calls), so these tests do not load the model stack that ``kvgate serve`` needs;
one test checks that the full ``kvgate`` parser carries the same commands.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from kvgate.gateway.ledger import Ledger
from kvgate.gateway.ledger.cli import main
from kvgate.gateway.ledger.migrate import head_revision
from kvgate.gateway.ledger.timespec import parse_time

from .conftest import event


def kvgate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_tenant_key_usage_flow(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", db_url]
    rc, out, _ = kvgate(capsys, "migrate", *db)
    assert rc == 0 and f"-> {head_revision()}" in out

    rc, out, _ = kvgate(capsys, "tenants", "create", "acme", "--cache-quota-bytes", "1MiB",
                        "--cache-share-bytes", "256KiB", "--requests-per-minute", "30",
                        "--json", *db)
    tenant = json.loads(out)
    assert rc == 0 and tenant["name"] == "acme" and tenant["cache_quota_bytes"] == 1 << 20
    # the former --cache-share-bytes: a reservation of that much on both tiers
    assert tenant["cache_reserved_device_bytes"] == tenant["cache_reserved_host_bytes"] == 256 << 10
    assert tenant["cache_max_ttl_seconds"] == 86400
    rc, _, err = kvgate(capsys, "tenants", "create", "acme", *db)
    assert rc == 1 and "already exists" in err

    rc, out, _ = kvgate(capsys, "tenants", "list", *db)
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert "acme" in out.splitlines()[1]

    rc, out, _ = kvgate(capsys, "keys", "create", "acme", "--json", *db)
    key = json.loads(out)
    assert rc == 0 and key["tenant_id"] == tenant["id"] and key["key"].startswith("kvg_")
    rc, out, _ = kvgate(capsys, "keys", "create", "acme", *db)  # for people: key on its own line
    assert rc == 0 and out.splitlines()[-1].startswith("kvg_")
    rc, _, err = kvgate(capsys, "keys", "create", "nobody", *db)
    assert rc == 1 and "no tenant named 'nobody'" in err

    async def record_and_check() -> tuple[bool, bool]:
        ledger = await Ledger.open(db_url, migrate=False)
        try:
            for model in ("m1", "m1", "m2"):
                await ledger.record(event(tenant["id"], key["id"], model=model, prompt=50,
                                          cached=10, completion=5))
            return (await ledger.authenticate(key["key"]) is None,
                    (await ledger.get_tenant(tenant["id"]))["requests_per_minute"] == 30)
        finally:
            await ledger.close()

    assert asyncio.run(record_and_check()) == (False, True)
    rc, out, _ = kvgate(capsys, "keys", "revoke", str(key["id"]), *db)
    assert rc == 0 and "revoked" in out
    assert asyncio.run(record_and_check())[0] is True

    rc, out, _ = kvgate(capsys, "usage", "--tenant", "acme", "--group-by", "model", "--json",
                        *db)
    report = json.loads(out)
    assert rc == 0 and report["totals"]["requests"] == 6
    assert [(r["model"], r["requests"]) for r in report["rows"]] == [("m1", 4), ("m2", 2)]
    rc, out, _ = kvgate(capsys, "usage", "--since", "2026-03-14", "--until", "2026-03-15", *db)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[0] == "DAY" and lines[1].startswith("2026-03-14")
    assert lines[-1].split()[:2] == ["TOTAL", "6"]

    rc, out, _ = kvgate(capsys, "plans", "create", "pro", "--input", "2000000", "--json", *db)
    assert rc == 0 and json.loads(out)["cache_write_1h"] == 4_000_000
    rc, out, _ = kvgate(capsys, "plans", "list", *db)
    assert rc == 0 and [ln.split()[1] for ln in out.splitlines()[1:]] == ["default", "pro"]


def test_postgres_commands_refuse_an_unmigrated_schema(pg_url: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    rc, _, err = kvgate(capsys, "tenants", "list", "--db", pg_url)
    assert rc == 1 and "kvgate migrate" in err
    assert kvgate(capsys, "migrate", "--db", pg_url)[0] == 0
    assert kvgate(capsys, "tenants", "list", "--db", pg_url)[0] == 0
    rc, out, _ = kvgate(capsys, "migrate", "--downgrade", "base", "--db", pg_url)
    assert rc == 0 and f"{head_revision()} -> empty" in out


def test_db_defaults_to_kvgate_db(sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVGATE_DB", sqlite_url)
    assert kvgate(capsys, "migrate")[0] == 0  # only migrate (and serve) create the file
    assert kvgate(capsys, "tenants", "create", "from-env")[0] == 0
    _, out, _ = kvgate(capsys, "tenants", "list", "--json", "--db", sqlite_url)
    assert [t["name"] for t in json.loads(out)] == ["from-env"]


def test_runs_as_a_process(sqlite_url: str) -> None:
    assert main(["migrate", "--db", sqlite_url]) == 0
    proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.ledger.cli", "tenants", "list",
                           "--json", "--db", sqlite_url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_kvgate_registers_the_ledger_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib

    from kvgate.gateway import cli

    real_import = importlib.import_module

    def only_ledger(name: str) -> object:  # the other layers are not under test here
        if name != "kvgate.gateway.ledger.cli":
            raise ModuleNotFoundError(name=name)
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", only_ledger)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"migrate", "tenants", "keys", "plans", "usage"} <= set(sub.choices)


def test_parse_time() -> None:
    assert parse_time("2026-03-14") == datetime(2026, 3, 14, tzinfo=UTC)
    assert parse_time("2026-03-14T12:00:00+02:00") == datetime(2026, 3, 14, 10,
                                                                tzinfo=UTC)
    before = datetime.now(UTC)
    week_ago = parse_time("7d")
    assert before - timedelta(days=7) <= week_ago <= datetime.now(UTC) - timedelta(days=7)


def test_only_ascii_digits_are_ids(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``²`` passes ``str.isdigit`` and ``١`` is Arabic-Indic one: names that match nothing,
    never a traceback and never plan or tenant 1; an id past the columns' range is unknown."""
    db = ["--db", db_url]
    assert kvgate(capsys, "migrate", *db)[0] == 0
    assert kvgate(capsys, "plans", "create", "p1", "--input", "5", *db)[0] == 0
    assert kvgate(capsys, "tenants", "create", "t1", *db)[0] == 0
    for ref in ("²", "١", "99999999999999999999"):
        for argv in (("tenants", "create", "x" + str(len(ref)), "--plan", ref),
                     ("plans", "update", ref, "--output", "5"),
                     ("usage", "--tenant", ref), ("keys", "create", ref)):
            rc, _, err = kvgate(capsys, *argv, *db)
            assert rc == 1 and "Traceback" not in err, (argv, err)
            assert "does not exist" in err or "no tenant named" in err, (argv, err)
