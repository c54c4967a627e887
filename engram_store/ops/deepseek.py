"""DeepSeek-V4.1-class Engram tables in and out of the store, in the checkpoint's own layout.

    import_checkpoint(client, "DeepSeek-V4.1-Flash/", {1: spec_l1, 14: spec_l14}, "progress.json")
    export_checkpoint(client, "out/", {1: "engram_l1", 14: "engram_l14"})

The checkpoint holds, per Engram layer L, `layers.{L}.engram.embed.weight` F8_E4M3 [rows, dim]
and `layers.{L}.engram.embed.scale` F8_E8M0 [rows, dim / 32]: value j of a row is
e4m3(weight[j]) * 2^(scale[j // 32] - 127). Row r of the tensors is global row r of the layer's
concatenated table (docs/algorithm.md step 5), so a table `engram_l{L}` of the layer's preset has
exactly `rows` rows.

Import streams the two tensors in chunks (os.pread, bounded memory), turns each chunk into store
records (float8_e4m3 tables keep the bytes as they are: a row is its dim codes then its dim / 32
scales; bfloat16 / float16 / float32 tables get the dequantized values), routes every row to the
shard that owns it, and sends each shard its rows over a parallel ImportRows stream. Rows go in
segments; after a segment every shard has committed it, and the segment is recorded in a progress
file, so an interrupted import resumes at the first segment not recorded. At the end the stored
row count and an order-independent checksum of (row id, stored row bytes), read back from every
shard, are compared with what was sent.

The checkpoint is checked before anything is stored: both tensors of every layer present, with
the right dtypes and shapes, and every file as long as its header says (a truncated file is
refused with the tensor that does not fit named). NaN codes are refused chunk by chunk (the rows
before stay, and the import resumes once the checkpoint is fixed).

Export writes the tables back as `layers.{L}.engram.embed.{weight,scale}` (one file per layer and
a model.safetensors.index.json): a float8_e4m3 table's stored bytes as they are, so import ->
export is byte-identical, and any other table quantised with the engine's fp8 encoder (one
power-of-two scale per 32 values).
"""

from __future__ import annotations

import json
import os
import queue
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from engram_store.engine import init, kernels
from engram_store.engine.config import FP8_BLOCK, TableConfig
from engram_store.engine.errors import ConfigError, EngramError, InvalidArgument
from engram_store.engine.routing import ShardMap, fmix64
from engram_store.ops.safetensors_io import Checkpoint, TensorInfo

WEIGHT = "layers.{layer}.engram.embed.weight"
SCALE = "layers.{layer}.engram.embed.scale"
WEIGHT_DTYPE, SCALE_DTYPE = "F8_E4M3", "F8_E8M0"
_LAYER = re.compile(r"^layers\.(\d+)\.engram\.embed\.weight$")
_BATCH_BYTES = 4 << 20  # records per ImportRows message: a few MB keeps the streams flowing
PROGRESS_FORMAT = "engram-import/1"


def weight_name(layer: int) -> str:
    """The checkpoint's name of a layer's fp8 row codes."""
    return WEIGHT.format(layer=layer)


def scale_name(layer: int) -> str:
    """The checkpoint's name of a layer's e8m0 block scales."""
    return SCALE.format(layer=layer)


def checkpoint_layers(ckpt: Checkpoint) -> list[int]:
    """The Engram layers a checkpoint holds weights for, ascending."""
    return sorted(int(m.group(1)) for n in ckpt.tensors if (m := _LAYER.match(n)))


# ---------------------------------------------------------------- fp8 codes


def _nan_row(codes: np.ndarray, scales: np.ndarray) -> tuple[int, str] | None:
    """(first row, which tensor) holding a NaN code, or None."""
    bad = ((codes & 0x7F) == 0x7F).any(axis=1)
    if bad.any():
        return int(np.argmax(bad)), "weight"
    bad = (scales == 0xFF).any(axis=1)
    if bad.any():
        return int(np.argmax(bad)), "scale"
    return None


# ---------------------------------------------------------------- records and checksums

_G = np.uint64(0x9E3779B97F4A7C15)
_WORD_MULT = fmix64(np.arange(1, 4097, dtype=np.uint64)) | np.uint64(1)  # odd, one per word


