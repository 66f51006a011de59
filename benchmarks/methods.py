"""Training-step and inference cost of the methods, measured in one run on the same model and batches.

Training: median seconds of one optimiser step (forward, backward, AdamW step) of HiFICL, LoRA, PEFT prefix tuning,
PEFT CARTRIDGE, LIVE and MimIC (the last two include their k-shot teacher forward, as they must), on the same
training batches. Inference: mean seconds per query of zero-shot, k-shot ICL, HiFICL and the two PEFT prefix methods
generating on the same test queries.

    python benchmarks/methods.py                        # embedded default and its easy-VQA prompt, 8-shot teachers
    python benchmarks/methods.py --backbone PATH --task jsonl --task-option train=... --task-option test=...

Every method generates the same number of new tokens per query (the task's budget; generation is cut to the
answer afterwards), so the inference times compare equal work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from accelerate.utils import send_to_device

from hificl.backbones import load_backbone
from hificl.evaluator import GenerationConfig, evaluate
from hificl.methods import get_method
from hificl.run_config import load_run_config
from hificl.seeding import Seeds
from hificl.tasks import get_task


def step_seconds(parts, batches, repeats: int) -> tuple[float, float]:
    """Median seconds per training step and the step's loss, after one warm-up step."""
    model = parts.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, loss = [], float("nan")
    for index in range(repeats + 1):
        batch = batches[index % len(batches)]
        start = time.perf_counter()
        loss_tensor = parts.objective.loss(model, batch)
        loss_tensor.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
        loss = loss_tensor.item()
    model.eval()
    return statistics.median(times), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded-easyvqa",
                        help="run config (YAML or packaged name) giving the default backbone, task and prompt")
    parser.add_argument("--backbone", help="overrides the config's backbone")
    parser.add_argument("--task", help="overrides the config's task (and drops its task options)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shots", type=int, default=8, help="ICL shots and teacher demonstrations")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    parser.add_argument("--queries", type=int, default=48, help="timed test queries per inference method")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args()

    config = load_run_config(args.config)
    options = {} if args.task else {k: v for k, v in config.task.items() if k != "name"}
    options.update(option.split("=", 1) for option in args.task_option)
    task = get_task(args.task or config.task["name"], seed=config.seed, **options)
    seeds = Seeds(0, 0)
    backbone = load_backbone(args.backbone or config.backbone)
    if torch.cuda.is_available():
        backbone.model.to("cuda")
    items = task.subset("train", args.batch_size * 3, seed=0)
    chunks = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    queries = task.subset("test", args.queries, seed=0)
    device = backbone.device

    training = {}
    for name, options in [("hificl", {}), ("lora", {}), ("prefix_tuning", {}), ("cartridge", {}),
                          ("live", {"shots": args.shots}), ("mimic", {"shots": args.shots})]:
        method = get_method(name, **options)
        parts = method.build(backbone, task, seeds)
        try:
            batches = [send_to_device(parts.objective.batch(chunk), device) for chunk in chunks]
            seconds, loss = step_seconds(parts, batches, args.steps)
            training[method.label] = {"seconds_per_step": seconds, "loss": loss,
                                      "trainable_params": parts.adapter.get_nb_trainable_parameters()[0]}
        finally:
            parts.close()

    inference = {}
    config = GenerationConfig(batch_size=args.eval_batch_size)
    for name, options in [("zero-shot", {}), ("icl", {"shots": args.shots}), ("hificl", {}), ("prefix_tuning", {}),
                          ("cartridge", {})]:
        method = get_method(name, **options)
        parts = method.build(backbone, task, seeds)
        try:
            evaluate(parts.model, parts.prompter, backbone, task, queries[: args.eval_batch_size], config,
                     progress=False)  # warm-up
            metrics = evaluate(parts.model, parts.prompter, backbone, task, queries, config, progress=False).metrics
            inference[method.label] = {k: metrics[k] for k in ("seconds_per_query", "prompt_tokens_per_query")}
        finally:
            parts.close()

    hificl_step = training["HiFICL"]["seconds_per_step"]
    zero = inference["zero-shot"]["seconds_per_query"]
    print(f"backbone {backbone.name}, task {task.name}, device {device}, threads {torch.get_num_threads()}")
    print(f"\ntraining step (batch {args.batch_size}, teachers with {args.shots} demonstrations), median of {args.steps}:")
    width = max(len(name) for name in (*training, *inference))
    print(f"{'method':<{width}} {'s / step':>9} {'x HiFICL':>9} {'params':>12}")
    for name, row in training.items():
        print(f"{name:<{width}} {row['seconds_per_step']:>9.3f} {row['seconds_per_step'] / hificl_step:>9.2f} "
              f"{row['trainable_params']:>12,}")
    print(f"\ninference ({len(queries)} queries, batch {args.eval_batch_size}, greedy):")
    print(f"{'method':<{width}} {'s / query':>10} {'x zero-shot':>12} {'tokens / query':>15}")
    for name, row in inference.items():
        print(f"{name:<{width}} {row['seconds_per_query']:>10.4f} {row['seconds_per_query'] / zero:>12.2f} "
              f"{row['prompt_tokens_per_query']:>15.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"training": training, "inference": inference, "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
