"""Training with the backbone sharded (FSDP2, DeepSpeed ZeRO-3 and ZeRO-2, through accelerate) on two gloo
processes of this CPU: the adapter is the single process's, checkpoints hold only the adapter and its optimiser
state (written once, by name, so any engine resumes any other's), a run killed mid-epoch resumes under another
engine with the same result, sharded generation returns the single process's predictions, and launches hificl
cannot run are refused before the model loads, naming the setting. Also two "nodes" (two torchrun launches on
127.0.0.1) train the single process's adapter. The DeepSpeed tests need deepspeed (``pip install -e
".[deepspeed]"``) and a C++ compiler (it builds a small communication op on first use); without them they are
skipped, saying why."""

import contextlib
import json
import os
from importlib import resources
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from fixtures.launch import PYTHON, child_env, free_port, run_ok, torchrun

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launches of these tests")
ON_CPU = str(Path(__file__).parents[1] / "tools" / "engine_on_cpu.py")
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}
ZERO = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false", "DS_ACCELERATOR": "cpu"}
ZERO3 = {**ZERO, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
ZERO2 = {**ZERO, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}


def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "deepspeed is not installed (pip install -e \".[deepspeed]\")"
    if shutil.which("c++") is None:
        return "no C++ compiler: deepspeed builds its CPU communication op on first use"
    return None


needs_deepspeed = pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
ENGINES = [pytest.param(FSDP2, "FSDP2", id="fsdp2"),
           pytest.param(ZERO3, "DeepSpeed ZeRO-3", id="zero3", marks=needs_deepspeed)]


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


def _sharded(*args):
    return torchrun(ON_CPU, *args)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _same(one: dict, two: dict, exact: bool = False, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert one.keys() == two.keys()
    for key in one:
        if exact:
            assert torch.equal(one[key], two[key]), key
        else:
            torch.testing.assert_close(two[key], one[key], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single_runs(config_file, tmp_path_factory):
    """``single_runs(method)``: the output folder of a single-process `train` of that method, run once."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            folder = tmp_path_factory.mktemp("single")
            run_ok([PYTHON, "-m", "hificl.cli", "train", "--config", config_file, "--set", f"methods=[{method}]",
                    "--output-dir", str(folder)])
            done[method] = folder
        return done[method]

    return get


METHODS = ["{name: hificl, value_b_std: 0.3}", "{name: live, shots: 2}", "{name: distill, shots: 2}",
           "{name: mimic, shots: 2}", "{name: lora, dropout: 0.0}"]  # dropout draws differ per process


@pytest.mark.parametrize("environment, engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_a_sharded_engine_trains_the_adapter_one_process_trains(config_file, single_runs, tmp_path, method,
                                                                environment, engine):
    one = single_runs(method)
    run_ok(_sharded("train", "--config", config_file, "--set", f"methods=[{method}]", "--output-dir",
                    str(tmp_path / "two")), **environment)
    # ZeRO-3 sums gradients in buckets, divided by the processes first: other float rounding, which 10 Adam steps
    # at lr 0.05 grow to ~1e-5 relative, and to a few 1e-3 where a gradient is near zero (LoRA's B starts at zero)
    tolerance = {} if not engine.startswith("DeepSpeed") else {"rtol": 1e-2, "atol": 1e-4} if "lora" in method else {
        "rtol": 1e-4, "atol": 1e-5}
    _same(_adapter(one), _adapter(tmp_path / "two"), **tolerance)
    result, alone = (json.loads((run / "train" / "train_result.json").read_text()) for run in (tmp_path / "two", one))
    shares = result["examples_per_process"]
    assert result["engine"] == engine and result["processes"] == 2 and alone["engine"] == "single process"
    assert shares[0] == shares[1] and sum(shares) == alone["examples_per_process"][0], "each did half the work"
    mine, theirs = (run / "train" / "epoch-2" for run in (one, tmp_path / "two"))
    weights = load_file(str(theirs / "trainable.safetensors"))
    assert weights.keys() == load_file(str(mine / "trainable.safetensors")).keys(), "the adapter's weights only"
    assert sum(w.numel() for w in weights.values()) < 100_000, "no frozen weight in a checkpoint"
    assert sorted(p.name for p in theirs.iterdir()) == sorted(p.name for p in mine.iterdir()), "written once"
    moments, alone_moments = (load_file(str(run / "optimizer.safetensors")) for run in (theirs, mine))
    assert moments.keys() == alone_moments.keys(), "the optimiser's state by parameter name"
    for key, value in alone_moments.items():  # to 1% of each moment's scale (Adam's moments of rounding noise)
        torch.testing.assert_close(moments[key], value, rtol=0, atol=1e-2 * float(value.abs().max()) + 1e-12)


@needs_deepspeed
def test_zero2_trains_the_adapter_one_process_trains_exactly(config_file, single_runs, tmp_path):
    """ZeRO-2 partitions the adapter's float32 weights and moments (the backbone is replicated): same sums, same
    order, so the very same bits."""
    method = METHODS[0]
    run_ok(_sharded("train", "--config", config_file, "--set", f"methods=[{method}]", "--output-dir",
                    str(tmp_path / "two")), **ZERO2)
    _same(_adapter(single_runs(method)), _adapter(tmp_path / "two"), exact=True)
    assert json.loads((tmp_path / "two" / "train" / "train_result.json").read_text())["engine"] == "DeepSpeed ZeRO-2"


def _descendants(pid: int) -> list[int]:
    """Every process started under `pid`, however deep (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _killed_after_step(command: list[str], step: int, **env) -> None:
    """Start `command`, SIGKILL every process of it at once (a lost machine) once step `step` is logged as
    done, and check that none outlived it."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=child_env(**env), start_new_session=True)
    done = 0
    for line in process.stderr:
        if "done, loss" in line:
            done = int(line.split("step ")[1].split(" ")[0])
            if done == step:
                everyone = [process.pid, *_descendants(process.pid)]
                for pid in everyone:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
    process.wait(timeout=60)
    assert done == step and process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in everyone[1:]):  # a kill takes effect a moment later
        assert time.monotonic() < deadline, "a process of the killed launch outlived it"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, killed and waiting to be reaped, writes nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("environment, engine", ENGINES)
def test_a_killed_run_resumes_under_another_engine(config_file, tmp_path, environment, engine):
    """A single-process run killed after step 5 of 10 resumes sharded on two processes, and a sharded run killed
    after step 5 resumes on one process: both end with exactly the uninterrupted adapter (fp32 rounding between
    engines)."""
    common = ["train", "--config", config_file, "--log-level", "debug", "--set", "train.checkpoint_every=2",
              "--set", "methods=[{name: hificl, value_b_std: 0.3}]"]
    single = [PYTHON, "-m", "hificl.cli", *common]
    run_ok(single + ["--output-dir", str(tmp_path / "straight")])
    straight = _adapter(tmp_path / "straight")

    _killed_after_step(single + ["--output-dir", str(tmp_path / "to-sharded")], 5)
    resumed = run_ok(_sharded(*common, "--output-dir", str(tmp_path / "to-sharded")), **environment)
    assert "resuming at epoch 1, step 4" in resumed.stderr or "resuming at epoch 2, step 0" in resumed.stderr
    _same(straight, _adapter(tmp_path / "to-sharded"))

    _killed_after_step(_sharded(*common, "--output-dir", str(tmp_path / "to-single")), 5, **environment)
    resumed = run_ok(single + ["--output-dir", str(tmp_path / "to-single")])
    assert "resuming at epoch 1, step 4" in resumed.stderr or "resuming at epoch 2, step 0" in resumed.stderr
    _same(straight, _adapter(tmp_path / "to-single"))
    result = json.loads((tmp_path / "to-single" / "train" / "train_result.json").read_text())
    assert result["steps"] == 10 and result["engine"] == "single process"


@needs_deepspeed
def test_a_zero3_run_killed_mid_epoch_resumes_under_fsdp2(config_file, tmp_path):
    """From one sharding engine to the other: the checkpoint names no engine."""
    common = ["train", "--config", config_file, "--log-level", "debug", "--set", "train.checkpoint_every=2",
              "--set", "methods=[{name: hificl, value_b_std: 0.3}]"]
    run_ok([PYTHON, "-m", "hificl.cli", *common, "--output-dir", str(tmp_path / "straight")])
    _killed_after_step(_sharded(*common, "--output-dir", str(tmp_path / "run")), 5, **ZERO3)
    resumed = run_ok(_sharded(*common, "--output-dir", str(tmp_path / "run")), **FSDP2)
    assert "resuming at epoch 1, step 4" in resumed.stderr or "resuming at epoch 2, step 0" in resumed.stderr
    _same(_adapter(tmp_path / "straight"), _adapter(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "train" / "train_result.json").read_text())["engine"] == "FSDP2"


@pytest.mark.parametrize("environment, engine", ENGINES)
def test_a_sharded_comparison_predicts_what_one_process_predicts(config_file, tmp_path, environment, engine):
    """HiFICL trained and evaluated sharded (generation in step on both processes), then ICL on the backbone
    loaded whole again and sharded for its evaluation: the predictions are the single process's, in order."""
    common = ["compare", "--config", config_file, "--set", "train.epochs=1"]
    run_ok([PYTHON, "-m", "hificl.cli", *common, "--output-dir", str(tmp_path / "one")])
    sharded = run_ok(_sharded(*common, "--output-dir", str(tmp_path / "two")), **environment)
    assert f"sharded over 2 processes for its evaluation ({engine})" in sharded.stderr
    for method in ("hificl", "icl"):
        found = {run: sorted((tmp_path / run).glob(f"{method}-*/**/predictions.jsonl")) for run in ("one", "two")}
        assert len(found["one"]) == len(found["two"]) >= 1
        for one, two in zip(found["one"], found["two"]):
            read = [[(p["id"], p["raw"]) for p in map(json.loads, f.read_text().splitlines())] for f in (one, two)]
            assert read[0] == read[1] and len(read[0]) == 7
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert next(r for r in results["replicates"] if r["settings"]["name"] == "hificl")["engine"] == engine
    jsonschema.validate(results, json.loads((resources.files("hificl") / "schemas" / "results.schema.json").read_text()))


@pytest.mark.parametrize("environment, engine", ENGINES)
def test_a_sharded_engine_evaluates_a_saved_adapter_as_one_process_does(config_file, tmp_path, environment, engine):
    """`hificl eval --adapter` under a sharding engine: the loaded adapter model is sharded for its evaluation
    (the backbone never whole on a device) and predicts the single process's answers."""
    run_ok([PYTHON, "-m", "hificl.cli", "train", "--config", config_file, "--set", "train.epochs=1",
            "--set", "methods=[{name: hificl, value_b_std: 0.3}]", "--output-dir", str(tmp_path / "train")])
    common = ["eval", "--config", config_file, "--set", "methods=[{name: hificl}]",
              "--adapter", str(tmp_path / "train" / "adapter")]
    run_ok([PYTHON, "-m", "hificl.cli", *common, "--output-dir", str(tmp_path / "one")])
    sharded = run_ok(_sharded(*common, "--output-dir", str(tmp_path / "two")), **environment)
    assert "sharded over 2 processes for its evaluation" in sharded.stderr
    read = [[(p["id"], p["raw"]) for f in sorted((tmp_path / run).glob("hificl-*/**/predictions.jsonl"))
             for p in map(json.loads, f.read_text().splitlines())] for run in ("one", "two")]
    assert read[0] == read[1] and len(read[0]) == 7


@pytest.mark.parametrize("name, engine", [("fsdp2", "FSDP2"),
                                          pytest.param("zero3", "DeepSpeed ZeRO-3", marks=needs_deepspeed),
                                          pytest.param("zero2", "DeepSpeed ZeRO-2", marks=needs_deepspeed)])
def test_a_packaged_accelerate_config_launches_hificl(config_file, tmp_path, name, engine):
    """`accelerate launch --config_file accelerate/<engine>.yaml` (2 processes here, no mixed precision on a CPU)."""
    config = Path(__file__).parents[1] / "accelerate" / f"{name}.yaml"
    run_ok([PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", free_port(), ON_CPU, "train", "--config", config_file,
            "--set", "train.epochs=1", "--set", "methods=[{name: hificl, value_b_std: 0.3}]",
            "--output-dir", str(tmp_path / "run")], DS_ACCELERATOR="cpu")
    result = json.loads((tmp_path / "run" / "train" / "train_result.json").read_text())
    assert result["engine"] == engine and result["processes"] == 2
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
    pytest.param({**ZERO3, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "offload_param_device: cpu",
                 marks=needs_deepspeed),
    pytest.param({**ZERO2, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device: cpu",
                 marks=needs_deepspeed),
    pytest.param({**ZERO3, "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, "zero3_init_flag", marks=needs_deepspeed),
    pytest.param({key: value for key, value in ZERO3.items() if key != "ACCELERATE_DEEPSPEED_ZERO3_INIT"},
                 "zero3_init_flag", marks=needs_deepspeed),  # accelerate's default for ZeRO-3 is true
])
def test_a_launch_hificl_cannot_train_with_is_refused_naming_the_setting(monkeypatch, environment, setting):
    from hificl.distributed import check_engine

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=setting):
        check_engine()


@needs_deepspeed
@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_a_deepspeed_config_file_with_its_own_optimiser_is_refused(monkeypatch, tmp_path, section):
    from hificl.distributed import check_engine

    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 3}, section: {"type": "AdamW", "params": {}}}))
    for name, value in {**ZERO3, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"a '{section}' section"):
        check_engine()


def test_a_launch_for_deepspeed_without_it_installed_says_how_to_install_it(monkeypatch):
    import sys

    from hificl.distributed import check_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=r"pip install 'hificl\[deepspeed\]'"):
        check_engine()


@needs_deepspeed
def test_deepspeed_settings_hificl_owns_are_refused_when_they_disagree(monkeypatch):
    """DeepSpeed's accumulation count and clipping come from the train config; an explicit, different value in
    the launch's DeepSpeed config is named."""
    from accelerate.utils import DeepSpeedPlugin

    from hificl.zero import configure

    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    for name, value in ZERO3.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="gradient_clipping: 0.5, but train.max_grad_norm is 1"):
        configure(DeepSpeedPlugin(), 2, 2, 1.0)
    plugin = DeepSpeedPlugin()
    configure(plugin, 2, 2, 0.5)
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert plugin.deepspeed_config["train_batch_size"] == 4
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 4.*train.grad_accum"):
        configure(DeepSpeedPlugin(), 2, 2, 0.5)


@pytest.mark.parametrize("environment", [FSDP2, pytest.param(ZERO3, marks=needs_deepspeed),
                                         pytest.param(ZERO2, marks=needs_deepspeed)])
def test_the_engines_hificl_trains_with_are_accepted(monkeypatch, environment):
    from hificl.distributed import check_engine

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    check_engine()
