"""Prometheus metrics of a trainer worker (the store's own are engram_store/rpc/metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engram_store.rpc.metrics import STALL_BUCKETS


class TrainerMetrics:
    """What a trainer reports: time stalled waiting for rows, rows fetched per token, and the
    hot-row cache hit rate. One instance per worker; call `serve(port)` to expose it.

        m = TrainerMetrics(rank=0); m.serve(9400)
        m.observe_stall(seconds)                 # each step: time the step waited for its rows
        m.observe_step(tokens=B*T, rows=n_ids)   # rows = distinct ids fetched for the step
        m.observe_cache(hits, misses)            # per lookup batch of the hot-row cache
        m.observe_stats(fetcher.stats)           # or all three from the row source's counters

    The training loop (trainer/loop.py) calls observe_stats after every step.
    """

    def __init__(self, rank: int = 0, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, lab = self.registry, [str(rank)]
        self.stall = Histogram(
            "engram_trainer_stall_seconds",
            "time a step waited for rows",
            ["rank"],
            buckets=STALL_BUCKETS,
            registry=r,
        ).labels(*lab)
        self.tokens = Counter(
            "engram_trainer_tokens", "tokens trained", ["rank"], registry=r
        ).labels(*lab)
        self.rows = Counter("engram_trainer_rows", "rows fetched", ["rank"], registry=r).labels(
            *lab
        )
        self.rows_per_token = Gauge(
            "engram_trainer_rows_per_token",
            "rows fetched per token in the last step",
            ["rank"],
            registry=r,
        ).labels(*lab)
        self.hits = Counter(
            "engram_trainer_cache_hits", "hot-row cache hits", ["rank"], registry=r
        ).labels(*lab)
        self.misses = Counter(
            "engram_trainer_cache_misses", "hot-row cache misses", ["rank"], registry=r
        ).labels(*lab)
        self.hit_rate = Gauge(
            "engram_trainer_cache_hit_rate", "cache hits / lookups so far", ["rank"], registry=r
        ).labels(*lab)
        self._hits = self._lookups = 0
        self._last = (0, 0, 0, 0, 0.0)  # observe_stats: tokens, rows, hits, lookups, stall_s
        self._http = None

    def observe_stall(self, seconds: float) -> None:
        self.stall.observe(max(0.0, seconds))

    def observe_step(self, tokens: int, rows: int) -> None:
        self.tokens.inc(tokens)
        self.rows.inc(rows)
        if tokens:
            self.rows_per_token.set(rows / tokens)

    def observe_cache(self, hits: int, misses: int) -> None:
        self.hits.inc(hits)
        self.misses.inc(misses)
        self._hits += hits
        self._lookups += hits + misses
        if self._lookups:
            self.hit_rate.set(self._hits / self._lookups)

    def observe_stats(self, stats) -> None:
        """One step from a row source's cumulative PrefetchStats (trainer/prefetch.py): what
        grew since the last call is this step's tokens, rows, cache hits/misses and stall."""
        now = (stats.tokens, stats.rows_fetched, stats.cache_hits, stats.cache_lookups)
        tokens, rows, hits, lookups = (a - b for a, b in zip(now, self._last[:4], strict=True))
        self.observe_stall(stats.stall_s - self._last[4])
        self.observe_step(tokens, rows)
        if lookups:
            self.observe_cache(hits, lookups - hits)
        self._last = (*now, stats.stall_s)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
