"""VQA answer normalisation and accuracy, following the official VQAv2 evaluation.

The official evaluation (``vqaEval.py`` of the VQA API) compares a predicted
answer with the ten human answers after a fixed normalisation. This module
re-implements that behaviour from its definition:

1. ``\\n`` and ``\\t`` become spaces; leading/trailing whitespace is stripped.
2. Punctuation (:func:`_process_punctuation`): for each mark in
   ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` -- if the mark stands next to
   a space (``"p "`` or ``" p"`` occurs anywhere in the text), or if the text
   contains a comma between two digits (``"1,000"``), every occurrence of the
   mark is deleted; otherwise every occurrence is replaced by a space
   (``"black/white"`` -> ``"black white"``). The checks look at the text as it
   was before any mark was processed.
3. Periods are deleted unless followed by a digit, so a decimal point survives
   (``"3.5"``) while a full stop goes (``"yes."`` -> ``"yes"``). The official
   script passes ``re.UNICODE`` (== 32) as the ``count`` argument of
   ``re.sub``, so at most 32 periods are removed; we keep that for parity.
4. Lower-casing and splitting on whitespace; each word is then mapped through
   the number-word table (``"none"``/``"zero"`` -> ``"0"`` ... ``"ten"`` ->
   ``"10"``), then the articles ``a``, ``an``, ``the`` are dropped.
5. Contractions written without apostrophe are restored through the official
   table (``"dont"`` -> ``"don't"``). The table is reproduced verbatim,
   including its oddities: a few keys start with a capital letter (``"Im"``)
   and so never match after lower-casing, and ``"somebody'd"`` maps to
   ``"somebodyd"``.
6. The words are re-joined with single spaces.

Differences from the official script, on purpose:

* The official loop normalises the annotator answers (and, in some versions,
  the prediction) only when the annotators disagree (``len(set(answers)) > 1``).
  Here both sides are always normalised, so ``"Yes."`` matches ``["yes"] * 10``.
* The official script always has ten answers. For fewer answers see
  :func:`vqa_accuracy`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "postprocess_generation",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "ARTICLES",
    "PUNCTUATION",
]

#: Official contractions table (keys as written in the VQA evaluation script).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

#: Number words rewritten as digits (the official ``manualMap``).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: Marks handled by the punctuation rule (the period has its own rule).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# A period not followed by a digit (the official pattern also carries a
# malformed look-behind that never applies, so only the look-ahead matters).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # == 32, see module docstring


def _process_punctuation(text: str) -> str:
    """Rules 2 and 3 of the module docstring."""
    remove_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The tests read the original text, not the partially processed one.
        if remove_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def _process_digits_articles(text: str) -> str:
    """Rules 4 to 6 of the module docstring."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Normalise an answer string exactly as the official VQA evaluation does.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("1,000")
    '1000'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("answers is empty: at least one reference answer is needed")


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the annotator answers.

    Each annotator ``i`` is left out in turn; the prediction earns
    ``min(1, matches among the other annotators / 3)`` and the result is the
    mean over annotators. With ten answers this gives 0.3 / 0.6 / 0.9 / 1.0
    for 1 / 2 / 3 / >=4 matching annotators.

    Fewer than ten answers (a hificl extension; the official data always has
    ten): the divisor is ``min(3, n - 1)``, which equals 3 whenever ``n >= 4``
    so the official formula is unchanged there, while a prediction that agrees
    with every annotator still scores 1.0 when ``n`` is 2 or 3. With a single
    answer nobody is left to compare against, so the score is exact match
    (1.0 or 0.0).

    Raises:
        ValueError: if ``answers`` is empty.
    """
    _check_answers(answers)
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    n = len(golds)
    if n == 1:
        return 1.0 if golds[0] == pred else 0.0
    divisor = min(3, n - 1)
    total_matches = sum(1 for g in golds if g == pred)
    score = 0.0
    for g in golds:
        # matches among the other annotators: remove annotator i's own vote
        others = total_matches - (1 if g == pred else 0)
        score += min(1.0, others / divisor)
    return score / n


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0.

    Raises:
        ValueError: if ``answers`` is empty.
    """
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return 1.0 if any(normalize_answer(a) == pred for a in answers) else 0.0


DEFAULT_STOP_STRINGS: tuple[str, ...] = ("\n", "Question", "Answer", "Image", "Short")


def postprocess_generation(text: str, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """Trim a free-form generation down to the answer.

    The text is cut at the earliest occurrence of any stop string (matching is
    case-sensitive; these are the markers a model emits when it starts the
    next few-shot block, e.g. ``"Question:"``), then surrounding whitespace
    and one trailing period are removed. If the text *starts* with a stop
    string the result is empty.

    >>> postprocess_generation(" a red bus.\\nQuestion: what")
    'a red bus'
    """
    cut = len(text)
    for stop in stop_strings:
        if not stop:
            continue
        idx = text.find(stop)
        if idx != -1 and idx < cut:
            cut = idx
    out = text[:cut].strip()
    if out.endswith("."):
        out = out[:-1].rstrip()
    return out
