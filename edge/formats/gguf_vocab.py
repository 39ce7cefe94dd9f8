"""A Hugging Face tokenizer as the GGUF vocabulary llama.cpp reads: byte-level BPE (GPT-2, Qwen2,
Llama 3 pre-tokenizers) as ``tokenizer.ggml.model = "gpt2"``, and SentencePiece BPE with byte
fallback (Llama 2, Mistral, Mixtral) as ``"llama"`` with token scores and types.

For SentencePiece the scores decide llama.cpp's merges (it joins the adjacent pair whose joined
piece scores highest): a folder's ``tokenizer.model`` gives them as SentencePiece stored them
(read with the ``sentencepiece`` package where it is installed, as llama.cpp's converter reads it); from
``tokenizer.json`` alone a piece scores minus the rank of the merge that makes it, which orders
llama.cpp's joins as the BPE merges order them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edge.errors import ModelFormatError, UnsupportedModelError

# The pre-tokenizer split patterns of tokenizer.json files (each as llama.cpp's llama-vocab.cpp
# quotes it for that pre-tokenizer) -> the name llama.cpp knows the pre-tokenizer by
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}
# gguf TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _read(tokenizer_json: Path) -> dict:
    try:
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{tokenizer_json} is not a readable tokenizer.json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelFormatError(f"{tokenizer_json} has no tokenizer model")
    return data


def _steps(node: dict | None) -> list[dict]:
    """A pre-tokenizer or normalizer as its list of steps (a Sequence flattened)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return [s for n in inner for s in _steps(n)]
    return [node]


def tokenizer_kind(data: dict) -> tuple[str, str | None]:
    """("gpt2", pre-tokenizer name) for byte-level BPE, ("llama", None) for SentencePiece BPE;
    anything else is refused with what it is."""
    model = data["model"]
    pre = _steps(data.get("pre_tokenizer"))
    kinds = [p.get("type") for p in pre]
    if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteLevel" not in kinds:
        return "llama", None
    if model.get("type") == "BPE" and kinds == ["ByteLevel"] and pre[0].get("use_regex", True):
        return "gpt2", "gpt-2"
    if model.get("type") == "BPE" and kinds == ["Split", "ByteLevel"] and not pre[1].get("use_regex", True):
        pattern = (pre[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PATTERNS:
            return "gpt2", SPLIT_PATTERNS[pattern]
        raise UnsupportedModelError(f"byte-level BPE tokenizer with a split pattern llama.cpp has no name for "
                                    f"({pattern!r:.80}): edge writes GPT-2's, Qwen2's and Llama 3's")
    raise UnsupportedModelError(f"tokenizer model {model.get('type')} with pre-tokenizer {'+'.join(map(str, kinds))} "
                                f"cannot be written to GGUF: edge writes byte-level BPE and SentencePiece BPE "
                                f"(byte fallback) tokenizers")


def _token_list(data: dict, vocab_size: int | None) -> tuple[list[str], dict[int, dict], int]:
    vocab = dict(data["model"]["vocab"])
    added = {}
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        added[tok["id"]] = tok
    n = max(vocab.values()) + 1
    total = max(n, vocab_size or 0)
    tokens = [f"[PAD{i}]" for i in range(total)]
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, added, n


def _merges(data: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]


def _adds_bos(data: dict) -> bool:
    """Whether the tokenizer's post-processor puts a special token before a single sequence."""
    post = data.get("post_processor") or {}
    posts = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in posts:
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return True
    return False


def _adds_space_prefix(data: dict) -> bool:
    for step in _steps(data.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return any(s.get("type") == "Prepend" for s in _steps(data.get("normalizer")))


def vocab_fields(tokenizer_json: Path, vocab_size: int | None = None) -> dict[str, Any]:
    """The GGUF vocabulary of a ``tokenizer.json`` (and of the ``tokenizer.model`` beside it, for
    SentencePiece): {"model", "pre", "tokens", "types", "merges", "scores", "add_bos",
    "add_space_prefix"}. ``vocab_size`` pads the list with unused tokens to the model's embedding
    rows (a model may have more rows than its tokenizer)."""
    data = _read(tokenizer_json)
    kind, pre = tokenizer_kind(data)
    tokens, added, n = _token_list(data, vocab_size)
    total = len(tokens)
    if kind == "gpt2":
        types = [CONTROL if i in added and added[i].get("special") else USER_DEFINED if i in added
                 else NORMAL if i < n else UNUSED for i in range(total)]
        return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": _merges(data),
                "scores": None, "add_bos": False, "add_space_prefix": None}
    folder = Path(tokenizer_json).parent
    scores = [0.0] * total
    spm = _sentencepiece_pieces(folder / "tokenizer.model") if (folder / "tokenizer.model").is_file() else None
    if spm is not None:  # scores and types as SentencePiece stored them (llama.cpp's converter reads the same)
        for i, (score, ttype) in enumerate(spm[:total]):
            scores[i] = score
        spm_types = {i: t for i, (_, t) in enumerate(spm)}
    else:
        ids = dict(data["model"]["vocab"])
        for rank, merge in enumerate(_merges(data)):
            joined = merge.replace(" ", "", 1)
            if joined in ids and scores[ids[joined]] == 0.0:
                scores[ids[joined]] = -float(rank + 1)
        spm_types = {}
    unk = data["model"].get("unk_token") or _config_token(folder, "unk_token")
    types = []
    for i, text in enumerate(tokens):
        if i >= n:
            types.append(UNUSED)
        elif i in spm_types:  # the base pieces, as SentencePiece types them
            types.append(spm_types[i])
        elif text == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "merges": None, "scores": scores,
            "add_bos": _adds_bos(data), "add_space_prefix": _adds_space_prefix(data)}


def _config_token(folder: Path, key: str) -> str | None:
    cfg = folder / "tokenizer_config.json"
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get(key) if cfg.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _sentencepiece_pieces(path: Path) -> list[tuple[float, int]] | None:
    """(score, gguf token type) of each piece of a SentencePiece model file, or None without the
    ``sentencepiece`` package."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        return None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ModelFormatError(f"{path} is not a SentencePiece model ({e})") from None
    out = []
    for i in range(sp.vocab_size()):
        ttype = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                 else BYTE if sp.IsByte(i) else NORMAL)
        out.append((float(sp.GetScore(i)), ttype))
    return out


def add_vocab(w, fields: dict[str, Any], *, bos_id: int | None, eos_id: int | None) -> None:
    """Write ``vocab_fields`` onto a gguf.GGUFWriter."""
    w.add_tokenizer_model(fields["model"])
    w.add_tokenizer_pre(fields["pre"])
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    if fields["merges"] is not None:
        w.add_token_merges(fields["merges"])
    if fields["scores"] is not None:
        w.add_token_scores(fields["scores"])
    if fields["add_space_prefix"] is not None:
        w.add_add_space_prefix(fields["add_space_prefix"])
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    if eos_id is not None:
        w.add_eos_token_id(eos_id)
    w.add_add_bos_token(fields["add_bos"])
