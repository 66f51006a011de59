"""Tests for hificl.metrics: VQA normalisation/accuracy, CIDEr-D, CHAIR."""

from __future__ import annotations

import importlib
import shutil
import sys

import pytest

from hificl.metrics import (
    COCO_CATEGORIES,
    METRICS,
    Metric,
    canonical_category,
    chair,
    cider_d,
    exact_match,
    extract_objects,
    get_metric,
    normalize_answer,
    postprocess_generation,
    register_metric,
    vqa_accuracy,
)

# ``hificl.metrics.chair`` the attribute is the function; fetch the modules.
cider_module = importlib.import_module("hificl.metrics.cider")
vqa_module = importlib.import_module("hificl.metrics.vqa")


# --------------------------------------------------------------------------
# normalize_answer: one group per official rule
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  yes  ", "yes"),  # strip
        ("red\tcar", "red car"),  # tab -> space
        ("red\ncar", "red car"),  # newline -> space
        ("many    spaces  here", "many spaces here"),  # re-joined with one space
        ("YES", "yes"),  # lower-case
    ],
)
def test_normalize_whitespace_and_case(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        # no space next to the mark -> replaced by a space
        ("black/white", "black white"),
        ("t-shirt", "t shirt"),
        ("left,right", "left right"),
        ("(red)", "red"),
        ("yes!", "yes"),
        ("what?", "what"),
        # a space next to the mark -> the mark is deleted everywhere, so an
        # in-word occurrence of the same mark glues the word together
        ("x-ray - yes", "xray yes"),
        ("hello, wide,world", "hello wideworld"),
        # each mark is decided on its own: ',' is next to a space, '-' is not
        ("hello, world-wide", "hello world wide"),
        # marks outside the official list are kept
        ("10:30", "10:30"),
        ("o'clock", "o'clock"),
        ("#1", "#1"),
    ],
)
def test_normalize_punctuation(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,000", "1000"),  # comma between digits removed
        ("10,000,000", "10000000"),
        # a digit-comma-digit anywhere switches every mark to deletion
        ("1,000 t-shirts", "1000 tshirts"),
    ],
)
def test_normalize_comma_in_numbers(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("3.5", "3.5"),  # decimal point kept
        (".5", ".5"),  # period followed by a digit kept
        ("yes.", "yes"),  # full stop removed
        ("3.5.", "3.5"),
        ("e.g. fine", "eg fine"),
        ("mr.smith", "mrsmith"),  # removed, not replaced by a space
    ],
)
def test_normalize_period(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_period_official_count_cap():
    # The official script passes re.UNICODE (== 32) as re.sub's count.
    assert normalize_answer("." * 40) == "." * 8


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),
        ("Ten", "10"),
        ("zero", "0"),
        ("none", "0"),
        ("one two three four five six seven eight nine", "1 2 3 4 5 6 7 8 9"),
        ("eleven", "eleven"),  # only zero..ten (and none) are mapped
        ("two-three", "2 3"),  # punctuation runs first
        ("twofold", "twofold"),  # whole words only
    ],
)
def test_normalize_number_words(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("the cat", "cat"),
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("The", ""),
        ("theater", "theater"),  # whole words only
        ("a one", "1"),
    ],
)
def test_normalize_articles(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("Wont", "won't"),
        ("it isnt", "it isn't"),
        ("shouldnt've", "shouldn't've"),
        ("yall", "y'all"),
        ("somebody'd", "somebodyd"),  # oddity of the official table, kept
        ("Im", "im"),  # official key is "Im": never matches after lower-casing
        ("don't", "don't"),  # already contracted
    ],
)
def test_normalize_contractions(raw, expected):
    assert normalize_answer(raw) == expected


def test_contraction_table_is_complete():
    assert len(vqa_module.CONTRACTIONS) == 120  # the official table has 120 entries
    assert all("'" in v or v == "somebodyd" for v in vqa_module.CONTRACTIONS.values())


