"""``edge deploy`` and ``edge bench``: profile -> plan -> bundle -> smoke run, and predicted vs measured.

A facade over every layer (device, plan, build, the SDK's loading), so it sits beside the SDK:
the bundle it writes carries its plan (plan.json), and loading that bundle runs the plan.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.formats.bundle import no_progress
from edge.plan.planner import Plan, plan
from edge.planned import read_plan, write_plan

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("


def deploy(model, out: Path | None, *, device: str = "auto", budget_bytes: int | None = None, context: int = 2048,
           backend: str = "auto", force: bool = False, peers: list[str] | str | None = None,
           say=no_progress) -> tuple[Plan, Path, dict]:
    """Plan ``model`` for ``device`` within ``budget_bytes`` (``backend`` "auto" lets the planner
    choose), build the bundle the plan needs at ``out``, write plan.json into it, smoke-run it.
    With ``peers``, the plan is a group's (:func:`deploy_group`). Returns (plan, bundle folder,
    smoke-run measurements)."""
    from edge.builder.bundles import build
    from edge.formats.bundle import read_manifest
    from edge.sources import read_spec, resolve

    src = resolve(model)
    if src.kind == "bundle":
        raise EdgeError(f"{src.path} is already a bundle; deploy a checkpoint or a GGUF file")
    if peers is not None:
        if device != "auto" or backend not in ("auto", "llamacpp"):
            raise EdgeError("a group is planned from this device's and its peers' measurements on llama.cpp's RPC "
                            "backend: --peers takes neither --device NAME nor --backend offload")
        return deploy_group(src, out, peers, budget_bytes=budget_bytes, context=context, force=force, say=say)
    spec = read_spec(src)
    say("profiling the device")
    prof = _device(device)
    first = plan(spec, prof, budget_bytes=budget_bytes, context=context, model_name=src.name, backend=backend)
    out = Path(out or f"{src.name}-{first.backend}")
    say(f"building a {first.backend} bundle")
    if first.backend == "llamacpp":  # a GGUF is bundled as it is; a checkpoint becomes Q4_1
        build(src.path, out, format="gguf", weight_type=None if src.kind == "gguf" else "q4_1", force=force,
              progress=say)
        final = first
    elif first.backend == "ort":  # int4 ONNX: QMoE experts, MatMulNBits trunk
        build(src.path, out, format="onnx", weight_type="int4", force=force, progress=say)
        final = first
    else:
        build(src.path, out, format="offload", force=force, progress=say)
        loc = read_manifest(out).locality  # now measured: plan again with it, and the store's read speed
        if device == "auto":
            from edge.device.profile import at_bundle

            prof = at_bundle(prof, out)
        final = plan(spec, prof, budget_bytes=budget_bytes, context=context, model_name=src.name, locality=loc,
                     backend="offload")
    write_plan(out, final)
    say("smoke run")
    smoke = measure_fresh(out, tokens=16)
    return final, out, smoke


def deploy_group(src, out: Path | None, peers: list[str] | str, *, budget_bytes: int | None, context: int,
                 force: bool, say=no_progress) -> tuple[Plan, Path, dict]:
    """A gguf bundle whose plan runs it across this device and ``peers`` (measured first, so an
    unreachable cluster fails before anything is written); the split is planned on the bundle's
    GGUF and placed again, on fresh measurements, each time the bundle loads."""
    import shutil

    from edge.builder.bundles import build
    from edge.d2d.planning import gguf_layers
    from edge.device.profile import cached_profile
    from edge.formats.bundle import read_manifest
    from edge.sdk.group import cluster_identity, measure_peers, parse_peers, plan_group, split_text

    peers = parse_peers(peers)
    if peers != "auto":  # before building: every member named answers (a deployment names its group)
        say("measuring the peers")

        def unreachable(address: str, e: EdgeError):
            raise e

        measure_peers(cluster_identity(), peers, rounds=3, unreachable=unreachable)
    prof = cached_profile()
    out = Path(out or f"{src.name}-d2d")
    existed = out.exists()
    say("building a gguf bundle")
    build(src.path, out, format="gguf", weight_type=None if src.kind == "gguf" else "q4_1", force=force, progress=say)
    try:
        gguf = out / read_manifest(out).weights_file().path
        say("placing the layers")
        g = gguf_layers(gguf, context)
        _, infos, me, split, placement = plan_group(gguf, peers, n_ctx=context, budget=budget_bytes)
        here = split.layers.get("this device", 0)
        p = Plan(src.name, prof.cpu_model, "d2d", "gguf" if src.kind == "gguf" else "q4_1", 4,
                 int(budget_bytes if budget_bytes is not None else me["free_bytes"]), context, prof.cores_physical,
                 None, 0, g.coordinator_bytes + here * g.layer_bytes, 1 / split.predicted_s,
                 (split_text(split), *split.reasons), peers=tuple(i.address for i in infos))
        write_plan(out, p)
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    say("smoke run")
    return p, out, measure_fresh(out, tokens=16)


def _device(device: str):
    if device == "auto":
        from edge.device.profile import cached_profile

        return cached_profile()
    from edge.device.profiles import device_profile

    return device_profile(device)


def planned(bundle: Path) -> Plan:
    """A deployed bundle's plan; a bundle without one is an error (bench compares a plan with
    measurements)."""
    p = read_plan(bundle)
    if p is None:
        raise EdgeError(f"{bundle} has no plan.json: make it with `edge deploy` (edge bench compares a plan's "
                        f"predictions with measurements)")
    return p


def measure_fresh(bundle: Path, **kw) -> dict:
    """:func:`measure` in a fresh process, as a user's ``edge run`` finds the machine: the deploying
    process still holds what building took (the checkpoint read, the calibration run), which a
    plan's budget does not include."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, initializer=_warnings_to_stderr) as pool:
        return pool.apply(measure, (Path(bundle),), kw)


def _warnings_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


def measure(bundle: Path, *, tokens: int = 64, runs: int = 1) -> dict:
    """Run the bundle as planned (edge.load follows its plan.json): time to first token, decode tokens/s (greedy), peak RSS. With
    ``runs`` > 1, medians: each run starts from an empty context and, on the offload engine, an
    empty expert cache, as a freshly loaded engine does (what a plan predicts). One load serves
    all runs: the engine sizes its cache from the process's memory, which a second load in the
    same process would find taken by the first. This VM's decode speed flips between modes from
    one run to the next (the default model: ~3,100 or ~4,800 tok/s, docs/planner.md)."""
    import statistics

    from edge.sdk import load

    ttfts, speeds = [], []
    t0 = time.perf_counter()
    with load(bundle) as m:  # the bundle's plan.json: as planned
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
