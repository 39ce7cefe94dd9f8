"""The ONNX Runtime backend: an ONNX bundle's graph (edge/builder/onnx_graph.py) run by ONNX Runtime
on the execution provider the device has, its KV cache kept as ONNX Runtime values between steps.

Execution providers by the name edge gives them; one that this onnxruntime does not carry is an
error naming the package that does. Only the CPU provider is measured on edge's machines; the others
are ONNX Runtime's own and listed by device profile (hw-profiles/), not claimed as measured.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.errors import EdgeError, UnsupportedModelError
from edge.runtime.generate import checked_tokens

# edge's name -> (ONNX Runtime's provider, where it comes from)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime built with --use_xnnpack (the onnxruntime-android "
                                            "and onnxruntime-objc packages carry it)"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn (pip install onnxruntime-qnn, on Windows on Snapdragon)"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime on macOS (pip install onnxruntime: the macOS wheel "
                                          "carries CoreML)"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino (pip install onnxruntime-openvino)"),
}
MIN_ORT = (1, 27, 1)  # QMoE's CPU kernel: block-wise experts since 1.23.1, a decode hang fixed in 1.27.1


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """The graph's cache inputs and outputs for ``layer`` (edge/builder/onnx_graph.py writes them)."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"present.{layer}.key",
            f"present.{layer}.value")


def available() -> list[str]:
    """edge's names of the execution providers this onnxruntime carries."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [name for name, (provider, _) in PROVIDERS.items() if provider in have]


def provider_for(ep: str) -> str:
    """ONNX Runtime's provider for ``ep``, or an error naming what to install."""
    if ep not in PROVIDERS:
        raise EdgeError(f"unknown execution provider {ep!r}; choose one of {', '.join(PROVIDERS)}")
    provider, package = PROVIDERS[ep]
    if ep not in available():
        import onnxruntime as ort

        raise EdgeError(f"execution provider {ep} ({provider}) is not in this onnxruntime {ort.__version__} "
                        f"(it has {', '.join(available())}); it comes with {package}")
    return provider


def check_version() -> None:
    import onnxruntime as ort

    have = tuple(int(x) for x in re.findall(r"\d+", ort.__version__)[:3])
    if have < MIN_ORT:
        raise EdgeError(f"onnxruntime {ort.__version__} is too old for edge's ONNX bundles (QMoE on CPU needs "
                        f">= {'.'.join(map(str, MIN_ORT))}): pip install -U onnxruntime")


def _session_error(path: Path, e: Exception) -> EdgeError:
    """ONNX Runtime's (long, multi-line) load failure as one line naming the cause."""
    import onnxruntime as ort

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    op = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text)
    if op:
        return UnsupportedModelError(f"{path.name}: operator {op.group(1)} (version {op.group(2)}) is not implemented "
                                     f"by onnxruntime {ort.__version__} on this execution provider")
    op = re.search(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op", text)
    if op:
        return UnsupportedModelError(f"{path.name}: operator {op.group(1) or 'ai.onnx'}:{op.group(2)} is unknown to "
                                     f"onnxruntime {ort.__version__} (a newer onnxruntime may have it)")
    data = re.search(r"External data|external data|GetExtDataFromTensorProto|out of bounds|exceeds", text)
    if data:
        return EdgeError(f"{path.name}: its external weights do not match the graph ({text[:200]}): the bundle is "
                         f"corrupted or truncated; rebuild it")
    return EdgeError(f"{path.name}: ONNX Runtime cannot load it ({text[:200]}): the file is corrupted or not an "
                     f"edge ONNX graph; rebuild it")


class OrtBackend:
    """Backend protocol over an ONNX bundle's graph. ``spec``: the bundle's ModelSpec."""

    name = "ort"

    def __init__(self, model_path: Path, spec, *, n_ctx: int, max_context: int, n_threads: int, ep: str = "cpu"):
        import onnxruntime as ort

        check_version()
        provider = provider_for(ep)
        self.path, self.spec, self.ep = Path(model_path), spec, ep
        self.n_ctx = min(n_ctx, max_context)
        self.n_vocab = spec.vocab_size
        self.n_past = 0
        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors are raised, not logged
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types, one per status code
            raise _session_error(self.path, e) from None
        self.providers = tuple(self.session.get_providers())
        if provider != "CPUExecutionProvider":
            import logging

            logging.getLogger("edge.ort").warning(
                f"ONNX Runtime runs on {ep} the nodes {provider} takes; the others (QMoE among them where it has no "
                f"kernel for it) run on the CPU provider")
        self._kv_names = [kv_names(i) for i in range(spec.n_layers)]
        # K and V live in one buffer per layer for the whole context, bound as both the past and the
        # present: GroupQueryAttention then writes the new rows in place (its shared-buffer mode)
        # instead of copying the whole cache into a new present every step
        shape = [1, spec.n_kv_heads, self.n_ctx, spec.head_dim]
        self._kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu")
                    for _ in range(2 * spec.n_layers)]
        self.threads = n_threads
        self.tokens_evaluated = 0
        self.eval_seconds = 0.0

    def eval(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the context; return logits [V] after the last (or [T, V])."""
        ids = checked_tokens(tokens, self.n_past, self.n_ctx, self.n_vocab)
        T, total = len(ids), self.n_past + len(ids)
        t0 = time.perf_counter()
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids[None])
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        io.bind_cpu_input("logit_rows", np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], np.int64))
        io.bind_output("logits", "cpu")  # outputs come back in the order they were bound
        for i, (pk, pv, nk, nv) in enumerate(self._kv_names):
            io.bind_ortvalue_input(pk, self._kv[2 * i])
            io.bind_ortvalue_input(pv, self._kv[2 * i + 1])
            io.bind_ortvalue_output(nk, self._kv[2 * i])
            io.bind_ortvalue_output(nv, self._kv[2 * i + 1])
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        self.n_past = total
        logits = outs[0].numpy()[0]
        self.tokens_evaluated += T
        self.eval_seconds += time.perf_counter() - t0
        return logits if all_logits else logits[-1]

    def metrics(self) -> dict:
        """Telemetry: the providers the session runs on, tokens evaluated and the time they took, the
        process's memory."""
        import psutil

        return {"engine": self.name, "execution_providers": list(self.providers), "threads": self.threads,
                "tokens_evaluated": self.tokens_evaluated, "eval_seconds": round(self.eval_seconds, 6),
                "n_past": self.n_past, "resident_bytes": psutil.Process().memory_info().rss}

    def truncate(self, n: int) -> None:
        """Keep the first n positions (rows past them are masked by the sequence length, then overwritten)."""
        self.n_past = max(0, min(n, self.n_past))

    def close(self) -> None:
        self._kv = []
        self.session = None
