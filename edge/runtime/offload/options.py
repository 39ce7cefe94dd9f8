"""How the offload engine spends its memory budget: the options a caller, a plan or the defaults set."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from edge.errors import EdgeError
from edge.hardware import spare_cpus
from edge.moe.policies import DEFAULT_POLICY, POLICIES

IO_MODES = ("auto", "direct", "buffered")


@dataclass(frozen=True)
class OffloadOptions:
    """Offload engine settings (docs/offload.md). A field left None is not set: a deployed bundle's
    plan fills it, else :data:`DEFAULTS` does (:meth:`over`, :meth:`resolved`)."""

    policy: str | None = None  # expert cache eviction: lru, lfu, locality or lrfu (default)
    bits: int | None = None  # bits of the hottest experts (2..4)
    min_bits: int | None = None  # bits of the coldest experts under HEBF
    pin_bits: bool | None = None  # every expert at `bits`: no downgrading of cold experts
    prefetch: bool | None = None  # load the next layer's predicted experts while this layer computes
    io_mode: str | None = None  # direct (O_DIRECT), buffered (+ FADV_DONTNEED) or auto
    slots: tuple[int, ...] | None = None  # expert cache slots per layer; None: sized from the budget

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise EdgeError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        for name in ("bits", "min_bits"):
            v = getattr(self, name)
            if v is not None and not 2 <= v <= 4:
                raise EdgeError(f"offload --{name.replace('_', '-')} must be 2..4, got {v}")
        if self.bits is not None and self.min_bits is not None and self.min_bits > self.bits:
            raise EdgeError(f"offload bits must satisfy --min-bits <= --bits, got {self.min_bits} and {self.bits}")
        if self.io_mode is not None and self.io_mode not in IO_MODES:
            raise EdgeError(f"unknown I/O mode {self.io_mode!r}; choose {', '.join(IO_MODES)}")
        if self.slots is not None:
            object.__setattr__(self, "slots", tuple(int(c) for c in self.slots))
            if min(self.slots, default=0) < 1:
                raise EdgeError(f"every layer needs at least one cache slot, got {list(self.slots)}")

    def given(self) -> dict[str, object]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def over(self, base: "OffloadOptions") -> "OffloadOptions":
        """These options where set, ``base``'s elsewhere."""
        return replace(base, **self.given())

    def resolved(self) -> "OffloadOptions":
        """Every field set: unset ones take :data:`DEFAULTS` (the prefetcher: on where there are spare
        CPUs); pinned bits make ``min_bits = bits``."""
        full = self.over(DEFAULTS)
        if full.prefetch is None:
            full = replace(full, prefetch=spare_cpus())
        if full.pin_bits:
            full = replace(full, min_bits=full.bits)
        elif full.min_bits > full.bits:  # e.g. bits=2 alone: no bits below it to serve cold experts at
            full = replace(full, min_bits=full.bits)
        return full


# prefetch left unset: resolved() turns it on where spare CPUs can overlap its loads with the
# compute (edge.hardware.spare_cpus)
DEFAULTS = OffloadOptions(policy=DEFAULT_POLICY, bits=4, min_bits=2, pin_bits=False, io_mode="auto")
