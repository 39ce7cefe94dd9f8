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
