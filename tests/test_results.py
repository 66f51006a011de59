"""Typed result rows and results.json's schema: every kind of method the packaged configs run writes rows that
validate against the shipped schema (compare and eval); aggregation goes by the epoch choice and averages every
registered metric and each field as it declares; the plot is named after the metric."""

import json

import jsonschema
import pytest

from hificl import pipeline
from hificl.methods import METHODS
from hificl.results import SCHEMA_VERSION, EpochChoice, Row, aggregate, schema
from hificl.run_config import RunConfig, load_run_config, packaged_configs


def _packaged_method_kinds() -> list[str]:
    return sorted({spec["name"] for name in packaged_configs() for spec in load_run_config(name).methods})


def _validate(results: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(json.loads(json.dumps(results)), schema(), cls=jsonschema.Draft202012Validator)


def test_every_method_kind_writes_rows_the_schema_accepts(tiny_vlm, colour_task, tmp_path):
    """Every method the packaged configs run, and every other registered one, in one compare (two seeds, epoch
    selection, a data-efficiency point) and an eval of a saved adapter."""
    kinds = sorted(METHODS.names())
    assert set(_packaged_method_kinds()) <= set(kinds)
    methods = [{"name": kind, **({"shots": 2} if kind in ("icl", "live", "mimic", "distill") else {})} for kind in kinds]
    config = RunConfig.from_dict({
        "backbone": tiny_vlm, "output_dir": str(tmp_path / "compare"), "progress": False, "seeds": [1, 2],
        "task": {"name": "jsonl", "train": colour_task["train"], "test": colour_task["test"], "validation_size": 4},
        "methods": methods, "train": {"epochs": 2, "batch_size": 4, "grad_accum": 1, "lr": 0.05},
        "eval": {"batch_size": 4, "max_new_tokens": 3}, "validation_samples": 4, "train_samples": 8,
        "test_samples": 5, "data_efficiency": [{"samples": 4, "epochs": 1}]})
    results = pipeline.compare(config)
    saved = json.loads((tmp_path / "compare" / "results.json").read_text())
    _validate(saved)
    assert saved["schema_version"] == SCHEMA_VERSION and saved["data_efficiency"]
    assert {row["settings"]["name"] for row in saved["rows"]} == set(kinds)
    assert all(row["trained"] == (row["settings"]["name"] not in ("zero-shot", "icl")) for row in saved["rows"])
    trained = [row for row in saved["rows"] if row["trained"]]
    assert all(row["selection"] in {c.value for c in EpochChoice} and row["spread"]["replicates"] == 2 for row in trained)
    assert (tmp_path / "compare" / "vqa_accuracy.png").stat().st_size > 0
    assert not (tmp_path / "compare" / "accuracy.png").exists()

    hificl = next(r for r in results["rows"] if r["settings"]["name"] == "hificl")
    adapter = tmp_path / "adapter"
    pipeline.train(RunConfig.from_dict({**config.to_dict(), "output_dir": str(tmp_path / "train"),
                                        "methods": [{"name": "hificl"}], "data_efficiency": []}))
    (tmp_path / "train" / "adapter").rename(adapter)
    evaluated = pipeline.evaluate_config(RunConfig.from_dict({
        **config.to_dict(), "output_dir": str(tmp_path / "eval"), "data_efficiency": [],
        "methods": [{"name": "zero-shot"}, {"name": "hificl"}]}), str(adapter))
    _validate(json.loads((tmp_path / "eval" / "results.json").read_text()))
    row = next(r for r in evaluated["rows"] if r["trained"])
    assert row["adapter"] == str(adapter) and row["train_samples"] == 8 and hificl["trainable_params"] > 0


def test_a_row_missing_what_the_schema_requires_is_refused():
    row = Row("HiFICL", "hificl-1", {"method": "HiFICL", "name": "hificl"}, True, "vqa_accuracy",
              {"vqa_accuracy": 0.5}, 4, 0.1, 10.0, selection=EpochChoice.LAST).to_json()
    assert row["vqa_accuracy"] == 0.5 and row["selection"] == "last epoch" and "seed" not in row
    definition = {**schema()["$defs"]["row"], "$defs": schema()["$defs"]}
    jsonschema.validate(row, definition)
    for broken in ({k: v for k, v in row.items() if k != "trained"}, {**row, "selection": "best"},
                   {**row, "vqa_accuracy": "high"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, definition)


def _replicate(seed, selection, epoch, per_question, **values):
    return Row("HiFICL", "hificl-1", {"method": "HiFICL", "name": "hificl"}, True, "cider_d",
               {"cider_d": sum(per_question) / len(per_question), **values.pop("scores", {})}, len(per_question),
               values.pop("seconds_per_query", 0.1), 10.0, seed=seed, selection=selection, epoch=epoch,
               per_question=per_question, **values)


def test_aggregation_goes_by_the_epoch_choice_and_averages_every_registered_metric():
    replicates = [
        _replicate(1, EpochChoice.SELECTED, 1, [1.0, 0.0], scores={"chair_s": 0.2}, train_peak_memory_mb=100.0,
                   train_seconds=10.0),
        _replicate(1, EpochChoice.LAST, 2, [0.0, 0.0], scores={"chair_s": 0.4}, train_peak_memory_mb=100.0,
                   train_seconds=10.0),
        _replicate(2, EpochChoice.SELECTED_IS_LAST, 2, [1.0, 1.0], scores={"chair_s": 0.6},
                   train_peak_memory_mb=300.0, train_seconds=30.0),
    ]
    selected, last = aggregate(replicates)
    assert selected.selection is EpochChoice.SELECTED and last.selection is EpochChoice.LAST
    assert selected.epochs_reported == [1, 2] and last.epochs_reported == [2, 2]
    assert selected.score == pytest.approx(0.75) and last.score == pytest.approx(0.5)
    assert selected.scores["chair_s"] == pytest.approx(0.4) and last.scores["chair_s"] == pytest.approx(0.5)
    assert selected.train_peak_memory_mb == 300.0 and selected.train_seconds == 20.0  # max, and mean
    assert selected.seed is None and selected.per_question is None and selected.seeds == [1, 2]
    assert selected.replicate_scores == [0.5, 1.0] and selected.spread["replicates"] == 2
    one = aggregate([_replicate(3, None, None, [0.0, 1.0])])
    assert len(one) == 1 and one[0].selection is None and one[0].epochs_reported is None
