"""TrainConfig nests the model (ArchConfig) and prefetch (PrefetchConfig) configs: to_dict /
from_dict round trip the nested form and read the flat form of older checkpoints; validate()
words its errors as the flag to change; trainer.config and the `engram` parser import no torch."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys

import pytest

from engram_store.engine.errors import ConfigError
from tests.trainer.store_helpers import ROOT
from trainer.config import ArchConfig, PrefetchConfig, TrainConfig

#: a TrainConfig.to_dict() as checkpoints wrote it before model and prefetch were nested
FLAT = {
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "engram_layers": [1],
    "max_ngram": 3,
    "hash_heads": 2,
    "n_embed_per_ngram": 16,
    "table_base_size": 500,
    "hash_seed": 7,
    "corpus": "synthetic",
    "vocab_size": 64,
    "seq_len": 16,
    "batch_size": 4,
    "seed": 1337,
    "steps": 200,
    "max_minutes": 0.0,
    "lr": 3e-4,
    "weight_decay": 0.1,
    "adam_eps": 1e-6,
    "table_lr_mult": 5.0,
    "backend": "store",
    "store": ["127.0.0.1:1"],
    "table_prefix": "",
    "store_token": "",
    "store_data_root": "",
    "update": "sync",
    "prefetch_depth": 2,
    "max_inflight": 3,
    "cache_rows": 0,
    "cache_staleness": 0,
    "cache_drop_pushed": False,
    "trainers": 1,
    "ray_train": False,
    "device": "auto",
    "trainer_resource": "",
    "eval_batches": 0,
    "eval_every": 0,
    "log_every": 5,
    "out": "",
    "resume": "",
    "progress": False,
}


def nested() -> TrainConfig:
    return TrainConfig(
        model=ArchConfig(
            n_layer=2,
            n_head=2,
            n_embd=32,
            engram_layers=(1,),
            hash_heads=2,
            n_embed_per_ngram=16,
            table_base_size=500,
            hash_seed=7,
        ),
        prefetch=PrefetchConfig(depth=2, update="sync", max_inflight=3, cache_drop_pushed=False),
        corpus="synthetic",
        vocab_size=64,
        seq_len=16,
        batch_size=4,
        lr=3e-4,
        adam_eps=1e-6,
        table_lr_mult=5.0,
        store=("127.0.0.1:1",),
        eval_batches=0,
        progress=False,
    )


def test_to_dict_is_nested_and_round_trips():
    cfg = nested()
    d = cfg.to_dict()
    assert d["model"]["n_layer"] == 2 and d["prefetch"]["depth"] == 2
    assert "n_layer" not in d and "prefetch_depth" not in d  # nested, not copied
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg  # lists back to tuples


def test_from_dict_reads_the_old_flat_form():
    assert TrainConfig.from_dict(FLAT) == nested()


def test_from_dict_ignores_unknown_keys_and_defaults_missing_ones():
    cfg = TrainConfig.from_dict(
        {"steps": 3, "no_such_field": 1, "model": {"n_embd": 64, "gone": 2}}
    )
    assert cfg.steps == 3 and cfg.model == ArchConfig(n_embd=64)
    assert cfg.prefetch == PrefetchConfig()


def test_model_config_completes_the_arch_from_the_corpus():
    cfg = nested()
    m = cfg.model_config(vocab_size=64, pad_id=0)
    assert (m.vocab_size, m.block_size, m.n_layer, m.engram_layers) == (64, 16, 2, (1,))
    assert m.hash.seed == 7 and m.hash.base_sizes == (500, 500) and m.hash.pad_id == 0
    assert cfg.model.baseline().hash_config(0) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": ArchConfig(n_layer=2, engram_layers=(2,))}, "beyond the model depth"),
        ({"model": ArchConfig(max_ngram=1)}, "n-gram order 1 < 2"),
        ({"model": ArchConfig(n_head=0)}, "n_head=0 must be >= 1"),
        ({"prefetch": PrefetchConfig(depth=-1)}, "prefetch depth -1"),
        ({"prefetch": PrefetchConfig(update="sync", cache_rows=8)}, "hot-row cache"),
        ({"seq_len": 0}, "seq_len=0 must be >= 1"),
        ({"seed": -1}, r"seed=-1 must be >= 0 \(--seed\)"),
        ({"store": ()}, "no store address"),
        ({"backend": "local", "trainers": 2}, "supports one trainer"),
    ],
)
def test_validate_names_what_to_change(change, message):
    nested().validate()
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(nested(), **change).validate()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_config_and_the_engram_parser_import_neither_torch_nor_ray():
    r = _python(
        "import sys, engram.cli, trainer.config, trainer.corpus, trainer.tables, "
        "trainer.summary; engram.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'tokenizers') if m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_train_without_the_trainer_layer_names_the_extra():
    # sys.modules["torch"] = None: find_spec("torch") is None, as on a store node without torch
    r = _python(
        "import sys; sys.modules['torch'] = None\n"
        "import engram.cli\n"
        "sys.exit(engram.cli.main(['train', '--steps', '3']))"
    )
    assert r.returncode == 2
    assert "pip install 'engram[train]'" in r.stderr and "unrecognized" not in r.stderr


# ---- the table size rule (--table-size auto) ----


def test_rows_per_head_grows_with_text_read_once_and_shrinks_with_passes():
    from trainer.config import MIN_TABLE_ROWS, TOKENS_PER_ROW, TOKENS_PER_ROW_ONCE, rows_per_head

    once, again = TOKENS_PER_ROW_ONCE, TOKENS_PER_ROW
    # read at most once: a row per `once` tokens read, whatever the split's size
    assert rows_per_head(2_500_000, 1_500_000) == 1_500_000 // once
    assert rows_per_head(2_500_000, 2_500_000) == round(2_500_000 / once)
    assert rows_per_head(None, 3_200_000) == 3_200_000 // once  # an endless stream never repeats
    # read 4 times: a row per `again` split tokens, divided by the passes
    assert rows_per_head(2_500_000, 10_000_000) == round(2_500_000 / (4 * again))
    assert rows_per_head(600_000, 1_500_000) == 240  # 2.5 passes
    assert rows_per_head(600_000, 1_500_000) < rows_per_head(600_000, 600_000)
    assert rows_per_head(1_000, 10**9) == MIN_TABLE_ROWS  # never below the floor
    with pytest.raises(ConfigError, match="training split has 0 tokens"):
        rows_per_head(0, 10)
    with pytest.raises(ConfigError, match="steps, batch and seq_len"):
        rows_per_head(100, 0)


def test_rows_per_head_falls_geometrically_between_one_pass_and_repeated_reading():
    """No jump at one pass: from one pass to PASSES_REPEATED the size is the geometric
    interpolation in the passes, written here from the formula, meeting both regimes at the ends."""
    from trainer.config import PASSES_REPEATED, TOKENS_PER_ROW, TOKENS_PER_ROW_ONCE, rows_per_head

    n = 10_000_000
    once, repeated = n / TOKENS_PER_ROW_ONCE, n / (TOKENS_PER_ROW * PASSES_REPEATED)
    sizes = []
    for f in (0.0, 0.002, 0.05, 0.2, 0.4, 0.6, 0.9, 0.998, 1.0):
        p = 1.0 + f * (PASSES_REPEATED - 1.0)
        want = once * (repeated / once) ** (math.log(p) / math.log(PASSES_REPEATED))
        got = rows_per_head(n, round(p * n))
        assert got == pytest.approx(want, rel=1e-3, abs=1), p
        sizes.append(got)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert sizes[0] == round(once) and sizes[-1] == round(repeated)
    assert rows_per_head(n, n + 1000) > 0.99 * rows_per_head(n, n)  # a few tokens more: no cliff


def test_sized_fills_an_auto_size_and_keeps_a_given_or_resumed_one():
    from trainer.config import rows_per_head

    auto = dataclasses.replace(
        nested(), model=dataclasses.replace(nested().model, table_base_size=0), steps=400
    )
    auto.validate()  # auto is a valid setting before the corpus is known...
    with pytest.raises(ConfigError, match="not sized yet"):
        auto.model_config(vocab_size=64, pad_id=0)  # ...but no model is built from it
    assert auto.run_tokens == 400 * 4 * 16
    sized = auto.sized(2_000_000)  # under one pass: a row per 32 tokens read
    assert sized.model.table_base_size == rows_per_head(2_000_000, auto.run_tokens) == 800
    assert sized.model_config(vocab_size=64, pad_id=0).hash.base_sizes == (800, 800)
    assert sized.sized(10) is sized
    given = nested()
    assert given.sized(2_000_000).model.table_base_size == 500  # a given size is kept
    # a resumed run keeps the size its tables were created with, whatever its new --steps
    ckpt = dataclasses.replace(given, steps=10).to_dict()
    assert auto.sized(2_000_000, resumed=ckpt).model.table_base_size == 500
    with pytest.raises(ConfigError, match="--table-size -3"):
        dataclasses.replace(nested(), model=ArchConfig(table_base_size=-3)).validate()


# ---- the table lr rule (--table-lr-mult auto) ----


def test_table_lr_mult_falls_geometrically_between_the_measured_lengths():
    from trainer.config import TABLE_LR_POINTS, table_lr_mult_for

    (t_first, m_first), (t_last, m_last) = TABLE_LR_POINTS[0], TABLE_LR_POINTS[-1]
    assert (m_first, m_last) == (100.0, 25.0)  # the documented ends (README "Quality")
    for t, m in TABLE_LR_POINTS:
        assert table_lr_mult_for(int(t)) == pytest.approx(m)  # each measured point, exactly
    assert table_lr_mult_for(1) == table_lr_mult_for(int(t_first) // 2) == m_first  # held
    assert table_lr_mult_for(int(t_last) * 10) == m_last
    for (t0, m0), (t1, m1) in itertools.pairwise(TABLE_LR_POINTS):
        mid = int(math.sqrt(t0 * t1))  # halfway in log tokens: halfway in log lr
        assert table_lr_mult_for(mid) == pytest.approx(math.sqrt(m0 * m1), rel=1e-6)
    grid = [int(t_first * 1.1**k) for k in range(40)]
    mults = [table_lr_mult_for(t) for t in grid]
    assert mults == sorted(mults, reverse=True)  # never rises with the run's length
    steps = [a / b for a, b in itertools.pairwise(mults)]
    assert max(steps) < 1.2  # 10 % more tokens never changes the lr by a fifth: no cliff
    with pytest.raises(ConfigError, match="steps, batch and seq_len"):
        table_lr_mult_for(0)


def test_sized_fills_an_auto_table_lr_and_keeps_a_given_or_resumed_one():
    from trainer.config import table_lr_mult_for

    auto = dataclasses.replace(nested(), table_lr_mult=0.0, steps=400_000)
    auto.validate()  # auto (0) is valid; the unsized config's lr already follows the rule
    tokens = auto.run_tokens
    assert auto.needs_sizing and auto.table_lr == pytest.approx(auto.lr * table_lr_mult_for(tokens))
    sized = auto.sized(2_000_000)
    assert sized.table_lr_mult == table_lr_mult_for(tokens) and not sized.needs_sizing
    assert sized.model.table_base_size == 500  # the given size is kept beside the auto lr
    assert sized.table_lr == pytest.approx(auto.table_lr)
    assert nested().sized(2_000_000).table_lr_mult == 5.0  # a given lr is kept
    # a resumed run keeps the lr its tables' optimizer was created with, whatever its --steps
    ckpt = dataclasses.replace(nested(), table_lr_mult=40.0).to_dict()
    assert auto.sized(2_000_000, resumed=ckpt).table_lr_mult == 40.0
    # sized() writes the number into what a checkpoint keeps; a checkpoint holding 0 (none
    # written by a run) falls to the rule
    old_auto = dataclasses.replace(nested(), table_lr_mult=0.0).to_dict()
    assert auto.sized(2_000_000, resumed=old_auto).table_lr_mult == table_lr_mult_for(tokens)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"--table-lr-mult .* \(or 0 / auto"):
            dataclasses.replace(nested(), table_lr_mult=bad).validate()


def test_train_worker_sizes_auto_tables_from_the_corpus(tmp_path):
    """An auto size reaches the model and the checkpoint as a number (what a resume reads)."""
    torch = pytest.importorskip("torch")
    from trainer.config import rows_per_head
    from trainer.loop import train_worker

    cfg = TrainConfig(
        model=ArchConfig(
            n_layer=1, n_head=2, n_embd=32, engram_layers=(0,), hash_heads=2,
            n_embed_per_ngram=16, table_base_size=0,
        ),
        corpus="synthetic", vocab_size=256, seq_len=16, batch_size=4, steps=3,
        eval_batches=1, backend="local", progress=False, out=str(tmp_path / "run"),
    )  # fmt: skip
    summary = train_worker(cfg)
    assert summary["steps"] == 3
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["config"]
    want = rows_per_head(None, 3 * 4 * 16)
    assert TrainConfig.from_dict(saved).model.table_base_size == want
