"""Generating answers: every method's greedy or beam decoding of a batch of prompts, stopped where the task's
post-processing would cut the answer anyway.

A greedy sequence stops as soon as its decoded continuation holds one of the task's stop strings (each sequence
on its own; the batch ends when every sequence has stopped or reached ``max_new_tokens``). The answer is the text
before the first stop string, so stopping there yields exactly the answer that generating the whole budget and
cutting afterwards yields: greedy tokens up to the stop do not depend on what would follow. Beam search is not
stopped early: a beam that ends at a stop string becomes a finished hypothesis whose length-normalised score
competes differently with the running beams, which could change the answer, so beams run the whole budget."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .backbones import Backbone
from .tasks import Task


class StopAtStrings(StoppingCriteria):
    """True for a sequence once its continuation (the tokens after `prompt_length`), decoded by `backbone`,
    contains any of `stop_strings`."""

    def __init__(self, backbone: Backbone, stop_strings: Sequence[str], prompt_length: int):
        self.backbone, self.prompt_length = backbone, prompt_length
        self.stop_strings = tuple(s for s in stop_strings if s)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [any(stop in self.backbone.decode(row) for stop in self.stop_strings)
                for row in input_ids[:, self.prompt_length:]]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_answers(model: torch.nn.Module, backbone: Backbone, task: Task, batch: dict[str, torch.Tensor],
                     max_new_tokens: int, num_beams: int = 1, **options) -> list[str]:
    """The raw continuation of every prompt of a left-padded `batch` (decoded, before the task's post-processing),
    greedy or with `num_beams` beams, no sampling; `options` go to ``model.generate`` (e.g. ``synced_gpus``)."""
    prompt_length = batch["input_ids"].shape[1]
    stop = ([StopAtStrings(backbone, task.stop_strings, prompt_length)]
            if num_beams == 1 and any(task.stop_strings) else [])
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                pad_token_id=backbone.pad_token_id, stopping_criteria=StoppingCriteriaList(stop),
                                **options)
    return [backbone.decode(tokens) for tokens in output[:, prompt_length:]]
