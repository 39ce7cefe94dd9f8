"""Chat through the model's own template: the SDK's create_chat_completion (OpenAI chat.completion
shape, streaming, usage only when asked), templates carried by bundles and GGUFs edge writes, and
``edge chat`` holding a conversation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edge
from edge.errors import EdgeError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
ASK = [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "read a file line by line"}]


@pytest.fixture(scope="module")
def model():
    with edge.load() as m:
        yield m


def test_chat_completion_shape_and_prompt(model):
    r = model.create_chat_completion(ASK, max_tokens=6, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (choice,) = r["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 6
    # the prompt is the template's layout of the messages, tokenized with its special tokens
    rendered = model.chat_template.render(ASK)
    assert rendered == "# Short answers.\n# read a file line by line\n"
    assert r["usage"]["prompt_tokens"] == len(model.tokenizer.encode_special(rendered))
    # ... and the reply is what the model writes after that text
    plain = model.create_completion(rendered, max_tokens=6, temperature=0)["choices"][0]["text"]
    assert choice["message"]["content"] == plain


def test_chat_stream_chunks(model):
    whole = model.create_chat_completion(ASK, max_tokens=12, seed=3)["choices"][0]["message"]["content"]
    chunks = list(model.create_chat_completion(ASK, max_tokens=12, seed=3, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    with_usage = list(model.create_chat_completion(ASK, max_tokens=12, seed=3, stream=True,
                                                   stream_options={"include_usage": True}))
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 12
    assert all("usage" not in c for c in with_usage[:-1])


def test_completion_stream_usage_only_when_asked(model):
    chunks = list(model.create_completion("import ", max_tokens=5, seed=1, stream=True))
    assert all("usage" not in c for c in chunks)
    chunks = list(model.create_completion("import ", max_tokens=5, seed=1, stream=True,
                                          stream_options={"include_usage": True}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_bad_messages_are_refused(model):
    with pytest.raises(EdgeError, match="non-empty list"):
        model.create_chat_completion("hello")
    with pytest.raises(EdgeError, match="role 'narrator'"):
        model.create_chat_completion([{"role": "narrator", "content": "x"}])


def test_gguf_edge_writes_carries_the_template(default_gguf_f32, default_dir):
    """llama.cpp reads the template edge wrote into the GGUF (tokenizer.chat_template)."""
    with edge.load(default_gguf_f32) as m:
        assert m.backend_name == "llamacpp"
        assert m.chat_template.source == (default_dir / "chat_template.jinja").read_text()
        assert m.chat_template.render(ASK) == "# Short answers.\n# read a file line by line\n"
        r = m.create_chat_completion(ASK, max_tokens=4, temperature=0)
        assert r["usage"]["completion_tokens"] == 4


def test_bundle_carries_the_template(tmp_path, default_dir):
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "build", "-o", str(out), "--format", "edge"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "chat_template.jinja").read_text() == (default_dir / "chat_template.jinja").read_text()
    with edge.load(out) as m:
        assert m.chat_template.render(ASK) == "# Short answers.\n# read a file line by line\n"


@pytest.fixture(scope="module")
def untemplated_gguf(tmp_path_factory, default_dir) -> Path:
    """The default model as a GGUF written from a tokenizer folder with no chat template."""
    import shutil

    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights

    d = tmp_path_factory.mktemp("untemplated")
    shutil.copyfile(default_dir / "tokenizer.json", d / "tokenizer.json")
    write_gguf(load_weights(default_dir), d / "tokenizer.json", d / "m.gguf", outtype="f32", bos_id=0, eos_id=0)
    return d / "m.gguf"


def test_a_model_without_template(untemplated_gguf):
    """No template: chat says so in one line; a template given at load works."""
    with edge.load(untemplated_gguf) as m:
        assert m.chat_template is None
        with pytest.raises(EdgeError, match="has no chat template"):
            m.create_chat_completion(ASK)
    qwen = TEMPLATES / "Qwen-Qwen3-0.6B.jinja"
    with edge.load(untemplated_gguf, chat_template=str(qwen)) as m:
        assert m.chat_template.origin == str(qwen)
        assert m.chat_template.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
        r = m.create_chat_completion(ASK, max_tokens=3, temperature=0)
        assert r["usage"]["prompt_tokens"] == len(m.tokenizer.encode_special(m.chat_template.render(ASK)))
    with pytest.raises(EdgeError, match="no such file"):
        edge.load(untemplated_gguf, chat_template="/nonexistent/template.jinja")
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "chat", "-m", str(untemplated_gguf), "-n", "4"],
                          capture_output=True, text=True, input="import os\n", timeout=300)
    assert proc.returncode == 0 and "has no chat template: each line continues one running text" in proc.stderr


def test_end_of_generation_tokens_from_the_gguf(gemma_gguf):
    """llama.cpp's end-of-generation set, not only EOS: Gemma 3 ends turns at <end_of_turn>."""
    from edge.runtime.llamacpp import load_model
    from edge.runtime.tokenizer import LlamaCppTokenizer

    tok = LlamaCppTokenizer(load_model(gemma_gguf, vocab_only=True), gemma_gguf.name)
    assert {1, 106} <= tok.eos_ids  # <eos>, <end_of_turn>
    assert tok.chat_template is None
    ids = tok.encode_special("<start_of_turn>user\nhi<end_of_turn>")
    assert ids[0] == 2 and 106 in ids  # BOS added once; the turn markers are their own tokens
    assert tok.encode_special("<bos>hi").count(2) == 1  # a template that writes BOS gets it once


def test_edge_chat_keeps_the_conversation():
    """The second reply is the model's answer to the whole conversation laid out by its template."""
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "chat", "-n", "8", "-t", "0"], capture_output=True,
                          text=True, input="import os\nimport sys\n/exit\n", timeout=300)
    assert proc.returncode == 0, proc.stderr
    turns = proc.stdout.split("> ")  # the input prompt before each line typed
    assert len(turns) == 4 and turns[0] == "" and turns[3] == ""
    first, second = turns[1].removesuffix("\n"), turns[2].removesuffix("\n")
    convo = [{"role": "user", "content": "import os"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "import sys"}]
    with edge.load() as m:
        want = m.create_chat_completion(convo, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
        alone = m.create_chat_completion(convo[2:], max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    assert second == want and first
    assert want != alone  # the conversation changed the reply: a fresh context would say otherwise
