"""Model families whose image inputs are not laid out per example, and the table that picks a family by the
model's config class (never by a model name).

* Idefics2, Idefics3, SmolVLM: the generic `Backbone` (processor tensors ``[1, n_images, ...]`` per example).
  Idefics2's "<image>" expands to its perceiver tokens; Idefics3/SmolVLM's to their (possibly split) image tiles.
* LLaVA (e.g. LLaVA-Interleave: a Qwen2 language model): `LlavaBackbone`, ``pixel_values`` ``[n_images, 3, H, W]``
  concatenated over the batch.
* Qwen2-VL, Qwen2.5-VL, Qwen3-VL: `QwenVLBackbone`, flat patches concatenated over the batch with
  ``image_grid_thw``, and ``mm_token_type_ids`` for the multimodal rotary positions.
* Text-only decoders (any config without a vision part): the generic `Backbone`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..tasks import Segment
from .base import Backbone


class LlavaBackbone(Backbone):
    """LLaVA: one ``[3, H, W]`` tensor per image, all images of the batch concatenated in prompt order."""

    concat_keys = ("pixel_values",)


class QwenVLBackbone(Backbone):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

    An image is ``<|vision_start|><|image_pad|><|vision_end|>`` in a plain prompt (their chat templates write the
    same). ``<|image_pad|>`` is expanded here to one token per merged patch group (``prod(grid_thw) / merge^2``),
    which is what the official processor does, so only the image processor is needed: the full processor class
    also requires torchvision for its video part. `processor` may be the full processor or the image processor.
    """

    concat_keys = ("pixel_values", "image_grid_thw")

    def __init__(self, model, tokenizer, processor=None, image_token: str | None = None, name: str = "",
                 chat_template: str | None = None):
        image_token = image_token or getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        super().__init__(model, tokenizer, processor, image_token, name, chat_template)
        self.image_processor = getattr(processor, "image_processor", processor)
        self.vision_start = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def load_processor(cls, spec: str):
        """The full processor where it can be built, else (no torchvision) the image processor."""
        from transformers import AutoImageProcessor

        try:
            return super().load_processor(spec)
        except ImportError:
            return AutoImageProcessor.from_pretrained(spec)

    @property
    def image_placeholder(self) -> str:
        return f"{self.vision_start}{self.image_token}{self.vision_end}"

    def encode_one(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        text, images = self.render(segments)
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"Backbone {self.name!r}: the prompt has {len(pieces) - 1} {self.image_token} "
                             f"placeholders for {len(images)} images.")
        encoded: dict[str, torch.Tensor] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            text = pieces[0] + "".join(self.image_token * int(n) + piece for n, piece in zip(counts, pieces[1:]))
            encoded = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        ids = self.tokenizer([text], return_tensors="pt", add_special_tokens=self._add_special_tokens(text)).input_ids
        return {"input_ids": ids, "mm_token_type_ids": (ids == self.image_token_id).long(), **encoded}


def default_families() -> list[tuple[type, type[Backbone]]]:
    """(config class, backbone class) pairs of the supported multimodal families."""
    from transformers import (Idefics2Config, Idefics3Config, LlavaConfig, Qwen2_5_VLConfig, Qwen2VLConfig,
                              Qwen3VLConfig, SmolVLMConfig)

    return [(Idefics2Config, Backbone), (Idefics3Config, Backbone), (SmolVLMConfig, Backbone),
            (LlavaConfig, LlavaBackbone), (Qwen2VLConfig, QwenVLBackbone), (Qwen2_5_VLConfig, QwenVLBackbone),
            (Qwen3VLConfig, QwenVLBackbone)]
