"""start_timeline / stop_timeline (Horovod's names); the recorder is aimass.dist._timeline."""
from __future__ import annotations

import os

from . import _core, _timeline


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Record a Chrome-trace timeline of this rank's collectives into `file_path` (written atomically by
    stop_timeline() or shutdown()). With several ranks each writes `<file_path stem>.rank<N><ext>`.
    mark_cycles adds the engine's cycle and fusion counters as counter tracks.
    HOROVOD_TIMELINE / AIMASS_TIMELINE=<path> starts it at init()."""
    c = _core._world()
    path = os.fspath(file_path)
    if c.size > 1:
        stem, ext = os.path.splitext(path)
        path = f"{stem}.rank{c.rank}{ext or '.json'}"
    _timeline.start(path, c.rank, mark_cycles)


def stop_timeline() -> None:
    """Stop recording and write the file."""
    _timeline.stop()
