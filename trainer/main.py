"""Entry point: `torchrun --nproc_per_node=N trainer/main.py --config configs/X.toml [--section.key=value ...] [--resume]`.

Parse the config (errors stop here, before any work), initialize the process group (NCCL on CUDA,
gloo on CPU; multi-node is torchrun's job), check what depends on the world size, run the stages
(trainer/runner.py), tear down. torchrun puts trainer/ on sys.path[0], so everything is imported as
`trainer.x` from the installed package.
"""

from __future__ import annotations

import os
import sys

import torch

from trainer.config import ConfigError, parse_args, validate_for_world
from trainer.dist import destroy, init_distributed


def _set_threads(num_threads: int) -> None:
    if num_threads == 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_threads = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(num_threads)


def main(argv: list[str]) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    info = init_distributed()
    try:
        validate_for_world(cfg, info.world_size)
        _set_threads(cfg.run.num_threads)
        torch.manual_seed(cfg.run.seed)
        from trainer.runner import train

        train(cfg, info)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
