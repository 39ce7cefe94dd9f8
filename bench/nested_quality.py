"""Held-out perplexity of the default model with its experts at 2..8 bits: nested records against
plain round-to-nearest at the same width.

    python bench/nested_quality.py [--bits 2,3,4,5,6,8]

Routers, attention, norms and embeddings stay f32 (edge/quant/nested.py's rule); only the routed
experts are quantized, per group of 64 inputs. Scored with the reference engine on the held-out
stdlib files in 256-token windows, as bench/perplexity.py. Results: docs/nested-quant.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import Progress  # noqa: E402

from edge.data.corpus import EOT, stdlib_corpus, token_stream  # noqa: E402
from edge.formats.hf import load_weights  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.quant.nested import NestedLayout, quantized_copy  # noqa: E402
from edge.runtime.perplexity import perplexity  # noqa: E402
from edge.runtime.reference import ReferenceEngine  # noqa: E402
from edge.runtime.tokenizer import HFTokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    args = ap.parse_args()
    tok = HFTokenizer(args.model / "tokenizer.json")
    (eot,) = tok.encode(EOT)
    held = token_stream(tok.encode, stdlib_corpus().heldout_texts(), eot)
    weights = load_weights(args.model)
    s = weights.spec
    layout = NestedLayout(((s.expert_ffn_size, s.hidden_size),) * 2 + ((s.hidden_size, s.expert_ffn_size),))

    def score(w, bar, label) -> float:
        task = bar.add_task(label, total=None)
        return perplexity(lambda c: ReferenceEngine(w, n_ctx=512).eval(c, all_logits=True), held,
                          progress=lambda i, n: bar.update(task, completed=i, total=n))

    rows = []
    with Progress(transient=True) as bar:
        base = score(weights, bar, "f32")
        for b in (int(x) for x in args.bits.split(",")):
            nested = score(quantized_copy(weights, b, "nested"), bar, f"nested {b}-bit")
            plain = score(quantized_copy(weights, b, "rtn"), bar, f"rtn {b}-bit")
            rows.append((b, layout.prefix_bytes(b), nested, plain))
    print(f"default model, held-out {len(held):,} tokens; f32 experts: perplexity {base:.3f}")
    print(f"expert record {layout.record_bytes:,} bytes at 8 bits ({layout.n_weights:,} weights, group 64)")
    print(f"{'bits':>4s} {'bytes read':>10s} {'bits/weight':>11s} {'nested ppl':>10s} {'RTN ppl':>8s} {'nested vs RTN':>13s}")
    for b, nbytes, nested, plain in rows:
        print(f"{b:4d} {nbytes:10,d} {8 * nbytes / layout.n_weights:11.2f} {nested:10.3f} {plain:8.3f} "
              f"{100 * (nested / plain - 1):+12.2f}%")


if __name__ == "__main__":
    main()
