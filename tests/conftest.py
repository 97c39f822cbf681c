"""Suite-wide set-up: Triton kernels run under the interpreter when there is no GPU, and the
cache-free reference policy (`per_state_policy`) the act path is checked against.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it must be set before any
kernels module is imported; a conftest at the tests root runs first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # SINGLETURN_TEST_THREADS=1 lets several test runs share 2 cores without oversubscribing them.
    threads = os.environ.get("SINGLETURN_TEST_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, min(2, os.cpu_count() or 1)))


class PerStatePolicy:
    """The cache-free reference of `model.EpisodePolicy`: a harness text policy (messages, admissible)
    -> texts that encodes each state's whole prompt (`encode_prompt`, cut to the last ids that leave
    room for the state's response) and decodes it with the primitives of model/generate.py: ranking
    by `score_continuations`, trie-constrained or free greedy and sampling by `generate`. Call c
    samples with seed + 7919 c. `last`: the call's (prompt ids, Completion) pairs."""

    wants_admissible = True

    def __init__(self, model, tok, *, decoding, constrained=True, max_len=4096, sampling=None, seed=0):
        self.model, self.tok, self.decoding, self.constrained = model, tok, decoding, constrained
        self.max_len, self.sampling, self.seed = max_len, dict(sampling or {}), seed
        self.calls = self.truncated = 0
        self.last = []

    def __call__(self, batch, admissible):
        from singleturn.model.completion import encode_prompt, prompt_budget, response_room
        from singleturn.model.constrained import action_trie, allowed_tokens_fn
        from singleturn.model.generate import score_continuations
        from singleturn.model.policy import sample_completions

        tok = self.tok
        free = self.decoding == "sample" or not self.constrained
        room = dict(decoding=self.decoding, constrained=self.constrained)
        prompts = []
        for messages, adm in zip(batch, admissible):
            r = response_room(tok, adm, **room, max_new_tokens=self.sampling.get("max_new_tokens", 0))
            ids, cut = encode_prompt(tok, messages, prompt_budget(self.max_len, r))
            self.truncated += cut
            prompts.append(ids)
        seed = (self.seed + 7919 * self.calls) & 0x7FFF_FFFF
        self.calls += 1
        with torch.no_grad():
            if self.decoding == "rank":
                cands = [[tok.encode(a) + [tok.eot_id] for a in adm] for adm in admissible]
                scores = score_continuations(self.model, prompts, cands)
                return [adm[max(range(len(adm)), key=s.__getitem__)] for adm, s in zip(admissible, scores)]
            if free:
                done = sample_completions(self.model, tok, prompts, num_samples=1, seed=seed, **self.sampling)
            else:
                tries = [action_trie(tok, adm) for adm in admissible]
                done = sample_completions(
                    self.model,
                    tok,
                    prompts,
                    num_samples=1,
                    temperature=0.0,
                    seed=0,
                    max_new_tokens=max(t.max_len for t in tries),
                    allowed_tokens=allowed_tokens_fn(tries),
                )
        self.last = list(zip(prompts, done))
        return [c.text for c in done]


@pytest.fixture(scope="session")
def per_state_policy():
    """The class `PerStatePolicy` (tests build it with their own model)."""
    return PerStatePolicy
