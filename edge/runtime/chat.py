"""Chat templates: a model's own Jinja template, rendered the way transformers renders it.

A chat model is trained on conversations laid out one particular way (``<|im_start|>user ...`` for
Qwen, ``[INST] ... [/INST]`` for Mistral, gpt-oss's harmony channels). The layout ships with the
model as a Jinja template: in a GGUF under ``tokenizer.chat_template``, in a Hugging Face folder as
``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``. Templates are code from
whoever published the model, so they run in Jinja's immutable sandbox with exactly the environment
transformers gives them (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that
does not escape HTML, ``raise_exception``, ``strftime_now``, a ``namespace`` that refuses
underscore names): the same messages give the same prompt, byte for byte, as
``tokenizer.apply_chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge.errors import EdgeError, ModelFormatError
from edge.formats.hf import chat_template_parts

ROLES = ("system", "developer", "user", "assistant", "tool")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): rendered as
        its body, as transformers does when it is not collecting the masks."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace without underscore attributes (no way to reach CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")

    class Dict:
        """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace, dict=Dict())
    return env


@lru_cache(maxsize=16)
def _compiled(source: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFormatError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def _plain(value: Any) -> Any:
    """What a template may see: JSON-shaped copies (strings, numbers, lists, dicts), nothing with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):  # pydantic messages (the openai package's types)
        return _plain(value.model_dump(exclude_none=True))
    raise EdgeError(f"chat messages hold JSON values only; got a {type(value).__name__}")


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts, each with a known role; a clear error for anything else."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise EdgeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        m = _plain(m)
        if not isinstance(m, dict) or "role" not in m:
            raise EdgeError(f"message {i} must be a dict with a 'role'; got {m!r:.80}")
        if m["role"] not in ROLES:
            raise EdgeError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append(m)
    return out


class ChatTemplate:
    """A model's chat template and the special-token strings it may refer to.

    >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    ...                  "{% if add_generation_prompt %}<assistant>{% endif %}", origin="example")
    >>> t.render([{"role": "user", "content": "hi"}])
    '<user>hi<assistant>'
    """

    def __init__(self, source: str, *, origin: str, special_tokens: Mapping[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ModelFormatError(f"{origin}: the chat template is empty")
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... as transformers passes them
        _compiled(source)  # a template that does not parse is refused when the model loads

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text for ``messages`` (and ``tools``: JSON schemas), as the model was trained to
        read it; ``add_generation_prompt`` ends it where the assistant's reply begins. Extra keyword
        arguments reach the template as variables (e.g. Qwen3's ``enable_thinking``)."""
        import jinja2

        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return _compiled(self.source).render(messages=check_messages(messages), tools=_plain(tools),
                                                 documents=None, add_generation_prompt=add_generation_prompt,
                                                 **variables)
        except jinja2.TemplateError as e:  # the template's own raise_exception, or a sandbox refusal
            raise EdgeError(f"the chat template ({self.origin}) refused these messages: {e}") from None


def hf_special_tokens(folder: Path) -> dict[str, str]:
    """The special tokens a Hugging Face folder's tokenizer_config.json names, as text."""
    return chat_template_parts(Path(folder))[1]


def hf_chat_template(folder: Path) -> ChatTemplate | None:
    """A Hugging Face folder's chat template (``chat_template.jinja``, else tokenizer_config.json's),
    with the special tokens tokenizer_config.json names; None when it has none."""
    source, specials, origin = chat_template_parts(Path(folder))
    return None if source is None else ChatTemplate(source, origin=origin, special_tokens=specials)


def gguf_special_tokens(model) -> dict[str, str]:
    """bos_token / eos_token as text, from a loaded llama-cpp-python ``LlamaModel``."""
    out = {}
    for key, tid in (("bos_token", model.token_bos()), ("eos_token", model.token_eos())):
        if tid is not None and tid >= 0:
            out[key] = model.token_get_text(tid)
    return out


def gguf_chat_template(model, origin: str) -> ChatTemplate | None:
    """The chat template inside a GGUF (``tokenizer.chat_template``), read through llama.cpp from a
    loaded llama-cpp-python ``LlamaModel`` (vocab-only is enough); None when the file has none."""
    import llama_cpp

    raw = llama_cpp.llama_model_chat_template(model.model, None)
    if not raw:
        return None
    source = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return ChatTemplate(source, origin=f"{origin}: tokenizer.chat_template", special_tokens=gguf_special_tokens(model))
