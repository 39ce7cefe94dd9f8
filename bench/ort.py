"""ONNX Runtime against llama.cpp on the same model, same threads, side by side in one run; and
whether edge's planner picks the faster one on this machine.

    python bench/ort.py                          # the default model and the OLMoE-shaped model
    python bench/ort.py --models default --runs 5
    python bench/ort.py --report                 # print the last run's tables again

Models: the embedded default model (Mixtral architecture, 3 MiB at 4 bits) and model B of
bench/moe_gguf.py (OLMoE-1B-7B's shape, Qwen3-MoE architecture, random weights at llama.cpp's
Q4_K_M mix, 3.9 GiB; built once into --root). Systems, each run in a fresh process, the same prompt
(~126 tokens, timed as prefill), then ``--tokens`` greedy tokens (decode):

* llama.cpp (llama-cpp-python 0.3.36) at its best setting: every 4-bit GGUF of the model it can
  have (the default model: Q4_0, Q4_1 and Q4_K_M written by edge with llama.cpp's quantizer; model
  B: its Q4_K_M file) under each of its load modes (mmap, none), run once each; the fastest
  decode is run ``--runs`` times and is the baseline, its runs interleaved with ORT's;
* edge on ONNX Runtime (CPU provider): the model's int4 ONNX bundle (``edge build --format onnx``;
  model B's from its GGUF, so the same weights re-quantized), ``--runs`` times.

Reported: decode and prefill tokens/s (medians), peak RSS (median), the ratio ORT / llama.cpp, the
ONNX bundle's build time and peak memory, and the planner's choice (edge.plan with this device's
cached profile, backend auto) against the faster system measured. Results: docs/ort.md. The last
line is machine-readable: ort_ratio=<ORT / llama.cpp decode, default model>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import moe_gguf  # noqa: E402

PROMPT_REPEAT = 6  # ~126 tokens of the bench prompt
LLAMA_TYPES = ("q4_0", "q4_1", "q4_k_m")
LOAD_MODES = ("mmap", "none")


def run_one(system: str, path: Path, tokens: int, threads: int, opts: dict) -> dict:
    """One measured run in a fresh process (bench/_decode_one.py)."""
    cmd = [sys.executable, str(HERE / "_decode_one.py"), system, str(path), str(tokens), str(threads),
           json.dumps(opts | {"prompt_repeat": PROMPT_REPEAT})]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise SystemExit(f"{system} on {path.name} failed:\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["prefill_tok_s"] = r["prompt_tokens"] / r["prefill_s"]
    return r


BUILD = ("import json, resource, sys\nimport edge\nsource, out, kw = json.loads(sys.argv[1])\n"
         "edge.build(source, out, force=True, **kw)\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def build_timed(source: Path | None, out: Path, **kw) -> dict:
    """edge.build in a child process: its wall time and peak RSS."""
    t0 = time.time()
    arg = json.dumps([None if source is None else str(source), str(out), kw])
    p = subprocess.run([sys.executable, "-c", BUILD, arg], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"building {out.name} failed:\n{p.stderr[-2000:]}")
    return {"seconds": time.time() - t0, "peak_rss": int(p.stdout.strip().splitlines()[-1])}


def inputs(model: str, root: Path) -> tuple[dict[str, Path], Path, dict | None]:
    """(llama.cpp's GGUFs by type, the ONNX bundle, the bundle's build cost if built now)."""
    cost = None
    if model == "default":
        ggufs = {}
        for t in LLAMA_TYPES:
            b = root / f"default-{t}"
            if not (b / "manifest.json").is_file():
                build_timed(None, b, format="gguf", weight_type=t)
            ggufs[t] = b / "model.gguf"
        onnx, source = root / "default-onnx-int4", None
    else:
        gguf = root / "olmoe-1b-7b-shape-q4_k_m.gguf"
        if not gguf.is_file():
            moe_gguf.write_model(gguf, "B")
        ggufs, onnx, source = {"q4_k_m": gguf}, root / "olmoe-onnx-int4", gguf
    if not (onnx / "manifest.json").is_file():
        print(f"building {onnx.name} ...", flush=True)
        cost = build_timed(source, onnx, format="onnx", weight_type="int4")
    return ggufs, onnx, cost


def planner_choice(path: Path | None) -> dict:
    """edge's plan for the model (None: the default) on this device's cached profile, backend auto."""
    from edge.device.profile import cached_profile
    from edge.plan.planner import plan
    from edge.sources import read_spec, resolve

    src = resolve(path)
    p = plan(read_spec(src), cached_profile(), model_name=src.name)
    return {"backend": p.backend, "predicted_tok_s": p.predicted_decode_tok_s, "reasons": list(p.reasons)}


def bench_model(model: str, root: Path, runs: int, tokens: int, threads: int) -> dict:
    ggufs, onnx, cost = inputs(model, root)
    sweep = []
    for t, path in ggufs.items():
        for mode in LOAD_MODES:
            r = run_one("llamacpp", path, tokens, threads, {"load_mode": mode})
            sweep.append({"type": t, "load_mode": mode, "decode_tok_s": r["decode_tok_s"]})
            print(f"  llama.cpp {t} {mode}: {r['decode_tok_s']:.1f} tok/s", flush=True)
    best = max(sweep, key=lambda s: s["decode_tok_s"])
    rows: dict[str, list[dict]] = {"llama.cpp": [], "ort": []}
    for _ in range(runs):  # interleaved, so that a slow minute of this VM falls on both systems
        rows["llama.cpp"].append(run_one("llamacpp", ggufs[best["type"]], tokens, threads,
                                         {"load_mode": best["load_mode"]}))
        rows["ort"].append(run_one("edge", onnx, tokens, threads, {}))
    summary = {}
    for system, rs in rows.items():
        keys = ("decode_tok_s", "prefill_tok_s", "peak_rss")
        summary[system] = {k: statistics.median(r[k] for r in rs) for k in keys}
        summary[system]["runs"] = [round(r["decode_tok_s"], 1) for r in rs]
    choice = planner_choice(ggufs["q4_k_m"] if model != "default" else None)
    faster = max(summary, key=lambda s: summary[s]["decode_tok_s"])
    return {"model": model, "llama_best": best, "llama_sweep": sweep, "summary": summary, "onnx_build": cost,
            "onnx_bytes": sum(f.stat().st_size for f in onnx.iterdir()), "planner": choice,
            "faster": faster, "tokens": tokens, "threads": threads, "runs": runs}


def report(results: list[dict]) -> None:
    gib = 2 ** 30
    print("\n| model | system | setting | decode tok/s (median) | prefill tok/s | peak RSS | decode runs |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in results:
        for system, s in r["summary"].items():
            best = r["llama_best"]
            setting = (f"{best['type'].upper()}, load {best['load_mode']}" if system == "llama.cpp"
                       else "int4 ONNX, CPU provider")
            print(f"| {r['model']} | {system} | {setting} | {s['decode_tok_s']:.1f} | {s['prefill_tok_s']:.0f} | "
                  f"{s['peak_rss'] / gib:.2f} GiB | {s['runs']} |")
    print("\n| model | ORT / llama.cpp decode | ORT / llama.cpp prefill | planner chose | predicted tok/s | "
          "faster measured | ONNX bundle | its build |")
    print("|---|---:|---:|---|---:|---|---:|---|")
    for r in results:
        s, p = r["summary"], r["planner"]
        ratio = s["ort"]["decode_tok_s"] / s["llama.cpp"]["decode_tok_s"]
        pre = s["ort"]["prefill_tok_s"] / s["llama.cpp"]["prefill_tok_s"]
        b = r["onnx_build"]
        built = f"{b['seconds']:.0f} s, peak RSS {b['peak_rss'] / gib:.2f} GiB" if b else "(built earlier)"
        chosen = {"llamacpp": "llama.cpp", "ort": "ort"}.get(p["backend"], p["backend"])
        slower = min(s, key=lambda k: s[k]["decode_tok_s"])
        gap = s[r["faster"]]["decode_tok_s"] / s[slower]["decode_tok_s"] - 1
        mark = "right" if chosen == r["faster"] else f"WRONG, {gap:.0%} slower"
        print(f"| {r['model']} | {ratio:.2f}x | {pre:.2f}x | {p['backend']} ({mark}) | "
              f"{p['predicted_tok_s'] or 0:.1f} | {r['faster']} | {r['onnx_bytes'] / gib:.2f} GiB | {built} |")
    print("\nllama.cpp sweep (one run each):")
    for r in results:
        sweep = ", ".join(f"{s['type']}/{s['load_mode']} {s['decode_tok_s']:.1f}" for s in r["llama_sweep"])
        print(f"  {r['model']}: {sweep}")
    for r in results:
        print(f"planner on {r['model']}: " + " | ".join(r["planner"]["reasons"][-3:]))
    default = next((r for r in results if r["model"] == "default"), None)
    if default:
        s = default["summary"]
        print(f"ort_ratio={s['ort']['decode_tok_s'] / s['llama.cpp']['decode_tok_s']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/edge-bench/ort"))
    ap.add_argument("--models", default="default,B")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="print the last run's tables again")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    out = args.root / "ort-results.json"
    if args.report:
        report(json.loads(out.read_text()))
        return
    results = []
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        results.append(bench_model(model, args.root, args.runs, args.tokens, args.threads))
        out.write_text(json.dumps(results, indent=1))
    report(results)


if __name__ == "__main__":
    main()
