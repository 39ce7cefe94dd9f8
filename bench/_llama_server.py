"""llama-cpp-python's own server (``python -m llama_cpp.server``) as bench/serve.py's baseline,
with one change where this ggml build computes with Intel AMX: weights are not repacked into
llama.cpp's AMX buffers, whose kernels crash llama.cpp 0.3.36 there (an "Illegal instruction" on
the first request on this kind of Xeon VM; llama.cpp #20824, closed unfixed) — the same setting
edge's own llama.cpp backend runs with on such a CPU (edge._llamacpp.has_amx_int8). Elsewhere
the server runs untouched. Arguments are the server's own."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp.llama_cpp as raw  # noqa: E402

from edge._llamacpp import has_amx_int8  # noqa: E402

if has_amx_int8():
    default_params = raw.llama_model_default_params

    def without_extra_bufts():
        p = default_params()
        p.use_extra_bufts = False
        return p

    raw.llama_model_default_params = without_extra_bufts
    print("llama_cpp.server: AMX weight buffers off (they crash on this CPU: llama.cpp #20824)", file=sys.stderr)

runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
