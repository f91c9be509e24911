"""DistributedOptimizer: 2-rank training equals single-process training on the concatenated batches."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batches(steps, per_rank, n):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(per_rank * n, 8, generator=g), torch.randn(per_rank * n, 4, generator=g))
            for _ in range(steps)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("bpps", [1, 2])
def test_training_matches_single_process_on_concatenated_batches(dist, bpps):
    n, r = dist.size(), dist.rank()
    steps, per = 20, 6
    data = batches(steps * bpps, per, n)
    # reference: one process, the whole batch each step
    ref = make_model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        ref_opt.zero_grad()
        for k in range(bpps):
            x, y = data[s * bpps + k]
            torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    # distributed: each rank its slice; rank-dependent init is overwritten by broadcast
    model = make_model(100 + r)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dist.broadcast_parameters(model.state_dict(), root_rank=0)
    if r == 0:
        np.testing.assert_array_equal(model[0].weight.detach().numpy(), make_model(100)[0].weight.detach().numpy())
    model.load_state_dict(make_model(0).state_dict())  # same start as the reference
    dopt = dist.DistributedOptimizer(opt, model.named_parameters(), backward_passes_per_step=bpps)
    for s in range(steps):
        dopt.zero_grad()
        for k in range(bpps):
            x, y = data[s * bpps + k]
            xs, ys = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
            torch.nn.functional.mse_loss(model(xs), ys).backward()
        dopt.step()
    dopt.remove_hooks()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.timeout(60)
def test_parameter_without_grad_on_some_ranks_does_not_hang(dist):
    r = dist.rank()
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    params = list(a.named_parameters(prefix="a")) + list(b.named_parameters(prefix="b"))
    opt = dist.DistributedOptimizer(torch.optim.SGD([p for _, p in params], lr=0.1), params)
    for _ in range(3):
        opt.zero_grad()
        x = torch.ones(2, 3)
        out = a(x) if r == 0 else b(a(x))  # b gets gradients on ranks > 0 only
        out.sum().backward()
        opt.step()
    opt.remove_hooks()
    # every rank ends with the same parameters
    for _, p in params:
        gathered = dist.allgather(p.detach().reshape(1, -1), name=f"check.{_}")
        assert torch.allclose(gathered, gathered[0:1].expand_as(gathered))


@pytest.mark.timeout(60)
def test_compressed_gradients_train_close_to_exact(dist):
    r = dist.rank()
    model = make_model(0)
    opt = dist.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model.named_parameters(),
                                    compression="fp16")
    data = batches(5, 4, dist.size())
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[r * 4:(r + 1) * 4]), y[r * 4:(r + 1) * 4]).backward()
        opt.step()
    opt.remove_hooks()
    ref = make_model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for x, y in data:
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-2, atol=1e-3)


@pytest.mark.timeout(60)
def test_broadcast_optimizer_state(dist):
    r = dist.rank()
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1))
    if r == 0:  # only the root has taken a step: it has moments, the others none
        model(torch.ones(2, 8)).sum().backward()
        opt.step()
    dist.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    st = opt.state_dict()["state"]
    assert len(st) == 4 and float(st[0]["step"]) == 1.0
    gathered = dist.allgather(st[0]["exp_avg"].reshape(1, -1).contiguous(), name="optstate.check")
    assert torch.equal(gathered[0], gathered[-1])


def test_optimizer_argument_errors(dist):
    model = make_model(0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        dist.DistributedOptimizer(object(), model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        dist.DistributedOptimizer(opt, model.named_parameters(), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="does not name"):
        dist.DistributedOptimizer(opt, list(model.named_parameters())[:1])
    with pytest.raises(ValueError, match="op must be"):
        dist.DistributedOptimizer(opt, model.named_parameters(), op="max")
