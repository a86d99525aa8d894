"""Referring expressions for synthetic scenes: a small structured language, its wording, a parser and a resolver.

An expression is first built as a ``StructuredExpression`` (what it means), then worded from ``TEMPLATES``. The
resolver gives the set of objects an expression can refer to; the generator only keeps an expression when that set
is exactly the referred object. Geometry words are read with two thresholds so that they are unambiguous by
construction: the referred object must satisfy the *strict* reading (it is clearly on the left, clearly the biggest,
...), while every other object must fail even the *loose* reading (nothing else is anywhere near being on the left).
"""

import itertools
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sera_training.synthetic_scenes import ATTRIBUTE_VALUES, Scene, SceneObject


CATEGORIES = ("attribute", "location", "relation", "comparison")
ATTRIBUTES = tuple(ATTRIBUTE_VALUES)  # adjective order: size, texture, colour, shape
GENERIC_NOUNS = ("shape", "object")  # used when the shape is not named

# Wordings of every (category, predicate). "{target}" and "{anchor}" are noun phrases such as "big red circle".
TEMPLATES = {
    ("attribute", None): ("the {target}",),
    ("location", "left"): ("the {target} on the left", "the leftmost {target}"),
    ("location", "right"): ("the {target} on the right", "the rightmost {target}"),
    ("location", "top"): ("the {target} at the top", "the topmost {target}"),
    ("location", "bottom"): ("the {target} at the bottom", "the lowest {target}"),
    ("location", "top_left"): ("the {target} in the top left corner", "the {target} at the top left"),
    ("location", "top_right"): ("the {target} in the top right corner", "the {target} at the top right"),
    ("location", "bottom_left"): ("the {target} in the bottom left corner", "the {target} at the bottom left"),
    ("location", "bottom_right"): ("the {target} in the bottom right corner", "the {target} at the bottom right"),
    ("location", "center"): ("the {target} in the middle", "the {target} in the center"),
    ("relation", "left_of"): ("the {target} left of the {anchor}", "the {target} to the left of the {anchor}"),
    ("relation", "right_of"): ("the {target} right of the {anchor}", "the {target} to the right of the {anchor}"),
    ("relation", "above"): ("the {target} above the {anchor}", "the {target} over the {anchor}"),
    ("relation", "below"): ("the {target} below the {anchor}", "the {target} under the {anchor}"),
    ("relation", "next_to"): (
        "the {target} next to the {anchor}",
        "the {target} beside the {anchor}",
        "the {target} near the {anchor}",
    ),
    ("comparison", "biggest"): ("the biggest {target}", "the largest {target}"),
    ("comparison", "smallest"): ("the smallest {target}", "the tiniest {target}"),
    ("comparison", "second_from_left"): ("the second {target} from the left",),
    ("comparison", "second_from_right"): ("the second {target} from the right",),
    ("comparison", "second_from_top"): ("the second {target} from the top",),
    ("comparison", "second_from_bottom"): ("the second {target} from the bottom",),
}
CAPTION_WORDS = ("a", "and")  # scene captions: "a big red circle, a blue square and a green star"

# Location: score of an object in [0, 1] image coordinates, lower = more on that side / in that corner.
_LOCATION_SCORES = {
    "left": lambda x, y: x,
    "right": lambda x, y: 1 - x,
    "top": lambda x, y: y,
    "bottom": lambda x, y: 1 - y,
    "top_left": lambda x, y: max(x, y),
    "top_right": lambda x, y: max(1 - x, y),
    "bottom_left": lambda x, y: max(x, 1 - y),
    "bottom_right": lambda x, y: max(1 - x, 1 - y),
    "center": lambda x, y: 2 * max(abs(x - 0.5), abs(y - 0.5)),
}
# (strict limit, loose limit) on the score; every other candidate must score LOCATION_MARGIN worse than the target.
_LOCATION_LIMITS = {"center": (0.3, 0.5)}
_DEFAULT_LOCATION_LIMITS = (0.4, 0.5)
LOCATION_MARGIN = 0.15
# Relations and ordinals work in pixels divided by the image's shorter side.
RELATION_GAP = (0.15, 0.05)  # (strict, loose) distance along the relation's direction
NEXT_TO_GAP = (0.08, 0.25)  # (strict, loose) gap between the two objects' bounding circles
ORDINAL_MARGIN = 0.12
# Comparisons of size: the biggest must beat the others by these factors, on extent and on visible area both.
EXTENT_RATIO = 1.3
AREA_RATIO = 1.2


