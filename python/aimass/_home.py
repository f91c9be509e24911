"""Where aimass keeps its state: the one place that reads AIMASS_HOME.

The registry, tuning profile (``tuning.json``), tuning studies and demo output live
under it. Default ``~/.aimass``."""
from __future__ import annotations

import os


def aimass_home() -> str:
    """The aimass home directory (``$AIMASS_HOME``, default ``~/.aimass``); not created here."""
    home = os.environ.get("AIMASS_HOME")
    if home is not None and not home.strip():
        raise ValueError("AIMASS_HOME is set but empty: unset it or point it at a directory")
    return os.path.abspath(os.path.expanduser(home or os.path.join("~", ".aimass")))
