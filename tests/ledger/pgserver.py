"""A PostgreSQL server of the test's own, to stop and start at will (``initdb`` and
``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` or ``PATH``), on a free loopback port in a
fresh directory. As root, the server runs as the ``postgres`` user (PostgreSQL refuses
root). Tests skip, saying why, only when no ``initdb`` is installed."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from testkit.ci import cannot_run


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class OwnPostgres:
    def __init__(self) -> None:
        initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            cannot_run("no initdb/pg_ctl installed (PostgreSQL server binaries)")
        self.dir = Path(tempfile.mkdtemp(prefix="kvgate-pg-"))  # not under a 0700 parent
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run(initdb, "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync")
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{cmd[0]} failed: {out.stdout}{out.stderr}"

    def start(self) -> None:
        assert self.pg_ctl is not None
        self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "-w", "start")

    def kill(self) -> None:
        """``pg_ctl stop -m immediate``: no shutdown checkpoint, clients cut off."""
        assert self.pg_ctl is not None
        self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        assert self.pg_ctl is not None
        subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.dir / "data"), "-m",
                        "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
