"""BitStack block ordering: the cheap error proxy against the perplexity-guided greedy ordering.

    python bench/bitstack_order.py            # ~minutes on 2 cores (the greedy ordering dominates)

On the embedded default model, its 16 attention matrices are decomposed (k = 16, 16 blocks each,
activation-aware scales from the calibration text edge uses for offload bundles). Global orders
are built: ``order_by_error`` (largest drop of the scaled squared error per byte, relative to
each matrix's own norm: what bundles use; the absolute-error variant is shown beside it) and
``order_by_loss`` (greedy: at every step, every matrix's next block is tried and the one that lowers
calibration perplexity most per byte is taken — BitStack's perplexity-guided sorting, evaluated
exhaustively). Then held-out perplexity (text neither ordering saw: the default model's held-out
stdlib files) at three stack sizes. The proxy is acceptable if it is within 2% of the greedy
order at each size. The last line: max_gap_pct=<largest (proxy - greedy) / greedy in %>.
Results: docs/bitstack.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from edge.builder.offload import calibration_tokens  # noqa: E402
from edge.builder.stack import STACK_FIELDS, input_scales  # noqa: E402
from edge.formats.hf import load_weights  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.quant.bitstack import block_bytes, decompose, levels_at, order_by_error, order_by_loss, reconstruct  # noqa: E402
from edge.runtime.perplexity import perplexity  # noqa: E402
from edge.runtime.reference import ReferenceEngine  # noqa: E402
from edge.runtime.tokenizer import HFTokenizer  # noqa: E402


def held_out_tokens(tok: HFTokenizer, n: int) -> list[int]:
    """The held-out stdlib files bench/perplexity.py scores (calibration reads training files)."""
    from edge.data.corpus import EOT, stdlib_corpus, token_stream

    (eot,) = tok.encode(EOT)
    return token_stream(tok.encode, stdlib_corpus().heldout_texts(), eot)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=1024, help="tokens the greedy ordering scores with")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    d = default_model_path()
    weights = load_weights(d)
    tok = HFTokenizer(d / "tokenizer.json")
    calib = calibration_tokens(tok)
    held = held_out_tokens(tok, args.eval_tokens + 1)
    t0 = time.perf_counter()
    scales_in = input_scales(weights, calib)
    mats, blocks, errors, nbytes = [], [], [], []
    for i, lw in enumerate(weights.layers):
        for name in STACK_FIELDS:
            w = np.asarray(getattr(lw, name), np.float32)
            s = scales_in[(i, "wo" if name == "wo" else "wq")]
            bl, err = decompose(w, s)
            mats.append((i, name, s))
            blocks.append(bl)
            errors.append(err)
            nbytes.append(block_bytes(w.shape, 16))
    print(f"decomposed {len(mats)} matrices in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def model_at(levels: list[int]):
        wts = copy.copy(weights)
        wts.layers = [copy.copy(lw) for lw in weights.layers]
        for (i, name, s), bl, lv in zip(mats, blocks, levels):
            setattr(wts.layers[i], name, reconstruct(bl[:lv], s))
        return wts

    def ppl_of(wts, ids: list[int]) -> float:
        eng = ReferenceEngine(wts, n_ctx=512)

        def all_logits(window):
            eng.truncate(0)
            return eng.eval(list(window), all_logits=True)

        return perplexity(all_logits, ids, window=256)

    def ppl(levels: list[int], ids: list[int]) -> float:
        return ppl_of(model_at(levels), ids)

    calib_ids = calib[: args.calib_tokens + 1]
    proxy = order_by_error(errors, nbytes)  # relative error: what bundles use
    proxy_abs = order_by_error(errors, nbytes, relative=False)
    t0 = time.perf_counter()
    greedy = order_by_loss([len(b) for b in blocks], nbytes, lambda lv: ppl(lv, calib_ids),
                           progress=lambda i, n: print(f"\rgreedy ordering {i}/{n}", end="", file=sys.stderr))
    print(f"\ngreedy ordering took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    total = len(proxy)
    lo = len(mats)
    sizes = [lo + (total - lo) * f // 8 for f in (1, 2, 4)]
    full = ppl([len(b) for b in blocks], held)
    original = ppl_of(weights, held)
    print(f"default model, {len(mats)} attention matrices, k=16, 16 blocks each; held-out perplexity on "
          f"{len(held) - 1} tokens (original weights: {original:.3f}, full stack: {full:.3f})")
    print(f"{'blocks':>6} {'MB':>6} {'proxy ppl':>10} {'greedy ppl':>11} {'gap':>7} {'abs-error proxy':>16} {'gap':>7}")
    worst = -1e9
    for n in sizes:
        pa, pb, pc = (levels_at(o, n, len(mats)) for o in (proxy, greedy, proxy_abs))
        mb = sum(nbytes[j] * pa[j] for j in range(len(mats))) / 1e6
        a, b, c = ppl(pa, held), ppl(pb, held), ppl(pc, held)
        gap = (a - b) / b * 100
        worst = max(worst, gap)
        print(f"{n:6d} {mb:6.2f} {a:10.3f} {b:11.3f} {gap:6.2f}% {c:16.3f} {(c - b) / b * 100:6.2f}%")
    print(f"max_gap_pct={worst:.2f}")


if __name__ == "__main__":
    main()
