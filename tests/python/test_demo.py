"""`aimass demo` end to end on digits (the README's first command), and `aimass demo --kernels`."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def test_demo_end_to_end(tmp_path):
    from aimass import demo
    lines = []
    r = demo.run(out=str(tmp_path / "demo"), quick=True, log=lines.append, progress=False)  # 8 epochs, no k-fold
    acc = r["accuracy"]
    assert acc["fp32"] >= 0.95  # the bar
    assert abs(acc["int8"] - acc["fp32"]) <= 0.01
    assert acc["int4"] >= acc["fp32"] - 0.03 and acc["distilled"] >= 0.9 and acc["pruned-2of4"] >= 0.85
    assert [row["name"] for row in r["rows"]] == ["fp32", "pruned-2of4", "int8", "int4", "distilled"]
    sizes = {row["name"]: row["size_bytes"] for row in r["rows"]}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] and sizes["distilled"] < sizes["int8"]
    # the planted duplicates and bad labels were cleaned away; 70/15/15 of what is left
    assert r["raw"]["records"] == 1797 + 25
    n = sum(r["split"].values())
    assert n <= 1797 and abs(r["split"]["train"] - 0.7 * n) <= 1
    assert r["kfold"] is None
    rep = json.load(open(r["report"]))
    for f in rep["figures"].values():
        assert open(f, "rb").read(4) == b"\x89PNG"
    assert len(rep["history"]) == 8 and os.path.isfile(r["paths"]["metrics.jsonl"])
    assert os.path.isfile(os.path.join(r["paths"]["checkpoints"], "latest.json"))
    assert any("where everything is" in line for line in lines)
    # registry: fp32 stable, int8 canary; the server answered both protocols alike and stopped cleanly
    assert r["registry"]["versions"] == {"fp32": 1, "int8": 2} and r["registry"]["stable"] == 1
    s = r["serve"]
    assert s["kserve"] == s["tfserving"] and len(s["kserve"]) == 5
    assert sum(a == b for a, b in zip(s["kserve"], s["labels"])) >= 4
    assert any('protocol="v2"' in line for line in s["metrics_lines"]) and s["exit_code"] == 0


def test_demo_command_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), AIMASS_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "aimass", "demo", "--quick", "--no-progress"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "int8" in r.stdout and "report.json" in r.stdout
    assert os.path.isfile(tmp_path / "home" / "demo" / "report" / "report.json")  # default: under AIMASS_HOME


def test_kernels_demo_pipeline_learns_and_serves_the_same_answers():
    from aimass import dist
    from aimass.demo import catdog
    was_initialised = dist.is_initialized()
    lines = []
    try:
        r = catdog.run(n=1500, epochs=2, seed=1, log=lines.append)
    finally:
        if not was_initialised:
            dist.shutdown()
    # 50 duplicates and 10 out-of-set labels are planted; clean must report exactly those
    assert r["clean_dropped"] == {"label outside classes [0, 1]": 10, "exact duplicate of an earlier record": 50}
    assert r["torch_acc"] > 0.7  # a learnable task, not chance
    assert r["fp32_acc"] == pytest.approx(r["torch_acc"], abs=0.005)
    assert abs(r["int8_acc"] - r["fp32_acc"]) <= 0.03
    assert r["train_samples_per_s"] > 0 and r["fp32_p50_us"] > 0
    assert any(line.startswith("serve int8") for line in lines)


def test_kernels_showcase_reports_errors_bandwidth_and_speedups():
    from aimass.demo import kernels
    r = kernels.run(n=256, k=512, repeats=2, seed=3)
    assert r["shape"] == [256, 512]
    # int8 per-channel is close to fp32; int4 groups are coarser but still a usable linear
    assert r["int8_linear_rel_err"] < 0.02 < r["int4_g128_linear_rel_err"] < 0.3
    assert r["pruned_2of4_kept"] == pytest.approx(0.5)
    for name in ("fp32", "int8", "int4"):
        assert r[f"{name}_weight_gbps"] > 0
    # the bandwidth figures are the timings restated: weight bytes over the same best time
    assert r["int8_weight_gbps"] == pytest.approx(256 * 512 / (r["int8_linear_ms"] * 1e-3) / 1e9, rel=1e-6)
    assert r["int4_weight_gbps"] == pytest.approx(256 * 256 / (r["int4_linear_ms"] * 1e-3) / 1e9, rel=1e-6)
