"""VQAv2, OK-VQA and Karpathy COCO captions from fixture files in exactly the official formats: readers, splits,
the published test subset, hand-computed VQA accuracy / CIDEr-D / CHAIR, clear errors, and a full
train -> eval -> report run per dataset on tiny random models."""

import json
import math
import random
import shutil

import jsonschema
import pytest

from fixtures import save_family, write_karpathy, write_vqa
from hificl import pipeline
from hificl.cli import main as cli_main
from hificl.metrics import MetricUnavailableError
from hificl.results import schema
from hificl.run_config import RunConfig, load_run_config, packaged_configs
from hificl.tasks import Answer, Instruction, get_task, read_vqa


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {"vqav2": str(write_vqa(root / "vqav2")), "okvqa": str(write_vqa(root / "okvqa", prefix="")),
            "coco": str(write_karpathy(root / "coco")), "root": root}


def test_vqav2_reader_and_splits(data):
    task = get_task("vqav2", seed=3407, root=data["vqav2"], validation_images=2)
    train, validation, test = task.splits["train"], task.splits["validation"], task.splits["test"]
    assert len(train) + len(validation) == 16 and len(validation) == 4 and len(test) == 6
    assert not {e.image.path for e in train} & {e.image.path for e in validation}, "held out by image"
    first = test[0]
    assert first.id == "1000" and first.question == "What colour is the square?" and len(first.answers) == 10
    assert first.target == "red", "the majority answer trains and demonstrates"
    assert first.image.path.endswith("val2014/COCO_val2014_000000001500.jpg")
    assert [int(e.id) for e in test] == sorted(int(e.id) for e in test)
    prompt = task.query_prompt(first)
    assert isinstance(prompt[0], Instruction) and prompt[1] == first.image
    assert prompt[2] == "Question: What colour is the square?\nAnswer:"
    demonstration = task.demonstration(first)
    assert not any(isinstance(s, Instruction) for s in demonstration), "demonstrations do not repeat the instruction"
    assert isinstance(demonstration[-1], Answer) and demonstration[-1] == " red\n" and demonstration[-1].text == "red"
    assert task.max_new_tokens == 20 and list(task.stop_strings) == ["\n", "Question", "Answer", "Image", "Short"]


def test_vqav2_test_subset_is_the_published_definition(data):
    task = get_task("vqav2", seed=3407, root=data["vqav2"], test_size=4, subset_seed=11, validation_images=0)
    everything = sorted(range(1000, 1006))
    expected = sorted(random.Random(11).sample(everything, 4))
    assert [int(e.id) for e in task.splits["test"]] == expected
    again = get_task("vqav2", seed=3407, root=data["vqav2"], test_size=4, subset_seed=11, validation_images=0)
    assert [e.id for e in again.splits["test"]] == [e.id for e in task.splits["test"]]


def test_okvqa_uses_its_file_names_and_the_whole_val_set(data):
    task = get_task("ok-vqa", seed=3407, root=data["okvqa"], validation_images=1)
    assert task.name == "ok-vqa" and len(task.splits["test"]) == 6 and len(task.splits["validation"]) == 2
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco_train2014_questions.json"):
        get_task("vqav2", seed=3407, root=data["okvqa"])


def test_vqa_accuracy_agrees_with_hand_computed_values(data):
    task = get_task("vqav2", seed=3407, root=data["vqav2"], validation_images=0)
    red = next(e for e in task.splits["test"] if e.id == "1000")  # 6 x red, 2 x dark red, 2 x maroon
    # each of the 10 leave-one-out subsets of 9 answers scores min(1, matches / 3):
    # "maroon": 2 subsets keep 1 match (1/3), 8 keep 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    cases = {"red": 1.0, "Red.": 1.0, "maroon": 0.6, "dark red": 0.6, "blue": 0.0}
    summary = task.score_corpus(list(cases), [red] * len(cases))
    assert summary.per_example == pytest.approx(list(cases.values()))
    assert summary.score == pytest.approx(sum(cases.values()) / len(cases))


def test_coco_karpathy_reader_splits_and_targets(data):
    task = get_task("coco-captions", seed=3407, root=data["coco"], validation_images=2)
    assert task.name == "coco-captions" and task.metric == "cider_d" and task.scorer.corpus_level
    assert sorted(e.id for e in task.splits["test"]) == ["9001", "9002"], "Karpathy val is the test set"
    assert len(task.splits["train"]) == 6 and len(task.splits["validation"]) == 2, "train + restval, 2 held out"
    example = task.splits["test"][0]
    assert len(example.answers) == 5 and example.target == "A red bus parked outside." and example.question == ""
    assert example.image.path.endswith("val2014/COCO_val2014_000000009001.jpg")
    assert task.query_prompt(example) == [example.image, "Caption:"]
    other = get_task("coco-captions", seed=3407, root=data["coco"], test_split="test", validation_images=0)
    assert sorted(e.id for e in other.splits["test"]) == ["9101", "9102"]


