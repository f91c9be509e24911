"""aimass tune: Optuna TPE + median pruning over the config's search: ranges; the study lives in
SQLite under AIMASS_HOME and a second run continues it; a PNG of the search history."""
import os

import numpy as np
import pytest

pytest.importorskip("optuna")
torch = pytest.importorskip("torch")


def test_tune_runs_trials_resumes_the_study_and_plots(tmp_path, monkeypatch):
    from aimass import config
    from aimass.train import tune
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, label=(x[:, 0] - x[:, 1] > 0).astype(np.int64))
    (tmp_path / "c.yml").write_text("""\
data_path: d.npz
splitting: {train: 70, valid: 15, test: 15}
model: {kind: mlp, hidden: [8]}
train: {epochs: 3, progress: false}
registry: {store: reg, name: tuned, label: stable}
search:
  trials: 3
  params:
    lr: {type: log_uniform, low: 0.001, high: 0.5}
    hidden: {type: choice, choices: [[4], [16, 8]]}
""")
    cfg = config.load(tmp_path / "c.yml")
    lines = []
    r = tune.run(cfg, log=lines.append)
    assert r["trials"] == 3 and os.path.isfile(r["storage"])
    assert 0.001 <= r["best_params"]["lr"] <= 0.5 and r["best_params"]["hidden"] in ("[4]", "[16, 8]")
    assert 0 < r["best_value"] <= 1 and os.path.isfile(r["best_model"])
    assert open(r["history_png"], "rb").read(4) == b"\x89PNG"
    r2 = tune.run(cfg, trials=2, push=True, log=lines.append)  # the same study, continued; best pushed
    assert r2["trials"] == 5 and r2["best_value"] >= r["best_value"]
    from aimass.registry import Registry
    v = Registry(str(tmp_path / "reg")).resolve("tuned", label="stable")
    assert v.version == r2["registry"]["version"] == 1 and v.metrics["val_accuracy"] == r2["best_value"]
    assert sum(line.startswith("trial ") for line in lines) == 5, lines
    import dataclasses
    late = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, timeout_s=0.0))
    r3 = tune.run(late, trials=3, log=lines.append)  # no new trial starts once the time is up
    assert r3["trials"] == 5 and "timeout_s=0 reached after 0 trial(s)" in lines[-1]


def test_tune_config_errors(tmp_path):
    from aimass import config
    from aimass.train import tune
    base = "data_path: d.npz\nsplitting: {train: 70, valid: 15, test: 15}\n"
    with pytest.raises(ValueError, match="search:"):
        tune.run(config.loads(base))
    cfg = config.loads(base + "search: {params: {colour: {type: uniform, low: 0, high: 1}}}\n")
    with pytest.raises(ValueError, match="can search train"):
        tune.run(cfg)
