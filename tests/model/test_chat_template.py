"""Chat templates and special ids from a checkpoint's files, checked against transformers' AutoTokenizer.

Every comparison loads the same directory both ways: `Tokenizer.from_file(dir)` and
`AutoTokenizer.from_pretrained(dir)`, then compares `apply_chat_template` token ids (transformers renders the
template and tokenizes the string without added specials; so must we).
"""

from __future__ import annotations

import json

import pytest

from singleturn.model.chat_template import LLAMA3_TEMPLATE, ChatTemplateError, render_chat_template
from singleturn.model.tokenizer import Tokenizer, train_tokenizer

# SmolLM2-135M-Instruct's template (ChatML with a default system line), as its GGUF ships it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template (tokenizer_config.json).
META_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a drawer 2.",
    "Your task is to: put a clean apple in fridge. go to cabinet 1",
    "system user assistant Be brief. helpful AI assistant named SmolLM",
] * 30
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "go to cabinet 1"}
ASSISTANT = {"role": "assistant", "content": "take apple 1 from countertop 2"}
USER2 = {
    "role": "user",
    "content": "  Nothing happens. \n",
}  # whitespace: Meta's template trims, ours must too
CONVERSATIONS = [[USER], [SYSTEM, USER], [USER, ASSISTANT, USER2], [SYSTEM, USER, ASSISTANT, USER2]]


