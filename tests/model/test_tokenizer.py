"""Tokenizer: round trips, special ids, the exact LLaMA-3 chat string, and HF's chat-template ids.

Templates of other checkpoints (ChatML, config files, save_pretrained) are in test_chat_template.py.
"""

import pytest

from singleturn.model.tokenizer import SPECIAL_TOKENS, ChatTemplateError, Tokenizer, train_tokenizer

CORPUS = [
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a drawer 2.",
    "Your task is to: put a clean apple in fridge.",
    "go to cabinet 1",
    "take apple 1 from countertop 2",
    "héllo wörld 🙂 \n\n  tabs\there",
] * 40
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "go to cabinet 1"},
]
# HF transformers' LLaMA-3 chat template (meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_ids(tok):
    assert [tok._tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.bos_id, tok.eot_id, tok.eos_ids, tok.pad_id) == (0, 4, (1, 4), 5)
    assert 262 <= tok.vocab_size <= 400


@pytest.mark.parametrize(
    "text",
    ["go to cabinet 1", "héllo wörld 🙂", "  leading and trailing  ", "a\n\nb\tc", "unseen ZQXJ 漢字", ""],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True) == [tok.bos_id, *ids]
    assert tok.decode(tok.encode(text, bos=True)) == text  # bos skipped
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_chat_template_literal(tok):
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\ngo to cabinet 1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.render_chat(MESSAGES, add_generation_prompt=True) == expected
    no_prompt = expected.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.render_chat(MESSAGES, add_generation_prompt=False) == no_prompt
    ids = tok.apply_chat_template(MESSAGES)
    assert ids[:2] == [tok.bos_id, tok._tok.token_to_id("<|start_header_id|>")]
    assert tok.decode(ids, skip_special=False) == expected
    assert tok.decode(ids) == "system\n\nBe brief.user\n\ngo to cabinet 1assistant\n\n"


def test_chat_ids_match_hf_apply_chat_template(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok._tok, bos_token="<|begin_of_text|>", chat_template=LLAMA3_JINJA
    )
    for gen in (True, False):
        ref = hf.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=True)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == list(ref["input_ids"])


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode("take apple 1") == tok.encode("take apple 1")
    assert (again.bos_id, again.eos_ids, again.pad_id) == (tok.bos_id, tok.eos_ids, tok.pad_id)
    assert Tokenizer.from_file(tmp_path).vocab_size == tok.vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_tokenizer_without_template_or_llama3_specials_fails_only_when_chatting():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    bare = Tokenizer(HFTokenizer(models.BPE()))  # loading is fine: it can still encode/decode
    assert bare.eos_ids == () and bare.chat_template is None and not bare.is_llama3
    with pytest.raises(ChatTemplateError, match="no chat template .* not the LLaMA-3 special tokens"):
        bare.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="no eot token"):
        _ = bare.eot_id
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
