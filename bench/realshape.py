"""MoE GGUFs larger than the memory they may use, at real models' shapes: edge against llama.cpp at its
best setting, inside one cgroup-v1 memory cap, in one run.

    sudo python bench/realshape.py                   # models B then A; builds inputs once into --root
    sudo python bench/realshape.py --models B --runs 3
    sudo python bench/realshape.py --models C --systems gguf   # the planner's error on an untuned shape
    sudo python bench/realshape.py --models A --systems bundle --merge  # add rows to A's recorded run
    sudo python bench/realshape.py --models A --llama-modes mmap/on/off  # llama.cpp: only the sweep's fastest

Models (bench/moe_gguf.py, random weights quantized by ggml at llama.cpp's Q4_K_M mix): A has
Qwen3-30B-A3B's exact shape (17.3 GiB), capped at 8 GiB; B has OLMoE-1B-7B's (3.9 GiB), capped at
40% of its file. Systems, each in a fresh process inside the cap, page cache dropped first, 2
threads, the same prompt, 64 greedy tokens:

* llama.cpp on the GGUF, every combination of its own answers to "larger than memory"
  (``load_mode`` mmap / none / direct_io, ``lazy_mode`` off / auto / on, ``use_extra_bufts`` off /
  on) run once; the fastest is run ``--runs`` times; the baseline is the combination fastest by
  its median (a single run of another may beat the fastest run's median);
* edge straight from the GGUF (``--memory-budget`` = the cap);
* edge from a nested offload bundle built from that GGUF (``--max-bits 4``; HEBF 4 -> 2 bits).

Reported: decode tok/s (median), time to first token, bytes read from storage per decoded token
(/proc/self/io: page faults and O_DIRECT reads alike), edge's cache hit rate, peak memory (the
cgroup's, page cache included, and the process's RSS), and the I/O bound: the decode speed the
disk's O_DIRECT sequential bandwidth allows at that many bytes per token, and how much of it each
system reaches. Then the teacher-forced agreement of edge's next-token distribution with
llama.cpp's on the same file (64 positions, top-1 and mean KL), and the planner's prediction for
edge from the GGUF. Results: docs/realshape.md. The last line is machine-readable:
realshape_ratio=<edge from the GGUF / llama.cpp, model A>.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import moe_gguf  # noqa: E402
from cgroup import MemoryCap, drop_caches  # noqa: E402

GiB = 1 << 30
LLAMA_MODES = [dict(load_mode=lm, lazy_mode=lz, extra_bufts=eb)
               for lm, lz, eb in itertools.product(("mmap", "none", "direct_io"), ("off", "auto", "on"), (False, True))
               if lm == "mmap" or lz == "off"]  # lazy reading needs mmap (llama.h)
SYSTEMS = frozenset({"llamacpp", "gguf", "bundle"})


class AnonPeak:
    """The largest anonymous memory (the cgroup's memory.stat ``rss``: no page cache, no mapped file
    pages) of a group's processes, sampled every 0.2 s: what a build really holds, where the peak
    RSS of /usr/bin/time also counts the pages of files it has mapped."""

    def __init__(self, group: Path):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._path = group / "memory.stat"
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                rss = next(int(x.split()[1]) for x in self._path.read_text().splitlines() if x.startswith("rss "))
            except (OSError, StopIteration):
                continue
            self.peak = max(self.peak, rss)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def ensure_inputs(root: Path, model: str, *, bundle_too: bool = True) -> tuple[Path, Path, dict]:
    """The model's GGUF and (``bundle_too``) its nested bundle, each built once, with what building
    the bundle cost."""
    gguf = root / f"{model}-q4_k_m.gguf"
    if not gguf.is_file():
        moe_gguf.write_model(gguf, model)
    bundle = root / f"{model}-offload"
    stats_file = root / f"{model}-offload.build.json"
    if bundle_too and not (bundle / "manifest.json").is_file():
        t0 = time.time()
        with MemoryCap(None) as group:
            anon = AnonPeak(group.path)
            p = group.run(["/usr/bin/time", "-v", sys.executable, "-m", "edge.cli", "build", str(gguf), "-o",
                           str(bundle), "--format", "offload", "--max-bits", "4", "--force"],
                          capture_output=True, text=True)
            peak = group.peak_bytes
            anon.stop()
        if p.returncode != 0:
            sys.exit(f"building {bundle} failed: {p.stderr[-800:]}")
        rss = next(int(line.split()[-1]) * 1024 for line in p.stderr.splitlines() if "Maximum resident" in line)
        stats_file.write_text(json.dumps({"seconds": round(time.time() - t0), "peak_rss_bytes": rss,
                                          "cgroup_peak_bytes": peak, "peak_anon_bytes": anon.peak}))
    return gguf, bundle, json.loads(stats_file.read_text()) if stats_file.is_file() else {}


def mode_name(mode: dict) -> str:
    return (f"llama.cpp {mode['load_mode']}, lazy {mode['lazy_mode']}, "
            f"extra bufts {'on' if mode['extra_bufts'] else 'off'}")


def parse_modes(text: str) -> list[dict]:
    """``LOAD/LAZY/BUFTS`` triples, comma-separated (``mmap/on/off``), each one of LLAMA_MODES."""
    modes = []
    for item in text.split(","):
        parts = item.split("/")
        mode = dict(load_mode=parts[0], lazy_mode=parts[1], extra_bufts=parts[2] == "on") if len(parts) == 3 else None
        if mode not in LLAMA_MODES or parts[2] not in ("on", "off"):
            sys.exit(f"error: --llama-modes: {item!r} is not LOAD/LAZY/BUFTS of "
                     + ", ".join(f"{m['load_mode']}/{m['lazy_mode']}/{'on' if m['extra_bufts'] else 'off'}"
                                 for m in LLAMA_MODES))
        modes.append(mode)
    return modes


def run(system: str, path: Path, cap: int, tokens: int, threads: int, opts: dict) -> dict:
    drop_caches()
    argv = [sys.executable, str(HERE / "_decode_one.py"), system, str(path), str(tokens), str(threads), json.dumps(opts)]
    with MemoryCap(cap) as group:
        proc = group.run(argv, capture_output=True, text=True, timeout=7200)
        peak, ooms = group.peak_bytes, group.oom_kills
    if proc.returncode != 0:
        why = "OOM-killed" if ooms else ("crashed (signal %d)" % -proc.returncode if proc.returncode < 0 else
                                         f"exit {proc.returncode}")
        return {"failed": why, "peak": peak, "stderr": proc.stderr[-300:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["peak"] = peak
    return out


def disk_mbps(path: Path) -> float:
    """O_DIRECT sequential read of the model file, 4 MiB blocks, huge-page buffer (as edge reads)."""
    from edge.device.storage import read_speeds

    drop_caches()
    return read_speeds(path, rand_seconds=0.2)["seq"]


def agreement(gguf: Path, budget: int, positions: int = 64) -> dict:
    """Teacher-forced top-1 agreement and mean KL(llama.cpp || edge) over ``positions`` positions,
    beside llama.cpp's agreement with itself (its batched logits against one token at a time): the
    numeric noise floor of this model, against which edge's agreement reads."""
    import numpy as np

    from edge.data.corpus import stdlib_corpus
    from edge.runtime.llamacpp import LlamaCppBackend
    from edge.runtime.offload.open import open_gguf
    from edge.runtime.offload.options import OffloadOptions

    ll = LlamaCppBackend(gguf, n_ctx=256, n_threads=2, all_logits=True)
    ids = ll.model.tokenize(stdlib_corpus().heldout_texts()[1][:4000].encode(), add_bos=False, special=False)[:positions]
    theirs = ll.eval_all(ids)
    ll.truncate(0)
    one_by_one = np.stack([ll.eval([t]) for t in ids])
    ll.close()
    eng = open_gguf(gguf, budget=budget, options=OffloadOptions(prefetch=False).resolved(), n_ctx=256, threads=2)
    try:
        ours = eng.eval(ids, all_logits=True)
    finally:
        eng.close()

    def lsm(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    def compare(a, b) -> tuple[float, float]:
        p, q = lsm(a), lsm(b)
        return float((a.argmax(1) == b.argmax(1)).mean()), float((np.exp(p) * (p - q)).sum(axis=1).mean())

    (top1, kl), (self_top1, self_kl) = compare(theirs, ours), compare(theirs, one_by_one)
    return {"top1": top1, "kl": kl, "llamacpp_self_top1": self_top1, "llamacpp_self_kl": self_kl, "positions": len(ids)}


def planned(gguf: Path, budget: int) -> dict:
    """The planner's prediction for edge straight from the GGUF, as `edge plan GGUF --budget` makes
    it: this machine's profile (measured now) with the expert reads timed on this file, the routing
    recorded while the runs above ran."""
    from edge.device.profile import at_gguf, cached_profile
    from edge.formats.gguf_read import open_reader, read_spec, stored_experts
    from edge.plan.planner import plan
    from edge.routing import planning_locality

    reader = open_reader(gguf)
    spec = read_spec(gguf, reader)
    p = plan(spec, at_gguf(cached_profile(refresh=True), gguf, reader), budget_bytes=budget, context=512, backend="offload",
             model_name=gguf.stem, stored=stored_experts(reader, spec), locality=planning_locality(gguf) or None)
    return {"decode_tok_s": p.predicted_decode_tok_s, "loads_per_token": p.predicted_loads_per_token,
            "slots": list(p.cache_slots_per_layer), "reasons": list(p.reasons)}


def med(results: list[dict], key: str):
    vals = [r[key] for r in results if "failed" not in r]
    return statistics.median(vals) if vals else None


def bench_model(model: str, root: Path, runs: int, tokens: int, threads: int, say,
                systems: frozenset[str] = SYSTEMS, llama_modes: list[dict] = LLAMA_MODES) -> dict:
    gguf, bundle, build = ensure_inputs(root, model, bundle_too="bundle" in systems)
    size = gguf.stat().st_size
    cap = 8 * GiB if model == "A" else int(0.4 * size)
    disk = disk_mbps(gguf)
    rows: dict[str, list[dict]] = {}
    best = None
    if "llamacpp" in systems:
        for mode in llama_modes:
            r = run("llamacpp", gguf, cap, tokens, threads, mode)
            rows[mode_name(mode)] = [r]
            say(f"{model} {mode_name(mode)}: {r.get('decode_tok_s', r.get('failed'))}")
        ok = {n: r[0]["decode_tok_s"] for n, r in rows.items() if "failed" not in r[0]}
        best = max(ok, key=ok.get) if ok else None
        if best:
            mode = llama_modes[list(rows).index(best)]
            rows[best] += [run("llamacpp", gguf, cap, tokens, threads, mode) for _ in range(runs - 1)]
    edge_systems = {"edge, straight from the GGUF": ("gguf", gguf, {"memory_budget": cap, "backend": "offload"}),
                    "edge, nested bundle from the GGUF": ("bundle", bundle, {"memory_budget": cap})}
    for name, (key, path, opts) in edge_systems.items():
        if key in systems:
            rows[name] = [run("edge", path, cap, tokens, threads, dict(opts)) for _ in range(runs)]
            say(f"{model} {name}: {[r.get('decode_tok_s', r.get('failed')) for r in rows[name]]}")
    return {"model": model, "size": size, "cap": cap, "disk_mbps": disk, "rows": rows, "best": best, "build": build,
            "agreement": agreement(gguf, cap) if "llamacpp" in systems else None, "planned": planned(gguf, cap),
            "tokens": tokens, "runs": runs, "systems": sorted(systems),
            "ran_at": {name: time.strftime("%Y-%m-%d %H:%M") for name in rows}}


def merged(old: dict, new: dict) -> dict:
    """``new`` with the rows (and llama.cpp's agreement) of an earlier invocation on the same model,
    cap and token count that ``new`` did not run again; each row keeps the time it ran at."""
    if (old["cap"], old["tokens"]) != (new["cap"], new["tokens"]):
        sys.exit(f"error: --merge: the recorded run used cap {old['cap']} and {old['tokens']} tokens, "
                 f"this one {new['cap']} and {new['tokens']}")
    rows = {n: rs for n, rs in old["rows"].items() if n not in new["rows"]} | new["rows"]
    ran_at = {n: t for n, t in old.get("ran_at", {}).items() if n not in new["rows"]} | new["ran_at"]
    return new | {"rows": rows, "ran_at": ran_at, "agreement": new["agreement"] or old.get("agreement"),
                  "build": new["build"] or old.get("build"), "systems": sorted(set(old["systems"]) | set(new["systems"]))}


def table(res: dict) -> list[str]:
    lines = []
    tokens, disk = res["tokens"], res["disk_mbps"]
    when = sorted(set(res.get("ran_at", {}).values()))
    if len(when) > 1:
        lines.append("rows ran at " + ", ".join(f"{t} ({', '.join(n for n, w in res['ran_at'].items() if w == t)})"
                                                 for t in when))
    lines.append(f"model {res['model']}: {res['size'] / GiB:.2f} GiB Q4_K_M GGUF, cap {res['cap'] / GiB:.2f} GiB, "
                 f"{tokens} tokens, median of {res['runs']} (llama.cpp combinations: 1 run each, the fastest "
                 f"{res['runs']}), disk O_DIRECT sequential {disk:.0f} MB/s"
                 + (f" (measured {res['disk_measured']})" if res.get("disk_measured") else ""))
    lines.append(f"{'system':55s} {'tok/s':>7s} {'ratio':>6s} {'TTFT s':>7s} {'MB read/tok':>11s} {'hit':>5s} "
                 f"{'cgroup MiB':>10s} {'RSS MiB':>8s} {'disk-bound tok/s':>16s} {'of bound':>8s}")
    # The baseline: the llama.cpp combination fastest by its median, the fastest single run's three
    # and the others' one each (on model B the single fastest run, 0.310 tok/s, was followed by
    # 0.242 and 0.234 while another combination's one run made 0.309: that one is the baseline)
    speeds = {n: med(rs, "decode_tok_s") for n, rs in res["rows"].items() if n.startswith("llama.cpp")}
    speeds = {n: v for n, v in speeds.items() if v}
    res["best"] = max(speeds, key=speeds.get) if speeds else None
    base = speeds.get(res["best"])
    for name, rs in res["rows"].items():
        ok = [r for r in rs if "failed" not in r]
        if not ok:
            lines.append(f"{name:55s} {rs[0]['failed']:>7s}")
            continue
        tok_s = med(rs, "decode_tok_s")
        mb = statistics.median(r["decode"]["storage_bytes"] / tokens / 1e6 for r in ok)
        hits = [r["decode"]["hits"] / max(1, r["decode"]["hits"] + r["decode"]["misses"]) for r in ok if "hits" in r["decode"]]
        bound = disk / mb if mb > 0 else float("inf")
        lines.append(f"{name:55s} {tok_s:7.2f} {tok_s / base if base else float('nan'):5.2f}x {med(rs, 'prefill_s'):7.1f} "
                     f"{mb:11.1f} {statistics.median(hits) if hits else float('nan'):5.2f} "
                     f"{statistics.median(r['peak'] for r in ok) / 2**20:10.0f} "
                     f"{statistics.median(r['peak_rss'] for r in ok) / 2**20:8.0f} {bound:16.2f} {tok_s / bound:8.0%}")
    a = res["agreement"]
    if a:
        lines.append(f"baseline: {res['best']}; teacher-forced agreement with llama.cpp over {a['positions']} positions: "
                     f"top-1 {a['top1']:.1%}, mean KL {a['kl']:.2e} nats (llama.cpp with itself, batched against "
                     f"one token at a time: {a['llamacpp_self_top1']:.1%}, {a['llamacpp_self_kl']:.2e})")
    if res["build"]:
        b = res["build"]
        anon = f", anonymous memory peak {b['peak_anon_bytes'] / 2**20:.0f} MiB" if b.get("peak_anon_bytes") else ""
        lines.append(f"nested bundle build: {b['seconds']} s, peak RSS {b['peak_rss_bytes'] / 2**20:.0f} MiB{anon}, "
                     f"cgroup peak {b['cgroup_peak_bytes'] / 2**20:.0f} MiB (page cache included)")
    pl = res["planned"]
    ok = [r for r in res["rows"].get("edge, straight from the GGUF", []) if "failed" not in r]
    if pl and pl["decode_tok_s"] and ok:
        got = med(ok, "decode_tok_s")
        loads = statistics.median(r["decode"]["loads"] / tokens for r in ok)
        lines.append(f"plan (edge plan {res['model']}.gguf --budget {res['cap'] / GiB:.2f}GiB): {pl['decode_tok_s']:.2f} "
                     f"tok/s predicted, {got:.2f} measured ({(pl['decode_tok_s'] - got) / got:+.1%}); loads/token "
                     f"{pl['loads_per_token']:.1f} planned, {loads:.1f} done")
        res["plan_error"] = (pl["decode_tok_s"] - got) / got
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/edge-bench/realshape"))
    ap.add_argument("--models", default="B,A")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default=",".join(sorted(SYSTEMS)),
                    help="which of llamacpp (every combination, then agreement), gguf (edge from the file), bundle "
                         "(edge from the nested bundle, built first) to run; the plan is always made")
    ap.add_argument("--llama-modes", default=None,
                    help="only these llama.cpp combinations, LOAD/LAZY/BUFTS comma-separated (e.g. mmap/on/off: the "
                         "fastest of a recorded sweep, run again beside edge); default: all of them")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the recorded results (--root/MODEL-results.json) for the systems not run "
                         "now; the table says when each ran")
    ap.add_argument("--disk", action="store_true",
                    help="with --replan: measure the disk's O_DIRECT sequential speed again for the I/O bound")
    ap.add_argument("--replan", action="store_true",
                    help="make the plan again for each model's recorded results (--root/MODEL-results.json) and "
                         "print its table: the plan is made now, the measurements are the recorded run's")
    args = ap.parse_args()
    systems = frozenset(args.systems.split(","))
    if not systems <= SYSTEMS:
        sys.exit(f"error: --systems takes {', '.join(sorted(SYSTEMS))}; got {args.systems}")
    if os.geteuid() != 0:
        sys.exit("error: needs root (cgroup memory limits and drop_caches)")
    args.root.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.replan:
        for model in args.models.split(","):
            res = json.loads((args.root / f"{model}-results.json").read_text())
            gguf = args.root / f"{model}-q4_k_m.gguf"
            res["planned"] = planned(gguf, res["cap"])
            if args.disk:  # the run's own reading may have met a busy disk (model A's: writeback of its build)
                res["disk_mbps"], res["disk_measured"] = disk_mbps(gguf), time.strftime("%Y-%m-%d %H:%M")
                (args.root / f"{model}-results.json").write_text(json.dumps(res, indent=1, default=str))
            print("\n".join(table(res)) + "\n", flush=True)
        return
    for model in args.models.split(","):
        results[model] = bench_model(model, args.root, args.runs, args.tokens, args.threads,
                                     lambda msg: print(msg, file=sys.stderr, flush=True), systems,
                                     parse_modes(args.llama_modes) if args.llama_modes else LLAMA_MODES)
        recorded = args.root / f"{model}-results.json"
        if args.merge and recorded.is_file():
            results[model] = merged(json.loads(recorded.read_text()), results[model])
        (args.root / f"{model}-results.json").write_text(json.dumps(results[model], indent=1, default=str))
        print("\n".join(table(results[model])), flush=True)
        print(flush=True)
    if "A" in results:
        r = results["A"]
        base = max((v for n, rs in r["rows"].items() if n.startswith("llama.cpp") and (v := med(rs, "decode_tok_s"))),
                   default=None)
        got = med(r["rows"].get("edge, straight from the GGUF", []), "decode_tok_s")
        print(f"realshape_ratio={got / base:.2f}" if got and base else "realshape_ratio=nan")


if __name__ == "__main__":
    main()
