"""Playground-Text: the SAC-GLAM environment, built from its published description (docs/design/ENVIRONMENTS.md).

A room of objects described in text. The agent walks between objects, grasps them (two hands) and releases them;
releasing a supply or food onto the right object makes it grow:

- water released on ``X seed`` grows the plant ``X`` (the water is consumed);
- a grown plant released on ``baby H`` (a herbivore) grows ``H`` (the plant is consumed);
- a grown herbivore released on ``baby C`` (a carnivore) grows ``C`` (the herbivore is consumed);
- with ``big_animals=True`` (LittleZoo's): two grown plants released together (``Release both``) on ``baby B`` (a big
  herbivore) grow ``B``; a grown big herbivore, or two grown herbivores released together, on ``baby K`` (a big
  carnivore) grow ``K``.

Scenes are built as every reference version builds them (LittleZoo's ``reset_with_goal``, IMAGINE's playground,
WorldLLM): the goal's target (young, for a grow goal) and exactly its supplies -- grow plant: water; grow herbivore:
water + a seed; grow carnivore: water + a seed + a baby herbivore; grow big herbivore: 2 water + 2 seeds; grow big
carnivore: 2 water + 2 seeds + a baby big herbivore or two baby herbivores (even odds) -- then distractors up to
``n_objects``. Every plant and animal starts young, distractors included; only a grasp goal's target is named as
stated (``Grasp cow`` puts a grown cow in the scene). ``grown_distractors=0.5`` brings back this project's earlier
scenes (half the living distractors grown, so food was often lying ready): an ablation, not the reference.

Observation (three lines)::

    You see: water, carrot seed, baby cow, door
    You are standing on: nothing
    Inventory (0/2): empty

Semantics decided here (the published description leaves them open):

- ``You see`` lists every object in the room that is not held, in the scene's fixed order, *including* the object
  the agent stands on. ``Go to <obj>`` is offered for every visible object except the one stood on (going where you
  already are would be a wasted step that only inflates the candidate list).
- ``Grasp`` takes the object stood on (when a hand is free); the agent then stands on nothing.
- ``Release <obj>`` with no growth rule for (released object, object stood on), or while standing on nothing, drops
  the object where the agent stands: it is visible again (back in its place in the scene order) and the agent keeps
  standing where it was. With a growth rule the released object is consumed and the object stood on turns into its
  grown form, which the agent now stands on.
- ``Release both`` releases the first-held object, then the second, each onto whatever is stood on at that moment.
- Every object name in a scene has a distinct base (never ``carrot seed`` next to ``carrot``), so every action
  string names one object; only water may appear twice (big-animal scenes), and the two are interchangeable: ``Go to
  water`` (offered once) goes to the first one not held.
- With ``colors=True`` every object but water gets a colour (``red baby cow`` grows into ``red cow``).

Goals, by category (step limits, 1.5x the optimal plan rounded down, in parentheses):
``grasp`` (3) ``Grasp <any object>``; ``grow_plant`` (6) ``Grow <plant>``; ``grow_herbivore`` (10)
``Grow <herbivore>``; ``grow_carnivore`` (15) ``Grow <carnivore>``; ``impossible`` (10) ``Grow <furniture>``; with
big animals ``grow_big_herbivore`` (18) and ``grow_big_carnivore`` (27), LittleZoo's limits.
``info["achieved_goals"]`` lists ``Grasp <obj>`` for every grasp and ``Grow <obj>`` for every growth of the step,
whatever the episode's goal.

Held-out split: by default the last name of each kind (bed, onion, bison, jackal; buffalo, cougar) never appears in
``split="train"`` goals or scenes; ``split="test"`` goals name only held-out objects (their scenes may hold any
object).

Names: our four base kinds keep this project's object lists (elephant and lion are ordinary herbivore and carnivore
here, as in the SAC-GLAM description); the big animals take names of LittleZoo's big kinds that no other list uses.

The room's dynamics are pure module-level functions of a ``PlaygroundState`` (``playground_transition``,
``playground_admissible``, ``playground_observation``, ``playground_expert``), so tests and planners can search
the state space without an env.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from envs.base import TextEnvBase

FURNITURE: tuple[str, ...] = ("door", "chair", "desk", "lamp", "table", "cupboard", "sofa", "bookshelf", "bed")
PLANTS: tuple[str, ...] = (
    "carrot",
    "potato",
    "berry",
    "lettuce",
    "tomato",
    "cucumber",
    "spinach",
    "broccoli",
    "onion",
)
HERBIVORES: tuple[str, ...] = ("cow", "elephant", "rabbit", "deer", "sheep", "giraffe", "goat", "horse", "bison")
CARNIVORES: tuple[str, ...] = ("lion", "tiger", "bobcat", "panther", "coyote", "wolf", "leopard", "hyena", "jackal")
# LittleZoo's big animals (``big_animals=True`` only): a big herbivore eats two grown plants released together, a big
# carnivore a grown big herbivore or two grown (small) herbivores released together.
BIG_HERBIVORES: tuple[str, ...] = ("rhinoceros", "hippopotamus", "camel", "moose", "zebra", "buffalo")
BIG_CARNIVORES: tuple[str, ...] = ("grizzly", "shark", "crocodile", "jaguar", "cheetah", "cougar")
WATER = "water"
COLORS: tuple[str, ...] = ("red", "green", "blue")
# The default held-out objects: the last name of each kind (water is the only supply, so it is never held out).
# (Big animals never appear unless enabled, so holding their last names out changes nothing for the other scenes.)
DEFAULT_HELD_OUT: tuple[str, ...] = (
    FURNITURE[-1],
    PLANTS[-1],
    HERBIVORES[-1],
    CARNIVORES[-1],
    BIG_HERBIVORES[-1],
    BIG_CARNIVORES[-1],
)

GOAL_CATEGORIES: tuple[str, ...] = ("grasp", "grow_plant", "grow_herbivore", "grow_carnivore")
IMPOSSIBLE = "impossible"
ALL_GOAL_CATEGORIES: tuple[str, ...] = (*GOAL_CATEGORIES, IMPOSSIBLE)
BIG_GOAL_CATEGORIES: tuple[str, ...] = ("grow_big_herbivore", "grow_big_carnivore")
KNOWN_GOAL_CATEGORIES: tuple[str, ...] = (*ALL_GOAL_CATEGORIES, *BIG_GOAL_CATEGORIES)
STEP_LIMITS: dict[str, int] = {
    "grasp": 3,
    "grow_plant": 6,
    "grow_herbivore": 10,
    "grow_carnivore": 15,
    IMPOSSIBLE: 10,
    "grow_big_herbivore": 18,  # LittleZoo's limits: 1.5x its 12-step and 18-step plans
    "grow_big_carnivore": 27,
}
# Objects a scene needs for a goal of each category (grow carnivore: baby carnivore, baby herbivore, seed, water;
# grow big carnivore: baby, 2 water, 2 seeds and two baby herbivores, or one baby big herbivore).
_REQUIRED_COUNT: dict[str, int] = {
    "grasp": 1,
    "grow_plant": 2,
    "grow_herbivore": 3,
    "grow_carnivore": 4,
    IMPOSSIBLE: 1,
    "grow_big_herbivore": 5,
    "grow_big_carnivore": 7,
}
# What makes a young stage grow: each recipe is the stages released onto it in one action (one object, or two with
# ``Release both``). The first three are the original Playground's; the big animals are LittleZoo's.
RECIPES: dict[str, tuple[tuple[str, ...], ...]] = {
    "seed": (("water",),),
    "baby_herbivore": (("plant",),),
    "baby_carnivore": (("herbivore",),),
    "baby_big_herbivore": (("plant", "plant"),),
    "baby_big_carnivore": (("big_herbivore",), ("herbivore", "herbivore")),
}
MAX_WATER = 2  # a scene holds at most two waters (big animals need two plants); every other base at most once
INVENTORY_SIZE = 2


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a display name (``red baby cow``) means.

    Attributes:
        kind: ``furniture``, ``plant``, ``herbivore``, ``carnivore``, ``big_herbivore``, ``big_carnivore``, ``water``.
        base: the object's base name (``cow``); unique within a scene.
        color: its colour, or None.
        stage: ``furniture``, ``water``, ``seed``, ``plant``, ``baby_<kind>`` or ``<kind>`` for the four animal kinds.
        grown: the name it grows into (seeds and babies only), else None.
        source: the name it grew from (grown plants and animals only), else None.
        feeds: the stage it makes grow when released onto it alone (water -> seed, plant -> baby_herbivore,
            herbivore -> baby_carnivore, big_herbivore -> baby_big_carnivore), else None. Pairs: ``RECIPES``.
    """

    kind: str
    base: str
    color: str | None
    stage: str
    grown: str | None
    source: str | None
    feeds: str | None


