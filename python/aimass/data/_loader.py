"""The native multi-threaded loader: seeded global shuffle, per-rank sharding,
resumable state, fused transforms, batches as zero-copy views."""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections import deque
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import numpy as np

from .. import _C
from ._format import Dataset
from ._transforms import _Transform


_I64_MAX = 2**63 - 1


def _check_range(name: str, v, lo: int, hi: int) -> None:
    if not lo <= v <= hi:
        raise ValueError(f"Loader: {name} must be in [{lo}, {hi}], got {v}")


def _dataset_fingerprint(ds: Dataset) -> str:
    """sha256 of what fixes a loader's samples: the index's schema and shards (names,
    record counts, content hashes) and, for a subset, its record numbers."""
    idx = ds._index
    h = hashlib.sha256(json.dumps({"schema": idx["schema"],
                                   "shards": [[s.get("file"), s.get("records"), s.get("sha256")]
                                              for s in idx["shards"]]},
                                  sort_keys=True).encode())
    if ds.indices is not None:
        h.update(ds.indices.tobytes())
    return h.hexdigest()[:32]


def _default_rank_world():
    dist = sys.modules.get("aimass.dist")
    if dist is not None and dist.is_initialized():
        return dist.rank(), dist.size()
    return 0, 1


def _pinned_allocator():
    """((alloc, free) addresses of aimass._cuda's cudaHostAlloc-backed allocator, "") when
    pinned memory can be had here, else (None, why not)."""
    from .. import cuda
    m = cuda._module()
    if m is None:
        return None, "aimass was built without CUDA (nvcc was not found at build time)"
    if m.device_count() == 0:
        return None, f"no CUDA device is available ({m.last_error()})"
    return tuple(m.data_pinned_allocator()), ""


_pin_warned = False


def _warn_unpinned(why: str) -> None:
    # like torch.utils.data.DataLoader: say it once, then carry on with pageable memory
    global _pin_warned
    if not _pin_warned:
        _pin_warned = True
        warnings.warn(f"Loader: pin_memory=True but {why}; batches use ordinary (pageable) host memory",
                      UserWarning, stacklevel=3)


def _cupy_or_raise():
    missing = []
    try:
        import cupy
    except ImportError:
        cupy = None
        missing.append("cupy is not installed (pip install cupy-cuda12x, matching your CUDA major version)")
    from .. import cuda
    gpus = 0
    if cupy is not None:
        try:
            gpus = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:  # cupy raises its CUDARuntimeError without a driver
            reason = str(exc)
        else:
            reason = "the CUDA runtime reports 0 devices"
    else:
        gpus = cuda.device_count()
        reason = (cuda._module().last_error() if cuda.built()
                  else "aimass was built without CUDA and cupy is missing, so no device could be queried")
    if gpus == 0:
        missing.append(f"no CUDA GPU is available ({reason})")
    if missing:
        raise RuntimeError("Loader(output='cupy') needs cupy and a CUDA GPU: " + "; ".join(missing)
                           + ". Use output='numpy' or 'torch' on this machine.")
    return cupy


