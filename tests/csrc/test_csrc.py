"""CI checks of csrc/ without a GPU: nvcc compile, binding link + load against CPU torch, host logic.

1. `nvcc -c csrc/sampling.cu` for sm_90a and sm_80 with warnings as errors (host and device).
2. csrc/bindings.cpp compiled with g++ against the CPU wheel's (device-generic) headers and linked
   with that nvcc object and the static CUDA runtime into a .so, loaded with torch.ops.load_library:
   the schema is registered, CPU tensors raise a clear 'no CPU kernel' error, the fake impl gives
   shapes on meta tensors.
3. csrc/sampling_host_test.cpp (g++) runs the shared __host__ __device__ row logic on fixed rows;
   its tokens and log-probs must equal kernels.sampling.sample_tokens_reference row by row.
The builds are cached in build/csrc_ci/<hash of sources and flags>; a cold run takes ~30-50 s.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from singleturn.kernels import _csrc
from singleturn.kernels.sampling import philox_uniform, sample_tokens_reference

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
pytestmark = pytest.mark.skipif(
    NVCC is None or CXX is None, reason="nvcc or a host C++ compiler is not on PATH"
)

NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-Werror",
    "all-warnings",
    "-Xcompiler",
    "-fPIC,-Wall,-Wextra,-Werror",
    "-gencode",
    "arch=compute_90a,code=sm_90a",
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-Xptxas",
    "-v",
]
CXX_FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror"]


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def _cuda_home() -> Path:
    # $CUDA_HOME, else where nvcc lives (nvcc on PATH may be a wrapper script), else /usr/local/cuda.
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        str(Path(NVCC).resolve().parent.parent),
    ]
    for home in [Path(c) for c in candidates if c] + [Path("/usr/local/cuda")]:
        if (home / "lib64" / "libcudart_static.a").exists():
            return home
    pytest.fail(f"no CUDA toolkit with lib64/libcudart_static.a among {candidates + ['/usr/local/cuda']}")


def _run(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate()
    assert proc.returncode == 0, f"{what} failed (rc={proc.returncode}):\n$ {' '.join(proc.args)}\n{out}"
    return out


@pytest.fixture(scope="module")
def artifacts() -> dict[str, Path]:
    """Build (or reuse) sampling.o (nvcc), the binding .so and the host test binary."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    digest = hashlib.sha1()
    for name in sorted(os.listdir(CSRC)):
        digest.update(name.encode() + (CSRC / name).read_bytes())
    digest.update(" ".join(NVCC_FLAGS + CXX_FLAGS + [torch.__version__, str(abi), NVCC, CXX]).encode())
    out = ROOT / "build" / "csrc_ci" / digest.hexdigest()[:16]
    paths = {
        "obj": out / "sampling.o",
        "bind": out / "bindings.o",
        "so": out / "libsingleturn_rl_csrc_cpu.so",
        "host": out / "sampling_host_test",
        "nvcc_log": out / "nvcc.log",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    for stale in out.parent.glob("*"):  # builds of older sources
        shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tdir = _torch_dir()
    inc = ["-isystem", str(tdir / "include"), "-isystem", str(tdir / "include/torch/csrc/api/include")]
    # The three compiles are independent: run them side by side.
    jobs = [
        (
            _run([NVCC, "-c", str(CSRC / "sampling.cu"), "-o", str(paths["obj"]), *NVCC_FLAGS]),
            "nvcc sampling.cu",
        ),
        (
            _run(
                [
                    CXX,
                    *CXX_FLAGS,
                    "-fPIC",
                    f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                    *inc,
                    f"-I{CSRC}",
                    "-c",
                    str(CSRC / "bindings.cpp"),
                    "-o",
                    str(paths["bind"]),
                ]
            ),
            "g++ bindings.cpp",
        ),
        (
            _run(
                [CXX, *CXX_FLAGS, f"-I{CSRC}", str(CSRC / "sampling_host_test.cpp"), "-o", str(paths["host"])]
            ),
            "g++ sampling_host_test.cpp",
        ),
    ]
    logs = [_wait(proc, what) for proc, what in jobs]
    paths["nvcc_log"].write_text(logs[0])  # ptxas -v: registers, spills, one entry per kernel and arch
    # The static CUDA runtime resolves the nvcc object's cudart calls and loads libcuda only on first use,
    # so the library loads on a machine without a driver.
    link = [
        CXX,
        "-shared",
        "-o",
        str(paths["so"]),
        str(paths["bind"]),
        str(paths["obj"]),
        f"-L{tdir / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        f"-Wl,-rpath,{tdir / 'lib'}",
        f"-L{_cuda_home() / 'lib64'}",
        "-l:libcudart_static.a",
        "-ldl",
        "-lpthread",
        "-lrt",
    ]
    _wait(_run(link), "link of the binding against CPU torch")
    return paths


@pytest.fixture(scope="module")
def op_library(artifacts):
    # On a GPU machine the real extension (kernels/_csrc.py) owns the namespace; a second library
    # registering `singleturn_rl` in the same process would be rejected.
    if torch.cuda.is_available():
        assert _csrc.load(), "the CUDA extension did not build"
    elif not _csrc.op_registered():
        torch.ops.load_library(str(artifacts["so"]))
    _csrc.register_fakes()
    return torch.ops.singleturn_rl


def test_nvcc_compiled_every_kernel_for_sm90a_and_sm80(artifacts):
    log = artifacts["nvcc_log"].read_text()
    for arch in ("sm_90a", "sm_80"):
        for dtype in ("IfE", "INS_4Bf16E"):  # the fp32 and bf16 instantiations (mangled)
            assert any(
                f"sample_tokens_kernel{dtype}" in ln and f"'{arch}'" in ln for ln in log.splitlines()
            ), f"no {dtype} kernel compiled for {arch} in the ptxas log:\n{log}"


def test_schema_registered(op_library):
    schema = str(op_library.sample_tokens.default._schema)
    assert schema == (
        "singleturn_rl::sample_tokens(Tensor logits, float temperature, float top_p, int top_k, int seed, "
        "int offset) -> (Tensor tokens, Tensor logprobs)"
    ), schema


def test_cpu_tensors_raise_no_cpu_kernel(op_library):
    with pytest.raises(RuntimeError, match="has no CPU kernel"):
        op_library.sample_tokens(torch.randn(2, 37), 1.0, 1.0, 0, 0, 0)


def test_fake_impl_shapes(op_library):
    tokens, logprobs = op_library.sample_tokens(torch.empty(5, 1003, device="meta"), 0.7, 0.9, 20, 1, 2)
    assert tokens.shape == (5,) and tokens.dtype == torch.int64, (tokens.shape, tokens.dtype)
    assert logprobs.shape == (5,) and logprobs.dtype == torch.float32, (logprobs.shape, logprobs.dtype)


def test_philox_known_answer():
    # Random123 known-answer vector: key = 0, counter = 0 -> first word 0x6627e8d5.
    assert philox_uniform(0, 0, 1)[0].item() == (0x6627E8D5 + 0.5) / 2**32


def test_host_pure_functions_are_exact(artifacts):
    """draw_target, top_p_need, mass_shift_for_vocab, philox_word0 vs exact Python arithmetic / the reference."""
    g = torch.Generator().manual_seed(0)
    rand64 = lambda: (
        int(torch.randint(0, 2**62, (1,), generator=g)) * 2 + int(torch.randint(0, 2, (1,), generator=g))
    )
    lines, want = ["units"], []
    for x0 in (0, 1, 2**31, 2**32 - 1, 0x6627E8D5):
        for z in (1, 2, 2**46, 128256 * 2**46 - 12345, 2**63 - 1):
            lines.append(f"draw {x0} {z}")
            want.append(((2 * x0 + 1) * z) >> 33)  # floor(u * z), u = (x0 + 0.5) / 2^32
    for top_p in (1e-9, 0.5, 0.9, 0.95, 0.999999, 1.0):
        for total in (1, 3, 2**46 + 1, 2**62 + 12345):
            lines.append(f"need {top_p!r} {total}")
            want.append(min(total, max(1, math.ceil(top_p * float(total)))))
    for vocab in (1, 2, 37, 1003, 128256, 151936, 2**20, 2**31 - 1):
        lines.append(f"shift {vocab}")
        want.append(min(52, 63 - vocab.bit_length()))
        assert vocab * 2 ** min(52, 63 - vocab.bit_length()) < 2**63  # the row's total mass fits
    for _ in range(4):
        seed, offset = rand64(), rand64()
        u = philox_uniform(seed, offset, 10_000)
        for row in (0, 1, 4097, 9999):
            lines.append(f"philox {seed} {offset} {row}")
            want.append(int(u[row].item() * 2**32 - 0.5))
    proc = subprocess.run([str(artifacts["host"])], input="\n".join(lines), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = [int(v) for v in proc.stdout.split()]
    mismatches = [(ln, g_, w) for ln, g_, w in zip(lines[1:], got, want) if g_ != w]
    assert len(got) == len(want) and not mismatches, mismatches[:5]


# (name, dtype, B, V, temperature, top_p, top_k, seed, offset, logits builder)
def _randn(B, V, g, scale=3.0):
    return torch.randn(B, V, generator=g) * scale


def _ties(B, V, g):
    return torch.randint(-3, 4, (B, V), generator=g).float()  # few distinct values: ties at every boundary


def _masked(B, V, g):
    x = torch.randn(B, V, generator=g) * 2.0
    x[:, ::3] = float("-inf")  # padded / banned tokens
    return x


def _peaked(B, V, g):
    x = torch.randn(B, V, generator=g)
    x[:, 7] += 12.0  # nearly a point mass
    return x


CASES = [
    ("plain", torch.float32, 32, 1003, 1.0, 1.0, 0, 0, 0, _randn),
    ("temperature", torch.float32, 32, 1003, 0.7, 1.0, 0, 1, 5, _randn),
    ("top_p", torch.float32, 32, 1003, 1.0, 0.9, 0, 2, 0, _randn),
    ("top_k", torch.float32, 32, 1003, 1.0, 1.0, 50, 3, 1, _randn),
    ("top_k_top_p", torch.float32, 32, 1003, 1.3, 0.8, 20, 4, 2, _randn),
    ("bf16", torch.bfloat16, 32, 1003, 0.9, 0.95, 0, 5, 3, _randn),
    ("bf16_top_k", torch.bfloat16, 32, 37, 1.0, 1.0, 5, 6, 4, _randn),
    ("greedy", torch.float32, 8, 1003, 0.0, 1.0, 0, 7, 0, _ties),
    ("ties_top_k", torch.float32, 32, 37, 1.0, 1.0, 5, 8, 0, _ties),
    ("ties_top_p", torch.float32, 32, 37, 1.0, 0.5, 0, 9, 0, _ties),
    ("ties_both", torch.float32, 32, 37, 0.8, 0.6, 9, 10, 0, _ties),
    ("masked", torch.float32, 32, 1003, 1.0, 0.95, 40, 11, 0, _masked),
    ("peaked_top_p", torch.float32, 16, 1003, 1.0, 0.5, 0, 12, 0, _peaked),
    ("top_k_ge_vocab", torch.float32, 4, 37, 1.0, 1.0, 37, 13, 0, _randn),
    ("vocab_1", torch.float32, 4, 1, 1.0, 0.5, 1, 14, 0, _randn),
    ("big_seed_offset", torch.float32, 16, 1003, 1.0, 0.9, 0, 2**40 + 5, 2**33 + 7, _randn),
    ("llama_vocab", torch.bfloat16, 2, 128256, 1.0, 0.95, 0, 15, 0, _randn),
    ("llama_vocab_top_k", torch.float32, 2, 128256, 0.6, 1.0, 64, 16, 9, _randn),
]


def _bits(x: torch.Tensor) -> list[int]:
    if x.dtype == torch.float32:
        return x.view(torch.int32).flatten().tolist()
    return x.view(torch.int16).flatten().tolist()


@pytest.fixture(scope="module")
def host_results(artifacts):
    """Run every case through the host binary once; {case name: (tokens, logprobs, logits)}."""
    lines, logits_by_case = [str(len(CASES))], {}
    for i, (name, dtype, B, V, T, top_p, top_k, seed, offset, build) in enumerate(CASES):
        logits = build(B, V, torch.Generator().manual_seed(1000 + i)).to(dtype)
        logits_by_case[name] = logits
        lines.append(f"{0 if dtype == torch.float32 else 1} {B} {V} {T!r} {top_p!r} {top_k} {seed} {offset}")
        mask = 0xFFFFFFFF if dtype == torch.float32 else 0xFFFF
        lines.append(" ".join(str(b & mask) for b in _bits(logits)))
    proc = subprocess.run([str(artifacts["host"])], input="\n".join(lines), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows: dict[str, list[tuple[int, float]]] = {name: [] for name, *_ in CASES}
    for line in proc.stdout.splitlines():
        case, _row, token, logp, *_ = line.split()
        rows[CASES[int(case)][0]].append((int(token), float(logp)))
    return {
        name: (torch.tensor([t for t, _ in r]), torch.tensor([lp for _, lp in r]), logits_by_case[name])
        for name, r in rows.items()
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_host_logic_matches_reference(host_results, case):
    name, _dtype, B, V, T, top_p, top_k, seed, offset, _ = case
    tokens, logprobs, logits = host_results[name]
    ref_tokens, ref_logprobs = sample_tokens_reference(
        logits, temperature=T, top_p=top_p, top_k=top_k, seed=seed, offset=offset
    )
    assert tokens.shape == (B,), f"{name}: host printed {tokens.shape[0]} rows, expected {B}"
    bad = (tokens != ref_tokens).nonzero().flatten().tolist()
    assert not bad, (
        f"{name}: tokens differ at rows {bad}: host {tokens[bad].tolist()} ref {ref_tokens[bad].tolist()}"
    )
    err = (logprobs - ref_logprobs).abs()
    assert err.max() <= 1e-5, f"{name}: logprob error {err.max():.3g} at row {err.argmax().item()}"
    if V > 1 and T > 0:
        assert tokens.unique().numel() > 1 or name.startswith("peaked"), (
            f"{name}: every row drew the same token"
        )


@pytest.mark.slow
def test_host_logic_fuzz(artifacts):
    """200 random configurations (V from 1 to 5000, ties, -inf masks, wide logits, extreme top_p / top_k)."""
    rng, cases = torch.Generator().manual_seed(123), []
    pick = lambda options: options[int(torch.randint(0, len(options), (1,), generator=rng))]
    for _ in range(200):
        V = pick([1, 2, 3, 7, 37, 100, 1003, 5000])
        kind, scale = pick(["randn", "ties", "masked"]), pick([0.1, 1.0, 3.0, 10.0, 40.0])
        x = torch.randn(16, V, generator=rng) * scale
        if kind == "ties":
            x = x.round()
        elif kind == "masked":
            x[torch.rand(16, V, generator=rng) < 0.5] = float("-inf")
            x[:, 0] = 0.0
        dtype = pick([torch.float32, torch.bfloat16])
        T, top_p = pick([0.0, 0.3, 0.7, 1.0, 1.5, 3.0]), pick([1.0, 0.99, 0.95, 0.9, 0.5, 0.1, 1e-3])
        top_k = pick([0, 1, 2, 5, 50, V - 1, V, V + 3])
        seed, offset = (
            int(torch.randint(0, 2**62, (1,), generator=rng)),
            int(torch.randint(0, 2**40, (1,), generator=rng)),
        )
        cases.append((dtype, V, T, top_p, max(top_k, 0), seed, offset, x.to(dtype)))
    lines = [str(len(cases))]
    for dtype, V, T, top_p, top_k, seed, offset, x in cases:
        lines.append(f"{0 if dtype == torch.float32 else 1} 16 {V} {T!r} {top_p!r} {top_k} {seed} {offset}")
        lines.append(" ".join(str(b & (0xFFFFFFFF if dtype == torch.float32 else 0xFFFF)) for b in _bits(x)))
    proc = subprocess.run([str(artifacts["host"])], input="\n".join(lines), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = torch.tensor([[float(v) for v in ln.split()[2:4]] for ln in proc.stdout.splitlines()]).view(
        len(cases), 16, 2
    )
    for i, (_dtype, V, T, top_p, top_k, seed, offset, x) in enumerate(cases):
        ref_tokens, ref_logp = sample_tokens_reference(
            x, temperature=T, top_p=top_p, top_k=top_k, seed=seed, offset=offset
        )
        where = f"case {i}: V={V} T={T} top_p={top_p} top_k={top_k}"
        assert torch.equal(got[i, :, 0].long(), ref_tokens), (
            f"{where}: tokens {got[i, :, 0].tolist()} vs {ref_tokens.tolist()}"
        )
        # fp32 scaled logits carry ~ulp(max |x / T|) each (the kernel multiplies by 1/T, the CPU reference divides).
        tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * x.float().abs().nan_to_num(
            0, 0, 0
        ).max().item() / max(T, 1e-30)
        err = (got[i, :, 1] - ref_logp).abs().max().item() if T > 0 else got[i, :, 1].abs().max().item()
        assert err <= tol, f"{where}: logprob error {err:.3g} > {tol:.3g}"


_PREBUILT_PROBE = """
import warnings, torch
from singleturn.kernels import _csrc
torch.cuda.is_available = lambda: True  # the loader's path on a GPU machine; nothing here launches
built = []
_csrc._build_and_load = lambda: built.append(1) or (_ for _ in ()).throw(RuntimeError("no nvcc build here"))
assert not _csrc.op_registered()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ok = _csrc._try_load()
print("RESULT", ok, len(built), [str(x.message) for x in w])
"""


@pytest.mark.parametrize("which", ["good", "missing"])
def test_prebuilt_library_skips_the_build_or_falls_back(artifacts, which, tmp_path):
    # SINGLETURN_RL_PREBUILT: a library built ahead of time loads without a build; a path that does not
    # load warns and the usual build runs (stubbed here to fail: False, the reference fallback).
    so = artifacts["so"] if which == "good" else tmp_path / "nope.so"
    env = {**os.environ, "SINGLETURN_RL_PREBUILT": str(so), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _PREBUILT_PROBE], env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    if which == "good":
        assert line[0].startswith("RESULT True 0 []"), line[0]
    else:
        assert line[0].startswith("RESULT False 1 ") and "did not load" in line[0], line[0]