def _build_tables() -> dict[str, ObjectInfo]:
    """Every display name, coloured and plain, with its meaning."""
    table: dict[str, ObjectInfo] = {WATER: ObjectInfo("water", WATER, None, "water", None, None, "seed")}
    for color in (None, *COLORS):
        pre = f"{color} " if color else ""
        for base in FURNITURE:
            table[pre + base] = ObjectInfo("furniture", base, color, "furniture", None, None, None)
        for kind, bases, young, feeds in (
            ("plant", PLANTS, "{} seed", "baby_herbivore"),
            ("herbivore", HERBIVORES, "baby {}", "baby_carnivore"),
            ("carnivore", CARNIVORES, "baby {}", None),
            ("big_herbivore", BIG_HERBIVORES, "baby {}", "baby_big_carnivore"),
            ("big_carnivore", BIG_CARNIVORES, "baby {}", None),
        ):
            young_stage = "seed" if kind == "plant" else f"baby_{kind}"
            for base in bases:
                grown, small = pre + base, pre + young.format(base)
                table[small] = ObjectInfo(kind, base, color, young_stage, grown, None, None)
                table[grown] = ObjectInfo(kind, base, color, kind, None, small, feeds)
    return table


OBJECTS: dict[str, ObjectInfo] = _build_tables()
# Action and goal strings are built once: the env is stepped ~100k times per run.
_GO_TO: dict[str, str] = {name: f"Go to {name}" for name in OBJECTS}
_RELEASE: dict[str, str] = {name: f"Release {name}" for name in OBJECTS}
_GRASP_GOAL: dict[str, str] = {name: f"Grasp {name}" for name in OBJECTS}
_GROW_GOAL: dict[str, str] = {name: f"Grow {name}" for name in OBJECTS}
_ACTION_OBJECT: dict[str, tuple[str, str]] = {
    **{s: ("go", n) for n, s in _GO_TO.items()},
    **{s: ("release", n) for n, s in _RELEASE.items()},
}