def row_digest(ids: np.ndarray, rows: np.ndarray) -> int:
    """Order-independent checksum of (row id, row bytes) pairs: the sum, mod 2^64, of a 64-bit
    hash per row. Equal for the same rows sent in any order or split over any shards."""
    n, rb = rows.shape
    if n == 0:
        return 0
    pad = -rb % 8
    raw = np.ascontiguousarray(rows, dtype=np.uint8)
    if pad:
        raw = np.concatenate([raw, np.zeros((n, pad), np.uint8)], axis=1)
    words = raw.view("<u8")  # (n, w)
    with np.errstate(over="ignore"):
        acc = (words * _WORD_MULT[: words.shape[1]]).sum(axis=1, dtype=np.uint64)
        h = fmix64(fmix64(ids.astype(np.uint64) * _G) ^ acc)
        return int(h.sum(dtype=np.uint64))


def _add(a: int, b: int) -> int:
    return (a + b) & 0xFFFFFFFFFFFFFFFF


def storage_rows(spec: TableConfig, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Rows in the table's storage dtype as bytes, uint8 (n, spec.row_bytes): a float8_e4m3
    row is its codes then its scales; other dtypes hold the dequantized values."""
    fp8 = np.concatenate([codes, scales], axis=1)
    if spec.dtype == "float8_e4m3":
        return fp8
    out = np.empty((codes.shape[0], spec.row_bytes), np.uint8)
    return kernels.convert(fp8, "float8_e4m3", spec.dtype, spec.dim, out)


def records(spec: TableConfig, rows: np.ndarray) -> np.ndarray:
    """ImportRows records (n, row_bytes + 4 * state_floats): the rows, then the optimizer state
    a never-pushed row starts with."""
    if not spec.state_floats:
        return rows
    state = init.initial_state(spec, rows.shape[0]).view(np.uint8)
    return np.concatenate([rows, state], axis=1)


# ---------------------------------------------------------------- checking a checkpoint


@dataclass(frozen=True)
class LayerSource:
    """One layer's two tensors, checked against the table they go to."""

    layer: int
    spec: TableConfig
    weight: TensorInfo
    scale: TensorInfo


def check_layer(ckpt: Checkpoint, layer: int, spec: TableConfig) -> LayerSource:
    """The layer's weight and scale tensors, or InvalidArgument naming the tensor and the fix."""
    if spec.dim % FP8_BLOCK:
        raise InvalidArgument(
            f"table {spec.name!r}: dim={spec.dim} is not a multiple of {FP8_BLOCK}; "
            "fp8 rows carry one scale per 32 values"
        )
    w, s = weight_name(layer), scale_name(layer)
    weight = ckpt.tensor(w)
    if s not in ckpt.tensors:
        raise InvalidArgument(
            f"checkpoint {ckpt.root} has {w} but no {s}: the {SCALE_DTYPE} scales (one per "
            f"{FP8_BLOCK} values) without which the {WEIGHT_DTYPE} rows mean nothing"
        )
    scale = ckpt.tensor(s)
    want = {
        w: (WEIGHT_DTYPE, (spec.num_rows, spec.dim)),
        s: (SCALE_DTYPE, (spec.num_rows, spec.dim // FP8_BLOCK)),
    }
    for info in (weight, scale):
        dtype, shape = want[info.name]
        if info.dtype != dtype:
            raise InvalidArgument(
                f"tensor {info.name} is {info.dtype}; a DeepSeek-V4.1 Engram table stores "
                f"{dtype} there (is this the checkpoint of another model?)"
            )
        if info.shape != shape:
            raise InvalidArgument(
                f"tensor {info.name} has shape {list(info.shape)}; table {spec.name!r} needs "
                f"{list(shape)} ({spec.num_rows} rows: the sum of the layer's head primes). "
                "Check --preset (or the table's head rows) against the checkpoint"
            )
    return LayerSource(layer, spec, weight, scale)


# ---------------------------------------------------------------- progress record


class Progress:
    """The progress file of one import: what it imports, which segments every shard committed,
    and the running checksum per table. Rewritten atomically after each segment."""

    def __init__(self, path: str, identity: dict):
        self.path = path
        self.identity = json.loads(json.dumps(identity))  # as the file holds it (lists, str keys)
        self.tables: dict[str, dict] = {}
        self.verified = False

    @classmethod
    def open(cls, path: str, identity: dict, restart: bool) -> Progress:
        p = cls(path, identity)
        if restart or not os.path.exists(path):
            return p
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"progress file {path} is unreadable ({e}); pass --restart to import from the start"
            ) from None
        if doc.get("format") != PROGRESS_FORMAT:
            raise ConfigError(
                f"{path} is not an engram import progress file; give another --progress"
            )
        for key, value in p.identity.items():
            if doc.get(key) != value:
                raise ConfigError(
                    f"progress file {path} records an import with a different {key} "
                    "(checkpoint files, tables, shard addresses or segment_rows); pass --restart "
                    "to start over, or give this import its own --progress"
                )
        p.tables = doc.get("done", {})
        p.verified = bool(doc.get("verified", False))
        return p

    def table(self, name: str) -> dict:
        return self.tables.setdefault(name, {"segments": [], "checksum": "0", "rows": 0})

    def save(self) -> None:
        doc = {
            "format": PROGRESS_FORMAT,
            **self.identity,
            "done": self.tables,
            "verified": self.verified,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- the shards


class _Shards:
    """One channel and stub per shard of the map, for ImportRows and ExportRows."""

    def __init__(self, smap: ShardMap, config) -> None:
        from engram_store.rpc.auth import open_channel
        from engram_store.rpc.proto import store_pb2_grpc as pb_grpc

        self.map = smap
        opts = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ]
        self.channels = [open_channel(a, config, opts) for a in smap.addresses]
        self.stubs = [pb_grpc.MemoryStoreStub(c) for c in self.channels]

    def owner(self, table: str, ids: np.ndarray) -> np.ndarray:
        if self.map.num_shards == 1:
            return np.zeros(ids.shape[0], np.int64)
        return self.map.shard_of(table, ids)

    def close(self) -> None:
        for c in self.channels:
            c.close()


def _stream(q: queue.Queue) -> Iterator:
    while True:
        item = q.get()
        if item is None:
            return
        yield item


def _import_segment(
    shards: _Shards, src: LayerSource, lo: int, hi: int, chunk_rows: int, batch_rows: int
) -> tuple[int, int]:
    """Send rows [lo, hi) of one layer to their shards in parallel: (rows acknowledged, digest)."""
    import grpc

    from engram_store.rpc import wire
    from engram_store.rpc.proto import store_pb2 as pb
    from engram_store.rpc.status import error_from_rpc

    spec = src.spec
    n_sh = len(shards.stubs)
    queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _ in range(n_sh)]
    calls = [
        stub.ImportRows.future(_stream(q), timeout=24 * 3600)
        for stub, q in zip(shards.stubs, queues, strict=True)
    ]
    digest = 0

    def put(s: int, item) -> None:
        while True:  # never block forever on a shard whose stream already failed
            try:
                queues[s].put(item, timeout=0.5)
                return
            except queue.Full:
                if calls[s].done():
                    return

    try:
        for clo in range(lo, hi, chunk_rows):
            chi = min(clo + chunk_rows, hi)
            codes = Checkpoint.read_rows(src.weight, clo, chi)
            scales = Checkpoint.read_rows(src.scale, clo, chi)
            bad = _nan_row(codes, scales)
            if bad is not None:
                name = src.weight.name if bad[1] == "weight" else src.scale.name
                raise InvalidArgument(
                    f"tensor {name} row {clo + bad[0]} holds a NaN code; fix the checkpoint "
                    "(rows before it are stored, and the import resumes from its last segment)"
                )
            rows = storage_rows(spec, codes, scales)
            ids = np.arange(clo, chi, dtype=np.int64)
            digest = _add(digest, row_digest(ids, rows))
            rec = records(spec, rows)
            owner = shards.owner(spec.name, ids)
            for s in range(n_sh):
                sel = np.flatnonzero(owner == s) if n_sh > 1 else slice(None)
                sids, srec = ids[sel], rec[sel]
                for b in range(0, sids.shape[0], batch_rows):
                    put(
                        s,
                        pb.RowBatch(
                            table=spec.name,
                            ids=wire.pack_ids(sids[b : b + batch_rows]),
                            records=np.ascontiguousarray(srec[b : b + batch_rows]).tobytes(),
                            record_bytes=srec.shape[1],
                            step=0,
                        ),
                    )
            if any(c.done() for c in calls):  # a stream ended early: it failed; say why below
                break
    finally:
        for s in range(n_sh):
            put(s, None)
    total = 0
    for s, call in enumerate(calls):
        try:
            total += call.result().rows
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"ImportRows to shard {shards.map.addresses[s]}") from None
    return total, digest


