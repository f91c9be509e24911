"""aimass.bench: stable measurement, reports, compare, README regeneration, the tuning
profile (changes defaults; corrupt or foreign profiles are ignored with a warning) and the
CLI end to end on the data suite."""
import json
import os
import subprocess
import sys

import pytest

import aimass
from aimass import _tuning
from aimass.bench import _measure, compare
from aimass.bench._report import Report
from aimass.bench.readme import BEGIN, END, render, update_readme


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_measure_settles_on_steady_calls(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_measure.time, "perf_counter", clock)

    def fn():
        clock.t += 0.001
    m = _measure.measure(fn, window_s=0.01, bound=0.05, warmup=1)
    assert m.stable and m.windows == 3 and m.seconds == pytest.approx(0.001) and m.spread == pytest.approx(0)


def test_measure_flags_unsettled_and_stops(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_measure.time, "perf_counter", clock)
    step = [0]

    def fn():  # each window is 2x slower than the last: never agrees
        clock.t += 0.001 * (2 ** (step[0] // 10))
        step[0] += 1
    m = _measure.measure(fn, calls_per_window=10, bound=0.05, warmup=0, max_windows=6)
    assert not m.stable and m.windows == 6 and m.spread > 0.5


def test_race_pauses_before_each_contender(monkeypatch):
    """gap_s: every contender's block starts after an idle pause (another runtime's spinning pool
    must not hold the cores), and the per-round minimum of each block is what is reported."""
    clock = FakeClock()
    monkeypatch.setattr(_measure.time, "perf_counter", clock)
    events = []
    monkeypatch.setattr(_measure.time, "sleep", lambda s: events.append(("sleep", s)))

    def make(name, cost):
        def fn():
            events.append(name)
            clock.t += cost
        return fn
    r = _measure.race({"a": make("a", 0.002), "b": make("b", 0.001)}, rounds=2, block=2, warmup=1, gap_s=0.05)
    assert events == [("sleep", 0.05), "a", "a", "a", ("sleep", 0.05), "b", "b", "b"] * 2
    assert r["a"].seconds == pytest.approx(0.002) and r["b"].seconds == pytest.approx(0.001)
    events.clear()
    _measure.race({"a": make("a", 0.001)}, rounds=1, block=1, warmup=0)  # default: no pause
    assert events == ["a"]


def test_measure_pair_alternates_windows_so_both_see_the_same_machine(monkeypatch):
    """A machine whose speed halves for a while (a VM's slow state): timed one after the other, a 1.5x
    faster call read as slower; alternating windows give both the same states and keep the true 1.5x."""
    clock = FakeClock()
    monkeypatch.setattr(_measure.time, "perf_counter", clock)
    calls = [0]
    order = []

    def slow_phase():  # the first 40 calls run 2x slower, the rest at full speed
        return 2.0 if calls[0] < 40 else 1.0

    def make(name, cost):
        def fn():
            if not order or order[-1] != name:
                order.append(name)
            calls[0] += 1
            clock.t += cost * slow_phase()
        return fn
    fa, fb = make("a", 0.001), make("b", 0.0015)
    # one after the other: fa lands in the slow phase, fb in the fast one (fa reads 1.33x slower)
    seq_a = _measure.measure(fa, calls_per_window=10, bound=0.05, warmup=0, max_windows=3)
    seq_b = _measure.measure(fb, calls_per_window=10, bound=0.05, warmup=0, max_windows=3)
    assert seq_a.seconds > seq_b.seconds
    calls[0] = 0
    order.clear()
    a, b = _measure.measure_pair(fa, fb, calls_per_window=10, bound=0.05, warmup=0, max_windows=8)
    assert order[:4] == ["a", "b", "a", "b"]
    assert a.stable and b.stable and b.seconds / a.seconds == pytest.approx(1.5)
    assert a.windows == b.windows and a.calls == b.calls == 10 * a.windows


def test_measure_rejects_bad_bounds():
    with pytest.raises(ValueError, match="bound"):
        _measure.measure(lambda: None, bound=0)
    with pytest.raises(ValueError, match="stable_windows"):
        _measure.measure(lambda: None, stable_windows=5, max_windows=3)


def _report(value=1.0, spread=0.02):
    r = Report(machine={"cpu_model": "test cpu", "logical_cores": 2, "simd": "avx2", "load_average": [0.1]})
    r.add("runtime", "latency", value * 1e-3, "s", higher_is_better=False, spread=spread, baseline="torch",
          baseline_value=2e-3, goal=1.5)
    r.add("data", "rate", 1000 / value, "samples/s", higher_is_better=True, spread=spread, baseline="torch",
          baseline_value=100.0, roof="copy", roof_value=2000.0)
    return r


def test_report_ratio_goal_roof_and_round_trip(tmp_path):
    r = _report()
    lat, rate = r.figures
    assert lat.ratio == pytest.approx(2.0) and lat.goal_met is True
    assert rate.ratio == pytest.approx(10.0) and rate.fraction_of_roof == pytest.approx(0.5)
    path = r.save(str(tmp_path))
    back = Report.load(path)
    assert [f.key for f in back.figures] == ["runtime/latency", "data/rate"] and back.figures[0].ratio == lat.ratio


def test_report_load_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{\"format\": 99}")
    with pytest.raises(ValueError, match="not an aimass bench report"):
        Report.load(str(p))
    p.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        Report.load(str(p))


def test_compare_flags_regressions_beyond_spread():
    a, same, slow = _report(1.0), _report(1.01), _report(1.5)
    assert compare(a, same)["regressions"] == []
    res = compare(a, slow)
    assert sorted(res["regressions"]) == ["data/rate", "runtime/latency"]
    assert compare(slow, a)["improvements"] == res["regressions"] or sorted(compare(slow, a)["improvements"]) == \
        sorted(res["regressions"])
    noisy = _report(1.5, spread=0.6)  # inside the measured spread: not flagged
    assert compare(a, noisy)["regressions"] == []


def test_readme_regenerates_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\ntail\n")
    r = _report()
    update_readme(r, str(readme))
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.rstrip().endswith("tail")
    assert render(r) in text and "| latency | 1 ms |" in text and "met" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(r, str(readme))


# ---------------------------------------------------------------- tuning profile
def _python(code, home, **env):
    e = dict(os.environ, AIMASS_HOME=str(home), **env)
    for var, *_ in _tuning.ENV_KNOBS.values():
        if var not in env:
            e.pop(var, None)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=e, capture_output=True, text=True,
                          timeout=120)


def test_profile_changes_defaults_and_env_overrides(tmp_path):
    _tuning.write_profile({"num_threads": 1, "packed_max_rows": 3, "loader_prefetch": 7}, path=str(
        tmp_path / "tuning.json"))
    code = ("import os, aimass, aimass._tuning as t; print(aimass.num_threads(), os.environ['AIMASS_PACKED_MAX_ROWS'],"
            " t.default('loader_prefetch', 2), sorted(t.applied()))").replace("os.environ['AIMASS_PACKED_MAX_ROWS']", "os.environ.get('AIMASS_PACKED_MAX_ROWS', '-')")
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:3] == ["1", "3", "7"]
    r = _python(code, tmp_path, AIMASS_NUM_THREADS="2")  # the environment beats the profile
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "2" and "AIMASS_NUM_THREADS" not in r.stdout
    r = _python(code, tmp_path, AIMASS_TUNING="0")  # profile off
    assert r.returncode == 0 and r.stdout.split()[2] == "2"


