"""Expert-cache policies on real routing: every online policy against moe-lrc's oracle and Belady.

    python bench/policies.py            # ~1 min; writes nothing, prints the table for docs/policies.md

Traces: (1) Mixtral-8x7B-Instruct answering one HumanEval problem (../shared/traces, recorded with
vLLM: 32 layers, top-2 of 8, ~211 tokens per layer, each layer its own sequence as moe-lrc treats
it); (2) the embedded default model (4 layers, top-2 of 8) routing 4,096 tokens of held-out stdlib
text, recorded by the offload engine itself. Cache sizes C = k, 2k, 3k per layer. Hit rate =
hits / (tokens x k), first accesses counted as misses for every row (the SCH oracle too: moe-lrc's
"cold" variant), layer mean. The last line is machine-readable: best=<policy with the highest
mean hit rate over both traces and all sizes>.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edge.moe.locality import sch  # noqa: E402
from edge.moe.policies import POLICIES  # noqa: E402
from edge.moe.simulate import simulate  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "traces" / "mixtral-8x7b-routing-sample.jsonl"


def mixtral_layers(path: Path) -> tuple[list[np.ndarray], int, int]:
    """Per layer, the expert ids [T, 2] in token order."""
    rows: dict[int, list[tuple[int, list[int]]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["layer"], []).append((r["token_pos"], r["experts"]))
    layers = [np.array([e for _, e in sorted(v)], dtype=np.int64) for _, v in sorted(rows.items())]
    return layers, 8, 2


def default_model_layers(tokens: int) -> tuple[list[np.ndarray], int, int]:
    """The default model's routing of held-out text, recorded by the offload engine."""
    import tempfile

    from edge.builder.bundles import build
    from edge.builder.calibrate import engine_routing
    from edge.data.corpus import stdlib_corpus
    from edge.formats.bundle import read_manifest
    from edge.runtime.offload.open import open_offload
    from edge.runtime.offload.options import OffloadOptions
    from edge.runtime.tokenizer import HFTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "default"
        build(None, bundle, format="offload")
        manifest = read_manifest(bundle)
        tok = HFTokenizer(bundle / "tokenizer.json")
        ids = tok.encode("\n".join(stdlib_corpus().heldout_texts()))[:tokens]
        engine = open_offload(bundle, manifest, budget=None, options=OffloadOptions(prefetch=False).resolved(),
                              n_ctx=512, threads=2)
        try:
            trace, _ = engine_routing(engine, ids)
        finally:
            engine.close()
    return [trace.layer(i).astype(np.int64) for i in range(trace.n_layers)], trace.n_experts, trace.top_k


def rates(layers: list[np.ndarray], E: int, C: int) -> dict[str, float]:
    out = {p: float(np.mean([simulate(ids, E, C, p) for ids in layers])) for p in POLICIES}
    out["sch oracle (m=16)"] = float(np.mean([sch(ids, E, 16, cold=True)[C - 1] for ids in layers]))
    out["belady"] = float(np.mean([simulate(ids, E, C, "belady") for ids in layers]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="default-model tokens to route")
    args = ap.parse_args()
    traces = {"mixtral-8x7b (humaneval)": mixtral_layers(SHARED), "default model (held-out stdlib)":
              default_model_layers(args.tokens)}
    cols = (*POLICIES, "sch oracle (m=16)", "belady")
    print(f"{'trace':34s} {'C':>3s} " + " ".join(f"{c:>17s}" for c in cols))
    online: dict[str, list[float]] = {p: [] for p in POLICIES}
    for name, (layers, E, K) in traces.items():
        for C in (K, 2 * K, 3 * K):
            r = rates(layers, E, C)
            for p in POLICIES:
                online[p].append(r[p])
            print(f"{name:34s} {C:3d} " + " ".join(f"{r[c]:17.3f}" for c in cols))
        print(f"{'':34s}     tokens per layer {np.mean([len(x) for x in layers]):.0f}, {len(layers)} layers")
    means = {p: float(np.mean(v)) for p, v in online.items()}
    print("mean over both traces and sizes: " + ", ".join(f"{p} {m:.4f}" for p, m in means.items()))
    print(f"best={max(means, key=means.get)}")


if __name__ == "__main__":
    main()
