"""What edge takes from llama-cpp-python's native libraries, in one place: where they are, their log
lines routed to Python logging, and what this build of ggml was compiled with.

Nothing is loaded at import; each function imports llama_cpp (or opens a library) on first use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

from edge.errors import EdgeError

log = logging.getLogger("edge.llamacpp")
_log_callback = None  # the ctypes callback must outlive every llama.cpp call


def lib_dir() -> Path:
    """The folder of libllama / libggml* that llama-cpp-python installed."""
    try:
        import llama_cpp
    except ImportError as e:
        raise EdgeError(f"llama.cpp comes with llama-cpp-python, which is missing ({e})") from None
    return Path(llama_cpp.__file__).parent / "lib"


def route_llama_logs() -> None:
    """Send llama.cpp's own log lines to Python logging (DEBUG) instead of stderr.

    Called before edge first uses llama.cpp, never at import. ``edge --debug`` shows them."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _forward(level, text, user_data):  # noqa: ARG001
        log.debug("%s", text.decode("utf-8", errors="replace").rstrip())

    _log_callback = _forward
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@functools.cache
def ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu.so.0: the soname llama.cpp links to, so there is one copy of ggml's state."""
    base = ctypes.CDLL(str(lib_dir() / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)
    del base  # loaded for its symbols; the handle stays in the process
    return ctypes.CDLL(str(lib_dir() / "libggml-cpu.so.0"), mode=ctypes.RTLD_GLOBAL)


@functools.cache
def has_amx_int8() -> bool:
    """Whether this ggml build computes with Intel AMX (it does when built with -march=native on a
    CPU that has it). Its AMX weight buffers crash llama.cpp 0.3.36 on such machines: every
    quantized model segfaulted in ``ggml_backend_amx_mul_mat`` on this kind of VM (Xeon with
    AMX, 2026-12; llama.cpp #20824, closed unfixed)."""
    fn = ggml_cpu().ggml_cpu_has_amx_int8
    fn.restype = ctypes.c_int
    return bool(fn())


@functools.cache
def ggml_registry() -> ctypes.CDLL:
    """libggml (the backend registry: devices, the RPC backend's entry points), typed."""
    ggml_cpu()
    g = ctypes.CDLL(str(lib_dir() / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    for name, res, args in [("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
                            ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
                            ("ggml_backend_reg_dev_count", ctypes.c_size_t, [ctypes.c_void_p]),
                            ("ggml_backend_reg_dev_get", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                            ("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int]),
                            ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])]:
        fn = getattr(g, name)
        fn.restype, fn.argtypes = res, args
    return g


def rpc_proc(name: str, prototype):
    """An entry point of llama.cpp's RPC backend (``ggml_backend_rpc_add_server``, ...), reached
    through the registry as llama.cpp's own tools reach it."""
    g = ggml_registry()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise EdgeError("this llama-cpp-python was built without the RPC backend: reinstall it with "
                        'CMAKE_ARGS="-DGGML_RPC=on"')
    addr = g.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise EdgeError(f"llama.cpp's RPC backend has no {name}")
    return prototype(addr)


def rpc_devices(endpoint: str) -> list[int]:
    """The ggml devices of the RPC server at ``endpoint`` (host:port), registered once per process.
    llama.cpp aborts the process when the server does not answer: callers run this where that is
    survivable (edge.d2d runs generation in a child process)."""
    add = rpc_proc("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    g = ggml_registry()
    reg = add(endpoint.encode())
    return [g.ggml_backend_reg_dev_get(reg, i) for i in range(g.ggml_backend_reg_dev_count(reg))]


def die_with_parent(poll_s: float = 0.5) -> None:
    """This process ends when its parent does, so a helper process (an RPC server, a group's
    llama.cpp) never outlives the agent or SDK that owns it: a daemon thread watches the parent's
    pid (prctl's PDEATHSIG would follow the parent *thread*, and the SDK may start helpers from
    a thread that ends, the server's loader for one)."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="edge-parent-watch", daemon=True).start()


# libgomp spins this many times before an idle OpenMP thread sleeps (its default is 300,000).
GROUP_SPINCOUNT = "10000"


def group_process_env() -> dict[str, str]:
    """The environment of a group's llama.cpp processes (the coordinator's worker, each member's
    RPC server): OpenMP threads that stop spinning soon after their work. A member of a group
    waits on the network between its runs, where libgomp's default spin (300,000 rounds after
    every parallel region) burns a phone's battery and, where devices share cores, takes the core
    of the device that is computing. Measured on this 2-core VM, the d2d benchmark's model with
    3 + 2 + 3 layers on coordinator + two RPC servers on loopback: 45 tok/s at libgomp's default,
    94 with OMP_WAIT_POLICY=passive (which costs one device 15%: 136 -> 115), 131-145 with 10,000
    spins (one device unchanged); docs/d2d.md. A policy or count the user set is kept."""
    import os

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return dict(os.environ)
    return os.environ | {"GOMP_SPINCOUNT": GROUP_SPINCOUNT}
