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
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(f"{model_dir} has no tokenizer.json")
    return path
