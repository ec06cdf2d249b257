"""A bad setting, given as a flag or as KVGATE_<NAME>, to ``kvgate serve`` or ``kvgate
route``: one line on stderr, exit 2, no traceback, nothing created."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.admin import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[2]


def _kvgate(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvgate.gateway.cli", *args], capture_output=True, text=True,
        timeout=120, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "KVGATE_ADMIN_KEY": ADMIN_KEY, **env})


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], mentions: str) -> None:
    """One line naming the value, exit 2; a flag's value is refused by argparse, whose usage
    text comes before that line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-600:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage: "), lines[:3]
    assert mentions in lines[-1], lines[-1]


@pytest.mark.parametrize("env", [
    {"KVGATE_PORT": "abc"},
    {"KVGATE_READ_TIMEOUT_S": "1.5"},
    {"KVGATE_MAX_BODY_BYTES": "lots"},
    {"KVGATE_BLOCK_SIZE": "sixteen"},
    {"KVGATE_METRICS_PORT": "x"},
])
def test_serve_a_bad_environment_value_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    db = tmp_path / "kvgate.db"
    proc = _kvgate(["serve", "--model", "demo", "--port", "0", "--db", f"sqlite:///{db}"],
                   tmp_path, **env)
    _one_line_exit_2(proc, next(iter(env)))
    assert not db.exists()


def test_serve_an_unknown_log_level_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "kvgate.db"
    proc = _kvgate(["serve", "--model", "demo", "--port", "0", "--db", f"sqlite:///{db}",
                    "--log-level", "bogus"], tmp_path)
    _one_line_exit_2(proc, "bogus")


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_serve_a_port_out_of_range_is_one_line(tmp_path: Path, flag: str) -> None:
    db = tmp_path / "kvgate.db"
    args = ["serve", "--model", "demo", "--db", f"sqlite:///{db}", flag, "70000"]
    if flag != "--port":
        args += ["--port", "0"]
    proc = _kvgate(args, tmp_path)
    _one_line_exit_2(proc, "70000")
    assert not db.exists()


@pytest.fixture()
def ledger(tmp_path: Path) -> Path:
    """An existing SQLite ledger the router may open (it never creates one)."""
    db = tmp_path / "kvgate.db"
    proc = _kvgate(["migrate", "--db", f"sqlite:///{db}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-600:]
    return db


def _route(db: Path, *extra: str) -> list[str]:
    return ["route", "--model", "demo", "--db", f"sqlite:///{db}", "--replica",
            "http://127.0.0.1:9", *extra]


@pytest.mark.parametrize("env", [{"KVGATE_PORT": "abc"}, {"KVGATE_WRITE_TIMEOUT": "soon"},
                                 {"KVGATE_LOG_LEVEL": "nope"}])
def test_route_a_bad_environment_value_is_one_line(tmp_path: Path, ledger: Path,
                                                   env: dict[str, str]) -> None:
    proc = _kvgate(_route(ledger, "--port", "0") if "KVGATE_PORT" not in env
                   else _route(ledger), tmp_path, **env)
    _one_line_exit_2(proc, next(iter(env)))


def test_route_a_taken_port_is_one_clear_line(tmp_path: Path, ledger: Path) -> None:
    """``kvgate serve`` says so in one line (test_serve); the router prints a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _kvgate(_route(ledger, "--port", str(port)), tmp_path)
    _one_line_exit_2(proc, str(port))


def test_route_a_model_that_is_not_there_is_one_clear_line(tmp_path: Path,
                                                           ledger: Path) -> None:
    proc = _kvgate(_route(ledger, "--port", "0", "--model", str(tmp_path / "no-such-model")),
                   tmp_path)
    _one_line_exit_2(proc, "no-such-model")


@pytest.mark.parametrize("name", ["KVGATE_FAIR_SCHEDULING", "KVGATE_EVENTS_UNSIGNED",
                                  "KVGATE_CACHE_SHARES"])
def test_a_boolean_setting_that_is_no_boolean_is_refused(name: str) -> None:
    """``0|1`` settings read anything but 1/true/yes/on as *off*, silently: a typo
    (``KVGATE_FAIR_SCHEDULING=ture``) turns a feature off instead of being refused."""
    from kvgate.gateway.config import Settings

    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: "ture"})


def test_serve_more_api_servers_than_one_is_one_line(tmp_path: Path) -> None:
    proc = _kvgate(["serve", "--model", "demo", "--api-servers", "3", "--port", "0",
                    "--db", f"sqlite:///{tmp_path / 'ledger.db'}"], tmp_path)
    _one_line_exit_2(proc, "--api-servers 3")
    assert not (tmp_path / "ledger.db").exists()
