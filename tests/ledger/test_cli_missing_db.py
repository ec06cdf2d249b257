"""The CLI never makes an empty ledger by accident: every command but ``serve`` and
``migrate`` refuses a SQLite file that is not there, says which absolute path it looked at
and how to point it at the right one, and leaves no file behind."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvgate.gateway.ledger.cli import main

COMMANDS = [
    ["usage"], ["usage", "--group-by", "tenant", "--json"], ["tenants", "list"],
    ["tenants", "create", "acme"], ["keys", "create", "--admin"], ["keys", "create", "acme"],
    ["keys", "list"], ["keys", "revoke", "1"], ["plans", "list"],
    ["plans", "create", "pro", "--input", "1000"], ["plans", "update", "default", "--input", "1"],
]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with no ledger in it, as the current directory, KVGATE_DB unset."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVGATE_DB", raising=False)
    return tmp_path


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_ledger_command_refuses_a_missing_file(
        argv: list[str], elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no ledger database at {elsewhere / 'kvgate.db'} " in err
    assert "from the default" in err and "current directory" in err
    assert "--db" in err and "KVGATE_DB" in err and "kvgate migrate" in err
    assert not (elsewhere / "kvgate.db").exists()
    assert os.listdir(elsewhere) == []


def test_the_message_says_where_the_url_came_from(
        elsewhere: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = elsewhere / "sub" / "ledger.db"
    assert main(["usage", "--db", f"sqlite:///{missing}"]) == 1
    err = capsys.readouterr().err
    assert f"at {missing} (sqlite:///{missing}, from --db)" in err
    assert "relative path" not in err  # it was absolute
    monkeypatch.setenv("KVGATE_DB", "sqlite:///rel.db")
    assert main(["tenants", "list"]) == 1
    err = capsys.readouterr().err
    assert f"at {elsewhere / 'rel.db'} (sqlite:///rel.db, from $KVGATE_DB" in err
    assert not missing.parent.exists() and not (elsewhere / "rel.db").exists()


def test_migrate_creates_the_ledger_and_then_the_commands_use_it(
        elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate"]) == 0
    assert "empty -> " in capsys.readouterr().out
    assert (elsewhere / "kvgate.db").is_file()
    assert main(["tenants", "create", "acme", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "acme"
    assert main(["usage", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["requests"] == 0


def test_in_memory_and_postgres_urls_are_not_files(
        elsewhere: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "list", "--json", "--db", "sqlite://"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["migrate", "--db", pg_url]) == 0
    capsys.readouterr()
    assert main(["plans", "list", "--json", "--db", pg_url]) == 0
    assert [p["currency"] for p in json.loads(capsys.readouterr().out)] == ["USD"]
    assert os.listdir(elsewhere) == []


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KVGATE_")}


def test_the_kvgate_process_exits_non_zero(tmp_path: Path) -> None:
    """The real entry point (``kvgate``, all layers), as a person runs it."""
    proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "usage"], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"kvgate: error: no ledger database at {tmp_path / 'kvgate.db'} " in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "kvgate.db").exists()


def test_serve_creates_the_ledger(tmp_path: Path) -> None:
    """``kvgate serve`` with the default URL creates and migrates ./kvgate.db."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--port", "0", "--device", "cpu",
         "--device-cache-bytes", "8MiB", "--host-cache-bytes", "8MiB"],
        cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    assert proc.stdout is not None
    seen = ""
    try:
        deadline = time.monotonic() + 300  # loading the model stack, on a busy machine
        while "kvgate: serving" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                seen += line
        assert "kvgate: serving" in seen, seen
        assert "ledger: sqlite:///./kvgate.db" in seen
        assert (tmp_path / "kvgate.db").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.ledger.cli", "keys", "list",
                           "--json"], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (admin,) = json.loads(proc.stdout)  # the admin key serve made on first start
    assert admin["role"] == "admin"
