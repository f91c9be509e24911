"""Prometheus metrics: HTTP outcomes and latency counted once per request here; queue time, compute
time, batch sizes and the runtime's own request outcomes read from each Session.stats() at scrape
time (the batcher already measures them, so nothing is timed twice)."""
from __future__ import annotations

from bisect import bisect_left
from typing import Dict, List

from prometheus_client import CollectorRegistry, disable_created_metrics
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


def _label(version) -> str:
    return "" if version is None else str(version)


class ServerMetrics:
    """Per-request counts and the latency histogram are plain dict/list updates on the event loop's
    thread (no prometheus-client child lookup, lock or bucket loop per request); the collector below
    turns them into Prometheus families at scrape time, which also runs on that thread."""

    def __init__(self, manager, server_state):
        self.manager = manager
        self.state = server_state
        self.registry = CollectorRegistry(auto_describe=False)
        self._counts: Dict[tuple, int] = {}         # (model, version, protocol, code) -> requests
        self._latency: Dict[tuple, list] = {}       # (model, version) -> per-bucket counts + [sum]
        self.native = None      # aimass.serve.native.NativeFront: its own counts, added at scrape time
        self.registry.register(_RequestCollector(self))
        self.registry.register(_SessionCollector(manager, server_state))

    def observe(self, model: str, version, protocol: str, code: int, seconds: float) -> None:
        """version: an int, or None (no version resolved); label values are made at scrape time."""
        key = (model, version, protocol, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        if code == 200:
            h = self._latency.get((model, version))
            if h is None:
                h = self._latency[(model, version)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
            h[bisect_left(LATENCY_BUCKETS, seconds)] += 1     # le: a value on a bound counts in it
            h[-1] += seconds

    def merged(self):
        """(counts, latency) as _counts and _latency, with the native front end's added."""
        counts, latency = dict(self._counts), {k: list(v) for k, v in list(self._latency.items())}
        if self.native is not None:
            for key, n in self.native.counts():
                counts[key] = counts.get(key, 0) + n
            for key, buckets, total in self.native.latency():
                h = latency.get(key)
                if h is None:
                    h = latency[key] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
                for i, c in enumerate(buckets):
                    h[i] += c
                h[-1] += total
        return counts, latency

    def summary(self) -> dict:
        """Counts by (model, version, protocol, code) and the overall latency histogram, for the dashboard."""
        all_counts, all_latency = self.merged()
        reqs: List[dict] = [{"model": m, "version": _label(v), "protocol": p, "code": str(c), "count": n}
                            for (m, v, p, c), n in sorted(all_counts.items(), key=lambda kv: str(kv[0]))]
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        total = 0.0
        for h in list(all_latency.values()):
            for i, c in enumerate(h[:-1]):
                counts[i] += c
            total += h[-1]
        return {"requests": reqs, "latency": {"bounds_s": list(LATENCY_BUCKETS), "counts": counts, "sum_s": total}}


class _RequestCollector:
    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def collect(self):
        reqs = CounterMetricFamily("aimass_requests", "HTTP inference requests by model, version, protocol and "
                                   "status code", labels=["model", "version", "protocol", "code"])
        all_counts, all_latency = self.m.merged()
        for (m, v, p, c), n in all_counts.items():
            reqs.add_metric([m, _label(v), p, str(c)], n)
        lat = HistogramMetricFamily("aimass_request_latency_seconds", "End-to-end server time of inference "
                                    "requests (body read to response), successful ones", labels=["model", "version"])
        for (m, v), h in all_latency.items():
            acc, buckets = 0, []
            for b, c in zip(LATENCY_BUCKETS, h):
                acc += c
                buckets.append((repr(b), acc))
            buckets.append(("+Inf", acc + h[-2]))
            lat.add_metric([m, _label(v)], buckets, h[-1])
        yield reqs
        yield lat


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
