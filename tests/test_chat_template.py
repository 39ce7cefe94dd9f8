"""Chat templates render as transformers renders them: five published templates (copied from
llama.cpp's models/templates, which takes them from the models' Hugging Face repos; Zephyr's from
its tokenizer_config.json), byte for byte
against ``apply_chat_template``, with and without a system message."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.errors import EdgeError, ModelFormatError
from edge.runtime.chat import ChatTemplate, hf_chat_template

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# the special tokens each model's tokenizer_config.json names
PUBLISHED = {
    "Qwen-Qwen3-0.6B.jinja": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "openai-gpt-oss-120b.jinja": {"bos_token": "<|startoftext|>", "eos_token": "<|return|>"},
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "moonshotai-Kimi-K2.jinja": {"bos_token": "[BOS]", "eos_token": "[EOS]"},  # a MoE model's
    # plain {% %} blocks on lines of their own: trim_blocks decides its layout (also TinyLlama's)
    "HuggingFaceH4-zephyr-7b-beta.jinja": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}
CONVERSATION = [
    {"role": "user", "content": "Écris une fonction qui inverse une liste. 日本語も"},
    {"role": "assistant", "content": "def reverse(xs):\n    return xs[::-1]"},
    {"role": "user", "content": "Now in place, please."},
]
SYSTEM = {"role": "system", "content": "You are a terse coding assistant."}


@pytest.fixture(scope="module")
def hf_tokenizer(default_dir):
    tf = pytest.importorskip("transformers")
    return lambda specials: tf.PreTrainedTokenizerFast(tokenizer_file=str(default_dir / "tokenizer.json"), **specials)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no-gen"])
def test_render_equals_transformers(hf_tokenizer, name, system, add_generation_prompt):
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    messages = ([SYSTEM] if system else []) + CONVERSATION
    theirs = hf_tokenizer(PUBLISHED[name]).apply_chat_template(
        messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = ChatTemplate(source, origin=name, special_tokens=PUBLISHED[name]).render(
        messages, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert "Now in place, please." in ours


def test_template_variables_reach_the_template(hf_tokenizer):
    """Qwen3's enable_thinking=False writes an empty think block: an extra keyword is a template variable."""
    name = "Qwen-Qwen3-0.6B.jinja"
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    ours = ChatTemplate(source, origin=name, special_tokens=PUBLISHED[name]).render(CONVERSATION, enable_thinking=False)
    theirs = hf_tokenizer(PUBLISHED[name]).apply_chat_template(
        CONVERSATION, chat_template=source, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert ours == theirs and ours.endswith("<think>\n\n</think>\n\n")


def test_templates_run_sandboxed():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(EdgeError, match="refused"):
        ChatTemplate(escape, origin="hostile").render([{"role": "user", "content": "x"}])
    with pytest.raises(EdgeError, match="refused"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", origin="hostile").render([{"role": "user", "content": "x"}])


def test_the_templates_own_errors_are_one_line():
    mistral = (TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text(encoding="utf-8")
    t = ChatTemplate(mistral, origin="mistral", special_tokens=PUBLISHED["mistralai-Mistral-Nemo-Instruct-2407.jinja"])
    with pytest.raises(EdgeError, match="alternate"):  # the template's raise_exception: roles must alternate
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(EdgeError, match="role 'robot'"):
        t.render([{"role": "robot", "content": "a"}])
    with pytest.raises(ModelFormatError, match="does not parse"):
        ChatTemplate("{% for m in messages %}", origin="broken")


def test_hf_folder_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": {"content": "<s>", "special": true}, "eos_token": "</s>", '
        '"chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},'
        ' {"name": "tool_use", "template": "tools"}]}')
    t = hf_chat_template(tmp_path)
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    (tmp_path / "chat_template.jinja").write_text("[{{ messages[0].content }}]")
    assert hf_chat_template(tmp_path).render([{"role": "user", "content": "hi"}]) == "[hi]"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert hf_chat_template(tmp_path) is None


def test_plain_blocks_follow_trim_and_lstrip(hf_tokenizer):
    """Kimi K2's template lays list contents out with plain, indented {% %} blocks: only Jinja's
    trim_blocks and lstrip_blocks, as transformers sets them, give its layout."""
    name = "moonshotai-Kimi-K2.jinja"
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    messages = [{"role": "user", "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}]}]
    theirs = hf_tokenizer(PUBLISHED[name]).apply_chat_template(messages, chat_template=source, tokenize=False,
                                                               add_generation_prompt=True)
    ours = ChatTemplate(source, origin=name, special_tokens=PUBLISHED[name]).render(messages)
    assert ours == theirs and "first part" in ours
