"""Restarting the engine under other environment variables. The engine reads its AIMASS_* switches
when it starts (some again later, e.g. per call), so tests set them, restart, run, then restore the
environment exactly as it was (a variable that was unset is unset again) and restart once more so
that the next test sees the default engine."""
import contextlib
import os


def set_env(env):
    """Sets each name to its value; None unsets the name."""
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)


def restart(dist, **env):
    """Restarts the engine with `env` set for its start only; the environment is restored after."""
    saved = {k: os.environ.get(k) for k in env}
    set_env(env)
    try:
        dist.shutdown()
        dist.init()
    finally:
        set_env(saved)


@contextlib.contextmanager
def engine_env(dist, **env):
    """The engine restarted with `env` set (None: unset) for the with-block; after it (also on a
    failure or a skip) the environment as it was, and the engine restarted under it."""
    saved = {k: os.environ.get(k) for k in env}
    set_env(env)
    try:
        dist.shutdown()
        dist.init()
        yield dist
    finally:
        set_env(saved)
        dist.shutdown()
        dist.init()
