"""A router whose database is away when it starts: it serves, refuses keys with the
API's 503 until the database answers, then checks them again (no crash loop)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import requests

from testkit.admin import ADMIN_KEY
from testkit.ci import cannot_run
from testkit.router import RouterThread
from tests.pg import PG_URL, _pg_admin, _pg_reachable


def test_a_router_started_before_its_database_serves_and_recovers() -> None:
    reason = _pg_reachable()
    if reason:
        cannot_run(reason)
    name = f"kvgate_test_late_{uuid.uuid4().hex[:10]}"
    base = PG_URL.rpartition("/")[0]
    url = f"{base}/{name}"
    router = RouterThread(db=url, admin_key=ADMIN_KEY, replicas=["http://127.0.0.1:9"]).start()
    try:
        headers = {"Authorization": "Bearer kvg_no_such_key_yet"}
        body = {"model": "demo", "messages": [{"role": "user", "content": "x"}]}
        r = requests.post(router.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
        assert requests.get(router.url + "/healthz", timeout=30).status_code == 200
        _pg_admin(f'CREATE DATABASE "{name}"')
        subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "migrate", "--db", url],
                       check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # the key is now checked against the ledger: an unknown one is a 401
            r = requests.post(router.url + "/v1/chat/completions", json=body,
                              headers=headers, timeout=30)
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    finally:
        router.stop()
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
