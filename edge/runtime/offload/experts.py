"""Where the offload engine's experts come from: one small interface, two real implementations.

* :class:`NestedExperts` — an offload bundle's nested-bit store: read a b-bit prefix (O_DIRECT),
  check its section checksums, convert it into a ggml Q4_1 slot.
* :class:`GGUFExperts` — a GGUF file as it is: each expert's slice of ``ffn_{gate,up,down}_exps``
  (contiguous per expert in ggml's layout) read straight into the slot with one aligned positioned
  read per matrix (the 4 KiB-aligned span around the slice, O_DIRECT where the file system
  allows), and computed in the file's own type: no conversion, no second copy on disk.

A slot is one expert's three matrices as ggml tensors over buffers the source allocated.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge.errors import ModelFormatError, UnsupportedModelError
from edge.memory import aligned_buffer
from edge.quant.nested import q4_1_bytes, to_q4_1
from edge.runtime import ggml
from edge.formats.gguf_read import ExpertTensor
from edge.runtime.offload.store import ExpertStore, open_for_reads

log = logging.getLogger(__name__)
WHO = ("main", "io")  # the decode thread and the prefetch thread each have their own staging buffers


@dataclass
class Slot:
    buffers: list[np.ndarray]
    weights: list[ggml.Weight]  # gate, up, down


class ExpertSource(Protocol):
    kind: str
    mode: str  # "direct" or "buffered"

    def slot_bytes(self, layer: int) -> int: ...

    def new_slots(self, layer: int, count: int) -> list[Slot]:
        """``count`` slots for ``layer``, carved out of one allocation."""

    def load(self, layer: int, expert: int, bits: int, slot: Slot, who: str) -> int:
        """Bring expert ``expert`` of ``layer`` into ``slot``; returns the bytes read."""

    def served(self, layer: int, bits: int) -> str | int:
        """How telemetry names what a load served (its bits, or its ggml types)."""

    def staging_buffers(self) -> list[np.ndarray]: ...

    def close(self) -> None: ...


class NestedExperts:
    kind = "nested"

    def __init__(self, store: ExpertStore, *, prefetch: bool = True):
        self.store = store
        layout = store.index.layout
        self._slot = q4_1_bytes(layout)
        who = WHO if prefetch else WHO[:1]  # the prefetch thread's buffers only where it runs
        self._stage = {w: aligned_buffer(store.read_bytes(min(4, layout.max_bits))) for w in who}
        self._scratch = {w: np.empty(layout.n_weights, np.uint8) for w in who}

    @property
    def mode(self) -> str:
        return self.store.mode

    def slot_bytes(self, layer: int) -> int:
        return self._slot

    def new_slots(self, layer: int, count: int) -> list[Slot]:
        block = np.zeros(count * self._slot, dtype=np.uint8)
        slots = []
        for k in range(count):
            buf = block[k * self._slot : (k + 1) * self._slot]
            ws, at = [], 0
            for r, c in self.store.index.layout.shapes:
                w = ggml.Weight(ggml.Q4_1, r, c, buffer=buf[at:])
                ws.append(w)
                at += w.nbytes
            slots.append(Slot([buf], ws))
        return slots

    def load(self, layer: int, expert: int, bits: int, slot: Slot, who: str) -> int:
        raw = self.store.read(layer, expert, bits, self._stage[who])
        to_q4_1(raw, self.store.index.layout, bits, out=slot.buffers[0], scratch=self._scratch[who])
        return raw.nbytes

    def served(self, layer: int, bits: int) -> int:
        return bits

    def staging_buffers(self) -> list[np.ndarray]:
        return [*self._stage.values(), *self._scratch.values()]

    def close(self) -> None:
        self.store.close()


EXPERT_MATRICES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_tensors(path: Path, reader, spec) -> list[tuple[ExpertTensor, ExpertTensor, ExpertTensor]]:
    """Per layer, the gate/up/down expert tensors of a GGUF, checked: 3-D, E experts of the spec's
    shape, a type ggml computes here."""
    tensors = {t.name: t for t in reader.tensors}
    F, D, E = spec.expert_ffn_size, spec.hidden_size, spec.n_experts
    out = []
    for i in range(spec.n_layers):
        trio = []
        for name, (rows, cols) in zip(EXPERT_MATRICES, ((F, D), (F, D), (D, F))):
            full = f"blk.{i}.{name}.weight"
            t = tensors.get(full)
            if t is None:
                if f"blk.{i}.ffn_gate.0.weight" in tensors:
                    raise UnsupportedModelError(f"{Path(path).name} stores experts one tensor each (an old GGUF layout); "
                                                f"convert it again with a current llama.cpp")
                raise ModelFormatError(f"{Path(path).name} lacks tensor {full}")
            if t.tensor_type.name not in ggml.COMPUTABLE:
                raise UnsupportedModelError(f"{Path(path).name}: tensor {full} is {t.tensor_type.name}, which edge does "
                                            f"not compute (supported: {', '.join(ggml.COMPUTABLE)})")
            if tuple(t.shape) != (cols, rows, E):
                raise ModelFormatError(f"{Path(path).name}: tensor {full} has shape {list(t.shape)}, the model's "
                                       f"experts need {[cols, rows, E]}")
            trio.append(ExpertTensor(full, int(t.tensor_type), rows, cols, t.data_offset, t.n_bytes // E))
        out.append(tuple(trio))
    return out


class GGUFExperts:
    kind = "gguf"

    def __init__(self, path: Path, layers: list[tuple[ExpertTensor, ExpertTensor, ExpertTensor]], *,
                 mode: str = "auto"):
        self.path, self.layers = Path(path), layers
        self._fd, self.mode = open_for_reads(self.path, mode)

    def slot_bytes(self, layer: int) -> int:
        return sum(t.max_span for t in self.layers[layer])

    def new_slots(self, layer: int, count: int) -> list[Slot]:
        # One huge-page-backed block per layer (O_DIRECT reads into huge pages ran 2-2.6x faster
        # here): a separate block per matrix would round each up to whole 2 MiB pages, +150% here.
        trio = self.layers[layer]
        per = sum(t.max_span for t in trio)  # every span is whole 4 KiB blocks: each buffer stays aligned
        block = aligned_buffer(max(1, count * per))
        slots = []
        for k in range(count):
            at, bufs = k * per, []
            for t in trio:
                bufs.append(block[at : at + t.max_span])
                at += t.max_span
            slots.append(Slot(bufs, [ggml.Weight(t.gtype, t.rows, t.cols, buffer=b) for t, b in zip(trio, bufs)]))
        return slots

    def load(self, layer: int, expert: int, bits: int, slot: Slot, who: str) -> int:
        done = 0
        for t, buf, w in zip(self.layers[layer], slot.buffers, slot.weights):
            start, length, inside = t.span(expert)
            got = os.preadv(self._fd, [buf[:length]], start)
            if got < inside + t.expert_bytes:
                raise ModelFormatError(f"{self.path.name}: short read of {t.name} expert {expert} "
                                       f"({got:,} of {length:,} bytes at {start:,})")
            if self.mode == "buffered":
                os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)
            w.point_at(buf[inside:])
            done += length
        return done

    def served(self, layer: int, bits: int) -> str:
        return "/".join(ggml.type_name(t.gtype) for t in self.layers[layer])

    def staging_buffers(self) -> list[np.ndarray]:
        return []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
