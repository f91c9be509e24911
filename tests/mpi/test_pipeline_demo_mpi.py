"""The end-to-end demo data-parallel: every rank trains on its shard of the split and the
gradients are averaged by aimass.dist; rank 0 exports and serves."""
import pytest

pytest.importorskip("torch")


@pytest.mark.timeout(240, method="thread")
def test_pipeline_demo_data_parallel(dist):
    from aimass import pipeline_demo
    r = pipeline_demo.run(n=1200, epochs=2, seed=2, log=lambda *a: None)
    assert r["ranks"] == dist.size()
    if dist.rank() == 0:
        assert r["torch_acc"] > 0.65
        assert r["fp32_acc"] == pytest.approx(r["torch_acc"], abs=0.01)
        assert abs(r["int8_acc"] - r["fp32_acc"]) <= 0.05
