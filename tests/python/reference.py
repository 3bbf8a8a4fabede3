"""The oracle of the Python tests: dense attention in float64 over plain K/V tensors.

The oracle never reads the engine's pages: it takes the rows a test appended (or what `gather`
returned), so a bug in the page table, the copy paths or the kernel cannot cancel out against it.
Also here: a plain-Python model of what a sequence has stored, helpers that fill a cache with
random rows in ragged multi-sequence appends, and the per-dtype comparison.
"""
from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field

import torch

# Tolerances (atol, rtol) of `attend` outputs: fp32 against the float64 reference itself,
# fp16/bf16 against the reference rounded to that dtype (about 2 ulp of the output dtype, plus
# room for a kernel that rounds softmax probabilities to the input dtype before P@V).
# fp32 gets 2e-5: with head_dim 256 and scale 0.3 scores reach ~20, and an fp32 dot product of
# that size is off by ~1e-6 absolute, which exp() turns into ~1.2e-5 on the output (seen).
OUT_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
# The LSE is float32 whatever the cache dtype; scores come from exact inputs, so it stays tight.
LSE_TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1e-3, 1e-4),
}


# ----------------------------------------------------------------------------------------------
# The oracle


def visible_keys(seq_len: int, num_rows: int, window=None, sink_tokens=0) -> torch.Tensor:
    """[num_rows, seq_len] bool: row i (position seq_len - num_rows + i) sees key j (DESIGN §4)."""
    pos = torch.arange(seq_len - num_rows, seq_len).unsqueeze(1)
    j = torch.arange(seq_len).unsqueeze(0)
    mask = j <= pos
    if window is not None:
        mask &= (j > pos - window) | (j < sink_tokens)
    return mask


def attention_ref(q, k, v, *, window=None, sink_tokens=0, scale=None):
    """Attention of one sequence in float64.

    q: [n, Hq, D], the last n tokens of the sequence; k, v: [L, Hkv, D], all its keys, n <= L.
    Query head h reads KV head h // (Hq // Hkv).
    Returns out [n, Hq, D] and lse [n, Hq] (natural log), both float64 on the CPU.
    """
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    assert hq % hkv == 0 and 1 <= n <= length, (q.shape, k.shape)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    q64 = q.detach().cpu().double()
    k64 = k.detach().cpu().double().repeat_interleave(group, dim=1)  # head h -> h // group
    v64 = v.detach().cpu().double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q64, k64) * scale
    mask = visible_keys(length, n, window, sink_tokens)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("hnl,lhd->nhd", probs, v64)
    return out, lse.transpose(0, 1).contiguous()


def batched_attention_ref(q, kvs, q_lens, **kw):
    """q: [sum(q_lens), Hq, D], rows of sequence i consecutive; kvs[i] = (k, v) of sequence i."""
    outs, lses = [], []
    for (k, v), rows in zip(kvs, torch.split(q, list(q_lens))):
        out, lse = attention_ref(rows, k, v, **kw)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


# ----------------------------------------------------------------------------------------------
# Comparisons


def assert_close(actual, ref64, dtype, tol=None, what="out"):
    """|actual - ref| <= atol + rtol * |ref|, elementwise; half dtypes compare to ref rounded."""
    atol, rtol = tol if tol is not None else OUT_TOL[dtype]
    got = actual.detach().cpu()
    ref64 = ref64.detach().cpu()
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
    ref = ref64 if dtype == torch.float32 else ref64.to(dtype).double()
    err = (got.double() - ref).abs()
    bound = atol + rtol * ref.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in (bad.nonzero()[0]))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside atol={atol} rtol={rtol}; "
            f"max err {err.max().item():.3g}; first at {idx}: got {got[idx].item():.6g}, "
            f"ref {ref[idx].item():.6g}"
        )


def assert_bits_equal(actual, expected, what=""):
    """Bit-exact equality, -0.0 and inf included (torch.equal would take -0.0 == 0.0)."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, (what, a.dtype, e.dtype, a.shape, e.shape)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    if not torch.equal(a.contiguous().view(as_int), e.contiguous().view(as_int)):
        diff = (a.contiguous().view(as_int) != e.contiguous().view(as_int)).nonzero()
        raise AssertionError(f"{what}: {len(diff)} elements differ, first at {diff[0].tolist()}")


# A source location in an error message: "engine.cpp:121", "errors.h:40", or any path-like
# "/" (a "/" with a character other than a space beside it; "N / len(seqs)" is not one).
_SOURCE_PATH = re.compile(r"\.(?:cpp|cc|cxx|cu|cuh|h|hpp):\d*|\S/|/\S")


def message_of(exc: BaseException) -> str:
    """The text a user reads (str() of a KeyError adds quotes around it)."""
    if isinstance(exc, OSError) and exc.strerror:  # OSError(errno, message)
        return exc.strerror
    return str(exc.args[0]) if exc.args else str(exc)


def source_path_in(message: str, *user_paths) -> str | None:
    """The first source-path fragment in `message`, or None. Paths the caller passed in (such as
    disk_path, echoed back as what was wrong, or a file the engine made in it) are the user's own
    and do not count."""
    for p in user_paths:
        message = re.sub(re.escape(str(p)) + r"[^\s'\"]*", "<path>", message)
    m = _SOURCE_PATH.search(message)
    return m.group(0) if m else None


def same_device(dev, name) -> bool:
    want = torch.device(name)
    return dev.type == want.type and (want.index is None or dev.index == want.index)


# ----------------------------------------------------------------------------------------------
# Random inputs and the shape of a cache


def randn(gen, shape, dtype, device):
    """Standard normal values drawn on the CPU from `gen` (reproducible), rounded to dtype."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


