"""The evaluator: batched generation with left padding, answer post-processing, the task's metric, time and prompt
tokens per query. It is given what it needs explicitly -- the model that generates, the prompter that shows each
query, the backbone that encodes and decodes, the task that scores -- and knows nothing of any method."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .backbones import Backbone
from .core.validate import integer
from .io import atomic_write_json, atomic_write_text
from .prompting import Prompter
from .tasks import Example, Task


@dataclass
class GenerationConfig:
    """Decoding settings. The paper: beam 3 (greedy for Idefics2), at most 20 new tokens, no sampling."""

    batch_size: int = 8
    num_beams: int = 1
    max_new_tokens: int | None = None  # None: the task's budget

    def __post_init__(self):
        for name in ("batch_size", "num_beams"):
            integer(getattr(self, name), f"eval.{name}")
        integer(self.max_new_tokens, "eval.max_new_tokens", allow_none=True)


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


def evaluate(model: torch.nn.Module, prompter: Prompter, backbone: Backbone, task: Task, examples: Sequence[Example],
             config: GenerationConfig | None = None, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Generate an answer for every example with `model` from the prompts of `prompter` (encoded and decoded by
    `backbone`) and score it with `task`. The metrics are keyed by the task metric's name ("metric" names it)."""
    config = config or GenerationConfig()
    if not examples:
        raise ValueError("No examples to evaluate.")
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    predictions, scores, prompt_tokens, seconds = [], [], 0, 0.0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(examples), desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(examples), config.batch_size):
        chunk = list(examples[start:start + config.batch_size])
        batch = backbone.encode([prompter.prompt(e) for e in chunk], padding_side="left")
        batch = {k: v.to(backbone.device) for k, v in batch.items()}
        prompt_tokens += int(batch["attention_mask"].sum())
        _synchronize(backbone.device)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=config.num_beams,
                                    do_sample=False, pad_token_id=backbone.pad_token_id)
        _synchronize(backbone.device)
        seconds += time.perf_counter() - began
        for example, tokens in zip(chunk, output[:, batch["input_ids"].shape[1]:]):
            raw = backbone.decode(tokens)
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
