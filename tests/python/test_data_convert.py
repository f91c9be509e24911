"""Converters, clean, split and `aimass data inspect`."""
import json
import os

import numpy as np
import pytest

import aimass
import aimass.data as D
from aimass import cli


def test_clean_reports_every_drop(capsys):
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    x[2, 1] = np.nan
    x[5] = x[1]
    y = np.array([0, 1, 1, 2, 0, 1, 7, 2])
    cleaned, rep = D.clean({"x": x, "y": y}, label="y", classes=3)
    assert rep["dropped_indices"]["missing or NaN value"] == [2]
    assert rep["dropped_indices"]["exact duplicate of an earlier record"] == [5]
    assert [k for k in rep["dropped"] if k.startswith("label outside")]
    assert sum(rep["dropped"].values()) == 3 and rep["kept"] == 5
    np.testing.assert_array_equal(cleaned["y"], [0, 1, 2, 0, 2])
    assert "3 dropped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="label="):
        D.clean({"x": x}, classes=3)


def test_from_npy_npz_and_csv(tmp_path):
    a = np.arange(30, dtype=np.int16).reshape(10, 3)
    np.save(tmp_path / "a.npy", a)
    ds = D.from_npy(tmp_path / "a.npy", tmp_path / "n1")
    np.testing.assert_array_equal(ds.column("x"), a)
    np.savez(tmp_path / "b.npz", img=a, lab=np.arange(10))
    ds = D.from_npy(tmp_path / "b.npz", tmp_path / "n2")
    assert ds.fields == ["img", "lab"]
    (tmp_path / "t.csv").write_text("f1,f2,species\n1,2,cat\n3,,dog\n1,2,cat\n5,6,dog\n7,8,\n")
    ds = D.from_csv(tmp_path / "t.csv", tmp_path / "c", label="species")
    assert len(ds) == 2 and ds.metadata["classes"] == ["cat", "dog"]
    np.testing.assert_array_equal(ds.column("x"), [[1, 2], [5, 6]])
    np.testing.assert_array_equal(ds.column("label"), [0, 1])
    with pytest.raises(ValueError, match="label column"):
        D.from_csv(tmp_path / "t.csv", tmp_path / "c2", label="nope")


def test_from_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for ci, cls in enumerate(["cat", "dog"]):
        os.makedirs(tmp_path / "root" / cls)
        for k in range(3):
            Image.new("RGB", (20 + k, 10), (100 * ci, 50, k)).save(tmp_path / "root" / cls / f"{k}.jpg")
    ds = D.from_image_folder(tmp_path / "root", tmp_path / "img", size=(8, 6))
    assert len(ds) == 6 and ds.metadata["classes"] == ["cat", "dog"]
    assert ds[0]["image"].shape == (8, 6, 3) and ds[0]["image"].dtype == np.uint8
    np.testing.assert_array_equal(ds.column("label"), [0, 0, 0, 1, 1, 1])
    assert abs(int(ds[4]["image"][..., 0].mean()) - 100) <= 3


def test_split_from_config(tmp_path):
    y = np.repeat([0, 1, 2, 3], 50)
    ds = D.write(tmp_path / "ds", {"id": np.arange(200), "label": y})
    (tmp_path / "config.yml").write_text(
        f"data_path: {tmp_path / 'ds'}\ndownload: false\nsplitting:\n  train: 70\n  valid: 15\n  test: 15\n")
    s = D.split(config=tmp_path / "config.yml", seed=1, stratify=True)
    assert (len(s.train), len(s.valid), len(s.test)) == (140, 30, 30)
    ids = np.concatenate([s.train.column("id"), s.valid.column("id"), s.test.column("id")])
    assert sorted(ids.tolist()) == list(range(200))
    assert np.bincount(s.train.column("label")).tolist() == [35] * 4  # stratified
    s2 = D.split(ds, config=tmp_path / "config.yml", seed=1, stratify=True)
    np.testing.assert_array_equal(s2.test.column("id"), s.test.column("id"))
    assert D.split(ds, {"splitting": {"train": 50, "test": 50}}, seed=2).test.column("id").size == 100
    np.testing.assert_array_equal(D.open_split(tmp_path / "ds", "test").column("id"),
                                  D.split(ds, {"splitting": {"train": 50, "test": 50}}, seed=2).test.column("id"))
    # the loader runs on a split
    got = np.concatenate([b["id"] for b in D.Loader(s.valid, 8, seed=0)])
    assert sorted(got.tolist()) == sorted(s.valid.column("id").tolist())
    with pytest.raises(ValueError, match="sum to 100"):
        D.split(ds, {"splitting": {"train": 70, "valid": 20, "test": 15}})
    with pytest.raises(FileNotFoundError):
        D.split(ds, tmp_path / "missing.yml")


def test_cli_inspect(tmp_path, capsys):
    ds = D.write(tmp_path / "ds", {"x": np.zeros((10, 4), np.uint8), "label": np.array([0, 1] * 5)},
                 metadata={"classes": ["cat", "dog"], "label_field": "label"})
    assert cli.main(["data", "inspect", ds.path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 10 and info["verified_records"] == 10
    assert info["class_balance"] == {"cat": 5, "dog": 5}
    shard = os.path.join(ds.path, ds.shards[0]["file"])
    buf = bytearray(open(shard, "rb").read())
    buf[40] ^= 0xFF
    open(shard, "wb").write(bytes(buf))
    assert cli.main(["data", "inspect", ds.path]) == 1
    assert "CORRUPT" in capsys.readouterr().err
    with pytest.raises(aimass.CorruptDataError):
        aimass.data.inspect(ds.path, verify=False)