# --------------------------------------------------------------------------
# vqa_accuracy / exact_match
# --------------------------------------------------------------------------
# With 10 annotators of which k give the predicted answer, the k matching
# annotators each see k-1 matches among the other nine, the 10-k others see k:
#   acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
#   k=0: 0
#   k=1: (1*0   + 9*(1/3)) / 10 = 3/10 = 0.3
#   k=2: (2*1/3 + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
#   k=3: (3*2/3 + 7*1)     / 10 = (2 + 7) / 10 = 0.9
#   k=4: (4*1   + 6*1)     / 10 = 1.0   (every annotator sees >= 3 matches)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    answers = ["2", "2", "Two.", "3", "3", "three", "3", "4", "4", "4"]
    # prediction "two" -> "2"; three annotators say 2 -> 0.9
    assert vqa_accuracy("Two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_few_answers():
    assert vqa_accuracy("dog", ["Dog"]) == 1.0  # single answer: exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    # n=2, divisor min(3, 1) = 1
    assert vqa_accuracy("dog", ["dog", "dog"]) == 1.0
    assert vqa_accuracy("dog", ["dog", "cat"]) == pytest.approx(0.5)  # (0 + 1) / 2
    # n=3, divisor 2: all agree -> each sees 2 -> 1.0
    assert vqa_accuracy("dog", ["dog"] * 3) == 1.0
    # n=4, divisor 3 (official): 2 matches -> (2*(1/3) + 2*(2/3)) / 4 = 0.5
    assert vqa_accuracy("dog", ["dog", "dog", "cat", "cow"]) == pytest.approx(0.5)


def test_vqa_accuracy_empty_answers():
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="empty"):
        exact_match("dog", [])
    with pytest.raises(TypeError):
        vqa_accuracy("dog", "dog")


def test_exact_match():
    assert exact_match("The Dog.", ["cat", "dog"]) == 1.0
    assert exact_match("two", ["2"]) == 1.0
    assert exact_match("dogs", ["dog"]) == 0.0


# --------------------------------------------------------------------------
# postprocess_generation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes\nQuestion: what is it?", "yes"),
        (" blue. Short answer: red", "blue"),
        ("red Answer: blue", "red"),
        ("a cat Image: <img>", "a cat"),
        ("Answer: x", ""),  # starts with a stop string
        ("  3.5  ", "3.5"),  # decimal point untouched
        ("two dogs..", "two dogs."),  # only one trailing period
        ("no stop string here.", "no stop string here"),
    ],
)
def test_postprocess_generation(raw, expected):
    assert postprocess_generation(raw) == expected


def test_postprocess_generation_custom_stops():
    assert postprocess_generation("cat ### dog", stop_strings=("###",)) == "cat"
    assert postprocess_generation("cat\ndog", stop_strings=()) == "cat\ndog"


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------


def test_registry():
    assert {"vqa_accuracy", "exact_match", "cider_d", "chair_s", "chair_i", "chair_recall"} <= set(METRICS)
    vqa = get_metric("vqa_accuracy")
    assert vqa.per_example is vqa_accuracy and vqa.higher_is_better and vqa.percent and not vqa.corpus_level
    assert get_metric("exact_match").per_example("Two", ["2"]) == 1.0
    assert get_metric("exact_match").score(["Two", "x"], [["2"], ["y"]], ["a", "b"]) == (0.5, [1.0, 0.0])
    cider = get_metric("cider_d")
    assert cider.corpus_level and cider.higher_is_better and not cider.percent and cider.format(1.23456) == "1.2346"
    assert not get_metric("chair_i").higher_is_better and get_metric("chair_i").format(0.022) == "2.20%"
    with pytest.raises(ValueError, match="Unknown metric .bleu.*cider_d.*exact_match.*vqa_accuracy"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric("exact_match", "another exact match", per_example=vqa_accuracy))


# --------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------


def _need_cider():
    pytest.importorskip("pycocoevalcap.cider.cider")
    if shutil.which("java") is None:
        pytest.skip("java is not installed")


