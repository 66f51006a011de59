"""Fast checks of the embedded default VLM (SmolLM2 inside SmolVLM's layout) as the package ships it: the loader,
the processor, and what the committed assets can do. The build itself is checked in test_build_vlm.py."""


import pytest
import torch

from fixtures import needs_smollm2
from hificl.embedded.vlm import (ADDED_TOKENS, ASSETS_DIR, BUILD_COMMAND, IMAGE_TOKEN, WEIGHTS_FILE,
                                 load_embedded_vlm)

pytestmark = needs_smollm2


def _images(n):
    import easy_vqa
    from PIL import Image

    paths = easy_vqa.get_test_image_paths()
    return [Image.open(paths[i]).convert("RGB") for i in range(n)], [paths[i] for i in range(n)]


def test_gguf_located():
    from hificl.embedded import smollm2_gguf_path

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_converted_cache_loads_as_plain_fp32(smollm2):
    lm, tokenizer = smollm2
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert getattr(lm.config, "quantization_config", None) is None and getattr(lm, "hf_quantizer", None) is None
    assert lm.dtype == torch.float32 and lm.config.vocab_size == 49152 == len(tokenizer)
    assert lm.config.num_hidden_layers == 30 and lm.config.num_attention_heads == 9


def test_vlm_text_logits_equal_smollm2(smollm2, fresh_vlm):
    lm, tokenizer = smollm2
    model, processor = fresh_vlm
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = lm(ids).logits
        multimodal = model(input_ids=ids).logits
    assert multimodal.shape[-1] == plain.shape[-1] + len(ADDED_TOKENS)
    assert torch.equal(multimodal[..., : plain.shape[-1]], plain)
    # the added tokens never outrank the best real token
    assert (multimodal[..., plain.shape[-1]:].amax(-1) < plain.amax(-1)).all()
    assert model.lm_head.weight is model.model.text_model.embed_tokens.weight


def test_processor_image_tokens_and_pixels(fresh_vlm):
    from tools.build_vlm.labels import image_tensor
    from tools.build_vlm.stages import expand_image_tokens, vqa_prompt

    model, processor = fresh_vlm
    images, paths = _images(3)
    text = vqa_prompt("what color is the shape?") + " blue\n\n" + vqa_prompt("is there a circle?") + " no\n\n" + \
        vqa_prompt("what shape?")
    assert text.count(IMAGE_TOKEN) == 3
    enc = processor(text=[text], images=[images], return_tensors="pt")
    per_image = model.model.image_seq_len
    assert per_image == 16
    assert int((enc.input_ids == model.config.image_token_id).sum()) == 3 * per_image
    assert enc.pixel_values.shape == (1, 3, 3, 64, 64)
    assert torch.allclose(enc.pixel_values[0], image_tensor(paths), atol=1e-6)
    # the build tokenises expanded text itself: it must match the processor exactly
    expanded = processor.tokenizer(expand_image_tokens(text, per_image), return_tensors="pt").input_ids
    assert torch.equal(expanded, enc.input_ids)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc.input_ids.shape


def test_load_embedded_vlm_fails_clearly_without_assets(tmp_path):
    with pytest.raises(FileNotFoundError, match="reinstall hificl, or build them .*tools.build_vlm"):
        load_embedded_vlm(assets_dir=tmp_path)
    assert BUILD_COMMAND == "python -m tools.build_vlm"


def test_run_config_renders_the_prompts_the_model_was_aligned_with(fresh_vlm):
    """The packaged easy-VQA config must give the block format the build trained and measured."""
    from hificl.backbones import Backbone
    from hificl.run_config import load_run_config
    from hificl.tasks import Example, ImageRef, Task
    from tools.build_vlm.stages import vqa_prompt

    model, processor = fresh_vlm
    config = load_run_config("embedded-easyvqa")
    options = {k: v for k, v in config.task.items() if k not in ("name", "validation_images")}
    _, paths = _images(3)
    examples = [Example(f"e{i}", q, (a,), ImageRef(p)) for i, (q, a, p) in enumerate(
        [("what color is the shape?", "blue", paths[0]), ("is there a circle?", "no", paths[1]),
         ("what shape is present?", "circle", paths[2])])]
    task = Task("easy-vqa", {"train": examples[:2], "test": examples[2:]}, **options)
    backbone = Backbone(model, processor.tokenizer, processor)
    segments = task.demonstration(examples[0]) + task.demonstration(examples[1]) + task.query_prompt(examples[2])
    text, images = backbone.render(segments)
    assert text == ("Image:<image>\nQuestion: what color is the shape?\nAnswer: blue\n\n"
                    "Image:<image>\nQuestion: is there a circle?\nAnswer: no\n\n"
                    "Image:<image>\nQuestion: what shape is present?\nAnswer:")
    assert text.endswith(vqa_prompt("what shape is present?"))
    assert len(images) == 3
    assert task.postprocess(" circle\n\nImage:") == "circle"


def test_committed_assets_see_and_answer_verbosely():
    """The committed build: it names colour and shape of test images, and answers in sentences zero-shot."""
    from hificl.backbones import load_backbone
    from hificl.evaluator import GenerationConfig, evaluate
    from hificl.prompting import Prompter
    from hificl.tasks import Example, ImageRef, Task
    from tools.build_vlm import measure
    from tools.build_vlm.labels import load_split

    assert (ASSETS_DIR / WEIGHTS_FILE).is_file(), f"embedded VLM assets missing; build them with {BUILD_COMMAND}"
    backbone = load_backbone("embedded")
    split = load_split("test")
    seen = measure.see(backbone, split, limit=16)
    assert seen["accuracy"] * 16 >= 13, seen["examples"]
    examples = [Example(f"q{i}", "is there a red shape?", ("yes",), ImageRef(split.paths[i])) for i in split.image_ids[:4]]
    task = Task("yes/no", {"train": examples, "test": examples}, template=measure.TEMPLATE, metric="exact_match",
                stop_strings=("\n",))
    replies = evaluate(backbone.model, Prompter(task), backbone, task, examples,
                       GenerationConfig(max_new_tokens=12), progress=False).predictions
    assert all(len(r["prediction"].split()) >= 3 for r in replies), replies
