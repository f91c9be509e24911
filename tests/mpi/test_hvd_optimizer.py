"""DistributedOptimizer with Horovod's arguments and behaviour."""
import warnings

import pytest

torch = pytest.importorskip("torch")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def local_batch(dist, step, per=4):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(per * dist.size(), 6, generator=g), torch.randn(per * dist.size(), 3, generator=g)
    r = dist.rank()
    return x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], x, y


def test_is_a_real_subclass_of_the_wrapped_optimizer(dist):
    m = make_model()
    base = torch.optim.Adam(m.parameters(), lr=0.01)
    opt = dist.DistributedOptimizer(base, named_parameters=m.named_parameters())
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, dist.DistributedOptimizer) and type(opt).__name__ == "Adam"
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for s in range(2):
        x, y, _, _ = local_batch(dist, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025)
    sd = opt.state_dict()
    assert sd["state"][0]["step"].item() == 2
    opt.load_state_dict(sd)
    assert base.state is opt.state  # still shared after torch replaced the dicts
    with pytest.raises(ValueError, match="already a DistributedOptimizer"):
        dist.DistributedOptimizer(opt)
    opt.remove_hooks()


def test_horovod_argument_names_and_errors(dist):
    m = make_model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match="Average"):
        dist.DistributedOptimizer(sgd, m.named_parameters(), op=dist.Adasum)
    with pytest.raises(ValueError, match="op != Average"):
        dist.DistributedOptimizer(sgd, m.named_parameters(), op=dist.Sum, gradient_predivide_factor=2.0)
    with pytest.raises(ValueError, match="unique"):
        dist.DistributedOptimizer(sgd, [("a", p) for p in m.parameters()])
    with pytest.raises(ValueError, match="tuples"):
        dist.DistributedOptimizer(sgd, list(m.parameters()))
    with pytest.raises(ValueError, match="not both"):
        dist.DistributedOptimizer(sgd, m.named_parameters(), num_groups=2, groups=[list(m.parameters())])
    opt = dist.DistributedOptimizer(sgd, named_parameters=m.named_parameters(), compression=dist.Compression.none,
                                    backward_passes_per_step=1, op=dist.Average, gradient_predivide_factor=1.0,
                                    num_groups=0, groups=None, sparse_as_dense=False,
                                    process_set=dist.global_process_set)
    opt.remove_hooks()


def train(dist, steps=4, **kw):
    m = make_model()
    opt = dist.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m.named_parameters(),
                                    **kw)
    for s in range(steps):
        x, y, _, _ = local_batch(dist, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    opt.remove_hooks()
    return m


def reference(dist, steps=4):
    """One process on the whole batch: the mean of per-rank mean losses is the whole-batch mean loss."""
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for s in range(steps):
        _, _, x, y = local_batch(dist, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return m


@pytest.mark.parametrize("kw", [
    {}, {"gradient_predivide_factor": 2.0}, {"num_groups": 2}, {"compression": "fp16_marker"},
])
def test_training_matches_the_whole_batch(dist, kw):
    if kw.get("compression") == "fp16_marker":
        kw = {"compression": dist.Compression.fp16}
    got = train(dist, **kw)
    want = reference(dist)
    tol = dict(rtol=2e-3, atol=2e-3) if "compression" in kw else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_explicit_groups_and_sum_op(dist):
    m = make_model()
    ps = list(m.parameters())
    opt = dist.DistributedOptimizer(torch.optim.SGD(ps, lr=0.1), m.named_parameters(), op=dist.Sum,
                                    groups=[ps[:2], ps[2:]])
    x, y, _, _ = local_batch(dist, 0)
    # this rank's gradients from a twin without hooks: the optimizer's in-place allreduces of p.grad start
    # during backward(), so p.grad may already be (partly) reduced when it returns, as in Horovod (cloned
    # there, one rank once summed the other's reduced values with its own local ones)
    twin = make_model()
    torch.nn.functional.mse_loss(twin(x), y).backward()
    local = [q.grad.clone() for q in twin.parameters()]
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.synchronize()
    for p, lg in zip(ps, local):
        torch.testing.assert_close(p.grad, dist.allreduce(lg, op=dist.Sum), rtol=1e-6, atol=1e-7)
    with opt.skip_synchronize():
        opt.step()
    opt.remove_hooks()


def test_skip_synchronize_warning_and_zero_grad_guard(dist):
    m = make_model()
    opt = dist.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters())
    x, y, _, _ = local_batch(dist, 0)
    torch.nn.functional.mse_loss(m(x), y).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.zero_grad()
    opt.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.skip_synchronize():
            opt.step()
    opt.remove_hooks()


def test_set_backward_passes_per_step(dist):
    m = make_model()
    opt = dist.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters())
    x, y, _, _ = local_batch(dist, 0)
    torch.nn.functional.mse_loss(m(x), y).backward()
    with pytest.raises(AssertionError, match="backward_passes_per_step"):
        torch.nn.functional.mse_loss(m(x), y).backward()
    opt.synchronize()
    opt.zero_grad()
    opt.set_backward_passes_per_step(2)
    for _ in range(2):
        torch.nn.functional.mse_loss(m(x), y).backward()
    with opt.skip_synchronize():
        opt.synchronize()
        opt.step()
    with pytest.raises(ValueError, match=">= 1"):
        opt.set_backward_passes_per_step(0)
    opt.remove_hooks()


def test_sparse_gradients_allgathered_or_densified(dist):
    n, r = dist.size(), dist.rank()
    for dense in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = dist.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=1.0), emb.named_parameters(),
                                        sparse_as_dense=dense)
        before = emb.weight.detach().clone()
        emb(torch.tensor([r, 9])).sum().backward()
        opt.step()
        delta = before - emb.weight.detach()
        want = torch.zeros(10, 3)
        for k in range(n):
            want[k] += 1.0 / n
        want[9] += 1.0
        torch.testing.assert_close(delta, want)
        opt.remove_hooks()


def test_scheduler_made_before_wrapping_still_averages(dist):
    """torch's LR scheduler patches the optimizer's step() as an instance attribute; wrapping that
    optimizer afterwards must still allreduce the gradients (the demo's pipeline builds it so)."""
    m = make_model()
    base = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    opt = dist.DistributedOptimizer(base, named_parameters=m.named_parameters())
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    for s in range(3):
        x, y, gx, gy = local_batch(dist, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        sched.step()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(gx), gy).backward()  # the whole batch on one process
        ref_opt.step()
        ref_sched.step()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert base.param_groups[0]["lr"] == pytest.approx(0.0125)
