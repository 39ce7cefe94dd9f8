"""What a model argument names: a Hugging Face checkpoint folder, a GGUF file or an edge bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.errors import EdgeError, ModelFormatError
from edge.models import DEFAULT_MODEL_NAME, default_model_path
from edge.spec import ModelSpec

Kind = Literal["hf", "gguf", "bundle"]


@dataclass(frozen=True)
class Source:
    kind: Kind
    path: Path
    label: str | None = None  # display name when the path's own name says nothing

    @property
    def name(self) -> str:
        return self.label or (self.path.stem if self.kind == "gguf" else self.path.name)


def resolve(model: str | Path | None) -> Source:
    """Classify a model argument; None means the embedded default model."""
    if model is None:
        path = default_model_path()
        if not (path / "model.safetensors").is_file():
            raise EdgeError(f"the embedded default model is missing from {path} (reinstall edge)")
        return Source("hf", path, label=DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise EdgeError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return Source("bundle", path)
        if (path / "config.json").is_file():
            return Source("hf", path)
        raise ModelFormatError(f"{path} is neither an edge bundle (manifest.json) nor a Hugging Face checkpoint (config.json)")
    if path.name == "config.json":
        return Source("hf", path.parent)
    if path.suffix.lower() == ".gguf":
        return Source("gguf", path)
    raise ModelFormatError(f"{path}: expected a .gguf file, a checkpoint folder or a bundle folder")


def read_spec(source: Source) -> ModelSpec:
    if source.kind == "hf":
        from edge.formats import hf

        return hf.read_spec(source.path)
    if source.kind == "gguf":
        from edge.formats import gguf_read

        return gguf_read.read_spec(source.path)
    from edge.formats.bundle import read_manifest

    return read_manifest(source.path).spec


def hf_special_ids(model_dir: Path) -> tuple[int | None, tuple[int, ...]]:
    """(bos id, eos ids) from config.json / generation_config.json."""
    ids: dict[str, object] = {}
    for name in ("config.json", "generation_config.json"):
        try:
            data = json.loads((model_dir / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos_token_id", "eos_token_id"):
            if data.get(key) is not None:
                ids[key] = data[key]
    eos = ids.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    bos = ids.get("bos_token_id")
    return (int(bos) if isinstance(bos, int) else None), eos_ids


def hf_tokenizer_file(model_dir: Path) -> Path:
    """The folder's ``tokenizer.json``; for a folder that ships only a SentencePiece
    ``tokenizer.model`` (older Llama/Mistral uploads), the tokenizer.json transformers converts it
    to, written once into edge's cache beside copies of the tokenizer files (the model's own folder
    is never written to)."""
    path = model_dir / "tokenizer.json"
    if path.is_file():
        return path
    if (model_dir / "tokenizer.model").is_file():
        return _converted_sentencepiece(model_dir)
    raise ModelFormatError(f"{model_dir} has no tokenizer.json (nor a SentencePiece tokenizer.model)")


_TOKENIZER_SIDE_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                         "chat_template.jinja", "config.json")


def _converted_sentencepiece(model_dir: Path) -> Path:
    import hashlib
    import shutil
    import tempfile

    from edge.paths import cache_dir

    digest = hashlib.sha256()
    for name in _TOKENIZER_SIDE_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    out = cache_dir("tokenizers", digest.hexdigest()[:16])
    if (out / "tokenizer.json").is_file():
        return out / "tokenizer.json"
    try:
        import sentencepiece  # noqa: F401  (transformers' converter reads the model with it)
        from transformers import AutoTokenizer
    except ImportError:
        raise EdgeError(f"{model_dir} has a SentencePiece tokenizer.model but no tokenizer.json: converting it "
                        f"needs transformers and sentencepiece (pip install 'edge[convert]')") from None
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name in _TOKENIZER_SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, Path(tmp) / name)
        try:
            tok = AutoTokenizer.from_pretrained(tmp)
            tok.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds for a file it cannot read)
            raise ModelFormatError(f"{model_dir / 'tokenizer.model'} could not be converted to a tokenizer.json "
                                   f"({type(e).__name__}: {str(e)[:200]})") from None
        for name in (*_TOKENIZER_SIDE_FILES, "tokenizer.json"):
            if (Path(tmp) / name).is_file():
                shutil.move(Path(tmp) / name, out / name)  # tokenizer.json last: its presence marks a finished copy
    return out / "tokenizer.json"
