"""The two training stages of the embedded VLM (used by `tools.build_vlm.build`).

1. ``ground``: the vision tower and the connector learn together to put each image's words into
   SmolLM2's embedding space: every one of the 16 image tokens is pulled onto the input embedding of
   the image's colour word (first half of the tokens) or shape word (second half), and classifies
   them by dot product with those embeddings. The frozen language model then reads an image roughly
   as it would read " blue blue ... circle circle", so the next stage starts from tokens it understands.
2. ``align``: with the tower frozen (its features computed once), the connector and the rows of the
   added image tokens learn through the frozen SmolLM2 on interleaved sequences of 1..N training
   images, each followed by a question or a description request and a reply in the assistant's own
   full sentences ("No, the image shows a blue circle."), loss on the replies only. Several images
   per sequence teach the model to read the image of the current block, not an earlier one.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hificl.embedded.vlm import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN
from hificl.run_config import load_run_config
from hificl.trainer import cosine_with_warmup

from .labels import COLORS, Question, Split

# The block format of the main job (its packaged config), in which the model learns to reply:
#   Image:<image>\nQuestion: what color is the shape?\nAnswer: Blue. The circle in the image is blue.\n\n
TEMPLATE = load_run_config("embedded-easyvqa").task["template"]


def vqa_prompt(question: str) -> str:
    """A query block of the main job's format for a question about one image."""
    return TEMPLATE.format(image=IMAGE_TOKEN, question=question)


def expand_image_tokens(text: str, seq_len: int) -> str:
    """Expand each ``<image>`` as the processor does for an unsplit image."""
    block = FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * seq_len + FAKE_IMAGE_TOKEN
    return text.replace(IMAGE_TOKEN, block)