@dataclass
class CacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: str

    def make(self, device_blocks, **kw):
        import pagedkv  # only here: the oracle itself must not depend on the engine

        return pagedkv.PagedKV(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            block_size=self.block_size, dtype=self.dtype, device=self.device,
            device_blocks=device_blocks, **kw,
        )

    def rows(self, gen, n, heads=None):
        return randn(gen, (n, heads or self.num_kv_heads, self.head_dim), self.dtype, self.device)

    def blocks_for(self, lengths) -> int:
        return sum(-(-n // self.block_size) for n in lengths)


@dataclass
class StoredKV:
    """What each (sequence, layer) should hold: the K/V rows appended to it, in order (CPU)."""
    spec: CacheSpec
    rows: dict = field(default_factory=dict)  # (seq, layer) -> (k [L, Hkv, D], v [L, Hkv, D])

    def get(self, seq, layer):
        empty = torch.empty(0, self.spec.num_kv_heads, self.spec.head_dim, dtype=self.spec.dtype)
        return self.rows.get((seq, layer), (empty, empty))

    def append(self, seq, layer, k, v):
        old_k, old_v = self.get(seq, layer)
        self.rows[(seq, layer)] = (torch.cat([old_k, k.cpu()]), torch.cat([old_v, v.cpu()]))

    def length(self, seq, layer):
        return self.get(seq, layer)[0].shape[0]


def append_rows(kv, spec, stored, gen, seqs, layer, lengths, as_tensor=False):
    """One ragged multi-sequence append of fresh random rows; mirrors it into `stored`."""
    n = sum(lengths)
    k, v = spec.rows(gen, n), spec.rows(gen, n)
    if as_tensor:
        kv.append(torch.tensor(seqs, device=spec.device), layer, k, v,
                  lengths=torch.tensor(lengths, device=spec.device))
    else:
        kv.append(list(seqs), layer, k, v, lengths=list(lengths))
    for s, rk, rv in zip(seqs, torch.split(k, lengths), torch.split(v, lengths)):
        stored.append(s, layer, rk, rv)
    return k, v


def fill_cache(kv, spec, gen, rng, total_lens, last_lens, max_chunk=300):
    """Add len(total_lens) sequences and bring each, in every layer, to total_lens[i] tokens.

    The prefix arrives in random ragged chunks over random subsets of the sequences; the last
    last_lens[i] tokens of every sequence arrive together in one final append per layer, the way
    a chunked-prefill or decode step appends its rows before attending over them.
    """
    seqs = [kv.add_sequence() for _ in total_lens]
    stored = StoredKV(spec)
    left = [t - q for t, q in zip(total_lens, last_lens)]
    while any(left):
        ids = [i for i in range(len(seqs)) if left[i] and rng.random() < 0.7] or \
              [i for i in range(len(seqs)) if left[i]]
        rng.shuffle(ids)
        chunk = [rng.randint(1, min(left[i], max_chunk)) for i in ids]
        for layer in range(spec.num_layers):
            append_rows(kv, spec, stored, gen, [seqs[i] for i in ids], layer, chunk)
        for i, c in zip(ids, chunk):
            left[i] -= c
    for layer in range(spec.num_layers):
        append_rows(kv, spec, stored, gen, seqs, layer, list(last_lens))
    return seqs, stored


# ----------------------------------------------------------------------------------------------
# A small covering array: every pair of values of any two axes appears in some case


def pairwise_cases(axes: dict, seed: int = 0) -> list[dict]:
    names = list(axes)
    uncovered = {
        (a, i, b, j)
        for a, b in itertools.combinations(names, 2)
        for i in range(len(axes[a])) for j in range(len(axes[b]))
    }
    rng = random.Random(seed)
    cases = []

    def gain(case, name, i):
        return sum((x, case[x], name, i) in uncovered if names.index(x) < names.index(name)
                   else (name, i, x, case[x]) in uncovered for x in case)

    while uncovered:
        a, i, b, j = min(uncovered)  # start from a pair still missing, so every case makes progress
        case = {a: i, b: j}
        rest = [n for n in names if n not in case]
        rng.shuffle(rest)
        for name in rest:
            scores = [(gain(case, name, v), rng.random(), v) for v in range(len(axes[name]))]
            case[name] = max(scores)[2]
        for x, y in itertools.combinations(names, 2):
            uncovered.discard((x, case[x], y, case[y]))
        cases.append({n: axes[n][case[n]] for n in names})
    return cases


def cuda_usable() -> bool:
    """torch sees a GPU and pagedkv was built with CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        import pagedkv
    except ImportError:
        return False
    return bool(pagedkv.cuda_available())


_SUPPORTED = {}  # (device, dtype) -> None if a cache of that dtype can be built there, else why not


def dtype_supported(device, dtype) -> bool:
    """The CUDA kernels cover fp16/bf16 (DESIGN §1); fp32 there is optional and, when refused,
    refused with the TypeError/ValueError the contract names. Every dtype works on the CPU."""
    if device == "cpu" or dtype != torch.float32:
        return True
    if (device, dtype) not in _SUPPORTED:
        import pagedkv

        try:
            pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=64, block_size=16,
                            dtype=dtype, device=device, device_blocks=1)
            _SUPPORTED[(device, dtype)] = None
        except (TypeError, ValueError) as e:
            _SUPPORTED[(device, dtype)] = str(e)
    return _SUPPORTED[(device, dtype)] is None


def skip_if_unsupported(device, dtype):
    import pytest

    if not dtype_supported(device, dtype):
        pytest.skip(f"{dtype} not supported on {device}: {_SUPPORTED[(device, dtype)]}")


def best_dtype(device):
    """The most precise dtype the device takes: for tests whose subject is not the dtype."""
    return torch.float32 if dtype_supported(device, torch.float32) else torch.float16
