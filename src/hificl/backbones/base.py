"""A backbone: a Hugging Face model plus what turns prompt segments (text and images) into its inputs.

The generic `Backbone` covers text-only decoders and processors whose image tensors are laid out per example
as ``[1, num_images, ...]`` (Idefics2, Idefics3, SmolVLM); families with other layouts override `collate`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..tasks import ImageRef, Segment

IGNORE_INDEX = -100


class Backbone:
    """A frozen model with its tokenizer and (for multimodal models) processor.

    Attributes:
        model: the PreTrainedModel (methods may wrap it; the backbone keeps the base).
        tokenizer: its tokenizer; `processor` the multimodal processor or None.
        image_token: the placeholder the processor expands into image tokens (None: text only).
        name: a label for reports.
    """

    def __init__(self, model: nn.Module, tokenizer, processor=None, image_token: str | None = None, name: str = ""):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.image_token = image_token if image_token is not None else getattr(processor, "image_token", None)
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def render(self, segments: Sequence[Segment]) -> tuple[str, list]:
        """The prompt text (with this model's image placeholder) and its images, in order."""
        parts, images = [], []
        for segment in segments:
            if isinstance(segment, ImageRef):
                if self.processor is None or self.image_token is None:
                    raise ValueError(
                        f"The task has images but backbone {self.name!r} is text-only. Use a multimodal model "
                        "(e.g. the embedded default) or a task without images."
                    )
                parts.append(self.image_token)
                images.append(segment.load())
            else:
                parts.append(segment)
        return "".join(parts), images

    def encode_one(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        """Inputs of one prompt, batch dimension 1 (image tensors as the processor returns them)."""
        text, images = self.render(segments)
        if images:
            encoded = self.processor(text=[text], images=[images], return_tensors="pt")
        else:
            encoded = self.tokenizer([text], return_tensors="pt")
        return dict(encoded)

    def encode(self, prompts: Sequence[Sequence[Segment]], targets: Sequence[str] | None = None,
               padding_side: str = "left") -> dict[str, torch.Tensor]:
        """A padded batch. With `targets`, each target's tokens follow its prompt and `labels` hold them (and
        -100 everywhere else: prompt, images, padding), so the loss covers exactly the answer tokens."""
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
        rows = []
        for index, segments in enumerate(prompts):
            row = self.encode_one(segments)
            ids = row["input_ids"][0]
            labels = torch.full_like(ids, IGNORE_INDEX)
            if targets is not None:
                target_ids = torch.tensor(self.tokenizer(targets[index], add_special_tokens=False).input_ids)
                if target_ids.numel() == 0:
                    raise ValueError(f"Target {targets[index]!r} tokenises to nothing.")
                ids, labels = torch.cat([ids, target_ids]), torch.cat([labels, target_ids])
            row["input_ids"], row["labels"] = ids, labels
            row.pop("attention_mask", None)
            rows.append(row)
        batch = self.collate(rows, padding_side)
        if targets is None:
            batch.pop("labels")
        return batch

    def collate(self, rows: list[dict[str, torch.Tensor]], padding_side: str) -> dict[str, torch.Tensor]:
        """Pad token rows on `padding_side`; pad per-example image tensors ``[1, n_images, ...]`` with zero images."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        length = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for index, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[index, span], mask[index, span], labels[index, span] = row["input_ids"], 1, row["labels"]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        image_keys = sorted({key for row in rows for key in row} - {"input_ids", "labels"})
        for key in image_keys:
            batch[key] = _stack_images([row.get(key) for row in rows])
        return batch

    def decode(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _stack_images(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack ``[1, n_i, ...]`` tensors into ``[batch, max n_i, ...]``, zero-filling missing images."""
    present = [t for t in tensors if t is not None]
    most = max(t.shape[1] for t in present)
    template = present[0]
    out = torch.zeros((len(tensors), most) + tuple(template.shape[2:]), dtype=template.dtype)
    for index, tensor in enumerate(tensors):
        if tensor is not None:
            out[index, : tensor.shape[1]] = tensor[0]
    return out
