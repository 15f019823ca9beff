"""The gateway's counters and latencies: every event is recorded once, into both sinks.

Ray's metrics (``ray.util.metrics``) are exported to Prometheus and the dashboard, summed over
the Ingress replicas, and cannot be read back in process; ``GET /stats`` needs this replica's own
counts and p50/p99.  So :class:`GatewayStats` is the one place the Ingress records into: each
event names its Ray metric and its key in the replica's view, and the two cannot drift apart.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Callable

# event -> (Ray metric name, description, tag keys, key in the /stats view, how the view counts)
#   "by": a Counter keyed by the tags' values joined with ":"; "total": an int;
#   "total+by:<key>": an int plus a Counter of the first tag under <key>.
COUNTERS: dict[str, tuple[str, str, tuple[str, ...], str, str]] = {
    "accepted": ("rayeval_accepted_total", "chat requests accepted, by kind", ("kind",), "requests", "by"),
    "served": ("rayeval_requests_total", "chat requests served, by model and kind", ("model", "kind"), "served_by",
               "by:model"),
    "decision": ("rayeval_routing_decisions_total", "routing decisions", ("router", "tier"), "decisions", "by"),
    "fallback": ("rayeval_routing_fallbacks_total", "requests sent to the fallback model", ("reason",), "fallbacks",
                 "total+by:fallback_reasons"),
    "rejected": ("rayeval_rejected_total", "rejected requests", ("status", "code"), "rejected", "by"),
    "replica_lost": ("rayeval_replica_lost_total", "requests whose LLM replica died", ("model",), "replica_lost",
                     "total"),
    "error_5xx": ("rayeval_errors_total", "requests that failed inside rayeval or an LLM replica", ("model",),
                  "errors_5xx", "total"),
}
HISTOGRAMS: dict[str, tuple[str, str, tuple[str, ...], list[float]]] = {
    "latency": ("rayeval_request_latency_s", "end-to-end chat latency (s)", ("model",),
                [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]),
    "routing_latency": ("rayeval_routing_latency_s", "routing decision latency (s)", ("router",),
                        [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2]),
}


def _ray_metrics():
    from ray.util import metrics

    return metrics


class GatewayStats:
    """``count(event, **tags)`` and ``observe(event, seconds, **tags)``; ``snapshot()`` is the
    replica's view.  ``metrics``: the module with ``Counter`` / ``Histogram`` (Ray's by default)."""

    def __init__(self, metrics: Any = None, window: int = 2000):
        m = metrics or _ray_metrics()
        self._counters = {e: m.Counter(name, desc, tag_keys=tags) for e, (name, desc, tags, _, _) in COUNTERS.items()}
        self._hists = {e: m.Histogram(name, desc, boundaries=b, tag_keys=tags)
                       for e, (name, desc, tags, b) in HISTOGRAMS.items()}
        self.view: dict[str, Any] = {}
        for _, _, _, key, how in COUNTERS.values():
            self.view[key] = 0 if how.startswith("total") else Counter()
            if "+by:" in how:
                self.view[how.split(":", 1)[1]] = Counter()
        self.samples = {e: deque(maxlen=window) for e in HISTOGRAMS}

    def count(self, event: str, **tags: str) -> None:
        name, _, keys, key, how = COUNTERS[event]
        tags = {k: str(tags[k]) for k in keys}
        self._counters[event].inc(tags=tags)
        if how == "by":
            self.view[key][":".join(tags[k] for k in keys)] += 1
        elif how.startswith("by:"):
            self.view[key][tags[how[3:]]] += 1
        else:
            self.view[key] += 1
            if "+by:" in how:
                self.view[how.split(":", 1)[1]][tags[keys[0]]] += 1

    def observe(self, event: str, seconds: float, **tags: str) -> None:
        keys = HISTOGRAMS[event][2]
        self._hists[event].observe(seconds, tags={k: str(tags[k]) for k in keys})
        self.samples[event].append(seconds)

    def snapshot(self, pct: Callable[[list[float]], dict]) -> dict[str, Any]:
        out = {k: dict(v) if isinstance(v, Counter) else v for k, v in self.view.items()}
        out.update({e: pct(list(s)) for e, s in self.samples.items()})
        return out
