"""Training with the store lowers validation loss on the real built-in corpus (small model, 60
steps, bounded time)."""

from __future__ import annotations

import pytest

from tests.trainer.store_helpers import shard_servers, tiny_config
from trainer.loop import train_worker


@pytest.mark.timeout(300)
def test_training_lowers_validation_loss(tmp_path):
    with shard_servers(tmp_path) as addresses:
        cfg = tiny_config(
            store=addresses,
            corpus="builtin",
            vocab_size=4096,
            n_layer=2,
            n_embd=64,
            n_head=2,
            hash_heads=4,
            n_embed_per_ngram=64,
            table_base_size=20_000,
            seq_len=64,
            batch_size=8,
            steps=60,
            lr=3e-3,
            adam_eps=1e-8,
            update="async",
            prefetch_depth=1,
            eval_batches=4,
            out=str(tmp_path / "run"),
        )
        s = train_worker(cfg)
    # ~8.3 (uniform over 4096 tokens) -> ~6.7 after 60 steps
    assert s["val_loss_after"] < s["val_loss_before"] - 1.0, s
    assert s["rows_per_token"] > 1 and s["stall_pct"] < 50
