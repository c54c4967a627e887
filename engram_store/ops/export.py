"""Export memory tables for inference: one safetensors file per table, every row of it.

    export_safetensors("127.0.0.1:7000", "out/")                 # from a live store
    export_safetensors(None, "out/", snapshot_dir="/backups/s1") # from a snapshot, offline

Each `<out>/<table>.safetensors` holds one tensor `weight` (num_rows, dim): row i is global row id i
(stored rows as trained, never-pushed rows their deterministic init from init.initial_rows). The
metadata says how to address it: table, num_rows, dim, head_rows / head_offsets (a hash head h owns
rows head_offsets[h] .. + head_rows[h]), layer (for tables named engram_l<layer>), the table spec,
its step, and the HashConfig JSON given with --hash-config. Load with
`safetensors.numpy.load_file(path)["weight"]`, or memory-map with `safe_open(path, "np")`.

Rows are streamed in chunks of `chunk_rows` (stored rows merged in id order from every shard), so
memory stays at a few chunks whatever the table size.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Iterator

import numpy as np

from engram_store.engine import init, kernels
from engram_store.engine.config import TableConfig
from engram_store.engine.errors import ConfigError, InvalidArgument, TableNotFound
from engram_store.rpc.config import ClientConfig

_DTYPES = {"float32": ("F32", "<f4"), "float16": ("F16", "<f2")}
_LAYER = re.compile(r"^engram_l(\d+)$")


class _Cursor:
    """Sorted (ids, float32 rows) batches of one shard, read up to a bound."""

    def __init__(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]):
        self._it = batches
        self._ids = np.empty(0, np.int64)
        self._rows = np.empty((0, 0), np.float32)  # the rows of self._ids
        self._done = False

    def take_below(self, bound: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Every remaining (ids, rows) with id < bound."""
        got_ids, got_rows = [], []
        while True:
            if self._ids.shape[0]:
                k = int(np.searchsorted(self._ids, bound))
                if k:
                    got_ids.append(self._ids[:k])
                    got_rows.append(self._rows[:k])
                    self._ids, self._rows = self._ids[k:], self._rows[k:]
                if self._ids.shape[0]:
                    break
            if self._done:
                break
            nxt = next(self._it, None)
            if nxt is None:
                self._done = True
                break
            self._ids, self._rows = nxt
        if not got_ids:
            return np.empty(0, np.int64), None
        return np.concatenate(got_ids), np.concatenate(got_rows)


def _decode(spec: TableConfig, records: np.ndarray) -> np.ndarray:
    """float32 rows of stored records (row in storage dtype, then optimizer state)."""
    return kernels.decode(np.ascontiguousarray(records[:, : spec.row_bytes]), spec.dtype, spec.dim)


