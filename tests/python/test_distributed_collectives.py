"""The collectives of a striped cache (python/pagedkv/distributed.py) on their own, over gloo
processes, world sizes 1-4, without a cache in the way. Oracles: the log-sum-exp merge in
float64 over every rank's partial (each rank draws all ranks' partials from one seed, so each
can compute the reference itself); bit-exact equality for assemble_rows (integer views, so -0.0
and NaN payloads count); for agree and check_same, the exception each rank must raise.

One spawn per world size runs every check (starting processes is the expensive part); a rank
whose check fails raises there and the spawn reports its traceback. The group's timeout is
short, so a rank left waiting in a collective fails the test instead of hanging it."""
import contextlib
import datetime
import errno
import gc
import math
import socket
import threading

import pytest
import torch

import pagedkv
from pagedkv import distributed

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
mp = pytest.importorskip("torch.multiprocessing")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def same_on_every_rank(t: torch.Tensor, world: int):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    assert all(torch.equal(bits(p), bits(t)) for p in parts), "ranks returned different bits"


@contextlib.contextmanager
def no_host_sync():
    """Any read of a tensor's value on the host (what would stall a CUDA stream, and breaks a
    CUDA graph capture) raises inside the block."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def call(*_a, **_k):
            raise AssertionError(f"merge read a tensor on the host (Tensor.{name})")
        return call

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


# ----------------------------------------------------------------------------------------------
# merge


def partials(world, rows, hq, d, dtype, seed):
    """Every rank's partial (outs [world, rows, hq, D] in dtype, lses [world, rows, hq] float32):
    row 0 seen by rank 0 only, row 1 by no rank, the rest by every rank with lses far apart."""
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(world, rows, hq, d, generator=g)
    lses = torch.randn(world, rows, hq, generator=g) * 30  # exp() of these overflows unscaled
    lses[1:, 0] = -math.inf
    lses[:, 1] = -math.inf
    outs[lses == -math.inf] = 0.0
    return outs.to(dtype), lses


def merged_ref(outs, lses):
    """float64 log-sum-exp merge over dim 0; rows no rank saw: out 0, lse -inf."""
    lse = torch.logsumexp(lses.double(), dim=0)
    w = torch.exp(lses.double() - lse.masked_fill(lse == -math.inf, 0.0))
    return (w.unsqueeze(-1) * outs.double()).sum(0), lse


def check_merge(rank, world, engine_merge):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        outs, lses = partials(world, rows=6, hq=4, d=16, dtype=dtype, seed=11)
        ref_out, ref_lse = merged_ref(outs, lses)
        merge_fns = {"allreduce": [None], "allgather": [None, engine_merge[dtype]]}
        for method, fns in merge_fns.items():
            for fn in fns:
                out, lse = outs[rank].clone(), lses[rank].clone()
                with no_host_sync():
                    got, got_lse = distributed.merge(out, lse, dist.group.WORLD, method, merge_fn=fn)
                what = f"merge {method} {dtype} merge_fn={fn is not None} world {world}"
                assert got.dtype == dtype and got.shape == out.shape and got_lse.dtype == torch.float32, what
                assert torch.equal(bits(out), bits(outs[rank])), f"{what}: changed its input"
                want = ref_out if dtype == torch.float32 else ref_out.to(dtype).double()
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=what)
                torch.testing.assert_close(got_lse.double(), ref_lse, atol=1e-5, rtol=1e-5, msg=what)
                assert torch.equal(got[1], torch.zeros_like(got[1])) and bool((got_lse[1] == -math.inf).all()), \
                    f"{what}: a row no rank saw must be out 0, lse -inf"
                same_on_every_rank(got, world)
                same_on_every_rank(got_lse, world)
    with pytest.raises(ValueError, match="allreduce"):
        distributed.merge(outs[rank], lses[rank], dist.group.WORLD, "alltoall")


def check_merge_world_one(world):
    """At world 1 the merge is the identity: the very tensors come back, nothing sent."""
    if world != 1:
        return
    out, lse = torch.randn(3, 2, 8), torch.randn(3, 2)
    got, got_lse = distributed.merge(out, lse, dist.group.WORLD)
    assert got is out and got_lse is lse


# ----------------------------------------------------------------------------------------------
# assemble_rows, sum_stats, block_table, group_info


def special_rows(n, dtype, seed):
    """[n, 3, 4] of dtype whose values include -0.0, +-inf and NaNs with distinct payloads."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, 3, 4, generator=g).to(dtype)
    raw = bits(t).view(n, 3, 4)
    width = t.element_size() * 8
    sign, quiet = 1 << (width - 1), {32: 0x7FC00000, 16: 0x7E00 if dtype == torch.float16 else 0x7FC0}[width]
    for i in range(n):
        raw[i, 0, 0] = sign - (1 << width)  # -0.0, as the signed integer of its bits
        raw[i, 0, 1] = quiet + 1 + i % 7  # NaN, payload i
        raw[i, 0, 2] = quiet + 1 + i % 7 - (1 << width) + sign  # -NaN, payload i
    t[:, 1, 0] = math.inf
    t[:, 1, 1] = -math.inf
    return t


