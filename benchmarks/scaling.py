"""Throughput on 1, 2, ... processes: training samples per second (HiFICL, the trainer's own steps, warm-up step
excluded) and evaluation queries per second (the evaluator's sharded generation, after an untimed warm-up run),
measured by launching the same worker with torchrun once per process count. Runs unchanged on GPUs (one process
per GPU) and on a CPU (gloo processes).

    python benchmarks/scaling.py                          # 1 and 2 processes, the embedded default, 2 threads
    python benchmarks/scaling.py --processes 1 2 4 8      # on a machine with 8 GPUs
    python benchmarks/scaling.py --engine ddp fsdp2 zero3 --random-backbone 1024 16 --config embedded-text-capitals

With ``--engine`` it compares the engines on the largest process count instead: DDP (the backbone replicated),
FSDP2 and DeepSpeed ZeRO-3 (sharded; ZeRO-2: replicated, the adapter's state partitioned), each process reporting
the bytes of the model's weights it holds after the engine prepared it (its shards under FSDP2, its partitions
under ZeRO-3), its peak resident memory (on a CPU: the whole backbone is loaded before it is sharded, so this peak
does not shrink), and training samples per second beside DDP's. ``--random-backbone HIDDEN LAYERS`` swaps the
config's backbone for a randomly initialised Llama of that width and depth with SmolLM2's tokenizer (a few hundred
million parameters at 1024 x 16). On a CPU, FSDP2 and DeepSpeed run with accelerate's state set as a GPU launch
would (`tools/engine_on_cpu.py`; DeepSpeed with ``DS_ACCELERATOR=cpu``).

On a CPU the processes share the cores: give each `--threads` (default: the cores divided by the largest process
count), so that 1 and N processes use the same cores and the ratio shows what splitting the work buys.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import resource

    import torch

    if args.engine in SHARDING and not torch.cuda.is_available():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tools.engine_on_cpu import act_as_on_accelerators

        act_as_on_accelerators()

    from hificl.backbones import load_backbone
    from hificl.distributed import close_process_group, process_state
    from hificl.evaluator import GenerationConfig, evaluate
    from hificl.methods import get_method
    from hificl.run_config import load_run_config
    from hificl.seeding import Seeds
    from hificl.tasks import get_task
    from hificl.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    state = process_state()
    config = load_run_config(args.config)
    task = get_task(config.task["name"], seed=config.seed, **{k: v for k, v in config.task.items() if k != "name"})
    backbone = load_backbone(args.backbone or config.backbone, config.dtype)
    parameters = sum(p.numel() for p in backbone.model.parameters())
    if args.engine not in ("fsdp2", "zero3"):  # those shard it from where it loaded
        backbone.model.to(state.device)
    parts = get_method("hificl").build(backbone, task, Seeds(config.seed, config.seed))
    train = TrainConfig(epochs=1, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-3,
                        mixed_precision=config.train.mixed_precision)
    examples = task.subset("train", (args.steps + 1) * args.batch_size * args.grad_accum, config.seed)
    with tempfile.TemporaryDirectory() as folder:
        result = Trainer(parts.model, parts.objective, examples, train, 0, folder, progress=False).train()
    held = sum(_local(p).numel() * p.element_size() for p in parts.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queries = task.subset("test", args.queries, config.seed)
    generation = GenerationConfig(batch_size=args.eval_batch_size)
    evaluate(parts.model, parts.prompter, backbone, task, queries[: args.eval_batch_size * state.num_processes],
             generation, progress=False)  # warm-up
    state.wait_for_everyone()
    started = time.perf_counter()
    evaluate(parts.model, parts.prompter, backbone, task, queries, generation, progress=False, warmup=False)
    state.wait_for_everyone()
    wall = time.perf_counter() - started
    from accelerate.utils import gather_object

    memory = gather_object([{"weights_mb": held / 2**20, "peak_rss_mb": peak}])
    if state.is_main_process:
        effective = args.batch_size * args.grad_accum
        Path(args.json).write_text(json.dumps({
            "engine": result.engine, "memory": memory,
            "parameters": parameters,
            "processes": state.num_processes, "device": str(state.device), "threads": torch.get_num_threads(),
            "train_seconds_per_step": result.seconds_per_step, "train_samples_per_second": effective / result.seconds_per_step,
            "examples_per_process": result.examples_per_process, "eval_queries": len(queries),
            "eval_seconds": wall, "eval_queries_per_second": len(queries) / wall}))
    close_process_group()


SHARDING = {"fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"},
            "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
            "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                      "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}}


def _local(param):
    """What this process holds of a parameter: its FSDP2 shard, its ZeRO-3 partition, or all of it."""
    if hasattr(param, "to_local"):
        return param.to_local()
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


def random_llama(folder: Path, hidden: int, layers: int) -> str:
    """A randomly initialised Llama of `hidden` width and `layers` depth with SmolLM2's tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hificl.embedded.smollm2 import smollm2_dir

    source = smollm2_dir()
    config = AutoConfig.from_pretrained(source)
    heads = max(1, hidden // 64)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                   "num_key_value_heads": max(1, heads // 4), "intermediate_size": int(hidden * 8 / 3) // 64 * 64,
                   "tie_word_embeddings": False})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def compare_engines(args) -> None:
    processes = max(args.processes)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        backbone = random_llama(Path(folder) / "backbone", *args.random_backbone) if args.random_backbone else None
        for engine in args.engine:
            out = Path(folder) / f"{engine}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            env.update(SHARDING.get(engine, {}))
            if engine.startswith("zero") and not _has_cuda():
                env["DS_ACCELERATOR"] = "cpu"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                       "--master_port", _free_port(), __file__, "--worker", "--engine", engine, "--json", str(out),
                       "--config", args.config, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--grad-accum", str(args.grad_accum), "--queries", str(args.queries), "--eval-batch-size",
                       str(args.eval_batch_size), "--threads", str(args.threads)] + (
                           ["--backbone", backbone] if backbone else [])
            subprocess.run(command, check=True, env=env)
            rows.append(json.loads(out.read_text()))
    base = rows[0]
    print(f"\n{args.config}{' (random backbone %d x %d)' % tuple(args.random_backbone) if backbone else ''}: "
          f"{base['parameters'] / 1e6:.0f}M parameters, {processes} processes, {args.threads} thread(s) each, HiFICL "
          f"training (effective batch {args.batch_size * args.grad_accum}, {args.steps} timed steps)")
    print(f"{'engine':>16} {'weights MiB / process':>22} {'x':>6} {'peak RSS MiB':>13} {'train samples/s':>16} "
          f"{'x':>6} {'eval queries/s':>15}")
    for row in rows:
        weights = max(m["weights_mb"] for m in row["memory"])
        print(f"{row['engine']:>16} {weights:>22.0f} {weights / max(m['weights_mb'] for m in base['memory']):>6.2f} "
              f"{max(m['peak_rss_mb'] for m in row['memory']):>13.0f} {row['train_samples_per_second']:>16.2f} "
              f"{row['train_samples_per_second'] / base['train_samples_per_second']:>6.2f} "
              f"{row['eval_queries_per_second']:>15.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", default="embedded-easyvqa", help="run config giving the backbone and task")
    parser.add_argument("--steps", type=int, default=6, help="timed optimiser steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step (default: the largest "
                                                                    "process count, so every count shares one step)")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (CPU)")
    parser.add_argument("--json", help="write the rows to this file (with --worker: the worker's result)")
    parser.add_argument("--engine", nargs="+", choices=["ddp", "fsdp2", "zero2", "zero3"],
                        help="compare these engines on the largest process count")
    parser.add_argument("--random-backbone", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                        help="a random Llama of this width and depth (SmolLM2's tokenizer) as the backbone")
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    largest = max(args.processes)
    args.grad_accum = args.grad_accum or largest
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // largest)
    if args.worker:
        args.engine = args.engine[0] if args.engine else None
        worker(args)
        return
    if args.engine:
        compare_engines(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.processes:
            out = Path(folder) / f"{count}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(count), "--master_port",
                       _free_port(), __file__, "--worker", "--json", str(out), "--config", args.config,
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum",
                       str(args.grad_accum), "--queries", str(args.queries), "--eval-batch-size",
                       str(args.eval_batch_size), "--threads", str(args.threads)]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            rows.append(json.loads(out.read_text()))
    first = rows[0]
    print(f"\n{args.config}: HiFICL training (effective batch {args.batch_size * args.grad_accum}, {args.steps} timed "
          f"steps) and evaluation ({args.queries} queries), {args.threads} thread(s) per process")
    print(f"{'processes':>9} {'device':>8} {'train samples/s':>16} {'x':>6} {'eval queries/s':>15} {'x':>6}")
    for row in rows:
        print(f"{row['processes']:>9} {row['device']:>8} {row['train_samples_per_second']:>16.2f} "
              f"{row['train_samples_per_second'] / first['train_samples_per_second']:>6.2f} "
              f"{row['eval_queries_per_second']:>15.2f} {row['eval_queries_per_second'] / first['eval_queries_per_second']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