def _stored_digest(shards: _Shards, spec: TableConfig) -> int:
    """row_digest over every stored row of a table, read back from the shards that own them."""
    from engram_store.ops.export import remote_records

    out = 0
    for i, address in enumerate(shards.map.addresses):
        slots = shards.map.owned_mask(i) if shards.map.num_shards > 1 else b"\x01"
        for ids, rec in remote_records(shards.channels[i], address, spec.name, slots):
            out = _add(out, row_digest(ids, rec[:, : spec.row_bytes]))
    return out


# ---------------------------------------------------------------- import


def import_checkpoint(
    client,
    checkpoint: str,
    specs: Mapping[int, TableConfig],
    progress_path: str,
    restart: bool = False,
    chunk_rows: int = 1 << 15,
    segment_rows: int = 1 << 20,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Import the Engram layers `specs` ({layer: table}) of a checkpoint into a store.

    client: a StoreClient (its shard map routes the rows). The tables are created if absent (an
    existing table must have the same spec). on_progress(table, rows done, rows total) is called
    after every segment. Returns per table: rows, rows_resumed (skipped: done before), seconds,
    rows_per_s, checksum, stored_rows, verified; raises InvalidArgument before storing anything
    when the checkpoint does not fit the tables.
    """
    if chunk_rows <= 0 or segment_rows <= 0:
        raise InvalidArgument("chunk_rows and segment_rows must be > 0")
    ckpt = Checkpoint.open(checkpoint)
    sources = [check_layer(ckpt, layer, spec) for layer, spec in specs.items()]
    smap = client.refresh_map()
    identity = {
        "checkpoint": ckpt.identity(),
        "tables": {s.spec.name: s.spec.to_dict() for s in sources},
        "addresses": list(smap.addresses),
        "segment_rows": segment_rows,
    }
    progress = Progress.open(progress_path, identity, restart)
    for src in sources:
        client.create_table(src.spec)  # idempotent; TableExists if another spec holds the name
    progress.save()
    shards = _Shards(smap, client.config)
    summary: dict[str, dict] = {}
    try:
        for src in sources:
            spec = src.spec
            state = progress.table(spec.name)
            done = set(state["segments"])
            rec_bytes = spec.row_bytes + 4 * spec.state_floats
            batch_rows = max(1, min(client.config.max_batch_rows, _BATCH_BYTES // rec_bytes))
            n_seg = -(-spec.num_rows // segment_rows)
            resumed = sum(min(segment_rows, spec.num_rows - k * segment_rows) for k in done)
            t0, sent = time.perf_counter(), 0
            for k in range(n_seg):
                if k in done:
                    continue
                lo, hi = k * segment_rows, min((k + 1) * segment_rows, spec.num_rows)
                acked, digest = _import_segment(shards, src, lo, hi, chunk_rows, batch_rows)
                if acked != hi - lo:
                    raise EngramError(
                        f"table {spec.name}: the shards acknowledged {acked} of rows "
                        f"[{lo}, {hi}) ({hi - lo}); run the import again to resend them"
                    )
                state["segments"].append(k)
                state["checksum"] = str(_add(int(state["checksum"]), digest))
                state["rows"] += acked
                progress.save()
                sent += acked
                if on_progress is not None:
                    on_progress(spec.name, resumed + sent, spec.num_rows)
            seconds = time.perf_counter() - t0
            summary[spec.name] = {
                "layer": src.layer,
                "rows": spec.num_rows,
                "rows_sent": sent,
                "rows_resumed": resumed,
                "seconds": round(seconds, 3),
                "rows_per_s": round(sent / seconds) if sent and seconds > 0 else None,
                "checksum": state["checksum"],
            }
        for src in sources:  # verify: counts, then the checksum of what the shards hold
            spec = src.spec
            stored = client.table_info(spec.name).stored_rows
            got = _stored_digest(shards, spec)
            want = int(progress.table(spec.name)["checksum"])
            if stored != spec.num_rows or got != want:
                raise EngramError(
                    f"table {spec.name}: verification failed: {stored} rows stored of "
                    f"{spec.num_rows}, checksum {got:#x} read back vs {want:#x} sent. Rows "
                    "changed during the import? Run it again with --restart"
                )
            summary[spec.name].update(stored_rows=stored, verified=True)
        progress.verified = True
        progress.save()
    finally:
        shards.close()
    return summary


# ---------------------------------------------------------------- export


def layer_file(layer: int) -> str:
    """The file export_checkpoint writes a layer's two tensors to."""
    return f"engram-layer-{layer}.safetensors"


def export_checkpoint(
    client, out_dir: str, tables: Mapping[int, str], chunk_rows: int = 1 << 16
) -> list[str]:
    """Write each table of `tables` ({layer: table name}) of a live store as the checkpoint's
    `layers.{L}.engram.embed.weight` F8_E4M3 [rows, dim] + `...scale` F8_E8M0 [rows, dim / 32]
    in `<out_dir>/engram-layer-<L>.safetensors`, and a model.safetensors.index.json naming them.

    Every row is written (never-pushed rows as the store serves them), streamed in id order in
    chunks of `chunk_rows`. A float8_e4m3 table's bytes are written as stored (import -> export
    is byte-identical); other tables are quantised by kernels.encode (amax per block of 32,
    scale 2^ceil(log2(amax / 448)), e4m3 codes rounded to nearest even). Returns the paths.
    """
    from engram_store.engine.errors import TableNotFound
    from engram_store.ops.export import _Cursor, remote_records
    from engram_store.ops.safetensors_io import SafetensorsWriter, write_index

    if chunk_rows <= 0:
        raise InvalidArgument(f"chunk_rows={chunk_rows} must be > 0")
    specs = {t.spec.name: t.spec for t in client.list_tables()}
    missing = [n for n in tables.values() if n not in specs]
    if missing:
        raise TableNotFound(f"no table {missing[0]!r} in the store; it has {sorted(specs)}")
    for name in tables.values():
        if specs[name].dim % FP8_BLOCK:
            raise InvalidArgument(
                f"table {name!r} has dim {specs[name].dim}: the checkpoint layout needs a "
                f"multiple of {FP8_BLOCK} (one e8m0 scale per {FP8_BLOCK} values)"
            )
    os.makedirs(out_dir, exist_ok=True)
    shards = _Shards(client.refresh_map(), client.config)
    paths, weight_map, total = [], {}, 0
    try:
        for layer, name in tables.items():
            spec = specs[name]
            dim, rows_n = spec.dim, spec.num_rows
            w, s = weight_name(layer), scale_name(layer)
            cursors = [
                _Cursor(
                    (ids, rec[:, : spec.row_bytes])
                    for ids, rec in remote_records(
                        shards.channels[i],
                        address,
                        name,
                        shards.map.owned_mask(i) if shards.map.num_shards > 1 else b"\x01",
                    )
                )
                for i, address in enumerate(shards.map.addresses)
            ]
            path = os.path.join(out_dir, layer_file(layer))
            meta = {
                "format": "engram-deepseek/1",
                "table": name,
                "spec": json.dumps(spec.to_dict()),
            }
            tensors = [
                (w, WEIGHT_DTYPE, (rows_n, dim)),
                (s, SCALE_DTYPE, (rows_n, dim // FP8_BLOCK)),
            ]
            with SafetensorsWriter(path, tensors, meta) as out:
                for lo in range(0, rows_n, chunk_rows):
                    hi = min(lo + chunk_rows, rows_n)
                    rows = np.empty((hi - lo, spec.row_bytes), np.uint8)
                    have = np.zeros(hi - lo, bool)
                    for c in cursors:
                        ids, got = c.take_below(hi)
                        if got is not None:
                            rows[ids - lo] = got
                            have[ids - lo] = True
                    if not have.all():  # never-stored rows: what the store serves for them
                        fresh = np.flatnonzero(~have)
                        rows[fresh] = kernels.encode(
                            init.initial_rows(spec, fresh + lo), spec.dtype
                        )
                    if spec.dtype != "float8_e4m3":
                        fp8 = np.empty((hi - lo, dim + dim // FP8_BLOCK), np.uint8)
                        rows = kernels.convert(rows, spec.dtype, "float8_e4m3", dim, fp8)
                    out.write_rows(w, lo, rows[:, :dim])
                    out.write_rows(s, lo, rows[:, dim:])
            paths.append(path)
            weight_map.update({w: layer_file(layer), s: layer_file(layer)})
            total += rows_n * (dim + dim // FP8_BLOCK)
    finally:
        shards.close()
    write_index(out_dir, weight_map, total)
    return paths
