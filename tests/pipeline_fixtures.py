"""Tiny, fully local fixtures for pipeline tests: a character-level tokenizer, a tiny SmolVLM-layout model with
an Idefics3 processor saved to a folder (so it loads like any local model), and JSONL tasks whose images are
drawn in the test."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration)

SPECIAL = ["<pad>", "<eos>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL + list(string.printable))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=SPECIAL[2:])


def _text_config(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                bos_token_id=1, tie_word_embeddings=False)


def save_tiny_vlm(folder: Path, seed: int = 0) -> Path:
    """A tiny SmolVLM (32 px images, 4 tokens each) + processor, saved to `folder`."""
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = SmolVLMConfig(
        text_config=_text_config(len(tokenizer)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=0,
    )
    model = SmolVLMForConditionalGeneration(config).eval()
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                  max_image_size={"longest_edge": 32}),
        tokenizer=tokenizer, image_seq_len=4)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_lm(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    LlamaForCausalLM(LlamaConfig(**_text_config(len(tokenizer)))).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_colour_task(folder: Path, n_train: int = 24, n_test: int = 8, images: bool = True) -> dict[str, str]:
    """train/test JSONL files asking the colour of a drawn square (answers: red, green, blue, yellow)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = {}
    for split, count in (("train", n_train), ("test", n_test)):
        lines = []
        for index in range(count):
            colour = names[(index * 7 + (split == "test")) % len(names)]
            record = {"question": "What colour is it?" if images else f"Colour word for {colour.upper()}?",
                      "answers": [colour]}
            if images:
                image_path = folder / "images" / f"{split}-{index}.png"
                image_path.parent.mkdir(exist_ok=True)
                Image.new("RGB", (24, 24), COLOURS[colour]).save(image_path)
                record["image"] = f"images/{image_path.name}"
            lines.append(json.dumps(record))
        paths[split] = str(folder / f"{split}.jsonl")
        Path(paths[split]).write_text("\n".join(lines) + "\n")
    return paths
