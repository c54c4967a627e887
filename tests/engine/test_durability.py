"""The v2 engine's durability: kill -9 anywhere, damaged logs and files, exact replay.

Real processes are killed with SIGKILL (tests/engine/crash_child.py), real LMDB files are damaged
byte by byte; the reference is the same pushes applied by one uninterrupted shard.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from engram_store.engine import records
from engram_store.engine.errors import DataCorrupted
from engram_store.engine.shard import Shard

sys.path.insert(0, str(Path(__file__).parent))
import crash_child  # noqa: E402

CHILD = Path(__file__).parent / "crash_child.py"
ALL = np.arange(crash_child.SPEC.num_rows, dtype=np.int64)


def _run(data: Path, ack: Path, n: int, *flags: str, kill_at: int | None = None) -> int:
    """Run the child; with kill_at, SIGKILL it once it acknowledged that many more pushes (plus
    a random few milliseconds, so the kill lands anywhere in a push or a checkpoint)."""
    proc = subprocess.Popen([sys.executable, str(CHILD), str(data), str(ack), str(n), *flags])
    if kill_at is None:
        return proc.wait(timeout=120)
    start = len(_acked(ack))
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if len(_acked(ack)) >= start + kill_at:
            time.sleep(random.Random(kill_at).uniform(0, 0.02))
            break
        time.sleep(0.002)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


def _acked(ack: Path) -> list[int]:
    return [int(x) for x in ack.read_text().split()] if ack.exists() else []


def _reference(tmp_path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and state after pushes 0..n-1 on one shard that never stopped."""
    with Shard(crash_child.config(str(tmp_path / "ref"), checkpoints=False)) as ref:
        ref.create_table(crash_child.SPEC)
        for i in range(n):
            ids, grads = crash_child.push_args(i)
            ref.push("t", ids, grads, step=i + 1)
        return ref.lookup("t", ALL).copy(), ref.optimizer_state("t", ALL).copy()


