"""Horovod's elastic training (``hvd.elastic``) is not supported by aimass.dist.

Every name here exists so that the error comes at the first use, with what to do
instead: ``@hvd.elastic.run`` raises at decoration time, and ``TorchState``,
``ObjectState``, ``ElasticSampler`` raise when constructed. aimass jobs have a fixed
set of ranks for their whole life; a rank that dies makes the others raise
aimass.DistributedError (HorovodInternalError) after the timeout instead of hanging,
so the usual replacement is: checkpoint regularly (broadcast_object /
broadcast_optimizer_state to resume), and let the scheduler restart the job with
``mpirun`` at the new size. See docs/horovod.md.
"""
from __future__ import annotations

MESSAGE = ("aimass.dist does not support Horovod elastic training ({what}): the set of ranks is fixed for the "
           "life of a job. Checkpoint regularly and restart the job with mpirun at the new size (resume with "
           "broadcast_parameters / broadcast_optimizer_state / broadcast_object); see docs/horovod.md")


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's elastic interrupt; defined so that `except hvd.HostsUpdatedInterrupt` works. aimass never
    raises it (hosts do not change during an aimass job)."""


def _unsupported(what: str):
    raise NotImplementedError(MESSAGE.format(what=what))


def run(func=None, *args, **kwargs):
    """Horovod's ``@hvd.elastic.run`` decorator: raises NotImplementedError."""
    _unsupported("hvd.elastic.run")


class _Unsupported:
    _what = "hvd.elastic"

    def __init__(self, *args, **kwargs):
        _unsupported(self._what)


class State(_Unsupported):
    _what = "hvd.elastic.State"


class ObjectState(_Unsupported):
    _what = "hvd.elastic.ObjectState"


class TorchState(_Unsupported):
    _what = "hvd.elastic.TorchState"


class ElasticSampler(_Unsupported):
    _what = "hvd.elastic.ElasticSampler"
