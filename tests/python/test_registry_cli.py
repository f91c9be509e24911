"""`aimass registry ...`: every subcommand, --json output, --help with an example, one-line errors (exit 2)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sqlalchemy")
from aimass.cli import main  # noqa: E402
from registry_util import home, models  # noqa: E402,F401

pytestmark = pytest.mark.timeout(120)
SUBCOMMANDS = ["push", "list", "show", "label", "promote", "rollback", "history", "delete", "gc", "check"]


@pytest.fixture
def store(tmp_path, monkeypatch, home):
    monkeypatch.setenv("AIMASS_REGISTRY", str(tmp_path / "store"))
    return tmp_path / "store"


def run(capsys, *argv):
    rc = main(["registry", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def js(capsys, *argv):
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_every_subcommand_has_help_with_an_example(capsys):
    for sub in SUBCOMMANDS:
        with pytest.raises(SystemExit) as ei:
            main(["registry", sub, "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and f"aimass registry {sub}" in out and "--json" in out and "--store" in out
    assert main(["registry"]) == 2  # no subcommand: help, exit 2


def test_push_list_show_label_promote_rollback_history_delete_gc(capsys, store, models, tmp_path):
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"accuracy": 0.98, "latency_ms": 0.2}))
    d = js(capsys, "push", models[0], "--name", "mnist", "--label", "stable", "--metrics", metrics)
    assert d["version"] == 1 and d["labels"] == ["stable"] and d["metrics"]["accuracy"] == 0.98
    rc, out, _ = run(capsys, "push", models[1], "--name", "mnist", "--label", "canary", "--parent", 1)
    assert rc == 0 and "pushed mnist version 2 (label canary)" in out
    assert js(capsys, "list") == [{"name": "mnist", "created": d["created"], "versions": [1, 2], "latest": 2,
                                   "labels": {"canary": 2, "stable": 1}}]
    rc, out, _ = run(capsys, "list")
    assert "mnist" in out and "canary=2, stable=1" in out
    assert js(capsys, "show", "mnist")["version"] == 1
    assert js(capsys, "show", "mnist", "--label", "canary")["parent"] == 1
    assert [v["version"] for v in js(capsys, "show", "mnist", "--all")] == [1, 2]
    rc, out, _ = run(capsys, "show", "mnist", "--version", 2)
    assert "mnist version 2  [canary]" in out and "input      x float32" in out
    assert js(capsys, "promote", "mnist") == {"name": "mnist", "label": "stable", "version": 2}
    assert js(capsys, "label", "mnist", "qa", 1) == {"name": "mnist", "label": "qa", "version": 1, "previous": None}
    assert js(capsys, "label", "mnist", "qa", "--remove")["previous"] == 1
    assert js(capsys, "rollback", "mnist") == {"name": "mnist", "label": "stable", "version": 1}
    hist = js(capsys, "history", "mnist", "stable")
    assert [(h["action"], h["version"]) for h in hist] == [("set", 1), ("set", 2), ("rollback", 1)]
    rc, out, _ = run(capsys, "history", "mnist")
    assert rc == 0 and "rollback 2 -> 1" in out
    assert js(capsys, "label", "mnist", "canary", 1)["previous"] == 2
    assert js(capsys, "delete", "mnist", 2)["version"] == 2
    assert js(capsys, "gc", "--grace", 0, "--dry-run")["dry_run"] is True
    assert len(js(capsys, "gc", "--grace", 0)["removed_blobs"]) == 1
    assert js(capsys, "check", "--deep") == {"problems": []}
    # --store beats AIMASS_REGISTRY
    other = tmp_path / "other"
    assert js(capsys, "push", models[2], "--name", "x", "--store", other)["version"] == 1
    assert (other / "registry.db").is_file() and [m["name"] for m in js(capsys, "list")] == ["mnist"]


@pytest.mark.parametrize("argv, msg", [
    (["show", "nosuch"], "no model named 'nosuch'"),
    (["push", "/nonexistent.aimass", "--name", "m"], "is not a file"),
    (["push", "{model}", "--name", "bad/name"], "model name 'bad/name' is not valid"),
    (["push", "{model}", "--name", "m", "--metrics", "{badjson}"], "is not valid JSON"),
    (["push", "{model}", "--name", "m", "--metrics", "{listjson}"], "must hold a JSON object"),
    (["delete", "m", "1"], "labelled ['stable']"),
    (["rollback", "m"], "no earlier version"),
    (["promote", "m"], "no label 'canary'"),
    (["label", "m", "canary"], "give the version"),
    (["show", "m", "--version", "9"], "no version 9"),
    (["gc", "--grace", "-1"], "grace_s must be"),
    (["list", "--store", "mysql://u@h/db"], "unsupported database"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, store, models, tmp_path, argv, msg):
    assert main(["registry", "push", str(models[0]), "--name", "m", "--label", "stable"]) == 0
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "list.json").write_text("[1]")
    argv = [a.format(model=models[0], badjson=tmp_path / "bad.json", listjson=tmp_path / "list.json") for a in argv]
    capsys.readouterr()
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"aimass registry {argv[0]}: error:") and msg in err, err


def test_check_reports_a_tampered_blob_with_exit_1(capsys, store, models):
    d = js(capsys, "push", models[0], "--name", "m")
    os.chmod(d["path"], 0o644)
    with open(d["path"], "r+b") as f:
        f.write(b"XX")
    rc, out, _ = run(capsys, "check", "--deep")
    assert rc == 1 and "m v1" in out and "sha256" in out
    rc, out, _ = run(capsys, "check", "--deep", "--json")
    assert rc == 1 and len(json.loads(out)["problems"]) == 1


def test_real_command_line(store, models):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-m", "aimass", "registry", "push", str(models[0]), "--name", "cli",
                        "--label", "stable", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    r = subprocess.run([sys.executable, "-m", "aimass", "registry", "delete", "cli", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "labelled" in r.stderr
