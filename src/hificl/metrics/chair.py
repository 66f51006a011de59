"""CHAIR object-hallucination metrics for captions (Rohrbach et al., 2018).

"Object Hallucination in Image Captioning" measures how many of the objects a
caption mentions are absent from the image, over the 80 MS-COCO categories:

* ``chair_i`` = hallucinated object mentions / all object mentions
* ``chair_s`` = captions with at least one hallucinated object / all captions
* ``recall``  = ground-truth objects mentioned / ground-truth objects

Object mentions are found by mapping words and short phrases onto the 80
categories through synonym lists (written for this module from the paper's
description: e.g. "man", "girl", "people" -> person; "bike" -> bicycle).
Counting conventions used here:

* Each category counts at most once per caption ("two dogs and a puppy" is
  one ``dog`` mention), for mentions, hallucinations and recall alike.
  Totals are pooled over captions (micro averages). A ratio whose
  denominator is zero is reported as 0.0.
* Matching is longest-phrase-first on lower-cased alphabetic tokens, so a
  multi-word phrase consumes its words: "hot dog" is a hot dog and not a dog,
  "teddy bear" is not a bear, "microwave oven" is not an oven, "baby
  elephant" is an elephant and not a person.
* Some phrases are guards that consume their words without naming an object
  (:data:`NON_OBJECT_PHRASES`, e.g. "bus stop", "flower bed", "toilet paper").
* Plurals: every synonym gets its plural form from a few English rules plus
  an explicit table of irregular forms (men, children, people, knives, mice,
  geese, oxen, ...).
* Words that are ambiguous in captions are left out of the synonym lists
  (e.g. bare "glass", "glove", "computer"); "orange" is always the fruit.

The tokeniser is a regular expression; no NLTK data is needed.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping

__all__ = [
    "COCO_CATEGORIES",
    "SYNONYMS",
    "NON_OBJECT_PHRASES",
    "chair",
    "extract_objects",
    "canonical_category",
]

COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

_ANIMALS = {
    "bird": ["bird", "pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot",
             "owl", "eagle", "hawk", "crow", "sparrow", "chicken", "hen", "rooster",
             "flamingo", "pelican", "penguin"],
    "cat": ["cat", "kitten", "kitty"],
    "dog": ["dog", "puppy", "pup", "doggy", "sheepdog", "sheep dog"],
    "horse": ["horse", "pony", "foal", "stallion", "mare"],
    "sheep": ["sheep", "lamb", "ram", "ewe"],
    "cow": ["cow", "cattle", "bull", "calf", "ox"],
    "elephant": ["elephant"],
    "bear": ["bear", "grizzly"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
}

#: Singular synonyms per category (plurals are generated). Multi-word entries
#: also act as guards for their parts ("hot dog" keeps "dog" from matching).
SYNONYMS: dict[str, list[str]] = {
    "person": ["person", "man", "woman", "boy", "girl", "child", "kid", "guy", "lady",
               "gentleman", "adult", "baby", "toddler", "infant", "teenager", "teen",
               "player", "skier", "snowboarder", "surfer", "skateboarder", "rider",
               "biker", "cyclist", "pedestrian", "spectator", "crowd", "chef",
               "policeman", "officer", "police officer", "worker", "student", "batter",
               "catcher", "umpire", "mother", "father", "daughter", "son", "wife",
               "husband", "bride", "groom", "someone", "somebody",
               "tennis player", "baseball player", "football player", "soccer player",
               "basketball player"],
    "bicycle": ["bicycle", "bike"],
    "car": ["car", "automobile", "taxi", "cab", "sedan", "suv", "jeep", "van",
            "minivan"],
    "motorcycle": ["motorcycle", "motorbike", "motor bike", "motor cycle", "dirt bike",
                   "scooter", "moped"],
    "airplane": ["airplane", "aeroplane", "plane", "jet", "jetliner", "airliner",
                 "aircraft", "passenger jet", "passenger plane"],
    "bus": ["bus"],
    "train": ["train", "locomotive", "tram", "streetcar", "passenger train",
              "train car", "subway car"],
    "truck": ["truck", "pickup truck", "lorry", "truck bed"],
    "boat": ["boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry",
             "motorboat", "speedboat"],
    "traffic light": ["traffic light", "stoplight", "stop light", "traffic signal"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench"],
    **_ANIMALS,
    "backpack": ["backpack", "back pack", "knapsack", "rucksack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "hand bag", "purse"],
    "tie": ["tie", "necktie", "bow tie"],
    "suitcase": ["suitcase", "suit case", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["ski"],
    "snowboard": ["snowboard", "snow board"],
    "sports ball": ["ball", "soccer ball", "tennis ball", "football", "basketball",
                    "volleyball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "baseball mitt", "mitt"],
    "skateboard": ["skateboard", "skate board"],
    "surfboard": ["surfboard", "surf board"],
    "tennis racket": ["tennis racket", "tennis racquet", "racket", "racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass"],
    "cup": ["cup", "mug", "teacup"],
    "fork": ["fork"],
    "knife": ["knife"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "burger", "hamburger", "cheeseburger"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog", "hotdog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool", "armchair", "high chair", "highchair"],
    "couch": ["couch", "sofa", "loveseat", "love seat"],
    "potted plant": ["potted plant", "plant", "houseplant", "house plant"],
    "bed": ["bed"],
    "dining table": ["dining table", "table"],
    "toilet": ["toilet", "toilet seat", "toilet bowl"],
    "tv": ["tv", "television", "monitor", "computer monitor"],
    "laptop": ["laptop", "laptop computer"],
    "mouse": ["mouse", "computer mouse"],
    "remote": ["remote", "remote control", "controller"],
    "keyboard": ["keyboard", "computer keyboard"],
    "cell phone": ["cell phone", "cellphone", "phone", "mobile phone", "smartphone",
                   "smart phone", "telephone"],
    "microwave": ["microwave", "microwave oven"],
    "oven": ["oven", "stove"],
    "toaster": ["toaster", "toaster oven"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge", "freezer"],
    "book": ["book"],
    "clock": ["clock", "clock tower"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "teddy"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer", "blow dryer"],
    "toothbrush": ["toothbrush", "tooth brush"],
}

# "baby elephant", "adult giraffe", "mother bear": the animal, not a person.
for _cat, _words in _ANIMALS.items():
    for _w in list(_words):
        if " " not in _w:
            SYNONYMS[_cat] += [f"baby {_w}", f"adult {_w}", f"mother {_w}"]

#: Phrases that contain an object word but do not name that object; they are
#: consumed without producing a mention.
NON_OBJECT_PHRASES: tuple[str, ...] = (
    "bus stop", "bus station", "train station", "train track", "train tracks",
    "cable car", "flower bed", "river bed", "toilet paper", "orange juice",
    "ski lift", "ski slope", "ski resort", "chair lift", "football field",
    "baseball cap",
)

_IRREGULAR_PLURALS = {
    "person": ["people", "persons"], "child": ["children"], "knife": ["knives"],
    "mouse": ["mice"], "goose": ["geese"], "ox": ["oxen"], "calf": ["calves"],
    "wife": ["wives"], "sheep": ["sheep"], "cattle": ["cattle"], "bus": ["buses", "busses"],
    "scissors": ["scissors"], "broccoli": ["broccoli"], "aircraft": ["aircraft"],
    "someone": [], "somebody": [],
}

_TOKEN = re.compile(r"[a-z]+")


def _plurals(word: str) -> list[str]:
    """Plural forms of a single noun (irregular table, then regular rules)."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("man"):
        return [word[:-3] + "men"]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return [word + "es"]
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return [word[:-1] + "ies"]
    return [word + "s"]


