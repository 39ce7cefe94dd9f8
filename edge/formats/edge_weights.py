"""The edge bundle's own weight file: canonical ModelWeights as one safetensors file (f32 or f16)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from edge.errors import BundleError
from edge.formats import safetensors_io as st
from edge.formats.weights import LayerWeights, ModelWeights
from edge.spec import ModelSpec

DTYPES = {"f32": np.float32, "f16": np.float16}


EXPERT_FIELDS = ("gate", "up", "down")  # routed experts: absent from dense-only files
STACKED_FIELDS = ("wq", "wk", "wv", "wo")  # attention: absent when a BitStack stack holds them


def save(weights: ModelWeights, path: Path, dtype: str = "f32", *, experts: bool = True, stacked: bool = False) -> None:
    """Write canonical weights; ``experts=False`` leaves the routed experts out (they live in the
    expert store of an offload bundle), ``stacked=True`` the attention matrices (in dense.stack)."""
    from safetensors.numpy import save_file

    dt = DTYPES[dtype]

    def cast(a: np.ndarray) -> np.ndarray:  # 1-D norms and routers stay float32: they are tiny
        return np.ascontiguousarray(a, dtype=np.float32 if a.ndim == 1 else dt)

    tensors = {"embed": cast(weights.embed), "norm": cast(weights.norm)}
    if weights.lm_head is not weights.embed:
        tensors["lm_head"] = cast(weights.lm_head)
    for i, lw in enumerate(weights.layers):
        for f in fields(LayerWeights):
            a = getattr(lw, f.name)
            if a is not None and (experts or f.name not in EXPERT_FIELDS) and not (stacked and f.name in STACKED_FIELDS):
                keep = f.name in ("router", "shared_router")
                tensors[f"layers.{i}.{f.name}"] = np.ascontiguousarray(a, np.float32) if keep else cast(a)
    save_file(tensors, str(path))


def load(path: Path, spec: ModelSpec, *, experts: bool = True, stacked: bool = False) -> ModelWeights:
    """Canonical weights back (float32 tensors memory-mapped, not copied). With ``experts=False``
    the routed-expert fields are empty arrays: those weights come from the expert store; with
    ``stacked=True`` so are the attention matrices (they come from a BitStack stack)."""
    infos = st.read_header(path)

    def get(name: str) -> np.ndarray | None:
        return st.load(infos[name], copy=False) if name in infos else None

    if "embed" not in infos:
        raise BundleError(f"{path.name} is not an edge weight file (no 'embed' tensor)")
    layers = []
    for i in range(spec.n_layers):
        kw = {f.name: get(f"layers.{i}.{f.name}") for f in fields(LayerWeights)}
        if not experts:
            kw.update({name: np.empty((0,), np.float32) for name in EXPERT_FIELDS})
        if stacked:
            kw.update({name: np.empty((0,), np.float32) for name in STACKED_FIELDS})
        missing = [k for k, f in zip(kw, fields(LayerWeights)) if kw[k] is None and f.default is not None]
        if missing:
            raise BundleError(f"{path.name} lacks layers.{i}.{missing[0]}")
        layers.append(LayerWeights(**kw))
    embed = get("embed")
    lm_head = get("lm_head")
    return ModelWeights(spec=spec, embed=embed, norm=get("norm"),
                        lm_head=embed if lm_head is None else lm_head, layers=layers)
