"""Shard administration over the wire: the registry's side of SetShardState, ExportRows/ImportRows,
DeleteRows, ListTables/CreateTable and Stats. It speaks protobuf directly because these calls are
the cluster's own business, not something a trainer's StoreClient needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import grpc

from engram_store.engine.errors import EngramError, ShardUnavailable
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from engram_store.rpc.retry import RetryPolicy

T = TypeVar("T")
# one ImportRows stream of a reshard copy: below the destination's max_import_bytes (1 GiB) and
# its max_batch_rows (1 M), as the destination stores a stream whole
COPY_STREAM_BYTES = 256 << 20
COPY_STREAM_ROWS = 1 << 18


def _open_channel(address: str, client: ClientConfig, options: list) -> grpc.Channel:
    """A channel that sends the client's token (and speaks TLS) as StoreClient's do."""
    try:
        from engram_store.rpc.auth import open_channel
    except ImportError:  # a store without authentication support: plaintext, no token
        return grpc.insecure_channel(address, options=options)
    return open_channel(address, client, options)


# Errors worth waiting out (ShardUnavailable, timeouts included): a shard actor being restarted
# by Ray, or a server still binding. No retry limit: each call sets deadline_s (its wait_s).
_RESTART = RetryPolicy(retries=None, backoff_s=0.05, backoff_max_s=1.0, deadline_s=0.0)


class ShardAdmin:
    """One shard server, addressed as "host:port", with calls that retry while it restarts."""

    def __init__(
        self, address: str, client: ClientConfig | None = None, timeout_s: float | None = None
    ):
        """`client` gives the token / TLS root to use (the cluster's own ClientConfig: its token
        must be a write token when shards require one) and the default timeout."""
        client = client or ClientConfig()
        self.address = address
        self.timeout_s = client.timeout_s if timeout_s is None else timeout_s
        opts = [
            ("grpc.max_send_message_length", client.max_message_bytes),
            ("grpc.max_receive_message_length", client.max_message_bytes),
        ]
        self._channel = _open_channel(address, client, opts)
        self._stub = pb_grpc.MemoryStoreStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ShardAdmin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn: Callable[[], T], what: str, wait_s: float | None = None) -> T:
        """Run one RPC; while it fails with ShardUnavailable (UNAVAILABLE, DEADLINE_EXCEEDED) retry
        with backoff for up to `wait_s` (default timeout_s), because a shard that Ray is
        restarting answers again within seconds. Raises the class the shard raised."""
        policy = dataclasses.replace(
            _RESTART, deadline_s=self.timeout_s if wait_s is None else wait_s
        )
        try:
            return policy.call(fn)
        except ShardUnavailable as e:
            raise type(e)(
                f"shard {self.address} did not answer {what} within "
                f"{self.timeout_s:.0f}s ({e}); check that its actor is alive "
                "(`engram cluster status`)"
            ) from None
        except EngramError as e:
            raise type(e)(f"{what} on shard {self.address}: {e}") from None

    def wait_ready(self, wait_s: float | None = None) -> pb.StatsResponse:
        """Block until the server answers Stats; returns that answer."""
        return self._call(lambda: self._stub.Stats(pb.StatsRequest(), timeout=5.0), "Stats", wait_s)

    def stats(self, wait_s: float | None = None) -> pb.StatsResponse:
        """Stats; with `wait_s`, give up (ShardUnavailable) after about that long."""
        rpc_timeout = self.timeout_s if wait_s is None else max(1.0, wait_s)
        return self._call(
            lambda: self._stub.Stats(pb.StatsRequest(), timeout=rpc_timeout), "Stats", wait_s
        )

    def set_state(self, state: pb.ShardState) -> pb.ShardState:
        req = pb.SetShardStateRequest(state=state)
        return self._call(
            lambda: self._stub.SetShardState(req, timeout=self.timeout_s), "SetShardState"
        ).state

    def list_tables(self) -> list[pb.TableInfo]:
        return list(
            self._call(
                lambda: self._stub.ListTables(pb.ListTablesRequest(), timeout=self.timeout_s),
                "ListTables",
            ).tables
        )

    def create_table(self, spec: pb.TableSpec) -> bool:
        """Create a table from its wire spec; False when an identical one exists already."""
        req = pb.CreateTableRequest(spec=spec)
        return self._call(
            lambda: self._stub.CreateTable(req, timeout=self.timeout_s), "CreateTable"
        ).created

    def copy_rows_to(
        self, dst: ShardAdmin, table: str, slots: bytes, batch_rows: int = 8192
    ) -> int:
        """Stream the stored rows (with optimizer state) of `slots` from this shard into `dst`.

        Importing is idempotent (a row is overwritten with the same record), so a copy that a
        restart interrupts is simply run again.
        """
        req = pb.ExportRowsRequest(table=table, slots=slots, batch_rows=batch_rows)

        def run() -> int:
            # Generous deadline: a large slot group streams for a while. A destination stages an
            # ImportRows stream in memory and stores it whole (all or nothing, bounded by its
            # max_import_bytes), so the rows go in streams of at most COPY_STREAM_BYTES / _ROWS.
            rows, part, size, count = 0, [], 0, 0
            for batch in self._stub.ExportRows(req, timeout=self.timeout_s * 20):
                n = len(batch.ids) // 8
                if part and (
                    size + len(batch.records) > COPY_STREAM_BYTES or count + n > COPY_STREAM_ROWS
                ):
                    rows += dst._stub.ImportRows(iter(part), timeout=self.timeout_s * 20).rows
                    part, size, count = [], 0, 0
                part.append(batch)
                size += len(batch.records)
                count += n
            if part:
                rows += dst._stub.ImportRows(iter(part), timeout=self.timeout_s * 20).rows
            return rows

        return self._call(run, f"ExportRows->ImportRows({table}) to {dst.address}")

    def delete_rows(self, table: str, slots: bytes) -> int:
        req = pb.DeleteRowsRequest(table=table, slots=slots)
        return self._call(
            lambda: self._stub.DeleteRows(req, timeout=self.timeout_s), "DeleteRows"
        ).rows


def shard_state(
    index: int, shard_map, frozen: bytes = b"", receiving: bytes = b""
) -> pb.ShardState:
    """The ShardState of shard `index` under `shard_map` (a routing.ShardMap), with `frozen` slots.

    `owned` is always the explicit num_slots mask (all zeros for a shard that owns nothing yet),
    never empty: an empty mask would mean a standalone shard that owns every slot. `receiving`:
    slots a reshard is copying to this shard, owned as well, since a shard takes rows (ImportRows)
    of owned slots only; no client routes them here before the map that says so is published.
    """
    owned = shard_map.owned_mask(index)
    if receiving:
        owned = bytes(a | b for a, b in zip(owned, receiving, strict=True))
    return pb.ShardState(
        shard_index=index,
        map_version=shard_map.version,
        num_slots=shard_map.num_slots,
        owned=owned,
        frozen=frozen or bytes(shard_map.num_slots),
        layout=shard_map.layout,
        shard_map_json=shard_map.to_json(),
    )


def request_totals(stats: pb.StatsResponse) -> int:
    """Lookup + push requests a shard has served since it started."""
    return sum(
        m.requests
        for m in stats.methods
        if m.method.rsplit("/", 1)[-1] in ("Lookup", "PushGradients")
    )
