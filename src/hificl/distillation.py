"""Distillation of a k-shot teacher into a student adapter from unlabelled queries: the teacher's own answers
(`TeacherAnswers`), the objectives that learn from them (`TeacherAnswerKL`; `TeacherAnswerAlignment`, MimIC's
alignment) and an initialisation of virtual pairs from the teacher's demonstration tokens
(`initialise_from_demonstrations`). The method that composes them is `hificl.methods.distill`."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import AdapterModel, HiFICLModel
from .attention_capture import capture_attention
from .distributed import is_sharded_model, process_state
from .generation import generate_answers
from .objectives import (Teacher, TeacherBatch, TeacherMLPAlignment, TeacherObjective, answer_positions,
                         answer_tokens, capture_outputs, layer_mse, shared_tails)
from .tasks import Example, Query


class TeacherAnswers:
    """The teacher's own answers to unlabelled queries: greedy, with the adapter disabled (an ensemble of
    teachers: the majority answer, ties to the first draw). `prepare` generates them all before training, in
    batches of `batch_size` queries in the given order dealt out to the processes, so the answers do not depend on
    the number of processes, the micro-batches or a resume."""

    def __init__(self, backbone, task, teachers: list[Teacher], adapter: AdapterModel, batch_size: int = 8):
        self.backbone, self.task, self.teachers, self.adapter = backbone, task, teachers, adapter
        self.batch_size = batch_size
        self.answers: dict[str, str] = {}

    @torch.no_grad()
    def _generate(self, queries: list[Query]) -> dict[str, str]:
        model, backbone = self.adapter, self.backbone
        was_training = model.training
        model.eval()
        draws = []
        for teacher in self.teachers:
            batch = backbone.encode(teacher.prompts(queries), padding_side="left", names=[q.id for q in queries])
            batch = {k: v.to(backbone.device) for k, v in batch.items()}
            with model.disable_adapter():
                raws = generate_answers(model, backbone, self.task, batch, self.task.max_new_tokens,
                                        **({"synced_gpus": True} if is_sharded_model(model) else {}))
            draws.append([self.task.postprocess(raw) for raw in raws])
        model.train(was_training)
        answers = {}
        for index, query in enumerate(queries):
            votes = Counter(draw[index] for draw in draws)
            best = max(votes.values())
            answers[query.id] = next(draw[index] for draw in draws if votes[draw[index]] == best)
        return answers

    def prepare(self, queries: list[Query], progress: bool = True) -> None:
        """Generate the answers of every training query (each process its share of the batches, then gathered),
        with a progress bar (ETA) on the main process."""
        from accelerate.utils import gather_object

        state = process_state()
        missing = [q for q in queries if q.id not in self.answers]
        batches = [missing[i:i + self.batch_size] for i in range(0, len(missing), self.batch_size)]
        mine_batches = batches[state.process_index::state.num_processes]
        if is_sharded_model(self.adapter) and batches:  # every generation is a collective: as many on every process
            rounds = -(-len(batches) // state.num_processes)
            mine_batches += [batches[0]] * (rounds - len(mine_batches))  # answers of a repeat change nothing
        mine = {}
        with tqdm(total=sum(len(b) for b in mine_batches), desc="teacher answers", unit="q", dynamic_ncols=True,
                  disable=not (progress and state.is_main_process)) as bar:
            for batch in mine_batches:
                mine.update(self._generate(batch))
                bar.update(len(batch))
        for answers in (gather_object([mine]) if state.num_processes > 1 else [mine]):
            self.answers.update(answers)

    def __call__(self, queries: list[Query]) -> list[Example]:
        """`queries` labelled with the teacher's answers (post-processed as the task does)."""
        missing = [q for q in queries if q.id not in self.answers]
        if missing:  # outside a trainer, which prepares them all first
            self.answers.update(self._generate(missing))
        return [Example(q.id, q.question, (self.answers[q.id],), q.image, target=self.answers[q.id]) for q in queries]


