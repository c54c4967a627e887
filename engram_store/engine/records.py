"""The shard's on-disk records: push-log entries and checkpoint chunks, each checksummed.

Both live in the shard's LMDB environment (docs/design.md "Storage"):

- **Log** (sub-database `log`): one entry per acknowledged write, appended with MDB_APPEND under
  the key `seq (8 bytes, big-endian) + part (1 byte)`: part 0 is the header, part 1 the payload
  (two values, so a 17 MB payload goes into LMDB straight from the buffer it was built in).
  Kinds: PUSH (distinct ids int64, then their float32 gradients), IMPORT (ids, then records: row in
  the storage dtype + float32 state), DELETE (a num_slots flag mask).
- **Checkpoint chunks** (sub-database `chunks`): the dense arrays of a table cut into fixed
  offset ranges, key `table uid (4 bytes) + chunk index (4 bytes)`, value header + ids_of + rows +
  state of those offsets, as of log sequence `lsn` (every entry <= lsn applied, none after).

A header carries the payload's checksum and its own, so a flipped bit, a short value or a value
from another place is found when it is read, and the error names what is wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from engram_store.engine import kernels
from engram_store.engine.errors import DataCorrupted

PUSH, IMPORT, DELETE = 1, 2, 3
KINDS = {PUSH: "push", IMPORT: "import", DELETE: "delete"}

# magic, version, kind, uid, n, step, seq, payload bytes, payload checksum, request-id bytes
_LOG = struct.Struct("<4sBBIIqQQQH")
_LOG_MAGIC = b"EGLG"
_CHUNK = struct.Struct("<4sBIIIIIqQQ")  # magic, version, uid, chunk, rows, row_bytes, state, lsn,
_CHUNK_MAGIC = b"EGCK"  # payload bytes, payload checksum
_SUM = struct.Struct("<Q")
VERSION = 1


def log_key(seq: int, part: int) -> bytes:
    return struct.pack(">QB", seq, part)


def key_seq(key: bytes) -> tuple[int, int]:
    seq, part = struct.unpack(">QB", key)
    return int(seq), int(part)


def chunk_key(uid: int, chunk: int) -> bytes:
    return struct.pack(">II", uid, chunk)


@dataclass(frozen=True)
class LogHeader:
    kind: int
    uid: int  # the table's incarnation: a dropped and recreated table gets a new one
    n: int  # ids in the payload (DELETE: mask bytes)
    step: int
    seq: int
    payload_bytes: int
    payload_sum: int
    request_id: str

    def pack(self) -> bytes:
        rid = self.request_id.encode()
        head = _LOG.pack(
            _LOG_MAGIC,
            VERSION,
            self.kind,
            self.uid,
            self.n,
            self.step,
            self.seq,
            self.payload_bytes,
            self.payload_sum,
            len(rid),
        )
        body = head + rid
        return body + _SUM.pack(kernels.checksum(body))

    @classmethod
    def unpack(cls, raw: bytes | memoryview, where: str) -> LogHeader:
        raw = bytes(raw)
        if len(raw) < _LOG.size + _SUM.size:
            raise DataCorrupted(f"{where}: log header of {len(raw)} bytes is truncated")
        body, (want,) = raw[: -_SUM.size], _SUM.unpack(raw[-_SUM.size :])
        if kernels.checksum(body) != want:
            raise DataCorrupted(f"{where}: log header checksum mismatch")
        magic, version, kind, uid, n, step, seq, pbytes, psum, rlen = _LOG.unpack_from(body)
        if magic != _LOG_MAGIC or version != VERSION or kind not in KINDS:
            raise DataCorrupted(f"{where}: not a log header of format {VERSION}")
        if len(body) != _LOG.size + rlen:
            raise DataCorrupted(f"{where}: log header has a wrong request-id length")
        rid = body[_LOG.size :].decode()
        return cls(kind, uid, n, step, seq, pbytes, psum, rid)

    def check_payload(self, payload: bytes | memoryview, where: str) -> None:
        if len(payload) != self.payload_bytes:
            raise DataCorrupted(
                f"{where}: {KINDS[self.kind]} payload has {len(payload)} bytes, its header "
                f"says {self.payload_bytes}"
            )
        if kernels.checksum(payload) != self.payload_sum:
            raise DataCorrupted(f"{where}: {KINDS[self.kind]} payload checksum mismatch")


@dataclass(frozen=True)
class ChunkHeader:
    uid: int
    chunk: int
    rows: int  # offsets in this chunk (the last chunk of a table may be short)
    row_bytes: int
    state_floats: int
    lsn: int
    payload_bytes: int
    payload_sum: int

    @property
    def size(self) -> int:
        return _CHUNK.size + _SUM.size


def pack_chunk(
    uid: int, chunk: int, lsn: int, ids: np.ndarray, rows: np.ndarray, state: np.ndarray
) -> bytes:
    """One checkpoint chunk value: header, then ids_of, rows and state of its offsets."""
    payload = b"".join(
        (
            np.ascontiguousarray(ids, "<i8").tobytes(),
            np.ascontiguousarray(rows).tobytes(),
            np.ascontiguousarray(state, "<f4").tobytes(),
        )
    )
    head = _CHUNK.pack(
        _CHUNK_MAGIC,
        VERSION,
        uid,
        chunk,
        ids.shape[0],
        rows.shape[1],
        state.shape[1],
        lsn,
        len(payload),
        kernels.checksum(payload),
    )
    return head + _SUM.pack(kernels.checksum(head)) + payload


def unpack_chunk(
    raw: bytes | memoryview, where: str, row_bytes: int, state_floats: int
) -> tuple[ChunkHeader, np.ndarray, np.ndarray, np.ndarray]:
    """(header, ids, rows, state) of a chunk value, checked; views of `raw`."""
    mv = memoryview(raw)
    hs = _CHUNK.size + _SUM.size
    if len(mv) < hs:
        raise DataCorrupted(f"{where}: checkpoint chunk of {len(mv)} bytes is truncated")
    head = bytes(mv[: _CHUNK.size])
    (want,) = _SUM.unpack(mv[_CHUNK.size : hs])
    if kernels.checksum(head) != want:
        raise DataCorrupted(f"{where}: checkpoint chunk header checksum mismatch")
    magic, version, uid, chunk, n, rb, sf, lsn, pbytes, psum = _CHUNK.unpack(head)
    if magic != _CHUNK_MAGIC or version != VERSION:
        raise DataCorrupted(f"{where}: not a checkpoint chunk of format {VERSION}")
    if (rb, sf) != (row_bytes, state_floats):
        raise DataCorrupted(
            f"{where}: chunk rows are {rb} + {sf} * 4 bytes, the table's {row_bytes} + "
            f"{state_floats} * 4"
        )
    payload = mv[hs:]
    if len(payload) != pbytes or pbytes != n * (8 + rb + 4 * sf):
        raise DataCorrupted(f"{where}: checkpoint chunk payload is truncated")
    if kernels.checksum(payload) != psum:
        raise DataCorrupted(f"{where}: checkpoint chunk payload checksum mismatch")
    buf = np.frombuffer(payload, np.uint8)
    ids = buf[: 8 * n].view("<i8")
    rows = buf[8 * n : n * (8 + rb)].reshape(n, rb)
    state = buf[n * (8 + rb) :].view("<f4").reshape(n, sf)
    return ChunkHeader(uid, chunk, n, rb, sf, lsn, pbytes, psum), ids, rows, state


def pack_lsns(lsns: np.ndarray) -> bytes:
    """A table's per-chunk checkpoint sequence numbers, checksummed."""
    raw = np.ascontiguousarray(lsns, "<i8").tobytes()
    return raw + _SUM.pack(kernels.checksum(raw))


def unpack_lsns(raw: bytes, where: str) -> np.ndarray:
    if len(raw) < _SUM.size or (len(raw) - _SUM.size) % 8:
        raise DataCorrupted(f"{where}: chunk sequence table is truncated")
    body, (want,) = raw[: -_SUM.size], _SUM.unpack(raw[-_SUM.size :])
    if kernels.checksum(body) != want:
        raise DataCorrupted(f"{where}: chunk sequence table checksum mismatch")
    return np.frombuffer(body, "<i8").copy()
