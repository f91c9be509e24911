"""The dashboard at GET / in real headless Chromium (Debian's /usr/bin/chromium, driven by playwright):
it loads without console errors, its plots draw after traffic, and a screenshot is saved."""
import os
import shutil

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
sync_api = pytest.importorskip("playwright.sync_api")
from serve_util import make_store, serve_process  # noqa: E402

from aimass import _C  # noqa: E402

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("AIMASS_CHROMIUM", "/usr/bin/chromium")


@pytest.mark.parametrize("http", ["uvicorn", "native"])
def test_dashboard_in_chromium(tmp_path, http):
    if http == "native" and not (hasattr(_C, "NativeFrontend") and _C.native_frontend_available()):
        pytest.skip("the native front end was compiled out (no OpenSSL libcrypto at build time)")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: tests/run_all.sh installs Debian's 'chromium' package "
                    "(needs root and apt); set AIMASS_CHROMIUM to another binary")
    reg, _ = make_store(tmp_path, versions=2)
    reg.set_label("mlp", "canary", 2)
    x = np.ones((1, 4), np.float32).tolist()
    # the page's own requests go through the front end too (forwarded to the app), the traffic below is
    # answered natively: its counts and latency must reach the plots all the same
    with serve_process(tmp_path / "store", "--http", http) as srv:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("Number(document.body.dataset.drawn || 0) >= 1", timeout=30_000)
            with httpx.Client(base_url=srv.url) as c:
                for i in range(60):
                    assert c.post("/predict", json={"input": x}).status_code == 200
                    assert c.post("/v1/models/mlp/labels/canary:predict", json={"instances": x}).status_code == 200
                    if i % 10 == 0:
                        assert c.post("/v2/models/mlp/infer", json={"inputs": []}).status_code == 400
            n = page.evaluate("Number(document.body.dataset.drawn)")
            page.wait_for_function(f"Number(document.body.dataset.drawn) >= {n + 2}", timeout=30_000)
            # the plots hold drawn pixels, the table the versions and labels, the log the errors
            for cid in ("rate", "codes", "latency"):
                inked = page.evaluate(f"""(() => {{ const c = document.getElementById('{cid}');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }})()""")
                assert inked > 500, f"canvas {cid} looks empty ({inked} drawn pixels)"
            table = page.inner_text("#models")
            assert "stable" in table and "canary" in table and "(default)" in table
            assert "non-empty 'inputs'" in page.inner_text("#errors")
            assert "p50" in page.inner_text("#pct")
            shot = tmp_path / f"dashboard_{http}.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        assert problems == [], problems
        assert srv.stop() == 0
