"""Throughput on 1, 2, ... processes: training samples per second (HiFICL, the trainer's own steps, warm-up step
excluded) and evaluation queries per second (the evaluator's sharded generation, after an untimed warm-up run),
measured by launching the same worker with torchrun once per process count. Runs unchanged on GPUs (one process
per GPU) and on a CPU (gloo processes).

    python benchmarks/scaling.py                          # 1 and 2 processes, the embedded default, 2 threads
    python benchmarks/scaling.py --processes 1 2 4 8      # on a machine with 8 GPUs

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
    import torch

    from hificl.backbones import load_backbone
    from hificl.distributed import process_state
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
    backbone = load_backbone(config.backbone, config.dtype)
    backbone.model.to(state.device)
    parts = get_method("hificl").build(backbone, task, Seeds(config.seed, config.seed))
    train = TrainConfig(epochs=1, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-3,
                        mixed_precision=config.train.mixed_precision)
    examples = task.subset("train", (args.steps + 1) * args.batch_size * args.grad_accum, config.seed)
    with tempfile.TemporaryDirectory() as folder:
        result = Trainer(parts.model, parts.objective, examples, train, 0, folder, progress=False).train()
    queries = task.subset("test", args.queries, config.seed)
    generation = GenerationConfig(batch_size=args.eval_batch_size)
    evaluate(parts.model, parts.prompter, backbone, task, queries[: args.eval_batch_size * state.num_processes],
             generation, progress=False)  # warm-up
    state.wait_for_everyone()
    started = time.perf_counter()
    evaluate(parts.model, parts.prompter, backbone, task, queries, generation, progress=False, warmup=False)
    state.wait_for_everyone()
    wall = time.perf_counter() - started
    if state.is_main_process:
        effective = args.batch_size * args.grad_accum
        Path(args.json).write_text(json.dumps({
            "processes": state.num_processes, "device": str(state.device), "threads": torch.get_num_threads(),
            "train_seconds_per_step": result.seconds_per_step, "train_samples_per_second": effective / result.seconds_per_step,
            "examples_per_process": result.examples_per_process, "eval_queries": len(queries),
            "eval_seconds": wall, "eval_queries_per_second": len(queries) / wall}))


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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    largest = max(args.processes)
    args.grad_accum = args.grad_accum or largest
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // largest)
    if args.worker:
        worker(args)
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
