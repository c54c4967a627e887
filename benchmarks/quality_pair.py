"""Pair the Engram runs of one recipe with an earlier run's baselines, seed by seed.

`quality.py --engram-only` trains the Engram arm alone. A dense arm has no tables, so it is the
same run whatever the table recipe: the same seed, data order and code give the same loss
(quality.table_free names its kept runs so). This script pairs each Engram seed with the
baseline of the same corpus and seed from an earlier run, and reports what quality.py would have:
the mean of the per-seed ratios with a Student-t 95 % interval, and the target.

Per-seed losses are read from either
- a quality.py JSON: corpora.<name>.val_loss.<arm>.seeds / per_seed, or
- a quality.py log (stderr): its lines "[i/n] CORPUS ARM seed S: val loss X, ..." (the logs of
  runs made before the JSON listed each seed).

A corpus is matched by its last path part, so a run of a folder `/tmp/debdocs` pairs with one of
`--corpus debdocs` (their JSONs' token counts tell whether they are the same text). Where the baseline source
also holds Engram runs of the same seeds (an earlier recipe), their same-seed ratio is reported
too ("vs_baseline_engram").

    python benchmarks/quality_pair.py --engram new.json --baseline results/quality_budget_devdocs.log

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_stats as qs  # noqa: E402

TARGET_RATIO = 0.97  # = quality.TARGET_RATIO (not imported: quality.py loads torch and the trainer)
LOG_LINE = re.compile(
    r"\[\d+/\d+\] (?P<corpus>\S+) (?P<arm>engram|dense|dense_isoflop|dense_isoparam) "
    r"seed (?P<seed>\d+): val loss (?P<loss>[0-9.]+)"
)

Losses = dict[str, dict[str, dict[int, float]]]  # corpus -> arm -> seed -> val loss


def corpus_key(name: str) -> str:
    return Path(name).name


def read_losses(path: Path) -> Losses:
    """Per-seed validation losses in a quality.py JSON or log; a file holding none is an error."""
    text = path.read_text()
    out: Losses = {}
    try:
        doc = json.loads(text.strip().splitlines()[-1]) if text.strip() else None
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("corpora"), dict):
        for name, entry in doc["corpora"].items():
            for arm, v in (entry.get("val_loss") or {}).items():
                if not isinstance(v, dict) or "per_seed" not in v:
                    continue
                seeds, losses = v["seeds"], v["per_seed"]
                if len(seeds) != len(losses):
                    raise ValueError(
                        f"{path}: {name} {arm}: {len(seeds)} seeds, {len(losses)} losses"
                    )
                arms = out.setdefault(corpus_key(name), {})
                arms.setdefault(arm, {}).update(
                    {int(s): float(x) for s, x in zip(seeds, losses, strict=True)}
                )
    else:
        for m in LOG_LINE.finditer(text):
            arms = out.setdefault(corpus_key(m["corpus"]), {})
            seen = arms.setdefault(m["arm"], {})
            seed, loss = int(m["seed"]), float(m["loss"])
            if seen.get(seed, loss) != loss:
                raise ValueError(f"{path}: {m['corpus']} {m['arm']} seed {seed} has two losses")
            seen[seed] = loss
    if not out:
        raise ValueError(
            f"{path}: no per-seed validation losses (want a quality.py JSON that lists each seed's "
            "loss, or a quality.py log)"
        )
    return out


def merge(sources: list[Losses]) -> Losses:
    out: Losses = {}
    for src in sources:
        for corpus, arms in src.items():
            for arm, by_seed in arms.items():
                have = out.setdefault(corpus, {}).setdefault(arm, {})
                for s, x in by_seed.items():
                    if s in have and have[s] != x:
                        raise ValueError(f"{corpus} {arm} seed {s}: two different losses given")
                    have[s] = x
    return out


def ratio(num: dict[int, float], den: dict[int, float], what: str) -> dict[str, Any]:
    missing = sorted(set(num) - set(den))
    if missing:
        raise ValueError(f"{what}: no baseline for seed(s) {missing}; give a source that has them")
    seeds = sorted(num)
    ratios = [num[s] / den[s] for s in seeds]
    return {**qs.paired_interval(ratios), "ratios": ratios, "seeds": seeds}


def pair(engram: Losses, baseline: Losses) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for corpus, arms in engram.items():
        if "engram" not in arms:
            continue
        if corpus not in baseline:
            raise ValueError(f"corpus {corpus}: not in any baseline source")
        e, base = arms["engram"], baseline[corpus]
        entry: dict[str, Any] = {"seeds": sorted(e), "engram_val_loss": e}
        for arm in ("dense_isoflop", "dense", "dense_isoparam"):
            if arm in base:
                entry[f"{arm}_val_loss"] = {s: base[arm][s] for s in sorted(e) if s in base[arm]}
                entry[f"ratio_vs_{arm}"] = ratio(e, base[arm], f"{corpus} {arm}")
        if "ratio_vs_dense_isoflop" not in entry:
            raise ValueError(f"corpus {corpus}: the baseline sources hold no dense_isoflop runs")
        iso = entry["ratio_vs_dense_isoflop"]
        entry["meets_target"] = bool(
            iso["n"] >= 2 and iso["mean"] <= TARGET_RATIO and iso["hi"] < 1.0
        )
        if "engram" in base and set(e) <= set(base["engram"]):
            entry["vs_baseline_engram"] = ratio(e, base["engram"], f"{corpus} engram")
        report[corpus] = entry
    if not report:
        raise ValueError("no Engram runs in the --engram sources")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engram", type=Path, nargs="+", required=True, help="the new Engram runs")
    ap.add_argument("--baseline", type=Path, nargs="+", required=True, help="the earlier runs")
    args = ap.parse_args()
    try:
        report = pair(
            merge([read_losses(p) for p in args.engram]),
            merge([read_losses(p) for p in args.baseline]),
        )
    except (OSError, ValueError) as e:
        print(f"quality_pair: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "benchmark": "quality_pair",
                "engram": [str(p) for p in args.engram],
                "baseline": [str(p) for p in args.baseline],
                "target_ratio": TARGET_RATIO,
                "corpora": report,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