class TeacherAnswerKL(TeacherObjective):
    """KL(teacher || student) at the positions predicting the teacher's own greedy answer (+ ``ce_weight`` x CE
    on it); the teacher an ensemble of `teachers` (their next-token distributions averaged). With ``align_weight``
    (and the attention modules `attention` to align), plus that weight x the mean over layers of the squared error
    between the student's attention outputs and the teacher's (averaged over its draws) at every aligned position
    (the query's tokens and the answer's): the student is asked to compute what the teacher computes, not only to
    answer as it does.

    With ``labelled_weight`` (and the `labelled` examples: the teacher's own demonstrations, whose answers the
    method may read), plus that weight x the student's cross-entropy on their true answers, each asked as a
    zero-shot query: all of them in every micro-batch (a constant set: the mean is over its answer tokens).

    ``confidence`` weighs each training query by how sure the teacher is of its own answer: its probability
    ``c`` of the whole answer (the product over the answer's tokens and its end of the ensemble's probability of
    each token). "none": every query weighs 1; "weight": each query's KL and CE positions are multiplied by ``c``;
    "filter": by 1 if ``c >= min_confidence`` else 0. The means stay over all of the batch's answer positions (a
    query weighed down lowers the loss rather than raising the others' share), so a step's loss remains a mean
    over its elements, whatever its micro-batches."""

    def __init__(self, backbone, task, prompter, answers: TeacherAnswers, ce_weight: float = 0.0,
                 align_weight: float = 0.0, attention: list[nn.Module] | None = None,
                 labelled: list[Example] = (), labelled_weight: float = 0.0, confidence: str = "none",
                 min_confidence: float = 0.5):
        super().__init__(backbone, task, prompter, answers.teachers[0])
        self.answers, self.teachers, self.ce_weight = answers, answers.teachers, ce_weight
        self.align_weight, self.attention = align_weight, list(attention or []) if align_weight else []
        self.labelled_weight, self.confidence, self.min_confidence = labelled_weight, confidence, min_confidence
        if labelled_weight and not labelled:
            raise ValueError("labelled_weight needs the labelled examples to train on.")
        self.labelled = self.student_batch(list(labelled)) if labelled_weight else None

    def prepare(self, items: list[Query], progress: bool = True) -> None:
        self.answers.prepare(items, progress)

    def batch(self, items: list[Query]) -> list[TeacherBatch]:
        """One aligned batch per teacher draw (the same student inputs)."""
        labelled = self.answers(items)
        student = self.student_batch(labelled)
        return [teacher.batch(labelled, student) for teacher in self.teachers]

    def counts(self, batches: list[TeacherBatch]) -> list[int]:
        first = batches[0]
        where = answer_positions(first.student["labels"]) & first.aligned()
        return [int(where.sum())] + ([answer_tokens(first.student["labels"])] if self.ce_weight else []) + (
            [int(first.aligned().sum())] if self.align_weight else []) + (
            [answer_tokens(self.labelled["labels"])] if self.labelled_weight else [])

    def terms(self, model: nn.Module, batches: list[TeacherBatch]) -> list[tuple[float, torch.Tensor]]:
        first = batches[0]
        with capture_outputs(self.attention) as student_hidden:
            out = model(**{k: v for k, v in first.student.items() if k != "labels"})
        probs, hidden = None, None
        for batch in batches:
            logits, outputs = Teacher.run(model, batch, self.attention)
            p = torch.softmax(batch.align(logits).float(), -1)
            probs = p if probs is None else probs + p
            aligned = [batch.align(h).float() / len(batches) for h in outputs]
            hidden = aligned if hidden is None else [a + b for a, b in zip(hidden, aligned)]
        probs = probs / len(batches)
        labels = first.student["labels"]
        where = answer_positions(labels) & first.aligned()
        following = torch.cat([labels[:, 1:], labels[:, :1]], 1)[where]  # the answer token each position predicts
        teacher_log = torch.log(probs[where].clamp_min(1e-30))
        student_log = torch.log_softmax(out.logits[where].float(), -1)
        weights = self._query_weights(teacher_log.gather(1, following[:, None])[:, 0], where)
        kl = (weights * (probs[where] * (teacher_log - student_log)).sum(-1)).mean()
        terms = [(1.0, kl)]
        if self.ce_weight:
            terms.append((self.ce_weight, (weights * -student_log.gather(1, following[:, None])[:, 0]).mean()))
        if self.align_weight:
            terms.append((self.align_weight, layer_mse(hidden, student_hidden, first.aligned())))
        if self.labelled_weight:
            device = out.logits.device
            terms.append((self.labelled_weight, self.answer_loss(model, {k: v.to(device) for k, v in
                                                                        self.labelled.items()})))
        return terms

    def _query_weights(self, token_log: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Per answer position (flattened as ``where`` selects them): its query's weight under `confidence`, from
        the teacher's log-probability `token_log` of each answer token."""
        if self.confidence == "none":
            return torch.ones_like(token_log)
        rows = where.nonzero()[:, 0]
        answer_log = torch.zeros(where.shape[0], device=token_log.device).index_add(0, rows, token_log)
        confidence = answer_log.exp()
        weights = confidence if self.confidence == "weight" else (confidence >= self.min_confidence).float()
        return weights[rows]

    def set_epoch(self, epoch: int) -> None:
        for teacher in self.teachers:
            teacher.set_epoch(epoch)


class TeacherAnswerAlignment(TeacherMLPAlignment):
    """MimIC's layer-wise MLP alignment (+ CE) with the teacher's own answer in place of the label."""

    def __init__(self, backbone, task, prompter, answers: TeacherAnswers, mlps, ce_weight: float = 0.0):
        super().__init__(backbone, task, prompter, answers.teachers[0], mlps, align_weight=1.0, ce_weight=ce_weight)
        self.answers = answers

    def prepare(self, items: list[Query], progress: bool = True) -> None:
        self.answers.prepare(items, progress)

    def batch(self, items: list[Query]) -> TeacherBatch:
        labelled = self.answers(items)
        return self.teacher.batch(labelled, self.student_batch(labelled))


@torch.no_grad()
def initialise_from_demonstrations(adapter: HiFICLModel, backbone, teacher: Teacher, task, queries: list[Query]) -> None:
    """Set each layer's virtual keys and values to the post-RoPE keys and values of the demonstration tokens its
    query heads attend to most (in the teacher's prompts of a few unlabelled queries: the attention mass from the
    query's own tokens, summed over them; never a row's first token, the attention sink), factorised to the
    adapter's rank by a truncated SVD, or kept as they are for full-rank factors. Where the prompts hold fewer
    demonstration tokens than virtual slots, the chosen ones repeat."""
    batch = backbone.encode(teacher.prompts(queries), padding_side="right")
    alone = backbone.encode([task.query_prompt(q) for q in queries], padding_side="right")
    query_tokens = torch.tensor(shared_tails(alone["input_ids"], alone["attention_mask"], batch["input_ids"],
                                             batch["attention_mask"]))
    ends = batch["attention_mask"].sum(1)
    demo_ends = ends - query_tokens  # each row's demonstrations (and instruction) end where its query starts
    batch = {k: v.to(backbone.device) for k, v in batch.items()}
    with adapter.disable_adapter(), capture_attention(adapter) as captured:
        adapter(**batch)
    config = adapter.peft_config[adapter.active_adapter]
    n = config.num_virtual_tokens
    for layer, (query, key, value, visible) in captured.items():
        layer_kv = adapter.adapters[adapter.active_adapter].get(layer)
        if layer_kv is None:
            continue
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        scores = (query.float() @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)  # [b, h, q, k]
        chosen = _most_attended(probs, demo_ends.to(probs.device), ends.to(probs.device), n)  # [h, n]: b * k + pos
        keys = key.transpose(0, 1).flatten(1, 2)  # [h, b * k, d]
        values = value.transpose(0, 1).flatten(1, 2)
        index = chosen[..., None].expand(-1, -1, keys.shape[-1])
        _set_factors(layer_kv, keys.gather(1, index), values.gather(1, index), config.rank)


def _most_attended(probs: torch.Tensor, demo_ends: torch.Tensor, ends: torch.Tensor, n: int) -> torch.Tensor:
    """Per head, the `n` demonstration tokens with the most attention mass from the query tokens, as indices
    ``row * length + position`` into the flattened ``[rows, length]`` (fewer candidates than `n`: repeated in
    order)."""
    rows, heads, length, _ = probs.shape
    positions = torch.arange(length, device=probs.device)
    from_query = (positions[None] >= demo_ends[:, None]) & (positions[None] < ends[:, None])  # [b, q]
    is_demo = (positions[None] < demo_ends[:, None]) & (positions[None] > 0)  # [b, k]: no sink
    mass = (probs * from_query[:, None, :, None]).sum(2)  # [b, h, k]
    mass = mass.masked_fill(~is_demo[:, None], float("-inf")).transpose(0, 1).flatten(1)  # [h, b * k]
    available = int(is_demo.sum())
    if available == 0:
        raise ValueError("The teacher's prompts hold no demonstration token to initialise virtual pairs from.")
    top = mass.topk(min(n, available), dim=-1).indices  # [h, <= n], most attended first
    return top[:, torch.arange(n, device=top.device) % top.shape[1]]


def _set_factors(layer_kv, keys: torch.Tensor, values: torch.Tensor, rank: int) -> None:
    """Keys/values ``[h, n, d]`` into a `VirtualKV`: full-rank tensors as they are, else a rank-r truncated SVD
    ``U S^(1/2) @ S^(1/2) V^T`` (the best rank-r approximation)."""
    for target, name in ((keys, "k"), (values, "v")):
        full = getattr(layer_kv, f"{name}_full", None)
        if full is not None:
            full.copy_(target.to(full.dtype))
            continue
        u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
        r = min(rank, s.shape[-1])
        a = torch.zeros(getattr(layer_kv, f"{name}_a").shape, dtype=torch.float64)
        b = torch.zeros(getattr(layer_kv, f"{name}_b").shape, dtype=torch.float64)
        a[..., :r] = u[..., :r] * s[..., None, :r].sqrt()
        b[..., :r, :] = s[..., :r, None].sqrt() * vh[..., :r, :]
        getattr(layer_kv, f"{name}_a").copy_(a.to(getattr(layer_kv, f"{name}_a").dtype))
        getattr(layer_kv, f"{name}_b").copy_(b.to(getattr(layer_kv, f"{name}_b").dtype))
