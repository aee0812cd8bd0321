"""Compositional prompts in GenEval's phrasing (Ghosh et al., 2023): parsed into objects, counts, colours and one
spatial relation, and generated from GenEval-style templates over the 80 COCO object names and 10 colours.

    parse_composition("a photo of a red cube left of a blue sphere")
    # Composition(objects=(Wanted('cube', 1, 'red', False), Wanted('sphere', 1, 'blue', False)), relation='left of')

Accepted: `[a photo of ]<object>[ and <object>]` or `[a photo of ]<object> [is ][to the ]<relation> <object>`, with
`<object>` = `a|an|<number> [<colour>] <noun>` and `<relation>` one of `RELATIONS`. Anything else is a `ValueError`
that quotes the prompt (the composition reward has no neutral score: a prompt it cannot read is a bug to fix, not a
sample to reward).
"""

import itertools
import random
import re
from dataclasses import dataclass
from typing import Optional


COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
IRREGULAR_PLURALS = {
    "people": "person", "persons": "person", "skis": "skis", "scissors": "scissors", "knives": "knife",
    "sheep": "sheep", "benches": "bench", "sandwiches": "sandwich", "buses": "bus", "couches": "couch",
    "glasses": "glass", "mice": "mouse",
}  # fmt: skip
PREFIXES = ("a photo of ", "a picture of ", "an image of ")


@dataclass(frozen=True)
class Wanted:
    """One object a prompt asks for: `count` of `noun` (singular), optionally of `color`. `exact`: the prompt gave a
    number ("two dogs"), so the count must match; otherwise ("a dog") one or more is right."""

    noun: str
    count: int = 1
    color: Optional[str] = None
    exact: bool = False


@dataclass(frozen=True)
class Composition:
    """What a prompt asks for: its objects and, for two objects, optionally `objects[0] <relation> objects[1]`."""

    objects: tuple[Wanted, ...]
    relation: Optional[str] = None

    @property
    def nouns(self) -> list[str]:
        """The distinct nouns to detect, in order."""
        return list(dict.fromkeys(wanted.noun for wanted in self.objects))


FORMS = (
    "'[a photo of ]<object>[ and <object>]' or '[a photo of ]<object> [to the ]<left of|right of|above|below> "
    "<object>', an object being 'a|an|<number> [<colour>] <noun>', e.g. 'a photo of two red apples' or "
    "'a photo of a cat left of a dog'"
)
_RELATION = re.compile(r"^(.+?) (?:is )?(?:to the |on the )?(left of|right of|above|below) (.+)$")


def singular(noun: str) -> str:
    """The singular of an English plural noun (the last word of a multi-word noun is the one inflected)."""
    *head, last = noun.split(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith("ies") and len(last) > 4:
        last = last[:-3] + "y"
    elif last.endswith(("ches", "shes", "sses", "xes")):
        last = last[:-2]
    elif last.endswith("s") and not last.endswith("ss"):
        last = last[:-1]
    return " ".join([*head, last])


def _parse_object(phrase: str, prompt: str) -> Wanted:
    words = phrase.split()
    if len(words) < 2:
        raise ValueError(f"cannot read the object {phrase!r} in the prompt {prompt!r}; expected {FORMS}")
    quantity, *rest = words
    if quantity in ("a", "an"):
        count, exact = 1, False
    elif quantity in NUMBERS or quantity.isdigit():
        count, exact = NUMBERS.get(quantity) or int(quantity), True
    else:
        raise ValueError(
            f"the object {phrase!r} in the prompt {prompt!r} starts with {quantity!r}; expected 'a', 'an' or a number "
            f"({', '.join(NUMBERS)}); the prompt forms: {FORMS}"
        )
    color = rest[0] if rest[0] in COLORS and len(rest) > 1 else None
    noun = " ".join(rest[1:] if color else rest)
    if "," in noun or {"a", "an", "and"} & set(noun.split()):
        raise ValueError(f"the object {phrase!r} in the prompt {prompt!r} names more than one thing; expected {FORMS}")
    if count < 1:
        raise ValueError(f"the object {phrase!r} in the prompt {prompt!r} asks for {count} objects; expected >= 1")
    return Wanted(singular(noun) if count > 1 else noun, count, color, exact)


def parse_composition(prompt: str) -> Composition:
    """The objects, counts, colours and relation `prompt` asks for; a `ValueError` quoting it if of another form."""
    text = re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(".")
    for prefix in PREFIXES:
        text = text.removeprefix(prefix)
    related = _RELATION.match(text)
    if related:
        first, relation, second = related.groups()
        if " and " in f"{first} {second}":
            raise ValueError(f"the prompt {prompt!r} has a relation and an 'and'; expected one of {FORMS}")
        return Composition((_parse_object(first, prompt), _parse_object(second, prompt)), relation)
    parts = text.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"the prompt {prompt!r} names {len(parts)} objects; at most 2 are scored; expected {FORMS}")
    return Composition(tuple(_parse_object(part, prompt) for part in parts))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    if noun in ("sheep", "skis", "scissors"):
        return noun
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return {"person": "people", "knife": "knives", "computer mouse": "computer mice"}.get(noun, noun + "s")


def _one(noun: str, color: Optional[str] = None) -> str:
    phrase = f"{color} {noun}" if color else noun
    return f"{_article(phrase)} {phrase}"


TEMPLATES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's six tags


def _from_template(tag: str, rng: random.Random, objects: tuple[str, ...]) -> str:
    a, b = rng.sample(objects, 2)
    c1, c2 = rng.sample(COLORS, 2)
    if tag == "single_object":
        return f"a photo of {_one(a)}"
    if tag == "two_object":
        return f"a photo of {_one(a)} and {_one(b)}"
    if tag == "counting":
        number = rng.choice(("two", "three", "four"))
        return f"a photo of {number} {_plural(a)}"
    if tag == "colors":
        return f"a photo of {_one(a, c1)}"
    if tag == "position":
        return f"a photo of {_one(a)} {rng.choice(RELATIONS)} {_one(b)}"
    return f"a photo of {_one(a, c1)} and {_one(b, c2)}"


def composition_prompts(
    num_prompts: int, seed: int = 0, objects: tuple[str, ...] = COCO_OBJECTS, exclude: tuple[str, ...] = ()
) -> list[str]:
    """`num_prompts` distinct GenEval-style prompts, the six templates in turn, seeded; none of them in `exclude`."""
    rng, excluded, prompts = random.Random(seed), set(exclude), {}
    tags = itertools.cycle(TEMPLATES)
    for _ in range(num_prompts * 100):
        if len(prompts) == num_prompts:
            break
        prompt = _from_template(next(tags), rng, objects)
        if prompt not in excluded:
            prompts.setdefault(prompt, None)
    if len(prompts) < num_prompts:
        raise ValueError(f"only {len(prompts)} distinct prompts from {len(objects)} objects; asked for {num_prompts}")
    return list(prompts)


# The built-in prompt sets `composition` (training) and `composition_heldout` (evaluation), disjoint; regenerated and
# compared with the shipped files by the tests.
TRAIN_SET, HELDOUT_SET = dict(num_prompts=3000, seed=0), dict(num_prompts=300, seed=1)


def builtin_sets() -> dict[str, list[str]]:
    heldout = composition_prompts(**HELDOUT_SET)
    return {"composition": composition_prompts(**TRAIN_SET, exclude=tuple(heldout)), "composition_heldout": heldout}