def test_cider_validates_ids_without_toolkit():
    with pytest.raises(ValueError, match="same ids"):
        cider_d({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty"):
        cider_d({1: "a"}, {1: []})


def test_cider_missing_toolkit_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(ImportError, match=r"pip install pycocoevalcap==1\.2"):
        cider_d({1: "a dog"}, {1: ["a dog"]})


def test_cider_missing_java_message(monkeypatch):
    pytest.importorskip("pycocoevalcap.cider.cider")
    monkeypatch.setattr(cider_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="java.*default-jre-headless"):
        cider_d({1: "a dog"}, {1: ["a dog"]})


def test_cider_identical_captions():
    _need_cider()
    # Every image's n-grams are unique to it, so all idf weights are log(3)
    # and a prediction equal to its single reference has cosine 1 for every
    # n in 1..4: score = mean(1, 1, 1, 1) * 10 = 10.
    refs = {
        1: ["A red bus parked on the street."],
        2: ["A small dog sleeping on a sofa"],
        3: ["Two giraffes eating leaves from a tree"],
    }
    preds = {k: v[0] for k, v in refs.items()}
    score, per_image = cider_d(preds, refs)
    assert score == pytest.approx(10.0)
    assert per_image.keys() == refs.keys()
    assert all(v == pytest.approx(10.0) for v in per_image.values())


def test_cider_three_word_caption():
    _need_cider()
    # A 3-token caption has no 4-grams: the n=4 term is 0, so 3/4 * 10 = 7.5.
    refs = {"a": ["dog sleeping soundly"], "b": ["red bus parked outside"]}
    _, per_image = cider_d({"a": "dog sleeping soundly", "b": "red bus parked outside"}, refs)
    assert per_image["a"] == pytest.approx(7.5)
    assert per_image["b"] == pytest.approx(10.0)


def test_cider_hand_worked():
    _need_cider()
    # Two images with disjoint vocabularies. Every reference n-gram has df 1,
    # unseen n-grams count as df 1 too, so every weight is c = log(2) - 0.
    # Image a: ref "red bus parked outside", pred "red bus parked inside"
    #   1-grams: 3 shared of 4 -> 3c^2 / (2c * 2c)      = 3/4
    #   2-grams: 2 shared of 3 -> 2c^2 / (sqrt3 c)^2    = 2/3
    #   3-grams: 1 shared of 2                          = 1/2
    #   4-grams: 0 shared                               = 0
    #   same length -> no length penalty
    #   score = 10 * (3/4 + 2/3 + 1/2 + 0) / 4 = 10 * 23/48 = 230/48
    # Image b: identical -> 10.  Corpus = (230/48 + 10) / 2.
    preds = {"a": "red bus parked inside", "b": "small dog sleeping soundly"}
    refs = {"a": ["red bus parked outside"], "b": ["small dog sleeping soundly"]}
    score, per_image = cider_d(preds, refs)
    assert per_image["a"] == pytest.approx(230 / 48)
    assert per_image["b"] == pytest.approx(10.0)
    assert score == pytest.approx((230 / 48 + 10) / 2)


def test_cider_matches_pycocoevalcap_and_ranks_wrong_lower():
    _need_cider()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {
        10: ["A man riding a wave on a surfboard.", "A surfer rides a large wave."],
        11: ["Two dogs play with a frisbee in the park.", "Dogs chasing a frisbee on grass."],
        12: ["A plate of pizza on a table.", "A pizza with cheese and tomatoes."],
    }
    good = {10: "a man riding a wave on a surfboard",
            11: "two dogs playing with a frisbee",
            12: "a pizza on a table"}
    bad = dict(good)
    bad[12] = "a cat sitting on a laptop"

    score, per_image = cider_d(good, refs)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": good[k]}] for k in refs})
    ref_score, ref_scores = Cider().compute_score(gts, res)
    assert score == pytest.approx(float(ref_score))
    assert [per_image[k] for k in refs] == pytest.approx([float(s) for s in ref_scores])

    bad_score, bad_per_image = cider_d(bad, refs)
    assert bad_per_image[12] < per_image[12]
    assert bad_score < score


def test_cider_single_image_is_zero():
    _need_cider()
    score, _ = cider_d({1: "a dog on a couch"}, {1: ["a dog on a couch"]})
    assert score == 0.0  # idf = log(1) - log(1) for every n-gram


# --------------------------------------------------------------------------
# CHAIR
# --------------------------------------------------------------------------


def test_categories_are_80_and_self_mapping():
    assert len(COCO_CATEGORIES) == 80 == len(set(COCO_CATEGORIES))
    for name in COCO_CATEGORIES:
        assert extract_objects(f"there is a {name} here") == [name]


@pytest.mark.parametrize(
    "caption, expected",
    [
        # synonyms
        ("A man, a woman and a little boy.", ["person"]),
        ("Kids and their puppy", ["person", "dog"]),
        ("A sofa beside a fridge", ["couch", "refrigerator"]),
        ("a guy on a motorbike", ["person", "motorcycle"]),
        # plurals: regular and irregular
        ("Three giraffes near benches", ["giraffe", "bench"]),
        ("Men and children", ["person"]),
        ("knives, forks and spoons", ["knife", "fork", "spoon"]),
        ("two ponies and some sheep", ["horse", "sheep"]),
        ("city buses and trucks", ["bus", "truck"]),
        # two-word categories
        ("a fire hydrant by a stop sign under traffic lights",
         ["fire hydrant", "stop sign", "traffic light"]),
        ("He holds a tennis racket and a cell phone", ["tennis racket", "cell phone"]),
        ("a baseball bat and a baseball glove", ["baseball bat", "baseball glove"]),
        # guards: the phrase consumes its words
        ("a plate with two hot dogs", ["hot dog"]),
        ("a hot dog and a dog", ["hot dog", "dog"]),
        ("a teddy bear", ["teddy bear"]),
        ("a baby elephant", ["elephant"]),
        ("a microwave oven", ["microwave"]),
        ("people waiting at a bus stop", ["person"]),
        ("a dirt bike", ["motorcycle"]),
        # order of first mention, duplicates collapsed, tokeniser details
        ("A dog chases a cat; the dog barks at the cat's toy", ["dog", "cat"]),
        ("a hot-dog stand", ["hot dog"]),
        ("an empty theater with a nice view", []),
    ],
)
def test_extract_objects(caption, expected):
    assert extract_objects(caption) == expected


def test_canonical_category():
    assert canonical_category("Motorbike") == "motorcycle"
    assert canonical_category("people") == "person"
    assert canonical_category("dining table") == "dining table"
    with pytest.raises(ValueError, match="not a COCO category"):
        canonical_category("unicorn")
    with pytest.raises(ValueError):
        canonical_category("bus stop")  # a guard phrase, not an object


def test_chair_hand_worked():
    captions = {
        1: "A man and a woman eating hot dogs at a table.",
        2: "A dog sleeping on a couch next to a cat.",
        3: "Two girls ride bicycles past a fire hydrant.",
        4: "A view of the ocean.",
    }
    gt = {
        1: {"person", "hot dog", "dining table"},  # no "dog": hot dogs are not dogs
        2: {"dog", "couch"},  # the cat is hallucinated
        3: {"people", "bicycle", "car", "fire hydrant"},  # synonyms accepted; car missed
        4: {"boat"},
    }
    out = chair(captions, gt)
    # mentions: 3 + 3 + 3 + 0 = 9, hallucinated: 1 (cat) -> CHAIR_i = 1/9
    # captions with a hallucination: 1 of 4 -> CHAIR_s = 1/4
    # ground truth: 3 + 2 + 4 + 1 = 10, mentioned: 3 + 2 + 3 + 0 = 8 -> recall 0.8
    assert out["chair_i"] == pytest.approx(1 / 9)
    assert out["chair_s"] == pytest.approx(1 / 4)
    assert out["recall"] == pytest.approx(8 / 10)
    assert (out["num_mentions"], out["num_hallucinated"]) == (9, 1)
    assert (out["num_gt"], out["num_gt_mentioned"]) == (10, 8)
    assert out["num_captions"] == 4 and out["num_hallucinated_captions"] == 1
    per = out["per_caption"]
    assert per[1] == {
        "mentioned": ["person", "hot dog", "dining table"],
        "hallucinated": [],
        "covered": ["person", "hot dog", "dining table"],
    }
    assert per[2]["mentioned"] == ["dog", "couch", "cat"]
    assert per[2]["hallucinated"] == ["cat"]
    assert per[3]["covered"] == ["person", "bicycle", "fire hydrant"]
    assert per[4] == {"mentioned": [], "hallucinated": [], "covered": []}


def test_chair_edge_cases():
    assert chair({1: "a sunny beach"}, {1: set()})["chair_i"] == 0.0  # 0/0 -> 0.0
    assert chair({1: "a sunny beach"}, {1: set()})["recall"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        chair({}, {})
    with pytest.raises(ValueError, match="no ground-truth"):
        chair({1: "a dog"}, {2: {"dog"}})
    with pytest.raises(ValueError, match="unicorn"):
        chair({1: "a dog"}, {1: {"unicorn"}})
    with pytest.raises(TypeError):
        chair({1: "a dog"}, {1: "dog"})
