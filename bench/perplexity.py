"""Held-out perplexity of the default model on each backend and GGUF type.

    python bench/perplexity.py [--model DIR] [--types f32,q8_0,q4_0]

Scores the held-out stdlib files (edge/data/corpus.py) in 256-token windows, exactly as
scripts/train_default_model.py does, with edge's reference engine and with llama.cpp on GGUFs
that edge writes; prints the unigram baseline beside them. Results: docs/default-model.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import Progress  # noqa: E402

from edge.data.corpus import EOT, stdlib_corpus, token_stream  # noqa: E402
from edge.formats.gguf_write import write_gguf  # noqa: E402
from edge.formats.hf import load_weights  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.runtime.llamacpp import LlamaCppBackend  # noqa: E402
from edge.runtime.perplexity import perplexity  # noqa: E402
from edge.runtime.reference import ReferenceEngine  # noqa: E402
from edge.runtime.tokenizer import HFTokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--types", default="f32,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np

    corpus = stdlib_corpus()
    tok = HFTokenizer(args.model / "tokenizer.json")
    (eot,) = tok.encode(EOT)
    train = token_stream(tok.encode, corpus.train_texts(), eot)
    held = token_stream(tok.encode, corpus.heldout_texts(), eot)
    counts = np.bincount(train, minlength=4096).astype(np.float64) + 1.0
    unigram = float(np.exp(-np.log(counts / counts.sum())[held].mean()))
    weights = load_weights(args.model)
    rows = []
    with Progress(transient=True) as bar:
        def run(name: str, all_logits) -> None:
            task = bar.add_task(name, total=None)
            t0 = time.perf_counter()
            ppl = perplexity(all_logits, held, progress=lambda i, n: bar.update(task, completed=i, total=n))
            rows.append((name, ppl, time.perf_counter() - t0))

        def ref_logits(chunk):
            eng = ReferenceEngine(weights, n_ctx=512)
            return eng.eval(chunk, all_logits=True)

        run("edge reference (f32)", ref_logits)
        tmp = Path(tempfile.mkdtemp(prefix="edge-ppl-"))
        for t in args.types.split(","):
            gguf = tmp / f"m-{t}.gguf"
            write_gguf(weights, args.model / "tokenizer.json", gguf, outtype=t, bos_id=0, eos_id=0)
            be = LlamaCppBackend(gguf, n_ctx=512, n_threads=args.threads, all_logits=True)

            def llama_logits(chunk, be=be):
                be.truncate(0)
                return be.eval_all(chunk)

            run(f"llama.cpp {t} ({gguf.stat().st_size / 2**20:.1f} MiB)", llama_logits)
            be.close()
            gguf.unlink()
        tmp.rmdir()
    print(f"held-out: {len(corpus.heldout_files)} files, {len(held):,} tokens, 256-token windows")
    print(f"{'system':34s} {'perplexity':>10s} {'seconds':>8s}")
    for name, ppl, secs in rows:
        print(f"{name:34s} {ppl:10.2f} {secs:8.1f}")
    print(f"{'unigram baseline (add-one)':34s} {unigram:10.2f}")


if __name__ == "__main__":
    main()
