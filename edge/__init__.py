"""edge: run Mixture-of-Experts language models on edge devices.

>>> import edge
>>> with edge.load() as m:                       # the embedded default model
...     text = m.create_completion("def fibonacci(", max_tokens=16, temperature=0)["choices"][0]["text"]

Nothing heavy happens at import: submodules load when first used, and torch is never imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge._version import __version__

__all__ = ["EdgeError", "Model", "ModelSpec", "build", "inspect", "load", "__version__"]

if TYPE_CHECKING:
    from edge.builder.bundles import build
    from edge.errors import EdgeError
    from edge.sdk import Model, load
    from edge.spec import ModelSpec


def inspect(model: Any = None) -> "ModelSpec":
    """The ModelSpec of a checkpoint folder, GGUF file or bundle (None: the default model)."""
    from edge.sources import read_spec, resolve

    return read_spec(resolve(model))


def __getattr__(name: str) -> Any:
    if name in ("load", "Model"):
        from edge import sdk

        return getattr(sdk, name)
    if name == "build":
        from edge.builder.bundles import build

        return build
    if name == "EdgeError":
        from edge.errors import EdgeError

        return EdgeError
    if name == "ModelSpec":
        from edge.spec import ModelSpec

        return ModelSpec
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
