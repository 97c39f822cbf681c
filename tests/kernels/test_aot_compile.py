"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90), without a GPU.

The interpreter (how the rest of the suite runs Triton on CPU) accepts code that the compiler
rejects, so CI compiles each kernel with `triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32))`
in the configurations it runs with on an H100 (bf16 and fp32, the autotune block sizes / num_warps /
num_stages). TRITON_INTERPRET is read at decoration time, so the compile runs in a subprocess with it
removed. Default: the first autotune config per kernel; the slow test compiles all of them.
"""

import importlib
import os
import subprocess
import sys
import time

import pytest

# Pointer / scalar types per argument of each kernel; "DT" is the input dtype (bf16 or fp32).
_SIGNATURES = {
    "_token_logprobs_fwd_kernel": dict(
        h_ptr="*DT",
        w_ptr="*DT",
        tgt_ptr="*i64",
        lse_part_ptr="*fp32",
        mu_part_ptr="*fp32",
        z_tgt_ptr="*fp32",
        N="i32",
        V="i32",
        D="i32",
        v_split="i32",
        ignore_index="i32",
        inv_temp="fp32",
    ),
    "_token_logprobs_dlogits_kernel": dict(
        h_ptr="*DT",
        w_ptr="*DT",
        tgt_ptr="*i64",
        lse_ptr="*fp32",
        g_ptr="*fp32",
        dz_ptr="*DT",
        N="i32",
        V="i32",
        D="i32",
        v_start="i32",
        v_chunk="i32",
        ignore_index="i32",
        inv_temp="fp32",
    ),
    "_token_logprobs_dhidden_kernel": dict(
        dz_ptr="*DT", w_ptr="*DT", dh_ptr="*fp32", N="i32", D="i32", v_start="i32", v_chunk="i32"
    ),
    "_token_logprobs_dweight_kernel": dict(
        dz_ptr="*DT", h_ptr="*DT", dw_ptr="*DT", N="i32", D="i32", v_start="i32", v_chunk="i32"
    ),
}


def _compile_all(all_configs: bool) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from singleturn.kernels import _token_logprobs_kernels as K

    GA = importlib.import_module(
        "singleturn.kernels.group_advantages"
    )  # modules: the package exports the functions
    GL = importlib.import_module("singleturn.kernels.grpo_loss")

    target = GPUTarget("cuda", 90, 32)
    blocks = {
        "_token_logprobs_fwd_kernel": (K.FWD_BLOCKS, K._FWD_NAMES, dict(COMPUTE_ENTROPY=True)),
        "_token_logprobs_dlogits_kernel": (K.FWD_BLOCKS, K._FWD_NAMES, {}),
        "_token_logprobs_dhidden_kernel": (K.DHIDDEN_BLOCKS, K._DH_NAMES, dict(ACCUMULATE=True)),
        "_token_logprobs_dweight_kernel": (K.DWEIGHT_BLOCKS, K._DW_NAMES, {}),
    }
    jobs = []
    for name, sig in _SIGNATURES.items():
        configs, names, extra = blocks[name]
        for dtype, kind in (("bf16", "16bit"), ("fp32", "fp32")):
            for cfg in configs[kind] if all_configs else configs[kind][:1]:
                consts = dict(zip(names, cfg[:3]), UPCAST=False, IEEE_DOT=dtype == "fp32", **extra)
                signature = {k: v.replace("DT", dtype) for k, v in sig.items()}
                jobs.append((getattr(K, name), signature, consts, dict(num_warps=cfg[3], num_stages=cfg[4])))
    grpo_sig = dict(
        logp_ptr="*fp32",
        old_ptr="*fp32",
        adv_ptr="*fp32",
        ref_ptr="*fp32",
        tgt_ptr="*i64",
        loss_ptr="*fp32",
        dlogp_ptr="*fp32",
        clipped_ptr="*fp32",
        ratio_ptr="*fp32",
        kl_ptr="*fp32",
        N="i32",
        ignore_index="i32",
        eps_lo="fp32",
        eps_hi="fp32",
        kl_coef="fp32",
        clamp_val="fp32",
    )
    jobs.append((GL._grpo_loss_fwd_kernel, grpo_sig, dict(HAS_REF=True, BLOCK=1024), dict(num_warps=4)))
    adv_sig = dict(r_ptr="*fp32", adv_ptr="*fp32", num_groups="i32", group_size="i32", eps="fp32")
    jobs.append(
        (
            GA._group_advantages_kernel,
            adv_sig,
            dict(SCALE_STD=True, BLOCK_B=64, BLOCK_G=64),
            dict(num_warps=4),
        )
    )
    for fn, sig, consts, options in jobs:
        full_sig = {**sig, **{k: "constexpr" for k in consts}}
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn, full_sig, constexprs=consts), target=target, options=options)
        assert compiled.asm.get("cubin"), f"{fn.__name__} {consts}: no cubin"
        if "IEEE_DOT" in consts and not consts["IEEE_DOT"]:  # bf16 GEMM tiles must use Hopper's wgmma
            assert "wgmma" in compiled.asm["ptx"], f"{fn.__name__} {consts}: no wgmma in the PTX"
        print(f"compiled {fn.__name__} {consts} {options} in {time.perf_counter() - t0:.1f}s")


def _run_in_subprocess(all_configs: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import runpy; runpy.run_path({__file__!r})['_compile_all']({all_configs})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"AOT compile for sm_90 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def test_kernels_compile_for_hopper():
    _run_in_subprocess(all_configs=False)


@pytest.mark.slow
def test_all_autotune_configs_compile_for_hopper():
    _run_in_subprocess(all_configs=True)
