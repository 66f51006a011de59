"""Training with the backbone sharded (FSDP2 through accelerate), on two gloo processes of this CPU: the adapter
is the single process's, checkpoints hold only the adapter and its optimiser state (written once, by name, so any
engine resumes any other's), a run killed mid-epoch resumes under another engine with the same result, sharded
generation returns the single process's predictions, and launches hificl cannot run are refused before the model
loads, naming the setting. Also two "nodes" (two torchrun launches on 127.0.0.1) train the single process's
adapter."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.launch import PYTHON, child_env, free_port, run_ok, torchrun

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launches of these tests")
ON_CPU = str(Path(__file__).parents[1] / "tools" / "fsdp_on_cpu.py")
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_vlm):
    from fixtures import write_colour_task

    root = tmp_path_factory.mktemp("sharding")
    task = write_colour_task(root / "task", n_train=24, n_test=7)
    path = root / "config.yaml"
    path.write_text(f"""backbone: {tiny_vlm}
progress: false
task: {{name: jsonl, train: {task['train']}, test: {task['test']}, validation_size: 4}}
methods: [{{name: hificl, value_b_std: 0.3}}, {{name: icl, shots: 2}}]
train: {{epochs: 2, batch_size: 2, grad_accum: 2, lr: 0.05}}
eval: {{batch_size: 3, max_new_tokens: 3}}
validation_samples: 4
""")
    return str(path)


def _fsdp2(*args):
    return torchrun(ON_CPU, *args)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _same(one: dict, two: dict, exact: bool = False) -> None:
    assert one.keys() == two.keys()
    for key in one:
        if exact:
            assert torch.equal(one[key], two[key]), key
        else:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["{name: hificl, value_b_std: 0.3}", "{name: live, shots: 2}",
                                    "{name: distill, shots: 2}", "{name: mimic, shots: 2}",
                                    "{name: lora, dropout: 0.0}"])  # dropout draws differ per process
def test_fsdp2_trains_the_adapter_one_process_trains(config_file, tmp_path, method):
    common = ["train", "--config", config_file, "--set", f"methods=[{method}]"]
    run_ok([PYTHON, "-m", "hificl.cli", *common, "--output-dir", str(tmp_path / "one")])
    run_ok(_fsdp2(*common, "--output-dir", str(tmp_path / "two")), **FSDP2)
    _same(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"))
    result, alone = (json.loads((tmp_path / run / "train" / "train_result.json").read_text()) for run in ("two", "one"))
    shares = result["examples_per_process"]
    assert result["engine"] == "FSDP2" and result["processes"] == 2 and alone["engine"] == "single process"
    assert shares[0] == shares[1] and sum(shares) == alone["examples_per_process"][0], "each did half the work"
    one, two = (tmp_path / run / "train" / "epoch-2" for run in ("one", "two"))
    weights = load_file(str(two / "trainable.safetensors"))
    assert weights.keys() == load_file(str(one / "trainable.safetensors")).keys(), "the adapter's weights only"
    assert sum(w.numel() for w in weights.values()) < 100_000, "no frozen weight in a checkpoint"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir()), "written once"


def _killed_after_step(command: list[str], step: int, **env) -> None:
    """Start `command`, SIGKILL it (every process of its launch) once step `step` is logged as done."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=child_env(**env), start_new_session=True)
    done = 0
    for line in process.stderr:
        if "done, loss" in line:
            done = int(line.split("step ")[1].split(" ")[0])
            if done == step:
                os.killpg(process.pid, signal.SIGKILL)
                break
    process.wait(timeout=60)
    assert done == step and process.returncode == -signal.SIGKILL


def test_a_killed_run_resumes_under_another_engine(config_file, tmp_path):
    """A single-process run killed after step 5 of 10 resumes under FSDP2 on two processes, and an FSDP2 run
    killed after step 5 resumes on one process: both end with exactly the uninterrupted adapter (fp32 rounding
    between engines)."""
    common = ["train", "--config", config_file, "--log-level", "debug", "--set", "train.checkpoint_every=2",
              "--set", "methods=[{name: hificl, value_b_std: 0.3}]"]
    single = [PYTHON, "-m", "hificl.cli", *common]
    run_ok(single + ["--output-dir", str(tmp_path / "straight")])
    straight = _adapter(tmp_path / "straight")

    _killed_after_step(single + ["--output-dir", str(tmp_path / "to-fsdp2")], 5)
    resumed = run_ok(_fsdp2(*common, "--output-dir", str(tmp_path / "to-fsdp2")), **FSDP2)
    assert "resuming" in resumed.stderr
    _same(straight, _adapter(tmp_path / "to-fsdp2"))

    _killed_after_step(_fsdp2(*common, "--output-dir", str(tmp_path / "to-single")), 5, **FSDP2)
    resumed = run_ok(single + ["--output-dir", str(tmp_path / "to-single")])
    assert "resuming" in resumed.stderr
    _same(straight, _adapter(tmp_path / "to-single"))
    result = json.loads((tmp_path / "to-single" / "train" / "train_result.json").read_text())
    assert result["steps"] == 10 and result["engine"] == "single process"


