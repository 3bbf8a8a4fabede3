"""Eviction policies: which device blocks go down to the host tier when the device runs short.

Pass one as `PagedKV(policy=...)`, by name ("lru", "window", "hybrid") or as an object with
parameters. The policies themselves run in C++ (cpp/policy_*.cpp), O(1) or O(log n) per touch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

_INT32_MAX = 2**31 - 1  # block counts are int32 in the engine


class _Policy:
    name = ""

    def __post_init__(self):
        # Each parameter checked where it is made, naming it: block counts are ints the engine's
        # int32 slots can hold, weights finite non-negative numbers.
        for f in fields(self):
            value, where = getattr(self, f.name), f"policies.{type(self).__name__}()"
            if f.type in (int, "int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"{where}: {f.name} must be an int, got {type(value).__name__}")
                if not 0 <= value <= _INT32_MAX:
                    raise ValueError(f"{where}: {f.name} must be in 0..2^31-1, got {value}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{where}: {f.name} must be a number, got {type(value).__name__}")
                if not (value >= 0 and (isinstance(value, int) or math.isfinite(value))):
                    raise ValueError(f"{where}: {f.name} must be finite and >= 0, got {value!r}")

    def params(self) -> dict:
        """The policy's parameters for the engine (cpp/policy_registry.cpp), as floats."""
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class LRU(_Policy):
    """Least recently used blocks go first."""

    name = "lru"


@dataclass(frozen=True)
class Window(_Policy):
    """Per sequence, the newest `recent_blocks` blocks and the first `sink_blocks` stay on the
    device; older blocks go first (least recently used among them first)."""

    recent_blocks: int = 4
    sink_blocks: int = 1
    name = "window"


@dataclass(frozen=True)
class Hybrid(_Policy):
    """Score = recency_weight * last_step + frequency_weight * log2(1 + uses); lowest goes first,
    so often-read blocks (shared prompts, sinks) survive bursts of one-off blocks."""

    recency_weight: float = 1.0
    frequency_weight: float = 8.0
    name = "hybrid"


_BY_NAME = {"lru": LRU, "window": Window, "hybrid": Hybrid}


def resolve(policy) -> tuple[str, dict]:
    """(name, params) for the engine from a name or a policy object."""
    if isinstance(policy, str):
        if policy not in _BY_NAME:
            raise ValueError(f"PagedKV(): policy must be one of {tuple(_BY_NAME)} or a policy object, got {policy!r}")
        policy = _BY_NAME[policy]()
    if not isinstance(policy, _Policy):
        raise TypeError(f"PagedKV(): policy must be a name or pagedkv.policies.LRU, Window or Hybrid object, "
                        f"got {type(policy).__name__}")
    return policy.name, policy.params()
