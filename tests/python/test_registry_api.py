"""aimass.registry on the default backend (a folder: SQLite + local blobs): versions, labels, history,
rollback, delete, gc, sha256 verification, bad inputs."""
import json
import os
import sqlite3

import pytest

pytest.importorskip("torch")
pytest.importorskip("sqlalchemy")
import aimass  # noqa: E402
from aimass.registry import (ConflictError, IntegrityError, InvalidArgumentError, ModelVersion,  # noqa: E402
                             NotFoundError, Registry, RegistryError)
from registry_util import as_json, exercise_api, home, models  # noqa: E402,F401

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def reg(tmp_path, home):
    with Registry(tmp_path / "store") as r:
        yield r


def test_whole_api_on_a_folder_store(reg, models):
    exercise_api(reg, models)


def test_store_layout_wal_and_schema_table(reg, models, tmp_path):
    reg.push(models[0], "m")
    db = tmp_path / "store" / "registry.db"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT version FROM aimass_schema").fetchone()[0] == 1
    con.close()
    sha = reg.show("m").sha256
    assert (tmp_path / "store" / "blobs" / "sha256" / sha).is_file()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_default_store_is_under_aimass_home_and_env_overrides(home, models, tmp_path, monkeypatch):
    with Registry() as r:
        assert r.push(models[0], "m") == 1
    assert (home / "registry" / "registry.db").is_file()
    monkeypatch.setenv("AIMASS_REGISTRY", str(tmp_path / "elsewhere"))
    with Registry() as r:
        assert r.list() == []
        r.push(models[0], "m")
    assert (tmp_path / "elsewhere" / "registry.db").is_file()
    with Registry(f"sqlite:///{tmp_path / 'db' / 'reg.db'}") as r:  # a database URL: blobs beside it
        r.push(models[1], "m")
        assert r.show("m").path.startswith(str(tmp_path / "db" / "blobs"))


def test_version_numbers_only_grow_and_are_never_reused(reg, models):
    assert [reg.push(p, "m") for p in models] == [1, 2, 3]
    reg.delete("m", 3)
    reg.delete("m", 2)
    assert reg.push(models[0], "m") == 4
    assert [v.version for v in reg.versions("m")] == [1, 4]
    assert reg.push(models[0], "other") == 1  # per model


def test_rollback_walks_back_through_history_and_skips_deleted(reg, models):
    for p in models:
        reg.push(p, "m")
    reg.push(models[0], "m")  # v4
    reg.set_label("m", "stable", 1)
    reg.set_label("m", "stable", 2)
    reg.set_label("m", "stable", 3)
    reg.set_label("m", "stable", 4)
    assert reg.rollback("m") == 3
    reg.delete("m", 2)
    assert reg.rollback("m") == 1  # 2 was deleted
    with pytest.raises(ConflictError, match="no earlier version"):
        reg.rollback("m")
    assert reg.show("m").version == 1
    # a new set after rollbacks starts a new branch: rollback returns to where it was set from
    reg.set_label("m", "stable", 4)
    assert reg.rollback("m") == 1
    acts = [(e["action"], e["previous"], e["version"]) for e in reg.label_history("m", "stable")]
    assert acts == [("set", None, 1), ("set", 1, 2), ("set", 2, 3), ("set", 3, 4), ("rollback", 4, 3),
                    ("rollback", 3, 1), ("set", 1, 4), ("rollback", 4, 1)]
    # removing a label is history too; rollback restores it
    reg.remove_label("m", "stable")
    assert "stable" not in reg.list()[0]["labels"]
    assert reg.resolve("m").version == 4  # no stable label: the newest
    assert reg.rollback("m") == 1
    with pytest.raises(ConflictError, match="no earlier version"):
        reg.rollback("m", "canary")  # never set


def test_delete_refuses_a_labelled_version(reg, models):
    reg.push(models[0], "m", label="stable")
    reg.push(models[1], "m", label="canary")
    with pytest.raises(ConflictError, match=r"labelled \['stable'\]"):
        reg.delete("m", 1)
    reg.set_label("m", "canary", 1)
    with pytest.raises(ConflictError, match=r"\['canary', 'stable'\]"):
        reg.delete("m", 1)
    assert reg.delete("m", 2).version == 2
    with pytest.raises(NotFoundError, match="no version 2"):
        reg.show("m", version=2)
    assert [v.version for v in reg.versions("m")] == [1]


def test_fetch_detects_a_tampered_or_missing_blob(reg, models):
    reg.push(models[0], "m")
    path = reg.fetch("m", 1)
    assert aimass.runtime.load(path).signature["inputs"][0]["name"] == "x"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(IntegrityError, match="corrupt") as ei:
        reg.fetch("m", 1)
    assert isinstance(ei.value, aimass.CorruptDataError)
    assert any("sha256" in p for p in reg.check(deep=True))
    assert reg.check() == []  # shallow: the file is there
    os.unlink(path)
    with pytest.raises(IntegrityError, match="missing"):
        reg.fetch("m", 1)
    assert any("missing" in p for p in reg.check())


def test_same_content_shares_a_blob_and_gc_keeps_it_while_referenced(reg, models, tmp_path):
    reg.push(models[0], "a")
    reg.push(models[0], "b")
    blobs = tmp_path / "store" / "blobs" / "sha256"
    assert len(list(blobs.iterdir())) == 1
    reg.delete("a", 1)
    assert reg.gc(grace_s=0)["removed_blobs"] == []
    assert reg.fetch("b", 1)
    reg.delete("b", 1)
    dry = reg.gc(grace_s=0, dry_run=True)
    assert len(dry["removed_blobs"]) == 1 and len(list(blobs.iterdir())) == 1
    assert reg.gc()["removed_blobs"] == []  # default grace protects fresh files (pushes in flight)
    r = reg.gc(grace_s=0)
    assert len(r["removed_blobs"]) == 1 and r["bytes_freed"] > 0 and list(blobs.iterdir()) == []


