"""llama.cpp's RPC server on this device's CPU, bound to loopback, in a process of its own.

    python -m edge.d2d.rpc_server --port 50052 --threads 2

It is started and watched by the peer agent (edge.d2d.agent), which is the only way in from the
network: llama.cpp's RPC server has no authentication ("never run the RPC server on an open
network"), so it never binds beyond 127.0.0.1. Its own process, because a malformed message makes
ggml abort the process it runs in.
"""

from __future__ import annotations

import argparse
import ctypes

from edge._llamacpp import die_with_parent, ggml_registry, rpc_proc

CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


def serve(port: int, threads: int, cache_dir: str | None = None) -> None:
    """Blocks serving llama.cpp's RPC protocol on 127.0.0.1:port with this CPU. With ``cache_dir``,
    tensors over 10 MiB are kept there by hash, so a model's weights cross the network once per
    device, not once per load (llama.cpp's SET_TENSOR_HASH)."""
    g = ggml_registry()
    start = rpc_proc("ggml_backend_rpc_start_server",
                     ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                      ctypes.POINTER(ctypes.c_void_p)))
    cpu = g.ggml_backend_dev_by_type(CPU)
    start(f"127.0.0.1:{port}".encode(), cache_dir.encode() if cache_dir else None, threads, 1,
          (ctypes.c_void_p * 1)(cpu))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="keep received tensors here by hash (sent once per device)")
    a = ap.parse_args()
    die_with_parent()
    serve(a.port, a.threads, a.cache_dir)


if __name__ == "__main__":
    main()
