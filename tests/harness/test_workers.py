"""EnvPool: batched reset/step match a single env; killed or hung workers are restarted and reported."""

import os
import select
import signal
import time

from singleturn.harness import EnvPool, evaluate
from singleturn.harness.env import AlfredGame
from singleturn.harness.games import expert_episode_seed
from singleturn.trainer.run_dir import RunDirLock


def test_pool_matches_single_env(train_games):
    games = train_games[:3]
    with EnvPool(games, num_workers=2) as pool:
        first = pool.reset([0, 1, 2])
        second = pool.step([r.expert_action for r in first])
        third = pool.step({1: second[1].expert_action})  # a dict steps only the given slots
    assert list(third) == [1]
    for i, g in enumerate(games):
        solo = AlfredGame("handcoded")
        solo.load(g)
        r0 = solo.reset(seed=expert_episode_seed(g))
        r1 = solo.step(r0.expert_action)
        assert (first[i].observation, first[i].admissible, first[i].expert_action) == (
            r0.observation,
            r0.admissible,
            r0.expert_action,
        )
        assert (second[i].observation, second[i].admissible, second[i].won) == (
            r1.observation,
            r1.admissible,
            r1.won,
        )
        assert first[i].task_type == r0.task_type and first[i].goal == r0.goal and not first[i].failed


def test_killed_worker_is_restarted_and_reported(train_games):
    with EnvPool(train_games[:2], num_workers=2) as pool:
        first = pool.reset([0, 1])
        victim = pool.worker_pids()[pool.worker_of(0)]
        os.kill(victim, signal.SIGKILL)
        out = pool.step([first[0].expert_action, first[1].expert_action])
        assert out[0].failed and "died" in out[0].error and out[0].game == str(train_games[0])
        assert not out[1].failed
        assert pool.restarts == 1 and victim not in pool.worker_pids()
        assert pool.failures == [{"slot": 0, "game": str(train_games[0]), "error": out[0].error}]
        # The restarted worker serves new episodes.
        again = pool.reset([0], slots=[0])
        assert not again[0].failed and again[0].admissible


def test_hung_worker_times_out(train_games):
    with EnvPool(train_games[:1], num_workers=1, step_timeout=1.0) as pool:
        first = pool.reset([0])
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)  # hangs: alive, never answers
        out = pool.step([first[0].expert_action])
        assert out[0].failed and "timed out" in out[0].error
        assert pool.restarts == 1 and pool.worker_pids()[0] != pid


def test_worker_killed_mid_episode_counts_as_env_failure(train_games):
    """Evaluate keeps every episode: the one whose worker died is an env failure, the rest play on."""
    games = train_games[:2]
    with EnvPool(games, num_workers=2) as pool:
        calls = {"n": 0}

        def expert_then_kill(batch):
            calls["n"] += 1
            if calls["n"] == 3:  # mid-episode: both episodes have taken two steps
                os.kill(pool.worker_pids()[0], signal.SIGKILL)
            return [""] * len(batch)  # invalid outputs: the episodes run on until max_steps

        report = evaluate(expert_then_kill, games, max_steps=6, pool=pool, batch_size=2)
    assert report.env_failures == 1 and len(report.episodes) == 2
    failed = [e for e in report.episodes if e["failed"]]
    assert len(failed) == 1 and failed[0]["game"] == str(games[0]) and failed[0]["steps"] == 3
    ok = [e for e in report.episodes if not e["failed"]][0]
    assert ok["steps"] == 6 and ok["invalid"] == 6
    assert report.success_rate == 0.0 and report.invalid_action_rate == 1.0


def _trainer_with_a_worker(w: int, run_dir) -> None:
    """A forked stand-in for the trainer: holds the run directory's lock, starts one env worker,
    checks it is serving (so its start-up ran), reports its pid on `w` and waits to be killed.
    The worker inherits `w`: EOF on the pipe's read end means both are gone. Never returns."""
    try:
        RunDirLock(run_dir).acquire()
        pool = EnvPool([], num_workers=1)
        assert pool.step({0: "look"})[0].failed  # answered: no env in that slot, but it serves
        os.write(w, f"{pool.worker_pids()[0]}\n".encode())
        time.sleep(60)
    finally:
        os._exit(0)


def test_workers_of_a_killed_trainer_die_and_never_hold_its_lock(tmp_path):
    """kill -9 of the trainer mid-evaluation (issue 23, fault 2): its env worker, busy in a step
    (stopped here, so it reads no EOF on its pipe), must not keep the run directory locked by a dead
    pid, and must die with the trainer."""
    r, w = os.pipe()
    trainer = os.fork()
    if trainer == 0:
        os.close(r)
        _trainer_with_a_worker(w, tmp_path / "run")
    os.close(w)
    worker = None
    with os.fdopen(r) as out:
        try:
            worker = int(out.readline())
            os.kill(worker, signal.SIGSTOP)
            os.kill(trainer, signal.SIGKILL)
            os.waitpid(trainer, 0)
            RunDirLock(tmp_path / "run").acquire().release()  # refused while a worker holds it
            ready, _, _ = select.select([out], [], [], 20)
            assert ready and out.read() == "", f"env worker {worker} outlived its killed trainer by 20 s"
            worker = None
        finally:
            if worker is not None:
                os.kill(worker, signal.SIGKILL)