def _forms(phrase: str) -> list[tuple[str, ...]]:
    """Token tuples for a phrase and its plural(s) (the last word is inflected)."""
    words = phrase.split()
    out = [tuple(words)]
    out += [tuple(words[:-1] + [p]) for p in _plurals(words[-1])]
    return out


def _build_table() -> dict[tuple[str, ...], str | None]:
    table: dict[tuple[str, ...], str | None] = {}
    for category, phrases in SYNONYMS.items():
        for phrase in [category, *phrases]:
            for form in _forms(phrase):
                table.setdefault(form, category)
    for phrase in NON_OBJECT_PHRASES:
        for form in _forms(phrase):
            table[form] = None
    return table


_TABLE = _build_table()
_MAX_PHRASE = max(len(k) for k in _TABLE)
assert set(SYNONYMS) == set(COCO_CATEGORIES), "synonym table must cover the 80 categories"


def _tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def extract_objects(caption: str) -> list[str]:
    """COCO category names mentioned in ``caption``, in order of first mention.

    >>> extract_objects("A man eats a hot dog next to two dogs and a puppy.")
    ['person', 'hot dog', 'dog']
    """
    tokens = _tokenize(caption)
    found: list[str] = []
    i = 0
    while i < len(tokens):
        for length in range(min(_MAX_PHRASE, len(tokens) - i), 0, -1):
            key = tuple(tokens[i : i + length])
            if key in _TABLE:
                category = _TABLE[key]
                if category is not None and category not in found:
                    found.append(category)
                i += length
                break
        else:
            i += 1
    return found