def remote_records(
    channel, address: str, table: str, slots: bytes, batch_rows: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A shard's stored rows of `table` in the slots `slots` as it holds them: (ids int64,
    records uint8 (n, record_bytes): the row in storage dtype, then its optimizer state), sorted
    by id within the shard. `channel` is a grpc channel to the shard at `address`."""
    import grpc

    from engram_store.rpc.proto import store_pb2 as pb
    from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
    from engram_store.rpc.status import error_from_rpc

    stub = pb_grpc.MemoryStoreStub(channel)
    stream = stub.ExportRows(
        pb.ExportRowsRequest(table=table, slots=slots, batch_rows=batch_rows), timeout=24 * 3600
    )
    try:
        for b in stream:
            ids = np.frombuffer(b.ids, "<i8").astype(np.int64)
            yield ids, np.frombuffer(b.records, np.uint8).reshape(len(ids), b.record_bytes)
    except grpc.RpcError as e:
        raise error_from_rpc(e, f"shard {address}") from None


def _remote_batches(
    address: str, config: ClientConfig, spec: TableConfig, slots: bytes
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from engram_store.rpc.auth import open_channel

    channel = open_channel(
        address, config, [("grpc.max_receive_message_length", config.max_message_bytes)]
    )
    try:
        for ids, rec in remote_records(channel, address, spec.name, slots):
            yield ids, _decode(spec, rec)
    finally:
        channel.close()


def _snapshot_batches(
    directory: str, index: int, spec: TableConfig, num_slots: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from engram_store.ops.snapshot import open_snapshot_shard, owned_mask

    with open_snapshot_shard(directory, index) as shard:
        if spec.name not in {t.name for t in shard.tables()}:
            return
        mask = owned_mask(shard.shard_state(), num_slots)
        for ids, rec, _ in shard.export_rows(spec.name, mask, 65536):
            yield ids, _decode(spec, rec)


def _header(name: str, dtype: str, shape: tuple[int, int], metadata: dict[str, str]) -> bytes:
    """The safetensors header (8-byte length + JSON, padded to 8 bytes) of one tensor."""
    nbytes = shape[0] * shape[1] * np.dtype(_DTYPES[dtype][1]).itemsize
    head = {
        "__metadata__": metadata,
        name: {"dtype": _DTYPES[dtype][0], "shape": list(shape), "data_offsets": [0, nbytes]},
    }
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_table(
    path: str,
    spec: TableConfig,
    cursors: list[_Cursor],
    dtype: str = "float32",
    metadata: dict[str, str] | None = None,
    chunk_rows: int = 1 << 16,
) -> int:
    """Write every row of `spec` (stored rows from `cursors`, the rest initial) to a safetensors
    file at `path` (atomically); returns the number of stored rows written."""
    if dtype not in _DTYPES:
        raise InvalidArgument(
            f"export dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}"
        )
    tmp = path + ".tmp"
    stored = 0
    with open(tmp, "wb") as f:
        f.write(_header("weight", dtype, (spec.num_rows, spec.dim), metadata or {}))
        for lo in range(0, spec.num_rows, chunk_rows):
            hi = min(lo + chunk_rows, spec.num_rows)
            rows = init.initial_rows(spec, np.arange(lo, hi, dtype=np.int64))  # (n, dim)
            if spec.dtype != "float32":  # the store serves init rows rounded to storage dtype
                rows = kernels.decode(kernels.encode(rows, spec.dtype), spec.dtype, spec.dim)
            for c in cursors:
                ids, vals = c.take_below(hi)
                if vals is not None:
                    rows[ids - lo] = vals
                    stored += ids.shape[0]
            f.write(rows.astype(_DTYPES[dtype][1], copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return stored


def table_metadata(
    spec: TableConfig, step: int, hash_config: str | None = None, source: str = ""
) -> dict[str, str]:
    """The safetensors metadata (strings only) that tells an inference job how to use a table."""
    meta = {
        "format": "engram-table/1",
        "table": spec.name,
        "num_rows": str(spec.num_rows),
        "dim": str(spec.dim),
        "head_rows": json.dumps(list(spec.head_rows)),
        "head_offsets": json.dumps(list(spec.head_offsets())),
        "spec": json.dumps(spec.to_dict()),
        "step": str(step),
        "source": source,
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    layer = _LAYER.match(spec.name)
    if layer:
        meta["layer"] = layer.group(1)
    if hash_config:
        try:
            meta["hash_config"] = json.dumps(json.loads(hash_config))
        except ValueError as e:
            raise ConfigError(
                f"--hash-config is not valid JSON ({e}); give e.g. "
                '\'{"layers": [1, 15], "max_ngram": 3, "heads": 8}\''
            ) from None
    return meta


def export_safetensors(
    target,
    out_dir: str,
    tables: list[str] | None = None,
    dtype: str = "float32",
    hash_config: str | None = None,
    snapshot_dir: str | None = None,
    config: ClientConfig | None = None,
    chunk_rows: int = 1 << 16,
) -> list[str]:
    """Write `<out_dir>/<table>.safetensors` for each table (default: all) of a live store
    (`target`: StoreClient or a shard's "host:port") or of a snapshot directory; returns paths.

    From a live store each shard's rows are read from one LMDB transaction, but shards are read
    one after another: export a snapshot (or a quiet store) for a single point in training.
    """
    from engram_store.engine.routing import ShardMap

    if (target is None) == (snapshot_dir is None):
        raise ConfigError("export needs exactly one source: --address or --from SNAPSHOT_DIR")
    if snapshot_dir is not None:
        from engram_store.ops.snapshot import load_manifest

        manifest = load_manifest(snapshot_dir)
        specs = {n: TableConfig.from_dict(d) for n, d in manifest["tables"].items()}
        steps = manifest["steps"]
        num_slots = manifest["shard_map"]["num_slots"]
        n_shards = manifest["num_shards"]
        source = os.path.abspath(snapshot_dir)

        def cursors(spec: TableConfig) -> list[_Cursor]:
            return [
                _Cursor(_snapshot_batches(snapshot_dir, i, spec, num_slots))
                for i in range(n_shards)
            ]
    else:
        from engram_store.rpc.client import StoreClient

        client = (
            target
            if isinstance(target, StoreClient)
            else StoreClient(target, config or ClientConfig())
        )
        try:
            infos = {t.spec.name: t for t in client.list_tables()}
            smap: ShardMap = client.refresh_map()
        finally:
            if client is not target:
                client.close()
        cfg = client.config
        specs = {n: t.spec for n, t in infos.items()}
        steps = {n: t.step for n, t in infos.items()}
        source = ",".join(smap.addresses)

        def cursors(spec: TableConfig) -> list[_Cursor]:
            out = []
            for i, address in enumerate(smap.addresses):
                # a shard exports only the slots it owns: mid-reshard copies are not doubled
                slots = smap.owned_mask(i) if smap.num_shards > 1 else b"\x01"
                out.append(_Cursor(_remote_batches(address, cfg, spec, slots)))
            return out

    names = tables or sorted(specs)
    missing = [n for n in names if n not in specs]
    if missing:
        raise TableNotFound(f"no table {missing[0]!r} in the store; it has {sorted(specs)}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in names:  # one table at a time: memory holds a few chunks of one table
        spec = specs[name]
        path = os.path.join(out_dir, f"{name}.safetensors")
        write_table(
            path,
            spec,
            cursors(spec),
            dtype,
            table_metadata(spec, int(steps.get(name, 0)), hash_config, source),
            chunk_rows,
        )
        paths.append(path)
    return paths
