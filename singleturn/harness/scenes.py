"""ALFRED floor plans as ALFWorld sees them: receptacles, their locations, and which objects fit where.

Built only from files the alfworld package ships (`gen/layouts/FloorPlan{N}-openable.json` and
`-objects.json`) and `alfworld.gen.constants`; static receptacles absent from openable.json get one
instance with a fixed synthetic id, so every game in a floor plan shares one room layout. Splits:
`valid_unseen` uses ALFRED's held-out scenes (`constants.TEST_SCENE_NUMBERS`), `train` and
`valid_seen` all others; fixed and disjoint. Details: docs/pieces.md (harness/).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import alfworld.gen.constants as C

LAYOUTS = Path(C.__file__).parent / "layouts"
UNSEEN_FLOORPLANS: tuple[int, ...] = tuple(C.TEST_SCENE_NUMBERS)
_ALL_FLOORPLANS = tuple(
    sorted(
        int(p.name[len("FloorPlan") : -len("-objects.json")]) for p in LAYOUTS.glob("FloorPlan*-objects.json")
    )
)
TRAIN_FLOORPLANS: tuple[int, ...] = tuple(n for n in _ALL_FLOORPLANS if n not in UNSEEN_FLOORPLANS)
SPLIT_FLOORPLANS = {
    "train": TRAIN_FLOORPLANS,
    "valid_seen": TRAIN_FLOORPLANS,
    "valid_unseen": UNSEEN_FLOORPLANS,
}

STATIC_RECEPTACLES = frozenset(C.RECEPTACLES) - C.MOVABLE_RECEPTACLES_SET
TOGGLES = ("DeskLamp", "FloorLamp")
# Where a lamp stands (lamps fit in no receptacle class in VAL_RECEPTACLE_OBJECTS; ALFWorld scenes
# show them on tables, desks and dressers).
LAMP_STANDS = ("SideTable", "Desk", "Dresser", "CoffeeTable", "DiningTable", "Shelf", "CounterTop", "TVStand")
# Object classes a task can involve: anything some receptacle accepts, minus slices and static
# receptacles (movable receptacles such as Mug or Bowl are objects here, as in ALFWorld).
PICKUPABLE = frozenset(
    o
    for objs in C.VAL_RECEPTACLE_OBJECTS.values()
    for o in objs
    if "Sliced" not in o and o not in STATIC_RECEPTACLES and o in C.OBJECTS
)


def room_type(floorplan: int) -> str:
    return next(name for name, rng in C.SCENE_TYPE.items() if floorplan in rng)


@dataclass(frozen=True)
class Receptacle:
    thor_id: str  # e.g. "Cabinet|+00.68|+00.50|-02.20", "Sink|-01.90|+00.97|-01.50|SinkBasin"
    cls: str  # e.g. "Cabinet", "SinkBasin"
    location: str  # e.g. "loc|2|-5|180|30": one receptacle per location


@dataclass(frozen=True)
class Scene:
    floorplan: int
    receptacles: tuple[Receptacle, ...]
    object_classes: tuple[str, ...]  # pickupable classes present in the scene (sorted)
    toggles: tuple[str, ...]  # lamp classes present

    def receptacles_of(self, cls: str) -> list[Receptacle]:
        return [r for r in self.receptacles if r.cls == cls]

    @property
    def receptacle_classes(self) -> set[str]:
        return {r.cls for r in self.receptacles}

    def holders(self, obj_cls: str) -> list[Receptacle]:
        """Receptacles an object of this class may start in."""
        return [r for r in self.receptacles if obj_cls in C.VAL_RECEPTACLE_OBJECTS.get(r.cls, ())]


def _receptacle_cls(thor_id: str) -> str:
    parts = thor_id.split("|")
    return parts[-1] if len(parts) == 5 else parts[0]  # Sink|x|y|z|SinkBasin -> SinkBasin


def _grid(pose) -> tuple[int, int, int, int]:
    x, z, rot, hor = pose
    return round(x / C.AGENT_STEP_SIZE), round(z / C.AGENT_STEP_SIZE), int(rot), int(hor)


@functools.cache
def load_scene(floorplan: int) -> Scene:
    """The fixed room of one floor plan (cached)."""
    openable = json.loads((LAYOUTS / f"FloorPlan{floorplan}-openable.json").read_text())
    present = set(json.loads((LAYOUTS / f"FloorPlan{floorplan}-objects.json").read_text()))
    entries = [(tid, _receptacle_cls(tid), _grid(pose)) for tid, pose in sorted(openable.items())]
    entries = [e for e in entries if e[1] in STATIC_RECEPTACLES and e[1] in C.VAL_RECEPTACLE_OBJECTS]
    have = {cls for _, cls, _ in entries}
    missing = sorted(
        c for c in present if c in STATIC_RECEPTACLES and c in C.VAL_RECEPTACLE_OBJECTS and c not in have
    )
    for k, cls in enumerate(missing):
        # Synthetic THOR id and pose: fixed per floor plan, away from the real ones.
        x, z = -(k + 1) * 0.75, 3.0 + 0.25 * k
        tid = f"{cls}|{x:+06.2f}|+00.90|{z:+06.2f}"
        if cls == "SinkBasin":
            tid = f"Sink|{x:+06.2f}|+00.90|{z:+06.2f}|SinkBasin"
        entries.append((tid, cls, _grid((x, z, 90, 30))))
    used: set[tuple[int, int, int, int]] = set()
    receptacles = []
    for tid, cls, (x, z, rot, hor) in entries:
        while (x, z, rot, hor) in used:  # stacked drawers share a pose in THOR: one location each
            x += 1
        used.add((x, z, rot, hor))
        receptacles.append(Receptacle(tid, cls, f"loc|{x}|{z}|{rot}|{hor}"))
    objects = tuple(sorted(c for c in present if c in PICKUPABLE))
    objects = tuple(
        c for c in objects if any(c in C.VAL_RECEPTACLE_OBJECTS.get(r.cls, ()) for r in receptacles)
    )
    stands = [r for r in receptacles if r.cls in LAMP_STANDS]
    toggles = tuple(t for t in TOGGLES if t in present and stands)
    return Scene(floorplan, tuple(receptacles), objects, toggles)
