"""Prometheus metrics: HTTP outcomes and latency measured once per request here; queue time, compute
time, batch sizes and the runtime's own request outcomes read from each Session.stats() at scrape
time (the batcher already measures them, so nothing is timed twice)."""
from __future__ import annotations

from typing import Dict, List

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

disable_created_metrics()   # the *_created series only double the output

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


def _buckets(h: dict, scale: float):
    """(le, cumulative count) pairs for a runtime histogram (per-bucket counts; a last overflow bucket)."""
    bounds, counts = list(h["bounds"]), list(h["counts"])
    out, acc = [], 0
    for b, c in zip(bounds, counts):
        acc += c
        out.append((repr(b * scale), acc))
    out.append(("+Inf", int(h["count"])))
    return out


class ServerMetrics:
    def __init__(self, manager, server_state):
        self.manager = manager
        self.state = server_state
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("aimass_requests", "HTTP inference requests by model, version, protocol and status "
                                "code", ["model", "version", "protocol", "code"], registry=self.registry)
        self.latency = Histogram("aimass_request_latency_seconds", "End-to-end server time of inference requests "
                                 "(body read to response), successful ones", ["model", "version"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_SessionCollector(manager, server_state))
        self._children: Dict[tuple, tuple] = {}

    def observe(self, model: str, version, protocol: str, code: int, seconds: float) -> None:
        key = (model, version, protocol, code)
        ch = self._children.get(key)
        if ch is None:
            v = "" if version is None else str(version)
            ch = (self.requests.labels(model, v, protocol, str(code)),
                  self.latency.labels(model, v) if code == 200 else None)
            self._children[key] = ch
        ch[0].inc()
        if ch[1] is not None:
            ch[1].observe(seconds)

    def summary(self) -> dict:
        """Counts by (model, version, code) and the overall latency histogram, for the dashboard."""
        reqs: List[dict] = []
        lat_bounds = list(LATENCY_BUCKETS)
        lat_counts = [0] * (len(lat_bounds) + 1)
        lat_sum = 0.0
        for fam in self.registry.collect():
            if fam.name == "aimass_requests":
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        reqs.append({**s.labels, "count": int(s.value)})
            elif fam.name == "aimass_request_latency_seconds":
                per: Dict[tuple, List[float]] = {}
                for s in fam.samples:
                    if s.name.endswith("_bucket"):
                        per.setdefault((s.labels["model"], s.labels["version"]), []).append(s.value)
                    elif s.name.endswith("_sum"):
                        lat_sum += s.value
                for cum in per.values():
                    prev = 0.0
                    for i, c in enumerate(cum):
                        lat_counts[i] += int(c - prev)
                        prev = c
        return {"requests": reqs, "latency": {"bounds_s": lat_bounds, "counts": lat_counts, "sum_s": lat_sum}}


class _SessionCollector:
    def __init__(self, manager, state):
        self.manager = manager
        self.state = state

    def collect(self):
        ready = GaugeMetricFamily("aimass_ready", "1 when the server is ready (models loaded, not draining)")
        ready.add_metric([], 1.0 if self.state.is_ready() else 0.0)
        yield ready
        loaded = GaugeMetricFamily("aimass_model_loaded", "1 per loaded model version (label: the default version "
                                   "marked default=\"true\")", labels=["model", "version", "default"])
        avail = GaugeMetricFamily("aimass_model_ready", "1 when a model has a loaded default version",
                                  labels=["model"])
        outcome = CounterMetricFamily("aimass_runtime_requests", "Runtime (batcher) requests by outcome",
                                      labels=["model", "version", "outcome"])
        batches = CounterMetricFamily("aimass_runtime_batches", "Executed batches", labels=["model", "version"])
        depth = GaugeMetricFamily("aimass_queue_depth", "Queued requests", labels=["model", "version"])
        inflight = GaugeMetricFamily("aimass_inflight_requests", "HTTP requests holding the version",
                                     labels=["model", "version"])
        hq = HistogramMetricFamily("aimass_queue_seconds", "Time requests waited in the batcher's queue",
                                   labels=["model", "version"])
        hc = HistogramMetricFamily("aimass_compute_seconds", "Executor time per batch", labels=["model", "version"])
        hb = HistogramMetricFamily("aimass_batch_size", "Rows per executed batch", labels=["model", "version"])
        for name, st in list(self.manager.models.items()):
            avail.add_metric([name], 1.0 if st.default is not None and not st.unloaded else 0.0)
            for v, lv in list(st.versions.items()):
                lab = [name, str(v)]
                loaded.add_metric(lab + ["true" if v == st.default else "false"], 1.0)
                inflight.add_metric(lab, lv.inflight)
                if lv.closed:
                    continue
                s = lv.session.stats()
                for k, n in s["requests"].items():
                    outcome.add_metric(lab + [k], n)
                batches.add_metric(lab, s["batches"])
                depth.add_metric(lab, s["queue_depth"])
                hq.add_metric(lab, _buckets(s["queue_us"], 1e-6), s["queue_us"]["sum"] * 1e-6)
                hc.add_metric(lab, _buckets(s["compute_us"], 1e-6), s["compute_us"]["sum"] * 1e-6)
                hb.add_metric(lab, _buckets(s["batch_rows"], 1.0), s["batch_rows"]["sum"])
        yield from (loaded, avail, outcome, batches, depth, inflight, hq, hc, hb)