def _goal_table() -> dict[str, tuple[str, str]]:
    """Every goal string -> (category, the object it names)."""
    goals: dict[str, tuple[str, str]] = {}
    for name, info in OBJECTS.items():
        goals[_GRASP_GOAL[name]] = ("grasp", name)
        if info.stage in ("plant", "herbivore", "carnivore", "big_herbivore", "big_carnivore"):
            goals[_GROW_GOAL[name]] = (f"grow_{info.stage}", name)
        elif info.stage == "furniture":
            goals[_GROW_GOAL[name]] = (IMPOSSIBLE, name)
    return goals


_GOALS: dict[str, tuple[str, str]] = _goal_table()


class PlaygroundState(NamedTuple):
    """The whole state of a room (hashable, so planners can search over it).

    Attributes:
        objects: every object in the room, held or not, in the scene's fixed order (consumed ones removed).
        held: the held objects, in the order they were grasped (at most two).
        on: the object stood on (always a visible one), or None.
    """

    objects: tuple[str, ...]
    held: tuple[str, ...]
    on: str | None


def _visible(state: PlaygroundState) -> list[str]:
    """The objects not held, in scene order (of two waters with one held, the later one is the visible one)."""
    if not state.held:
        return list(state.objects)
    held = list(state.held)
    visible = []
    for o in state.objects:
        if o in held:
            held.remove(o)
        else:
            visible.append(o)
    return visible


def playground_observation(state: PlaygroundState) -> str:
    """The three-line observation text of ``state``."""
    visible = _visible(state)
    return (
        f"You see: {', '.join(visible) if visible else 'nothing'}\n"
        f"You are standing on: {state.on if state.on is not None else 'nothing'}\n"
        f"Inventory ({len(state.held)}/{INVENTORY_SIZE}): {', '.join(state.held) if state.held else 'empty'}"
    )


def playground_admissible(state: PlaygroundState) -> list[str]:
    """The admissible actions of ``state``: go-tos in scene order, then ``Grasp``, then releases."""
    on = state.on
    actions = list(dict.fromkeys(_GO_TO[o] for o in _visible(state) if o != on))  # two waters: one "Go to water"
    if on is not None and len(state.held) < INVENTORY_SIZE:
        actions.append("Grasp")
    actions.extend(_RELEASE[h] for h in state.held)
    if len(state.held) == INVENTORY_SIZE:
        actions.append("Release both")
    return actions


def growth_result(released: str, target: str | None) -> str | None:
    """The name ``target`` grows into when ``released`` is released onto it, or None when no rule applies."""
    if target is None:
        return None
    feeds = OBJECTS[released].feeds
    return OBJECTS[target].grown if feeds is not None and feeds == OBJECTS[target].stage else None


def pair_growth_result(first: str, second: str, target: str | None) -> str | None:
    """The name ``target`` grows into when ``first`` and ``second`` are released onto it together, or None."""
    if target is None:
        return None
    recipes = RECIPES.get(OBJECTS[target].stage, ())
    pair = sorted((OBJECTS[first].stage, OBJECTS[second].stage))
    return OBJECTS[target].grown if any(len(r) == 2 and sorted(r) == pair for r in recipes) else None


def _without_one(items: tuple[str, ...], obj: str) -> tuple[str, ...]:
    """``items`` less its first ``obj`` (names repeat only for water)."""
    i = items.index(obj)
    return items[:i] + items[i + 1 :]


