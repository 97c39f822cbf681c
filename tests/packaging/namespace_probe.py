"""Run as a script (`python namespace_probe.py REPO`), from any working directory or under torchrun:
checks that the project's import namespace collides with nothing. Prints one JSON line and exits 0 when
every check passes, 1 otherwise (the JSON names each failure).

(a) the public ops import from `singleturn.kernels` and are callable, and run on a tiny input;
(b) transformers builds, saves and reloads a tiny LLaMA (loading runs its hub-kernels code path, which
    imports Hugging Face's `kernels` when that distribution is installed);
(c) every module imported from this repository is under `singleturn`, and every module named like one
    of ours that a dependency owns (`kernels`, `trainer`, `model`, `harness`) resolves outside it.
"""

import importlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(sys.argv[1]).resolve()
failures: list[str] = []
info: dict = {"cwd": os.getcwd(), "rank": os.environ.get("RANK")}


_ENVS = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}


def _inside(path) -> bool:
    """In this checkout's source, not in an environment that happens to live under it (.venv)."""
    if path is None or not os.path.isabs(path):  # torch.ops / torch.classes carry relative names
        return False
    p = Path(path).resolve()
    return p.is_relative_to(REPO) and not any(p.is_relative_to(e) for e in _ENVS if e.is_relative_to(REPO))


import torch  # noqa: E402

import singleturn  # noqa: E402
import singleturn.harness  # noqa: E402, F401
import singleturn.model  # noqa: E402, F401
import singleturn.trainer.main  # noqa: E402, F401
from singleturn.kernels import group_advantages, grpo_loss, sample_tokens, token_logprobs  # noqa: E402

info["singleturn"] = singleturn.__file__
if not _inside(singleturn.__file__):
    failures.append(f"singleturn imported from {singleturn.__file__}, not from {REPO}")
for name, fn in {
    "token_logprobs": token_logprobs,
    "group_advantages": group_advantages,
    "grpo_loss": grpo_loss,
    "sample_tokens": sample_tokens,
}.items():
    if not callable(fn) or type(fn).__name__ == "module":
        failures.append(f"singleturn.kernels.{name} is {fn!r}, not a function")
h, w = torch.randn(5, 8), torch.randn(11, 8)
t = torch.randint(0, 11, (5,))
ref = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
got = token_logprobs(h, w, t)
if not torch.allclose(got, ref, atol=1e-5, rtol=1e-5):
    failures.append(f"token_logprobs on a 5x8x11 input: {got} != {ref}")

import transformers  # noqa: E402

info["transformers"] = transformers.__version__
cfg = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
with tempfile.TemporaryDirectory() as d:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    hf = transformers.LlamaForCausalLM.from_pretrained(d)
    logits = hf(torch.tensor([[1, 2, 3]])).logits
    if logits.shape != (1, 3, 64) or not torch.isfinite(logits).all():
        failures.append(f"transformers' tiny LLaMA gave logits {tuple(logits.shape)}")

for name, mod in sorted(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if _inside(f) and name not in ("__main__", "__mp_main__") and name.split(".")[0] != "singleturn":
        failures.append(f"module {name!r} was imported from this repository ({f}), outside `singleturn`")
info["hf_kernels_imported_by_transformers"] = "kernels" in sys.modules
for name in ("kernels", "trainer", "model", "harness"):  # generic names other distributions ship
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue  # nobody ships it here and no folder of ours is importable under it
    f = getattr(mod, "__file__", None)  # None: a namespace package, which any regular package outranks
    info[f"import {name}"] = f or f"namespace {list(getattr(mod, '__path__', []))}"
    if _inside(f):
        failures.append(f"`import {name}` gives {f}, inside this repository: it shadows a dependency")
try:
    from importlib.metadata import distribution

    distribution("kernels")  # Hugging Face's hub-kernels library (transformers >= 5.25 requires it)
    info["hf_kernels"] = True
    if not (importlib.util.find_spec("kernels") and not _inside(importlib.util.find_spec("kernels").origin)):
        failures.append("Hugging Face's `kernels` is installed but `import kernels` does not resolve to it")
except ImportError:
    info["hf_kernels"] = False
print(json.dumps({"ok": not failures, "failures": failures[:20], **info}))
sys.exit(1 if failures else 0)
