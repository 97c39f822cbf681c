"""Launcher: `torchrun --standalone --nproc_per_node=N trainer/main.py --config configs/X.toml [...]`.

The trainer lives in the `singleturn` package (`singleturn/trainer/main.py`; docs there). This file
keeps the launch command users know. Python puts this folder on sys.path[0]; it is replaced by the
repository root so that `singleturn` resolves to this checkout whether or not it is installed, and
this folder (no `__init__.py`: not a package) never shadows anything.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from singleturn.trainer.main import main

    sys.exit(main(sys.argv[1:]))