@pytest.mark.parametrize("content,why", [
    ("{not json", "cannot be read as JSON"),
    (json.dumps({"format": 1, "profiles": {"Other CPU|64": {"knobs": {"num_threads": 64}}}}), "no profile for this"),
    ("KEY_BAD_VALUE", "bad value"),
    (json.dumps({"format": 7}), "not a format-1"),
])
def test_corrupt_or_foreign_profile_is_ignored_with_warning(tmp_path, content, why):
    if content == "KEY_BAD_VALUE":
        content = json.dumps({"format": 1, "profiles": {_tuning.machine_key(): {"knobs": {"num_threads": -3}}}})
    (tmp_path / "tuning.json").write_text(content)
    r = _python("import aimass; print(aimass.num_threads())", tmp_path)
    assert r.returncode == 0, r.stderr
    assert why in r.stderr and "ignored" in r.stderr
    with pytest.warns(RuntimeWarning, match=why):
        assert _tuning.read_profile(str(tmp_path / "tuning.json")) == {}


def test_write_profile_keeps_other_machines_and_validates(tmp_path):
    p = str(tmp_path / "tuning.json")
    _tuning.write_profile({"num_threads": 4}, path=p, key="Other|8")
    _tuning.write_profile({"fusion_threshold": 1 << 20}, path=p)
    doc = json.loads(open(p).read())
    assert set(doc["profiles"]) == {"Other|8", _tuning.machine_key()}
    with pytest.raises(ValueError, match="unknown knob"):
        _tuning.write_profile({"threads": 2}, path=p)
    with pytest.raises(ValueError, match="bad value"):
        _tuning.write_profile({"simd": "sse9"}, path=p)


