"""The embedded VLM's build (`tools.build_vlm`), checked in small pieces: its prompts are the main job's, its
training merge is SmolVLM's own forward, its loss weights cover the replies only, two steps of each stage train
only what they should, and it writes its folder atomically and checks its bars. Never runs a whole build."""

import random
import re

import torch

from fixtures import needs_smollm2
from hificl.embedded.vlm import ADDED_TOKENS, IMAGE_TOKEN
from hificl.metrics import normalize_answer
from tools.build_vlm import stages
from tools.build_vlm.labels import COLORS, SHAPES, Question, Split, image_tensor

pytestmark = needs_smollm2


def _paths(n):
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    return [paths[i] for i in range(n)]


def test_prompt_format_is_the_main_jobs():
    assert stages.vqa_prompt("is there a red shape?") == "Image:<image>\nQuestion: is there a red shape?\nAnswer:"


def test_training_merge_equals_smolvlm_forward(fresh_vlm):
    """The build trains on precomputed tower features merged by hand; that must be SmolVLM's own forward."""
    model, processor = fresh_vlm
    pixels = image_tensor(_paths(2))
    text = stages.vqa_prompt("what color is the shape?") + " blue\n\n" + stages.vqa_prompt("is there a circle?")
    ids = processor.tokenizer(stages.expand_image_tokens(text, model.model.image_seq_len), return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.model(input_ids=ids, pixel_values=pixels[None]).last_hidden_state
        tokens = model.model.connector(stages.tower_features(model.model.vision_model, pixels))
        embeds = stages.merged_embeddings(model, ids, tokens)
        ours = model.model.text_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # and the image really enters: other images give other states
    with torch.no_grad():
        other = model.model(input_ids=ids, pixel_values=pixels.flip(0)[None]).last_hidden_state
    assert (other - reference).abs().max() > 1e-3


def test_verbose_replies_answer_first_in_sentences():
    rng = random.Random(0)
    for answer in ("yes", "no", *COLORS, *SHAPES):
        for _ in range(4):
            color = answer if answer in COLORS else "teal"
            shape = answer if answer in SHAPES else "circle"
            reply = stages.verbose_reply(rng, Question("q?", answer, 0), color, shape).replace("{", "").replace("}", "")
            words = [w for w in re.findall(r"[a-z]+", reply.lower()) if w not in ("a", "an", "the")]
            assert words[0] == answer and len(words) >= 4, reply
            assert normalize_answer(reply) != answer  # never the task's one-word format


def test_alignment_loss_weights_cover_the_replies_only(smollm2):
    from transformers import AutoTokenizer

    from hificl.embedded.vlm import add_image_tokens

    tokenizer = AutoTokenizer.from_pretrained(smollm2[1].name_or_path)
    add_image_tokens(tokenizer)
    split = Split("toy", [0, 1], {}, {0: "red", 1: "blue"}, {0: "circle", 1: "triangle"},
                  [Question("is there a red shape?", "yes", 0), Question("what shape is present?", "triangle", 1)])
    by_image = {0: [split.questions[0]], 1: [split.questions[1]]}
    text, ids, spans = stages.block_sequence(random.Random(3), split, by_image, 2, describe_share=0.0,
                                            style_weight=0.25, answer_weight=3.0)
    batch = stages.make_batch([text], [spans], [ids], tokenizer, seq_len=16)
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


def test_build_stages_train_only_the_vision_side_and_the_added_rows(fresh_vlm):
    """Two steps of each build stage: the tower/connector and the added token rows move, SmolLM2 does not."""
    import copy

    model, processor = fresh_vlm
    model = copy.deepcopy(model)
    tokenizer = processor.tokenizer
    pixels = image_tensor(_paths(4))
    embed = model.model.text_model.embed_tokens.weight
    lm_before = {k: v.clone() for k, v in model.model.text_model.state_dict().items()}
    tower_before = copy.deepcopy(model.model.vision_model.state_dict())
    losses = stages.ground(model.model.vision_model, model.model.connector, pixels, torch.tensor([0, 1, 2, 3]),
                          torch.tensor([0, 1, 2, 0]), stages.word_embeddings(embed, tokenizer, COLORS),
                          stages.word_embeddings(embed, tokenizer, SHAPES), steps=2, batch_size=4)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, model.model.vision_model.state_dict()[k]) for k, v in tower_before.items())

    split = Split("toy", [0, 1, 2, 3], {}, dict(enumerate(("red", "green", "blue", "black"))),
                  dict(enumerate(("circle", "rectangle", "triangle", "circle"))),
                  [Question("is there a red shape?", "yes", 0), Question("what color is the shape?", "green", 1),
                   Question("what shape is present?", "triangle", 2), Question("is there a circle?", "yes", 3)])
    features = dict(enumerate(stages.tower_features(model.model.vision_model, pixels)))
    connector_before = copy.deepcopy(model.model.connector.state_dict())
    losses = stages.align(model, tokenizer, split, features, steps=2, batch_size=2, max_images=2, bf16=True)
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
    from tools.build_vlm.build import check_bars, write_dir_atomically

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
