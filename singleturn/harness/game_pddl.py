"""The PDDL problem of one generated game: which task a floor plan supports, and the problem text.

A task is one of the six ALFWorld task types in one ALFRED floor plan (`scenes.py`), with the goal
PDDL and sentence templates of `alfworld.gen.goal_library`; the problem places the targets and
distractors in receptacles that accept them (`constants.VAL_RECEPTACLE_OBJECTS`) and states every
fact ALFWorld's domain needs. `games.py` writes it into a game file and checks it with the expert.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import alfworld.gen.constants as C
import alfworld.gen.goal_library as glib

from singleturn.harness import scenes

# The appliance each state-change task needs, and the PDDL constants every problem declares.
_APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
_ACTION_CLASS = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
_CONST_OTYPES = ("KnifeType", "ButterKnifeType")
_CONST_RTYPES = ("SinkBasinType", "MicrowaveType", "FridgeType")


def mangle(thor_id: str) -> str:
    """THOR id -> PDDL name, ALFWorld's way (`-`->`_minus_`, `|`->`_bar_`, ...)."""
    for a, b in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        thor_id = thor_id.replace(a, b)
    return thor_id


def _obj_id(cls: str, rng: random.Random) -> str:
    x, y, z = (rng.uniform(-3, 3) for _ in range(3))
    return f"{cls}|{x:+06.2f}|{abs(y):+06.2f}|{z:+06.2f}"


@dataclass
class Task:
    task_type: str
    floorplan: int
    obj: str
    parent: str  # "" for look_at_obj_in_light
    toggle: str  # "" unless look_at_obj_in_light


def _feasible(task_type: str, scene: scenes.Scene) -> list[Task]:
    """Every (object class, parent/toggle class) this floor plan supports for the task type."""
    out = []
    rclasses = scene.receptacle_classes
    for obj in scene.object_classes:
        starts = {r.cls for r in scene.holders(obj)}
        if task_type == "look_at_obj_in_light":
            out += [Task(task_type, scene.floorplan, obj, "", t) for t in scene.toggles if starts]
            continue
        if task_type in _APPLIANCE:
            if (
                _APPLIANCE[task_type] not in rclasses
                or obj not in C.VAL_ACTION_OBJECTS[_ACTION_CLASS[task_type]]
            ):
                continue
        for parent in sorted(rclasses):
            if obj not in C.VAL_RECEPTACLE_OBJECTS.get(parent, ()) or parent == _APPLIANCE.get(task_type):
                continue
            if not starts - {parent}:  # the target must start outside the parent type
                continue
            out.append(Task(task_type, scene.floorplan, obj, parent, ""))
    return out


def goal_text(task: Task, rng: random.Random) -> str:
    template = rng.choice(glib.gdict[task.task_type]["templates"])
    return template.format(
        obj=task.obj.lower(), recep=task.parent.lower(), toggle=task.toggle.lower(), mrecep=""
    )


def _goal_pddl(task: Task) -> str:
    pddl = glib.gdict[task.task_type]["pddl"].format(
        obj=task.obj, recep=task.parent, toggle=task.toggle, mrecep=""
    )
    return pddl.replace("#", "-")  # the library writes types as '?o # object'


_Placement = tuple[str, str, scenes.Receptacle]  # (object id, class, receptacle)
_ACTION_PREDICATES = (
    ("cleanable", "Cleanable"),
    ("heatable", "Heatable"),
    ("coolable", "Coolable"),
    ("sliceable", "Sliceable"),
)


def build_problem(
    task: Task, scene: scenes.Scene, rng: random.Random, max_distractors: int, name: str
) -> str:
    """The PDDL problem: receptacles and locations of the room, targets, distractors, the goal."""
    placements = _place_objects(task, scene, rng, max_distractors)
    used_locs = {r.location for r in scene.receptacles}
    while True:  # the agent starts where no receptacle is
        agent_loc = f"loc|{rng.randint(-20, 20)}|{rng.randint(-20, 20)}|{rng.choice((0, 90, 180, 270))}|30"
        if agent_loc not in used_locs:
            break
    otypes = {cls for _, cls, _ in placements} | {task.obj} | ({task.toggle} if task.toggle else set())
    rtypes = scene.receptacle_classes | ({task.parent} if task.parent else set())
    objects = _objects(scene, placements, otypes, rtypes, sorted(used_locs | {agent_loc}))
    init = [f"(atLocation agent1 {mangle(agent_loc)})", *_init_facts(scene, placements)]
    for rt in sorted(rtypes):
        for ot in sorted(otypes):
            if ot in C.VAL_RECEPTACLE_OBJECTS.get(rt, ()):
                init.append(f"(canContain {rt}Type {ot}Type)")
    body = "\n        ".join(objects)
    facts = "\n        ".join(init)
    return (
        f"(define (problem {name})\n(:domain alfred)\n(:objects\n        {body}\n        )\n"
        f"(:init\n        {facts}\n        )\n{_goal_pddl(task)}"
    )


