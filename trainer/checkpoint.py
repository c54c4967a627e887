"""A run's checkpoint: dense weights, optimizer, config, tokenizer identity, step, and where the
tables live (the store keeps them; the checkpoint records names, steps, addresses and, when the
store can take one, a snapshot). save_checkpoint writes it, check_resume reads it back."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from engram_store.engine.errors import ConfigError, EngramError
from trainer.config import TrainConfig, default_out
from trainer.corpus import Corpus

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def tokenizer_info(corpus: Corpus) -> dict:
    """What a checkpoint records of the tokenizer, so that a resume refuses a different one."""
    return {"fingerprint": corpus.fingerprint, "vocab_size": corpus.vocab_size}


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file of `path`: the file itself, or checkpoint.pt in a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, tensors on the CPU (`path`: the file or its run directory)."""
    return torch.load(checkpoint_path(path), map_location="cpu", weights_only=False)


def check_resume(cfg: TrainConfig, corpus: Corpus) -> dict | None:
    """The checkpoint to resume from (None without --resume), after checking that it was
    trained with this tokenizer."""
    if not cfg.resume:
        return None
    path = checkpoint_path(cfg.resume)
    if not path.exists():
        raise ConfigError(f"--resume {cfg.resume}: no checkpoint there")
    ckpt = load_checkpoint(path)
    tok = ckpt.get("tokenizer", {})
    if tok.get("vocab_size") != corpus.vocab_size or tok.get("fingerprint") != corpus.fingerprint:
        raise ConfigError(
            f"vocabulary mismatch: checkpoint {path} was trained with tokenizer "
            f"{tok.get('fingerprint')} (vocab {tok.get('vocab_size')}), this run uses "
            f"{corpus.fingerprint} (vocab {corpus.vocab_size}); use the same --corpus and "
            "vocabulary size, or start without --resume"
        )
    return ckpt


def save_checkpoint(
    cfg: TrainConfig,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    corpus: Corpus,
    summary: dict,
    store: Any,
    specs: dict[int, dict] | None = None,
) -> str:
    """Write <out>/checkpoint.pt and <out>/summary.json; returns the checkpoint's path.

    The store keeps the tables: the checkpoint records the table names, their step and the shard
    addresses (plus a snapshot of every shard when the store is reachable).
    """
    out = Path(cfg.out or default_out())
    out.mkdir(parents=True, exist_ok=True)
    store_info: dict[str, Any] = {
        "addresses": list(cfg.store),
        "tables": summary["tables"],
        "specs": specs,
        "data_root": cfg.store_data_root,
    }
    if store is not None:
        store_info.update(_store_state(store, out, summary["tables"]))
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": cfg.to_dict(),
        "tokenizer": tokenizer_info(corpus),
        "step": summary["steps"],
        "store": store_info,
    }
    path = out / CHECKPOINT
    torch.save(ckpt, path)
    slim = {k: v for k, v in summary.items() if k not in ("history",)}
    (out / "summary.json").write_text(json.dumps(slim, indent=2, default=str))
    return str(path)


def _store_state(store: Any, out: Path, tables: dict[int, str]) -> dict[str, Any]:
    """A snapshot of the shards and the tables' steps, as far as the store gives them."""
    info: dict[str, Any] = {}
    try:
        from engram_store.ops.snapshot import snapshot

        # A consistent copy of every shard (each push wholly in or out), written by the shard
        # servers: on a multi-machine store the path must be on a shared filesystem.
        info["snapshot"] = snapshot(store, str((out / "store-snapshot").resolve()))
    except Exception as e:  # optional: a failed snapshot must not cost the run its dense
        # checkpoint; the tables stay in the store (data_root) either way
        info["snapshot_error"] = f"{type(e).__name__}: {e}"
        log.warning(
            "store snapshot for the checkpoint in %s failed (%s); the checkpoint "
            "records the tables' names and addresses only",
            out,
            info["snapshot_error"],
        )
    try:
        info["table_steps"] = {name: store.table_info(name).step for name in tables.values()}
    except EngramError as e:
        log.warning(
            "the checkpoint in %s records no table steps: the store did not answer table_info (%s)",
            out,
            e,
        )
    return info
