"""Several processes (gloo on the CPU), launched as a user types it: `torchrun --nproc_per_node 2 -m hificl.cli
...` and `accelerate launch`. Two processes train exactly the adapter one process trains on the same global
batches, each doing half the work; sharded evaluation returns the single process's predictions in order, the
padding of the last shard uncounted; a run killed mid-epoch resumes with exactly the remaining batches."""

import json
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from fixtures.launch import PYTHON, child_env, free_port, run_ok, torchrun

pytestmark = pytest.mark.skipif(0 < torch.cuda.device_count() < 2, reason="two processes need two GPUs here")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_vlm):
    from fixtures import write_colour_task

    root = tmp_path_factory.mktemp("processes")
    task = write_colour_task(root / "task", n_train=24, n_test=7)  # 20 train after 4 validation; 7 test: 4 + 3
    path = root / "config.yaml"
    path.write_text(f"""backbone: {tiny_vlm}
progress: false
task: {{name: jsonl, train: {task['train']}, test: {task['test']}, validation_size: 4}}
methods: [{{name: icl, shots: 2}}, {{name: hificl, value_b_std: 0.3}}]
train: {{epochs: 2, batch_size: 2, grad_accum: 2, lr: 0.05}}
eval: {{batch_size: 3, max_new_tokens: 3}}
validation_samples: 4
""")
    return str(path)


@pytest.mark.parametrize("method, batch_size, grad_accum, steps, shares", [
    ("{name: hificl, value_b_std: 0.3}", 2, 2, 10, [20, 20]),  # the micro-batches dealt out
    ("{name: hificl, value_b_std: 0.3}", 4, 1, 10, [20, 20]),  # one micro-batch a step: split between the two
    ("{name: hificl, value_b_std: 0.3}", 3, 1, 14, [26, 14]),  # uneven shares (3 = 2 + 1; the last step 1 + 1)
    ("{name: live, shots: 2}", 4, 1, 10, [20, 20]),  # a loss of two terms (CE and KL over other positions)
])
def test_two_processes_train_the_adapter_one_process_trains(config_file, tmp_path, method, batch_size, grad_accum,
                                                            steps, shares):
    """Any batch_size x grad_accum on 2 processes: the same global steps, each term of the loss the mean over the
    step's elements, so the adapter is the single process's (to float rounding)."""
    common = ["-m", "hificl.cli", "train", "--config", config_file, "--set", f"methods=[{method}]",
              "--set", f"train.batch_size={batch_size}", "--set", f"train.grad_accum={grad_accum}"]
    run_ok([PYTHON, *common, "--output-dir", str(tmp_path / "one")])
    run_ok(torchrun(*common, "--output-dir", str(tmp_path / "two")))
    one, two = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    results = {run: json.loads((tmp_path / run / "train" / "train_result.json").read_text()) for run in ("one", "two")}
    assert results["two"]["processes"] == 2 and results["two"]["steps"] == results["one"]["steps"] == steps
    assert results["one"]["examples_per_process"] == [40] and results["two"]["examples_per_process"] == shares
    assert [h["train_loss"] for h in results["two"]["history"]] == pytest.approx(
        [h["train_loss"] for h in results["one"]["history"]], rel=1e-6)
    assert not list((tmp_path / "two").rglob(".*tmp-*")), "no temporary folder left behind"


def test_sharded_evaluation_returns_the_single_process_predictions(config_file, tmp_path):
    run_ok([PYTHON, "-m", "hificl.cli", "train", "--config", config_file, "--output-dir", str(tmp_path / "train"),
          "--set", "methods=[{name: hificl, value_b_std: 0.3}]"])
    common = ["hificl.cli", "eval", "--config", config_file, "--adapter", str(tmp_path / "train" / "adapter")]
    run_ok([PYTHON, "-m", *common, "--output-dir", str(tmp_path / "one")])
    run_ok(torchrun("-m", *common, "--output-dir", str(tmp_path / "two")))
    for method in ("icl", "hificl"):
        predictions = {}
        for run in ("one", "two"):
            files = sorted((tmp_path / run).glob(f"{method}-*/**/predictions.jsonl"))
            predictions[run] = [json.loads(line) for line in files[0].read_text().splitlines()]
        assert len(predictions["two"]) == 7, "the padding of the last shard is not counted"
        assert [(p["id"], p["raw"], p["score"]) for p in predictions["two"]] == \
            [(p["id"], p["raw"], p["score"]) for p in predictions["one"]]
    rows = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")}
    assert rows["two"]["environment"]["processes"] == 2
    for one, two in zip(rows["one"]["rows"], rows["two"]["rows"]):
        assert two[two["metric"]] == one[one["metric"]] and two["num_queries"] == one["num_queries"] == 7
        assert two["prompt_tokens_per_query"] == one["prompt_tokens_per_query"]


