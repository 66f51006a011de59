"""CIDEr-D for image captioning, computed with the COCO caption toolkit.

The scores come from ``pycocoevalcap`` (the packaged COCO caption evaluation):
captions are tokenised with its Stanford PTB tokenizer (lower-cased,
punctuation dropped; this runs ``java``) and scored with its ``Cider`` class,
which implements CIDEr-D (Vedantam et al., 2015): tf-idf weighted 1- to
4-gram cosine similarity with clipping of candidate counts, a Gaussian length
penalty (sigma = 6), averaged over n and over references and multiplied by 10.

CIDEr-D is a *corpus* metric: the idf weights come from the references of all
images passed in one call, so per-image scores depend on the rest of the
corpus. In particular a corpus of a single image always scores 0, since every
n-gram then occurs in "all" documents and gets idf = log(1/1) = 0.

``pycocoevalcap`` is an optional dependency (``pip install pycocoevalcap==1.2``)
and is imported only when :func:`cider_d` is called.
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence

from .base import MetricUnavailableError

__all__ = ["cider_d", "require_cider"]


def require_cider() -> None:
    """The pre-flight of CIDEr-D: raise `MetricUnavailableError` saying what to install when the COCO caption
    toolkit or a Java runtime (for its PTB tokenizer) is missing."""
    try:
        import pycocoevalcap.cider.cider  # noqa: F401
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        raise MetricUnavailableError("CIDEr-D needs the COCO caption toolkit: pip install pycocoevalcap==1.2 "
                                     "(or pip install -e '.[captions]').") from None
    if shutil.which("java") is None:
        raise MetricUnavailableError(
            "CIDEr-D runs the Stanford PTB tokenizer, which needs Java, but `java` is not on PATH. Install a runtime "
            "(e.g. apt-get install default-jre-headless, or conda install -c conda-forge openjdk) and run again.")


def _validate(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> None:
    if not predictions:
        raise ValueError("predictions is empty")
    pred_ids, ref_ids = set(predictions), set(references)
    if pred_ids != ref_ids:
        missing = sorted(map(repr, ref_ids - pred_ids))[:5]
        extra = sorted(map(repr, pred_ids - ref_ids))[:5]
        raise ValueError(
            "predictions and references must have the same ids; "
            f"without prediction: {missing}, without references: {extra}"
        )
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings")
    for key, pred in predictions.items():
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{key!r}] must be a string, got {type(pred).__name__}")


def cider_d(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
) -> tuple[float, dict[Hashable, float]]:
    """Corpus CIDEr-D and per-image scores.

    Args:
        predictions: one generated caption per image id.
        references: the reference captions per image id (same ids).

    Returns:
        ``(corpus_score, {image_id: score})``; the corpus score is the mean of
        the per-image scores. Scores are on the usual COCO scale (x10, so a
        perfect match of a 4+ word caption gives 10.0; papers report x100 of
        the toolkit's mean, e.g. "CIDEr 1.10" == 110).

    Raises:
        MetricUnavailableError: ``pycocoevalcap`` is not installed or there is no ``java`` executable.
        RuntimeError: the tokenizer produced no output.
        ValueError: mismatched ids or empty reference lists.
    """
    _validate(predictions, references)
    require_cider()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    for name, tok, sizes in (
        ("references", gts, {i: len(references[i]) for i in ids}),
        ("predictions", res, {i: 1 for i in ids}),
    ):
        if any(len(tok.get(i, ())) != sizes[i] for i in ids):
            raise RuntimeError(
                f"the PTB tokenizer returned incomplete output for the {name}; "
                "check that `java -version` works"
            )
    # Same key order for both dicts: the per-image array follows gts' order.
    gts = {i: gts[i] for i in ids}
    res = {i: res[i] for i in ids}
    score, scores = Cider().compute_score(gts, res)
    per_image = {i: float(s) for i, s in zip(ids, scores)}
    return float(score), per_image
