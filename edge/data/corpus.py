"""The default model's corpus: the top-level CPython standard-library sources.

Every machine with Python has them offline (CPython 3.11.7: 168 files, 4.7 MB). The split is by
file, deterministic and documented, so held-out perplexity is measured on files the model and its
tokenizer never saw.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

EOT = "<|endoftext|>"  # document separator; also the tokenizer's only special token
HELDOUT_EVERY = 10  # file i (in sorted order) is held out when i % 10 == 5: ~10% of files


@dataclass(frozen=True)
class Corpus:
    root: Path
    train_files: tuple[Path, ...]
    heldout_files: tuple[Path, ...]

    def train_texts(self) -> list[str]:
        return [_read(f) for f in self.train_files]

    def heldout_texts(self) -> list[str]:
        return [_read(f) for f in self.heldout_files]


def token_stream(encode, texts: list[str], eot_id: int) -> list[int]:
    """Documents tokenized and joined with the separator token, as the default model was trained."""
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
        ids.append(eot_id)
    return ids


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_corpus(root: Path | None = None) -> Corpus:
    """Split the stdlib's top-level ``*.py`` files into train and held-out sets by sorted index."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.py files under {root}")
    train = tuple(f for i, f in enumerate(files) if i % HELDOUT_EVERY != 5)
    held = tuple(f for i, f in enumerate(files) if i % HELDOUT_EVERY == 5)
    return Corpus(root=root, train_files=train, heldout_files=held)
