"""The aimass command: every subcommand has an example in --help, and a user error is one
line on stderr with exit status 2 (a traceback only with --debug)."""
import os
import subprocess
import sys

import pytest

from aimass import cli

GOOD = "data_path: d.npz\nsplitting: {train: 70, valid: 15, test: 15}\n"


def _sub_parsers():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_every_subcommand_has_an_example_in_its_help():
    names = set(_sub_parsers())
    assert {"info", "data", "train", "tune", "eval", "compress", "export", "demo", "registry", "serve", "bench"} <= names
    for name, parser in _sub_parsers().items():
        assert "example" in parser.format_help() and f"aimass {name}" in parser.format_help(), name


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needle", [
    (["train", "missing.yml"], "config file missing.yml does not exist"),
    (["tune", "missing.yml"], "does not exist"),
    (["eval", "missing.yml"], "does not exist"),
    (["compress", "missing.yml"], "does not exist"),
    (["export", "missing.pt", "out.aimass"], "does not exist"),
])
def test_missing_files_are_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(argv, capsys)
    assert code == 2 and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"aimass {argv[0]}: error:")


def test_config_errors_name_the_line(capsys, tmp_path):
    (tmp_path / "c.yml").write_text(GOOD + "train:\n  epocs: 3\n")
    code, _, err = _run(["train", str(tmp_path / "c.yml")], capsys)
    assert code == 2 and ":4: unknown key 'train.epocs'; did you mean 'train.epochs'?" in err
    assert len(err.strip().splitlines()) == 1


def test_each_command_reports_what_is_missing(capsys, tmp_path):
    (tmp_path / "c.yml").write_text(GOOD)
    code, _, err = _run(["tune", str(tmp_path / "c.yml")], capsys)
    assert code == 2 and "search:" in err
    code, _, err = _run(["eval", str(tmp_path / "c.yml")], capsys)
    assert code == 2 and "no models to evaluate" in err
    code, _, err = _run(["compress", str(tmp_path / "c.yml")], capsys)
    assert code == 2 and "run 'aimass train" in err
    code, _, err = _run(["train", str(tmp_path / "c.yml")], capsys)
    assert code == 2 and "d.npz does not exist" in err
    code, _, err = _run(["eval", str(tmp_path / "c.yml"), "--model", "nopath"], capsys)
    assert code == 2 and "NAME=PATH" in err
    (tmp_path / "file").write_text("")
    code, _, err = _run(["demo", "--out", str(tmp_path / "file" / "x")], capsys)
    assert code == 2 and "error:" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["data", "inspect", str(tmp_path / "nope")], capsys)
    assert code == 2


def test_usage_errors_are_one_line_and_exit_2(capsys):
    for argv in (["nosuchcommand"], ["train"], ["export", "a"], ["export", "a", "b", "--quantize", "int3"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        _, err = capsys.readouterr()
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err, argv
    assert cli.main([]) == 2  # no command: the help, exit 2


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "train", str(tmp_path / "missing.yml")])


def test_the_installed_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "aimass", "train", str(tmp_path / "x.yml")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "aimass", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and '"version"' in r.stdout


def test_train_compress_eval_export_from_the_command_line(tmp_path, capsys):
    import json

    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 8)).astype(np.float32)  # 2:4 pruning needs inputs in fours
    np.savez(tmp_path / "d.npz", x=x, label=(x[:, 0] + x[:, 1] > 0).astype(np.int64))
    (tmp_path / "c.yml").write_text(GOOD + "model: {kind: mlp, hidden: [16]}\n"
                                    "train: {epochs: 10, batch_size: 16, lr: 0.1, progress: false}\n"
                                    "compress: {distill: {hidden: [4], epochs: 2}}\n")
    cfg = str(tmp_path / "c.yml")
    assert cli.main(["train", cfg]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"]["accuracy"] > 0.7 and os.path.isfile(out["aimass"]) and os.path.isfile(out["metrics"])
    assert cli.main(["train", cfg, "--resume"]) == 0  # finished: resuming changes nothing
    assert json.loads(capsys.readouterr().out)["test"] == out["test"]
    assert cli.main(["compress", cfg, "--quantize", "--prune"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert set(made) == {"int8", "int4", "pruned-2of4"}
    assert cli.main(["eval", cfg]) == 0
    text = capsys.readouterr().out
    assert "int4" in text and "report.json" in text
    rep = json.load(open(tmp_path / "runs" / "c" / "report" / "report.json"))
    assert [m["name"] for m in rep["models"]] == ["fp32", "int4", "int8", "pruned-2of4"]
    assert cli.main(["export", str(tmp_path / "runs" / "c"), str(tmp_path / "m.aimass"), "--quantize", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] > 0
