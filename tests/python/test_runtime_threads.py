"""Threading policy regression: a batched Session under many concurrent clients with 2 engine
threads must not stall (OpenBLAS's spinning workers used to fight the scheduler and the client
threads for the cores: 40-70 ms per 32-row batch on 2 cores), and results must match torch."""
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    # Wide enough that 32-row batches go through sgemm.
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    path = tmp_path_factory.mktemp("rt") / "mlp.aimass"
    rt.export(net, (torch.randn(2, 256),), path, input_names=["x"])
    return net, path


@pytest.fixture
def two_threads():
    n0 = aimass.num_threads()
    aimass.set_num_threads(2)
    yield
    aimass.set_num_threads(n0)


def test_concurrent_clients_two_threads_finish_and_match(mlp, two_threads):
    net, path = mlp
    clients, per_client = 16, 25
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((clients, per_client, 1, 256)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(xs.reshape(-1, 256))).numpy().reshape(clients, per_client, 1, 10)
    got = np.zeros_like(want)
    errors = []
    with rt.Session(path, max_batch_size=32, max_queue_delay_us=500) as sess:
        def client(i):
            try:
                for j in range(per_client):
                    got[i, j] = next(iter(sess.run({"x": xs[i, j]}).values()))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "concurrent clients did not finish within 60 s"
    assert not errors, errors
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 31, 32, 200])
def test_linear_paths_match_across_thread_counts(mlp, two_threads, rows):
    """The packed small-M kernel (panels split on the pool) gives the same result at 2 and 1 threads."""
    _, path = mlp
    x = np.random.default_rng(rows).standard_normal((rows, 256)).astype(np.float32)
    ex = rt._rt.Executor(rt.load(path)._m, 256)
    y2 = ex.run([x])[0]
    aimass.set_num_threads(1)
    y1 = ex.run([x])[0]
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