@dataclass(frozen=True)
class Description:
    """A noun phrase: the attributes it names (None = not named). Matches the objects that have all of them."""

    size: str | None = None
    texture: str | None = None
    color: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return all(getattr(obj, name) == getattr(self, name) for name in self.named)

    @cached_property
    def named(self) -> tuple[str, ...]:
        return tuple(name for name in ATTRIBUTES if getattr(self, name) is not None)

    @classmethod
    def of(cls, obj: SceneObject, attributes) -> "Description":
        return cls(**{name: getattr(obj, name) for name in attributes})


@dataclass(frozen=True)
class StructuredExpression:
    """What an expression means. ``predicate`` is None for "attribute"; ``anchor`` is set only for "relation"."""

    category: str
    target: Description
    predicate: str | None = None
    anchor: Description | None = None


# ---------------------------------------------------------------------------------------------------------------
# Wording and parsing


def noun_phrase(description: Description, rng: np.random.Generator) -> str:
    words = [getattr(description, name) for name in ATTRIBUTES[:-1] if getattr(description, name) is not None]
    words.append(description.shape if description.shape is not None else str(rng.choice(GENERIC_NOUNS)))
    return " ".join(words)


def verbalize(expression: StructuredExpression, rng: np.random.Generator) -> str:
    """Words ``expression`` with one of its templates, chosen by ``rng``."""
    templates = TEMPLATES[(expression.category, expression.predicate)]
    template = templates[int(rng.integers(len(templates)))]
    anchor = noun_phrase(expression.anchor, rng) if expression.anchor is not None else None
    return template.format(target=noun_phrase(expression.target, rng), anchor=anchor)


_WORD_TO_ATTRIBUTE = {value: name for name, values in ATTRIBUTE_VALUES.items() for value in values}
_ADJECTIVE = "|".join(value for name in ATTRIBUTES[:-1] for value in ATTRIBUTE_VALUES[name])
_NOUN = "|".join(ATTRIBUTE_VALUES["shape"] + GENERIC_NOUNS)
_NOUN_PHRASE = rf"(?:(?:{_ADJECTIVE}) )*(?:{_NOUN})"
_PATTERNS = [
    (
        category,
        predicate,
        re.compile(
            re.escape(template)
            .replace(r"\{target\}", f"(?P<target>{_NOUN_PHRASE})")
            .replace(r"\{anchor\}", f"(?P<anchor>{_NOUN_PHRASE})")
        ),
    )
    for (category, predicate), templates in TEMPLATES.items()
    for template in templates
]


def _parse_noun_phrase(text: str) -> Description:
    values = {}
    for word in text.split():
        name = _WORD_TO_ATTRIBUTE.get(word)
        if name is None:
            continue  # a generic noun
        if name in values:
            raise ValueError(f"{text!r} names its {name} twice")
        values[name] = word
    return Description(**values)


def parse_expression(text: str) -> StructuredExpression:
    """Reads back an expression worded by ``verbalize``; raises ValueError for anything else."""
    for category, predicate, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            groups = match.groupdict()
            anchor = _parse_noun_phrase(groups["anchor"]) if "anchor" in groups else None
            return StructuredExpression(category, _parse_noun_phrase(groups["target"]), predicate, anchor)
    raise ValueError(f"Not a synthref expression: {text!r}")


