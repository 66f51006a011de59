"""A run never reports what it did not compute: resuming under changed settings is refused with what changed,
result folders never collide, a non-finite loss stops training and saves no adapter, one output folder holds one
run at a time, `eval` reports the adapter it loads, the README's own-data command runs as printed, and bad input
gets an error that names the file, the field and the fix."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from fixtures import write_colour_task
from hificl import AdapterMismatchError
from hificl import pipeline
from hificl.adapters import WEIGHTS_NAME, load_adapter_model
from hificl.backbones import load_backbone
from hificl.cli import main as cli_main
from hificl.io import _HOST, LOCK_NAME, folder_lock
from hificl.run_config import RunConfig, load_run_config
from hificl.tasks import read_jsonl
from hificl.trainer import Trainer

README = Path(__file__).resolve().parents[1] / "README.md"


def _train_args(tiny_vlm, colour_task, out, *extra):
    return ["train", "--backbone", tiny_vlm, "--no-progress", "--output-dir", str(out),
            "--set", f"task={{name: jsonl, train: {colour_task['train']}, test: {colour_task['test']}}}",
            "--set", "methods=[{name: hificl, rank: 4}]", "--set", "train.epochs=1", "--set", "train.batch_size=8",
            "--set", "train.grad_accum=1", "--set", "validation_samples=0", "--set", "eval.max_new_tokens=2",
            *extra]


@pytest.mark.parametrize("change, named", [
    ("methods.0.key_b_std=0.5", "method.key_b_std"), ("methods.0.init_seed=7", "method.init_seed"),
    ("methods.0.normalizer=unmasked", "method.normalizer"), ("seed=11", "seed"),
    ("train_samples=12", "train_data.count"), ("methods.0.rank=8", "method.rank"),
    ("methods.0.num_virtual_tokens=4", "method.num_virtual_tokens"), ("train.lr=0.01", "config.lr"),
])
def test_a_changed_rerun_is_refused_and_names_the_change(tiny_vlm, colour_task, tmp_path, capsys, change, named):
    out = tmp_path / "run"
    assert cli_main(_train_args(tiny_vlm, colour_task, out)) == 0
    before = (out / "adapter" / WEIGHTS_NAME).read_bytes()
    capsys.readouterr()
    assert cli_main(_train_args(tiny_vlm, colour_task, out, "--set", change)) == 2
    error = capsys.readouterr().err
    assert "settings changed" in error and named in error and "--restart" in error, error
    assert (out / "adapter" / WEIGHTS_NAME).read_bytes() == before, "the old adapter is left as it was"
    assert cli_main(_train_args(tiny_vlm, colour_task, out, "--set", change, "--restart")) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    default = load_run_config(None).train_samples
    assert summary["train"]["steps"] > 0 and summary["config"]["train_samples"] == (12 if "samples" in change else default)


def test_a_changed_train_file_is_refused(tiny_vlm, colour_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_train_args(tiny_vlm, colour_task, out)) == 0
    other = write_colour_task(tmp_path / "other", n_train=24)
    lines = Path(other["train"]).read_text().splitlines()
    Path(other["train"]).write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same lines, another order
    capsys.readouterr()
    args = _train_args(tiny_vlm, colour_task, out)
    args[args.index(f"task={{name: jsonl, train: {colour_task['train']}, test: {colour_task['test']}}}")] = \
        f"task={{name: jsonl, train: {other['train']}, test: {colour_task['test']}}}"
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    assert "train_data.digest" in error


def test_a_run_killed_after_an_epoch_is_not_resumed_under_another_normalizer(tiny_vlm, colour_task, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "run"
    original = Trainer._save_checkpoint

    def crash_after_epoch_1(self, name, position, result, artifact):
        original(self, name, position, result, artifact)
        if name == "epoch-1":
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", crash_after_epoch_1)
    assert cli_main(_train_args(tiny_vlm, colour_task, out, "--set", "train.epochs=2")) == 130
    assert "resume" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    assert cli_main(_train_args(tiny_vlm, colour_task, out, "--set", "train.epochs=2",
                                "--set", "methods.0.normalizer=unmasked")) == 2
    assert "method.normalizer: 'exact' -> 'unmasked'" in capsys.readouterr().err
    assert not (out / "adapter").exists(), "no adapter is reported as the result"


def test_compare_gives_each_method_its_own_folder_and_refuses_duplicates(tiny_vlm, colour_task, tmp_path):
    base = {"backbone": tiny_vlm, "output_dir": str(tmp_path / "run"), "progress": False, "validation_samples": 0,
            "task": {"name": "jsonl", "train": colour_task["train"], "test": colour_task["test"]},
            "train": {"epochs": 1, "batch_size": 8, "grad_accum": 1}, "eval": {"max_new_tokens": 2}}
    config = RunConfig.from_dict({**base, "methods": [
        {"name": "hificl", "rank": 8, "value_b_std": 0.3}, {"name": "hificl", "rank": 4, "value_b_std": 0.3},
        {"name": "hificl", "rank": 4, "value_b_std": 0.3, "init_seed": 5},
        {"name": "hificl", "rank": 4, "value_b_std": 0.3, "init_seed": 5, "train": {"lr": 0.01}}]})
    results = pipeline.compare(config)
    ids = [row["id"] for row in results["rows"]]
    assert len(set(ids)) == 4 and all((tmp_path / "run" / i).is_dir() for i in ids)
    ranks = [row["settings"]["rank"] for row in results["rows"]]
    assert ranks == [8, 4, 4, 4] and results["rows"][1]["trainable_params"] < results["rows"][0]["trainable_params"]
    # every row, the table and the plot say which entry it is: the settings in which the entries differ
    labels = [row["method"] for row in results["rows"]]
    assert labels == ["HiFICL (init_seed=default, rank=8, train.lr=default)",
                      "HiFICL (init_seed=default, rank=4, train.lr=default)",
                      "HiFICL (init_seed=5, rank=4, train.lr=default)", "HiFICL (init_seed=5, rank=4, train.lr=0.01)"]
    assert all(f"| {label} |" in (tmp_path / "run" / "results.md").read_text() for label in labels)
    predictions = [json.loads((tmp_path / "run" / i / "seed-3407" / "test-epoch-1" / "metrics.json").read_text())
                   for i in ids]
    assert all(p["num_queries"] == 8 for p in predictions)
    with pytest.raises(ValueError, match=r"methods\[0\] and methods\[1\] are the same method"):
        pipeline.compare(RunConfig.from_dict({**base, "methods": [{"name": "hificl", "rank": 8, "train": {"lr": 0.1}},
                                                                  {"name": "hificl", "rank": 8, "train": {"lr": 0.1}}]}))


def test_a_non_finite_loss_stops_training_and_saves_no_adapter(tiny_vlm, colour_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_train_args(tiny_vlm, colour_task, out, "--set", "train.lr=1.0e+30",
                                "--set", "train.max_grad_norm=0")) == 2
    error = capsys.readouterr().err
    assert re.search(r"loss is (nan|inf)", error) and "train.lr" in error, error
    assert not (out / "adapter").exists() and not list(out.glob("train/epoch-*"))


def test_one_output_folder_holds_one_run(tiny_vlm, colour_task, tmp_path, capsys):
    out = tmp_path / "run"
    with folder_lock(out):
        assert cli_main(_train_args(tiny_vlm, colour_task, out)) == 2
        assert f"Another hificl run (pid {os.getpid()}" in capsys.readouterr().err
    with folder_lock(out):
        pass  # released with the run that held it
    (out / LOCK_NAME).write_text(json.dumps({"host": _HOST, "pid": 2**22 + 12345, "started": "long ago"}))
    dead = f"{_HOST}-{2**22 + 12345}"
    stale = out / f".epoch-1.tmp-{dead}-abc"  # a save interrupted by a kill
    stale.mkdir()
    (out / "adapter").mkdir()
    aside = out / f".kept.tmp-{dead}-old-123"  # killed between setting a folder aside and putting the new one in
    aside.mkdir()
    (aside / "adapter_model.safetensors").write_text("the only copy")
    assert cli_main(_train_args(tiny_vlm, colour_task, out)) == 0, "a dead run's lock does not block"
    assert not stale.exists() and not aside.exists()
    assert (out / "kept" / "adapter_model.safetensors").read_text() == "the only copy", "put back, not deleted"


def test_eval_reports_the_adapter_it_loads(tiny_vlm, colour_task, tmp_path, capsys):
    out = tmp_path / "train"
    assert cli_main(_train_args(tiny_vlm, colour_task, out, "--set", "methods.0.normalizer=unmasked")) == 0
    args = _train_args(tiny_vlm, colour_task, tmp_path / "eval")
    args[0] = "eval"
    args[args.index("methods=[{name: hificl, rank: 4}]")] = "methods=[{name: zero-shot}, {name: hificl}]"
    assert cli_main([*args, "--set", "train_samples=3", "--adapter", str(out / "adapter")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    row = results["rows"][1]
    assert row["method"] == "HiFICL (unmasked normalizer)" and row["settings"]["rank"] == 4
    trained = json.loads((out / "train_summary.json").read_text())["num_train"]  # not the eval config's 3
    assert trained > 3 and results["num_train"] == trained and row["labelled_examples"] == trained
    assert f"{trained} training samples" in (tmp_path / "eval" / "results.md").read_text()
    layers, heads, dim = 2, 4, 16
    assert row["adapter_params"] == layers * heads * 2 * (8 * 4 + 4 * dim) and row["trainable_params"] == 0


def _readme_own_data_command() -> list[str]:
    text = README.read_text()
    block = text[text.index("**Your own data**"):]
    command = re.search(r"```bash\n(hificl compare --set task.name=jsonl.*?)```", block, re.S).group(1)
    return shlex.split(command.replace("\\\n", " "))


def test_the_readmes_own_data_command_runs_as_printed(tiny_vlm, tmp_path, monkeypatch):
    args = _readme_own_data_command()
    assert args[:2] == ["hificl", "compare"] and "path/to/your/model" in args
    monkeypatch.chdir(tmp_path)
    paths = write_colour_task(tmp_path / "data", n_train=120, n_test=6)
    assert paths["train"] == str(tmp_path / "data" / "train.jsonl")
    args = [tiny_vlm if arg == "path/to/your/model" else arg for arg in args[1:]]
    args += ["--no-progress", "--set", "eval.max_new_tokens=2", "--set", "train.epochs=1",
             "--set", "data_efficiency=[]", "--set", "methods=[{name: zero-shot}, {name: icl, shots: 1}, {name: hificl}]"]
    assert cli_main(args) == 0
    results = json.loads((tmp_path / "runs" / "compare" / "results.json").read_text())
    assert results["task"] == "data" and results["num_test"] == 6 and results["num_validation"] == 60
    assert results["config"]["task"] == {"name": "jsonl", "train": "data/train.jsonl", "test": "data/test.jsonl",
                                         "validation_size": 100}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled"])
def test_a_damaged_adapter_file_is_named(tiny_vlm, colour_task, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert cli_main(_train_args(tiny_vlm, colour_task, out)) == 0
    weights = out / "adapter" / WEIGHTS_NAME
    if damage == "garbage":
        weights.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        torch.save({"k": torch.zeros(2)}, weights)
    with pytest.raises(AdapterMismatchError, match=re.escape(str(weights)) + ".*Re-save or re-train"):
        load_adapter_model(load_backbone(tiny_vlm).model, out / "adapter")


def test_bad_files_and_folders_get_errors_that_name_them(tiny_vlm, colour_task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q?", "answer": "a"}\n{"question": "caf\xe9?", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not UTF-8 text"):
        read_jsonl(bad)
    bad.write_text('{"question": "q?", "answer": "  "}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: an answer has no visible text"):
        read_jsonl(bad)
    config = tmp_path / "config.yaml"
    config.write_bytes(b"seed: 1\n# caf\xe9\n")
    with pytest.raises(ValueError, match=r"config.yaml line 2 is not UTF-8"):
        load_run_config(str(config))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert cli_main(_train_args(tiny_vlm, colour_task, a_file)) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli_main(_train_args(tiny_vlm, colour_task, a_file / "below")) == 2
    assert "Cannot create the output folder" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tiny_vlm, colour_task, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train", interrupted)
    assert cli_main(_train_args(tiny_vlm, colour_task, tmp_path / "run")) == 130
    assert "Run the same command again to resume" in capsys.readouterr().err


def test_a_backbone_with_other_weights_at_the_same_path_is_not_resumed(tiny_vlm, colour_task, tmp_path, capsys):
    """A model folder whose weights were replaced between two runs (here a symlink repointed) is another backbone:
    its checkpoints are not resumed, and the message names the changed file."""
    import shutil

    from safetensors.torch import load_file, save_file

    original, other = tmp_path / "original", tmp_path / "other"
    shutil.copytree(tiny_vlm, original)
    shutil.copytree(tiny_vlm, other)
    weights = next(other.glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    link = tmp_path / "model"
    link.symlink_to(original, target_is_directory=True)
    args = _train_args(str(link), colour_task, tmp_path / "run")
    assert cli_main(args) == 0
    link.unlink()
    link.symlink_to(other, target_is_directory=True)
    capsys.readouterr()
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    assert "Cannot resume" in error and f"backbone.files.{weights.name}" in error


def test_option_messages_name_only_the_bad_option_and_list_the_good_ones(colour_task):
    from hificl.methods import get_method
    from hificl.tasks import get_task

    with pytest.raises(ValueError) as error:
        get_method("lora", rank=4)
    assert str(error.value) == "Method 'lora' has no option(s) ['rank']; its options: alpha, dropout, r."
    with pytest.raises(ValueError, match=r"has no option\(s\) \['trian'\]; its options: .*validation_size"):
        get_task("jsonl", seed=3407, train=colour_task["train"], test=colour_task["test"], trian="x", validation_size=2)
    with pytest.raises(ValueError, match=r"needs option\(s\) \['test'\]"):
        get_task("jsonl", seed=3407, train=colour_task["train"])
    with pytest.raises(ValueError, match="validation_size 500 would hold out all 24 examples .* lower it"):
        get_task("jsonl", seed=3407, train=colour_task["train"], test=colour_task["test"], validation_size=500)


def test_bad_lines_are_found_when_the_task_is_read(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    lines = {"image": '{"image": "fake.png", "question": "What colour?", "answer": "red"}',
             "invisible": '{"question": "\\u200b\\u200b \\t", "answer": "red"}',
             "invisible answer": '{"question": "Colour?", "answer": "\\u2060"}'}
    expected = {"image": "fake.png is not a readable image", "invisible": "visible text",
                "invisible answer": "no visible text"}
    for name, line in lines.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text('{"question": "ok?", "answer": "yes"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"line 2: .*{expected[name]}"):
            read_jsonl(path)


def test_a_prompt_longer_than_the_context_names_its_example(tiny_vlm):
    from hificl.tasks import Example

    backbone = load_backbone(tiny_vlm)
    limit = backbone.context_length
    example = Example("long-one", "word " * (limit + 10), ("red",))
    with pytest.raises(ValueError, match=rf"example 'long-one' is \d+ tokens long, more than the {limit} positions"):
        backbone.encode([[example.question]], names=[example.id])


def test_a_full_disk_is_one_line_naming_the_path_and_nothing_saved_is_damaged(tmp_path, monkeypatch, capsys):
    import errno

    from hificl.io import atomic_folder, atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, "the old results")

    def full(tmp):
        with open(tmp, "w") as handle:
            handle.write("x" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device")

    from hificl.io import atomic_write

    with pytest.raises(OSError) as error:
        atomic_write(target, full)
    message = str(error.value)
    assert str(target) in message and "No space left" in message and "MiB free" in message and "\n" not in message
    assert target.read_text() == "the old results" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    folder = tmp_path / "checkpoint"
    with pytest.raises(OSError, match="No space left on the disk of .*checkpoint"):
        with atomic_folder(folder) as tmp:
            (tmp / "weights").write_bytes(b"0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not folder.exists() and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_sigterm_stops_the_command_with_how_to_resume(tiny_vlm, colour_task, tmp_path, monkeypatch, capsys):
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(pipeline, "train", terminated)
    assert cli_main(_train_args(tiny_vlm, colour_task, tmp_path / "run")) == 128 + signal.SIGTERM
    error = capsys.readouterr().err
    assert "stopped by SIGTERM" in error and "Run the same command again to resume" in error
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_message_never_repeats_the_program_name(tiny_vlm, colour_task, tmp_path, capsys):
    assert cli_main(_train_args(tiny_vlm, colour_task, tmp_path / "run", "--set",
                                "methods=[{name: hificl, teacher_weight: -1}]")) == 2
    error = capsys.readouterr().err
    assert "method hificl: teacher_weight" in error
    assert not re.search(r"hificl: (config )?(error: )?hificl:", error), error
