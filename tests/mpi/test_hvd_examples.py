"""The Horovod-style example scripts in examples/horovod run unchanged under mpirun
(each rank calls the script's main() in this process, as `python script.py` would)."""
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

torch = pytest.importorskip("torch")

HERE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "horovod")


def load(name):
    """Imports an example as `python examples/horovod/NAME.py` would: its folder first on sys.path."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    spec = importlib.util.spec_from_file_location(f"hvd_example_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [[], ["--fp16-allreduce"], ["--model", "mlp"]])
def test_synthetic_benchmark_runs(dist, extra):
    m = load("pytorch_synthetic_benchmark")
    rate = m.main(["--num-iters", "2", "--num-batches-per-iter", "2", "--num-warmup-batches", "1",
                   "--batch-size", "8"] + extra)
    assert rate > 0


def test_synthetic_benchmark_adasum_says_what_to_use(dist):
    m = load("pytorch_synthetic_benchmark")
    with pytest.raises(NotImplementedError, match="op=Average"):
        m.main(["--use-adasum", "--num-iters", "1"])


@pytest.mark.timeout(180)
def test_mnist_learns_and_scheduler_decays_lr(dist):
    m = load("pytorch_mnist")
    loss, acc, lr = m.main(["--epochs", "2"])
    assert acc > 0.5, (loss, acc)
    assert lr == pytest.approx(0.05 * dist.size() * 0.7 ** 2)
    # every rank reports the same averaged metrics
    got = dist.allgather_object((round(loss, 6), round(acc, 6)))
    assert all(g == got[0] for g in got)


@pytest.mark.timeout(120)
def test_mnist_with_predivide_factor_and_fp16(dist):
    m = load("pytorch_mnist")
    loss, acc, _ = m.main(["--epochs", "1", "--gradient-predivide-factor", str(float(dist.size())),
                           "--fp16-allreduce", "--train-size", "256"])
    assert loss == loss and acc >= 0  # finite, ran to the end


@pytest.mark.timeout(120)
def test_checkpoint_resume_equals_uninterrupted_run(dist):
    m = load("pytorch_checkpoint_resume")
    base = tempfile.mkdtemp(prefix="hvd-ckpt-") if dist.rank() == 0 else None
    base = dist.broadcast_object(base, root_rank=0)
    a, b = os.path.join(base, "a"), os.path.join(base, "b")
    if dist.rank() == 0:
        os.makedirs(a)
        os.makedirs(b)
    dist.barrier()
    start, _ = m.main(["--dir", a, "--epochs", "4", "--stop-after", "2"])
    assert start == 0
    start, resumed = m.main(["--dir", a, "--epochs", "4"])
    assert start == 2
    start, straight = m.main(["--dir", b, "--epochs", "4"])
    assert start == 0
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    dist.barrier()
    if dist.rank() == 0:
        shutil.rmtree(base)


@pytest.mark.timeout(60)
def test_grad_clip_sees_averaged_gradients(dist):
    m = load("pytorch_grad_clip")
    model, norms = m.main(["--steps", "5"])
    got = dist.allgather_object(norms)
    assert all(g == got[0] for g in got)  # clipping saw the same (averaged) gradients on every rank
    w = dist.allgather_object([p.detach().clone() for p in model.parameters()])
    for other in w[1:]:
        for p, q in zip(w[0], other):
            assert torch.equal(p, q)
    model, norms = m.main(["--steps", "3", "--batches-per-allreduce", "2"])
    assert len(norms) == 3
