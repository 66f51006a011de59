"""The evaluator: batched generation with left padding (stopped at the task's stop strings,
`hificl.generation`), answer post-processing, the task's metric, time and prompt
tokens per query. It is given what it needs explicitly -- the model that generates, the prompter that shows each
query, the backbone that encodes and decodes, the task that scores -- and knows nothing of any method.

On several processes (``accelerate launch`` / ``torchrun``) the examples are split into equal contiguous shards
(the last one padded with copies of its last example, so sharded models step in lockstep), the predictions are
gathered back in the original order with the padding dropped, and every process computes the same metrics. The
time per query excludes a warm-up generation (CUDA context, kernel selection, first-call caches), and sums every
process's generation time: the compute each query costs, whatever the number of processes."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .backbones import Backbone
from .distributed import is_sharded_model, process_state
from .generation import generate_answers
from .io import atomic_write_json, atomic_write_text
from .prompting import Prompter
from .settings import GenerationConfig
from .tasks import Example, Task


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def save(self, folder: str | Path) -> None:
        """metrics.json and predictions.jsonl, side by side (written atomically)."""
        folder = Path(folder)
        atomic_write_json(folder / "metrics.json", self.metrics)
        atomic_write_text(folder / "predictions.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.predictions))


def shard(examples: Sequence[Example], process: int, processes: int) -> tuple[list[Example], int]:
    """Process `process`'s contiguous share of `examples` (all shards equally long) and how many of its entries
    are real; the rest repeat its last real example, or the last example, as padding."""
    size = -(-len(examples) // processes)
    mine = list(examples[process * size:(process + 1) * size])
    real = len(mine)
    filler = mine[-1] if mine else examples[-1]
    return mine + [filler] * (size - real), real


def evaluate(model: torch.nn.Module, prompter: Prompter, backbone: Backbone, task: Task, examples: Sequence[Example],
             config: GenerationConfig | None = None, progress: bool = True, desc: str = "eval",
             warmup: bool = True) -> EvalResult:
    """Generate an answer for every example with `model` from the prompts of `prompter` (encoded and decoded by
    `backbone`) and score it with `task`. The metrics are keyed by the task metric's name ("metric" names it).
    `warmup`: generate once, untimed, before the timed batches (off for evaluations whose time is not reported)."""
    config = config or GenerationConfig()
    if not examples:
        raise ValueError("No examples to evaluate.")
    state = process_state()
    mine, real = shard(examples, state.process_index, state.num_processes)
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    options = {"synced_gpus": True} if is_sharded_model(model) else {}  # every forward is a collective
    predictions, scores, prompt_tokens, seconds = [], [], 0, 0.0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc=desc, unit="q", disable=not (progress and state.is_main_process),
               dynamic_ncols=True)
    for start in range(0, len(mine), config.batch_size):
        chunk = mine[start:start + config.batch_size]
        batch = backbone.encode([prompter.prompt(e) for e in chunk], padding_side="left", names=[e.id for e in chunk])
        batch = {k: v.to(backbone.device) for k, v in batch.items()}
        counted = max(0, min(len(chunk), real - start))
        prompt_tokens += int(batch["attention_mask"][:counted].sum())
        if warmup and start == 0:
            generate_answers(model, backbone, task, batch, min(2, max_new_tokens), config.num_beams, **options)
        _synchronize(backbone.device)
        began = time.perf_counter()
        raws = generate_answers(model, backbone, task, batch, max_new_tokens, config.num_beams, **options)
        _synchronize(backbone.device)
        seconds += (time.perf_counter() - began) * counted / len(chunk)
        for example, raw in list(zip(chunk, raws))[:counted]:
            answer = task.postprocess(raw)
            score = task.score(answer, example)  # None under a corpus metric: the whole set is scored below
            if score is not None:
                scores.append(score)
            predictions.append({"id": example.id, "question": example.question, "prediction": answer,
                                "raw": raw, "answers": list(example.answers), "score": score})
        bar.update(len(chunk))
        if scores:
            bar.set_postfix({task.metric: f"{sum(scores) / len(scores):.3f}"})
    bar.close()
    model.train(was_training)
    if state.num_processes > 1:
        predictions = gather_object(predictions)
        totals = gather_object([(seconds, prompt_tokens)])
        seconds, prompt_tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    if [p["id"] for p in predictions] != [e.id for e in examples]:
        raise RuntimeError("The gathered predictions do not match the examples; the processes evaluated different "
                           "example lists (give every process the same examples in the same order).")
    summary = task.score_corpus([p["prediction"] for p in predictions], examples)
    for prediction, score in zip(predictions, summary.per_example):
        prediction["score"] = score
    metrics = {
        task.metric: summary.score,
        "metric": task.metric,
        "num_queries": len(predictions),
        "seconds_per_query": seconds / len(predictions),
        "prompt_tokens_per_query": prompt_tokens / len(predictions),
        "generation": asdict(config) | {"max_new_tokens": max_new_tokens},
        **summary.details,
    }
    return EvalResult(metrics, predictions)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
