"""The parts the peer-failure worker scripts share (comm_peer_failure_worker.py, comm_hier_failure_worker.py;
mpirun runs them from this folder): the victim's timed signal, the survivors' loop until an error, and the
record written at the end. Not a test file."""
import json
import os
import signal
import threading
import time


def arm_victim(path, note, t):
    """After t["delay"] s: write `note` with the moment (t_signal) to path, then send this process t["signal"]."""
    def fail():
        with open(path, "w") as f:
            json.dump(dict(note, t_signal=time.monotonic()), f)
        os.kill(os.getpid(), getattr(signal, t["signal"]))
    threading.Timer(t["delay"], fail).start()


def run_until_error(step, record, aimass, first=3, limit_s=60):
    """step(first), step(first + 1), ... until one raises, for at most limit_s: the error's moment, type and
    message go into record (or "none within 60 s")."""
    i = first
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            step(i)
            i += 1
        record["error"] = f"none within {limit_s} s"
    except Exception as e:  # noqa: BLE001 - the type is what the test checks
        record.update(t_error=time.monotonic(), error=type(e).__name__, message=str(e)[:300],
                      is_distributed=isinstance(e, aimass.DistributedError), steps=i)


def shut_down_and_write(dist, path, record):
    """Times dist.shutdown() into record and writes it to path (atomically: the test polls for the file)."""
    t0 = time.monotonic()
    dist.shutdown()
    record["shutdown_s"] = time.monotonic() - t0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