class Loader:
    """Batches of a Dataset, read and transformed by C++ worker threads.

    Order: one global permutation per epoch, a pure function of (seed, epoch),
    identical on every rank. Rank r takes positions r, r + W, r + 2W, ... of it.
    Every rank gets the same number of batches: with ``drop_last=False`` the
    permutation is padded by wrapping around to ceil(N / W) samples per rank (so a
    few samples appear twice when W does not divide N) and the last batch may be
    short; with ``drop_last=True`` each rank takes floor(N / W) samples and only
    full batches. Iterating runs the current epoch from the loader's position and
    then advances the epoch; ``set_epoch(e)`` restarts at epoch e's first batch;
    ``state_dict()``/``load_state_dict()`` resume exactly mid-epoch.

    ``verify``: True checks each record's CRC32C on every read; "once" checks each
    record the first time this loader reads it (shards are immutable once written,
    so later epochs skip the CRC pass); False never checks.

    Batches are dicts of numpy arrays (``output="torch"``: torch tensors) that are
    zero-copy views of pool buffers; a buffer goes back to the pool when its
    arrays are released, so memory stays flat across epochs (keep a copy if you
    hold batches for long: held buffers are not reused, new ones are allocated).

    ``pin_memory=True`` allocates the batch buffers as page-locked (pinned) host
    memory (cudaHostAlloc through aimass's CUDA module), so
    ``batch["x"].to("cuda", non_blocking=True)`` copies asynchronously. Without a
    CUDA device or without aimass's CUDA build it warns once and carries on with
    ordinary memory, as torch's DataLoader does.

    ``output="cupy"`` returns cupy arrays on the current device: each field is
    copied from the (pinned) batch buffer on the loader's own CUDA stream, and the
    current stream is made to wait for that copy, so kernels you launch on it see
    the data without a host synchronisation. bfloat16 fields come as uint16 bit
    patterns (cupy has no bfloat16). Needs cupy and a GPU; otherwise the
    constructor raises RuntimeError naming what is missing.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 num_threads: Optional[int] = None, prefetch: Optional[int] = None,
                 transforms: Optional[Sequence[_Transform]] = None, output: str = "numpy",
                 pin_memory: bool = False, verify=True):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"Loader: dataset must be an aimass.data.Dataset (aimass.data.open(dir)), "
                            f"got {type(dataset).__name__}")
        if prefetch is None:  # the machine's tuning profile, else 2 batches ahead
            from .. import _tuning
            prefetch = _tuning.default("loader_prefetch", 2)
        for nm, v in (("batch_size", batch_size), ("prefetch", prefetch), ("seed", seed)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"Loader: {nm} must be an int, got {v!r}")
        # a batch_size beyond the samples gives one batch of them all (the engine caps its buffers)
        _check_range("batch_size", batch_size, 1, _I64_MAX)
        _check_range("prefetch", prefetch, 1, 1024)
        _check_range("seed", seed, 0, 2**64 - 1)
        if output not in ("numpy", "torch", "cupy"):
            raise ValueError(f"Loader: output must be 'numpy', 'torch' or 'cupy', got {output!r}")
        if not isinstance(pin_memory, bool):
            raise TypeError(f"Loader: pin_memory must be True or False, got {pin_memory!r}")
        cupy = _cupy_or_raise() if output == "cupy" else None
        if (rank is None) != (world_size is None):
            raise ValueError("Loader: give both rank and world_size, or neither (then aimass.dist decides)")
        if rank is None:
            rank, world_size = _default_rank_world()
        from .. import _tuning
        if num_threads is None:  # the machine's tuning profile, else up to 4 engine threads
            from .. import num_threads as _nt
            num_threads = _tuning.default("loader_threads", max(1, min(4, _nt())))
        for nm, v in (("rank", rank), ("world_size", world_size), ("num_threads", num_threads)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"Loader: {nm} must be an int, got {v!r}")
        _check_range("world_size", world_size, 1, 2**31 - 1)
        _check_range("rank", rank, 0, world_size - 1)
        _check_range("num_threads", num_threads, 1, 256)
        transforms = list(transforms or [])
        for t in transforms:
            if not isinstance(t, _Transform):
                raise TypeError(f"Loader: transforms must be aimass.data transforms (Cast, Normalize, ...), "
                                f"got {type(t).__name__}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.output = output
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)
        if verify not in (True, False, "once"):
            raise ValueError(f"Loader: verify must be True, False or 'once', got {verify!r}")
        verify_mode = 2 if verify == "once" else int(bool(verify))
        indices = dataset.indices if dataset.indices is not None else np.empty(0, dtype=np.int64)
        if dataset.indices is not None and dataset.indices.size == 0:
            raise ValueError("Loader: the dataset is empty")
        host_alloc = host_free = 0
        self.pin_memory = False
        if pin_memory or cupy is not None:  # cupy output stages through pinned buffers when it can
            allocator, why = _pinned_allocator()
            if allocator is not None:
                host_alloc, host_free = allocator
                self.pin_memory = True
            elif pin_memory:
                _warn_unpinned(why)
        self._core = _C.DataLoader(dataset._reader, indices, self.batch_size, self.shuffle, self.seed,
                                   self.rank, self.world_size, self.drop_last, int(num_threads), int(prefetch),
                                   verify_mode, [t.spec() for t in transforms], host_alloc, host_free)
        self._outputs = self._core.outputs()
        self._names = [o[0] for o in self._outputs]
        self._bf16 = [o[1] == "bfloat16" for o in self._outputs]
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._dataset_fp = None  # computed on the first state_dict()
        self._transforms = transforms  # keeps user C functions alive while workers call them
        self._torch = None
        if output == "torch":
            import torch
            self._torch = torch
        self._cupy = cupy
        if cupy is not None:
            self._stream = cupy.cuda.Stream(non_blocking=True)
            self._inflight = deque()  # (copy-done event, host arrays kept out of the pool until then)

    def __len__(self) -> int:
        return self._core.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its first batch on the next iteration."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self._epoch, self._batch = int(epoch), 0

    def _fingerprint(self) -> dict:
        if self._dataset_fp is None:
            self._dataset_fp = _dataset_fingerprint(self.dataset)
        return {"dataset": self._dataset_fp, "num_samples": self._core.num_samples, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        """Where this loader is: {epoch, batch (handed out this epoch), and its configuration,
        including a fingerprint of the dataset (its index and the records this loader draws from)}."""
        return {"epoch": self._epoch, "batch": self._batch, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state`: the next batches are exactly those an uninterrupted run would give."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: state must be a dict from Loader.state_dict(), "
                            f"got {type(state).__name__}")
        fp = self._fingerprint()
        for k in ("epoch", "batch", *fp):
            if k not in state:
                raise ValueError(f"load_state_dict: state lacks {k!r}; pass a dict from Loader.state_dict() "
                                 f"(it has {sorted(fp) + ['batch', 'epoch']})")
        for k, v in fp.items():
            if state[k] != v:
                what = ("comes from another dataset (its index, shards or subset differ from this loader's)"
                        if k == "dataset" else f"has {k}={state[k]!r} but this loader has {k}={v!r}")
                raise ValueError(f"load_state_dict: the state {what}; resume needs the same dataset, batch size, "
                                 "seed and world")
        epoch, batch = state["epoch"], state["batch"]
        for k, v in (("epoch", epoch), ("batch", batch)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"load_state_dict: state[{k!r}] must be an int, got {v!r}")
        epoch, batch = int(epoch), int(batch)
        if not 0 <= epoch < 2**63 or not 0 <= batch <= len(self):
            raise ValueError(f"load_state_dict: epoch {epoch} / batch {batch} out of range "
                             f"(epoch >= 0, batch in [0, {len(self)}])")
        self._epoch, self._batch = epoch, batch

    @property
    def buffers_allocated(self) -> int:
        """Batch buffers allocated so far; it stops growing once the pool covers the
        prefetch window and the batches you hold (buffers are reused across epochs)."""
        return self._core.buffers_allocated

    def _to_cupy(self, arrays) -> Dict[str, Any]:
        cp, stream = self._cupy, self._stream
        out = {}
        with stream:  # allocate and copy on the loader's stream
            for nm, a in zip(self._names, arrays):
                d = cp.empty(a.shape, dtype=a.dtype)
                d.set(a, stream=stream)
                out[nm] = d
        done = stream.record()
        cp.cuda.get_current_stream().wait_event(done)  # the user's stream sees the copied data
        if self.pin_memory:
            # an async copy from pinned memory reads the buffer later: keep it from the pool until done
            inflight = self._inflight
            inflight.append((done, arrays))
            while inflight and inflight[0][0].done:
                inflight.popleft()
        return out

    def _wrap(self, arrays) -> Dict[str, Any]:
        if self._cupy is not None:
            return self._to_cupy(arrays)
        t = self._torch
        if t is None:
            return dict(zip(self._names, arrays))
        out = {}
        for nm, a, bf in zip(self._names, arrays, self._bf16):
            ten = t.from_dlpack(a)
            out[nm] = ten.view(t.bfloat16) if bf else ten
        return out

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        core = self._core
        core.start(self._epoch, self._batch)
        while True:
            arrays = core.next()
            if arrays is None:
                break
            self._batch += 1
            yield self._wrap(arrays)
        self._epoch += 1
        self._batch = 0

    def close(self) -> None:
        """Stop the worker threads now (also happens when the loader is garbage collected)."""
        self._core.stop()

