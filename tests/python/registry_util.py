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

import pytest


def as_json(obj):
    """`obj` as it reads back from JSON (tuples become lists)."""
    import json
    return json.loads(json.dumps(obj))


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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three distinct tiny .aimass models (import this fixture into a test module)."""
    return make_models(tmp_path_factory.mktemp("models"), 3)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """AIMASS_HOME in the test's temp folder, no registry variables from the environment."""
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    for var in ("AIMASS_REGISTRY", "AIMASS_REGISTRY_BLOBS", "AIMASS_REGISTRY_FAULT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


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


def exercise_api(reg, models):
    """The registry's whole API on any backend: push, labels, promote, rollback, fetch, delete, gc,
    generation, and pushes from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    import aimass
    from aimass.registry import ConflictError, NotFoundError

    g0 = reg.generation()
    assert reg.list() == []
    assert reg.push(models[0], "mnist", label="stable", metrics={"accuracy": 0.9}) == 1
    g1 = reg.generation()
    assert g1 > g0
    assert reg.push(models[1], "mnist", label="canary", parent=1) == 2
    assert reg.resolve("mnist").version == 1  # stable wins over newest
    assert reg.resolve("mnist", label="canary").version == 2
    assert reg.show("mnist", version=2).parent == 1
    g2 = reg.generation()
    assert reg.promote("mnist") == 2
    assert reg.generation() > g2
    assert reg.show("mnist").labels == ["canary", "stable"]
    assert reg.push(models[2], "mnist", label="stable") == 3
    assert reg.rollback("mnist") == 2
    assert reg.rollback("mnist") == 1
    hist = reg.label_history("mnist", "stable")
    assert [(h["action"], h["version"]) for h in hist] == [("set", 1), ("set", 2), ("set", 3), ("rollback", 2),
                                                           ("rollback", 1)]
    listing = reg.list()
    assert listing[0]["name"] == "mnist" and listing[0]["versions"] == [1, 2, 3]
    assert listing[0]["labels"] == {"canary": 2, "stable": 1} and listing[0]["latest"] == 3
    for v, p in zip((1, 2, 3), models):
        local = reg.fetch("mnist", v)
        assert open(local, "rb").read() == open(p, "rb").read()
        assert as_json(aimass.runtime.load(local).signature) == reg.show("mnist", version=v).signature
    try:
        reg.delete("mnist", 2)
        raise AssertionError("deleting a labelled version must fail")
    except ConflictError:
        pass
    assert reg.delete("mnist", 3).version == 3
    gc = reg.gc(grace_s=0)
    assert len(gc["removed_blobs"]) == 1
    try:
        reg.fetch("mnist", 3)
        raise AssertionError("fetching a deleted version must fail")
    except NotFoundError:
        pass
    assert reg.check(deep=True) == []
    # pushes from threads sharing one Registry get distinct versions
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: reg.push(models[i % len(models)], "threads"), range(8)))
    assert sorted(got) == list(range(1, 9))
    assert [v.version for v in reg.versions("threads")] == list(range(1, 9))
    assert reg.push(models[0], "mnist") == 4  # 3 is never reused


FAULT_POINTS = ("copy", "staged", "upload", "rename", "blob", "txn", "committed")


def _child_push(env, store, blobs, path, name, label, go, out):
    import os as _os
    _os.environ.update(env)
    from aimass.registry import Registry
    reg = Registry(store, blobs=blobs)
    if go is not None:
        go.wait(30)
    got = []
    for p in path if isinstance(path, list) else [path]:
        got.append(reg.push(p, name, label=label))
    if out is not None:
        out.put(got)


def mp_context():
    """Processes forked from a clean server process that has aimass.registry imported: cheap to
    start, and never forked from the test process (whose thread pools a fork could catch mid-lock)."""
    import multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["aimass.registry", "aimass.runtime", "registry_util"])
    return ctx


def fork_push(store, blobs, path, name, label=None, fault_point=None, go=None, out=None):
    """A process that pushes `path` (or a list of paths), SIGKILLing itself at `fault_point`."""
    env = {"AIMASS_HOME": os.environ["AIMASS_HOME"], "AIMASS_REGISTRY_FAULT": fault_point or ""}
    p = mp_context().Process(target=_child_push, args=(env, store, blobs, path, name, label, go, out))
    p.start()
    return p


def assert_consistent(reg, name):
    """Every visible version is whole: its blob is there and matches its sha256, labels point at
    versions, numbers are distinct and growing. Returns the visible versions."""
    assert reg.check(deep=True) == []
    vs = [v.version for v in reg.versions(name)] if any(m["name"] == name for m in reg.list()) else []
    assert vs == sorted(set(vs))
    return vs


def crash_trials(store, blobs, models, trials=20, seed=17):
    """SIGKILL pushes at fault points and at random moments; after each the store is consistent and
    usable, and gc(grace 0) removes what the killed pushes left, leaving exactly the referenced
    blobs and no temp files. Returns how many random kills landed before/after the commit."""
    import os as _os
    import random
    import signal
    import time as _time

    from aimass.registry import Registry

    rng = random.Random(seed)
    points = list(FAULT_POINTS)
    rng.shuffle(points)
    remote = bool(blobs) and "://" in blobs
    # how long a whole push in a new process takes here: random kills land anywhere in it (or just after)
    t0 = _time.monotonic()
    p = fork_push(store, blobs, models[0], "m")
    p.join(60)
    assert p.exitcode == 0
    span = _time.monotonic() - t0
    kills = {"before": 0, "after": 0}
    removed_temp = 0
    with Registry(store, blobs=blobs) as reg:  # the checker; the pushes run in other processes
        for t in range(trials):
            point = points[t] if t < len(points) else (rng.choice(points) if t % 2 else None)
            before = assert_consistent(reg, "m")
            label = rng.choice([None, "stable", "canary"])
            p = fork_push(store, blobs, models[t % len(models)], "m", label=label, fault_point=point)
            if point is None:  # a random moment in a push's life
                _time.sleep(rng.uniform(0.0, 1.1 * span))
                try:
                    _os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.join(60)
            assert p.exitcode is not None, "a push hung"
            if point is not None and (point != "upload" or remote):
                assert p.exitcode == -signal.SIGKILL, f"trial {t}: the push was not killed at {point!r} ({p.exitcode})"
            after = assert_consistent(reg, "m")
            if point is None:
                kills["after" if len(after) > len(before) else "before"] += 1
            elif p.exitcode == -signal.SIGKILL:
                if point == "committed":
                    assert len(after) == len(before) + 1
                else:
                    assert after == before, f"trial {t}: a push killed at {point!r} left a visible version"
            new = reg.push(models[0], "m")  # the store is not left locked
            assert new > max(after, default=0)
            if t % 5 == 4 or t == trials - 1:
                removed_temp += len(reg.gc(grace_s=0)["removed_temp"])
        assert removed_temp > 0  # kills at 'copy' and 'staged' leave temp files; gc removed them
        assert_consistent(reg, "m")
        referenced = {v.sha256 for v in reg.versions("m")}
        assert {sha for sha, _, _ in reg._blobs.list_blobs()} == referenced
        assert list(reg._blobs.list_temp()) == []
    return kills


def two_processes_push(store, blobs, models, n=5):
    """Two processes released together push `n` versions each: all distinct, none lost."""
    from aimass.registry import Registry

    ctx = mp_context()
    go, out = ctx.Event(), ctx.Queue()
    procs = [fork_push(store, blobs, [models[i % len(models)] for i in range(n)], "m", go=go, out=out)
             for _ in range(2)]
    go.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(a < b for g in got for a, b in zip(g, g[1:]))  # each process sees its versions grow
    assert sorted(got[0] + got[1]) == list(range(1, 2 * n + 1))  # distinct, none lost
    with Registry(store, blobs=blobs) as reg:
        assert assert_consistent(reg, "m") == list(range(1, 2 * n + 1))
