"""Registry past one machine: metadata in a real PostgreSQL (started here from Debian's packages),
blobs through fsspec (memory://, file://); the same API, concurrency and crash guarantees."""
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sqlalchemy")
fsspec = pytest.importorskip("fsspec")
from aimass.registry import IntegrityError, InvalidArgumentError, Registry  # noqa: E402
from registry_util import PgCluster, crash_trials, exercise_api, home, models, two_processes_push  # noqa: E402,F401

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pg():
    try:
        cluster = PgCluster()
    except (RuntimeError, OSError, FileNotFoundError) as exc:
        pytest.skip(f"PostgreSQL could not be started here: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg, request):
    return pg.new_database("t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:50])


def test_memory_blobs_whole_api(tmp_path, models):
    with Registry(f"sqlite:///{tmp_path}/reg.db", blobs="memory://aimass-test-api") as reg:
        exercise_api(reg, models)
        assert reg.show("mnist").path.startswith("memory://aimass-test-api/blobs/sha256/")


def test_memory_blob_tampering_is_detected_and_cache_is_reverified(tmp_path, models, home):
    with Registry(f"sqlite:///{tmp_path}/reg.db", blobs="memory://aimass-test-tamper") as reg:
        reg.push(models[0], "m")
        sha = reg.show("m").sha256
        cached = reg.fetch("m", 1)
        assert cached.startswith(str(home / "cache"))
        os.chmod(cached, 0o644)
        with open(cached, "r+b") as f:  # a corrupted cache entry is re-downloaded, not trusted
            f.write(b"junk")
        assert open(reg.fetch("m", 1), "rb").read() == open(models[0], "rb").read()
        fs = fsspec.filesystem("memory")
        key = f"/aimass-test-tamper/blobs/sha256/{sha}"
        data = bytearray(fs.cat_file(key))
        data[100] ^= 0xFF
        fs.pipe_file(key, bytes(data))
        os.unlink(cached)
        with pytest.raises(IntegrityError, match="corrupt"):
            reg.fetch("m", 1)
        fs.rm_file(key)
        with pytest.raises(IntegrityError, match="missing"):
            reg.fetch("m", 1)
        assert any("missing" in p for p in reg.check())


def test_file_url_blobs_and_gc(tmp_path, models):
    with Registry(f"sqlite:///{tmp_path}/meta/reg.db", blobs=f"file://{tmp_path}/blobs") as reg:
        reg.push(models[0], "m")
        reg.push(models[1], "m")
        assert reg.show("m", version=1).path == f"file://{tmp_path}/blobs/blobs/sha256/{reg.show('m', version=1).sha256}"
        assert len(list((tmp_path / "blobs" / "blobs" / "sha256").iterdir())) == 2
        (tmp_path / "blobs" / "tmp" / "push-1-dead.part").write_bytes(b"left by a killed push")
        reg.delete("m", 2)
        r = reg.gc(grace_s=0)
        assert len(r["removed_blobs"]) == 1 and len(r["removed_temp"]) == 1
        assert reg.check(deep=True) == []


def test_bad_blob_locations(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot open"):
        Registry(f"sqlite:///{tmp_path}/reg.db", blobs="nosuchscheme://x/y")


def test_postgres_whole_api(pg_url, models, tmp_path):
    with Registry(pg_url, blobs=f"file://{tmp_path}/blobs") as reg:
        assert reg.store.startswith("postgresql+psycopg://")
        exercise_api(reg, models)


def test_postgres_needs_a_blob_location(pg_url):
    with pytest.raises(InvalidArgumentError, match="needs a blob location"):
        Registry(pg_url)


def test_postgres_schema_is_shared_and_versioned(pg_url, tmp_path, models):
    import sqlalchemy as sa
    with Registry(pg_url, blobs=f"file://{tmp_path}/blobs") as a, Registry(pg_url, blobs=f"file://{tmp_path}/blobs") as b:
        a.push(models[0], "m", label="stable")
        assert b.show("m").labels == ["stable"]  # a second client (replica) sees it
        g = b.generation()
        a.set_label("m", "canary", 1)
        assert b.generation() > g
    eng = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT version FROM aimass_schema")).scalar() == 1
        tables = set(sa.inspect(c).get_table_names())
    eng.dispose()
    assert {"aimass_models", "aimass_versions", "aimass_labels", "aimass_label_history"} <= tables


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and SIGKILL")
def test_postgres_two_processes_pushing_at_once(pg_url, tmp_path, models):
    two_processes_push(pg_url, f"file://{tmp_path}/blobs", models)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and SIGKILL")
def test_postgres_push_killed_at_any_point(pg_url, tmp_path, models):
    crash_trials(pg_url, f"file://{tmp_path}/blobs", models, trials=10, seed=19)