def _grow(
    objects: tuple[str, ...], eaten: Sequence[str], on: str | None, grown: str, achieved: list[str]
) -> tuple[str, ...]:
    """``objects`` with ``eaten`` consumed and the stood-on object turned into ``grown`` (recorded in ``achieved``)."""
    achieved.append(_GROW_GOAL[grown])
    for obj in eaten:
        objects = _without_one(objects, obj)
    return tuple(grown if o == on else o for o in objects)


def _release(
    objects: tuple[str, ...], held: tuple[str, ...], on: str | None, obj: str, achieved: list[str]
) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    held = _without_one(held, obj)
    grown = growth_result(obj, on)
    if grown is None:  # no rule: dropped where the agent stands, visible again in its place
        return objects, held, on
    return _grow(objects, (obj,), on, grown, achieved), held, grown


def playground_transition(state: PlaygroundState, action: str) -> tuple[PlaygroundState, list[str]]:
    """Apply an admissible ``action`` to ``state``.

    Args:
        state: the current state.
        action: one of ``playground_admissible(state)`` (not re-checked here: the env checks it).

    Returns:
        The next state and the goals the step newly achieved (``Grasp <obj>`` / ``Grow <obj>``).
    """
    objects, held, on = state
    achieved: list[str] = []
    if action == "Grasp":
        assert on is not None
        achieved.append(_GRASP_GOAL[on])
        return PlaygroundState(objects, (*held, on), None), achieved
    if action == "Release both":
        grown = pair_growth_result(held[0], held[1], on)
        if grown is not None:  # a big animal eats both at once
            return PlaygroundState(_grow(objects, held, on, grown, achieved), (), grown), achieved
        for obj in held:
            objects, held, on = _release(objects, held, on, obj, achieved)
        return PlaygroundState(objects, held, on), achieved
    verb, obj = _ACTION_OBJECT[action]
    if verb == "go":
        return PlaygroundState(objects, held, obj), achieved
    objects, held, on = _release(objects, held, on, obj, achieved)
    return PlaygroundState(objects, held, on), achieved


# ----------------------------------------------------------------------------------------------------------------
# The scripted expert: a recursive plan (grow what you need, fetch it, release it on the target), recomputed from the
# state at every step so that it also works from states the expert did not produce. It returns None when the goal can
# no longer be reached (a needed object was consumed or grown into something else).


def _put_down(state: PlaygroundState, obj: str) -> str:
    """Release held ``obj`` where no growth rule fires (walking to such a spot first if needed)."""
    if growth_result(obj, state.on) is None:
        return _RELEASE[obj]
    for v in _visible(state):
        if v != state.on and growth_result(obj, v) is None:
            return _GO_TO[v]
    return _RELEASE[obj]  # nowhere safe: releasing is the only way to free the hand


def _free_hand(state: PlaygroundState) -> str:
    """Free a hand, putting down a held object that feeds nothing if there is one."""
    idle = [h for h in state.held if OBJECTS[h].feeds is None]
    return _put_down(state, idle[0] if idle else state.held[0])


def _fetch(state: PlaygroundState, obj: str) -> str:
    """The next action to grasp ``obj``, which lies visible in the room."""
    if len(state.held) == INVENTORY_SIZE:
        return _free_hand(state)
    return "Grasp" if state.on == obj else _GO_TO[obj]


def _grasp_action(state: PlaygroundState, target: str) -> str | None:
    if target not in state.objects:
        return None
    if target in state.held:  # a grasp goal needs a new grasp: put it down first
        return _put_down(state, target)
    return _fetch(state, target)


def _grow_action(state: PlaygroundState, target: str) -> str | None:
    source = OBJECTS[target].source
    if source is None or source not in state.objects:
        return None
    if source in state.held:  # seeds and babies feed nothing, so releasing one is always safe
        return _RELEASE[source]
    for recipe in RECIPES[OBJECTS[source].stage]:  # the first recipe that can still be made
        action = _feed_action(state, source, recipe[0], len(recipe))
        if action is not None:
            return action
    return None


# The young stage whose growth gives each food stage (water cannot be grown).
_FOOD_SOURCE: dict[str, str] = {"plant": "seed", "herbivore": "baby_herbivore", "big_herbivore": "baby_big_herbivore"}


def _feed_action(state: PlaygroundState, source: str, food: str, count: int) -> str | None:
    """The next action to release ``count`` objects of stage ``food`` onto ``source`` at once, or None."""
    held = [h for h in state.held if OBJECTS[h].stage == food]
    if len(held) >= count:
        if state.on != source:
            return _GO_TO[source]
        return "Release both" if count == 2 else _RELEASE[held[0]]
    lying = [v for v in _visible(state) if OBJECTS[v].stage == food]
    # Enough lying around: fetch it (freeing a hand if needed); too little: hold what lies there while the rest grows.
    if lying and (len(held) + len(lying) >= count or len(state.held) < INVENTORY_SIZE):
        return _fetch(state, state.on if state.on in lying else lying[0])
    # Not enough food at hand: grow some (a plant for a herbivore, a herbivore for a carnivore).
    young = _FOOD_SOURCE.get(food)
    for obj in state.objects:
        info = OBJECTS[obj]
        if info.stage == young and info.grown is not None:
            action = _grow_action(state, info.grown)
            if action is not None:
                return action
    return None