# ---------------------------------------------------------------- CLI end to end
def _aimass(*args, home, timeout=300):
    env = dict(os.environ, AIMASS_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "aimass", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_data_suite_tune_show_compare(tmp_path):
    out = tmp_path / "out"
    r = _aimass("bench", "data", "--quick", "--tune", "--out", str(out), home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    names = [f["name"] for f in rep["figures"]]
    assert any("Loader" in n for n in names) and rep["machine"]["logical_cores"] >= 1
    assert rep["machine"]["copy_GBps_1_thread"] > 0 and (out / "loader_threads_prefetch.png").stat().st_size > 1000
    loader_fig = next(f for f in rep["figures"] if f["name"].startswith("Loader") and f["baseline"])
    assert loader_fig["ratio"] > 0 and loader_fig["baseline_value"] > 0
    prof = json.loads((tmp_path / "tuning.json").read_text())["profiles"][_tuning.machine_key()]["knobs"]
    assert {"loader_threads", "loader_prefetch"} <= set(prof)
    r = _aimass("bench", "--show-tuning", "--json", home=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["knobs"] == prof
    r = _aimass("bench", "compare", str(out / "report.json"), str(out / "report.json"), home=tmp_path)
    assert r.returncode == 0 and "0 regression(s)" in r.stdout


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = _aimass("bench", "nosuchsuite", home=tmp_path)
    assert r.returncode == 2 and "unknown suite 'nosuchsuite'" in r.stderr and "Traceback" not in r.stderr
    r = _aimass("bench", "compare", str(tmp_path / "missing.json"), str(tmp_path / "b.json"), home=tmp_path)
    assert r.returncode == 2 and "missing.json" in r.stderr and "Traceback" not in r.stderr


def test_profile_sets_loader_and_session_defaults(tmp_path):
    _tuning.write_profile({"loader_threads": 1, "loader_prefetch": 5, "session_max_batch_size": 4,
                           "session_max_queue_delay_us": 77}, path=str(tmp_path / "tuning.json"))
    code = """
import inspect, numpy as np, torch, aimass.data as D, aimass.runtime as rt
ds = D.write(%r, {"x": np.zeros((8, 3), np.float32)})
ld = D.Loader(ds, 4)
ld2 = D.Loader(ds, 4, num_threads=2, prefetch=3)  # explicit arguments beat the profile
rt.export(torch.nn.Sequential(torch.nn.Linear(3, 2)), (torch.randn(2, 3),), %r)
s = rt.Session(%r)
print(ld.num_threads, ld.prefetch, ld2.num_threads, ld2.prefetch, s.max_batch_size, s.max_queue_delay_us)
""" % (str(tmp_path / "ds"), str(tmp_path / "m.aimass"), str(tmp_path / "m.aimass"))
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "5", "2", "3", "4", "77"]


def test_cli_readme_and_compare_options(tmp_path):
    rep = _report()
    path = rep.save(str(tmp_path / "r"))
    readme = tmp_path / "R.md"
    readme.write_text(f"x\n{BEGIN}\n{END}\n")
    r = _aimass("bench", "readme", path, "--readme", str(readme), home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| latency |" in readme.read_text()
    slow = _report(1.5).save(str(tmp_path / "s"))
    r = _aimass("bench", "compare", path, slow, "--fail-on-regression", home=tmp_path)
    assert r.returncode == 1 and "2 regression(s)" in r.stdout


def test_comm_algorithm_table_is_a_knob(tmp_path):
    """`aimass bench --tune` stores the per-size algorithm table as comm_algos; it reaches the engine as
    AIMASS_COMM_ALGOS (the engine parses it at init); malformed tables never enter a profile."""
    p = str(tmp_path / "tuning.json")
    table = "allreduce=0:shm,16m:cma@1m;broadcast=0:mpi,2m:shm"
    _tuning.write_profile({"comm_algos": table}, path=p)
    r = _python("import os, aimass; print(os.environ.get('AIMASS_COMM_ALGOS'))", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == table
    for bad in ("allreduce=4k:shm", "allreduce=0:nccl", "gather=0:shm", "allreduce=0:mpi@1m,"):
        with pytest.raises(ValueError, match="bad value"):
            _tuning.write_profile({"comm_algos": bad}, path=p)


def test_pool_calls_bench_runs_and_rejects_bad_options():
    """bench/bench_pool_calls.py (per-call spread with the run scope's polling off and on): one tiny run
    prints a row per contender; bad options exit 2."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "bench", "bench_pool_calls.py")
    # the script imports the aimass this test imported (the in-tree build, or the installed package in CI)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(aimass.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    for bad in (["--rounds", "0"], ["--run-spin-us", "-1"], ["--family", "nope"]):
        r = subprocess.run([sys.executable, script, *bad], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (bad, r.stderr)
    r = subprocess.run([sys.executable, script, "--family", "lstm2x512", "--rounds", "2", "--gap-ms", "0",
                        "--threads", "2", "--run-spin-us", "0", "300"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l for l in r.stdout.splitlines() if "p10/p50/p90" in l]
    assert any(l.startswith("aimass run_spin_us=0 ") for l in rows)
    assert any(l.startswith("aimass run_spin_us=300 ") for l in rows)
