import os

import pytest

from aimass import _io


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.txt"
    _io.atomic_write_text(p, "old")
    _io.atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary left behind


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "f.txt"
    _io.atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with _io.atomic_path(p) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("writer died")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
