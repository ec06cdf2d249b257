"""The gateway on a PostgreSQL ledger, as a multi-replica install runs it: the schema is
migrated by ``kvgate migrate`` (serve never migrates PostgreSQL), requests from the official
SDK are billed exactly once with the usage they reported, and a second replica on the same
database sees the same tenants and totals."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from gateway.config import Settings
from tests.http.conftest import ADMIN_KEY, Admin, ServerThread
from tests.pg import pg_url  # noqa: F401  (a fixture)


def _settings(db: str) -> Settings:
    return Settings(host="127.0.0.1", port=0, model="demo", db=db, device="cpu",
                    admin_key=ADMIN_KEY, device_cache_bytes=16 * 1024 * 1024,
                    host_cache_bytes=16 * 1024 * 1024, default_max_tokens=8)


def test_serve_refuses_an_unmigrated_postgres_ledger(pg_url: str) -> None:  # noqa: F811
    with pytest.raises(Exception, match="kvgate migrate"):
        ServerThread(_settings(pg_url)).start()


def test_two_replicas_bill_once_into_one_postgres_ledger(pg_url: str) -> None:  # noqa: F811
    migrate = subprocess.run([sys.executable, "-m", "gateway.cli", "migrate", "--db", pg_url],
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    first = ServerThread(_settings(pg_url)).start()
    second = ServerThread(_settings(pg_url)).start()
    try:
        admin = Admin(first.url)
        tenant = admin.tenant(name="pg-tenant")
        prompt = [{"role": "system", "content": "You answer for the PostgreSQL test. " * 8},
                  {"role": "user", "content": "hello"}]
        seen = []
        for srv in (first, second, first):
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
            c = client.chat.completions.create(model="demo", messages=prompt, max_tokens=4)
            seen.append(c.usage)
        # each replica has its own cache: the first request on each writes, the repeat hits
        assert [u.prompt_tokens_details.cached_tokens > 0 for u in seen] == [False, False, True]
        for srv in (first, second):
            totals = Admin(srv.url).usage(tenant.id)
            assert totals["requests"] == 3
            assert totals["prompt_tokens"] == sum(u.prompt_tokens for u in seen)
            assert totals["completion_tokens"] == sum(u.completion_tokens for u in seen)
            assert totals["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens
                                                  for u in seen)
            assert totals["cost_micros"] > 0 and isinstance(totals["cost_micros"], int)
    finally:
        second.stop()
        first.stop()
