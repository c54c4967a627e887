"""`engram query`: rows of a table by id (`--rows`, store only), or the rows a text hashes to
(`--text`, which needs the trainer layer for the tokenizer and the hashing: a training run's, or
a model preset's with `--preset`)."""

from __future__ import annotations

import argparse
import json

from engram.cli import options
from engram_store.engine.config import DTYPES
from engram_store.engine.errors import InvalidArgument


def query_preset(args: argparse.Namespace) -> int:
    """`--preset NAME --text ...`: per Engram layer of the preset, the 24 row ids (3 orders x 8
    heads for deepseek-v4.1-flash) each token reads and the norms of those rows as the store
    serves them (fp8 rows dequantized), with the preset's own tokenizer and hashing."""
    options.require("trainer.presets", "train")
    import numpy as np

    from trainer.presets import get

    preset = get(args.preset)
    tok = preset.load_tokenizer()
    hasher = preset.hasher(tok)
    ids = np.asarray(tok.encode(args.text, add_special_tokens=False).ids, np.int64)[None, :]
    if ids.shape[1] == 0:
        raise InvalidArgument("--text is empty after tokenization")
    glob = hasher.global_ids(ids)  # {layer: (1, T, H)} rows of the layer's table
    cfg = preset.hash
    heads = [f"{n}g/h{k}" for n in range(2, cfg.max_ngram + 1) for k in range(cfg.heads)]
    tokens = [tok.decode([int(t)]) for t in ids[0]]
    out: dict = {"text": args.text, "preset": preset.name, "tokens": tokens, "layers": {}}
    with options.shard_client(args) as c:
        for layer in cfg.layers:
            name = args.table_prefix + f"engram_l{layer}"
            held = c.table_info(name).spec
            if tuple(held.head_rows) != preset.head_rows(layer):
                raise InvalidArgument(
                    f"table {name} in the store has head sizes {held.head_rows[:3]}..., the "
                    f"preset {preset.name} has {preset.head_rows(layer)[:3]}...: it holds "
                    "another model's table"
                )
            rows = c.lookup(name, glob[layer][0])  # (T, H, dim) float32
            out["layers"][layer] = {
                "table": name,
                "dtype": held.dtype,
                "heads": heads,
                "row_ids": glob[layer][0].tolist(),
                "norms": np.linalg.norm(rows, axis=-1).round(4).tolist(),
            }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"text {args.text!r}: {len(tokens)} tokens, preset {preset.name}")
    for layer, d in out["layers"].items():
        print(
            f"layer {layer} (table {d['table']}, {d['dtype']}): {len(heads)} row ids per token "
            "(order g, head h), the row's norm in parentheses"
        )
        for t, text in enumerate(tokens):
            cells = [
                f"{h}={r}({nm:.3f})"
                for h, r, nm in zip(heads, d["row_ids"][t], d["norms"][t], strict=True)
            ]
            print(f"  {t:3d} {text!r:>16}  " + "  ".join(cells))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    if args.preset:
        if not args.text:
            raise InvalidArgument("--preset needs --text")
        return query_preset(args)
    if args.text:
        options.require("trainer", "train")
        from trainer.query import query_text  # the trainer owns text -> hashed rows

        return query_text(args) or 0
    if not args.rows:
        raise InvalidArgument("give --rows 0,5,7 (or --text)")
    if not args.table:
        raise InvalidArgument("--rows needs --table NAME")
    import numpy as np

    with options.shard_client(args, wire_dtype=args.dtype) as c:
        rows = c.lookup(args.table, np.asarray(args.rows, dtype=np.int64))
    if args.json:
        print(json.dumps({"table": args.table, "ids": args.rows, "rows": rows.tolist()}))
    else:
        with np.printoptions(precision=6, suppress=True, linewidth=10**6):
            for i, r in zip(args.rows, rows, strict=True):
                print(f"{i}: {r}")
    return 0


def add_commands(sub) -> None:
    """Add `query` to the `engram` parser's subparsers."""
    q = sub.add_parser("query", help="print rows of a table, or the rows a text hashes to")
    q.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
    q.add_argument("--table", default=None, help="table name (with --rows)")
    q.add_argument("--rows", type=options.ints, metavar="0,5,7", help="row ids")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="wire dtype of the rows")
    q.add_argument(
        "--text",
        help="query the rows a text hashes to (needs engram[train]); the "
        "Engram tables are named by the run",
    )
    q.add_argument(
        "--preset",
        metavar="NAME",
        help="with --text: hash as this model does (deepseek-v4.1-flash: its tokenizer, "
        "layers 1 and 14, 24 rows per token) against the store's engram_l<L> tables",
    )
    q.add_argument("--table-prefix", default="", help="with --preset: prefix of the table names")
    q.add_argument(
        "--checkpoint",
        default="",
        help="with --text: the run whose hashing to use (default: newest under "
        "runs/, else the `engram train` defaults)",
    )
    options.add_client_options(q)
    q.set_defaults(func=cmd_query)
