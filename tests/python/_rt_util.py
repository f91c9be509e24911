"""Shared helpers of the runtime family tests: export, run through a Session, compare with torch."""
import numpy as np
import torch

import aimass.runtime as rt


def close(got, ref, rtol=1e-4):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    got = np.asarray(got)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(float(np.nanmax(np.abs(ref))) if ref.size else 0.0, 1e-30)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


def check_session(tmp_path, model, make_inputs, lengths=(None,), rtol=1e-4, name="m", **export_kw):
    """Exports model on make_inputs(first length), then runs every length through a Session and
    compares every output with torch eager (no_grad)."""
    model.eval()
    path = tmp_path / f"{name}.aimass"
    rt.export(model, make_inputs(lengths[0]), path, **export_kw)
    with rt.Session(path, max_batch_size=8) as sess:
        names = [s["name"] for s in sess.signature["inputs"]]
        outs = [s["name"] for s in sess.signature["outputs"]]
        for n in lengths:
            xs = make_inputs(n)
            got = sess.run({k: x.numpy() for k, x in zip(names, xs)})
            with torch.no_grad():
                ref = model(*xs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            for o, r in zip(outs, ref):
                close(got[o], r, rtol)
    return path