def _state(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    return shard.lookup("t", ALL).copy(), shard.optimizer_state("t", ALL).copy()


def test_kill9_anywhere_loses_no_acknowledged_push_and_applies_none_twice(tmp_path):
    n = 600
    data, ack = tmp_path / "shard", tmp_path / "acks"
    rnd = random.Random(11)
    kills = 0
    for _ in range(12):  # bounded: a child that fails instead of being killed ends the test
        if kills == 8 or len(_acked(ack)) >= n - 80:
            break
        before = len(_acked(ack))
        rc = _run(data, ack, n, kill_at=rnd.randint(1, 60))
        assert rc in (0, -signal.SIGKILL), f"the child failed (exit {rc})"
        kills += rc == -signal.SIGKILL
        acked = _acked(ack)
        assert acked == list(range(len(acked))), "acknowledgements are in order, none twice"
        assert len(acked) >= before
    assert kills == 8
    assert _run(data, ack, n) == 0
    assert _acked(ack) == list(range(n))
    with Shard(crash_child.config(str(data), checkpoints=False)) as shard:
        got = _state(shard)
        info = shard.table_stats("t")
        with shard._env.begin(db=shard._chunks) as txn:  # the kills met written checkpoints
            assert txn.stat(shard._chunks)["entries"] > 0
    want = _reference(tmp_path, n)
    assert info.pushes == n and info.step == n
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _log_keys(data: Path) -> list[bytes]:
    env = lmdb.open(str(data), max_dbs=8, readonly=True, lock=False)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin(db=db) as txn:
            return [k for k, _ in txn.cursor()]
    finally:
        env.close()


def _flip(data: Path, key: bytes, at: int = 20) -> None:
    """Flip one byte of the log value at `key`, in place in the real LMDB file."""
    env = lmdb.open(str(data), max_dbs=8)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin(db=db, write=True) as txn:
            v = bytearray(txn.get(key))
            v[at % len(v)] ^= 0x10
            txn.put(key, bytes(v))
    finally:
        env.close()


def test_a_damaged_last_log_entry_is_cut_back(tmp_path, caplog):
    data, ack = tmp_path / "shard", tmp_path / "acks"
    assert _run(data, ack, 12, "--exit-without-close", "--no-checkpoints") == 0
    keys = _log_keys(data)
    assert records.key_seq(keys[-1]) == (12, 1)  # 12 pushes, each a header and a payload
    _flip(data, keys[-1])
    with Shard(crash_child.config(str(data), checkpoints=False)) as shard:
        got = _state(shard)
        assert shard.table_stats("t").pushes == 11
    assert "cut back" in caplog.text
    want = _reference(tmp_path, 11)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_a_damaged_log_entry_before_the_tail_is_refused(tmp_path):
    data, ack = tmp_path / "shard", tmp_path / "acks"
    assert _run(data, ack, 12, "--exit-without-close", "--no-checkpoints") == 0
    keys = _log_keys(data)
    _flip(data, keys[11])  # entry 6's payload (seq 1 header, seq 1 payload, seq 2 header, ...)
    with pytest.raises(DataCorrupted, match=r"data\.mdb log entry 6: push payload checksum"):
        Shard(crash_child.config(str(data), checkpoints=False))
    _flip(data, keys[11])  # undone: the shard opens again, nothing was changed by the refusal
    with Shard(crash_child.config(str(data), checkpoints=False)) as shard:
        assert shard.table_stats("t").pushes == 12


def test_restart_equals_an_uninterrupted_run(tmp_path):
    """Checkpoints every few pushes, deletes and imports in between, reopened six times: the
    same rows, state and counters as one shard that never checkpointed or closed."""
    a_dir = str(tmp_path / "a")
    ops = []
    rng = np.random.default_rng(5)
    for i in range(60):
        ops.append(("push", i))
        if i % 17 == 16:
            ops.append(("delete", int(rng.integers(0, 8))))
        if i % 23 == 22:
            ops.append(("import", i))

    def run(shard: Shard, op: tuple[str, int]) -> None:
        kind, i = op
        if kind == "push":
            ids, grads = crash_child.push_args(i)
            shard.push("t", ids, grads, step=i + 1)
        elif kind == "delete":
            mask = np.zeros(8, bool)
            mask[i] = True
            shard.delete_rows("t", mask)
        else:
            ids = np.arange(100 * (i % 5), 100 * (i % 5) + 50, dtype=np.int64)
            rec = np.zeros((50, shard.record_bytes("t")), np.uint8)
            rec[:, :32] = np.full((50, 8), 0.25 * i, np.float32).view(np.uint8)
            shard.import_rows("t", ids, rec, 0)

    with Shard(crash_child.config(str(tmp_path / "b"), checkpoints=False)) as b:
        b.create_table(crash_child.SPEC)
        for op in ops:
            run(b, op)
        want = _state(b) + (b.table_stats("t"),)
    shard = Shard(crash_child.config(a_dir))
    shard.create_table(crash_child.SPEC)
    for k, op in enumerate(ops):
        run(shard, op)
        if k % 12 == 11:
            shard.checkpoint()
            shard.close()
            shard = Shard(crash_child.config(a_dir))
    got = _state(shard) + (shard.table_stats("t"),)
    shard.close()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (got[2].stored_rows, got[2].step, got[2].pushes) == (
        want[2].stored_rows,
        want[2].step,
        want[2].pushes,
    )


def _made(tmp_path: Path) -> Path:
    data = tmp_path / "shard"
    with Shard(crash_child.config(str(data))) as shard:
        shard.create_table(crash_child.SPEC)
        for i in range(5):
            shard.push("t", *crash_child.push_args(i))
    return data


def test_empty_or_missing_data_file_is_refused_not_served_empty(tmp_path):
    data = _made(tmp_path)
    (data / "data.mdb").write_bytes(b"")
    with pytest.raises(DataCorrupted, match="data.mdb is empty"):
        Shard(crash_child.config(str(data)))
    (data / "data.mdb").unlink()
    with pytest.raises(DataCorrupted, match="data.mdb is missing"):
        Shard(crash_child.config(str(data)))


def test_truncated_data_file_is_refused_before_it_is_mapped(tmp_path):
    data = _made(tmp_path)
    path = data / "data.mdb"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataCorrupted, match="truncated"):
        Shard(crash_child.config(str(data)))


def test_foreign_data_file_is_refused(tmp_path):
    data = _made(tmp_path)
    (data / "data.mdb").write_bytes(os.urandom(3 * 4096))
    with pytest.raises(DataCorrupted, match="not an LMDB data file"):
        Shard(crash_child.config(str(data)))


def test_damaged_checkpoint_chunk_is_refused_naming_it(tmp_path):
    data = _made(tmp_path)  # closing wrote a checkpoint
    env = lmdb.open(str(data), max_dbs=8)
    db = env.open_db(b"chunks", create=False)
    with env.begin(db=db, write=True) as txn:
        key, value = next(iter(txn.cursor()))
        v = bytearray(value)
        v[len(v) // 2] ^= 1
        txn.put(key, bytes(v))
    env.close()
    with pytest.raises(
        DataCorrupted, match=r"table 't' chunk 0: checkpoint chunk payload checksum"
    ):
        Shard(crash_child.config(str(data)))
