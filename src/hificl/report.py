"""Results as JSON (for machines: `hificl.results` and its schema), a Markdown table (for people) and PNG plots
(the scores, in a file named after the metric, and the data-efficiency curve). Scores are read and shown by
their metric's name (`hificl.metrics`): percentages for accuracies, plain numbers for CIDEr-D. A row measured
over several seeds shows its mean, the standard deviation over seeds and a 95% bootstrap confidence interval
(over the test questions and the seeds; over the questions alone for one seed); the plots draw the interval as
error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write, atomic_write_json, atomic_write_text
from .metrics import get_metric

COLUMNS = [
    ("method", "method", "{}"),
    ("selection", "epoch", "{}"),
    ("score", "score", None),
    ("std", "± seeds", None),
    ("ci", "95% CI", None),
    ("seeds", "seeds", None),
    ("labelled_examples", "labelled", "{:,.0f}"),  # means over seeds of a count (ICL: distinct demonstrations)
    ("unlabelled_examples", "unlabelled", "{:,.0f}"),
    ("trainable_params", "params", "{:,}"),
    ("adapter_params", "adapter params", "{:,}"),
    ("train_seconds", "train time", "{:.0f} s"),
    ("train_seconds_per_step", "s / step", "{:.2f}"),
    ("seconds_per_query", "s / query", "{:.3f}"),
    ("prompt_tokens_per_query", "tokens / query", "{:.0f}"),
]


def score_of(row: dict[str, Any]) -> float:
    """A result row's score: the value of the metric it names."""
    return row[row["metric"]]


def interval(entry: dict[str, Any]) -> tuple[float, float] | None:
    """The 95% interval of a row or data-efficiency point: over questions and seeds, or questions alone (1 seed)."""
    spread = entry.get("spread")
    if not spread:
        return None
    return tuple(spread["ci_questions_and_seeds"] if spread["replicates"] > 1 else spread["ci_questions"])


def _statistic(row: dict[str, Any], key: str) -> str:
    metric, spread = get_metric(row["metric"]), row.get("spread")
    if key == "score":
        return metric.format(score_of(row))
    if not spread:
        return "-"
    if key == "seeds":
        return str(spread["replicates"])
    if key == "std":
        return f"{metric.scale(spread['std']):.2f}" if spread["replicates"] > 1 else "-"
    low, high = interval(row)
    return f"{metric.scale(low):.2f}-{metric.scale(high):.2f}"


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    if fmt is None:
        return _statistic(row, key)
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if key == "trainable_params" and not value:
        return "0"
    return fmt.format(value)


