"""Fixtures for the paper's benchmarks, built in the test: VQAv2 / OK-VQA / Karpathy COCO files in exactly the
official formats (a handful of questions and captions, images drawn here), and a tiny random model of every
supported family saved to a folder with a processor made of local pieces (a character-level tokenizer whose
special tokens sit at the ids of `tiny_models`, and the families' Pil image processors), so that
`load_backbone(folder)` loads it like a real checkpoint.

Chat templates: small Jinja templates written here in the conventions of the real families (ChatML with a default
system turn for Qwen-VL, images first for LLaVA-Interleave, "User:/Assistant:" with <end_of_utterance> for
Idefics); the real checkpoints ship their own.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import tiny_models

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SIZES = [(24, 24), (32, 20), (20, 28)]  # images of several shapes: batches need padding

# ---------------------------------------------------------------------------------------------- datasets
VQA_ANSWERS = {  # 10 annotators per question; the majority answer first
    "red": ["red"] * 6 + ["dark red"] * 2 + ["maroon"] * 2,
    "green": ["green"] * 9 + ["lime"],
    "blue": ["blue"] * 5 + ["navy"] * 3 + ["dark blue"] * 2,
    "yellow": ["yellow"] * 10,
}


def _draw(path: Path, colour: str, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", SIZES[index % len(SIZES)], (250, 250, 250))
    image.paste(COLOURS[colour], (4, 4, 14, 14))
    image.save(path, format="JPEG")


def write_vqa(root: Path, prefix: str = "v2_", n_train: int = 16, n_val: int = 6) -> Path:
    """VQAv2-format questions/annotations (``prefix`` "" gives the OK-VQA file names) and COCO-named images under
    `root`; two questions per image. Val question ids are 1000.. (question 1000 asks about a red square)."""
    names = list(COLOURS)
    for subtype, count, first in (("train2014", n_train, 1), ("val2014", n_val, 1000)):
        questions, annotations = [], []
        for index in range(count):
            question_id, image_id = first + index, 500 + first + index // 2
            colour = names[(index // 2) % len(names)]
            if index % 2 == 0:
                _draw(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", colour, index // 2)
            question = "What colour is the square?" if index % 2 == 0 else "Which colour is shown?"
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                       for i, a in enumerate(VQA_ANSWERS[colour])]
            annotations.append({"question_id": question_id, "image_id": image_id, "answers": answers,
                                "multiple_choice_answer": colour, "question_type": "what color is the",
                                "answer_type": "other"})
        (root / f"{prefix}OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(
            {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
             "questions": questions}))
        (root / f"{prefix}mscoco_{subtype}_annotations.json").write_text(json.dumps(
            {"info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations}))
    return root


CAPTIONS = {  # Karpathy val: two images whose references share no word (so every n-gram has the same idf)
    "val": {9001: "a red bus parked outside", 9002: "two green cats sleeping together"},
}
CATEGORIES = [{"id": 6, "name": "bus", "supercategory": "vehicle"},
              {"id": 17, "name": "cat", "supercategory": "animal"},
              {"id": 18, "name": "dog", "supercategory": "animal"}]


def write_karpathy(root: Path, n_train: int = 8) -> Path:
    """dataset_coco.json (train / restval / val / test) with 5 references per image, the images, and COCO
    instance annotations of the val2014 images (annotations/instances_val2014.json)."""
    records, instances, images = [], [], []
    plan = [("train" if i < n_train - 2 else "restval", "train2014", 100 + i, None) for i in range(n_train)]
    plan += [("val", "val2014", cocoid, text) for cocoid, text in CAPTIONS["val"].items()]
    plan += [("test", "val2014", 9101, None), ("test", "val2014", 9102, None)]
    for index, (split, folder, cocoid, text) in enumerate(plan):
        colour = list(COLOURS)[index % len(COLOURS)]
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        _draw(root / folder / filename, colour, index)
        text = text or f"a {colour} square on a white background"
        sentences = [{"raw": text.capitalize() + ".", "tokens": text.split()} for _ in range(5)]
        records.append({"filepath": folder, "filename": filename, "imgid": index, "split": split, "cocoid": cocoid,
                        "sentids": list(range(5 * index, 5 * index + 5)), "sentences": sentences})
        if folder == "val2014":
            images.append({"id": cocoid, "file_name": filename, "height": 24, "width": 24})
    instances = [{"id": 1, "image_id": 9001, "category_id": 6, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0},
                 {"id": 2, "image_id": 9002, "category_id": 17, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": records, "dataset": "coco"}))
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(
        {"images": images, "annotations": instances, "categories": CATEGORIES}))
    return root


# ---------------------------------------------------------------------------------------------- families
SPECIAL_IDS = {"<|im_start|>": 243, "<|im_end|>": 244, "<end_of_utterance>": tiny_models.END_OF_UTTERANCE_ID,
               "<fake_token_around_image>": tiny_models.FAKE_AROUND_IMAGE_ID,
               "<global-img>": tiny_models.GLOBAL_IMG_ID}
QWEN_IDS = {"<|image_pad|>": tiny_models.IMAGE_ID, "<|video_pad|>": tiny_models.VIDEO_ID,
            "<|vision_start|>": tiny_models.VISION_START_ID, "<|vision_end|>": tiny_models.VISION_END_ID}

CHATML = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
          "{% for p in m.content %}{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
          "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGES_FIRST = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% for p in m.content if p.type == 'image' %}<image>\n{% endfor %}"
                "{% for p in m.content if p.type == 'text' %}{{ p.text }}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER_ASSISTANT = ("{% for m in messages %}{{ m.role | capitalize }}:{% for p in m.content %}"
                  "{% if p.type == 'image' %}<image>{% else %} {{ p.text }}{% endif %}{% endfor %}"
                  "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
TEXT_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TEMPLATES = {"qwen2_vl": CHATML, "qwen2_5_vl": CHATML, "qwen3_vl": CHATML, "llava_qwen2": IMAGES_FIRST,
                  "idefics2": USER_ASSISTANT, "idefics3": USER_ASSISTANT, "smolvlm": USER_ASSISTANT,
                  "llama": TEXT_CHATML}


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: pad 0, bos 1, eos 2, printable characters from 3, special tokens at 240+."""
    special = dict(SPECIAL_IDS, **(QWEN_IDS if family.startswith("qwen") else {"<image>": tiny_models.IMAGE_ID}))
    vocab = {"<pad>": tiny_models.PAD_ID, "<bos>": tiny_models.BOS_ID, "<eos>": tiny_models.EOS_ID, **special}
    vocab.update({char: 3 + index for index, char in enumerate(string.printable)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   additional_special_tokens=list(special))


def _processor(family: str, tokenizer, chat_template: str | None):
    """The family's processor made of local pieces, or (Qwen-VL: the processor class needs torchvision) its image
    processor alone."""
    import transformers as t

    if family.startswith("qwen"):
        pixels = 16 * 16  # every image is resized to 16 x 16 pixels: a 4 x 4 patch grid, 4 merged tokens
        return t.Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                          size={"shortest_edge": pixels, "longest_edge": pixels})
    if family == "llava_qwen2":
        return t.LlavaProcessor(image_processor=t.SiglipImageProcessorPil(size={"height": 16, "width": 16}),
                                tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full",
                                num_additional_image_tokens=0, chat_template=chat_template)
    if family == "idefics2":
        images = t.Idefics2ImageProcessorPil(do_image_splitting=False, size={"shortest_edge": 12, "longest_edge": 16})
        return t.Idefics2Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                   chat_template=chat_template)
    images = t.Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                         max_image_size={"longest_edge": 32})
    return t.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                               chat_template=chat_template)


def save_family(folder: Path, family: str, chat: bool = False, seed: int = 0) -> str:
    """The tiny model of `family` (see `tiny_models.FAMILIES`) with its tokenizer/processor saved to `folder`;
    with `chat`, the family's chat template too."""
    case = tiny_models.build(family, seed=seed)
    tokenizer = family_tokenizer(family)
    template = CHAT_TEMPLATES[family] if chat else None
    case.model.generation_config.eos_token_id = [tiny_models.EOS_ID, SPECIAL_IDS["<|im_end|>"],
                                                 SPECIAL_IDS["<end_of_utterance>"]]
    case.model.save_pretrained(folder)
    if case.is_multimodal:
        processor = _processor(family, tokenizer, template)
        processor.save_pretrained(folder)
        if family.startswith("qwen"):
            tokenizer.chat_template = template
            tokenizer.save_pretrained(folder)
    else:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(folder)
    return str(folder)