def _step(opt, loss: torch.Tensor, params: list, lr_multiplier: float, losses: list[float], bar) -> None:
    """One AdamW step at ``base_lr * lr_multiplier`` with gradient clipping at 1; logs the loss."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * lr_multiplier
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")


def word_embeddings(embed: torch.Tensor, tokenizer, words) -> torch.Tensor:
    """Input embedding of each word as it follows a space (its first sub-token), [len(words), D]."""
    ids = [tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words]
    return embed[ids].detach().clone()


def ground(tower, connector, images: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor,
           color_emb: torch.Tensor, shape_emb: torch.Tensor, steps: int, batch_size: int = 32,
           lr: float = 2e-3, shape_weight: float = 5.0, seed: int = 0) -> list[float]:
    """Stage 1 (in place): tower + connector map an image to its colour/shape word embeddings.

    ``shape_weight`` scales the shape classification term: colour is read from a few pixels and is
    learned within a few hundred steps, the shape needs the tower's attention across patches and
    learns faster with a heavier weight (decoded shape on test images: 96.8% at weight 1,
    98% at 3 and 5)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(tower.parameters()) + list(connector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    opt.param_groups[0]["base_lr"] = lr
    tower.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="vision tower + connector (ground in word embeddings)", mininterval=2)
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        tokens = connector(tower(pixel_values=x).last_hidden_state)  # [B, n, D]
        half = tokens.shape[1] // 2
        c_tok, s_tok = tokens[:, :half], tokens[:, half:]
        c_target = color_emb[colors[idx]][:, None].expand_as(c_tok)
        s_target = shape_emb[shapes[idx]][:, None].expand_as(s_tok)
        scale = color_emb.norm(dim=-1).mean() ** -2 * 10
        c_logits = (c_tok @ color_emb.T * scale).flatten(0, 1)
        s_logits = (s_tok @ shape_emb.T * scale).flatten(0, 1)
        loss = (F.cross_entropy(c_logits, colors[idx].repeat_interleave(half))
                + shape_weight * F.cross_entropy(s_logits, shapes[idx].repeat_interleave(tokens.shape[1] - half))
                + (F.mse_loss(c_tok, c_target) + F.mse_loss(s_tok, s_target)) / color_emb.pow(2).mean())
        _step(opt, loss, params, cosine_with_warmup(step, steps, max(1, steps // 10)), losses, bar)
    tower.eval()
    return losses


@torch.no_grad()
def tower_features(tower, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The tower's last hidden states for ``images`` ([N, patches, hidden]), in eval mode."""
    tower.eval()
    return torch.cat([tower(pixel_values=images[i:i + batch_size]).last_hidden_state
                      for i in range(0, len(images), batch_size)])


# ----- stage 2: the replies the model is aligned on (its own verbose style) -----

DESCRIBE_REQUESTS = ("Describe the image.", "What is shown in the image?", "What do you see?",
                     "Describe this picture briefly.")
DESCRIPTIONS = ("The image shows a {c} {s}.", "I see a {c} {s}.", "There is a {c} {s} in the image.",
                "This is a {c} {s} on a white background.")
COLOR_REPLIES = ("{C}. The {s} in the image is {c}.", "{C}: the shape is {c}.")
SHAPE_REPLIES = ("{S}. The image shows a {c} {s}.", "A {s}: the shape in the image is a {c} {s}.")
YES_NO_REPLIES = ("{yn}, the image shows a {c} {s}.", "{yn}. The image contains a {c} {s}.")


def verbose_reply(rng: random.Random, question: Question, color: str, shape: str) -> str:
    """A full-sentence reply to an easy-VQA question whose one-word answer is ``question.answer``, the
    answer first (as chat assistants reply: "No, the image shows a blue circle."); the words that carry
    the content (yes/no, colour, shape) are wrapped in braces for the loss weights."""
    answer = question.answer
    if answer in ("yes", "no"):
        template = rng.choice(YES_NO_REPLIES)
    elif answer in COLORS:
        template = rng.choice(COLOR_REPLIES)
    else:
        template = rng.choice(SHAPE_REPLIES)
    return template.format(yn="{" + answer.capitalize() + "}", C="{" + color.capitalize() + "}",
                           S="{" + shape.capitalize() + "}", c="{" + color + "}", s="{" + shape + "}")


def block_sequence(rng: random.Random, split: Split, by_image: dict[int, list[Question]], n_images: int,
                   describe_share: float, style_weight: float, answer_weight: float = 1.0):
    """One interleaved training text of ``n_images`` blocks (question or description request + reply).
    Returns the text (``<image>`` unexpanded), the image ids and weighted character spans of the loss:
    ``answer_weight`` on the word that answers a question (the reply's first), 1 on the other content
    words and on each reply's first word, ``style_weight`` on the rest of each reply and its closing
    blank line. (A token takes the heaviest span that holds it.)"""
    text, ids, spans = "", [], []
    for image_id in rng.sample(split.image_ids, n_images):
        color, shape = split.colors[image_id], split.shapes[image_id]
        if rng.random() < describe_share or not by_image.get(image_id):
            question = rng.choice(DESCRIBE_REQUESTS)
            reply = rng.choice(DESCRIPTIONS).format(c="{" + color + "}", s="{" + shape + "}")
        else:
            q = rng.choice(by_image[image_id])
            question, reply = q.text, verbose_reply(rng, q, color, shape)
        text += vqa_prompt(question)
        start = len(text)
        weight = answer_weight if question not in DESCRIBE_REQUESTS else 1.0  # the reply's first word answers
        for piece in re.split(r"(\{[A-Za-z]+\})", " " + reply):
            if piece.startswith("{"):
                spans.append((len(text) - 1, len(text) + len(piece) - 2, weight))  # with its leading space
                piece, weight = piece[1:-1], 1.0
            text += piece
        opening = re.match(r" [A-Za-z]+", text[start:])
        spans.append((start, start + opening.end(), 1.0))  # whether and how the model starts replying
        text += "\n\n"
        spans.append((start, len(text), style_weight))
        ids.append(image_id)
    return text, ids, spans


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    weights: torch.Tensor  # loss weight of each token as a target (0: no loss)
    image_ids: list[int]  # images in order of appearance, row by row


def make_batch(texts, spans, image_ids: list[list[int]], tokenizer, seq_len: int) -> Batch:
    """Tokenise (right padding) and weight each token by the heaviest span containing it."""
    grow = len(expand_image_tokens(IMAGE_TOKEN, seq_len)) - len(IMAGE_TOKEN)
    expanded, moved = [], []
    for text, sp in zip(texts, spans):
        starts = [m.start() for m in re.finditer(re.escape(IMAGE_TOKEN), text)]

        def shift(pos: int) -> int:
            return pos + grow * sum(s < pos for s in starts)

        moved.append([(shift(a), shift(b), w) for a, b, w in sp])
        expanded.append(expand_image_tokens(text, seq_len))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    enc = tokenizer(expanded, return_tensors="pt", padding=True, return_offsets_mapping=True)
    tokenizer.padding_side = side
    weights = torch.zeros(enc.input_ids.shape)
    for row, sp in enumerate(moved):
        for col, (a, b) in enumerate(enc.offset_mapping[row].tolist()):
            if enc.attention_mask[row, col] and b > a:
                weights[row, col] = max([w for s, e, w in sp if s <= a and b <= e], default=0.0)
    return Batch(enc.input_ids, enc.attention_mask, weights, [i for ids in image_ids for i in ids])


def merged_embeddings(model, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings with the ``<image>`` positions replaced, in order, by ``image_tokens``
    ([n_images, seq_len, D]): what SmolVLM's own forward does with the tower's output."""
    embeds = model.model.text_model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(mask, image_tokens.reshape(-1, embeds.shape[-1]).to(embeds.dtype))


def lm_loss(model, batch: Batch, image_tokens: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy (lm_head applied to the weighted positions only)."""
    embeds = merged_embeddings(model, batch.input_ids, image_tokens)
    hidden = model.model.text_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    weights = batch.weights[:, 1:]
    keep = weights > 0
    logits = model.lm_head(hidden[:, :-1][keep])
    losses = F.cross_entropy(logits, batch.input_ids[:, 1:][keep], reduction="none")
    return (losses * weights[keep]).sum() / weights[keep].sum()


def align(model, tokenizer, split: Split, features: dict[int, torch.Tensor], steps: int, batch_size: int = 8,
          max_images: int = 4, lr: float = 2e-3, describe_share: float = 0.3, style_weight: float = 0.3,
          answer_weight: float = 1.0, bf16: bool = False, seed: int = 0) -> list[float]:
    """Stage 2: connector + added token rows through the frozen LM (tower features precomputed).

    ``bf16`` runs the LM's forward and backward under CPU bfloat16 autocast (the trained weights and
    the optimiser stay float32): about 1.4x faster per step on CPUs with AVX512-BF16."""
    rng = random.Random(seed)
    model.requires_grad_(False)
    embed = model.model.text_model.embed_tokens.weight
    first_added = embed.shape[0] - 4
    embed.requires_grad_(True)
    # only the added tokens' rows learn (the tied LM head shares this matrix)
    row_hook = embed.register_hook(lambda g: torch.cat([torch.zeros_like(g[:first_added]), g[first_added:]]))
    connector = list(model.model.connector.parameters())
    for p in connector:
        p.requires_grad_(True)
    groups = [{"params": connector, "lr": lr}, {"params": [embed], "lr": lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    trainable = connector + [embed]
    by_image: dict[int, list[Question]] = {}
    for q in split.questions:
        by_image.setdefault(q.image_id, []).append(q)
    seq_len = model.model.image_seq_len
    losses: list[float] = []
    bar = tqdm(range(steps), desc="connector through SmolLM2 (interleaved replies)", mininterval=2)
    for step in bar:
        texts, spans, ids = [], [], []
        for _ in range(batch_size):
            text, image_ids, sp = block_sequence(rng, split, by_image, rng.randint(1, max_images),
                                                 describe_share, style_weight, answer_weight)
            texts.append(text)
            spans.append(sp)
            ids.append(image_ids)
        batch = make_batch(texts, spans, ids, tokenizer, seq_len)
        image_tokens = model.model.connector(torch.stack([features[i] for i in batch.image_ids]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, batch, image_tokens).float()
        _step(opt, loss, trainable, cosine_with_warmup(step, steps, max(1, steps // 20)), losses, bar)
    row_hook.remove()
    model.requires_grad_(False)
    return losses