def canonical_category(name: str) -> str:
    """Map a category name or synonym ("Motorbike", "people") to a COCO category.

    Raises:
        ValueError: if ``name`` names none of the 80 categories.
    """
    key = tuple(_tokenize(name))
    category = _TABLE.get(key)
    if category is None:
        raise ValueError(
            f"{name!r} is not a COCO category or a known synonym; "
            f"expected one of {', '.join(COCO_CATEGORIES)}"
        )
    return category


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def chair(
    captions: Mapping[Hashable, str],
    gt_objects: Mapping[Hashable, Iterable[str]],
) -> dict:
    """CHAIR_s, CHAIR_i and object recall of ``captions``.

    Args:
        captions: generated caption per image id.
        gt_objects: ground-truth objects per image id (category names or
            synonyms, e.g. from COCO instance annotations and the reference
            captions). Every caption id must be present.

    Returns:
        A dict with ``chair_s``, ``chair_i``, ``recall`` (floats in [0, 1]),
        the counts behind them (``num_captions``, ``num_hallucinated_captions``,
        ``num_mentions``, ``num_hallucinated``, ``num_gt``, ``num_gt_mentioned``)
        and ``per_caption``: ``{id: {"mentioned", "hallucinated", "covered"}}``
        with lists of category names (``covered`` = ground truth mentioned).
    """
    if not captions:
        raise ValueError("captions is empty")
    missing = [k for k in captions if k not in gt_objects]
    if missing:
        raise ValueError(f"no ground-truth objects for caption ids {missing[:5]!r}")

    per_caption: dict[Hashable, dict[str, list[str]]] = {}
    n_halluc_caps = n_mentions = n_halluc = n_gt = n_covered = 0
    for key, caption in captions.items():
        gt_names = gt_objects[key]
        if isinstance(gt_names, str):
            raise TypeError(f"gt_objects[{key!r}] must be a collection of names, not a string")
        gt = {canonical_category(name) for name in gt_names}
        mentioned = extract_objects(caption)
        hallucinated = [o for o in mentioned if o not in gt]
        covered = [o for o in mentioned if o in gt]
        per_caption[key] = {
            "mentioned": mentioned,
            "hallucinated": hallucinated,
            "covered": covered,
        }
        n_mentions += len(mentioned)
        n_halluc += len(hallucinated)
        n_halluc_caps += bool(hallucinated)
        n_gt += len(gt)
        n_covered += len(covered)

    return {
        "chair_s": _ratio(n_halluc_caps, len(captions)),
        "chair_i": _ratio(n_halluc, n_mentions),
        "recall": _ratio(n_covered, n_gt),
        "num_captions": len(captions),
        "num_hallucinated_captions": n_halluc_caps,
        "num_mentions": n_mentions,
        "num_hallucinated": n_halluc,
        "num_gt": n_gt,
        "num_gt_mentioned": n_covered,
        "per_caption": per_caption,
    }