def check_assemble_rows(rank, world):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, owner_kind in ((0, "stripe"), (1, "stripe"), (37, "stripe"), (23, "random")):
            full = special_rows(n, dtype, seed=n)
            if owner_kind == "stripe":  # blocks of 4 rows, block i on rank i % world
                owner = (torch.arange(n) // 4) % world
            else:
                owner = torch.randint(0, world, (n,), generator=torch.Generator().manual_seed(5))
            local = torch.randn(n, 3, 4).to(dtype) * 1000  # other ranks' rows: junk
            mine = owner == rank
            bits(local)[mine] = bits(full)[mine]  # (copied as integers: payloads kept)
            got = distributed.assemble_rows(local, owner, dist.group.WORLD)
            assert got.shape == full.shape and got.dtype == dtype
            assert torch.equal(bits(got), bits(full)), f"assemble_rows {dtype} n={n} {owner_kind}: bits differ"


def check_sum_stats(rank, world):
    stats = {"device_blocks_used": rank + 1, "transfer_wait_s": 0.25 * rank, "big": 2**62 + rank,
             "name": f"rank{rank}", "on_cuda": rank == 0}
    got = distributed.sum_stats(stats, dist.group.WORLD)
    assert list(got) == list(stats)
    assert got["device_blocks_used"] == world * (world + 1) // 2 and type(got["device_blocks_used"]) is int
    assert got["transfer_wait_s"] == pytest.approx(0.25 * world * (world - 1) / 2)
    assert type(got["transfer_wait_s"]) is float
    assert got["big"] == world * 2**62 + world * (world - 1) // 2  # exact: no float64 on the way
    assert got["name"] == "rank0" and got["on_cuda"] is True


def check_block_table(rank, world):
    n = 11
    local = [("device", 100 * rank + i) if i % world == rank else ("dropped", -1) for i in range(n)]
    want = [(i % world, "device", 100 * (i % world) + i) for i in range(n)]
    assert distributed.block_table(local, dist.group.WORLD) == want
    assert distributed.block_table([], dist.group.WORLD) == []
    if world > 1:  # ranks that disagree on the length: an error on every rank, no hang
        with pytest.raises(ValueError, match="rank 0: 12"):
            distributed.block_table(local + [("device", 0)] if rank == 0 else local, dist.group.WORLD)


def check_group_info(rank, world):
    assert distributed.group_info(dist.group.WORLD) == (rank, world)
    with pytest.raises(TypeError, match="group"):
        distributed.group_info("world")


# ----------------------------------------------------------------------------------------------
# agree and check_same


class Odd(Exception):
    def __init__(self, code, detail):
        super().__init__(f"odd {code}: {detail}")


def failures():
    """(exception, class the other ranks must raise)."""
    return [
        (ValueError("k must be float32 like the cache"), ValueError),
        (KeyError("unknown sequence 7"), KeyError),
        (IndexError("layer 9 is out of range"), IndexError),
        (TypeError("lengths must be ints"), TypeError),
        (MemoryError("host allocation failed"), MemoryError),
        (OSError(errno.ENOSPC, "no space left on the disk tier"), OSError),
        (pagedkv.OutOfBlocksError("every tier is full"), pagedkv.OutOfBlocksError),
        (pagedkv.CorruptBlockError(errno.EIO, "block 3 of sequence 1 fails its crc"), pagedkv.CorruptBlockError),
        (Odd(3, "constructor of two arguments"), RuntimeError),
        (RuntimeError(threading.Lock()), RuntimeError),  # an argument pickle refuses
    ]


def expected_message(error) -> str:
    if isinstance(error, OSError):
        return error.strerror
    return str(error.args[0]) if len(error.args) == 1 else str(error)


def check_agree(rank, world):
    group = dist.group.WORLD
    assert distributed.agree(group, None, "append()") is None
    for i, (error, kind) in enumerate(failures()):
        bad = i % world
        mine = error if rank == bad else None
        with pytest.raises(BaseException) as info:
            distributed.agree(group, mine, "append()")
        got = info.value
        assert distributed.agree(group, None, "append()") is None  # the group stays usable
        if rank == bad:
            assert got is error  # the failing rank raises its own exception, untouched
            continue
        assert type(got) is kind, (type(got), kind)
        text = f"append(): rank {bad} failed: {expected_message(error)}"
        if type(error.args[0]) is type(threading.Lock()):  # (its repr differs from rank to rank)
            assert str(got).startswith(f"append(): rank {bad} failed: <unlocked"), str(got)
        elif kind is RuntimeError and type(error) is not RuntimeError:
            assert str(got).startswith(text) and type(error).__name__ in str(got), str(got)
        elif isinstance(got, OSError):
            assert got.errno == error.errno and got.strerror == text, (got.errno, got.strerror)
        else:
            assert got.args == (text,), got.args
    if world >= 3:  # two ranks fail: the others raise the first one's class
        mine = {1: IndexError("layer 5"), 2: ValueError("bad q")}.get(rank)
        with pytest.raises((IndexError, ValueError)) as info:
            distributed.agree(group, mine, "attend()")
        assert info.value is mine if mine is not None else (
            type(info.value) is IndexError and str(info.value.args[0]) == "attend(): rank 1 failed: layer 5")


def check_check_same(rank, world):
    fields = dict(num_layers=2, block_size=8, dtype="torch.float32", window=None)
    assert distributed.check_same(dist.group.WORLD, fields) is None
    if world == 1:
        return
    odd = dict(fields, block_size=4) if rank == world - 1 else fields
    with pytest.raises(ValueError) as info:
        distributed.check_same(dist.group.WORLD, odd, "PagedKV()")
    text = str(info.value)
    assert text.startswith("PagedKV(): ") and "block_size" in text and f"rank {world - 1}: 4" in text
    assert "rank 0: 8" in text and "num_layers" not in text, text


# ----------------------------------------------------------------------------------------------


def engine_merges():
    """The engine's merge_partials per dtype, as PagedKV hands it to merge()."""
    fns = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=16, dtype=dtype, device="cpu", device_blocks=1)
        fns[dtype] = lambda o, l, mo, ml, kv=kv: kv._engine.merge_partials(o, l, mo, ml, 0)
    return fns


def worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        check_group_info(rank, world)
        check_merge(rank, world, engine_merges())
        check_merge_world_one(world)
        check_assemble_rows(rank, world)
        check_sum_stats(rank, world)
        check_block_table(rank, world)
        check_agree(rank, world)
        check_check_same(rank, world)
        dist.barrier()
    finally:
        gc.collect()  # (pytest.raises keeps frames, and so the group, in cycles: free them first)
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_collectives(world):
    mp.spawn(worker, args=(world, free_port()), nprocs=world, join=True)


def test_group_info_needs_torch_distributed_initialised():
    assert not dist.is_initialized()  # (this pytest process never starts a group)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.group_info(object())