def _chatml_backend():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=CHATML_SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def write_checkpoint(directory, backend, **files):
    """tokenizer.json + each `name=dict` as name.json (or `chat_template_jinja=str`) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    for name, content in files.items():
        if name == "chat_template_jinja":
            (directory / "chat_template.jinja").write_text(content)
        else:
            (directory / f"{name}.json").write_text(json.dumps(content))
    return directory


def chatml_dir(tmp_path, **config):
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML,
        **config,
    }
    return write_checkpoint(tmp_path / "chatml", _chatml_backend(), tokenizer_config=tok_config)


@pytest.fixture(scope="module")
def llama3_tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def assert_same_chat_ids(ours: Tokenizer, directory):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(directory))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=True, return_dict=True
            )
            got = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert got == list(expected["input_ids"]), (
                f"{[m['role'] for m in messages]}, generation prompt {gen}"
            )


def test_chatml_ids_equal_transformers(tmp_path):
    directory = chatml_dir(tmp_path)
    tok = Tokenizer.from_file(directory)
    assert_same_chat_ids(tok, directory)
    im_start, im_end = (tok._tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.eos_ids) == (
        im_start,
        im_end,
        im_end,
        im_end,
        (im_end,),
    )
    ids = tok.apply_chat_template([USER])
    assert ids[0] == im_start and tok.decode(ids).startswith(
        "system\nYou are a helpful AI"
    )  # template tokens dropped
    assert tok.decode(tok.encode("take apple 1") + [tok.eot_id]) == "take apple 1"
    # The tokenizer.json path alone brings the files beside it too (what the trainer passes).
    assert Tokenizer.from_file(directory / "tokenizer.json").apply_chat_template([USER]) == ids


def test_meta_llama3_template_ids_equal_transformers_and_ids_stay(tmp_path, llama3_tok):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>"}
    config.update(eos_token="<|eot_id|>", chat_template=META_LLAMA3)
    directory = write_checkpoint(tmp_path / "l3", llama3_tok._tok, tokenizer_config=config)
    tok = Tokenizer.from_file(directory)
    assert tok.is_llama3 and tok.chat_template == META_LLAMA3
    assert_same_chat_ids(tok, directory)
    # LLaMA-3 ids are found by name, whatever tokenizer_config calls eos: the same as a bare tokenizer.json.
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.eos_ids) == (0, 1, 4, 5, (1, 4))


def test_llama3_without_template_is_the_builtin_format(tmp_path, llama3_tok):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(
        tokenizer_object=llama3_tok._tok, bos_token="<|begin_of_text|>", chat_template=LLAMA3_TEMPLATE
    )
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=True, return_dict=True
            )
            assert llama3_tok.apply_chat_template(messages, add_generation_prompt=gen) == list(
                expected["input_ids"]
            )
            rendered = render_chat_template(
                LLAMA3_TEMPLATE,
                messages,
                add_generation_prompt=gen,
                special_tokens={"bos_token": "<|begin_of_text|>"},
            )
            assert llama3_tok.render_chat(messages, gen) == rendered


def test_trained_tokenizer_in_a_run_directory_keeps_its_ids(tmp_path, llama3_tok):
    # runs/<name>/final/: tokenizer.json beside the config.json that the trainer writes (eos = eot + eos).
    final = write_checkpoint(
        tmp_path / "final", llama3_tok._tok, config={"bos_token_id": 0, "eos_token_id": [1, 4]}
    )
    again = Tokenizer.from_file(final / "tokenizer.json")
    assert (again.bos_id, again.eos_id, again.eot_id, again.pad_id, again.eos_ids) == (0, 1, 4, 5, (1, 4))
    assert again.apply_chat_template(CONVERSATIONS[-1]) == llama3_tok.apply_chat_template(CONVERSATIONS[-1])


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, kind, llama3_tok):
    tok = Tokenizer.from_file(chatml_dir(tmp_path)) if kind == "chatml" else llama3_tok
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (CHATML if kind == "chatml" else LLAMA3_TEMPLATE)
    again = Tokenizer.from_file(saved)
    assert_same_chat_ids(again, saved)
    for messages in CONVERSATIONS:
        assert again.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert (again.bos_id, again.eot_id, again.eos_ids, again.pad_id) == (
        tok.bos_id,
        tok.eot_id,
        tok.eos_ids,
        tok.pad_id,
    )


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    directory = chatml_dir(tmp_path, chat_template="{{ 'ignored' }}")
    (directory / "chat_template.jinja").write_text(CHATML.replace("SmolLM", "Jinja-file"))
    tok = Tokenizer.from_file(directory)
    assert "Jinja-file" in tok.render_chat([USER])
    assert_same_chat_ids(tok, directory)


def test_list_of_named_templates_uses_default(tmp_path):
    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": CHATML}]
    tok = Tokenizer.from_file(chatml_dir(tmp_path, chat_template=named))
    assert tok.chat_template == CHATML
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        Tokenizer.from_file(chatml_dir(tmp_path, chat_template=named[:1]))


@pytest.mark.parametrize(
    "template, messages",
    [
        (
            "{{ messages | tojson }}{{ messages[0] | tojson(indent=2) }}",
            [{"role": "user", "content": "<b> & 'é'"}],
        ),
        (
            "{% for m in messages %}{{ m.name is defined }}{% endfor %}",
            [{"role": "user", "content": "x", "name": None}],
        ),
        (
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
            "{% for i in range(3) %}{% if i == 1 %}{% break %}{% endif %}{{ i }}{% endfor %}"
            "\n  {% if add_generation_prompt %}\n  {{ eos_token }}{% endif %}\n",
            [{"role": "assistant", "content": "ok"}],
        ),
    ],
    ids=["tojson", "none-dropped", "generation-tag-loopcontrols-trim"],
)
def test_template_features_render_like_transformers(tmp_path, template, messages):
    from transformers import AutoTokenizer

    directory = chatml_dir(tmp_path, chat_template=template)
    expected = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert Tokenizer.from_file(directory).render_chat(messages) == expected


def test_raise_exception_and_bad_syntax_are_chat_template_errors(tmp_path):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user') }}{% endif %}"
    tok = Tokenizer.from_file(
        chatml_dir(tmp_path, chat_template=strict + CHATML)
    )  # loads: the error is the chat's
    with pytest.raises(ChatTemplateError, match="Conversations must start with a user"):
        tok.apply_chat_template([SYSTEM, USER])
    assert tok.apply_chat_template([USER])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", [USER])


def test_no_template_and_no_llama3_specials_fails_at_apply_chat_template(tmp_path):
    directory = chatml_dir(tmp_path, chat_template=None)
    tok = Tokenizer.from_file(directory)
    assert tok.chat_template is None and tok.eot_id == tok.eos_id  # no template: a turn ends at eos
    assert tok.decode(tok.encode("go to cabinet 1")) == "go to cabinet 1"
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([USER])


def test_special_ids_come_from_the_checkpoint_files(tmp_path):
    backend = _chatml_backend()
    endoftext, im_start, im_end = (backend.token_to_id(t) for t in CHATML_SPECIALS)
    # Only config.json + generation_config.json name the ids; the end of turn is what the template writes.
    directory = write_checkpoint(
        tmp_path / "a",
        backend,
        tokenizer_config={"chat_template": CHATML},
        config={"bos_token_id": im_start, "eos_token_id": endoftext},
        generation_config={"eos_token_id": [endoftext, im_end], "pad_token_id": endoftext},
    )
    tok = Tokenizer.from_file(directory)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (im_start, endoftext, im_end, endoftext)
    assert tok.eos_ids == (endoftext, im_end)
    # special_tokens_map.json (AddedToken dicts) when tokenizer_config.json names none.
    special_map = {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": "<|im_start|>"}
    directory = write_checkpoint(
        tmp_path / "b", backend, tokenizer_config={"chat_template": CHATML}, special_tokens_map=special_map
    )
    tok = Tokenizer.from_file(directory)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.eos_ids) == (
        im_start,
        im_end,
        im_end,
        im_end,
        (im_end,),
    )
    # A template whose assistant turn ends without a special token: the turn ends at eos.
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    directory = write_checkpoint(
        tmp_path / "c", backend, tokenizer_config={"chat_template": plain, "eos_token": "<|endoftext|>"}
    )
    assert Tokenizer.from_file(directory).eot_id == endoftext
