"""Training checkpoints: one torch.save file per checkpoint plus a ``latest.json``
manifest naming it with its sha256. Both are written atomically (temporary name in
the same folder, fsync, rename), by rank 0 only, into a folder every rank can read
(on several nodes: a shared file system), so no rank depends on another's local
temporary paths."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
from typing import Any, Dict, List, Optional

import numpy as np

from .._io import atomic_path, atomic_write_text, sha256_file

MANIFEST = "latest.json"


def rng_state() -> dict:
    """This process's random states: python, numpy's global generator and torch's CPU generator."""
    import torch
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def gather_objects(obj: Any, world: int) -> List[Any]:
    """Every rank's `obj` (pickled), on every rank, in rank order; [obj] in one process."""
    if world == 1:
        return [obj]
    from .. import dist
    blob = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
    n = int(dist.allreduce(np.array([blob.size], dtype=np.int64), op="max", name="ckpt.objlen")[0])
    words = np.zeros((n + 7) // 8 + 1, dtype=np.int64)
    words[0] = blob.size
    words[1:].view(np.uint8)[:blob.size] = blob
    everyone = dist.allgather(words.reshape(1, -1), name="ckpt.objs")
    out = []
    for row in np.asarray(everyone).reshape(world, -1):
        size = int(row[0])
        out.append(pickle.loads(row[1:].view(np.uint8)[:size].tobytes()))
    return out


def save(checkpoint_dir: str, state: Dict[str, Any], step: int, keep: int = 2) -> str:
    """Write `state` as ckpt-<step>.pt and point latest.json at it (call on rank 0 only).
    Older checkpoints beyond the newest `keep` are removed. Returns the checkpoint's path."""
    import torch
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = f"ckpt-{step:09d}.pt"
    path = os.path.join(checkpoint_dir, name)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    manifest = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "step": int(step),
                "epoch": int(state.get("epoch", 0)), "bytes": len(data)}
    atomic_write_text(os.path.join(checkpoint_dir, MANIFEST), json.dumps(manifest, indent=1))
    olds = sorted(f for f in os.listdir(checkpoint_dir) if f.startswith("ckpt-") and f.endswith(".pt"))
    for old in olds[:-keep] if keep > 0 else []:
        if old != name:
            try:
                os.unlink(os.path.join(checkpoint_dir, old))
            except FileNotFoundError:
                pass
    return path


def latest(checkpoint_dir: str) -> Optional[dict]:
    """The manifest of the newest checkpoint in `checkpoint_dir`, or None when there is none."""
    p = os.path.join(checkpoint_dir, MANIFEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            from aimass import CorruptDataError
            raise CorruptDataError(f"{p} is not valid JSON ({exc}); remove it to start afresh") from None


def load(checkpoint_dir_or_file: str) -> Dict[str, Any]:
    """Load a checkpoint (a folder's latest, or one .pt file), checking its sha256 against the
    manifest: a mismatch raises aimass.CorruptDataError."""
    import torch
    from aimass import CorruptDataError
    p = os.fspath(checkpoint_dir_or_file)
    if os.path.isdir(p):
        man = latest(p)
        if man is None:
            raise FileNotFoundError(f"{p} holds no checkpoint ({MANIFEST} is missing)")
        path = os.path.join(p, man["file"])
        if not os.path.isfile(path):
            raise CorruptDataError(f"{p}/{MANIFEST} names {man['file']}, which is missing")
        got = sha256_file(path)
        if got != man["sha256"]:
            raise CorruptDataError(f"checkpoint {path}: sha256 {got} does not match the manifest's "
                                   f"{man['sha256']}; the file is damaged")
    elif os.path.isfile(p):
        path = p
    else:
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    with open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=False)


def broadcast_object(obj: Any, world: int, root: int = 0) -> Any:
    """root's `obj` (pickled) on every rank; `obj` itself in one process."""
    if world == 1:
        return obj
    from .. import dist
    blob = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if dist.rank() == root else np.zeros(0, np.uint8)
    n = int(dist.broadcast(np.array([blob.size], dtype=np.int64), root=root, name="ckpt.bobjlen")[0])
    words = np.zeros((n + 7) // 8, dtype=np.int64)
    if dist.rank() == root:
        words.view(np.uint8)[:n] = blob
    words = np.asarray(dist.broadcast(words, root=root, name="ckpt.bobj"))
    return pickle.loads(words.view(np.uint8)[:n].tobytes())
