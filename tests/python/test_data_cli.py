"""`aimass data convert|clean|split|inspect`: thin wrappers, one-line errors (exit 2)."""
import json
import os

import numpy as np
import pytest

import aimass.data as D
from aimass import cli


def _run(capsys, *argv):
    rc = cli.main(["data", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_convert_csv_npy_and_images(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("f1,f2,species\n1,2,cat\n3,4,dog\n1,2,cat\n5,,dog\n")
    rc, out, _ = _run(capsys, "convert", tmp_path / "t.csv", tmp_path / "c", "--label", "species")
    assert rc == 0 and json.loads(out)["records"] == 2
    assert D.open(tmp_path / "c").metadata["classes"] == ["cat", "dog"]
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    rc, out, _ = _run(capsys, "convert", tmp_path / "a.npy", tmp_path / "n", "--name", "feat")
    assert rc == 0 and D.open(tmp_path / "n").fields == ["feat"]
    Image = pytest.importorskip("PIL.Image")
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "img" / cls)
        Image.new("RGB", (9, 7), (10, 20, 30)).save(tmp_path / "img" / cls / "0.png")
    rc, out, _ = _run(capsys, "convert", tmp_path / "img", tmp_path / "i", "--size", 4, 5)
    assert rc == 0 and D.open(tmp_path / "i")[0]["image"].shape == (4, 5, 3)


@pytest.mark.parametrize("argv,match", [
    (["convert", "{t}/missing.csv", "{t}/o", "--label", "y"], "does not exist"),
    (["convert", "{t}/t.csv", "{t}/o"], "--label"),
    (["convert", "{t}/t.csv", "{t}/o", "--label", "nope"], "label column"),
    (["convert", "{t}/t.bin", "{t}/o"], "--from"),
    (["split", "{t}/ds", "--ratios", "70,20,20"], "sum to 100"),
    (["split", "{t}/ds", "--ratios", "a,b"], "not a number"),
    (["split", "{t}/ds", "--config", "{t}/none.yml"], "does not exist"),
    (["split", "{t}/nods", "--ratios", "50,50"], "does not exist"),
    (["clean", "{t}/ds", "{t}/ds"], "must differ"),
    (["clean", "{t}/ds", "{t}/o", "--classes", "x"], "--classes"),
    (["inspect", "{t}/nods"], "does not exist"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, match):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    (tmp_path / "t.bin").write_bytes(b"x")
    D.write(tmp_path / "ds", {"x": np.zeros((4, 2), np.float32), "label": np.arange(4)})
    rc, _, err = _run(capsys, *[a.format(t=tmp_path) for a in argv])
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and match in err, err


def test_clean_and_split(tmp_path, capsys):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    x[3, 0] = np.nan
    x[7] = x[6]
    y = np.repeat([0, 1], 10)
    y[11] = 5
    D.write(tmp_path / "raw", {"x": x, "label": y}, metadata={"label_field": "label"})
    rc, out, err = _run(capsys, "clean", tmp_path / "raw", tmp_path / "clean", "--classes", "2")
    assert rc == 0 and json.loads(out)["records"] == 17 and "3 dropped" in err
    assert D.open(tmp_path / "clean").metadata["label_field"] == "label"
    rc, out, _ = _run(capsys, "split", tmp_path / "clean", "--ratios", "70,15,15", "--seed", 3, "--stratify")
    assert rc == 0 and sum(json.loads(out)["splits"].values()) == 17
    rc, out, _ = _run(capsys, "split", tmp_path / "clean", "--ratios", "train=0.5,test=0.5")
    assert rc == 0 and json.loads(out)["splits"] == {"train": 9, "test": 8} or \
        json.loads(out)["splits"] == {"train": 8, "test": 9}
    (tmp_path / "config.yml").write_text("splitting:\n  train: 80\n  valid: 20\n")
    rc, out, _ = _run(capsys, "split", tmp_path / "clean", "--config", tmp_path / "config.yml")
    assert rc == 0 and set(json.loads(out)["splits"]) == {"train", "valid"}
    assert len(D.open_split(tmp_path / "clean", "valid")) == json.loads(out)["splits"]["valid"]


@pytest.mark.parametrize("cmd", ["convert", "clean", "split", "inspect"])
def test_help_shows_an_example(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        cli.main(["data", cmd, "--help"])
    assert e.value.code == 0
    assert "example:\n  aimass data " + cmd in capsys.readouterr().out
