"""`kvgate serve` as users run it: flags and KVGATE_* variables, the start banner with a
working copy-paste example, and a SIGTERM that lets in-flight requests finish."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from kvgate.gateway.cli import build_parser
from kvgate.gateway.http.serve import settings_from_args

ROOT = Path(__file__).parents[2]


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVGATE_PORT", "9001")
    monkeypatch.setenv("KVGATE_BLOCK_SIZE", "32")
    monkeypatch.setenv("KVGATE_HOST_CACHE_BYTES", "1GiB")
    monkeypatch.setenv("KVGATE_ADMIN_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--block-size", "8", "--device-cache-bytes",
                                      "64MiB", "--db", "sqlite:///x.db"])
    s = settings_from_args(args)
    assert (s.http.port, s.cache.block_size, s.cache.device_cache_bytes,
            s.cache.host_cache_bytes) == (9001, 8, 64 * 1024**2, 1024**3)
    assert s.ledger.db == "sqlite:///x.db" and s.http.admin_key == "from-env"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--host", "--port", "--model", "--db", "--device", "--dtype",
                 "--device-cache-bytes", "--host-cache-bytes", "--block-size"):
        assert flag in help_text


def test_single_flight_wait_steps_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvgate.gateway.engine import EngineConfig
    from kvgate.gateway.http.app import engine_config

    s = settings_from_args(build_parser().parse_args(["serve", "--single-flight-wait-steps", "3"]))
    assert engine_config(s).single_flight_wait_steps == 3
    monkeypatch.setenv("KVGATE_SINGLE_FLIGHT_WAIT_STEPS", "0")  # off
    s = settings_from_args(build_parser().parse_args(["serve"]))
    assert engine_config(s).single_flight_wait_steps == 0
    with pytest.raises(ValueError, match="single_flight_wait_steps"):
        EngineConfig(single_flight_wait_steps=-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_banner_and_graceful_sigterm(tmp_path: Path) -> None:
    """``kvgate serve`` with its defaults, as ``make run`` starts it: the real default model
    (smollm2) answers a real question, and SIGTERM drains a request in flight."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVGATE_")}
    env.update(KVGATE_DEVICE_CACHE_BYTES="8MiB", KVGATE_HOST_CACHE_BYTES="8MiB",
               KVGATE_LOG_LEVEL="warning", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--port", str(port), "--device", "cpu",
         "--db", f"sqlite:///{tmp_path / 'serve.db'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip().startswith("curl -s http"):
                break
        banner = "".join(lines)
        url = f"http://127.0.0.1:{port}"
        assert f"on {url}" in banner
        admin_key = re.search(r"^\s+(kvg_\S+)\s*$", banner, re.M)
        assert admin_key, banner
        assert "/admin/tenants" in banner and "/v1/chat/completions" in banner
        admin = {"Authorization": f"Bearer {admin_key.group(1)}"}
        tenant = requests.post(f"{url}/admin/tenants", json={"name": "banner"}, headers=admin,
                               timeout=30).json()
        key = requests.post(f"{url}/admin/tenants/{tenant['id']}/keys", headers=admin,
                            timeout=30).json()["key"]

        assert "serving model 'smollm2'" in banner
        r = requests.post(f"{url}/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "smollm2", "max_tokens": 40, "messages": [
                              {"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]

        result: dict = {}

        def slow_request() -> None:
            r = requests.post(f"{url}/v1/chat/completions", timeout=120,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"model": "smollm2", "max_tokens": 40, "ignore_eos": True,
                                    "messages": [{"role": "user", "content": "drain me"}]})
            result["status"] = r.status_code
            result["body"] = r.json()

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(0.3)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        assert proc.wait(60) == 0
        assert result["status"] == 200, json.dumps(result)
        assert result["body"]["usage"]["completion_tokens"] >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_taken_port_is_one_clear_line_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        db = tmp_path / "kvgate.db"
        proc = subprocess.run(
            [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--port", str(port),
             "--db", f"sqlite:///{db}"],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"kvgate: cannot listen on 127.0.0.1:{port} (--port): Address already in use")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not db.exists()  # nothing was opened or created


def test_an_unknown_tool_call_parser_is_one_clear_line(tmp_path: Path) -> None:
    from kvgate.gateway.protocol.tool_parsers import HermesParser, parser_for

    assert isinstance(parser_for(None, "qwen"), HermesParser)  # the name people guess
    db = tmp_path / "kvgate.db"
    proc = subprocess.run(
        [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--port", "0", "--db", f"sqlite:///{db}",
         "--tool-call-parser", "qwen3-coder"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("kvgate: --tool-call-parser: unknown tool-call parser")
    assert "hermes" in proc.stderr and not db.exists()


@pytest.mark.parametrize("flag", ["--kv-dtype", "--offload-kv-dtype"])
def test_an_unknown_kv_dtype_is_one_clear_line(tmp_path: Path, flag: str) -> None:
    db = tmp_path / "kvgate.db"
    proc = subprocess.run(
        [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--port", "0", "--db",
         f"sqlite:///{db}", "--model", "demo", flag, "fp4"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"kvgate: {flag[2:].replace('-', '_')} 'fp4': use auto, fp8")
    assert not db.exists()


def test_a_short_admin_key_is_refused_before_anything_opens(tmp_path: Path) -> None:
    """``KVGATE_ADMIN_KEY=abc`` would be a live admin key anyone can guess (and ``keys list``
    would print all of it as its prefix): refused with one line, nothing created."""
    db = tmp_path / "kvgate.db"
    proc = subprocess.run(
        [sys.executable, "-m", "kvgate.gateway.cli", "serve", "--port", "0", "--db", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "KVGATE_ADMIN_KEY": "abc"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("kvgate: KVGATE_ADMIN_KEY is 3 characters; an admin key needs")
    assert not db.exists()


def test_route_refuses_a_ledger_that_is_not_there(tmp_path: Path) -> None:
    """The router checks keys in the replicas' ledger: a missing SQLite file (the default
    ``./kvgate.db`` in another directory) is a clear refusal, never a new empty ledger."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvgate.gateway.cli", "route", "--port", "0",
         "--replica", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "KVGATE_ADMIN_KEY": "kvg_test_admin_key_0123456789",
             "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no ledger database at" in proc.stderr and "KVGATE_DB" in proc.stderr
    assert not (tmp_path / "kvgate.db").exists()
