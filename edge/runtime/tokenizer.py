"""Tokenizers behind one small interface: Hugging Face ``tokenizers`` files, or llama.cpp's own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from edge.errors import ModelFormatError


class Tokenizer(Protocol):
    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (no transformers, no torch)."""

    def __init__(self, path: Path, eos_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelFormatError(f"{path} is not a valid tokenizer.json ({e})") from None
        self.eos_ids = frozenset(int(i) for i in eos_ids)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class LlamaCppTokenizer:
    """The tokenizer embedded in a GGUF, as llama.cpp applies it (a llama-cpp-python LlamaModel,
    loaded whole or with ``vocab_only``)."""

    def __init__(self, model):
        self._model = model
        self.eos_ids = frozenset({int(model.token_eos())})
        self._add_bos = bool(model.add_bos_token())

    def encode(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids)).decode("utf-8", errors="replace")
