"""Entry point: `torchrun --nproc_per_node=N trainer/main.py --config configs/X.toml [--section.key=value ...] [--resume]`.

Parse the config (errors stop here, before any work), initialize the process group (NCCL on CUDA,
gloo on CPU; multi-node is torchrun's job), check what depends on the world size, run the stages
(singleturn/trainer/train.py), tear down. The root's trainer/main.py launches this `main`, with the
repository root on sys.path[0], so everything is imported as `singleturn.x` from this checkout.

Errors a user fixes stop with one line on stderr, printed by local rank 0 only: `config error: ...`
(exit 2) for a bad config, a locked or already-used run directory, a --resume with other settings;
`checkpoint error: ...` (exit 3) when checkpoints exist but none is intact; `non-finite error: ...`
(exit 4) after run.max_nonfinite_steps consecutive non-finite updates (none reached the weights);
`disk full error: ...` (exit 5) when a write finds its filesystem full or over quota (a checkpoint
save names the directory, the bytes needed, what is intact and a remedy). SIGTERM / SIGINT stop the
run at the next step boundary after saving a checkpoint of that step: `stopped: SIGTERM after step
N: saved ...; continue with --resume`, exit 143 / 130 (128 + the signal number;
singleturn/trainer/signals.py). Config checks, the world-size ones included (WORLD_SIZE from
torchrun's environment), run before the process group exists. Under torchrun the worker also writes
the message to TORCHELASTIC_ERROR_FILE, so torchrun's failure summary names it as the root cause;
that summary itself (a Python traceback ending in ChildFailedError, the "Root Cause" table with the
worker's `exitcode`, exit status 1) is printed by the torchrun launcher whenever a worker exits
non-zero, and neither it nor torchrun's exit status can be set from the worker. A single-process run
started as `python trainer/main.py ...` (no torchrun: world size 1) exits with these codes itself.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch

from singleturn.trainer.checkpoint import CheckpointError
from singleturn.trainer.config import ConfigError, parse_args, validate_for_world
from singleturn.trainer.disk_full import DiskFullError, is_disk_full
from singleturn.trainer.dist import destroy, init_distributed
from singleturn.trainer.optim import NonFiniteError
from singleturn.trainer.run_dir import exit_when_parent_dies
from singleturn.trainer.signals import Interrupted
from singleturn.trainer.train import Trainer


def _set_threads(num_threads: int) -> None:
    if num_threads == 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_threads = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(num_threads)


def _fail(kind: str, e: Exception | str, code: int) -> int:
    """Print `kind: message` once per node (local rank 0) and record it for torchrun; return code."""
    msg = f"{kind}: {e}"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(msg if kind == "checkpoint error" else msg.replace("\n", " "), file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each worker
    if error_file:
        info = {"py_callstack": msg, "timestamp": str(int(time.time()))}  # torchrun shows py_callstack
        with open(error_file, "w") as f:
            json.dump({"message": {"message": msg, "extraInfo": info}}, f)
    return code


def main(argv: list[str]) -> int:
    if "LOCAL_RANK" in os.environ:  # a torchrun worker: never outlive the launcher (no orphan training)
        exit_when_parent_dies()
    try:
        cfg = parse_args(argv)
        validate_for_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's; before any work
    except ConfigError as e:
        return _fail("config error", e, 2)
    info = init_distributed()
    try:
        _set_threads(cfg.run.num_threads)
        torch.manual_seed(cfg.run.seed)
        Trainer(cfg, info).train()
    except ConfigError as e:
        return _fail("config error", e, 2)
    except CheckpointError as e:
        return _fail("checkpoint error", e, 3)
    except NonFiniteError as e:
        return _fail("non-finite error", e, 4)
    except DiskFullError as e:
        return _fail("disk full error", e, 5)
    except Interrupted as e:
        return _fail("stopped", e, e.code)
    except Exception as e:  # a full disk met by another writer (metrics, evaluation, export)
        if not is_disk_full(e):
            raise
        return _fail("disk full error", f"{type(e).__name__}: {e} (writing under {cfg.run_dir})", 5)
    finally:
        # Free what a failed run left in reference cycles (its traceback's frames hold the trainer)
        # while the process group exists: freed at interpreter exit instead, after the group, gloo
        # aborts the process ("terminate called without an active exception", SIGABRT) and torchrun
        # reports -6 for that rank instead of its exit code.
        gc.collect()
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
