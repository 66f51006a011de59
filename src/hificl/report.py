"""Results as JSON (for machines), a Markdown table (for people) and PNG plots. Scores are read and shown by
their metric's name (`hificl.metrics`): percentages for accuracies, plain numbers for CIDEr-D."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write, atomic_write_json, atomic_write_text
from .metrics import get_metric

COLUMNS = [
    ("method", "method", "{}"),
    ("selection", "epoch", "{}"),
    ("score", "score", None),
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


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    if fmt is None:
        return get_metric(row["metric"]).format(score_of(row))
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if key == "trainable_params" and not value:
        return "0"
    return fmt.format(value)


def markdown_table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    columns = [c for c in COLUMNS if c[2] is None or any(r.get(c[0]) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |" for row in rows]
    metric = get_metric(results["metric"])
    text = (f"**{results['task']}** on {results['backbone']}: {results['num_test']} test questions, "
            f"{results['num_train']} training samples, score = {metric.name}\n\n" + "\n".join(lines) + "\n")
    if results.get("data_efficiency"):
        text += "\nData efficiency (test score vs training samples):\n\n| samples | epochs | score |\n|---|---|---|\n"
        text += "".join(f"| {p['samples']} | {p['epochs']} | {metric.format(p['score'])} |\n"
                        for p in results["data_efficiency"])
    return text


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
    bars = axis.bar(range(len(rows)), [metric.scale(score_of(r)) for r in rows], color="#4c72b0")
    for bar, row in zip(bars, rows):
        axis.annotate(f"{metric.scale(score_of(row)):.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set_ylabel(f"test {metric.title}{unit}")
    axis.set_title(f"{results['task']} on {results['backbone']}")
    figure.tight_layout()
    written.append(folder / "accuracy.png")
    atomic_write(written[-1], lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)

    points = results.get("data_efficiency") or []
    if points:
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot([p["samples"] for p in points], [metric.scale(p["score"]) for p in points], "o-",
                  label=points[0]["method"])
        for row in rows:
            settings = row.get("settings", {})
            if "shots" in settings and not row.get("trainable_params") or row["method"] == "zero-shot":
                axis.axhline(metric.scale(score_of(row)), linestyle="--", linewidth=1, color="gray")
                axis.annotate(row["method"], (points[-1]["samples"], metric.scale(score_of(row))), fontsize=7,
                              ha="right", va="bottom", color="gray")
        axis.set_xscale("log")
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
