"""A backbone: a Hugging Face model plus what turns prompt segments (text, images, the task's instruction and the
answers of demonstrations) into its inputs.

Prompt formats. Without a chat template the segments are concatenated, the instruction first, with the model's
image placeholder for each image. With a chat template (`chat_template`: the model's own Jinja template) the prompt
is a conversation: the instruction opens the first user turn, every in-context demonstration is a user turn (its
prompt) answered by an assistant turn (its answer), the query is the last user turn, and the template's generation
prompt follows. A training target is then what the template puts after the generation prompt for an assistant turn
holding the answer: the answer and the end-of-turn token. One function renders prompts for training and for
evaluation, so both see exactly the same prompt.

Families. This generic class covers text-only decoders and processors whose image tensors are laid out per example
as ``[1, num_images, ...]`` (Idefics2, Idefics3, SmolVLM). Families with other layouts (`hificl.backbones.families`)
list the image tensors that are concatenated over the batch (`concat_keys`) and may override `encode_one`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..tasks import Answer, ImageRef, Instruction, Segment

IGNORE_INDEX = -100


class Backbone:
    """A frozen model with its tokenizer and (for multimodal models) processor.

    Attributes:
        model: the PreTrainedModel (methods may wrap it; the backbone keeps the base).
        tokenizer: its tokenizer; `processor` the multimodal processor or None.
        image_token: the placeholder the processor expands into image tokens (None: text only).
        name: a label for reports.
        chat_template: the Jinja chat template prompts are rendered with (None: plain prompts).
    """

    concat_keys: tuple[str, ...] = ()  # image tensors concatenated over the batch instead of stacked per example
    token_keys: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")  # one value per token, padded like ids

    def __init__(self, model: nn.Module, tokenizer, processor=None, image_token: str | None = None, name: str = "",
                 chat_template: str | None = None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.image_token = image_token if image_token is not None else getattr(processor, "image_token", None)
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.chat_template = chat_template
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load_processor(cls, spec: str):
        """The processor of the model at `spec` (a local folder or model id)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(spec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_placeholder(self) -> str:
        """What stands for one image in a plain prompt (the processor expands it)."""
        return self.image_token

    # ------------------------------------------------------------------------------------------------ prompts
    def _check_images(self, segments: Sequence[Segment]) -> None:
        if any(isinstance(s, ImageRef) for s in segments) and (self.processor is None or self.image_token is None):
            raise ValueError(f"The task has images but backbone {self.name!r} is text-only. Use a multimodal model "
                             "(e.g. the embedded default) or a task without images.")

    def render(self, segments: Sequence[Segment]) -> tuple[str, list]:
        """The prompt text (with this model's image placeholders, or rendered by its chat template) and its
        images, in order."""
        segments = _instruction_first(segments)
        self._check_images(segments)
        images = [s.load() for s in segments if isinstance(s, ImageRef)]
        if self.chat_template is not None:
            return self._apply_template(self.conversation(segments), add_generation_prompt=True), images
        return "".join(self.image_placeholder if isinstance(s, ImageRef) else s for s in segments), images

    def conversation(self, segments: Sequence[Segment]) -> list[dict]:
        """The chat messages of a prompt: user turns, each demonstration's answer as an assistant turn."""
        messages, parts = [], []
        for segment in _instruction_first(segments):
            if isinstance(segment, Answer):
                messages += [self._message("user", parts), self._message("assistant", [segment.text])]
                parts = []
            else:
                parts.append(segment)
        return messages + [self._message("user", parts)]

    def _message(self, role: str, parts: list[Segment]) -> dict:
        """A chat message; multimodal templates get a list of typed parts, text-only ones a string."""
        if self.processor is None:
            return {"role": role, "content": "".join(parts)}
        content: list[dict] = []
        for part in parts:
            if isinstance(part, ImageRef):
                content.append({"type": "image"})
            elif content and content[-1]["type"] == "text":
                content[-1]["text"] += part
            elif part:
                content.append({"type": "text", "text": str(part)})
        return {"role": role, "content": content}

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def completion(self, segments: Sequence[Segment], target: str) -> str:
        """The text a training target adds after the prompt. Plain prompts: the target itself (prefix, answer,
        suffix). Chat templates: the assistant turn holding the answer, up to and including its end-of-turn
        token (whitespace the template puts after that token is left out)."""
        if self.chat_template is None:
            return str(target)
        messages = self.conversation(segments)
        prompt = self._apply_template(messages, add_generation_prompt=True)
        answer = getattr(target, "text", str(target).strip())
        full = self._apply_template(messages + [self._message("assistant", [answer])], add_generation_prompt=False)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise ValueError(f"Backbone {self.name!r}: its chat template does not render an answer as a continuation "
                             "of the generation prompt, so training targets cannot be cut out of it. Use plain "
                             "prompts (chat_template: false in the run config).")
        text = full[len(prompt):]
        stripped = text.rstrip()
        if any(stripped.endswith(token) for token in self.tokenizer.all_special_tokens):
            return stripped
        return text

    # ------------------------------------------------------------------------------------------------ inputs
    def _add_special_tokens(self, text: str) -> bool:
        """Let the tokenizer add its special tokens (BOS) unless the rendered text already starts with BOS."""
        bos = self.tokenizer.bos_token
        return not (self.chat_template is not None and bos and text.startswith(bos))

    def encode_one(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        """Inputs of one prompt, batch dimension 1 (image tensors as the processor returns them)."""
        text, images = self.render(segments)
        special = self._add_special_tokens(text)
        if images:
            encoded = self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=special)
        else:
            encoded = self.tokenizer([text], return_tensors="pt", add_special_tokens=special)
        return dict(encoded)

    @property
    def context_length(self) -> int | None:
        """The most positions the language model handles (its config's ``max_position_embeddings``), if stated."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def encode(self, prompts: Sequence[Sequence[Segment]], targets: Sequence[str] | None = None,
               padding_side: str = "left", names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """A padded batch. With `targets`, each target's tokens (see `completion`) follow its prompt and `labels`
        hold them (and -100 everywhere else: prompt, images, padding), so the loss covers exactly the answer.
        A row longer than `context_length` is an error naming its example (`names`: the examples' ids)."""
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
        rows = []
        for index, segments in enumerate(prompts):
            row = self.encode_one(segments)
            row.pop("attention_mask", None)
            ids = row.pop("input_ids")[0]
            extra = {key: row.pop(key)[0] for key in self.token_keys if key in row}
            labels = torch.full_like(ids, IGNORE_INDEX)
            if targets is not None:
                completion = self.completion(segments, targets[index])
                target_ids = torch.tensor(self.tokenizer(completion, add_special_tokens=False).input_ids,
                                          dtype=ids.dtype)
                if target_ids.numel() == 0:
                    raise ValueError(f"Target {targets[index]!r} tokenises to nothing.")
                ids, labels = torch.cat([ids, target_ids]), torch.cat([labels, target_ids])
                extra = {key: torch.cat([value, value.new_zeros(len(target_ids))]) for key, value in extra.items()}
            rows.append({"input_ids": ids, "labels": labels, "tokens": extra, "images": row})
            limit = self.context_length
            if limit and len(ids) > limit:
                which = f"example {names[index]!r}" if names else f"prompt {index} of the batch"
                raise ValueError(f"The {which} is {len(ids)} tokens long{' with its answer' if targets else ''}, more "
                                 f"than the {limit} positions of {self.name}: shorten its text, show fewer "
                                 "demonstrations (shots), or drop the example.")
        batch = self.collate(rows, padding_side)
        if targets is None:
            batch.pop("labels")
        return batch

    def collate(self, rows: list[dict], padding_side: str) -> dict[str, torch.Tensor]:
        """Pad token rows (ids, labels and per-token keys) on `padding_side`; batch the image tensors: those in
        `concat_keys` concatenated, the others (``[1, n_images, ...]``) stacked with zero images and zero
        borders filling the gaps (which is how the processors pad a batch themselves)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        length = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        token_keys = sorted({key for row in rows for key in row["tokens"]})
        per_token = {key: torch.zeros((len(rows), length), dtype=torch.long) for key in token_keys}
        for index, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[index, span], mask[index, span], labels[index, span] = row["input_ids"], 1, row["labels"]
            for key in token_keys:
                per_token[key][index, span] = row["tokens"].get(key, torch.zeros(n, dtype=torch.long))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, **per_token}
        for key in sorted({key for row in rows for key in row["images"]}):
            tensors = [row["images"].get(key) for row in rows]
            if key in self.concat_keys:
                batch[key] = torch.cat([t for t in tensors if t is not None])
            else:
                batch[key] = _stack_images(tensors)
        return batch

    def decode(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _instruction_first(segments: Sequence[Segment]) -> list[Segment]:
    """The segments with the instruction moved to the front (stated once)."""
    instructions = list(dict.fromkeys(s for s in segments if isinstance(s, Instruction)))
    return instructions + [s for s in segments if not isinstance(s, Instruction)]


def _stack_images(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack ``[1, n_i, ...]`` tensors into ``[batch, max n_i, max of each further dim]``, zero-filling missing images
    and the bottom/right borders of smaller ones."""
    present = [t for t in tensors if t is not None]
    shape = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]
    out = torch.zeros([len(tensors)] + shape, dtype=present[0].dtype)
    for index, tensor in enumerate(tensors):
        if tensor is not None:
            out[(index,) + tuple(slice(0, size) for size in tensor.shape[1:])] = tensor[0]
    return out
