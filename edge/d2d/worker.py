"""The child process that runs a GGUF across a group: llama.cpp with some layers on this CPU and
the rest on the members' RPC servers (through the coordinator's tunnels, edge.d2d.relay).

It exists because llama.cpp aborts the whole process when an RPC server stops answering
(GGML_ABORT in ggml-rpc.cpp; llama.cpp #25938): the SDK's process must survive that, so the
model lives here and the parent (edge.d2d.backend) supervises it.

Protocol on stdin/stdout, length-prefixed frames (4-byte big-endian length, then the payload):
    parent -> child  JSON {"gguf", "rpc_layers": [[endpoint, layers], ...], "n_ctx", "threads", "extra_bufts",
                           "default_split": bool (llama.cpp splits every layer over the endpoints itself)}
    child -> parent  JSON {"ready": true, "n_vocab", "n_ctx", "load_s"}  or  {"error": "..."}
    parent -> child  JSON {"eval": [token, ...]} | {"truncate": n}
    child -> parent  the logits after the last token, float32 little-endian (eval); b"" (truncate)
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time


def read_frame(f) -> bytes | None:
    head = f.read(4)
    if len(head) < 4:
        return None
    n = struct.unpack(">I", head)[0]
    data = f.read(n)
    return data if len(data) == n else None


def write_frame(f, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + data)
    f.flush()


def _rpc(cfg: dict) -> dict:
    if cfg.get("default_split"):
        return {"rpc_default_split": tuple(ep for ep, _ in cfg["rpc_layers"])}
    return {"rpc_layers": tuple((ep, int(n)) for ep, n in cfg["rpc_layers"])}


def main() -> None:
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the frames' own descriptor; fd 1 (llama.cpp's prints) goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import numpy as np

    from edge._llamacpp import die_with_parent
    from edge.errors import EdgeError
    from edge.runtime.llamacpp import LlamaCppBackend, LoadOptions

    die_with_parent()
    cfg = json.loads(read_frame(inp) or b"{}")
    t0 = time.perf_counter()
    try:
        be = LlamaCppBackend(cfg["gguf"], n_ctx=int(cfg["n_ctx"]), n_threads=int(cfg["threads"]),
                             load=LoadOptions(extra_bufts=cfg.get("extra_bufts"), **_rpc(cfg)))
    except EdgeError as e:
        write_frame(out, json.dumps({"error": str(e)}).encode())
        return
    write_frame(out, json.dumps({"ready": True, "n_vocab": be.n_vocab, "n_ctx": be.n_ctx,
                                 "load_s": time.perf_counter() - t0}).encode())
    while (frame := read_frame(inp)) is not None:
        req = json.loads(frame)
        if "eval" in req:
            logits = be.eval(req["eval"])
            write_frame(out, np.ascontiguousarray(logits, dtype="<f4").tobytes())
        elif "truncate" in req:
            be.truncate(int(req["truncate"]))
            write_frame(out, b"")
    be.close()


if __name__ == "__main__":
    main()
