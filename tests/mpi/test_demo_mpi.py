"""`mpirun -np N aimass demo`: the MLP trains data-parallel (each rank reads its shard, gradients
averaged); rank 0 compresses, evaluates and reports. Also the --kernels pipeline."""
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.mark.timeout(300, method="thread")
def test_demo_data_parallel(dist, shared_dir):
    from aimass import demo
    out = shared_dir("demo")
    r = demo.run(out=out, quick=True, log=lambda *a: None, progress=False)
    assert r["ranks"] == dist.size()
    if dist.rank() == 0:
        assert r["accuracy"]["fp32"] > 0.85
        assert abs(r["accuracy"]["int8"] - r["accuracy"]["fp32"]) <= 0.02
        assert os.path.isfile(r["report"])
    dist.barrier(name="demo.checked")


@pytest.mark.timeout(240, method="thread")
def test_kernels_demo_pipeline_data_parallel(dist):
    from aimass.demo import catdog
    r = catdog.run(n=1200, epochs=2, seed=2, log=lambda *a: None)
    assert r["ranks"] == dist.size()
    if dist.rank() == 0:
        assert r["torch_acc"] > 0.65
        assert r["fp32_acc"] == pytest.approx(r["torch_acc"], abs=0.01)
        assert abs(r["int8_acc"] - r["fp32_acc"]) <= 0.05
