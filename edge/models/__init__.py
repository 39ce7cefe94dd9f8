"""Models shipped inside the package: the embedded default MoE (see docs/default-model.md)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "edge-default-moe"


def default_model_path() -> Path:
    """Folder of the embedded default model: a 4.4 M-parameter Mixtral-architecture MoE
    (4 layers, 8 experts, top-2) trained on the Python standard library."""
    return Path(__file__).resolve().parent / "default"
