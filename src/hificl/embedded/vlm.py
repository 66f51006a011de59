"""The embedded multimodal model: SmolVLM's layout with the real SmolLM2-135M-Instruct as text model.

``SmolVLMForConditionalGeneration`` = SmolVLM vision transformer (small, sized for 64x64 easy-VQA
images) + pixel-shuffle connector + the Llama text model. The text model carries SmolLM2's weights
unchanged; four image tokens are appended to its vocabulary. The vision tower, the connector and the
embedding rows of the new tokens are trained by ``python -m tools.build_vlm`` (from a source checkout) and
shipped in ``hificl/embedded/assets`` (safetensors + json), so :func:`load_embedded_vlm` only assembles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .smollm2 import load_smollm2

ASSETS_DIR = Path(__file__).with_name("assets")
WEIGHTS_FILE = "vision_connector.safetensors"
CONFIG_FILE = "vlm_config.json"
METRICS_FILE = "build_metrics.json"
BUILD_COMMAND = "python -m tools.build_vlm"

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
# Appended to SmolLM2's 49,152-token vocabulary in this order (ids 49152..49155).
ADDED_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN, GLOBAL_IMAGE_TOKEN)

# Default vision side: 64x64 images, 8x8 patches (an 8x8 grid), 2x2 pixel shuffle -> 16 image tokens.
DEFAULT_VISION = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    image_size=64, patch_size=8, num_channels=3,
)
DEFAULT_SCALE_FACTOR = 2


def image_seq_len(vision: dict, scale_factor: int) -> int:
    """Number of ``<image>`` tokens per image."""
    return (vision["image_size"] // vision["patch_size"]) ** 2 // scale_factor**2


def add_image_tokens(tokenizer) -> list[int]:
    """Add the image special tokens (idempotent, fixed order) and return their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)})
    return tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))


def make_processor(tokenizer, vision: dict | None = None, scale_factor: int = DEFAULT_SCALE_FACTOR):
    """Idefics3/SmolVLM-style processor: images kept whole (no splitting), resized to the tower's
    square size (64x64 easy-VQA images pass unchanged), each ``<image>`` in the text expanded to
    ``<fake_token_around_image><global-img>`` + N x ``<image>`` + ``<fake_token_around_image>``.
    (SmolVLMProcessor itself would need the extra ``num2words`` package and a video processor.)"""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    vision = vision or DEFAULT_VISION
    add_image_tokens(tokenizer)
    side = {"longest_edge": vision["image_size"]}
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size=side, max_image_size=side,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len(vision, scale_factor))
    tokenizer.padding_side = "left"  # generation batches
    return processor


def vlm_config(text_config, vision: dict, scale_factor: int, image_token_id: int, vocab_size: int):
    """SmolVLMConfig around SmolLM2's Llama config (vocabulary grown to ``vocab_size``)."""
    from transformers import SmolVLMConfig

    text = text_config.to_dict()
    text["vocab_size"] = vocab_size
    return SmolVLMConfig(
        text_config=text, vision_config=dict(vision), scale_factor=scale_factor,
        image_token_id=image_token_id, tie_word_embeddings=True, pad_token_id=text_config.pad_token_id,
    )


def assemble_vlm(lm, tokenizer, vision: dict | None = None, scale_factor: int = DEFAULT_SCALE_FACTOR):
    """Build the SmolVLM around a loaded SmolLM2 ``lm`` (weights copied, vocabulary grown).

    The rows of the added tokens start as the mean of SmolLM2's embedding rows (deterministic); the
    vision tower and connector start from the config's seeded random initialisation.
    Returns ``(model, processor)``.
    """
    from transformers import SmolVLMForConditionalGeneration

    vision = dict(vision or DEFAULT_VISION)
    processor = make_processor(tokenizer, vision, scale_factor)
    ids = tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    vocab = len(tokenizer)
    config = vlm_config(lm.config, vision, scale_factor, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vocab)
    model = SmolVLMForConditionalGeneration(config)

    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    old = state["embed_tokens.weight"]
    extra = old.mean(0, keepdim=True).expand(vocab - old.shape[0], -1)
    state["embed_tokens.weight"] = torch.cat([old, extra], 0)
    result = model.model.text_model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys and min(ids) >= old.shape[0]
    model.tie_weights()
    assert model.lm_head.weight is model.model.text_model.embed_tokens.weight
    model.generation_config = lm.generation_config
    return model.eval(), processor


def trainable_state(model, tokenizer) -> dict[str, torch.Tensor]:
    """What the build trains: vision tower, connector and the added tokens' embedding rows."""
    state = {f"vision_model.{k}": v for k, v in model.model.vision_model.state_dict().items()}
    state.update({f"connector.{k}": v for k, v in model.model.connector.state_dict().items()})
    ids = tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    state["added_token_embeddings"] = model.model.text_model.embed_tokens.weight[ids]
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def load_trainable_state(model, tokenizer, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state` (strict)."""
    vision = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    connector = {k.removeprefix("connector."): v for k, v in state.items() if k.startswith("connector.")}
    model.model.vision_model.load_state_dict(vision, strict=True)
    model.model.connector.load_state_dict(connector, strict=True)
    ids = tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    with torch.no_grad():
        model.model.text_model.embed_tokens.weight[ids] = state["added_token_embeddings"]


def load_embedded_vlm(cache_dir: str | os.PathLike | None = None, assets_dir: str | os.PathLike | None = None):
    """Return ``(SmolVLMForConditionalGeneration, processor)``: cached SmolLM2 + committed trained
    vision weights. Raises FileNotFoundError naming the build command if the assets are missing."""
    assets = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    weights, cfg_path = assets / WEIGHTS_FILE, assets / CONFIG_FILE
    if not (weights.is_file() and cfg_path.is_file()):
        raise FileNotFoundError(
            f"The embedded VLM's trained vision weights are missing ({weights.name} and {cfg_path.name} in "
            f"{assets}): reinstall hificl, or build them from a source checkout (about 20 minutes on 2 CPU cores) "
            f"with: {BUILD_COMMAND}"
        )
    cfg = json.loads(cfg_path.read_text())
    lm, tokenizer = load_smollm2(cache_dir)
    model, processor = assemble_vlm(lm, tokenizer, cfg["vision_config"], cfg["scale_factor"])
    load_trainable_state(model, tokenizer, load_file(weights))
    return model.eval(), processor
