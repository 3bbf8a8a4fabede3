"""PagedKV: the public Python API of DESIGN.md §4 over the C++ engine."""
from __future__ import annotations

import functools
import math
import threading

import torch
from torch.utils.dlpack import to_dlpack as _dl

from . import _C
from .policies import resolve as _resolve_policy
from ._checks import (DTYPE_CODES, INT32_MAX, bounded_int, check_bool, check_constructor, check_scale,
                      check_disk_tuning, check_tensor, check_tuning, seq_id, seq_list, split_lengths)


def _serialised(method):
    """Runs `method` holding the cache's lock: calls from several threads take turns, whole.
    (A thread waiting for the lock does not hold the GIL.)"""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


class PagedKV:
    """A paged KV cache: fixed-size blocks of `block_size` tokens, each holding every layer.

    The device pool is `kv.pool`, a zero-copy tensor of shape
    [device_blocks, num_layers, 2, num_kv_heads, block_size, head_dim].

    Tuning (speed only, never results; the defaults are the fast choices):
      staging="kernel" | "dma": how an attend whose scope exceeds the device tier brings this
        layer's slices of host blocks to the GPU: SM loads over the link from the mapped host
        tier ("kernel"), or 2-D copies on the copy engine ("dma").
      gather_shape=None | (unroll, threads, ctas_per_sm): the shape of that staging kernel
        (unroll 2, 4, 8 or 16; threads a multiple of 32 up to 1024); None = (8, 512, 4).
      copy_batch="batch" | "overlap" | "off": block copies between tiers go to the driver as one
        cudaMemcpyBatchAsync ("batch"), the same hinting overlap with compute ("overlap"), or one
        cudaMemcpyAsync each ("off").

    Disk tier: every block written carries a CRC-32C checked on every read; a block that comes
    back different raises pagedkv.CorruptBlockError (an OSError) naming its sequence(s) and
    logical block, and other blocks stay readable. Failed disk I/O raises OSError with errno.
    disk_checksum=False turns the CRC off (nothing then detects a corrupted block): for measuring
    its cost (BENCHMARKS.md, the disk tier's checksum), not a tuning choice. Tuning of the disk
    tier (speed only): disk_read_piece=524288 reads blocks in pieces of that many bytes, each
    piece's CRC overlapping the next piece's read (a multiple of 4096 of at least 262144; 0: whole
    blocks, checked after); disk_crc="crc32" | "fold" | "portable" caps the CPU's CRC path (the
    fastest the CPU has, at most this one; the crc32 instruction by default, which cost less than
    the AVX-512 folding inside the engine). With CUDA caches a block's CRC is computed on the GPU
    as it is evicted, and the disk write takes it as given.

    Distributed context: with group= a torch.distributed process group, logical block i of every
    sequence lives on rank i % world; every rank makes the same calls with the same arguments
    (SPMD), keeps every sequence's page table and holds, writes and reads only its own blocks.
    attend() merges the ranks' partial (out, lse) by log-sum-exp (merge="allreduce": an all_gather
    of lse and an all_reduce of scaled outputs; "allgather": one all_gather of (out, lse) and the
    engine's merge_partials) and returns the full output on every rank; gather() is a collective
    returning the full K/V; block_table() lists (rank, tier, slot). docs/DISTRIBUTED.md.

    Threads: a cache may be shared by threads. Each public call holds the cache's lock for its
    duration, so calls from several threads run one after another, each whole (a thread waits for
    the lock without holding the GIL); calls that move data release the GIL. docs/DESIGN.md §5.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float16, device="cuda", device_blocks: int | None = None,
                 host_blocks: int = 0, disk_blocks: int = 0, disk_path=None, policy="lru",
                 window: int | None = None, sink_tokens: int = 0, retain: bool = True,
                 rope=None, positions: str = "original", watermarks=(0.02, 0.05),
                 staging: str = "kernel", gather_shape=None, copy_batch: str = "batch",
                 group=None, merge: str = "allreduce", disk_checksum: bool = True,
                 disk_read_piece: int = 512 * 1024, disk_crc: str = "crc32"):
        device = check_constructor(num_layers, num_kv_heads, head_dim, block_size, dtype, device,
                                    device_blocks, host_blocks, disk_blocks, disk_path, window,
                                    sink_tokens, retain, rope, positions)
        staging_code, shape, copy_batch_code = check_tuning(staging, gather_shape, copy_batch)
        check_bool(disk_checksum, "disk_checksum", "PagedKV()")
        check_disk_tuning(disk_read_piece, disk_crc)
        policy_name, policy_params = _resolve_policy(policy)
        low, high = self._watermarks(watermarks)
        self.group, self.rank, self.world = group, 0, 1
        if group is not None:
            from . import distributed

            if merge not in ("allreduce", "allgather"):
                raise ValueError(f"PagedKV(): merge must be 'allreduce' or 'allgather', got {merge!r}")
            self.rank, self.world = distributed.group_info(group)
            distributed.check_same(group, dict(
                num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                dtype=str(dtype), device_type=device.type, window=window, sink_tokens=sink_tokens, retain=retain,
                positions=positions, merge=merge, rope=repr(rope)))
        self.merge = merge
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.dtype, self.device = block_size, dtype, device
        self.device_blocks, self.host_blocks, self.disk_blocks = device_blocks, host_blocks, disk_blocks
        self.window, self.sink_tokens, self.retain = window, sink_tokens, retain
        self.policy = policy
        self.rope, self.positions = rope, positions
        self.staging, self.gather_shape, self.copy_batch = staging, gather_shape, copy_batch
        self.disk_checksum, self.disk_read_piece, self.disk_crc = disk_checksum, disk_read_piece, disk_crc
        # StreamingLLM positions: the kernels turn each row's query for its sinks (streaming.py).
        self._sink_rope = None
        if positions == "cache":
            from .streaming import sink_rope_table

            self._sink_rope = sink_rope_table(rope, head_dim)
        error = None
        try:
            # (kept: tests build one engine per simulated rank from the same arguments)
            self._engine_args = dict(
                num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                block_size=block_size, dtype=DTYPE_CODES[dtype], device_blocks=device_blocks,
                host_blocks=host_blocks, disk_blocks=disk_blocks, disk_path=str(disk_path or ""),
                window=window or 0, sink_tokens=sink_tokens, retain=retain,
                on_cuda=device.type == "cuda", cuda_device=device.index or 0, policy=policy_name,
                policy_params=policy_params, low_watermark=low if host_blocks else 0.0,
                high_watermark=high if host_blocks else 0.0, staging=staging_code, gather_shape=shape,
                copy_batch=copy_batch_code, stripe_world=self.world, stripe_rank=self.rank,
                disk_checksum=disk_checksum, disk_read_piece=disk_read_piece, disk_crc=disk_crc)
            self._engine = _C.Engine(**self._engine_args)
        except Exception as e:  # (with a group, every rank learns of it before anyone goes on)
            if group is None:
                raise
            error = e
        if group is not None:
            self._agree(error, "PagedKV()")
        self._pool = None
        self._lock = threading.RLock()

    # -- sequences -------------------------------------------------------------------------
    @_serialised
    def add_sequence(self) -> int:
        return self._engine.add_sequence()

    @_serialised
    def fork(self, seq: int) -> int:
        """A new sequence sharing every block of `seq`; a write into a shared block copies it."""
        return self._engine.fork(seq_id(seq, "fork()"))

    @_serialised
    def free(self, seq: int) -> None:
        self._engine.free(seq_id(seq, "free()"))

    @_serialised
    def truncate(self, seq: int, tokens: int) -> None:
        """Keeps the first `tokens` tokens of every layer of `seq` (speculative decoding's
        rejected drafts, transformers' crop); blocks past the end return to the pool. With a
        window and retain=False, a cut whose next row would read or write keys the window already
        dropped raises ValueError and changes nothing."""
        seq = seq_id(seq, "truncate()")
        tokens = bounded_int(tokens, "tokens", "truncate()")
        self._engine.truncate(seq, tokens)

    # -- data ------------------------------------------------------------------------------
    @_serialised
    def append(self, seqs, layer: int, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Writes rows of K and V ([N, num_kv_heads, head_dim]); rows of seqs[i] are consecutive."""
        where = "append()"
        seqs = seq_list(seqs, where)
        layer = self._layer(layer, where)
        tail = (self.num_kv_heads, self.head_dim)
        check_tensor(k, "k", where, self.dtype, self.device, 3, tail)
        check_tensor(v, "v", where, self.dtype, self.device, 3, tail)
        if v.shape[0] != k.shape[0]:
            raise ValueError(f"{where}: v has {v.shape[0]} rows but k has {k.shape[0]}")
        self._contiguous(k, "k", where)
        self._contiguous(v, "v", where)
        lens = split_lengths(lengths, seqs, k.shape[0], where)
        if self.world > 1:  # every rank takes its blocks' rows, or none does
            self._agree(self._try(self._engine.check_append, seqs, layer, lens), where)
        # (Tensors go to the engine as DLPack capsules: torch's __dlpack__, which nanobind would
        # call, costs ~2 us a tensor; to_dlpack makes the same capsule in ~0.3 us.)
        self._engine.append(seqs, layer, lens, _dl(k), _dl(v), self._stream())

    @_serialised
    def attend(self, seqs, layer: int, q: torch.Tensor, lengths=None, scale: float | None = None,
               return_lse: bool = False, window: int | None = None):
        """Causal attention of q ([N, num_q_heads, head_dim], the newest lengths[i] tokens of
        seqs[i]) over the cache. Returns out [N, num_q_heads, head_dim] (and lse [N, num_q_heads],
        float32, natural log, with return_lse)."""
        where = "attend()"
        seqs = seq_list(seqs, where)
        layer = self._layer(layer, where)
        check_tensor(q, "q", where, self.dtype, self.device, 3)
        if q.shape[2] != self.head_dim:
            raise ValueError(f"{where}: q must have shape [N, num_q_heads, {self.head_dim}], got {list(q.shape)}")
        hq = q.shape[1]
        if hq == 0 or hq % self.num_kv_heads:
            raise ValueError(f"{where}: q has {hq} heads; num_q_heads must be a positive multiple "
                             f"of num_kv_heads={self.num_kv_heads}")
        self._contiguous(q, "q", where)
        lens = split_lengths(lengths, seqs, q.shape[0], where)
        scale = check_scale(scale, 1.0 / math.sqrt(self.head_dim), where)
        return_lse = check_bool(return_lse, "return_lse", where)
        win = self._window_arg(window, where)
        # StreamingLLM positions: sinks scored as if right before the window, in the same call.
        sink_rope = self._sink_rope if win != 0 else None
        # More blocks in scope than the device and host tiers hold together (some on disk): pass
        # them through range by range. Up to that, the engine stages the off-device ones itself.
        # (Not with sink rotation: the ranges' kernel calls would not know the rows' windows.)
        # The same when the engine finds it cannot stage them all through the host tier at once
        # (it says so before moving anything).
        if self.world == 1:
            return self._attend_here(seqs, layer, q, lens, scale, win, sink_rope, return_lse)
        # Striped: this rank's partial (out, lse), merged over the group. A rank whose part fails
        # still joins the merge, with NaN, so that no rank waits forever; on CPU every rank then
        # raises (an agreement costs nothing there), on CUDA the others' outputs are NaN (an
        # agreement would synchronise the host every layer).
        from . import distributed

        error = None
        try:
            out, lse = self._attend_here(seqs, layer, q, lens, scale, win, sink_rope, True)
        except Exception as e:
            error = e
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
        if self.device.type != "cuda":
            self._agree(error, where)
        out, lse = distributed.merge(out, lse, self.group, self.merge, merge_fn=self._merge_fn)
        if error is not None:
            raise error
        return (out, lse) if return_lse else out

    def _attend_here(self, seqs, layer, q, lens, scale, win, sink_rope, return_lse):
        """attend() over the blocks of this engine (this rank's share when striped)."""
        hq = q.shape[1]
        can_pass = sink_rope is None and self.disk_blocks and not self._engine.step_open()
        if can_pass and (
                self._engine.blocks_needed(seqs, layer, lens, win) > self.device_blocks + self.host_blocks):
            return self._pass_through(seqs, layer, q, lens, scale, win, return_lse)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
        try:
            self._engine.attend(seqs, layer, lens, _dl(q), _dl(out), None if lse is None else _dl(lse), hq,
                                float(scale), win, -1, self._stream(),
                                sink_rope=sink_rope)
        except _C.OutOfBlocksError:
            if not can_pass:
                raise
            return self._pass_through(seqs, layer, q, lens, scale, win, return_lse)
        return (out, lse) if return_lse else out

    def _merge_fn(self, outs, lses, out, lse):
        self._engine.merge_partials(outs, lses, out, lse, self._stream())

    def _pass_through(self, seqs, layer, q, lens, scale, win, return_lse):
        from . import passthrough

        w = (self.window or 0) if win < 0 else win
        return passthrough.attend(self, seqs, layer, q, lens, float(scale), w, return_lse)

    @_serialised
    def prepare(self, seqs) -> None:
        """Builds the block table of this batch now (attend() otherwise does it at its first
        call of a step); later calls with the same batch and no block change reuse it."""
        self._engine.prepare(seq_list(seqs, "prepare()"), self._stream())

    @_serialised
    def begin_step(self, seqs, tokens: int = 1, num_q_heads: int | None = None) -> bool:
        """Plans one decode step of `seqs` for every layer at once: reserves `tokens` rows of each
        sequence in every layer (seq_len counts them from here), brings every block the step
        reads or writes to the device and keeps it there, and writes the step's metadata into
        device buffers that keep their addresses from step to step.

        Until end_step() or the next begin_step(), append() and attend() of exactly this batch
        (`tokens` rows per sequence, the cache's window) only launch kernels, so one step's
        calls can be captured in a CUDA graph and replayed after each begin_step()::

            if kv.begin_step(seqs, num_q_heads=32):   # True: capture (again)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run_layers()                          # kv.append / kv.attend per layer
            graph.replay()

        Returns True when something a captured graph holds changed (the batch size, `tokens`, a
        buffer's address, the block-table stride, which grows 64 blocks at a time). Give
        `num_q_heads` before a capture: it sizes the split-K scratch. Each layer's rows must be
        appended once per step; the reserved rows hold no data until then, gather() leaves them
        out, and end_step() gives back the rows of a layer never appended (its seq_len returns to
        where the step began); begin_step() while such a layer is left raises ValueError. Once a
        graph captured the step's appends, its replays write every layer without calling append():
        from then until begin_step returns True, every step's rows count as written.
        """
        where = "begin_step()"
        seqs = seq_list(seqs, where)
        tokens = bounded_int(tokens, "tokens", where, low=1)
        if num_q_heads is not None and (isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int)):
            raise TypeError(f"{where}: num_q_heads must be an int or None, got {type(num_q_heads).__name__}")
        if num_q_heads is not None and (not 0 < num_q_heads <= INT32_MAX or num_q_heads % self.num_kv_heads):
            raise ValueError(f"{where}: num_q_heads must be a positive multiple of num_kv_heads="
                             f"{self.num_kv_heads} below 2^31, got {num_q_heads}")
        if self.world == 1:
            return self._engine.begin_step(seqs, tokens, num_q_heads or 0, self._stream())
        changed, error = False, None
        try:
            changed = self._engine.begin_step(seqs, tokens, num_q_heads or 0, self._stream())
        except Exception as e:
            error = e
        try:
            self._agree(error, where)
        except Exception:  # some rank could not plan the step: no rank keeps one open
            self._engine.end_step()
            raise
        return changed

    @_serialised
    def end_step(self) -> None:
        """Closes the open decode step: its blocks may move again. Call it after the step's kernels
        were enqueued (moves are ordered after them on the current stream). Rows the step reserved
        in a layer never appended are given back. Without an open step it does nothing (like
        closing a closed file), so `finally: kv.end_step()` is always safe."""
        self._engine.end_step()

    @_serialised
    def prefetch(self, seqs) -> None:
        """Starts moving the blocks of `seqs` up to the device (as many as fit without evicting
        their own blocks), so that a later attend finds them there. Host-to-device copies are
        asynchronous (a later read waits for them on the device); blocks on disk are read back
        to the host first, synchronously."""
        self._engine.prefetch(seq_list(seqs, "prefetch()"), self._stream())

    @_serialised
    def offload(self, seqs) -> None:
        """Moves every device block of `seqs` down to the host tier now (a session going idle),
        making room for others before anyone needs it. Asynchronous on CUDA."""
        self._engine.offload(seq_list(seqs, "offload()"), self._stream())

    @_serialised
    def gather(self, seq: int, layer: int = 0):
        """(k, v), each [seq_len, num_kv_heads, head_dim]: the stored KV of one layer of `seq`
        (in an open decode step, a layer not yet appended leaves out the rows reserved for it)."""
        seq = seq_id(seq, "gather()")
        layer = self._layer(layer, "gather()")
        n = self._engine.written_len(seq, layer)
        alloc = torch.zeros if self.world > 1 else torch.empty  # (striped: other ranks' rows stay 0 here)
        k = alloc((n, self.num_kv_heads, self.head_dim), dtype=self.dtype, device=self.device)
        v = torch.empty_like(k) if self.world == 1 else torch.zeros_like(k)
        if n:
            self._engine.gather(seq, layer, k, v, self._stream())
        if self.world > 1:  # (every rank has the same n: lengths are global)
            from . import distributed

            owner = torch.div(torch.arange(n, device=self.device), self.block_size,
                              rounding_mode="floor") % self.world
            k = distributed.assemble_rows(k, owner, self.group)
            v = distributed.assemble_rows(v, owner, self.group)
        return k, v

    # -- inspection ------------------------------------------------------------------------
    @_serialised
    def seq_len(self, seq: int, layer: int = 0) -> int:
        return self._engine.seq_len(seq_id(seq, "seq_len()"), self._layer(layer, "seq_len()"))

    @_serialised
    def block_table(self, seq: int) -> list[tuple]:
        """Per logical block, (tier, slot); with a group (a collective), (rank, tier, slot) from the
        rank that holds the block."""
        local = [tuple(x) for x in self._engine.block_table(seq_id(seq, "block_table()"))]
        if self.group is None:
            return local
        from . import distributed

        return distributed.block_table(local, self.group)

    @_serialised
    def stats(self, group: bool = False) -> dict:
        """Counts of this cache (this rank's, with a group); group=True sums them over the group's
        ranks (a collective; without a group, the same as group=False)."""
        group = check_bool(group, "group", "stats()")
        s = self._engine.stats()
        if group and self.group is not None:
            from . import distributed

            s = distributed.sum_stats(s, self.group)
        return s

    @_serialised
    def sequences(self) -> list[int]:
        return list(self._engine.sequences())

    @_serialised
    def check_invariants(self) -> None:
        """Raises RuntimeError naming the first broken engine invariant."""
        self._engine.check_invariants()

    @property
    @_serialised
    def pool(self) -> torch.Tensor:
        """The device tier, zero-copy: [device_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]."""
        if self._pool is None:
            self._pool = torch.from_dlpack(self._engine.pool())
        return self._pool

    def __repr__(self) -> str:
        s = self.stats()
        scope = "full causal" if self.window is None else f"window={self.window}, sinks={self.sink_tokens}, retain={self.retain}"
        return (f"PagedKV(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, dtype={str(self.dtype)[6:]}, device={self.device}, "
                f"{scope}, policy={self.policy if isinstance(self.policy, str) else self.policy.name}, "
                f"device_blocks {s['device_blocks_used']}/{self.device_blocks} used"
                + (f", host_blocks {s['host_blocks_used']}/{self.host_blocks}" if self.host_blocks else "")
                + (f", disk_blocks {s['disk_blocks_used']}/{self.disk_blocks}" if self.disk_blocks else "")
                + f" ({self.block_bytes / 2**20:.2f} MiB each), sequences={s['num_sequences']})")

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: every layer, K and V, of block_size tokens."""
        return (self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim
                * torch.empty((), dtype=self.dtype).element_size())

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _try(fn, *args):
        """The exception fn(*args) raises, or None."""
        try:
            fn(*args)
        except Exception as e:
            return e
        return None

    def _agree(self, error, where: str) -> None:
        """With a group: raises on every rank when `error` is set on any (distributed.agree)."""
        from . import distributed

        distributed.agree(self.group, error, where)

    def _stream(self) -> int:
        if self.device.type != "cuda":
            return 0
        return torch.cuda.current_stream(self.device).cuda_stream

    def _layer(self, layer, where: str) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{where}: layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"{where}: layer {layer} is out of range for a cache of {self.num_layers} layers")
        return layer

    @staticmethod
    def _watermarks(w) -> tuple[float, float]:
        try:
            low, high = (float(x) for x in w)
        except (TypeError, ValueError):
            raise TypeError(f"PagedKV(): watermarks must be a pair of fractions (low, high), got {w!r}") from None
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"PagedKV(): watermarks must satisfy 0 <= low <= high < 1, got {w!r}")
        return low, high

    @staticmethod
    def _contiguous(t: torch.Tensor, name: str, where: str) -> None:
        if not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous (pagedkv never copies inputs to make them fit)")

    def _window_arg(self, window, where: str) -> int:
        if window is None:
            return -1
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{where}: window must be an int or None, got {type(window).__name__}")
        if not 0 <= window <= INT32_MAX:
            raise ValueError(f"{where}: window must be in 0..2^31-1 (0 = full causal), got {window!r}")
        return window