def test_accelerate_launch_runs_a_comparison_on_two_processes(config_file, tmp_path):
    run_ok([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
          free_port(), "-m", "hificl.cli", "compare", "--config", config_file, "--output-dir", str(tmp_path / "run"),
          "--set", "train.epochs=1"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["environment"]["processes"] == 2
    hificl = next(row for row in results["replicates"] if row["method"] == "HiFICL")
    assert hificl["processes"] == 2 and hificl["num_queries"] == 7


def test_a_killed_run_resumes_with_exactly_the_remaining_batches(config_file, tmp_path):
    """SIGKILL after the 5th of 10 steps (a step checkpoint every 2): the resumed run repeats at most 2 steps and
    ends with exactly the adapter of an uninterrupted run."""
    common = [PYTHON, "-m", "hificl.cli", "train", "--config", config_file, "--log-level", "debug",
              "--set", "methods=[{name: hificl, value_b_std: 0.3}]", "--set", "train.checkpoint_every=2"]
    run_ok(common + ["--output-dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    env = child_env()
    process = subprocess.Popen(common + ["--output-dir", str(killed)], stderr=subprocess.PIPE, text=True, env=env)
    done = 0
    for line in process.stderr:
        if "done, loss" in line:
            done = int(line.split("step ")[1].split(" ")[0])
            if done == 5:
                process.send_signal(signal.SIGKILL)
                break
    process.wait(timeout=60)
    assert done == 5 and process.returncode == -signal.SIGKILL
    resumed = run_ok(common + ["--output-dir", str(killed)])
    first = next(line for line in resumed.stderr.splitlines() if "done, loss" in line)
    restart_step = int(first.split("step ")[1].split(" ")[0]) - 1
    assert "resuming" in resumed.stderr and 5 - 2 <= restart_step <= 5, resumed.stderr[-2000:]
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[key], again[key]) for key in straight)
    result = json.loads((killed / "train" / "train_result.json").read_text())
    assert result["steps"] == 10 and not list((killed / "train").glob("step-*")), "mid-epoch checkpoints removed"


def test_sigterm_saves_the_step_and_the_rerun_loses_nothing(config_file, tmp_path):
    """SIGTERM (a scheduler's notice) after the 5th of 10 steps, with no step checkpoints configured: the run
    finishes its step, writes a step checkpoint, says how to resume and exits with 128 + 15; the rerun starts at
    the very next step and ends with exactly the adapter of an uninterrupted run."""
    common = [PYTHON, "-m", "hificl.cli", "train", "--config", config_file, "--log-level", "debug",
              "--set", "methods=[{name: hificl, value_b_std: 0.3}]"]
    run_ok(common + ["--output-dir", str(tmp_path / "straight")])
    stopped = tmp_path / "stopped"
    env = child_env()
    process = subprocess.Popen(common + ["--output-dir", str(stopped)], stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stderr:
        if "done, loss" in line and int(line.split("step ")[1].split(" ")[0]) == 5:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in rest, rest[-2000:]
    saved = [p.name for p in (stopped / "train").glob("step-*")]
    assert len(saved) == 1 and saved[0] in ("step-5", "step-6") and saved[0] in rest
    resumed = run_ok(common + ["--output-dir", str(stopped)])
    first = next(line for line in resumed.stderr.splitlines() if "done, loss" in line)
    assert int(first.split("step ")[1].split(" ")[0]) == int(saved[0].split("-")[1]) + 1, "no step repeated"
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[key], again[key]) for key in straight)
