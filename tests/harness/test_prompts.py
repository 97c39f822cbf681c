"""render_prompt / parse_action: the one prompt format and the action parser (round trips, edge cases)."""

import pytest

from singleturn.harness import parse_action, render_prompt
from singleturn.harness.prompts import SYSTEM_PROMPT, clean_observation

ADMISSIBLE = ["go to cabinet 1", "go to countertop 2", "take mug 1 from countertop 2", "look", "inventory"]
INTRO = (
    "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, "
    "you see a cabinet 1, and a countertop 2.\n\nYour task is to: put a clean mug in cabinet."
)


def _state(history=(), observation="You arrive at countertop 2. On the countertop 2, you see a mug 1."):
    return {
        "game": "g",
        "task_type": "pick_clean_then_place_in_recep",
        "step": len(history),
        "goal": "put a clean mug in cabinet",
        "history": [list(h) for h in history],
        "observation": observation,
        "admissible": ADMISSIBLE,
        "expert_action": "take mug 1 from countertop 2",
    }


@pytest.mark.parametrize("action", ADMISSIBLE)
def test_round_trip_every_admissible_action(action):
    assert parse_action(action, ADMISSIBLE) == action
    assert parse_action(f"I should do this.\nAction: {action}", ADMISSIBLE) == action


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Take   Mug 1 FROM countertop 2 \n", "take mug 1 from countertop 2"),  # case + whitespace
        ("GO TO CABINET 1.", "go to cabinet 1"),  # trailing period
        (
            "The mug is here, so I pick it up.\nAction: take mug 1 from countertop 2",
            "take mug 1 from countertop 2",
        ),
        ("Thought: first look.\naction:   look  ", "look"),  # lower-case marker
        ("Action: go to cabinet 1\nAction: look", "look"),  # the last 'Action:' wins
        ("Action: `go to countertop 2`", "go to countertop 2"),  # code quotes
        ('"inventory"', "inventory"),
        ("> look", "look"),  # transcript prompt marker
        ("Action:\n\n  go to cabinet 1\nbecause it is closest", "go to cabinet 1"),  # first non-empty line
    ],
)
def test_parse_normalizes(text, expected):
    assert parse_action(text, ADMISSIBLE) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n ",
        None,
        "go to cabinet 7",
        "Action: fly away",
        "take mug 1",
        "Action:",
        "look around the room",
    ],
)
def test_parse_rejects_empty_and_inadmissible(text):
    assert parse_action(text, ADMISSIBLE) is None


def test_parse_returns_admissible_spelling():
    # The env matches commands exactly: the parser must hand back the admissible string itself.
    adm = ["go to  Shelf 1"]
    assert parse_action("go to shelf 1", adm) == "go to  Shelf 1"


def test_render_prompt_structure():
    msgs = render_prompt(_state())
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert user.startswith("Your task is to: put a clean mug in cabinet.")
    assert "Observation: You arrive at countertop 2. On the countertop 2, you see a mug 1." in user
    assert user.endswith("Admissible actions: " + ", ".join(ADMISSIBLE))
    assert "Recent turns" not in user  # no history yet


def test_render_prompt_history_window():
    history = [(INTRO, "look"), ("obs one", "go to cabinet 1"), ("obs two", "go to countertop 2")]
    user = render_prompt(_state(history), history_window=2)[1]["content"]
    assert "Action: look" not in user and "obs one" in user and "obs two" in user
    assert user.index("obs one") < user.index("Action: go to cabinet 1") < user.index("obs two")
    user0 = render_prompt(_state(history), history_window=0)[1]["content"]
    assert "Recent turns" not in user0 and "obs two" not in user0
    # The intro is shown without the banner and without repeating the task sentence.
    first = render_prompt(_state(observation=INTRO))[1]["content"]
    assert "Welcome" not in first and first.count("Your task is to") == 1


def test_render_then_parse_expert_action_round_trip():
    state = _state()
    response = (
        f"Reasoning about {render_prompt(state)[1]['content'][:20]}...\nAction: {state['expert_action']}"
    )
    assert parse_action(response, state["admissible"]) == state["expert_action"]


