"""What a run prepares before training: games -> expert states -> tokenizer, and the model.

Default (from-scratch) run, everything cached under data.games_dir and reused when present:
1. `harness.generate_games` for the train split and the held-out eval splits, each in the directory
   keyed by its generation arguments (`harness.generation_dir`): runs sharing data.games_dir with
   other eval_games or eval.max_steps read their own games and never touch each other's;
2. `harness.collect_states` over the train games (the expert's states, one JSONL row per step);
3. `model.train_tokenizer` (byte-level BPE with the LLaMA-3 specials) on the rendered prompts and
   expert actions, so domain words compress to few tokens and prompts stay short;
4. a LLaMA built from the model section's sizes (or an HF checkpoint from model.path).
Only rank 0 generates/collects/trains the tokenizer; the other ranks wait at a barrier and read the
files (paths broadcast), so every rank sees identical data. Every cached file is written under a
name of its own (pid) and renamed into place: concurrent runs never see or clobber a partial one.
A generation that cannot be done (`harness.GenerationError`, e.g. the expert wins no instance of a
game within eval.max_steps) is a ConfigError on every rank.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from singleturn import harness  # its exports load on first use: games import ALFWorld, states do not
from singleturn.harness import read_states
from singleturn.harness.prompts import PROMPT_VERSION
from singleturn.model import LlamaConfig, Tokenizer, Transformer, load_hf_checkpoint, train_tokenizer
from singleturn.trainer.data import prompt_format
from singleturn.trainer.dist import barrier, broadcast_object, is_main
from singleturn.trainer.errors import ConfigError

_WORKERS = max(1, min(4, os.cpu_count() or 1))  # env processes for generation / expert states


@dataclass
class DataArtifacts:
    states_path: str
    tokenizer_path: str
    eval_games: dict[str, list[str]]
    """split -> game files (empty when evaluation is off)."""
    timings: dict[str, float]
    """Seconds per preparation stage on rank 0 (0 when reused)."""


def _timed(timings: dict, name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t0, 2)
    return out


def prepare_data(
    data_cfg, *, model_path: str, need_eval_games: bool, eval_max_steps: int = 50
) -> DataArtifacts:
    """Generate/reuse games and states and train/reuse the tokenizer (rank 0); all ranks get the paths.

    Eval games are drawn so that the handcoded expert wins each within `eval_max_steps` (the episode
    limit): every held-out game is winnable within the evaluation's step budget.
    """
    if data_cfg.states_path and not need_eval_games:  # nothing to generate: ALFWorld is not needed
        GenerationError = ()  # noqa: N806 - `except ()` catches nothing
    else:
        GenerationError = harness.GenerationError  # noqa: N806 - imports ALFWorld

    result, error = None, None
    if is_main():
        try:
            result = _prepare_on_main(
                data_cfg,
                model_path=model_path,
                need_eval_games=need_eval_games,
                eval_max_steps=eval_max_steps,
            )
        except GenerationError as e:
            error = str(e)
    barrier()
    result, error = broadcast_object((result, error))
    if error is not None:
        raise ConfigError(f"data: {error}")
    return result


def _prepare_on_main(
    data_cfg, *, model_path: str, need_eval_games: bool, eval_max_steps: int
) -> DataArtifacts:
    timings: dict[str, float] = {}
    root = Path(data_cfg.games_dir)
    if data_cfg.states_path:
        states_path = Path(data_cfg.states_path)
    else:
        train_games = _timed(
            timings,
            "generate_train_games",
            lambda: harness.generate_games(
                harness.generation_dir(root, "train", data_cfg.train_games, data_cfg.games_seed),
                "train",
                data_cfg.train_games,
                data_cfg.games_seed,
                num_workers=_WORKERS,
            ),
        )
        states_path = root / f"states-train-n{data_cfg.train_games}-s{data_cfg.games_seed}.jsonl"
        if not states_path.exists():
            tmp = _private_tmp(states_path)
            try:
                n = _timed(
                    timings,
                    "collect_states",
                    lambda: harness.collect_states(train_games, tmp, num_workers=_WORKERS),
                )
                os.replace(tmp, states_path)  # atomic: nobody sees a partial states file
            finally:
                tmp.unlink(missing_ok=True)
            print(
                f"[data] collected {n} expert states from {len(train_games)} games -> {states_path}",
                flush=True,
            )
        else:
            timings["collect_states"] = 0.0
    eval_games: dict[str, list[str]] = {}
    if need_eval_games:
        gen_cfg = harness.GenConfig(max_expert_steps=eval_max_steps)
        seed = data_cfg.games_seed + 1
        for split in data_cfg.eval_splits:
            out = harness.generation_dir(root, split, data_cfg.eval_games, seed, config=gen_cfg)
            games = _timed(
                timings,
                f"generate_{split}_games",
                lambda split=split, out=out: harness.generate_games(
                    out, split, data_cfg.eval_games, seed, num_workers=_WORKERS, config=gen_cfg
                ),
            )
            eval_games[split] = [str(g) for g in games]
    if data_cfg.tokenizer_path:
        tok_path = Path(data_cfg.tokenizer_path)
    elif model_path:
        tok_path = Path(model_path) / "tokenizer.json"
    else:
        tok_path = _timed(timings, "train_tokenizer", lambda: _train_tokenizer(states_path, data_cfg, root))
    return DataArtifacts(str(states_path), str(tok_path), eval_games, timings)


def _train_tokenizer(states_path: Path, data_cfg, root: Path) -> Path:
    """Byte-level BPE on the rendered prompts + expert actions (cached by states hash and vocab)."""
    digest = hashlib.sha256(Path(states_path).read_bytes()).hexdigest()[:12]
    sys_tag = "" if data_cfg.system_prompt else "-nosys"
    name = f"tokenizer-v{data_cfg.vocab_size}-h{data_cfg.history_window}{sys_tag}-p{PROMPT_VERSION}-{digest}.json"
    path = root / name
    if path.exists():
        return path

    texts = []
    for state in read_states(states_path):
        texts.extend(m["content"] for m in prompt_format(data_cfg).messages(state))
        texts.append(state["expert_action"])
    tok = train_tokenizer(texts, data_cfg.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_tmp(path)
    try:
        tok.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _private_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process uses (two runs sharing data.games_dir
    may build the same file at once: each writes its own, the last rename wins, both are whole)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def load_tokenizer(path: str):
    return Tokenizer.from_file(path)


def build_model(model_cfg, *, tokenizer, device: torch.device):
    """(Transformer in fp32 on `device`, LlamaConfig): from model.path, or from scratch with init_seed."""
    if model_cfg.path:
        model, cfg = load_hf_checkpoint(model_cfg.path, device=device, dtype=torch.float32)
        return model, cfg
    eos = sorted({tokenizer.eot_id, *(getattr(tokenizer, "eos_ids", ()) or ())})
    cfg = LlamaConfig(
        dim=model_cfg.dim,
        n_layers=model_cfg.n_layers,
        n_heads=model_cfg.n_heads,
        n_kv_heads=model_cfg.n_kv_heads,
        vocab_size=tokenizer.vocab_size,
        ffn_dim=model_cfg.ffn_dim,
        rope_theta=model_cfg.rope_theta,
        max_seq_len=model_cfg.max_seq_len,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        bos_id=tokenizer.bos_id,
        eos_ids=tuple(eos),
    )
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty replaces the meta parameters, which breaks the tie
    model.init_buffers(device)
    model.init_weights(seed=model_cfg.init_seed)
    return model, cfg


def num_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
