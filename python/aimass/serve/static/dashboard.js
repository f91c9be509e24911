// aimass serve dashboard: polls /api/status and draws with plain canvas (no libraries, no network).
"use strict";
(function () {
  const history = [];            // {t, total, errors}
  let token = sessionStorage.getItem("aimass_token") || (location.hash.match(/token=([^&]+)/) || [])[1] || "";
  if (token) sessionStorage.setItem("aimass_token", token);
  const $ = (id) => document.getElementById(id);
  $("settoken").onclick = () => { token = $("token").value; sessionStorage.setItem("aimass_token", token); poll(); };

  function setup(canvas) {
    const r = window.devicePixelRatio || 1, w = canvas.clientWidth || 600, h = canvas.clientHeight || 200;
    canvas.width = w * r; canvas.height = h * r;
    const g = canvas.getContext("2d"); g.setTransform(r, 0, 0, r, 0, 0); g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif"; return { g, w, h };
  }
  function axes(g, w, h, ymax, unit) {
    g.strokeStyle = "#ccc"; g.fillStyle = "#667"; g.beginPath();
    for (let i = 0; i <= 4; i++) {
      const y = 10 + (h - 40) * i / 4; g.moveTo(40, y); g.lineTo(w - 5, y);
      g.fillText(fmt(ymax * (4 - i) / 4) + unit, 0, y + 4);
    }
    g.stroke();
  }
  function fmt(v) { return v >= 1000 ? (v / 1000).toFixed(1) + "k" : v >= 10 ? v.toFixed(0) : v.toFixed(1); }
  function lineChart(canvas, series) {   // series: [{color, values}]
    const { g, w, h } = setup(canvas);
    const ymax = Math.max(1, ...series.flatMap(s => s.values)) * 1.1;
    axes(g, w, h, ymax, "");
    series.forEach(s => {
      g.strokeStyle = s.color; g.lineWidth = 2; g.beginPath();
      s.values.forEach((v, i) => {
        const x = 40 + (w - 45) * i / Math.max(1, 119), y = 10 + (h - 40) * (1 - v / ymax);
        i ? g.lineTo(x, y) : g.moveTo(x, y);
      });
      g.stroke(); g.lineWidth = 1;
    });
    g.fillStyle = "#2b6cb0"; g.fillText("requests/s", 50, h - 8); g.fillStyle = "#c0392b"; g.fillText("errors/s", 130, h - 8);
  }
  function barChart(canvas, labels, values, colors) {
    const { g, w, h } = setup(canvas);
    const ymax = Math.max(1, ...values) * 1.1, n = Math.max(1, values.length), bw = (w - 50) / n;
    axes(g, w, h, ymax, "");
    const step = Math.ceil(44 / bw);    // label every step-th bar so labels never overlap
    values.forEach((v, i) => {
      const bh = (h - 40) * v / ymax, x = 45 + i * bw;
      g.fillStyle = colors[i] || "#2b6cb0"; g.fillRect(x, 10 + (h - 40) - bh, Math.max(1, bw - 3), bh);
      if (i % step === 0) { g.fillStyle = "#445"; g.fillText(labels[i], x, h - 8); }
    });
  }
  function percentile(bounds, counts, q) {
    const total = counts.reduce((a, b) => a + b, 0); if (!total) return null;
    let acc = 0;
    for (let i = 0; i < counts.length; i++) { acc += counts[i]; if (acc >= q * total) return i < bounds.length ? bounds[i] : Infinity; }
    return Infinity;
  }
  function ms(s) { return s === Infinity ? "> " + 10 + " s" : s < 0.001 ? (s * 1e6).toFixed(0) + " us" : (s * 1e3).toFixed(2) + " ms"; }

  function render(st) {
    $("ready").textContent = st.draining ? "draining" : st.ready ? "ready" : "not ready";
    $("ready").className = "pill " + (st.ready ? "ok" : "bad");
    const byVersion = {}, byCode = {};
    let total = 0, errors = 0;
    st.requests.forEach(r => {
      const k = r.model + "/" + r.version; byVersion[k] = byVersion[k] || { ok: 0, err: 0 };
      const ok = r.code === "200"; byVersion[k][ok ? "ok" : "err"] += r.count;
      byCode[r.code] = (byCode[r.code] || 0) + r.count; total += r.count; if (!ok) errors += r.count;
    });
    $("summary").textContent = st.models.length + " model(s), " + total + " requests, " + errors + " errors, " +
      st.switches + " version switch(es), up " + Math.round(st.uptime_s) + " s";
    const rows = [];
    st.models.forEach(m => {
      if (!m.versions.length) rows.push([m.name, "-", "", m.state + (m.reason ? ": " + m.reason : ""), "", "", ""]);
      m.versions.forEach(v => {
        const c = byVersion[m.name + "/" + v.version] || { ok: 0, err: 0 };
        rows.push([m.name, v.version + (v.default ? " (default)" : ""), v.labels.join(", "), m.state, c.ok, c.err, v.inflight]);
      });
    });
    const tb = $("models").tBodies[0]; tb.textContent = "";
    rows.forEach(r => { const tr = tb.insertRow(); r.forEach(c => { tr.insertCell().textContent = String(c); }); });
    const now = Date.now() / 1000; history.push({ t: now, total, errors });
    while (history.length > 121) history.shift();
    const rate = [], erate = [];
    for (let i = 1; i < history.length; i++) {
      const dt = Math.max(1e-3, history[i].t - history[i - 1].t);
      rate.push(Math.max(0, history[i].total - history[i - 1].total) / dt);
      erate.push(Math.max(0, history[i].errors - history[i - 1].errors) / dt);
    }
    lineChart($("rate"), [{ color: "#2b6cb0", values: rate }, { color: "#c0392b", values: erate }]);
    const codes = Object.keys(byCode).sort();
    barChart($("codes"), codes, codes.map(c => byCode[c]), codes.map(c => c === "200" ? "#1f8a4c" : "#c0392b"));
    const b = st.latency.bounds_s, cnt = st.latency.counts;
    barChart($("latency"), b.map(x => x < 0.001 ? (x * 1e6) + "us" : x < 1 ? (x * 1e3) + "ms" : x + "s").concat(["inf"]), cnt, []);
    const p50 = percentile(b, cnt, 0.5), p99 = percentile(b, cnt, 0.99);
    $("pct").textContent = p50 === null ? "no successful requests yet" : "p50 <= " + ms(p50) + ", p99 <= " + ms(p99) + " (bucket bounds)";
    $("errors").textContent = st.errors.length ? st.errors.slice().reverse().map(e => JSON.stringify(e)).join("\n") : "none";
    document.body.dataset.drawn = String(history.length);
  }

  async function poll() {
    try {
      const r = await fetch("api/status", { headers: token ? { Authorization: "Bearer " + token } : {} });
      if (r.status === 401 || r.status === 403) {
        $("tokenbox").style.display = "inline"; $("ready").textContent = "token needed (metrics or admin scope)"; return;
      }
      $("tokenbox").style.display = "none";
      render(await r.json());
    } catch (e) {
      $("ready").textContent = "server unreachable"; $("ready").className = "pill bad";
    }
  }
  poll(); setInterval(poll, 1000);
})();
