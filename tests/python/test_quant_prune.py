import numpy as np
import pytest

from aimass.compress import prune_channels, prune_mask, prune_model

torch = pytest.importorskip("torch")


def w_rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_keeps_largest_exact_count(sparsity):
    w = w_rand((37, 53))
    mask = prune_mask(w, "magnitude", sparsity)
    assert mask.dtype == bool and mask.shape == w.shape
    pruned = int(np.floor(sparsity * w.size))
    assert mask.sum() == w.size - pruned
    if 0 < pruned:
        assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()


def test_magnitude_ties_keep_lower_index():
    w = np.array([1.0, -2.0, 2.0, 1.0, 2.0, -1.0, 0.5, 3.0], np.float32)
    # keep 4: 3.0, then three of the |2.0| ties -> all of them; keep 5: add the first |1.0| (index 0)
    assert prune_mask(w, "magnitude", 0.5).tolist() == [False, True, True, False, True, False, False, True]
    assert prune_mask(w, "magnitude", 3 / 8).tolist() == [True, True, True, False, True, False, False, True]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3), (1, 1)])
def test_n_m_keeps_exactly_n_of_every_m(n, m):
    w = w_rand((16, 24), seed=n * 10 + m)  # 24 is a multiple of every m here
    mask = prune_mask(w, "n:m", n=n, m=m)
    g = mask.reshape(-1, m)
    assert np.all(g.sum(axis=1) == n)
    a = np.abs(w).reshape(-1, m)
    kept_min = np.where(g, a, np.inf).min(axis=1)
    dropped_max = np.where(~g, a, -np.inf).max(axis=1)
    assert np.all(kept_min >= dropped_max)


def test_n_m_ties_keep_lower_index():
    w = np.array([[1.0, 1.0, 1.0, 1.0, 0.0, 5.0, -5.0, 5.0]], np.float32)
    assert prune_mask(w, "n:m", n=2, m=4).tolist() == [[True, True, False, False, False, True, True, False]]


def test_channel_prunes_rows_by_l2_norm():
    w = w_rand((10, 6, 3))
    w[3] *= 0.01
    w[7] *= 0.001
    mask = prune_mask(w, "channel", 0.2)
    rows = mask.reshape(10, -1)
    assert np.all(rows.all(axis=1) | (~rows).all(axis=1))  # whole rows
    assert np.flatnonzero(~rows[:, 0]).tolist() == [3, 7]
    res = prune_channels(w, 0.2)
    assert res.shape == (8, 6, 3) and res.original_shape == (10, 6, 3)
    assert res.kept_indices.tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    np.testing.assert_array_equal(res.weight, w[res.kept_indices])
    t = prune_channels(torch.from_numpy(w), 0.2)
    assert isinstance(t.weight, torch.Tensor) and tuple(t.weight.shape) == (8, 6, 3)


def test_torch_and_half_inputs_match_numpy():
    w = w_rand((8, 32))
    ref = prune_mask(w, "n:m")
    np.testing.assert_array_equal(prune_mask(torch.from_numpy(w), "n:m"), ref)
    wb = torch.from_numpy(w).to(torch.bfloat16)
    np.testing.assert_array_equal(prune_mask(wb, "magnitude", 0.5), prune_mask(wb.float().numpy(), "magnitude", 0.5))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                               torch.nn.Linear(64, 8))


def test_prune_model_global_magnitude():
    m = _model()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("weight")}
    rep = m_rep = prune_model(m, "magnitude", 0.6)
    assert rep["scope"] == "global"
    total = sum(v.numel() for v in before.values())
    assert m_rep["kept_fraction"] == pytest.approx((total - int(0.6 * total)) / total)
    allw = torch.cat([v.abs().reshape(-1) for v in before.values()])
    thr = allw.sort().values[int(0.6 * total)]
    for name, layer in rep["layers"].items():
        p = dict(m.named_parameters())[name + ".weight"]
        assert layer["shape"] == tuple(p.shape)
        assert layer["kept_fraction"] == pytest.approx((p != 0).float().mean().item())
        kept = before[name + ".weight"].abs()[p != 0]
        assert kept.min() >= thr
    # global: layers end up at different sparsities (conv has smaller weights)
    fracs = [v["kept_fraction"] for v in rep["layers"].values()]
    assert max(fracs) - min(fracs) > 0.05


def test_prune_model_layer_scope_and_n_m_and_channel():
    m = _model()
    rep = prune_model(m, "magnitude", 0.5, scope="layer")
    for layer in rep["layers"].values():
        assert layer["kept_fraction"] == pytest.approx(0.5)
    m = _model()
    rep = prune_model(m, "n:m", n=2, m=4)
    assert rep["scope"] == "layer"
    lin = m[0].weight.detach().numpy()
    assert np.all((lin.reshape(-1, 4) != 0).sum(axis=1) == 2)
    conv = m[2].weight.detach().permute(0, 2, 3, 1).numpy()  # groups run along input channels
    assert np.all((conv.reshape(-1, 4) != 0).sum(axis=1) == 2)
    m = _model()
    rep = prune_model(m, "channel", 0.25)
    rows = (m[0].weight.detach() != 0).any(dim=1)
    assert int(rows.sum()) == 64 - 16
    assert rep["layers"]["0"]["kept_fraction"] == pytest.approx(0.75)


def test_prune_bad_inputs():
    w = w_rand((8, 16))
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_mask(w, sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_mask(w, sparsity=-0.1)
    with pytest.raises(TypeError, match="sparsity must be"):
        prune_mask(w, sparsity="half")
    with pytest.raises(ValueError, match="n=5 > m=4"):
        prune_mask(w, "n:m", n=5, m=4)
    with pytest.raises(ValueError, match="n and m must be >= 1"):
        prune_mask(w, "n:m", n=0, m=4)
    with pytest.raises(ValueError, match="multiple of m=3"):
        prune_mask(w, "n:m", n=1, m=3)
    with pytest.raises(ValueError, match="method must be"):
        prune_mask(w, "random")
    with pytest.raises(TypeError, match="float32"):
        prune_mask(w.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        prune_mask(w.T)
    with pytest.raises(ValueError, match="rank >= 1"):
        prune_mask(np.ones((), np.float32))
    with pytest.raises(ValueError, match="no elements"):
        prune_mask(np.ones((0, 3), np.float32))
    bad = w.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_mask(bad)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune_model(w)
    with pytest.raises(ValueError, match="no nn.Linear"):
        prune_model(torch.nn.ReLU())
    with pytest.raises(ValueError, match="scope='global' applies"):
        prune_model(_model(), "n:m", scope="global")
    with pytest.raises(ValueError, match="scope must be"):
        prune_model(_model(), scope="model")