def test_fsdp2_comparison_predicts_what_one_process_predicts(config_file, tmp_path):
    """HiFICL trained and evaluated sharded (generation in step on both processes), then ICL on the backbone
    loaded whole again: the predictions are the single process's, in order."""
    common = ["compare", "--config", config_file, "--set", "train.epochs=1"]
    run_ok([PYTHON, "-m", "hificl.cli", *common, "--output-dir", str(tmp_path / "one")])
    run_ok(_fsdp2(*common, "--output-dir", str(tmp_path / "two")), **FSDP2)
    for method in ("hificl", "icl"):
        found = {run: sorted((tmp_path / run).glob(f"{method}-*/**/predictions.jsonl")) for run in ("one", "two")}
        assert len(found["one"]) == len(found["two"]) >= 1
        for one, two in zip(found["one"], found["two"]):
            read = [[(p["id"], p["raw"]) for p in map(json.loads, f.read_text().splitlines())] for f in (one, two)]
            assert read[0] == read[1] and len(read[0]) == 7
    rows = json.loads((tmp_path / "two" / "results.json").read_text())["replicates"]
    assert next(r for r in rows if r["settings"]["name"] == "hificl")["engine"] == "FSDP2"


def test_fsdp2_evaluates_a_saved_adapter_as_one_process_does(config_file, tmp_path):
    """`hificl eval --adapter` under FSDP2: the loaded adapter model is sharded for its evaluation (the backbone
    never whole on a device) and predicts the single process's answers."""
    run_ok([PYTHON, "-m", "hificl.cli", "train", "--config", config_file, "--set", "train.epochs=1",
            "--set", "methods=[{name: hificl, value_b_std: 0.3}]", "--output-dir", str(tmp_path / "train")])
    common = ["eval", "--config", config_file, "--set", "methods=[{name: hificl}]",
              "--adapter", str(tmp_path / "train" / "adapter")]
    run_ok([PYTHON, "-m", "hificl.cli", *common, "--output-dir", str(tmp_path / "one")])
    sharded = run_ok(_fsdp2(*common, "--output-dir", str(tmp_path / "two")), **FSDP2)
    assert "sharded over 2 processes for its evaluation" in sharded.stderr
    read = [[(p["id"], p["raw"]) for f in sorted((tmp_path / run).glob("hificl-*/**/predictions.jsonl"))
             for p in map(json.loads, f.read_text().splitlines())] for run in ("one", "two")]
    assert read[0] == read[1] and len(read[0]) == 7


def test_the_packaged_fsdp2_config_launches_hificl(config_file, tmp_path):
    """`accelerate launch --config_file accelerate/fsdp2.yaml` (2 processes here, no mixed precision on a CPU)."""
    config = Path(__file__).parents[1] / "accelerate" / "fsdp2.yaml"
    run_ok([PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
          "--mixed_precision", "no", "--main_process_port", free_port(), ON_CPU, "train", "--config", config_file,
          "--set", "train.epochs=1", "--set", "methods=[{name: hificl, value_b_std: 0.3}]",
          "--output-dir", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "train" / "train_result.json").read_text())
    assert result["engine"] == "FSDP2" and result["processes"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_nodes_train_the_adapter_one_process_trains(config_file, tmp_path):
    """`torchrun --nnodes 2` twice on 127.0.0.1, one process per "node" (DDP over gloo)."""
    common = ["-m", "hificl.cli", "train", "--config", config_file, "--set", "methods=[{name: hificl, value_b_std: 0.3}]"]
    run_ok([PYTHON, *common, "--output-dir", str(tmp_path / "one")])
    port = free_port()
    nodes = [subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               *common, "--output-dir", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    _same(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"))
    result = json.loads((tmp_path / "two" / "train" / "train_result.json").read_text())
    assert result["processes"] == 2 and result["engine"] == "DDP"


@pytest.mark.parametrize("environment, setting", [
    ({"ACCELERATE_USE_FSDP": "true"}, "fsdp_version"),
    ({**FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({**FSDP2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
])
def test_a_launch_hificl_cannot_train_with_is_refused_naming_the_setting(monkeypatch, environment, setting):
    from hificl.distributed import check_engine

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=setting):
        check_engine()


def test_fsdp2_is_accepted(monkeypatch):
    from hificl.distributed import check_engine

    for name, value in FSDP2.items():
        monkeypatch.setenv(name, value)
    check_engine()
