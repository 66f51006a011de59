"""Tiny, randomly initialised models of real Hugging Face architectures, for tests.

Every builder creates its model from a config only (nothing is downloaded), on CPU, in fp32, with
``attn_implementation="sdpa"``, in eval mode and with a seeded, deterministic initialisation.
The language model inside every family is a small GQA decoder (4 query heads, 2 key/value heads,
head_dim 16, hidden size 64, 2-3 layers, vocabulary of 256 tokens).

Token id layout (all families)::

    0                 pad
    1                 bos
    2                 eos
    3 .. 239          ordinary text tokens (what ``make_inputs`` draws from)
    240 .. 255        special / image tokens of the multimodal families

Usage::

    from tiny_models import FAMILIES, build

    case = build("qwen2_vl")
    inputs = case.make_inputs(batch_size=2, seq_len=12, padding="left")
    logits = case.model(**inputs).logits
    row1 = case.model(**case.row_inputs(inputs, 1)).logits        # row 1 alone, unpadded
    pos = real_token_positions(inputs, 1)                            # where row 1 lives in the batch
    torch.testing.assert_close(logits[1, pos], row1[0])

Padding and positions
---------------------
Forward passes are called *without* explicit ``position_ids``.  For the plain decoders the positions then
are ``arange(seq_len)`` for every row, so a left-padded row sees its real tokens at positions shifted by the
number of pads.  RoPE only depends on position *differences*, so the result equals the unpadded row up to
float rounding (observed max abs diff < 1e-6 in every family, for left and right padding, also for gemma3's
sliding-window layers at seq_len 20 > window 8).  For the Qwen-VL families with images, the multimodal (M-RoPE)
position ids are computed from ``attention_mask`` by ``get_rope_index`` (it drops pad tokens), so those match
too.  ``position_ids_for(inputs)`` gives padding-aware 1D position ids (cumsum of the mask); passing them is
harmless for the plain decoders / llava / idefics, but do NOT pass 2D ``position_ids`` to the Qwen-VL families
with images: the text model then broadcasts them to the 3 M-RoPE axes and image tokens lose their 2D positions
(logits change by ~1e-2 .. 0.3).  ``model.generate`` computes its own padding-aware positions; greedy
generation of a left-padded batch equals each row generated alone, in every family.

Other notes
-----------
* ``idefics2``: the perceiver resampler's attention (``Idefics2PerceiverAttention``) is also named
  ``...self_attn`` and also has a ``layer_idx`` attribute (None) -- do not find the language model's attention
  layers by "has ``layer_idx``"; look under ``model.get_decoder()`` instead.
* Tiny models are fastest single-threaded: ``torch.set_num_threads(1)`` makes a test file several times
  faster on a busy 2-core machine (the OpenMP workers otherwise contend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

__all__ = [
    "FAMILIES",
    "TEXT_FAMILIES",
    "MULTIMODAL_FAMILIES",
    "TinyCase",
    "build",
    "real_token_positions",
    "position_ids_for",
]

TEXT_FAMILIES: list[str] = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]
MULTIMODAL_FAMILIES: list[str] = [
    "llava_qwen2",
    "idefics2",
    "idefics3",
    "smolvlm",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
]
FAMILIES: list[str] = TEXT_FAMILIES + MULTIMODAL_FAMILIES

# ---------------------------------------------------------------------------------------------------------------
# shared sizes and token ids
# ---------------------------------------------------------------------------------------------------------------
VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 3, 240  # text tokens are drawn from [TEXT_LOW, TEXT_HIGH)

# multimodal special ids (all >= TEXT_HIGH)
IMAGE_ID = 250
VIDEO_ID = 251
VISION_START_ID = 252
VISION_END_ID = 253
FAKE_AROUND_IMAGE_ID = 248  # idefics / smolvlm <fake_token_around_image>
GLOBAL_IMG_ID = 249  # idefics3 / smolvlm <global-img>
END_OF_UTTERANCE_ID = 247

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
LAYERS = 2

_COMMON_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)


def _shorten(row: int) -> int:
    """How many tokens shorter than the longest row a padded row is (row 0 is the full-length row)."""
    return 0 if row == 0 else 3 + (row % 3)  # row 1: 4, row 2: 5, row 3: 3, ...


# ---------------------------------------------------------------------------------------------------------------
# image specs: how one image looks in input_ids and as tensors, per layout
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _ImageSpec:
    layout: str  # "llava" | "idefics" | "qwen_vl"
    image_size: int  # square image side in pixels
    tokens_per_image: int  # number of image placeholder tokens (== number of image features)
    prefix: list[int] = field(default_factory=list)  # tokens before the placeholders
    suffix: list[int] = field(default_factory=list)  # tokens after the placeholders
    patch_size: int = 4  # qwen_vl only
    temporal_patch_size: int = 2  # qwen_vl only
    merge_size: int = 2  # qwen_vl only

    @property
    def block(self) -> list[int]:
        return self.prefix + [IMAGE_ID] * self.tokens_per_image + self.suffix

    @property
    def block_len(self) -> int:
        return len(self.prefix) + self.tokens_per_image + len(self.suffix)


# ---------------------------------------------------------------------------------------------------------------
# the case
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TinyCase:
    name: str
    model: PreTrainedModel
    pad_token_id: int
    image: _ImageSpec | None = None  # None for text-only families

    @property
    def is_multimodal(self) -> bool:
        return self.image is not None

    @property
    def image_token_id(self) -> int | None:
        return IMAGE_ID if self.image is not None else None

    @property
    def special_token_ids(self) -> set[int]:
        ids = {PAD_ID, BOS_ID, EOS_ID}
        if self.image is not None:
            ids |= set(range(TEXT_HIGH, VOCAB))
        return ids

    # -----------------------------------------------------------------------------------------------------------
    def make_inputs(
        self,
        batch_size: int = 2,
        seq_len: int = 12,
        padding: str | None = None,
        images: bool = True,
        seed: int = 0,
    ) -> dict:
        """Keyword arguments for ``model(**inputs)`` and ``model.generate(**inputs)``.

        ``seq_len`` is the width of ``input_ids`` (the length of the longest row), image placeholder tokens
        included.  ``padding=None``: every row is ``seq_len`` real tokens, mask all ones.  ``padding="left"`` /
        ``"right"``: row 0 is full length, row r>0 is shorter by 3-5 tokens (see ``_shorten``) and padded on that
        side with ``pad_token_id`` (mask 0 there); when ``seq_len`` is too short for that, it is shortened less, but
        by at least one token.  For multimodal families with ``images=True`` every row holds
        exactly one image, whose placeholder block starts after the first real text token of the row.
        """
        if padding not in (None, "left", "right"):
            raise ValueError(f"padding must be None, 'left' or 'right', got {padding!r}")
        gen = torch.Generator().manual_seed(seed)
        with_images = images and self.image is not None
        block = self.image.block if with_images else []

        # a row is: one text token, the image block (if any), at least one more text token
        min_len = len(block) + 2
        max_short = seq_len - min_len  # how much a row may be shortened and still hold the image block
        if max_short < 0 or (padding is not None and batch_size > 1 and max_short < 1):
            need = min_len + (1 if padding is not None and batch_size > 1 else 0)
            raise ValueError(f"{self.name}: seq_len={seq_len} too short for this family, use seq_len >= {need}")
        lengths = [seq_len - (min(_shorten(r), max_short) if padding is not None else 0) for r in range(batch_size)]

        input_ids = torch.full((batch_size, seq_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for r, n in enumerate(lengths):
            row = torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen)
            if block:
                row[1 : 1 + len(block)] = torch.tensor(block)
            start = seq_len - n if padding == "left" else 0
            input_ids[r, start : start + n] = row
            attention_mask[r, start : start + n] = 1

        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_images:
            inputs.update(self._image_tensors(batch_size, gen, input_ids))
        return inputs

    def _image_tensors(self, num_images: int, gen: torch.Generator, input_ids: torch.Tensor) -> dict:
        spec = self.image
        s = spec.image_size
        if spec.layout == "llava":
            return {"pixel_values": torch.randn(num_images, 3, s, s, generator=gen)}
        if spec.layout == "idefics":
            # (batch, images_per_row, C, H, W); one image per row here
            pixel_values = torch.randn(num_images, 1, 3, s, s, generator=gen)
            pixel_attention_mask = torch.ones(num_images, 1, s, s, dtype=torch.bool)
            return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}
        if spec.layout == "qwen_vl":
            grid = s // spec.patch_size
            patches_per_image = grid * grid  # temporal grid is 1 for a still image
            patch_dim = 3 * spec.temporal_patch_size * spec.patch_size * spec.patch_size
            pixel_values = torch.randn(num_images * patches_per_image, patch_dim, generator=gen)
            image_grid_thw = torch.tensor([[1, grid, grid]] * num_images, dtype=torch.long)
            mm_token_type_ids = (input_ids == IMAGE_ID).to(torch.int)
            return {
                "pixel_values": pixel_values,
                "image_grid_thw": image_grid_thw,
                "mm_token_type_ids": mm_token_type_ids,
            }
        raise AssertionError(spec.layout)

    # -----------------------------------------------------------------------------------------------------------
    def row_inputs(self, inputs: dict, row: int) -> dict:
        """The inputs of row ``row`` alone: padding stripped (mask all ones), image tensors sliced to its images."""
        mask = inputs["attention_mask"][row].bool()
        out: dict[str, Any] = {
            "input_ids": inputs["input_ids"][row][mask].unsqueeze(0).clone(),
            "attention_mask": torch.ones(1, int(mask.sum()), dtype=inputs["attention_mask"].dtype),
        }
        if "mm_token_type_ids" in inputs:
            out["mm_token_type_ids"] = inputs["mm_token_type_ids"][row][mask].unsqueeze(0).clone()
        if "pixel_values" not in inputs:
            return out

        layout = self.image.layout
        image_counts = [
            int((inputs["input_ids"][r] == IMAGE_ID).sum()) // self.image.tokens_per_image
            for r in range(inputs["input_ids"].shape[0])
        ]
        first = sum(image_counts[:row])
        count = image_counts[row]
        if layout == "llava":
            out["pixel_values"] = inputs["pixel_values"][first : first + count].clone()
        elif layout == "idefics":
            out["pixel_values"] = inputs["pixel_values"][row : row + 1, :count].clone()
            if inputs.get("pixel_attention_mask") is not None:
                out["pixel_attention_mask"] = inputs["pixel_attention_mask"][row : row + 1, :count].clone()
        elif layout == "qwen_vl":
            thw = inputs["image_grid_thw"]
            patches = thw.prod(-1)
            p0 = int(patches[:first].sum())
            p1 = p0 + int(patches[first : first + count].sum())
            out["pixel_values"] = inputs["pixel_values"][p0:p1].clone()
            out["image_grid_thw"] = thw[first : first + count].clone()
        else:  # pragma: no cover
            raise AssertionError(layout)
        return out


def real_token_positions(inputs: dict, row: int) -> torch.Tensor:
    """Indices (into the padded sequence) of the non-pad tokens of ``row``."""
    return inputs["attention_mask"][row].nonzero(as_tuple=True)[0]


def position_ids_for(inputs: dict) -> torch.Tensor:
    """Padding-aware 1D position ids (``cumsum(mask) - 1``, pads set to 0), shape (batch, seq)."""
    mask = inputs["attention_mask"].long()
    pos = mask.cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------------------------
def _finish(name: str, model: PreTrainedModel, image: _ImageSpec | None = None) -> TinyCase:
    model = model.to(torch.float32).eval()
    gc = model.generation_config
    gc.pad_token_id = PAD_ID
    gc.bos_token_id = BOS_ID
    gc.eos_token_id = EOS_ID
    return TinyCase(name=name, model=model, pad_token_id=PAD_ID, image=image)


def _causal_lm(config_cls, model_cls, **extra):
    """(model class, config) of a plain decoder-only causal LM."""
    cfg = config_cls(**{**_COMMON_TEXT, **extra})
    return model_cls, cfg


def _build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _causal_lm(LlamaConfig, LlamaForCausalLM, head_dim=HEAD_DIM), None


def _build_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _causal_lm(Qwen2Config, Qwen2ForCausalLM), None


def _build_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _causal_lm(Qwen3Config, Qwen3ForCausalLM, head_dim=HEAD_DIM), None


def _build_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _causal_lm(MistralConfig, MistralForCausalLM, head_dim=HEAD_DIM, sliding_window=4096), None


def _build_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return (
        _causal_lm(
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            num_hidden_layers=3,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        None,
    )


def _build_llava_qwen2():
    # LLaVA-Interleave layout: Qwen2 text model + SigLIP vision tower, "full" feature strategy, last layer.
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    image_size, patch = 16, 8
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,  # as in llava-interleave: the pooling head is unused by LLaVA
    )
    text = Qwen2Config(**_COMMON_TEXT)
    tokens = (image_size // patch) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    spec = _ImageSpec(layout="llava", image_size=image_size, tokens_per_image=tokens)
    return (LlavaForConditionalGeneration, cfg), spec


def _idefics_vision(cls, image_size, patch):
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )


def _build_idefics2():
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        MistralConfig,
    )
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig, Idefics2VisionConfig

    image_size, patch, latents = 16, 4, 4
    vision = _idefics_vision(Idefics2VisionConfig, image_size, patch)
    perceiver = Idefics2PerceiverConfig(
        hidden_size=HIDDEN,
        rms_norm_eps=1e-5,
        resampler_n_latents=latents,
        resampler_depth=1,
        resampler_n_heads=2,
        resampler_head_dim=16,
        num_key_value_heads=1,
    )
    text = MistralConfig(**_COMMON_TEXT, head_dim=HEAD_DIM, sliding_window=4096)
    cfg = Idefics2Config(
        vision_config=vision,
        perceiver_config=perceiver,
        text_config=text,
        image_token_id=IMAGE_ID,
    )
    spec = _ImageSpec(
        layout="idefics",
        image_size=image_size,
        tokens_per_image=latents,
        prefix=[FAKE_AROUND_IMAGE_ID],
        suffix=[FAKE_AROUND_IMAGE_ID],
    )
    return (Idefics2ForConditionalGeneration, cfg), spec


def _idefics3_like(config_cls, model_cls, vision_cls):
    from transformers import LlamaConfig

    image_size, patch, scale = 32, 8, 2
    vision = _idefics_vision(vision_cls, image_size, patch)
    text = LlamaConfig(**_COMMON_TEXT, head_dim=HEAD_DIM)
    cfg = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        scale_factor=scale,
        pad_token_id=PAD_ID,
    )
    tokens = (image_size // patch) ** 2 // scale**2
    spec = _ImageSpec(
        layout="idefics",
        image_size=image_size,
        tokens_per_image=tokens,
        prefix=[FAKE_AROUND_IMAGE_ID, GLOBAL_IMG_ID],
        suffix=[FAKE_AROUND_IMAGE_ID],
    )
    return (model_cls, cfg), spec


def _build_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    return _idefics3_like(Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig)


def _build_smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    return _idefics3_like(SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig)


_QWEN_VL_IMAGE = dict(image_size=16, patch_size=4, temporal_patch_size=2, merge_size=2)


def _qwen_vl_spec() -> _ImageSpec:
    q = _QWEN_VL_IMAGE
    tokens = (q["image_size"] // q["patch_size"] // q["merge_size"]) ** 2
    return _ImageSpec(
        layout="qwen_vl",
        image_size=q["image_size"],
        tokens_per_image=tokens,
        prefix=[VISION_START_ID],
        suffix=[VISION_END_ID],
        patch_size=q["patch_size"],
        temporal_patch_size=q["temporal_patch_size"],
        merge_size=q["merge_size"],
    )


_QWEN_VL_IDS = dict(
    image_token_id=IMAGE_ID,
    video_token_id=VIDEO_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
)


def _build_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    q = _QWEN_VL_IMAGE
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=HIDDEN,  # output size of the merger == text hidden size
        num_heads=2,
        mlp_ratio=2,
        patch_size=q["patch_size"],
        temporal_patch_size=q["temporal_patch_size"],
        spatial_merge_size=q["merge_size"],
    )
    text = dict(
        _COMMON_TEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **_QWEN_VL_IDS)
    return (Qwen2VLForConditionalGeneration, cfg), _qwen_vl_spec()


def _build_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    q = _QWEN_VL_IMAGE
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=HIDDEN,
        num_heads=2,
        patch_size=q["patch_size"],
        temporal_patch_size=q["temporal_patch_size"],
        spatial_merge_size=q["merge_size"],
        # window of 8 px == one merged 2x2 patch group, so windowed attention really splits the image
        window_size=8,
        fullatt_block_indexes=[1],
    )
    text = dict(
        _COMMON_TEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_QWEN_VL_IDS)
    return (Qwen2_5_VLForConditionalGeneration, cfg), _qwen_vl_spec()


def _build_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    q = _QWEN_VL_IMAGE
    grid = q["image_size"] // q["patch_size"]
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=HIDDEN,
        num_heads=2,
        patch_size=q["patch_size"],
        temporal_patch_size=q["temporal_patch_size"],
        spatial_merge_size=q["merge_size"],
        num_position_embeddings=grid * grid,
        deepstack_visual_indexes=[0],
    )
    text = dict(
        _COMMON_TEXT,
        head_dim=HEAD_DIM,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **_QWEN_VL_IDS)
    return (Qwen3VLForConditionalGeneration, cfg), _qwen_vl_spec()


_BUILDERS: dict[str, Callable[[], tuple[tuple[type, Any], _ImageSpec | None]]] = {
    "llama": _build_llama,
    "qwen2": _build_qwen2,
    "qwen3": _build_qwen3,
    "mistral": _build_mistral,
    "gemma3": _build_gemma3,
    "llava_qwen2": _build_llava_qwen2,
    "idefics2": _build_idefics2,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
}
assert list(_BUILDERS) == FAMILIES


def build(name: str, seed: int = 0) -> TinyCase:
    """Build the tiny model of family ``name`` (see ``FAMILIES``), deterministically initialised from ``seed``."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown family {name!r}; known: {FAMILIES}")
    (model_cls, config), spec = _BUILDERS[name]()
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if name == "idefics2":
        _spread_idefics2_perceiver(model)
    return _finish(name, model, spec)


@torch.no_grad()
def _spread_idefics2_perceiver(model: PreTrainedModel) -> None:
    """Idefics2 initialises its perceiver latents to ones and all weights with std 0.02, so at random init every
    image token gets the same vector and the pixels move the logits by only ~1e-3.  Give the latents and the
    perceiver's value/output projections a larger random init (a trained model is not degenerate like this) so
    that image tokens differ and a wrongly sliced image is obvious (~0.25 logit change)."""
    resampler = model.model.connector.perceiver_resampler
    resampler.latents.normal_()
    for layer in resampler.layers:
        layer.self_attn.v_proj.weight.normal_(std=0.3)
        layer.self_attn.o_proj.weight.normal_(std=0.3)
