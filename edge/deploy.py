"""``edge deploy`` and ``edge bench``: profile -> plan -> bundle -> smoke run, and predicted vs measured."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.planner import Plan, plan

PLAN_FILE = "plan.json"  # written beside the manifest: what the bundle was built for
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("


def deploy(model, out: Path | None, *, device: str = "auto", budget_bytes: int | None = None, context: int = 2048,
           force: bool = False, say=lambda msg: None) -> tuple[Plan, Path, dict]:
    import edge
    from edge.bundle import read_manifest
    from edge.sources import read_spec, resolve

    src = resolve(model)
    if src.kind != "hf":
        raise EdgeError("edge deploy builds from a Hugging Face checkpoint (or the embedded default model)")
    spec = read_spec(src)
    say("profiling the device")
    prof = _device(device)
    first = plan(spec, prof, budget_bytes=budget_bytes, context=context, model_name=src.name)
    out = Path(out or f"{src.name}-{first.backend}")
    say(f"building a {first.backend} bundle")
    if first.backend == "llamacpp":
        edge.build(src.path, out, format="gguf", weight_type="q4_1", force=force, progress=say)
        final = first
    else:
        edge.build(src.path, out, format="offload", force=force, progress=say)
        loc = read_manifest(out).locality  # now measured: plan again with it, and the store's read speed
        if device == "auto":
            from edge.profile import at_bundle

            prof = at_bundle(prof, out)
        final = plan(spec, prof, budget_bytes=budget_bytes, context=context, model_name=src.name, locality=loc)
    (out / PLAN_FILE).write_text(json.dumps(asdict(final), indent=2) + "\n")
    say("smoke run")
    smoke = measure(out, final, tokens=16)
    return final, out, smoke


def _device(device: str):
    if device == "auto":
        from edge.profile import cached_profile

        return cached_profile()
    from edge.devices import device_profile

    return device_profile(device)


def read_plan(bundle: Path) -> Plan:
    path = Path(bundle) / PLAN_FILE
    if not path.is_file():
        raise EdgeError(f"{bundle} has no {PLAN_FILE}: make it with `edge deploy` (edge bench compares a plan's "
                        f"predictions with measurements)")
    data = json.loads(path.read_text())
    data["reasons"] = tuple(data.get("reasons", ()))
    if data.get("cache_slots_per_layer") is not None:
        data["cache_slots_per_layer"] = tuple(data["cache_slots_per_layer"])
    return Plan(**data)


def measure(bundle: Path, p: Plan, *, tokens: int = 64, runs: int = 1) -> dict:
    """Run the bundle as planned: time to first token, decode tokens/s (greedy), peak RSS. With
    ``runs`` > 1, medians: each run starts from an empty context and, on the offload engine, an
    empty expert cache, as a freshly loaded engine does (what a plan predicts). One load serves
    all runs: the engine sizes its cache from the process's memory, which a second load in the
    same process would find taken by the first. This VM's decode speed flips between modes from
    one run to the next (the default model: ~3,100 or ~4,800 tok/s, docs/planner.md)."""
    import statistics

    import edge
    from edge.sdk import planned_options

    budget = p.budget_bytes if p.backend == "offload" else None
    offload = planned_options(p) if p.backend == "offload" else None
    ttfts, speeds = [], []
    t0 = time.perf_counter()
    with edge.load(bundle, n_ctx=min(p.context, 2048), n_threads=p.threads, memory_budget=budget,
                   offload=offload) as m:
        ids = m.tokenize(PROMPT)
        t_loaded = time.perf_counter()
        be = m.backend
        for _ in range(runs):
            be.truncate(0)
            if hasattr(be, "set_cache"):  # the offload engine: empty caches of the same sizes and bits
                be.set_cache(be.config.slots, be.config.bits)
            t1 = time.perf_counter()
            logits = be.eval(ids)
            first = int(np.argmax(logits))
            t2 = time.perf_counter()
            out = [first]
            for _ in range(tokens):
                logits = be.eval([out[-1]])
                out.append(int(np.argmax(logits)))
            t3 = time.perf_counter()
            ttfts.append(t2 - t1)
            speeds.append(tokens / (t3 - t2))
        text = m.detokenize(out)
    med = statistics.median
    return {"load_s": t_loaded - t0, "ttft_s": med(ttfts), "decode_tok_s": med(speeds), "runs": runs,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "text": text}
