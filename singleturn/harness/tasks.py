"""ALFWorld's six task types (torch- and ALFWorld-free: the trainer's tables read them too)."""

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
"""In ALFWorld's order; games are drawn round-robin over them."""

TASK_SHORT = dict(zip(TASK_TYPES, ("pick", "look", "clean", "heat", "cool", "pick2")))
"""Column names of the results tables."""
