"""Streaming safetensors: read row ranges of tensors and write tensors row range by row range.

    ckpt = Checkpoint.open("DeepSeek-V4.1-Flash/")        # model.safetensors.index.json or *.safetensors
    w = ckpt.tensor("layers.1.engram.embed.weight")       # TensorInfo: dtype F8_E4M3, shape, file
    rows = ckpt.read_rows(w, 0, 65536)                    # uint8 (65536, 256), one pread

    with SafetensorsWriter(path, [("x", "F8_E4M3", (n, 256))], {"k": "v"}) as out:
        out.write_rows("x", lo, chunk)                    # any order, each range once

A checkpoint of a V4.1-class model is hundreds of GB, so nothing here reads or builds a whole
tensor: rows are read with os.pread into a buffer of the chunk's size, and written with os.pwrite
at their place in a file whose header (and so layout) is written first. Only numpy and the stdlib:
a store node installs neither torch nor the safetensors package.

The format (the safetensors specification): 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
data; offsets are relative to the first data byte. Every header is checked against the file's
size when it is opened, so a truncated file is refused before any row is read, with the tensor
that does not fit named.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from engram_store.engine.errors import InvalidArgument

#: dtype name -> bytes per element, for the dtypes this project reads and writes
ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8}
#: the numpy dtype a tensor's raw elements are read as (fp8 and bf16 as their bits)
NUMPY = {
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E8M0": np.dtype(np.uint8),
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
}
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # the safetensors library's own bound on a header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: file, absolute offset of its first byte, length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index of the first axis)."""
        return self.nbytes // self.rows if self.rows else 0


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({name: TensorInfo}, metadata) of one safetensors file, checked against its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InvalidArgument(f"{path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise InvalidArgument(
                    f"{path}: header length {n} does not fit the file ({size} bytes): "
                    "the file is truncated or not safetensors"
                )
            text = f.read(n)
    except OSError as e:
        raise InvalidArgument(f"cannot read checkpoint file {path}: {e}") from None
    try:
        header = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path}: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(
                f"{path}: tensor {name!r} has no valid dtype/shape/data_offsets"
            ) from None
        if dtype in ITEMSIZE and end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise InvalidArgument(
                f"{path}: tensor {name!r} {dtype} {list(shape)} needs "
                f"{math.prod(shape) * ITEMSIZE[dtype]} bytes, its offsets give {end - begin}"
            )
        if not 0 <= begin <= end or base + end > size:
            raise InvalidArgument(
                f"{path}: tensor {name!r} ends at byte {base + end} but the file has {size}: "
                "the file is truncated; download or copy it again"
            )
        out[name] = TensorInfo(name, dtype, shape, path, base + begin, end - begin)
    return out, {str(k): str(v) for k, v in meta.items()}


