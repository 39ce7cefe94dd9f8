"""Tokenizers of both families edge meets: SentencePiece BPE with byte fallback (Llama 2, Mistral,
Mixtral) and byte-level BPE (GPT-2, Qwen2 / Qwen3, Llama 3). For each, a real tokenizer made by
the libraries that make them (sentencepiece + transformers' converter; the ``tokenizers`` BPE
trainer) gives the same ids in edge as in transformers on a multilingual sample, and a GGUF edge
writes with it gives the same ids in llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SAMPLE = (Path(__file__).parent / "data" / "multilingual.txt").read_text(encoding="utf-8")
LINES = [line for line in SAMPLE.splitlines() if line.strip()] + [SAMPLE]


def _training_text(tmp: Path) -> Path:
    from edge.data.corpus import stdlib_corpus

    out = tmp / "train.txt"
    out.write_text("\n".join(t[:20000] for t in stdlib_corpus().heldout_texts()[:6]) + "\n" + SAMPLE * 3,
                   encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """A 4,096-piece SentencePiece BPE model (byte fallback, Llama's settings), trained by
    sentencepiece, and the tokenizer.json transformers converts it to."""
    spm = pytest.importorskip("sentencepiece")
    tf = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(input=str(_training_text(d)), model_prefix=str(d / "sp"), vocab_size=4096,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    shutil.copyfile(d / "sp.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
                                                         "add_bos_token": True}))
    tf.AutoTokenizer.from_pretrained(d).save_pretrained(d)  # writes tokenizer.json
    return d


@pytest.fixture(scope="module")
def qwen2_bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE with Qwen2's pre-tokenizer (its split pattern, then byte-level), trained by
    the tokenizers library."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from edge.formats.gguf_vocab import SPLIT_PATTERNS

    d = tmp_path_factory.mktemp("qwen2bpe")
    pattern = next(p for p, name in SPLIT_PATTERNS.items() if name == "qwen2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(_training_text(d))], trainer)
    tok.save(str(d / "tokenizer.json"))
    return d


def _hf_ids(folder: Path, text: str) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")).encode(text, add_special_tokens=False)


def _llama_ids(folder: Path, tmp: Path, default_dir: Path) -> list[list[int]]:
    """Every sample line through llama.cpp's tokenizer in a GGUF edge writes with this tokenizer."""
    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights
    from edge.runtime.llamacpp import load_model

    out = tmp / "m.gguf"
    write_gguf(load_weights(default_dir), folder / "tokenizer.json", out, outtype="f32", bos_id=1, eos_id=2)
    model = load_model(out, vocab_only=True)
    return [model.tokenize(line.encode("utf-8"), add_bos=False, special=False) for line in LINES]


def test_sentencepiece_ids_agree_with_transformers_and_llama_cpp(spm_dir, tmp_path, default_dir):
    import sentencepiece

    from edge.runtime.tokenizer import HFTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    ours = HFTokenizer(spm_dir / "tokenizer.json")
    hf = [_hf_ids(spm_dir, line) for line in LINES]
    assert [ours.encode(line) for line in LINES] == hf
    spm = [sp.encode(line) for line in LINES]
    # transformers' converted tokenizer.json splits a run of leading spaces otherwise than
    # SentencePiece itself ("    return": 3 x "▁" + "▁return" against 4 x "▁" + "return"); llama.cpp
    # follows SentencePiece, on every line
    differ = [line for line, a, b in zip(LINES, hf, spm) if a != b]
    assert all(line.startswith("    ") for line in differ) and len(differ) <= 1
    assert _llama_ids(spm_dir, tmp_path, default_dir) == spm  # scores from tokenizer.model
    json_only = tmp_path / "json-only"
    json_only.mkdir()
    shutil.copyfile(spm_dir / "tokenizer.json", json_only / "tokenizer.json")
    assert _llama_ids(json_only, json_only, default_dir) == spm  # scores from the merges' ranks


def test_folder_with_only_tokenizer_model_is_converted_outside_it(spm_dir, tmp_path, default_dir, monkeypatch):
    """An upload that ships tokenizer.model without tokenizer.json: edge converts it (as
    transformers does) into its cache, never into the model's folder, and the ids still agree."""
    import sentencepiece

    from edge.runtime.tokenizer import HFTokenizer
    from edge.sources import hf_tokenizer_file

    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "spm-only"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(spm_dir / name, folder / name)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    tok_json = hf_tokenizer_file(folder)
    assert tok_json.parent != folder and tok_json.is_file()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
    assert hf_tokenizer_file(folder) == tok_json  # converted once, then read from the cache
    assert [HFTokenizer(tok_json).encode(line) for line in LINES] == [_hf_ids(spm_dir, line) for line in LINES]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert _llama_ids(tok_json.parent, tmp_path, default_dir) == [sp.encode(line) for line in LINES]


def test_folder_without_any_tokenizer_is_refused(tmp_path):
    from edge.errors import ModelFormatError
    from edge.sources import hf_tokenizer_file

    with pytest.raises(ModelFormatError, match="has no tokenizer.json"):
        hf_tokenizer_file(tmp_path)


def test_sentencepiece_gguf_fields(spm_dir):
    from edge.formats.gguf_vocab import BYTE, CONTROL, UNKNOWN, vocab_fields

    f = vocab_fields(spm_dir / "tokenizer.json", 4096)
    assert f["model"] == "llama" and f["add_space_prefix"] is True and f["add_bos"] is True
    assert f["types"][0] == UNKNOWN and f["types"][1] == CONTROL and f["types"][2] == CONTROL
    assert f["types"][f["tokens"].index("<0x41>")] == BYTE and f["types"].count(BYTE) == 256


def test_byte_level_bpe_ids_agree(qwen2_bpe_dir, tmp_path, default_dir):
    from edge.formats.gguf_vocab import tokenizer_kind
    from edge.runtime.tokenizer import HFTokenizer

    data = json.loads((qwen2_bpe_dir / "tokenizer.json").read_text())
    assert tokenizer_kind(data) == ("gpt2", "qwen2")
    want = [_hf_ids(qwen2_bpe_dir, line) for line in LINES]
    assert [HFTokenizer(qwen2_bpe_dir / "tokenizer.json").encode(line) for line in LINES] == want
    assert _llama_ids(qwen2_bpe_dir, tmp_path, default_dir) == want


def test_default_gpt2_tokenizer_ids_agree(default_dir, tmp_path):
    from edge.formats.gguf_vocab import tokenizer_kind

    assert tokenizer_kind(json.loads((default_dir / "tokenizer.json").read_text())) == ("gpt2", "gpt-2")
    want = [_hf_ids(default_dir, line) for line in LINES]
    assert _llama_ids(default_dir, tmp_path, default_dir) == want


def test_unknown_split_pattern_is_refused(qwen2_bpe_dir, tmp_path):
    from edge.errors import UnsupportedModelError
    from edge.formats.gguf_vocab import vocab_fields

    data = json.loads((qwen2_bpe_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="split pattern llama.cpp has no name for"):
        vocab_fields(tmp_path / "tokenizer.json")