def test_cider_and_chair_agree_with_hand_computed_values(data):
    task = get_task("coco-captions", seed=3407, root=data["coco"], instances="annotations/instances_val2014.json",
                    validation_images=0)
    bus, cats = sorted(task.splits["test"], key=lambda e: e.id)
    # The two images' references share no word, so every n-gram has idf log(2) and CIDEr-D reduces to count
    # cosines. Exact match: 10. "two green cats" vs "two green cats sleeping together": n=1..4 cosines
    # 3/sqrt(15), 2/sqrt(8), 1/sqrt(3), 0, length penalty exp(-(2 - 4)^2 / 72); times 10.
    partial = 10 * (3 / math.sqrt(15) + 2 / math.sqrt(8) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    summary = task.score_corpus(["A red bus parked outside", "two green cats"], [bus, cats])
    assert summary.per_example == pytest.approx([10.0, partial], abs=1e-4)
    assert summary.score == pytest.approx((10.0 + partial) / 2, abs=1e-4)
    # CHAIR: ground truth = instances (bus / cat) + objects of the references. "a dog near a bus": 2 mentions,
    # 1 hallucinated (dog); "two cats": correct. CHAIR_i = 1/3, CHAIR_s = 1/2, recall = 2/2.
    details = task.score_corpus(["a dog near a bus", "two cats"], [bus, cats]).details
    assert details == pytest.approx({"chair_i": 1 / 3, "chair_s": 0.5, "chair_recall": 1.0})
    plain = get_task("coco-captions", seed=3407, root=data["coco"], validation_images=0)
    assert plain.score_corpus(["a bus", "a cat"], [bus, cats]).details == {}, "no instances: no CHAIR"


def test_clear_errors_for_bad_data(data, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        get_task("vqav2", seed=3407, root=str(tmp_path / "nowhere"))
    root = tmp_path / "vqa"
    shutil.copytree(data["vqav2"], root)
    annotations = json.loads((root / "v2_mscoco_val2014_annotations.json").read_text())
    annotations["annotations"] = annotations["annotations"][1:]
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"questions\[0\]: question_id 1000 has no annotation"):
        get_task("vqav2", seed=3407, root=str(root))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [{"question_id": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\]: needs 'question_id' \(int\)"):
        read_vqa(root / "v2_OpenEnded_mscoco_val2014_questions.json", root / "v2_mscoco_val2014_annotations.json", root)
    shutil.rmtree(root / "val2014")
    with pytest.raises(FileNotFoundError, match="Image folder not found: .*val2014"):
        read_vqa(root / "v2_OpenEnded_mscoco_val2014_questions.json", root / "v2_mscoco_val2014_annotations.json", root)
    coco = tmp_path / "coco"
    shutil.copytree(data["coco"], coco)
    instances = json.loads((coco / "annotations/instances_val2014.json").read_text())
    instances["images"] = [image for image in instances["images"] if image["id"] != 9102]
    (coco / "annotations" / "instances_train2014.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"does not cover 1 test image\(s\) \(e.g. \['9102'\]\)"):
        get_task("coco-captions", seed=3407, root=str(coco), test_split="test", instances="annotations/instances_train2014.json",
                 validation_images=0)
    monkeypatch.setattr("hificl.metrics.cider.shutil.which", lambda name: None)
    with pytest.raises(MetricUnavailableError, match="needs Java, but `java` is not on PATH"):
        get_task("coco-captions", seed=3407, root=data["coco"], validation_images=0)


@pytest.mark.parametrize("dataset, family, chat", [("vqav2", "qwen2_vl", True), ("ok-vqa", "idefics2", False),
                                                   ("coco-captions", "llava_qwen2", True)])
def test_train_eval_report_per_dataset(data, tmp_path, dataset, family, chat):
    root = {"vqav2": data["vqav2"], "ok-vqa": data["okvqa"], "coco-captions": data["coco"]}[dataset]
    task = {"name": dataset, "root": root, "validation_images": 2}
    if dataset == "coco-captions":
        task["instances"] = "annotations/instances_val2014.json"
    config = RunConfig.from_dict({
        "backbone": save_family(tmp_path / "model", family, chat), "output_dir": str(tmp_path / "run"),
        "progress": False, "task": task, "train_samples": 6, "validation_samples": 2,
        "methods": [{"name": "zero-shot"}, {"name": "icl", "shots": 2}, {"name": "hificl"}],
        "train": {"epochs": 2, "batch_size": 2, "grad_accum": 2, "lr": 0.05},
        "eval": {"batch_size": 4, "num_beams": 2, "max_new_tokens": 4}})
    results = pipeline.compare(config)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == {"vqav2": "vqav2", "ok-vqa": "ok-vqa", "coco-captions": "coco-captions"}[dataset]
    assert [r["method"] for r in results["rows"]][:2] == ["zero-shot", "2-shot ICL"]
    metric = "cider_d" if dataset == "coco-captions" else "vqa_accuracy"
    for row in results["rows"]:
        assert row["metric"] == metric and row["num_queries"] == saved["num_test"] and row[metric] >= 0
        if metric == "cider_d":
            assert {"chair_s", "chair_i", "chair_recall"} <= set(row)
    hificl = [r for r in results["replicates"] if r["method"] == "HiFICL"]
    assert hificl and hificl[-1]["train_steps"] == 2 * 2 and all(r["history"][0][f"val_{metric}"] >= 0 for r in hificl)
    assert sorted(json.loads((out / "test_ids.json").read_text())) == sorted(
        json.loads(line)["id"] for line in (out / "zero-shot" / "predictions.jsonl").read_text().splitlines())
    predictions = [json.loads(line) for line in (out / "zero-shot" / "predictions.jsonl").read_text().splitlines()]
    zero_shot = results["rows"][0]
    assert zero_shot[metric] == pytest.approx(sum(p["score"] for p in predictions) / len(predictions))
    assert (out / "results.md").read_text().startswith("**") and (out / f"{metric}.png").stat().st_size > 0
    jsonschema.validate(json.loads((out / "results.json").read_text()), schema())  # CHAIR's scores too


def test_packaged_benchmark_configs_are_valid(data):
    names = [n for n in packaged_configs() if not n.startswith("embedded-")]
    assert len(names) == 12
    for name in names:
        config = load_run_config(name)
        dataset = {"vqav2": "vqav2", "ok-vqa": "okvqa", "coco-captions": "coco"}[config.task["name"]]
        local = {"root": data[dataset], "validation_images": 1}
        local.update({"image_root": data[dataset]} if "image_root" in config.task else {})
        task = get_task(**{**config.task, **local}, seed=config.seed)  # every option of the config is one the task takes
        assert task.max_new_tokens == 20 and task.stop_strings[0] == "\n"
        assert config.task["name"] in ("vqav2", "ok-vqa", "coco-captions") and config.train_samples == 1000
        assert config.seed == 3407 and config.train.epochs == 3 and config.train.batch_size == 2
        assert config.train.grad_accum == 2 and config.train.mixed_precision == "bf16" and config.dtype == "bfloat16"
        assert config.train.lr == (5e-4 if name.startswith("qwen3-vl") else 5e-3)
        hificl = next(m for m in config.methods if m["name"] == "hificl")
        assert hificl["rank"] == (16 if config.task["name"] == "ok-vqa" else 8) and hificl["num_virtual_tokens"] == 8
        assert {"name": "icl", "shots": 8} in config.methods and config.eval.max_new_tokens == 20


def test_a_packaged_config_runs_from_the_command_line(data, tmp_path, capsys):
    """`hificl compare --config qwen3-vl-vqav2` with the data and the model given on the command line (scaled down;
    bf16 autocast off: accelerate fixes the mixed precision once per process, and other tests ran without it)."""
    model = save_family(tmp_path / "model", "qwen3_vl", chat=True)
    out = tmp_path / "run"
    code = cli_main(["compare", "--config", "qwen3-vl-vqav2", "--backbone", model, "--output-dir", str(out),
                     "--no-progress", "--set", f"task.root={data['vqav2']}", "--set", f"task.image_root={data['vqav2']}",
                     "--set", "task.validation_images=1", "--set", "train_samples=4", "--set", "validation_samples=2",
                     "--set", "methods.1.shots=1", "--set", "train.epochs=1", "--set", "eval.max_new_tokens=3",
                     "--set", "train.mixed_precision='no'"])
    assert code == 0 and "HiFICL" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dtype"] == "bfloat16" and results["config"]["train"]["lr"] == 5e-4
    assert [row["method"] for row in results["rows"]][:2] == ["zero-shot", "1-shot ICL"]
    assert len(json.loads((out / "test_ids.json").read_text())) == 6
