"""Model families on tiny random models: selection by config class, prompts (plain and chat template, identical in
training and evaluation), loss masks that cover exactly the answer and its terminator, batched left-padded
generation equal to one query at a time, and a train -> eval -> report run per family."""

import json

import pytest
import torch
from PIL import Image
from transformers import Blip2Config, LlamaConfig

import hificl.backbones as backbones
from fixtures import MULTIMODAL_FAMILIES, build, write_colour_task, write_vqa
from hificl import pipeline
from hificl.backbones import (IGNORE_INDEX, Backbone, LlavaBackbone, QwenVLBackbone, family_for, load_backbone,
                              register_family)
from hificl.evaluator import GenerationConfig, evaluate
from hificl.methods import get_method
from hificl.registry import Registry
from hificl.run_config import RunConfig, load_run_config
from hificl.seeding import Seeds
from hificl.tasks import ImageRef, get_task

MULTIMODAL = MULTIMODAL_FAMILIES
EXPECTED_CLASS = {"llava_qwen2": LlavaBackbone, "idefics2": Backbone, "idefics3": Backbone, "smolvlm": Backbone,
                  "qwen2_vl": QwenVLBackbone, "qwen2_5_vl": QwenVLBackbone, "qwen3_vl": QwenVLBackbone}
END_OF_TURN = {"llava_qwen2": "<|im_end|>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>",
               "qwen3_vl": "<|im_end|>", "llama": "<|im_end|>", "idefics2": "<end_of_utterance>",
               "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, saved_model):
    root = tmp_path_factory.mktemp("families")
    vqa = get_task("vqav2", seed=3407, root=str(write_vqa(root / "vqa")), validation_images=2)
    text = write_colour_task(root / "text", images=False)
    return {"root": root, "vqa": vqa, "vqa_root": str(root / "vqa"), "saved_model": saved_model,
            "text": get_task("jsonl", seed=3407, train=text["train"], test=text["test"], instruction="Answer in one word.\n")}


def _model(workspace, family: str, chat: bool) -> str:
    return workspace["saved_model"](family, chat)


def _task(workspace, family: str):
    return workspace["vqa"] if family in MULTIMODAL else workspace["text"]


def _expected_completion(family: str, chat: bool, target) -> str:
    """Plain prompts: the task's target (" red\n"). Chat: the answer then the end-of-turn token (ChatML puts the answer
    right after "assistant\n"; the User:/Assistant: templates after "Assistant:", with a space)."""
    if not chat:
        return str(target)
    end = END_OF_TURN[family]
    return (" " if end == "<end_of_utterance>" else "") + target.text + end


@pytest.mark.parametrize("family", MULTIMODAL + ["llama"])
def test_the_family_is_chosen_by_the_config_class(family):
    config = build(family).model.config
    assert family_for(config) is EXPECTED_CLASS.get(family, Backbone)


def test_unknown_families_are_refused_and_new_ones_can_be_registered(monkeypatch):
    with pytest.raises(ValueError, match="No backbone family for Blip2Config"):
        family_for(Blip2Config())
    monkeypatch.setattr(backbones, "FAMILIES", Registry("backbone family"))

    class Custom(Backbone):
        pass

    register_family(LlamaConfig, Custom)
    assert family_for(LlamaConfig()) is Custom
    with pytest.raises(ValueError, match="already registered"):
        register_family(LlamaConfig, Backbone)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("family", MULTIMODAL + ["llama"])
def test_prompts_and_loss_mask(workspace, family, chat):
    backbone = load_backbone(_model(workspace, family, chat))
    assert type(backbone) is EXPECTED_CLASS.get(family, Backbone) and (backbone.chat_template is not None) == chat
    task = _task(workspace, family)
    icl = get_method("icl", shots=2).prompter(backbone, task, Seeds(0, 0))
    queries = task.splits["test"][:3]
    prompts = [icl.prompt(e) for e in queries]
    targets = [task.target_text(e) for e in queries]
    training = backbone.encode(prompts, targets, padding_side="right")
    evaluation = backbone.encode(prompts, padding_side="left")
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        labelled = training["labels"][row] != IGNORE_INDEX
        real = training["attention_mask"][row].bool()
        answer = backbone.tokenizer.decode(training["labels"][row][labelled])
        assert answer == backbone.completion(prompt, target)
        assert answer == _expected_completion(family, chat, target)
        span = labelled.nonzero().flatten()
        assert span.max() - span.min() + 1 == labelled.sum() and span.max() == real.nonzero().max(), "answer ends"
        prompt_ids = training["input_ids"][row][real & ~labelled]
        assert torch.equal(prompt_ids, evaluation["input_ids"][row][evaluation["attention_mask"][row].bool()]), \
            "the same prompt tokens in training and evaluation"
        if "mm_token_type_ids" in training:
            image = backbone.tokenizer.convert_tokens_to_ids(backbone.image_token)
            assert torch.equal(training["mm_token_type_ids"][row].bool(), training["input_ids"][row] == image)
        text = backbone.render(prompt)[0]
        assert text.count("Instruction:" if family in MULTIMODAL else "Answer in one word.") == 1
        if chat:
            assert [m["role"] for m in backbone.conversation(prompt)] == ["user", "assistant"] * 2 + ["user"]
        else:
            assert text.startswith(task.instruction)
    if family in MULTIMODAL:
        image = backbone.tokenizer.convert_tokens_to_ids(backbone.image_token)
        assert not (training["labels"] == image).any() and (training["input_ids"] == image).any()


@pytest.mark.parametrize("family", MULTIMODAL + ["llama"])
def test_batched_left_padded_generation_equals_one_at_a_time(workspace, family):
    backbone = load_backbone(_model(workspace, family, chat=family.startswith("qwen") or family == "llama"))
    task = _task(workspace, family)
    parts = get_method("hificl", value_b_std=0.5, init_seed=3).build(backbone, task, Seeds(0, 0))
    try:
        examples = task.splits["test"][:3]
        batched = evaluate(parts.model, parts.prompter, backbone, task, examples,
                           GenerationConfig(batch_size=3, max_new_tokens=4), progress=False)
        single = evaluate(parts.model, parts.prompter, backbone, task, examples,
                          GenerationConfig(batch_size=1, max_new_tokens=4), progress=False)
    finally:
        parts.close()
    assert [p["raw"] for p in batched.predictions] == [p["raw"] for p in single.predictions]


@pytest.mark.parametrize("family", MULTIMODAL)
def test_train_eval_report_per_family(workspace, tmp_path, family):
    config = RunConfig.from_dict({
        "backbone": _model(workspace, family, chat=family in ("llava_qwen2", "qwen3_vl")),
        "output_dir": str(tmp_path), "progress": False, "train_samples": 4, "validation_samples": 2,
        "task": {"name": "vqav2", "root": workspace["vqa_root"], "validation_images": 1, "test_size": 3},
        "methods": [{"name": "zero-shot"}, {"name": "hificl"}, {"name": "mimic", "shots": 2},
                    {"name": "live", "shots": 2}],
        "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "lr": 0.05},
        "eval": {"batch_size": 3, "num_beams": 3, "max_new_tokens": 3}})
    results = pipeline.compare(config)  # the teachers align under instructions and chat templates
    assert [r["method"] for r in results["rows"]] == ["zero-shot", "HiFICL", "MimIC", "LIVE"]
    assert results["rows"][1]["train_steps"] == 2 and results["num_test"] == 3
    assert all(0 <= r["vqa_accuracy"] <= 1 and r["metric"] == "vqa_accuracy" for r in results["rows"])
    assert json.loads((tmp_path / "results.json").read_text())["backbone"] == _model(
        workspace, family, chat=family in ("llava_qwen2", "qwen3_vl"))
    assert len(json.loads((tmp_path / "test_ids.json").read_text())) == 3


def test_images_of_different_sizes_batch_like_the_processor(workspace, tmp_path):
    """Per-example encoding then zero-padding of the image tensors gives exactly the processor's own batch."""
    backbone = load_backbone(_model(workspace, "idefics2", chat=False))
    images = []
    for index, size in enumerate([(24, 24), (32, 20), (20, 32)]):  # resized to 16x16, 12x16 and 16x12
        images.append(tmp_path / f"{index}.png")
        Image.new("RGB", size, (40 * index, 100, 200)).save(images[-1])
    batch = backbone.encode([["Image:", ImageRef(str(path)), "Caption:"] for path in images], padding_side="left")
    expected = backbone.processor(text=["Image:<image>Caption:"] * 3, return_tensors="pt", padding=True,
                                  images=[[Image.open(path).convert("RGB")] for path in images], padding_side="left")
    assert batch["pixel_attention_mask"].sum((1, 2, 3)).tolist() == [256, 192, 192]
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(batch[key], expected[key]), key


def test_idefics2_config_renders_the_papers_base_prompt(workspace):
    """The packaged Idefics2 config gives exactly the paper's base prompt (REFERENCE section 3), demonstrations in the
    same format, and the chat-model configs the model's own template."""
    config = load_run_config("idefics2-vqav2")
    options = {k: v for k, v in config.task.items() if k not in ("name", "root", "image_root", "validation_images")}
    task = get_task("vqav2", seed=3407, root=workspace["vqa_root"], validation_images=1, **options)
    backbone = load_backbone(_model(workspace, "idefics2", chat=True), chat_template=config.chat_template)
    assert backbone.chat_template is None, "chat_template: false keeps the base prompt even with a template"
    icl = get_method("icl", shots=1).prompter(backbone, task, Seeds(0, 0))
    query = task.splits["test"][0]
    demo = icl.demonstrations(query)[0]
    eou = "<end_of_utterance>"
    expected = (f"Instruction: Provide an answer to the question. Use the image to answer.{eou}\n"
                f"Image:<image>{eou}\nQuestion: {demo.question}{eou}\nAnswer: {demo.target}{eou}\n"
                f"Image:<image>{eou}\nQuestion: {query.question}{eou}\nAnswer:")
    assert backbone.render(icl.prompt(query))[0] == expected
    assert load_run_config("llava-interleave-vqav2").chat_template is True
