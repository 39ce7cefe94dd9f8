"""A deployed bundle runs as planned: its plan.json (written by ``edge deploy``) becomes the settings
the runtime gets. A setting the caller gives explicitly overrides that one setting, and each such
choice is said once, in :attr:`RunSettings.notes`, which the CLI prints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge.errors import BundleError, EdgeError, read_json_object
from edge.hardware import default_threads
from edge.plan.planner import Plan, plan_from_dict, slots_text
from edge.runtime.offload.options import OffloadOptions
from edge.units import format_bytes

PLAN_FILE = "plan.json"  # beside the manifest: what the bundle was deployed for
DEFAULT_CTX = 2048


def read_plan(bundle: Path) -> Plan | None:
    """The bundle's plan, None if it has no plan.json; an unreadable one is a BundleError."""
    path = Path(bundle) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return plan_from_dict(read_json_object(path, BundleError), str(path))
    except BundleError:
        raise
    except EdgeError as e:
        raise BundleError(str(e)) from None


def write_plan(bundle: Path, p: Plan) -> None:
    """plan.json into ``bundle``, whole or not at all (written aside, then renamed)."""
    path = Path(bundle) / PLAN_FILE
    tmp = path.with_name(f".{PLAN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(p.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def offload_options(p: Plan) -> OffloadOptions:
    """The offload engine's options for a plan: its cache slots, every expert at the plan's bits
    (the plan prices loads at those bits; HEBF would serve cold experts at fewer, faster than
    planned) and the prefetcher on or off as planned."""
    return OffloadOptions(slots=p.cache_slots_per_layer, bits=p.bits, pin_bits=True, prefetch=p.prefetch_layers > 0)


@dataclass(frozen=True)
class RunSettings:
    n_ctx: int
    threads: int
    budget: int | None
    offload: OffloadOptions  # resolved: every field set
    notes: tuple[str, ...]


def settings(p: Plan | None, *, n_ctx: int | None, threads: int | None, budget: int | None,
             offload: OffloadOptions | None) -> RunSettings:
    """What runs: the plan's settings where the caller set nothing, the caller's where they did."""
    given = offload or OffloadOptions()
    if p is None:
        return RunSettings(n_ctx or DEFAULT_CTX, threads or default_threads(), budget, given.resolved(), ())
    notes = [f"following {PLAN_FILE} ({p.device}): " + describe(p)]
    planned = offload_options(p) if p.backend == "offload" else OffloadOptions()
    if budget is not None and p.backend == "offload" and budget != p.budget_bytes and given.slots is None:
        notes.append(f"memory budget {format_bytes(budget)} given: the expert cache is sized from it, not the "
                     f"plan's {slots_text(p.cache_slots_per_layer)} slots per layer for {format_bytes(p.budget_bytes)}")
        planned = OffloadOptions(bits=planned.bits, pin_bits=planned.pin_bits, prefetch=planned.prefetch)
    for name, value in given.given().items():
        was = getattr(planned, name)
        if was is not None and value != was:
            notes.append(f"{name} {_show(value)} given: overrides the plan's {_show(was)}")
    if threads is not None and threads != p.threads:
        notes.append(f"threads {threads} given: overrides the plan's {p.threads}")
    if n_ctx is not None and n_ctx != p.context:
        notes.append(f"context {n_ctx} given: overrides the plan's {p.context}")
    return RunSettings(n_ctx or p.context, threads or p.threads,
                       budget if budget is not None else (p.budget_bytes if p.backend in ("offload", "d2d") else None),
                       given.over(planned).resolved(), tuple(notes))


def describe(p: Plan) -> str:
    if p.backend == "d2d":
        return (f"across {len(p.peers)} peer(s) ({', '.join(p.peers)}), this device within "
                f"{format_bytes(p.budget_bytes)}, {p.threads} threads, context {p.context}")
    if p.backend != "offload":
        return f"{p.backend}, {p.threads} threads, context {p.context}"
    return (f"offload, cache {slots_text(p.cache_slots_per_layer)} experts/layer, {p.bits}-bit experts, "
            f"prefetch {'on' if p.prefetch_layers else 'off'}, {p.threads} threads, budget "
            f"{format_bytes(p.budget_bytes)}, context {p.context}")


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return slots_text(v)
    return str(v)
