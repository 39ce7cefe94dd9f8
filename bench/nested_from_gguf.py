"""Quality of nested experts built from a Q4_K_M GGUF, against that GGUF in llama.cpp.

    python bench/nested_from_gguf.py          # ~3 min here; the default model

The default model is quantized to Q4_K_M by llama.cpp's own quantizer (its mix: Q4_K, Q5_0 where
rows are not whole K-quant blocks, Q6_K, Q8_0); that file is the source. Scored on the held-out
stdlib files (142,882 tokens, 256-token windows, as bench/perplexity.py):

* llama.cpp on the Q4_K_M GGUF (the source, as users run it);
* edge's offload engine straight from the GGUF (the same bytes, computed by edge's graph);
* an offload bundle built from the GGUF by the streaming builder (experts dequantized with the
  gguf package, then nested-quantized; trunk tensors copied untouched), its experts served at 4,
  3 and 2 bits; and the f32 checkpoint in the reference engine for scale.

Results: docs/nested-quant.md ("From a GGUF").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import Progress  # noqa: E402

import edge  # noqa: E402
from edge.data.corpus import EOT, stdlib_corpus, token_stream  # noqa: E402
from edge.runtime.perplexity import perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bits", type=int, default=8)
    args = ap.parse_args()
    from edge.formats.hf import load_weights
    from edge.models import default_model_path
    from edge.runtime.llamacpp import LlamaCppBackend
    from edge.runtime.offload.open import open_gguf
    from edge.runtime.offload.options import OffloadOptions
    from edge.runtime.reference import ReferenceEngine
    from edge.runtime.tokenizer import HFTokenizer

    tok = HFTokenizer(default_model_path() / "tokenizer.json")
    (eot,) = tok.encode(EOT)
    held = token_stream(tok.encode, stdlib_corpus().heldout_texts(), eot)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as bar:
        def score(name: str, logits) -> None:
            task = bar.add_task(name, total=None)
            rows.append((name, perplexity(logits, held, progress=lambda i, n: bar.update(task, completed=i, total=n))))

        weights = load_weights(default_model_path())
        score("f32 checkpoint, reference engine", lambda c: ReferenceEngine(weights, n_ctx=512).eval(c, all_logits=True))
        g = Path(tmp) / "g"
        edge.build(None, g, format="gguf", weight_type="q4_k_m")
        gguf = g / "model.gguf"
        ll = LlamaCppBackend(gguf, n_ctx=512, n_threads=2, all_logits=True)

        def llama(c):
            ll.truncate(0)
            return ll.eval_all(list(c))

        score("Q4_K_M GGUF, llama.cpp (the source)", llama)
        ll.close()
        eng = open_gguf(gguf, budget=None, options=OffloadOptions(prefetch=False).resolved(), n_ctx=512, threads=2)

        def direct(c):
            eng.truncate(0)
            return eng.eval(list(c), all_logits=True)

        score("Q4_K_M GGUF, edge straight from the file", direct)
        eng.close()
        bundle = Path(tmp) / "b"
        edge.build(gguf, bundle, format="offload", max_bits=args.max_bits)
        for bits in (4, 3, 2):
            with edge.load(bundle, n_ctx=512, offload=OffloadOptions(bits=bits, pin_bits=True, prefetch=False)) as m:
                def nested(c, m=m):
                    m.backend.truncate(0)
                    return m.backend.eval(list(c), all_logits=True)

                score(f"nested {bits}-bit experts from the GGUF (bundle, max {args.max_bits} bits)", nested)
    src = rows[1][1]
    print(f"default model, held-out {len(held):,} tokens, 256-token windows")
    print(f"{'':60s} {'perplexity':>10s} {'vs source':>9s}")
    for name, ppl in rows:
        print(f"{name:60s} {ppl:10.3f} {100 * (ppl / src - 1):+8.2f}%")


if __name__ == "__main__":
    main()