def _place_objects(
    task: Task, scene: scenes.Scene, rng: random.Random, max_distractors: int
) -> list[_Placement]:
    """Targets, then distractors, then the task's lamp (if any), each in a receptacle that accepts it."""
    placements: list[_Placement] = []

    def place(cls: str, avoid: str = "") -> None:
        holders = [r for r in scene.holders(cls) if r.cls != avoid]
        placements.append((_obj_id(cls, rng), cls, rng.choice(holders)))

    n_targets = rng.randint(2, 3) if task.task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    for _ in range(n_targets):
        place(task.obj, avoid=task.parent)  # never inside the parent type: the game would be won
    others = [c for c in scene.object_classes if c != task.obj]
    for cls in rng.sample(others, min(len(others), rng.randint(max_distractors // 2, max_distractors))):
        place(cls)
    if task.toggle:
        stand = rng.choice([r for r in scene.receptacles if r.cls in scenes.LAMP_STANDS])
        placements.append((_obj_id(task.toggle, rng), task.toggle, stand))
    return placements


def _objects(scene: scenes.Scene, placements: list[_Placement], otypes, rtypes, locations) -> list[str]:
    """The problem's :objects lines: the agent, object and receptacle types, objects, locations."""
    objects = ["agent1 - agent"]
    objects += [
        f"{t}Type - otype" for t in sorted({f"{c}" for c in otypes}) if f"{t}Type" not in _CONST_OTYPES
    ]
    objects += [f"{t} - otype" for t in _CONST_OTYPES]
    objects += [f"{t}Type - rtype" for t in sorted(rtypes) if f"{t}Type" not in _CONST_RTYPES]
    objects += [f"{t} - rtype" for t in _CONST_RTYPES]
    objects += [f"{mangle(oid)} - object" for oid, _, _ in placements]
    objects += [f"{mangle(r.thor_id)} - receptacle" for r in scene.receptacles]
    objects += [f"{mangle(loc)} - location" for loc in locations]
    return objects


def _init_facts(scene: scenes.Scene, placements: list[_Placement]) -> list[str]:
    """The :init facts of the receptacles and the placed objects (the agent's and canContain aside)."""
    init = []
    for r in scene.receptacles:
        rid = mangle(r.thor_id)
        init += [f"(receptacleType {rid} {r.cls}Type)", f"(receptacleAtLocation {rid} {mangle(r.location)})"]
        if r.cls in C.OPENABLE_CLASS_SET:
            init.append(f"(openable {rid})")
    for oid, cls, r in placements:
        o = mangle(oid)
        init += [
            f"(objectType {o} {cls}Type)",
            f"(inReceptacle {o} {mangle(r.thor_id)})",
            f"(objectAtLocation {o} {mangle(r.location)})",
        ]
        if cls in scenes.TOGGLES:
            init.append(f"(toggleable {o})")
            continue
        init.append(f"(pickupable {o})")
        for pred, group in _ACTION_PREDICATES:
            if cls in C.VAL_ACTION_OBJECTS[group]:
                init.append(f"({pred} {o})")
        if cls in C.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {o})")
    return init


def pick_task(task_type: str, split: str, rng: random.Random) -> Task:
    """A random feasible task of `task_type` in a random floor plan of `split` that supports one."""
    plans = [fp for fp in scenes.SPLIT_FLOORPLANS[split] if _feasible(task_type, scenes.load_scene(fp))]
    fp = rng.choice(plans)
    return rng.choice(_feasible(task_type, scenes.load_scene(fp)))
