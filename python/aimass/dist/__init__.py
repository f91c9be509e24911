"""Data-parallel communication over MPI with Horovod's PyTorch API.

``import aimass.dist as hvd`` runs scripts written for ``import horovod.torch as hvd``
(see docs/horovod.md for the name-by-name table). Collectives take numpy arrays or
torch tensors (float16, bfloat16, float32, float64, int8, uint8, int16, int32, int64,
bool) without copying them; CUDA tensors take the NCCL path.

Every collective is matched across ranks by name (generated from a per-rank call
counter when not given, so ranks must then call collectives in the same order);
submissions of different names may come in any order on different ranks. Ready
allreduces are fused (up to ``AIMASS_FUSION_THRESHOLD`` bytes, default 64 MiB, per
pass) and reduced together.

Inside a node, allreduces of at least ``AIMASS_SHM_MIN_BYTES`` (default 4 KiB) go
through a small POSIX shared-memory segment in chunks of ``AIMASS_SHM_CHUNK_BYTES``
(default 512 KiB); with several nodes each reduced slice is allreduced across nodes over
MPI. ``AIMASS_SHM=0`` uses MPI_Allreduce only; ``AIMASS_RANKS_PER_NODE=k`` makes groups
of k ranks act as separate nodes.

A name submitted with different shape/dtype/op on different ranks, or one that some
ranks do not submit within ``timeout`` seconds (default 60, env ``AIMASS_COMM_TIMEOUT``),
raises :class:`aimass.DistributedError` (alias ``HorovodInternalError``) on the ranks
that submitted it, listing what each rank submitted.

``empty(shape, dtype)`` / ``zeros(...)`` allocate arrays (numpy, or torch for a torch dtype) in memory the
node's other ranks map, where the engine reduces there (``engine.shared_buffers``: one node; across nodes
private memory moves faster): in-place allreduces of them skip the kernel copies; ``is_shared(x)`` says
whether an array got it (else it is ordinary memory).

Integer ``average`` divides the integer sum by the world size, truncating toward zero.
Bool tensors: Sum and Max are logical or, Min and Product logical and.
"""
from ._core import (  # noqa: F401
    DistributedError, Handle, HorovodInternalError, ProcessSet, add_process_set, ccl_built, cross_rank,
    cross_size, cuda_built, ddl_built, default_timeout, global_process_set, gloo_built, gloo_enabled, init,
    is_homogeneous, is_initialized, local_rank, local_size, mpi_built, mpi_enabled, mpi_threads_supported,
    nccl_built, poll, rank, remove_process_set, rocm_built, set_cycle_time, set_fusion_threshold,
    set_ll_max_bytes, set_shm_min_bytes, shm_available, shutdown, size, stats, synchronize,
)
from ._core import _require, _require_engine  # noqa: F401  (aimass.bench reads engine settings)
from ._ops import (  # noqa: F401
    Adasum, Average, BF16Compressor, Compression, Compressor, FP16Compressor, Max, Min, NoneCompressor, Product,
    ReduceOp, Sum,
)
from .collectives import (  # noqa: F401
    GroupHandle, allgather, allgather_async, allreduce, allreduce_, allreduce_async, allreduce_async_, barrier, broadcast, broadcast_, broadcast_async, broadcast_async_, grouped_allgather,
    grouped_allgather_async, grouped_allreduce, grouped_allreduce_, grouped_allreduce_async,
    grouped_allreduce_async_, grouped_reducescatter, grouped_reducescatter_async, join, reduce_scatter,
    reduce_scatter_async, reducescatter, reducescatter_async, sparse_allreduce_async,
)
from .elastic import HostsUpdatedInterrupt  # noqa: F401
from ._alltoall import alltoall, alltoall_async  # noqa: F401
from ._memory import empty, is_shared, zeros  # noqa: F401
from .timeline import start_timeline, stop_timeline  # noqa: F401
from . import elastic  # noqa: F401


def __getattr__(name):
    # torch-dependent parts load on first use, so `import aimass.dist` works without torch
    if name == "DistributedOptimizer":
        from .optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name in ("broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object"):
        from . import functions
        return getattr(functions, name)
    if name == "GradientBuckets":
        from .buckets import GradientBuckets
        return GradientBuckets
    if name == "SyncBatchNorm":
        from .sync_batch_norm import SyncBatchNorm
        return SyncBatchNorm
    raise AttributeError(f"module 'aimass.dist' has no attribute {name!r}")
