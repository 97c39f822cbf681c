"""`dtype = "auto"` (rollout.dtype, fsdp.autocast) picks by capability; explicit settings win."""

import pytest
import torch

from singleturn.model import precision
from singleturn.trainer.config import ConfigError, build_config, parse_args
from singleturn.trainer.config.auto_dtype import resolve_auto_dtypes

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 {extra}
bogomips\t: 4800.00
"""


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("avx512f avx512_bf16", "bfloat16"),
        ("amx_bf16 amx_tile", "bfloat16"),
        ("avx512f", "float32"),
        ("", "float32"),
    ],
)
def test_cpu_choice_follows_the_bf16_flags(tmp_path, extra, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra=extra))
    flags = precision.cpu_flags(info)
    assert "avx2" in flags
    dtype, why = precision.fastest_dtype("cpu", flags=flags)
    assert dtype == expected
    assert ("avx512_bf16" in why or "amx_bf16" in why) if expected == "bfloat16" else "neither" in why


def test_unreadable_flags_probe_or_fall_back(tmp_path, monkeypatch):
    assert precision.cpu_flags(tmp_path / "missing") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    monkeypatch.setattr(precision, "_probe_ms", lambda dtype: 1.0 if dtype == torch.bfloat16 else 2.0)
    assert precision.fastest_dtype("cpu")[0] == "bfloat16"
    monkeypatch.setattr(precision, "_probe_ms", lambda dtype: 3.0 if dtype == torch.bfloat16 else 2.0)
    dtype, why = precision.fastest_dtype("cpu")
    assert dtype == "float32" and "probe" in why
    assert precision.fastest_dtype("cpu", probe=False) == (
        "float32",
        "CPU flags unreadable and no probe allowed",
    )


def test_auto_resolves_both_settings_and_says_why(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    lines = []
    cfg = build_config({"rollout": {"dtype": "auto"}, "fsdp": {"autocast": "auto"}})
    out = resolve_auto_dtypes(cfg, device_type="cpu", world_size=1, log=lambda *a, **k: lines.append(a[0]))
    assert (out.rollout.dtype, out.fsdp.autocast) == ("bfloat16", "bfloat16")
    assert len(lines) == 1 and "avx512_bf16" in lines[0] and "rollout.dtype = bfloat16" in lines[0]
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    out = resolve_auto_dtypes(cfg, device_type="cpu", world_size=1, log=lambda *a, **k: None)
    assert (out.rollout.dtype, out.fsdp.autocast) == ("float32", "none")


def test_explicit_settings_win(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    cfg = build_config({"rollout": {"dtype": "float32"}, "fsdp": {"autocast": "auto"}})
    out = resolve_auto_dtypes(cfg, device_type="cpu", world_size=1, log=lambda *a, **k: None)
    assert (out.rollout.dtype, out.fsdp.autocast) == ("float32", "bfloat16")
    fixed = build_config({"rollout": {"dtype": "bfloat16"}, "fsdp": {"autocast": "none"}})
    assert resolve_auto_dtypes(fixed, device_type="cpu", log=None) is fixed  # nothing to resolve, no print


def test_several_ranks_never_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    monkeypatch.setattr(
        precision, "_probe_ms", lambda dtype: pytest.fail("ranks must not time independently")
    )
    cfg = build_config({"rollout": {"dtype": "auto"}})
    out = resolve_auto_dtypes(cfg, device_type="cpu", world_size=2, log=lambda *a, **k: None)
    assert out.rollout.dtype == "float32"


def test_parse_args_resolves_and_rejects_unknown(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = parse_args(["--rollout.dtype=auto", "--fsdp.autocast=auto"])
    assert (cfg.rollout.dtype, cfg.fsdp.autocast) == ("bfloat16", "bfloat16")
    assert "[dtype] auto:" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="'float32', 'bfloat16' or 'auto'"):
        parse_args(["--rollout.dtype=float16"])