def test_bad_inputs_are_typed_errors_and_store_nothing(reg, models, tmp_path):
    bad = tmp_path / "not_a_model.aimass"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidArgumentError, match="not a valid .aimass model"):
        reg.push(bad, "m")
    with pytest.raises(InvalidArgumentError, match="is not a file"):
        reg.push(tmp_path / "missing.aimass", "m")
    for name in ("", "a/b", "-x", "x" * 129, None, 3):
        with pytest.raises(InvalidArgumentError, match="model name"):
            reg.push(models[0], name)
    with pytest.raises(InvalidArgumentError, match="is a number"):
        reg.push(models[0], "m", label="3")
    with pytest.raises(InvalidArgumentError, match="finite"):
        reg.push(models[0], "m", metrics={"acc": float("nan")})
    with pytest.raises(InvalidArgumentError, match="must be a number"):
        reg.push(models[0], "m", metrics={"acc": [1, 2]})
    with pytest.raises(InvalidArgumentError, match="parent version 5"):
        reg.push(models[0], "m", parent=5)
    assert reg.list() == []  # nothing half-stored
    assert reg.gc(grace_s=0) == {"removed_blobs": [], "removed_temp": [], "bytes_freed": 0, "dry_run": False}
    with pytest.raises(NotFoundError, match="no model named"):
        reg.show("m")
    reg.push(models[0], "m")
    with pytest.raises(NotFoundError, match="no label 'canary'"):
        reg.promote("m")
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        reg.set_label("m", "stable", 0)
    with pytest.raises(NotFoundError, match="no version 7"):
        reg.set_label("m", "stable", 7)
    with pytest.raises(InvalidArgumentError, match="not both"):
        reg.resolve("m", version=1, label="stable")
    with pytest.raises(InvalidArgumentError, match="grace_s"):
        reg.gc(grace_s=-1)
    assert issubclass(NotFoundError, LookupError) and issubclass(ConflictError, ValueError)
    assert issubclass(IntegrityError, RegistryError)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        Registry(f)
    with pytest.raises(InvalidArgumentError, match="unsupported database"):
        Registry("mysql://u@h/db")
    with pytest.raises(InvalidArgumentError, match="in-memory"):
        Registry("sqlite://")


def test_a_store_from_a_newer_aimass_is_refused(reg, tmp_path):
    con = sqlite3.connect(tmp_path / "store" / "registry.db")
    con.execute("UPDATE aimass_schema SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(ConflictError, match="schema version 99"):
        Registry(tmp_path / "store")


def test_model_version_fields(reg, models):
    v = reg.push(models[1], "m", label="canary", metrics={"accuracy": 0.97, "latency_ms": 1.5}, source="run-42")
    mv = reg.show("m", label="canary")
    assert isinstance(mv, ModelVersion) and mv.version == v == 1
    d = mv.to_dict()
    assert set(d) == {"name", "version", "sha256", "size", "created", "source", "metrics", "parent",
                      "signature", "labels", "path"}
    assert d["metrics"] == {"accuracy": 0.97, "latency_ms": 1.5} and d["source"] == "run-42"
    assert d["signature"] == as_json(aimass.runtime.load(models[1]).signature)
    assert d["size"] == os.path.getsize(models[1]) and d["created"].endswith("Z")
    json.dumps(d)


def test_database_failures_are_registry_errors(tmp_path, home, models):
    bad = tmp_path / "junk"
    bad.mkdir()
    (bad / "registry.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="cannot be opened.*not a database"):
        Registry(bad)
    with Registry(tmp_path / "ok") as reg:
        reg.push(models[0], "m")
        (tmp_path / "ok" / "registry.db").chmod(0o644)
        reg._meta.engine.dispose()
        with open(tmp_path / "ok" / "registry.db", "r+b") as f:  # clobber the header under a live Registry
            f.write(b"\x00" * 100)
        with pytest.raises(RegistryError, match="failed"):
            reg.list()


def test_aimass_home_default(monkeypatch, tmp_path):
    from aimass._home import aimass_home
    monkeypatch.delenv("AIMASS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert aimass_home() == tmp_path / ".aimass"
    monkeypatch.setenv("AIMASS_HOME", "~/elsewhere")
    assert aimass_home() == tmp_path / "elsewhere"


def test_schema_migrations_run_once_in_order(reg, models, tmp_path, monkeypatch):
    import sqlalchemy as sa
    from aimass.registry import _meta
    reg.push(models[0], "m")
    ran = []

    def to_2(conn):
        ran.append(2)
        conn.execute(sa.text("ALTER TABLE aimass_versions ADD COLUMN note TEXT"))

    monkeypatch.setattr(_meta, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(_meta.MIGRATIONS, 1, to_2)
    with Registry(tmp_path / "store") as r2:
        assert r2.show("m").version == 1  # old rows read through the new schema
    with Registry(tmp_path / "store"):
        pass
    assert ran == [2]
    con = sqlite3.connect(tmp_path / "store" / "registry.db")
    assert con.execute("SELECT version FROM aimass_schema").fetchone()[0] == 2
    assert "note" in [r[1] for r in con.execute("PRAGMA table_info(aimass_versions)")]
    con.close()
