"""Eviction policies: which device blocks go down to the host tier when the device runs short.

Pass one as `PagedKV(policy=...)`, by name ("lru", "window", "hybrid") or as an object with
parameters. The policies themselves run in C++ (cpp/policy_*.cpp), O(1) or O(log n) per touch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


class _Policy:
    name = ""

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
        raise TypeError(f"PagedKV(): policy must be a name or pagedkv.policies.LRU/Window/Hybrid, "
                        f"got {type(policy).__name__}")
    return policy.name, policy.params()
