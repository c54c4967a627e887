"""A shard process for the crash tests: pushes a fixed sequence, records each acknowledgement.

    python crash_child.py DATA_DIR ACK_FILE N_PUSHES [--exit-without-close] [--no-checkpoints]

Push i (ids and gradients a pure function of i) is sent with request id `p{i}` and step i + 1;
after it returns, `i` is appended to ACK_FILE and flushed, so the file lists exactly the pushes
the shard acknowledged. The process resumes after the last acknowledged push, so a push that was
in flight when the previous process was killed is sent again (and must be applied once).
Checkpoints are forced to run all the time (a tiny threshold), so a kill lands in one often.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.shard import Shard

SPEC = TableConfig("t", num_rows=5000, dim=8, optimizer=OptimizerConfig(kind="adam", lr=0.01))
ROWS = 300


def push_args(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng((7, i))
    ids = rng.integers(0, SPEC.num_rows, ROWS).astype(np.int64)
    return ids, rng.standard_normal((ROWS, SPEC.dim)).astype(np.float32)


def config(data_dir: str, checkpoints: bool = True) -> ShardConfig:
    return ShardConfig(
        data_dir=data_dir,
        map_size=256 << 20,
        checkpoint_min_bytes=4096 if checkpoints else 1 << 40,
        checkpoint_ratio=1e-9 if checkpoints else 1e9,
    )


def main() -> int:
    data_dir, ack_file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = []
    if os.path.exists(ack_file):
        with open(ack_file) as f:
            done = [int(x) for x in f.read().split()]
    shard = Shard(config(data_dir, checkpoints="--no-checkpoints" not in sys.argv))
    shard.create_table(SPEC)
    with open(ack_file, "a") as ack:
        for i in range((max(done) + 1) if done else 0, n):
            ids, grads = push_args(i)
            shard.push("t", ids, grads, request_id=f"p{i}", step=i + 1)
            ack.write(f"{i}\n")
            ack.flush()
    if "--exit-without-close" in sys.argv:
        os._exit(0)  # like a kill after the last acknowledgement: no final checkpoint
    shard.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
