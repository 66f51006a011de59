"""How far one method of a compare is above or below another, paired on the same test questions and seeds: the
mean of the per-question differences of their scores, its spread over seeds and its 95% bootstrap intervals
(`hificl.stats.spread` of the differences). Pairing removes what both rows share (which questions are hard, the
seed's data), so the interval of the difference is narrower than the two rows' intervals side by side.

    python benchmarks/paired_difference.py runs/elements-distill/results.json "distilled (8-shot)" "8-shot ICL"

Methods are named by their table label (the `method` column). Prints one line; `--json` prints the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hificl.metrics import get_metric
from hificl.results import EpochChoice
from hificl.stats import Spread, spread


def _per_question(results: dict[str, Any], label: str) -> dict[Any, list[float]]:
    rows = [r for r in results["replicates"] if r["method"] == label]
    if not rows:
        labels = sorted({r["method"] for r in results["replicates"]})
        raise SystemExit(f"no method labelled {label!r} in these results; the labels are: {labels}")
    last = {}  # a trained method's replicate may report two epochs: the last epoch is the one compared
    for row in rows:
        if row["seed"] not in last or row.get("selection") in (EpochChoice.LAST, EpochChoice.SELECTED_IS_LAST):
            last[row["seed"]] = row["per_question"]
    return last


def difference(results: dict[str, Any], method: str, against: str) -> Spread:
    """The spread of ``method - against`` per test question, over the seeds both have (a method without randomness
    of its own, measured once, is paired with every seed of the other)."""
    one, two = _per_question(results, method), _per_question(results, against)
    if 1 in (len(one), len(two)):  # measured once (no randomness of its own): paired with each of the other's
        seeds = sorted(two if len(one) == 1 else one, key=str)
    else:
        seeds = sorted(set(one) & set(two), key=str)
    if not seeds:
        raise SystemExit(f"{method!r} and {against!r} share no seed: {sorted(one, key=str)} against "
                         f"{sorted(two, key=str)}")

    def at(scores: dict[Any, list[float]], seed: Any) -> list[float]:
        return scores[seed] if seed in scores else next(iter(scores.values()))  # measured once: every seed's

    return spread([np.subtract(at(one, seed), at(two, seed)) for seed in seeds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a compare's results.json")
    parser.add_argument("method")
    parser.add_argument("against")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    found = difference(results, args.method, args.against)
    if args.json:
        print(json.dumps(found.to_dict()))
        return
    metric = get_metric(results["metric"])
    scale, unit = metric.scale, " points" if metric.percent else ""
    (low, high), (low_s, high_s) = found.ci_questions, found.ci_questions_and_seeds
    print(f"{args.method} - {args.against}: {scale(found.mean):+.2f}{unit} over {found.replicates} seed(s) "
          f"(+- {scale(found.std):.2f} over seeds; 95% CI over questions {scale(low):+.2f} to {scale(high):+.2f}, "
          f"over questions and seeds {scale(low_s):+.2f} to {scale(high_s):+.2f})")


if __name__ == "__main__":
    main()
