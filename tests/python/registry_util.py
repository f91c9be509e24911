"""Shared helpers of the registry tests: tiny .aimass models and a throwaway PostgreSQL cluster."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def make_models(folder, n=3, seed=0):
    """`n` distinct tiny MLP .aimass files (exported from torch) in `folder`."""
    import torch
    from torch import nn

    import aimass.runtime as rt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        torch.manual_seed(seed + i)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        p = folder / f"mlp{i}.aimass"
        rt.export(net, (torch.randn(2, 8),), p, input_names=["x"])
        paths.append(p)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin():
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    init = shutil.which("initdb")
    return os.path.dirname(init) if init and shutil.which("pg_ctl") else None


class PgCluster:
    """initdb + pg_ctl in a temp folder, on 127.0.0.1 and a free port, trust auth; stop() removes it.
    As root it runs as the 'postgres' user (PostgreSQL refuses to run as root)."""

    def __init__(self):
        self.bin = _pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (initdb/pg_ctl not found; "
                               "tests/run_all.sh installs Debian's postgresql)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise RuntimeError("psycopg is not installed (pip install 'psycopg[binary]')") from None
        self.dir = Path(tempfile.mkdtemp(prefix="aimass-pg-"))
        self.user = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as") from None
            self.user = "postgres"
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.port = _free_port()
        self.data = self.dir / "data"
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w", "-t", "60", "start")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool, *args):
        cmd = [os.path.join(self.bin, tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if r.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr.strip()} {log[-500:]}")

    def new_database(self, name):
        """A fresh database; returns its URL."""
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self):
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        except Exception:
            pass
        for _ in range(20):
            try:
                shutil.rmtree(self.dir)
                return
            except OSError:
                time.sleep(0.1)