class Checkpoint:
    """The tensors of a checkpoint directory (or of one .safetensors file), by name."""

    def __init__(self, root: str, tensors: Mapping[str, TensorInfo], metadata: dict[str, str]):
        self.root = root
        self.tensors = dict(tensors)
        self.metadata = metadata

    @classmethod
    def open(cls, path: str) -> Checkpoint:
        """Read the index (model.safetensors.index.json) or every *.safetensors header.

        With an index, the tensors are those its weight_map names, each from its file; without,
        every tensor of every file (a name in two files is refused)."""
        if os.path.isfile(path):
            return cls(path, *read_header(path))
        if not os.path.isdir(path):
            raise InvalidArgument(f"checkpoint {path} is neither a directory nor a file")
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            return cls._from_index(path, index)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise InvalidArgument(f"checkpoint {path} has no {INDEX} and no *.safetensors file")
        tensors: dict[str, TensorInfo] = {}
        meta: dict[str, str] = {}
        for f in files:
            found, m = read_header(os.path.join(path, f))
            for name, info in found.items():
                if name in tensors:
                    raise InvalidArgument(
                        f"tensor {name!r} is in both {tensors[name].path} and {info.path}; "
                        f"give the checkpoint's {INDEX}"
                    )
                tensors[name] = info
            meta.update(m)
        return cls(path, tensors, meta)

    @classmethod
    def _from_index(cls, root: str, index: str) -> Checkpoint:
        try:
            with open(index) as f:
                doc = json.load(f)
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(
                f"{index}: not a safetensors index with a weight_map ({e})"
            ) from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, file in weight_map.items():
            fpath = os.path.join(root, str(file))
            if fpath not in headers:
                if not os.path.isfile(fpath):
                    raise InvalidArgument(
                        f"{index} puts tensor {name!r} in {file}, which is missing"
                    )
                headers[fpath] = read_header(fpath)[0]
            if name not in headers[fpath]:
                raise InvalidArgument(f"{index} puts tensor {name!r} in {file}, which lacks it")
            tensors[name] = headers[fpath][name]
        meta = {str(k): str(v) for k, v in (doc.get("metadata") or {}).items()}
        return cls(root, tensors, meta)

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called `name`; InvalidArgument naming it (and its neighbours) if absent."""
        info = self.tensors.get(name)
        if info is None:
            stem = name.rsplit(".", 1)[0]
            near = sorted(n for n in self.tensors if n.startswith(stem))[:4]
            raise InvalidArgument(
                f"checkpoint {self.root} has no tensor {name!r}"
                + (f" (it has {near})" if near else "")
            )
        return info

    def identity(self) -> dict[str, list[int]]:
        """{file: [size, mtime_ns]} of the files holding tensors: what a resumed import checks."""
        out = {}
        for path in sorted({t.path for t in self.tensors.values()}):
            st = os.stat(path)
            out[os.path.relpath(path, self.root) if os.path.isdir(self.root) else path] = [
                st.st_size,
                st.st_mtime_ns,
            ]
        return out

    @staticmethod
    def read_rows(info: TensorInfo, lo: int, hi: int) -> np.ndarray:
        """Raw bytes of rows [lo, hi) of a tensor: uint8 (hi - lo, row_bytes), one pread."""
        if not 0 <= lo <= hi <= info.rows:
            raise InvalidArgument(f"rows [{lo}, {hi}) outside tensor {info.name!r} ({info.rows})")
        rb = info.row_bytes
        buf = np.empty((hi - lo) * rb, np.uint8)
        want = buf.nbytes
        fd = os.open(info.path, os.O_RDONLY)
        try:
            got = _pread_into(fd, buf, info.offset + lo * rb)
        finally:
            os.close(fd)
        if got != want:
            raise InvalidArgument(
                f"{info.path}: tensor {info.name!r} rows [{lo}, {hi}) read {got} of {want} "
                "bytes: the file shrank while being read"
            )
        return buf.reshape(hi - lo, rb)


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Fill `buf` from `fd` at `offset` (os.preadv, in pieces); bytes read."""
    view = buf.data.cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class SafetensorsWriter:
    """One safetensors file written row range by row range, in bounded memory.

    The header (every tensor's dtype, shape and offsets, in the order given) is written first and
    the file sized to its full length; write_rows() then puts each row range at its place. The
    file appears under `path` only when close() succeeds (written as path + ".tmp", fsynced,
    renamed); an exception inside the `with` block removes the temporary file.
    """

    def __init__(
        self,
        path: str,
        tensors: Iterable[tuple[str, str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = path
        self._tmp = path + ".tmp"
        head: dict[str, object] = {}
        if metadata:
            head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        layout: dict[str, tuple[int, int, int]] = {}  # name -> (begin, row_bytes, rows)
        pos = 0
        for name, dtype, shape in tensors:
            if dtype not in ITEMSIZE:
                raise InvalidArgument(f"dtype {dtype!r} is not one of {sorted(ITEMSIZE)}")
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            rows = shape[0] if shape else 1
            layout[name] = (pos, nbytes // rows if rows else 0, rows)
            pos += nbytes
        text = json.dumps(head, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._base = 8 + len(text)
        self._layout = layout
        self.nbytes = self._base + pos
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)
            os.ftruncate(self._fd, self.nbytes)  # sparse until written
        except BaseException:
            self._abort()
            raise

    def write_rows(self, name: str, lo: int, rows: np.ndarray) -> None:
        """Write rows [lo, lo + len(rows)) of tensor `name` from raw bytes (any dtype's bytes of
        the right row width)."""
        begin, rb, n = self._layout[name]
        data = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
        count = data.nbytes // rb if rb else 0
        if count * rb != data.nbytes or not 0 <= lo <= lo + count <= n:
            raise InvalidArgument(
                f"{name}: {data.nbytes} bytes at row {lo} are not whole rows of {rb} bytes "
                f"inside its {n} rows"
            )
        view = data.data
        off = self._base + begin + lo * rb
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done : done + (1 << 30)], off + done)

    def close(self) -> None:
        """fsync and move the file to its name."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._tmp, self.path)

    def _abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def write_index(directory: str, weight_map: Mapping[str, str], total_size: int) -> str:
    """Write `directory/model.safetensors.index.json` (atomically); returns its path."""
    path = os.path.join(directory, INDEX)
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
