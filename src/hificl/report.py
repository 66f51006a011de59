"""Results as JSON (for machines), a Markdown table (for people) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write, atomic_write_json, atomic_write_text

COLUMNS = [
    ("method", "method", "{}"),
    ("selection", "epoch", "{}"),
    ("accuracy", "score", None),
    ("trainable_params", "params", "{:,}"),
    ("train_seconds", "train time", "{:.0f} s"),
    ("train_seconds_per_step", "s / step", "{:.2f}"),
    ("seconds_per_query", "s / query", "{:.3f}"),
    ("prompt_tokens_per_query", "tokens / query", "{:.0f}"),
]


PERCENT_METRICS = ("vqa_accuracy", "exact_match")


def format_score(value: float, metric: str) -> str:
    """Accuracies as percentages; other metrics (CIDEr-D) as plain numbers."""
    return f"{value:.2%}" if metric in PERCENT_METRICS else f"{value:.4f}"


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if fmt is None:
        return format_score(value, row.get("metric", ""))
    if key == "trainable_params" and not value:
        return "0"
    return fmt.format(value)


def markdown_table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    columns = [c for c in COLUMNS if any(r.get(c[0]) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |" for row in rows]
    text = (f"**{results['task']}** on {results['backbone']}: {results['num_test']} test questions, "
            f"{results['num_train']} training samples, score = {rows[0].get('metric', '')}\n\n" + "\n".join(lines) + "\n")
    if results.get("data_efficiency"):
        text += "\nData efficiency (test score vs training samples):\n\n| samples | epochs | score |\n|---|---|---|\n"
        metric = rows[0].get("metric", "")
        text += "".join(f"| {p['samples']} | {p['epochs']} | {format_score(p['accuracy'], metric)} |\n"
                        for p in results["data_efficiency"])
    return text


def _plots(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results["rows"]
    labels = [r["method"] + (f"\n({r['selection']})" if r.get("selection", "").startswith("last") and len(
        [x for x in rows if x["method"] == r["method"]]) > 1 else "") for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    bars = axis.bar(range(len(rows)), [100 * r["accuracy"] for r in rows], color="#4c72b0")
    for bar, row in zip(bars, rows):
        axis.annotate(f"{100 * row['accuracy']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set_ylabel(f"test {rows[0].get('metric', 'score')} (x100)")
    axis.set_title(f"{results['task']} on {results['backbone']}")
    figure.tight_layout()
    written.append(folder / "accuracy.png")
    atomic_write(written[-1], lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)

    points = results.get("data_efficiency") or []
    if points:
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot([p["samples"] for p in points], [100 * p["accuracy"] for p in points], "o-", label=points[0]["method"])
        for row in rows:
            settings = row.get("settings", {})
            if "shots" in settings or row["method"] == "zero-shot":
                axis.axhline(100 * row["accuracy"], linestyle="--", linewidth=1, color="gray")
                axis.annotate(row["method"], (points[-1]["samples"], 100 * row["accuracy"]), fontsize=7,
                              ha="right", va="bottom", color="gray")
        axis.set_xscale("log")
        axis.set_xlabel("training samples")
        axis.set_ylabel(f"test {rows[0].get('metric', 'score')} (x100)")
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