def playground_expert(state: PlaygroundState, goal: str) -> str | None:
    """The scripted expert's next action towards ``goal`` from ``state``, or None when the goal is unreachable.

    From a reset state it solves every goal category within its step limit (grasp 2 steps, grow plant 4,
    grow herbivore 7, grow carnivore 10 at most); from any other state it reaches the goal whenever it is reachable.
    Impossible goals return None.
    """
    category, target = _GOALS[goal]
    if category == "grasp":
        return _grasp_action(state, target)
    if category == IMPOSSIBLE:
        return None
    return _grow_action(state, target)


# ----------------------------------------------------------------------------------------------------------------


def _goal_examples() -> str:
    return "e.g. 'Grasp water', 'Grow carrot', 'Grow cow', 'Grow lion', 'Grow door' (impossible)"


class PlaygroundTextEnv(TextEnvBase):
    """Playground-Text (see the module docstring for the rules).

    Args:
        n_objects: objects per scene (what the goal needs plus distractors); at least what the configured goal
            categories need (4 for grow_carnivore) and at most the number of distinct bases in the split's pool.
            A pair ``(min, max)`` draws the size uniformly per episode (never below what the goal needs): a
            curriculum, since small scenes make long chains such as growing a plant far likelier to be found.
        goal_categories: the categories goals are sampled from (any of ``grasp``, ``grow_plant``,
            ``grow_herbivore``, ``grow_carnivore``, ``impossible``; with ``big_animals``, also
            ``grow_big_herbivore`` and ``grow_big_carnivore``).
        goal_weights: sampling weights of the categories (a sequence aligned with ``goal_categories`` or a mapping
            category -> weight); None = uniform.
        impossible_goals: add the ``impossible`` category (``Grow <furniture>``) to ``goal_categories``.
        split: ``train`` (held-out objects never in goals nor scenes) or ``test`` (goals name held-out objects only).
        held_out: base names held out of training (default: the last name of each kind).
        colors: give every object but water a colour, multiplying the goal space.
        invalid_action: ``raise`` (InvalidActionError) or ``noop`` (a wasted step flagged in ``info``).
        render_mode: None or ``ansi``.
        grown_distractors: the probability that a plant or animal *distractor* starts grown. 0 (the default) is
            the reference environment: every plant in a scene is a seed and every animal a baby, as in LittleZoo,
            IMAGINE's playground and WorldLLM. 0.5 is this project's scenes before 2026-12-07, kept for the ablation
            only: a herbivore (carnivore) goal's scene then often holds a grown plant (herbivore) already, a
            shortcut that spares the policy the chain. Not the reference.
        big_animals: add LittleZoo's big herbivores and big carnivores (goal categories ``grow_big_herbivore``,
            ``grow_big_carnivore``; also as distractors). Off by default.
    """

    def __init__(
        self,
        n_objects: int | Sequence[int] = 8,
        goal_categories: Sequence[str] = GOAL_CATEGORIES,
        goal_weights: Sequence[float] | Mapping[str, float] | None = None,
        impossible_goals: bool = False,
        split: str = "train",
        held_out: Sequence[str] = DEFAULT_HELD_OUT,
        colors: bool = False,
        invalid_action: str = "raise",
        render_mode: str | None = None,
        grown_distractors: float = 0.0,
        big_animals: bool = False,
    ) -> None:
        super().__init__(invalid_action=invalid_action)
        if isinstance(goal_categories, str):
            goal_categories = [goal_categories]
        cats = list(dict.fromkeys(goal_categories))
        if impossible_goals and IMPOSSIBLE not in cats:
            cats.append(IMPOSSIBLE)
        unknown = [c for c in cats if c not in KNOWN_GOAL_CATEGORIES]
        if unknown or not cats:
            raise ValueError(
                f"unknown goal categories {unknown} (got {cats}); choose from {list(KNOWN_GOAL_CATEGORIES)}"
            )
        big = [c for c in cats if c in BIG_GOAL_CATEGORIES]
        if big and not big_animals:
            raise ValueError(f"goal categories {big} need the big animals: pass big_animals=True")
        if not 0.0 <= float(grown_distractors) <= 1.0:
            raise ValueError(f"grown_distractors is a probability in [0, 1], got {grown_distractors}")
        self.grown_distractors = float(grown_distractors)
        self.big_animals = bool(big_animals)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        bases = {o.base for o in OBJECTS.values()}
        bad = [b for b in held_out if b not in bases or b == WATER]
        if bad:
            raise ValueError(f"held_out names {bad} are not object bases; use names such as {list(DEFAULT_HELD_OUT)}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.goal_categories: list[str] = cats
        # Every category a step can achieve, whatever the episodes' goals are drawn from (achieved-goal sources).
        self.all_goal_categories: list[str] = [*GOAL_CATEGORIES, *(BIG_GOAL_CATEGORIES if big_animals else ())]
        self._requestable: list[str] = [*self.all_goal_categories, IMPOSSIBLE]  # reset(goal_category=...)
        self.split = split
        self.held_out: frozenset[str] = frozenset(held_out)
        self.colors = colors
        self.render_mode = render_mode
        if isinstance(n_objects, int):
            self.n_objects_min = self.n_objects = int(n_objects)
        else:
            if len(n_objects) != 2 or not 1 <= int(n_objects[0]) <= int(n_objects[1]):
                raise ValueError(f"n_objects must be an int or a pair (min, max), 1 <= min <= max; got {n_objects}")
            self.n_objects_min, self.n_objects = int(n_objects[0]), int(n_objects[1])
        self._weights = self._category_weights(goal_weights)
        # Bases a scene may hold: training scenes never show a held-out object.
        kinds = (WATER, *FURNITURE, *PLANTS, *HERBIVORES, *CARNIVORES)
        if big_animals:
            kinds = (*kinds, *BIG_HERBIVORES, *BIG_CARNIVORES)
        self._scene_bases: list[str] = [b for b in kinds if split == "test" or b not in self.held_out]
        need = max(_REQUIRED_COUNT[c] for c in cats)
        if not need <= self.n_objects <= len(self._scene_bases):
            raise ValueError(
                f"n_objects={n_objects} must be between {need} (what goals of {cats} need) and "
                f"{len(self._scene_bases)} (distinct objects available to split={split!r})"
            )
        self._goal_spaces: dict[tuple[str, str], list[str]] = {}
        for c in cats:
            if not self.goal_space(c, split):
                raise ValueError(f"category {c!r} has no goals in split {split!r} with held_out={sorted(held_out)}")
        self._state = PlaygroundState((), (), None)
        self._goal = ""
        self._category = ""
        self._limit = 0
        self._t = 0
        self._done = True
        self._obs = ""
        self._actions: list[str] = []

    def _category_weights(self, goal_weights: Sequence[float] | Mapping[str, float] | None) -> np.ndarray:
        cats = self.goal_categories
        if goal_weights is None:
            w = np.ones(len(cats))
        elif isinstance(goal_weights, Mapping):
            extra = [c for c in goal_weights if c not in cats]
            if extra:
                raise ValueError(f"goal_weights names categories {extra} that are not in goal_categories {cats}")
            w = np.array([float(goal_weights.get(c, 0.0)) for c in cats])
        else:
            if len(goal_weights) != len(cats):
                raise ValueError(
                    f"goal_weights has {len(goal_weights)} entries but goal_categories has {len(cats)}: {cats}"
                )
            w = np.array([float(x) for x in goal_weights])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"goal_weights must be non-negative with a positive sum, got {w.tolist()} for {cats}")
        return np.cumsum(w / w.sum())

    def set_goal_weights(self, goal_weights: Sequence[float] | Mapping[str, float]) -> None:
        """Reweight the categories that later resets draw from (a goal curriculum's hook; the rules of the
        ``goal_weights`` argument). Takes effect at the next reset, auto-resets of a vector env included."""
        self._weights = self._category_weights(goal_weights)

    def _sample_category(self) -> int:
        """Index of a category drawn by weight (clipped so that float rounding never picks past the last one)."""
        index = int(np.searchsorted(self._weights, self.np_random.random(), "right"))
        return min(index, int(np.flatnonzero(np.diff(self._weights, prepend=0.0) > 0)[-1]))

    # -- goals --------------------------------------------------------------------------------------------------

    def goal_space(self, category: str, split: str) -> list[str]:
        """All goals of ``category`` in ``split`` (``train``: no held-out object; ``test``: held-out objects only).

        Uses this env's ``colors`` and ``held_out`` settings. Order is fixed (the object tables' order).
        """
        key = (category, split)
        cached = self._goal_spaces.get(key)
        if cached is not None:
            return list(cached)
        if category not in KNOWN_GOAL_CATEGORIES:
            raise ValueError(f"unknown goal category {category!r}; choose from {list(KNOWN_GOAL_CATEGORIES)}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        goals = [g for g, (c, name) in _GOALS.items() if c == category and self._goal_in_split(name, split)]
        self._goal_spaces[key] = goals
        return list(goals)

    def _known(self, info: ObjectInfo) -> bool:
        """Whether this env's objects include ``info``'s: coloured iff ``colors`` (water never), big animals only
        with ``big_animals``."""
        colour_ok = (info.color is not None) == self.colors or info.kind == WATER
        return colour_ok and (self.big_animals or not info.kind.startswith("big_"))

    def _goal_in_split(self, name: str, split: str) -> bool:
        info = OBJECTS[name]
        return self._known(info) and (info.base in self.held_out) == (split == "test")

    def _parse_goal(self, goal: str) -> tuple[str, str]:
        parsed = _GOALS.get(goal)
        if parsed is None or not self._known(OBJECTS[parsed[1]]):
            raise ValueError(
                f"unknown Playground-Text goal {goal!r} (colors={self.colors}, big_animals={self.big_animals}); "
                f"{_goal_examples()}; "
                f"env.goal_space(category, split) lists them all"
            )
        return parsed

    def goal_category(self, goal: str) -> str:
        """The category of ``goal`` (``grasp``, ``grow_plant``, ...); pure. Unknown goal -> ValueError."""
        return self._parse_goal(goal)[0]

    def goal_step_limit(self, goal: str) -> int:
        """The step limit of an episode with ``goal``; pure. Unknown goal -> ValueError.

        Grasp 3, grow plant 6, grow herbivore 10, grow carnivore 15, impossible 10, grow big herbivore 18, grow big
        carnivore 27 (1.5x the optimal plan).
        """
        return STEP_LIMITS[self._parse_goal(goal)[0]]

    # -- scenes -------------------------------------------------------------------------------------------------

    def _pick(self, seq: Sequence[str]) -> str:
        return seq[int(self.np_random.integers(len(seq)))]

    def _colored(self, name: str) -> str:
        return f"{self._pick(COLORS)} {name}" if self.colors else name

    def _sample_scene(self, category: str, target: str) -> tuple[str, ...]:
        """Exactly what the goal needs (the target first), then distractors of unused bases up to ``n_objects``,
        shuffled. Every plant and animal but a grasp goal's target starts young (``grown_distractors`` aside)."""
        info = OBJECTS[target]
        scene = [info.source if info.source is not None and category != "grasp" else target]
        used = {info.base}
        pool = self._scene_bases

        def add_young(bases: Sequence[str], fmt: str) -> None:
            free = [b for b in bases if b not in used and b in pool]
            base = self._pick(free)
            used.add(base)
            scene.append(self._colored(fmt.format(base)))

        if category == "grow_big_carnivore":  # LittleZoo: a big herbivore or two small ones, with equal odds
            if self.np_random.integers(2):
                add_young(BIG_HERBIVORES, "baby {}")
            else:
                add_young(HERBIVORES, "baby {}")
                add_young(HERBIVORES, "baby {}")
        if category == "grow_carnivore":
            add_young(HERBIVORES, "baby {}")
        if category in ("grow_carnivore", "grow_herbivore"):
            add_young(PLANTS, "{} seed")
        if category in ("grow_big_herbivore", "grow_big_carnivore"):
            add_young(PLANTS, "{} seed")
            add_young(PLANTS, "{} seed")
            scene.append(WATER)
        if category.startswith("grow_"):
            scene.append(WATER)
            used.add(WATER)
        free = [b for b in pool if b not in used]
        size = self.n_objects  # a fixed size draws nothing, so fixed-size runs keep their random stream
        if self.n_objects_min < self.n_objects:
            size = max(len(scene), int(self.np_random.integers(self.n_objects_min, self.n_objects + 1)))
        n_extra = size - len(scene)
        if n_extra > len(free):
            raise ValueError(f"n_objects={self.n_objects} exceeds the {len(scene) + len(free)} objects available")
        for i in self.np_random.permutation(len(free))[:n_extra]:
            base = free[int(i)]
            scene.append(self._distractor(base))
        order = self.np_random.permutation(len(scene))
        return tuple(scene[int(i)] for i in order)

    def _distractor(self, base: str) -> str:
        """A distractor of ``base``: furniture or water as is, a living one young (grown: ``grown_distractors``)."""
        if base == WATER:
            return WATER
        if base in FURNITURE:
            return self._colored(base)
        p = self.grown_distractors
        # 0.5 draws as the pre-reference scenes did (one fair integer), so the ablation replays them draw for draw.
        grown = p > 0 and (bool(self.np_random.integers(2)) if p == 0.5 else self.np_random.random() < p)
        fmt = "{} seed" if base in PLANTS else "baby {}"
        return self._colored(base if grown else fmt.format(base))

    def _check_scene(self, objects: Sequence[str]) -> tuple[str, ...]:
        scene = tuple(objects)
        unknown = [
            o for o in scene if o not in OBJECTS or ((OBJECTS[o].color is not None) != self.colors and o != WATER)
        ]
        if unknown or not scene:
            raise ValueError(
                f"options['objects'] holds unknown object names {unknown} (colors={self.colors}): {scene}"
            )
        bases = [OBJECTS[o].base for o in scene if o != WATER]
        if len(set(bases)) != len(bases) or scene.count(WATER) > MAX_WATER:
            raise ValueError(
                f"options['objects'] must name each base at most once (water at most {MAX_WATER} times), got {scene}"
            )
        big = [o for o in scene if OBJECTS[o].kind.startswith("big_")]
        if big and not self.big_animals:
            raise ValueError(f"options['objects'] holds big animals {big}: pass big_animals=True")
        return scene

    # -- gymnasium API ------------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode.

        Args:
            seed: seeds ``self.np_random`` (goals and scenes are drawn from it).
            options: ``{"goal": str}`` sets the goal (unknown -> ValueError; a held-out goal is allowed in a train
                env, its scene then holds training objects besides the goal's own); ``{"goal_category": str}``
                samples a goal of that category from this env's split; ``{"objects": [names]}`` (tests and
                evaluation) sets the scene exactly, in that order, instead of sampling it -- the caller makes sure it
                holds what the goal needs.

        Returns:
            The observation text and the info dict (``goal``, ``goal_category``, ``admissible_actions``,
            ``achieved_goals`` = [], ``invalid_action`` = False).
        """
        super().reset(seed=seed)
        options = options or {}
        unknown_keys = set(options) - {"goal", "goal_category", "objects"}
        if unknown_keys:
            raise ValueError(f"unknown reset options {sorted(unknown_keys)}; use 'goal', 'goal_category' or 'objects'")
        goal: str | None = options.get("goal")
        if goal is not None:
            if "goal_category" in options:
                raise ValueError("give reset options 'goal' or 'goal_category', not both")
            category, target = self._parse_goal(goal)
        else:
            requested: str | None = options.get("goal_category")
            if requested is None:
                category = self.goal_categories[self._sample_category()]
            elif requested in self._requestable:
                category = requested
            else:
                raise ValueError(f"unknown goal category {requested!r}; choose from {self._requestable}")
            goal = self._pick(self.goal_space(category, self.split))
            target = _GOALS[goal][1]
        if "objects" in options:
            objects = self._check_scene(options["objects"])
        else:
            if _REQUIRED_COUNT[category] > self.n_objects:
                raise ValueError(
                    f"a {category} goal needs {_REQUIRED_COUNT[category]} objects; n_objects={self.n_objects}"
                )
            objects = self._sample_scene(category, target)
        self._state = PlaygroundState(objects, (), None)
        self._goal, self._category, self._limit = goal, category, STEP_LIMITS[category]
        self._t = 0
        self._done = False
        self._obs = playground_observation(self._state)
        self._actions = self._admissible()
        return self._obs, self._info([], False)

    def _admissible(self) -> list[str]:
        return self._require_actions(playground_admissible(self._state), f"PlaygroundText goal {self._goal!r}")

    def _info(self, achieved: list[str], invalid: bool) -> dict[str, Any]:
        return {
            "goal": self._goal,
            "goal_category": self._category,
            "admissible_actions": list(self._actions),  # a copy: callers may edit theirs
            "achieved_goals": achieved,
            "invalid_action": invalid,
        }

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Take ``action`` (one of ``info["admissible_actions"]``).

        Returns:
            ``(observation, reward, terminated, truncated, info)``: reward 1.0 and terminated when the goal was
            achieved by this step; truncated when the step limit is reached without it.
        """
        if self._done:
            raise RuntimeError("PlaygroundTextEnv.step called before reset() or after the episode ended; call reset()")
        valid = self._check_action(action, self._actions)
        achieved: list[str] = []
        if valid:
            self._state, achieved = playground_transition(self._state, action)
            self._obs = playground_observation(self._state)
            self._actions = self._admissible()
        self._t += 1
        reward = self.compute_reward(achieved, self._goal)
        terminated = reward > 0
        truncated = not terminated and self._t >= self._limit
        self._done = terminated or truncated
        return self._obs, reward, terminated, truncated, self._info(achieved, not valid)

    def expert_action(self) -> str:
        """The scripted expert's action for the current state and goal (any admissible one if it is unreachable)."""
        action = playground_expert(self._state, self._goal)
        return action if action is not None else self._actions[0]

    def render(self) -> str | None:
        """The current observation text (``render_mode="ansi"``), else None."""
        return self._obs if self.render_mode == "ansi" else None

    @property
    def state(self) -> PlaygroundState:
        """The current room state (immutable)."""
        return self._state

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode (invalid no-op steps included)."""
        return self._t
