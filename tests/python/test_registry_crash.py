"""Registry under concurrency and crashes: two processes pushing at once get distinct versions; a
push SIGKILLed at any point (fault points and random moments, 20 seeded trials) leaves no visible
half version, no lock, and nothing gc cannot clean."""
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sqlalchemy")
from registry_util import crash_trials, home, models, two_processes_push  # noqa: E402,F401

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and SIGKILL")]


@pytest.mark.parametrize("blobs", ["local", "file"])
def test_two_processes_pushing_at_once_get_distinct_versions(tmp_path, models, blobs):
    two_processes_push(str(tmp_path / "store"), f"file://{tmp_path}/blobs" if blobs == "file" else None, models)


def test_push_killed_at_any_point_leaves_the_store_consistent(tmp_path, models):
    kills = crash_trials(str(tmp_path / "store"), None, models, trials=20, seed=17)
    print("random kills, before/after the commit:", kills)


def test_push_killed_with_fsspec_blobs(tmp_path, models):
    crash_trials(f"sqlite:///{tmp_path}/meta/reg.db", f"file://{tmp_path}/blobs", models, trials=10, seed=18)
