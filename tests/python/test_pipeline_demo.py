"""The end-to-end demo (data -> training -> export -> serving) on a small set."""
import pytest

pytest.importorskip("torch")


def test_pipeline_demo_learns_and_serves_the_same_answers():
    from aimass import dist, pipeline_demo
    was_initialised = dist.is_initialized()
    lines = []
    try:
        r = pipeline_demo.run(n=1500, epochs=2, seed=1, log=lines.append)
    finally:
        if not was_initialised:
            dist.shutdown()
    # 50 duplicates and 10 out-of-set labels are planted; clean must report exactly those
    assert r["clean_dropped"] == {"label outside classes [0, 1]": 10, "exact duplicate of an earlier record": 50}
    assert r["torch_acc"] > 0.7  # a learnable task, not chance
    # the exported fp32 model answers like torch; int8 stays close
    assert r["fp32_acc"] == pytest.approx(r["torch_acc"], abs=0.005)
    assert abs(r["int8_acc"] - r["fp32_acc"]) <= 0.03
    assert r["train_samples_per_s"] > 0 and r["fp32_p50_us"] > 0
    assert any(line.startswith("serve int8") for line in lines)
