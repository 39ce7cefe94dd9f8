"""llama.cpp backend: GGUF files run whole by llama.cpp's own model loader and kernels.

edge owns the llama.cpp handles through llama-cpp-python's thin wrappers (``_internals``:
model, context, batch) rather than its ``Llama`` class, because ``Llama`` cannot pass the model
parameters that decide how a model larger than memory is read (``lazy_mode``, ``load_mode``) or
whether weights are repacked into extra buffers (``use_extra_bufts``, which is also how llama.cpp
reaches its AMX kernels). :class:`LoadOptions` names them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge._llamacpp import has_amx_int8, route_llama_logs
from edge.errors import EdgeError
from edge.hardware import default_threads

log = logging.getLogger(__name__)

LAZY_MODES = ("off", "auto", "on")
LOAD_MODES = ("mmap", "none", "direct_io", "mlock", "mmap_mlock")


@dataclass(frozen=True)
class LoadOptions:
    """How llama.cpp loads a GGUF (llama_model_params). ``extra_bufts`` None: on, except where this
    ggml build would use its AMX kernels, which crash (edge._llamacpp.has_amx_int8)."""

    load_mode: str = "mmap"  # mmap (default: pages come from the file as used), none, direct_io, mlock, ...
    lazy_mode: str = "off"  # off, auto (arch-marked tensors > 4 GiB read on demand), on (all marked ones)
    extra_bufts: bool | None = None  # repack weights into llama.cpp's extra buffer types
    # layers run by llama.cpp RPC servers: (endpoint host:port, layer count) in order; the first
    # n_layers - sum(counts) layers, the embeddings and the output stay on this CPU
    rpc_layers: tuple[tuple[str, int], ...] = ()
    # or: RPC servers that llama.cpp itself splits every layer and the output over, as its `--rpc`
    # with all layers offloaded does (by each server's reported free memory); for comparison
    rpc_default_split: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.load_mode not in LOAD_MODES:
            raise EdgeError(f"unknown llama.cpp load mode {self.load_mode!r}; choose {', '.join(LOAD_MODES)}")
        if self.lazy_mode not in LAZY_MODES:
            raise EdgeError(f"unknown llama.cpp lazy mode {self.lazy_mode!r}; choose {', '.join(LAZY_MODES)}")
        if any(n < 0 for _, n in self.rpc_layers):
            raise EdgeError(f"RPC layer counts cannot be negative: {self.rpc_layers}")
        if self.rpc_layers and self.rpc_default_split:
            raise EdgeError("give RPC layer counts or llama.cpp's default split, not both")


_warned_amx: list[bool] = []


def _extra_bufts(opt: LoadOptions) -> bool:
    if opt.extra_bufts is not None:
        return opt.extra_bufts
    if has_amx_int8():
        if not _warned_amx:
            _warned_amx.append(True)
            log.warning("llama.cpp runs without its extra weight buffers (AMX, repacking): its AMX kernels crash "
                        "on this CPU (llama.cpp #20824)")
        return False
    return True


def model_params(opt: LoadOptions, *, vocab_only: bool = False):
    import llama_cpp

    p = llama_cpp.llama_model_default_params()
    p.n_gpu_layers = 0
    p.vocab_only = vocab_only
    p.load_mode = getattr(llama_cpp, f"LLAMA_LOAD_MODE_{opt.load_mode.upper()}")
    p.lazy_mode = getattr(llama_cpp, f"LLAMA_LAZY_MODE_{opt.lazy_mode.upper()}")
    p.use_extra_bufts = False if vocab_only else _extra_bufts(opt)  # a vocabulary has no weights to repack
    if opt.rpc_layers and not vocab_only:
        _place_on_rpc(p, opt.rpc_layers)
    if opt.rpc_default_split and not vocab_only:  # llama.cpp's own split: every layer, no tensor_split
        p.devices = _device_array(opt.rpc_default_split)
        p.n_gpu_layers = 999
    return p


_keep_alive: list = []  # the device and split arrays llama.cpp reads while it loads


def _device_array(endpoints) -> int:
    """The address of a NULL-ended array of the RPC servers' first devices (kept alive while
    llama.cpp loads), for llama_model_params.devices."""
    import ctypes

    from edge._llamacpp import rpc_devices

    devices = []
    for ep in endpoints:
        devs = rpc_devices(ep)
        if not devs:
            raise EdgeError(f"the RPC server at {ep} has no devices")
        devices.append(devs[0])
    arr = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    _keep_alive[:] = [arr]
    return ctypes.cast(arr, ctypes.c_void_p).value


def _place_on_rpc(p, rpc_layers: tuple[tuple[str, int], ...]) -> None:
    """Point llama_model_params at the RPC servers' devices with a layer split: n_gpu_layers is the
    remote layers' total (llama.cpp offloads the last ones, so the output stays here), tensor_split
    their counts (llama.cpp splits by cumulative fractions, which exact counts reproduce)."""
    import ctypes

    used = [(ep, n) for ep, n in rpc_layers if n > 0]
    p.devices = _device_array(ep for ep, _ in used)
    split = [float(n) for _, n in used]
    ts = (ctypes.c_float * 128)(*split)
    _keep_alive.append(ts)
    p.tensor_split = ctypes.cast(ts, type(p.tensor_split))
    p.n_gpu_layers = int(sum(split))


def load_model(path: Path, opt: LoadOptions = LoadOptions(), *, vocab_only: bool = False):
    """A llama_model (llama-cpp-python's owned wrapper) for ``path``; load failures are EdgeErrors."""
    from llama_cpp import _internals

    route_llama_logs()
    try:
        return _internals.LlamaModel(path_model=str(path), params=model_params(opt, vocab_only=vocab_only),
                                     verbose=False)
    except ValueError as e:  # "Failed to load model from file"
        raise EdgeError(f"llama.cpp could not load {Path(path).name}: {e}") from None


class LlamaCppBackend:
    """Owns one llama.cpp model and context; exposes next-token logits for the generation loop."""

    name = "llamacpp"

    def __init__(self, gguf_path: Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 all_logits: bool = False, load: LoadOptions = LoadOptions(), n_batch: int = 512):
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self.threads = n_threads or default_threads()
        self.load_options = load
        self.model = load_model(gguf_path, load)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = self.threads
        try:
            self._ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=False)
        except ValueError as e:
            self.model.close()
            raise EdgeError(f"llama.cpp could not make a context of {n_ctx} tokens for {Path(gguf_path).name}: {e}") from None
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_batch = n_batch
        self.n_ctx = self._ctx.n_ctx()
        self.n_vocab = self.model.n_vocab()
        self._all_logits = all_logits
        self.n_past = 0

    def _decode(self, tokens: Sequence[int], logits_all: bool) -> np.ndarray | None:
        if self.n_past + len(tokens) > self.n_ctx:
            raise EdgeError(f"context full: {self.n_past} + {len(tokens)} tokens exceed n_ctx {self.n_ctx}")
        self._ctx.kv_cache_seq_rm(-1, self.n_past, -1)  # forget what a truncate dropped
        rows = []
        for i in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[i : i + self.n_batch])
            self._batch.set_batch(batch=chunk, n_past=self.n_past, logits_all=logits_all)
            self._ctx.decode(self._batch)
            self.n_past += len(chunk)
            if logits_all:
                rows.append(np.ctypeslib.as_array(self._ctx.get_logits(), shape=(len(chunk), self.n_vocab)).copy())
        return np.concatenate(rows) if logits_all else None

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        self._decode(tokens, False)
        ptr = self._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def eval_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, V] for every token (needs ``all_logits=True``): perplexity measurement."""
        if not self._all_logits:
            raise RuntimeError("construct with all_logits=True to read every position's logits")
        return self._decode(tokens, True)

    def truncate(self, n: int) -> None:
        self.n_past = max(0, min(n, self.n_past))  # the cache cells past n go before the next decode

    def close(self) -> None:
        for part in ("_batch", "_ctx", "model"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
                setattr(self, part, None)