def describe_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object with all its attributes ("solid" left unsaid), in random order."""
    phrases = []
    for index in rng.permutation(len(scene.objects)):
        obj = scene.objects[index]
        named = [name for name in ATTRIBUTES if not (name == "texture" and obj.texture == "solid")]
        phrases.append("a " + " ".join(getattr(obj, name) for name in named))
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _all_words() -> tuple[str, ...]:
    words = set(CAPTION_WORDS) | set(GENERIC_NOUNS) | set(_WORD_TO_ATTRIBUTE)
    for templates in TEMPLATES.values():
        for template in templates:
            words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", template)))
    return tuple(sorted(words))


VOCABULARY = _all_words()  # every word an expression or a caption can contain


# ---------------------------------------------------------------------------------------------------------------
# Resolving


def resolve(scene: Scene, expression: StructuredExpression, strict: bool = False) -> set[int]:
    """Indices of the objects of ``scene`` that ``expression`` can refer to.

    With ``strict=False`` (a generous reader) an object is kept as soon as the words could plausibly describe it,
    so an expression is unambiguous when this set has one element. ``strict=True`` keeps only objects the words
    describe clearly.
    """
    candidates = [index for index, obj in enumerate(scene.objects) if expression.target.matches(obj)]
    if expression.category == "attribute":
        return set(candidates)
    if expression.category == "location":
        return _resolve_location(scene, candidates, expression.predicate, strict)
    if expression.category == "relation":
        anchors = [index for index, obj in enumerate(scene.objects) if expression.anchor.matches(obj)]
        return _resolve_relation(scene, candidates, anchors, expression.predicate, strict)
    if expression.category == "comparison":
        return _resolve_comparison(scene, candidates, expression.predicate, strict)
    raise ValueError(f"Unknown category {expression.category!r}")


def _normalized_centroid(scene: Scene, index: int) -> tuple[float, float]:
    x, y = scene.objects[index].centroid
    return (x + 0.5) / scene.width, (y + 0.5) / scene.height


def _resolve_location(scene, candidates, predicate, strict) -> set[int]:
    if not candidates:
        return set()
    score = _LOCATION_SCORES[predicate]
    scores = {index: score(*_normalized_centroid(scene, index)) for index in candidates}
    strict_limit, loose_limit = _LOCATION_LIMITS.get(predicate, _DEFAULT_LOCATION_LIMITS)
    if strict:
        return {
            index
            for index in candidates
            if scores[index] <= strict_limit
            and all(scores[other] > scores[index] + LOCATION_MARGIN for other in candidates if other != index)
        }
    best = min(scores.values())
    return {index for index in candidates if scores[index] <= loose_limit and scores[index] <= best + LOCATION_MARGIN}


def _relation_holds(scene, index, anchor, predicate, strict) -> bool:
    target, other = scene.objects[index], scene.objects[anchor]
    scale = min(scene.width, scene.height)
    (tx, ty), (ax, ay) = target.centroid, other.centroid
    if predicate == "next_to":
        gap = (np.hypot(tx - ax, ty - ay) - target.radius - other.radius) / scale
        return gap <= NEXT_TO_GAP[0 if strict else 1]
    # Distance along the relation's direction, and across it.
    along, across = {
        "left_of": (ax - tx, ty - ay),
        "right_of": (tx - ax, ty - ay),
        "above": (ay - ty, tx - ax),
        "below": (ty - ay, tx - ax),
    }[predicate]
    along, across = along / scale, abs(across) / scale
    if strict:
        return along >= RELATION_GAP[0] and across <= 0.5 * along  # clearly in that direction, not diagonal
    return along > RELATION_GAP[1] and across <= 1.5 * along


def _resolve_relation(scene, candidates, anchors, predicate, strict) -> set[int]:
    if strict and len(anchors) != 1:
        return set()  # a clear reading needs a single anchor
    return {
        index
        for index in candidates
        if any(anchor != index and _relation_holds(scene, index, anchor, predicate, strict) for anchor in anchors)
    }


def _resolve_comparison(scene, candidates, predicate, strict) -> set[int]:
    if not candidates:
        return set()
    objects = scene.objects
    if predicate in ("biggest", "smallest"):
        # Smallest is biggest with every measure negated; extent and visible area must agree.
        sign = 1 if predicate == "biggest" else -1
        extent = {index: objects[index].radius ** sign for index in candidates}
        area = {index: objects[index].visible_area ** sign for index in candidates}
        if strict:
            return {
                index
                for index in candidates
                if all(
                    extent[index] >= EXTENT_RATIO * extent[other] and area[index] >= AREA_RATIO * area[other]
                    for other in candidates
                    if other != index
                )
            }
        best_extent, best_area = max(extent.values()), max(area.values())
        return {
            index
            for index in candidates
            if extent[index] * EXTENT_RATIO >= best_extent or area[index] * AREA_RATIO >= best_area
        }

    # "second_from_<side>": the rank along a direction, ties within ORDINAL_MARGIN of each other.
    side = predicate.removeprefix("second_from_")
    scale = min(scene.width, scene.height)
    axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[side]
    key = {index: sign * objects[index].centroid[axis] / scale for index in candidates}
    selected = set()
    for index in candidates:
        others = [key[other] for other in candidates if other != index]
        surely_before = sum(value < key[index] - ORDINAL_MARGIN for value in others)
        maybe_before = sum(value < key[index] + ORDINAL_MARGIN for value in others)
        if strict:
            clearly_after = sum(value > key[index] + ORDINAL_MARGIN for value in others)
            if surely_before == 1 and clearly_after == len(others) - 1:
                selected.add(index)
        elif surely_before <= 1 <= maybe_before:
            selected.add(index)
    return selected


# ---------------------------------------------------------------------------------------------------------------
# Generating


def is_unambiguous(scene: Scene, expression: StructuredExpression, target: int) -> bool:
    """True when ``expression`` clearly describes ``target`` and cannot be read as describing any other object."""
    return resolve(scene, expression) == {target} and target in resolve(scene, expression, strict=True)


def _subsets(max_size: int):
    for size in range(max_size + 1):
        yield from itertools.combinations(ATTRIBUTES, size)


def unique_descriptions(scene: Scene, index: int, max_named: int = 4) -> list[Description]:
    """The shortest descriptions that match object ``index`` alone (and those one attribute longer)."""
    obj = scene.objects[index]
    unique = []
    for attributes in _subsets(max_named):
        description = Description.of(obj, attributes)
        if attributes and [i for i, o in enumerate(scene.objects) if description.matches(o)] == [index]:
            unique.append(description)
    if not unique:
        return []
    shortest = min(len(description.named) for description in unique)
    return [description for description in unique if len(description.named) <= shortest + 1]


def candidate_expressions(
    scene: Scene, index: int, must_name: tuple[str, ...] = (), max_named: int = 2
) -> dict[str, list[StructuredExpression]]:
    """Every unambiguous expression for object ``index``, by category.

    Location, relation and comparison expressions only use descriptions shared by several objects, so that the
    location, relation or comparison is what picks the object out. ``must_name``: the target's description must
    name at least one of these attributes. ``max_named``: at most this many attributes in a description outside
    the attribute category (keeps expressions short).
    """
    obj = scene.objects[index]
    found = {category: [] for category in CATEGORIES}

    def allowed(description: Description) -> bool:
        return not must_name or any(name in description.named for name in must_name)

    found["attribute"] = [
        StructuredExpression("attribute", description)
        for description in unique_descriptions(scene, index)
        if allowed(description)
    ]

    anchors = {
        other: unique_descriptions(scene, other, max_named) for other in range(len(scene.objects)) if other != index
    }
    for attributes in _subsets(max_named):
        description = Description.of(obj, attributes)
        if not allowed(description):
            continue
        matching = [i for i, o in enumerate(scene.objects) if description.matches(o)]
        if len(matching) < 2:
            continue
        candidates = []
        for predicate in _LOCATION_SCORES:
            candidates.append(StructuredExpression("location", description, predicate))
        for predicate in ("biggest", "smallest") if "size" not in attributes else ():
            candidates.append(StructuredExpression("comparison", description, predicate))
        if len(matching) >= 3:
            for side in ("left", "right", "top", "bottom"):
                candidates.append(StructuredExpression("comparison", description, f"second_from_{side}"))
        for anchor, anchor_descriptions in anchors.items():
            if not anchor_descriptions or len([i for i in matching if i != anchor]) < 2:
                continue
            anchor_description = min(anchor_descriptions, key=lambda d: len(d.named))
            for predicate in ("left_of", "right_of", "above", "below", "next_to"):
                # Cheap test first: most relations do not even hold for the target.
                if _relation_holds(scene, index, anchor, predicate, strict=True):
                    candidates.append(StructuredExpression("relation", description, predicate, anchor_description))
        for expression in candidates:
            if is_unambiguous(scene, expression, index):
                found[expression.category].append(expression)
    return found


def sample_expressions(
    scene: Scene,
    index: int,
    rng: np.random.Generator,
    count: int,
    must_name: tuple[str, ...] = (),
) -> list[tuple[StructuredExpression, str]]:
    """Up to ``count`` distinct worded expressions for object ``index``, drawn across categories."""
    remaining = {
        category: expressions
        for category, expressions in candidate_expressions(scene, index, must_name).items()
        if expressions
    }
    chosen, texts = [], set()
    while remaining and len(chosen) < count:
        # A category first, then an expression of it: categories come out balanced whatever their candidate counts.
        categories = sorted(remaining)
        category = categories[int(rng.integers(len(categories)))]
        expression = remaining[category].pop(int(rng.integers(len(remaining[category]))))
        if not remaining[category]:
            del remaining[category]
        text = verbalize(expression, rng)
        if text not in texts:
            texts.add(text)
            chosen.append((expression, text))
    return chosen
