"""Tokenizers behind one small interface: Hugging Face ``tokenizers`` files, or llama.cpp's own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from edge.errors import ModelFormatError
from edge.runtime.chat import ChatTemplate, gguf_chat_template, gguf_special_tokens, hf_chat_template, hf_special_tokens


class Tokenizer(Protocol):
    eos_ids: frozenset[int]
    chat_template: ChatTemplate | None  # the model's own, where it ships one
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as text: what a chat template may name

    def encode(self, text: str) -> list[int]: ...

    def encode_special(self, text: str) -> list[int]:
        """Text a chat template wrote: its special-token strings (``<|im_start|>``, ``[INST]``) become
        their ids, and BOS is not added twice when the text starts with it."""

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (no transformers, no torch)."""

    def __init__(self, path: Path, eos_ids: Sequence[int] = ()):
        """``path``: a tokenizer.json; its folder's chat template (chat_template.jinja or
        tokenizer_config.json) comes with it."""
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelFormatError(f"{path} is not a valid tokenizer.json ({e})") from None
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.chat_template = hf_chat_template(Path(path).parent)
        self.special_tokens = hf_special_tokens(Path(path).parent)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_special(self, text: str) -> list[int]:
        # tokenizers matches added (special) tokens in the text in every mode; add_special_tokens=False
        # adds no BOS/EOS of its own, as transformers' apply_chat_template(tokenize=True) encodes
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class LlamaCppTokenizer:
    """The tokenizer embedded in a GGUF, as llama.cpp applies it (a llama-cpp-python LlamaModel,
    loaded whole or with ``vocab_only``)."""

    def __init__(self, model, origin: str = "the GGUF"):
        self._model = model
        self.chat_template = gguf_chat_template(model, origin)
        self.special_tokens = gguf_special_tokens(model)
        self.eos_ids = end_of_generation_ids(model)
        self._add_bos = bool(model.add_bos_token())
        bos = model.token_bos()
        self._bos_text = model.token_get_text(bos) if self._add_bos and bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=False)

    def encode_special(self, text: str) -> list[int]:
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids)).decode("utf-8", errors="replace")


def end_of_generation_ids(model) -> frozenset[int]:
    """Every token llama.cpp ends generation at (EOS, EOT, ``<|im_end|>``, ``<end_of_turn>``, ...:
    ``llama_vocab_is_eog``), found once over the vocabulary (0.36 s for Gemma 3's 262,144 tokens here)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model.model)
    eog = {i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    return frozenset(eog or {int(model.token_eos())})