def markdown_table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    columns = [c for c in COLUMNS if c[0] == "score" or (c[2] is None and any(r.get("spread") for r in rows))
               or any(r.get(c[0]) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |" for row in rows]
    metric = get_metric(results["metric"])
    seeds = results.get("seeds") or []
    trained = (f"{results['num_train']} training samples" if results.get("num_train") is not None
               else "training samples not recorded in the adapter")
    text = (f"**{results['task']}** on {results['backbone']}: {results['num_test']} test questions, "
            f"{trained}, score = {metric.name}"
            + (f"; methods with randomness of their own over seeds {', '.join(map(str, seeds))} (mean, standard "
               "deviation over seeds, 95% bootstrap interval over questions and seeds)" if len(seeds) > 1 else "")
            + "\n\n" + "\n".join(lines) + "\n")
    if results.get("data_efficiency"):
        text += ("\nData efficiency (test score vs training samples):\n\n| samples | epochs | score | 95% CI |\n"
                 "|---|---|---|---|\n")
        for point in results["data_efficiency"]:
            low, high = interval(point) or (point["score"], point["score"])
            text += (f"| {point['samples']} | {point['epochs']} | {metric.format(point['score'])} | "
                     f"{metric.scale(low):.2f}-{metric.scale(high):.2f} |\n")
    if results.get("phases"):
        spent = ", ".join(f"{p['phase']} {_duration(p['seconds'])}" for p in results["phases"])
        text += f"\nWall time: {_duration(results['total_seconds'])} in all ({spent}).\n"
    return text


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def plot_name(results: dict[str, Any]) -> str:
    """The file of the bar chart of every row's score: named after the metric (``vqa_accuracy.png``, ``cider_d.png``)."""
    return f"{results['metric']}.png"


def _plots(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results["rows"]
    metric = get_metric(results["metric"])
    unit = " (x100)" if metric.percent else ""
    labels = [r["method"] + (f"\n({r['selection']})" if r.get("selection", "").startswith("last") and len(
        [x for x in rows if x["method"] == r["method"]]) > 1 else "") for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    heights = [metric.scale(score_of(r)) for r in rows]
    errors = [[h - metric.scale((interval(r) or (score_of(r),) * 2)[0]) for h, r in zip(heights, rows)],
              [metric.scale((interval(r) or (score_of(r),) * 2)[1]) - h for h, r in zip(heights, rows)]]
    bars = axis.bar(range(len(rows)), heights, yerr=errors, capsize=3, color="#4c72b0", ecolor="#333333")
    for bar, row, above in zip(bars, rows, errors[1]):  # the value above its error bar
        axis.annotate(f"{metric.scale(score_of(row)):.1f}", (bar.get_x() + bar.get_width() / 2,
                      bar.get_height() + above), xytext=(0, 2), textcoords="offset points",
                      ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set_ylabel(f"test {metric.title}{unit}")
    axis.set_title(f"{results['task']} on {results['backbone']}")
    figure.tight_layout()
    written.append(folder / plot_name(results))
    atomic_write(written[-1], lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)

    points = list(results.get("data_efficiency") or [])
    if points:
        trained = next((r for r in rows if r["method"] == points[0]["method"]), None)
        if trained is not None and results.get("num_train") not in {p["samples"] for p in points}:
            points.append({"samples": results["num_train"], "score": score_of(trained),
                           "spread": trained.get("spread")})
            points.sort(key=lambda p: p["samples"])  # the main table's run is the curve's last point
        figure, axis = plt.subplots(figsize=(6, 4))
        means = [metric.scale(p["score"]) for p in points]
        bounds = [interval(p) or (p["score"], p["score"]) for p in points]
        axis.errorbar([p["samples"] for p in points], means, capsize=3, fmt="o-", label=points[0]["method"],
                      yerr=[[m - metric.scale(b[0]) for m, b in zip(means, bounds)],
                            [metric.scale(b[1]) - m for m, b in zip(means, bounds)]])
        for row in rows:
            if not row["trained"]:  # zero-shot and in-context learning: reference levels
                axis.axhline(metric.scale(score_of(row)), linestyle="--", linewidth=1, color="gray")
                axis.annotate(row["method"], (points[-1]["samples"], metric.scale(score_of(row))), fontsize=7,
                              ha="right", va="bottom", color="gray")
        axis.set_xscale("log")
        axis.set_xticks([p["samples"] for p in points], [str(p["samples"]) for p in points])
        axis.minorticks_off()
        axis.set_xlabel("training samples")
        axis.set_ylabel(f"test {metric.title}{unit}")
        axis.set_title("score vs training samples (dashed: in-context learning)")
        axis.legend()
        figure.tight_layout()
        written.append(folder / "data_efficiency.png")
        atomic_write(written[-1], lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
        plt.close(figure)
    return written


def write_report(results: dict[str, Any], folder: str | Path) -> str:
    """Write results.json, results.md and the plots into `folder`; return the Markdown table."""
    folder = Path(folder)
    atomic_write_json(folder / "results.json", results)
    table = markdown_table(results)
    atomic_write_text(folder / "results.md", table)
    results["plots"] = [str(p) for p in _plots(results, folder)]
    return table
