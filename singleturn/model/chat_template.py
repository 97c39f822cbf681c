"""A checkpoint's chat template: found where transformers looks for it, rendered the way transformers renders it.

`load_chat_template` reads `chat_template.jinja` or `chat_template` in `tokenizer_config.json` with
transformers' precedence; `render_chat_template` renders it in transformers' sandboxed Jinja
environment with the same variables (the caller tokenizes without adding special tokens).
`LLAMA3_TEMPLATE` is the Jinja form of the LLaMA-3 layout, so a saved tokenizer carries it.
Details: docs/pieces.md (model/).

References: transformers `utils/chat_template_utils.py` (`_compile_jinja_template`, `render_jinja_template`)
and `tokenization_utils_base.py` (`apply_chat_template`, chat template files); Jinja2 sandbox docs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

__all__ = ["ChatTemplateError", "LLAMA3_TEMPLATE", "load_chat_template", "render_chat_template"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template is missing, malformed, or raised while rendering (`raise_exception`)."""


def load_chat_template(directory: str | Path) -> str | None:
    """The default chat template of a checkpoint directory, or None when it has none.

    `chat_template.jinja` takes priority over `tokenizer_config.json["chat_template"]`, as in transformers.
    """
    directory = Path(directory)
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = directory / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ChatTemplateError(f"{config_file}: not a JSON object ({e})") from e
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # legacy multi-template form: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(
                f"{config_file}: chat_template lists templates {sorted(map(str, named))} but none named 'default'"
            )
        return named["default"]
    raise ChatTemplateError(
        f"{config_file}: chat_template must be a string or a list, got {type(template).__name__}"
    )


def render_chat_template(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    **variables,
) -> str:
    """Render `template` over `messages` ([{"role", "content", ...}]) exactly as transformers does.

    `special_tokens` maps template variable names (`bos_token`, `eos_token`, `pad_token`, `unk_token`) to
    token strings; `variables` (e.g. `tools`, `documents`, `enable_thinking`) override them. Errors raised by
    the template itself (`raise_exception(...)`) and Jinja syntax errors become `ChatTemplateError`.
    """
    import jinja2  # optional: the `pretrained` extra (a checkpoint without a template needs none)

    compiled = _compile(template)
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    context.update({"tools": None, "documents": None, **variables})
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


@lru_cache(maxsize=16)
def _compile(template: str):
    # optional: the `pretrained` extra (a checkpoint without a template needs none)
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant spans with it): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes ('<' -> '\u003c'); transformers' does not, and templates rely on it.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
