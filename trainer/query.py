"""`engram query --address HOST:PORT --text "Alexander the Great"`: which rows a text reads.

Tokenizes the text with the run's tokenizer, hashes it as the model does (docs/algorithm.md steps 1-4), and
prints, per Engram layer, position and head, the n-gram's row id and the norm of that row in the
store. The hashing comes from a checkpoint (--checkpoint, else the newest runs/*/checkpoint.pt,
else the `engram train` defaults); it is checked against the tables' head sizes in the store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from engram_store.engine.errors import ConfigError


def _config(checkpoint: str):
    """(TrainConfig, source) for the run whose hashing is wanted."""
    from trainer.config import TrainConfig

    path = pathlib.Path(checkpoint) if checkpoint else None
    if path is None:
        runs = sorted(pathlib.Path("runs").glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
        path = runs[-1] if runs else None
    if path is None:
        return TrainConfig(), "engram train defaults"
    from trainer.checkpoint import checkpoint_path, load_checkpoint

    file = checkpoint_path(path)
    if not file.exists():
        raise ConfigError(f"--checkpoint {checkpoint}: no checkpoint there")
    return TrainConfig.from_dict(load_checkpoint(file)["config"]), str(file)


def query_text(args: argparse.Namespace) -> int:
    """Print the row ids (per layer, position, head) and row norms that `args.text` hashes to."""
    from engram_store.rpc.client import StoreClient
    from engram_store.rpc.config import ClientConfig
    from trainer.corpus import load_corpus
    from trainer.hashing import NgramHasher
    from trainer.tables import table_specs

    cfg, source = _config(getattr(args, "checkpoint", ""))
    if not cfg.model.engram_layers:
        raise ConfigError(f"the run ({source}) has no Engram layers; nothing to query")
    cfg = dataclasses.replace(cfg, store=(args.address,))
    corpus = load_corpus(cfg)
    if corpus.tokenizer is None:
        raise ConfigError(f"the run ({source}) used synthetic tokens; there is no tokenizer")
    ids = np.asarray(
        corpus.tokenizer.encode(args.text, add_special_tokens=False).ids, dtype=np.int64
    )[None, :]  # (1, T)
    if ids.shape[1] == 0:
        raise ConfigError("--text is empty after tokenization")
    hasher = NgramHasher(
        cfg.model.hash_config(corpus.pad_id), corpus.lookup, corpus.compressed_vocab
    )
    specs = table_specs(cfg, hasher)
    local = hasher.hash(ids)  # {layer: (1, T, H)} row within each head
    glob = hasher.global_ids(ids)  # {layer: (1, T, H)} row of the layer's table
    tokens = [corpus.tokenizer.decode([int(t)]) for t in ids[0]]
    N, K = cfg.model.max_ngram, cfg.model.hash_heads
    out = {"text": args.text, "hashing": source, "tokens": tokens, "layers": {}}
    with StoreClient(args.address, ClientConfig(token=getattr(args, "token", "") or "")) as c:
        for layer, spec in specs.items():
            held = c.table_info(spec.name).spec
            if tuple(held.head_rows) != tuple(spec.head_rows):
                raise ConfigError(
                    f"table {spec.name} in the store has head sizes {held.head_rows[:3]}..., "
                    f"this hashing ({source}) gives {spec.head_rows[:3]}...; pass --checkpoint "
                    "of the run that trained these tables"
                )
            rows = c.lookup(spec.name, glob[layer][0])  # (T, H, d_head)
            norms = np.linalg.norm(rows, axis=-1)  # (T, H)
            out["layers"][layer] = {
                "table": spec.name,
                "heads": [f"{n}-gram/h{k}" for n in range(2, N + 1) for k in range(K)],
                "head_rows": local[layer][0].tolist(),
                "row_ids": glob[layer][0].tolist(),
                "norms": norms.round(4).tolist(),
            }
    if getattr(args, "json", False):
        print(json.dumps(out))
        return 0
    print(f"text {args.text!r}: {len(tokens)} tokens, hashing from {source}")
    for layer, d in out["layers"].items():
        print(
            f"layer {layer} (table {d['table']}): row id (norm) per head; "
            f"{N - 1} orders x {K} heads"
        )
        for t, tok in enumerate(tokens):
            cells = [
                f"{h}={r}({nm:.3f})"
                for h, r, nm in zip(d["heads"], d["row_ids"][t], d["norms"][t], strict=True)
            ]
            print(f"  {t:3d} {tok!r:>16}  " + "  ".join(cells))
    return 0