def test_clean_observation():
    assert clean_observation(INTRO) == (
        "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, and a countertop 2."
    )


def test_render_prompt_memory_lines():
    history = [
        (INTRO, "look"),
        ("You are in the middle of a room.", "go to cabinet 1"),
        ("You arrive at cabinet 1. On the cabinet 1, you see a mug 1.", "take mug 1 from cabinet 1"),
    ]
    user = render_prompt(_state(history), history_window=1)[1]["content"]
    lines = user.splitlines()
    # The room list scrolled out of the shown turns: it lives on as Visited + Not visited, in order.
    assert lines[1:4] == ["Visited: cabinet 1", "Not visited: countertop 2", "Holding: mug 1"]
    assert "Room:" not in user and "you see a cabinet 1" not in user
    history += [
        ("You pick up the mug 1 from the cabinet 1.", "go to countertop 2"),
        ("You arrive at countertop 2.", "go to cabinet 1"),  # a revisit is listed once
    ]
    lines = render_prompt(_state(history), history_window=1)[1]["content"].splitlines()
    assert lines[1:4] == ["Visited: cabinet 1, countertop 2", "Not visited: nothing left", "Holding: mug 1"]
    # Putting the object down empties the hands; the memory comes before the recent turns.
    put = history + [("You arrive at cabinet 1.", "move mug 1 to cabinet 1")]
    user = render_prompt(_state(put), history_window=1)[1]["content"]
    assert "Holding: nothing" in user and user.index("Holding:") < user.index("Recent turns")


def test_render_prompt_memory_edges():
    # No history: no memory lines at all (the observation itself is the room).
    assert "Visited" not in render_prompt(_state(observation=INTRO))[1]["content"]
    user = render_prompt(_state([(INTRO, "look")]), history_window=3)[1]["content"]
    assert "Visited: nothing yet\nNot visited: cabinet 1, countertop 2\nHolding: nothing" in user
    # Window 0: the memory carries the episode on its own.
    user = render_prompt(_state([(INTRO, "look"), ("o", "go to cabinet 1")]), history_window=0)[1]["content"]
    assert "Visited: cabinet 1\nNot visited: countertop 2" in user and "Recent turns" not in user
    # A first observation that lists no receptacles comes back whole (Room) once scrolled out.
    bare = [("A quiet room.", "look"), ("o", "go to cabinet 1")]
    user = render_prompt(_state(bare), history_window=1)[1]["content"]
    assert "Room: A quiet room." in user and "Not visited" not in user


def test_room_receptacles_of_a_real_intro():
    from singleturn.harness.prompts import room_receptacles

    intro = (
        "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around "
        "you, you see a armchair 1, a cabinet 4, a drawer 12, a sidetable 2, and a towelholder 1.\n\n"
        "Your task is to: put a cloth in sinkbasin."  # the task's 'a cloth' is not a receptacle
    )
    assert room_receptacles(intro) == ["armchair 1", "cabinet 4", "drawer 12", "sidetable 2", "towelholder 1"]
    assert room_receptacles("You arrive at cabinet 1.") == []


def test_episode_memory_matches_a_real_expert_episode():
    from singleturn.harness.prompts import episode_memory

    actions = ["look", "go to toilet 1", "take cloth 2 from toilet 1", "go to sinkbasin 1"]
    visited, holding = episode_memory([("obs", a) for a in actions])
    assert visited == ["toilet 1", "sinkbasin 1"] and holding == "cloth 2"
    visited, holding = episode_memory([("obs", a) for a in actions + ["move cloth 2 to sinkbasin 1"]])
    assert holding is None


def test_render_prompt_without_system_message():
    state = _state([(INTRO, "look"), ("o", "go to cabinet 1")])
    full = render_prompt(state, 1)
    bare = render_prompt(state, 1, system_prompt=False)
    assert bare == full[1:] and bare[0]["role"] == "user"
