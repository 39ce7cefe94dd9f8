"""``edge peer serve`` (this device lends its CPU and memory to a cluster) and ``edge peers`` (the
members this coordinator can reach, with their measured links; ``edge peers pair`` admits one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge.cli.output import err, out
from edge.errors import EdgeError

peer_app = typer.Typer(no_args_is_help=True, help="This device as a peer: lend its CPU and memory to a cluster.")
peers_app = typer.Typer(invoke_without_command=True,
                        help="The peers of this device's cluster, their links and memory; 'pair' admits one.")

IdentityOpt = typer.Option(None, "--identity", help="Identity folder (keys, certificates; default: the edge cache's d2d/).")


def _identity(folder: Optional[Path]):
    from edge.d2d.identity import Identity
    from edge.paths import cache_dir

    return Identity(folder or cache_dir("d2d"))


@peer_app.command("serve")
def peer_serve(host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on for members."),
               port: int = typer.Option(50600, "--port"),
               name: Optional[str] = typer.Option(None, "--name", help="This device's name in the cluster (default: host name)."),
               threads: Optional[int] = typer.Option(None, "--threads", help="Threads llama.cpp's RPC server computes with."),
               advertise: bool = typer.Option(True, "--advertise/--no-advertise", help="Announce this peer by mDNS."),
               profile: bool = typer.Option(True, "--profile/--no-profile", help="Measure this device (edge profile, cached a day) so coordinators can place layers by its speed."),
               anchor: bool = typer.Option(False, "--anchor/--no-anchor", help="This device coordinates a group of its own: members nearer to it than to a coordinator asking form its group and are left out of the asker's."),
               identity: Optional[Path] = IdentityOpt) -> None:
    """Run the peer agent: pairing first if this device is in no cluster yet (it shows the code to
    type on the coordinator), then mutual TLS for members only, llama.cpp's RPC server on loopback."""
    import asyncio
    import logging

    from edge.d2d.agent import Agent

    logging.getLogger("edge.d2d").setLevel(logging.INFO)
    agent = Agent(_identity(identity), host=host, port=port, name=name, threads=threads, advertise=advertise,
                  measure_profile=profile, anchor=anchor, say=lambda m: err.print(m, markup=False, soft_wrap=True))
    try:
        asyncio.run(agent.run())
    except OSError as e:
        raise EdgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@peers_app.command("pair")
def peers_pair(address: str = typer.Argument(..., help="HOST or HOST:PORT of the device showing the code."),
               code: str = typer.Option(..., "--code", help="The pairing code the device shows."),
               identity: Optional[Path] = IdentityOpt) -> None:
    """Admit the device at ADDRESS to this coordinator's cluster (made on first use)."""
    from edge.d2d.client import parse_address
    from edge.d2d.pairing import pair_with

    host, port = parse_address(address, 50600)
    name = pair_with(_identity(identity), host, port, code)
    out.print(f"paired: {name} ({host}:{port}) is a member of this cluster", markup=False)


@peers_app.callback()
def peers(ctx: typer.Context,
          peer: Optional[list[str]] = typer.Option(None, "--peer", help="HOST:PORT of a member (repeat); default: mDNS discovery."),
          seconds: float = typer.Option(2.0, "--discover-seconds", help="How long to listen for mDNS announcements."),
          rounds: int = typer.Option(10, "--rounds", help="Round trips per RTT measurement (median)."),
          model: Optional[Path] = typer.Option(None, "--model", "-m", help="A GGUF: also show how its layers would be split over this device and the peers."),
          n_ctx: int = typer.Option(2048, "--ctx", help="--model: the context the split holds KV cache for."),
          as_json: bool = typer.Option(False, "--json"),
          identity: Optional[Path] = IdentityOpt) -> None:
    """List the reachable members: round-trip time, throughput, free memory, threads, the group
    each is in (by distance, around this device and the members started with --anchor); with
    --model, the layers each would run in this device's group and why."""
    if ctx.invoked_subcommand is not None:
        return
    from edge.d2d.discovery import discover
    from edge.sdk.group import group_of, measure_peers, this_device

    me = _identity(identity)
    if not me.paired:
        raise EdgeError(f"this device is in no cluster ({me.folder}): pair a peer first with "
                        "'edge peers pair HOST --code CODE'")
    addresses = list(peer or []) or discover(me, seconds)
    if not addresses:
        raise EdgeError(f"no peers of this cluster found by mDNS in {seconds:.0f} s; give them with --peer HOST:PORT "
                        "where multicast is blocked")
    errors: list[dict] = []
    infos = measure_peers(me, addresses, rounds=rounds, require=False,
                          unreachable=lambda a, e: errors.append({"peer": "?", "address": a, "error": str(e)}))
    mine, anchor_of, notes = group_of(me, infos)
    rows = [{"peer": i.name, "address": i.address, "rtt_ms": i.link.rtt_s * 1e3, "mbit_s": i.link.bytes_per_s * 8 / 1e6,
             "free_bytes": i.free_bytes, "threads": i.threads, "anchor": i.anchor, "group": anchor_of[i.name]}
            for i in infos] + errors
    reasons: list[str] = list(notes)
    if model is not None and infos:
        from edge.d2d.planning import place

        split, _ = place(model, this_device(), mine, n_ctx)
        for r in rows:
            r["layers"] = split.layers.get(r["peer"], 0) if "error" not in r else None
        reasons = [f"predicted {1 / split.predicted_s:.1f} tok/s ({split.compute_s * 1e3:.1f} ms compute + "
                   f"{split.network_s * 1e3:.1f} ms network per token)", *split.reasons, *notes]
    if as_json:
        out.print_json(json.dumps({"peers": rows, "split": reasons} if model else rows))
        return
    from rich.table import Table

    from edge.units import format_bytes

    cols = ["peer", "address", "RTT ms", "Mbit/s", "free memory", "threads", "group"] + (["layers"] if model else [])
    t = Table(*cols, box=None)
    for r in rows:
        if "error" in r:
            t.add_row(r["peer"], r["address"], r["error"], *[""] * (len(cols) - 3))
        else:
            group = "(anchor)" if r["anchor"] else r["group"]
            t.add_row(r["peer"], r["address"], f"{r['rtt_ms']:.2f}", f"{r['mbit_s']:.0f}",
                      format_bytes(r["free_bytes"]), str(r["threads"]), group, *([str(r["layers"])] if model else []))
    out.print(t)
    for line in reasons:
        out.print(f"  {line}", markup=False)
