"""The disk tier's integrity (issue 18, defect 4): every block written to disk carries a CRC-32C
checked on every read, so a block that comes back different raises pagedkv.CorruptBlockError (an
OSError, errno EIO) naming its sequence(s) and logical block, never wrong data; every other block
stays readable and the engine usable. I/O failures raise OSError with errno set.

Faults: a flipped byte in the backing file (gather, attend), the file truncated under the engine,
a write failing for the file size limit (RLIMIT_FSIZE, in a subprocess), a read-only disk_path.
Oracle: bit-exact equality with the rows appended.
"""
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pagedkv
from pagedkv import _C

# (head_dim, block_size): 8 KiB blocks take the O_DIRECT path, 2304-byte ones the buffered one.
SHAPES = [(64, 4), (24, 3)]
LAYERS, HEADS = 2, 2


def make(tmp_path, head_dim, block_size, **kw):
    args = dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=head_dim, block_size=block_size,
                dtype=torch.float32, device="cpu", device_blocks=6, host_blocks=6, disk_blocks=64,
                disk_path=tmp_path)
    args.update(kw)
    return pagedkv.PagedKV(**args)


def block_bytes(kv) -> int:
    return LAYERS * 2 * HEADS * kv.block_size * kv.head_dim * 4


def fill(kv, gen, rows=None):
    """A new sequence with `rows` (default: four blocks and a bit) fresh random rows in every layer;
    returns (id, [(k, v)] per layer)."""
    rows = rows or 3 * kv.block_size + 2
    s = kv.add_sequence()
    data = []
    for layer in range(LAYERS):
        k = torch.randn(rows, HEADS, kv.head_dim, generator=gen)
        v = torch.randn(rows, HEADS, kv.head_dim, generator=gen)
        kv.append([s], layer, k, v)
        data.append((k, v))
    return s, data


def assert_exact(kv, s, data, rows=None):
    for layer, (k, v) in enumerate(data):
        got_k, got_v = kv.gather(s, layer)
        n = got_k.shape[0] if rows is None else rows
        assert torch.equal(got_k[:n], k[:n]) and torch.equal(got_v[:n], v[:n]), f"sequence {s} layer {layer}"


def open_backing_file(disk_path) -> int:
    """A new descriptor on the engine's (unlinked) backing file in `disk_path`, found through
    /proc/self/fd; buffered, whatever the engine's own descriptors are."""
    prefix = os.path.join(str(disk_path), "pagedkv-")
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(prefix):
            return os.open(f"/proc/self/fd/{name}", os.O_RDWR)
    raise AssertionError(f"no backing file under {disk_path}")


def flip_byte(disk_path, offset: int) -> None:
    fd = open_backing_file(disk_path)
    try:
        old = os.pread(fd, 1, offset)
        assert len(old) == 1
        os.pwrite(fd, bytes([old[0] ^ 0x5A]), offset)
    finally:
        os.close(fd)


def disk_block_of(kv, s) -> tuple[int, int]:
    """(logical block, disk slot) of the first block of `s` on the disk tier."""
    for logical, (tier, slot) in enumerate(kv.block_table(s)):
        if tier == "disk":
            return logical, slot
    raise AssertionError(f"sequence {s} has no block on disk: {kv.block_table(s)}")


def test_crc32c_binding_known_values():
    digits = torch.tensor(list(b"123456789"), dtype=torch.uint8)
    assert _C.crc32c(digits) == 0xE3069283
    assert _C.crc32c(digits, portable=True) == 0xE3069283
    x = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert _C.crc32c(x) == _C.crc32c(x, portable=True)


@pytest.mark.parametrize("disk_crc", ["fold", "crc32", "portable"])
def test_disk_crc_path_is_a_config_choice(tmp_path, disk_crc):
    # PagedKV(disk_crc=) caps the CPU path the disk tier's CRC runs on (benches time the paths
    # inside the engine): any path reads every block back exact and still finds a flipped byte.
    gen = torch.Generator().manual_seed(4)
    kv = make(tmp_path, 64, 4, disk_crc=disk_crc)
    assert kv.disk_crc == disk_crc
    a, a_data = fill(kv, gen)
    others = [fill(kv, gen) for _ in range(3)]
    logical, slot = disk_block_of(kv, a)
    flip_byte(tmp_path, slot * block_bytes(kv) + 5)
    with pytest.raises(pagedkv.CorruptBlockError, match=f"sequence {a} logical block {logical}"):
        kv.gather(a, 0)
    for s, data in others:
        assert_exact(kv, s, data)
    kv.check_invariants()


@pytest.mark.parametrize("bad,err", [("crc32c", ValueError), ("", ValueError), (None, ValueError), (3, ValueError)])
def test_bad_disk_crc_is_named(tmp_path, bad, err):
    with pytest.raises(err, match="disk_crc"):
        make(tmp_path, 64, 4, disk_crc=bad)


@pytest.mark.parametrize("bad,err", [(1, ValueError), (4096, ValueError), (256 * 1024 + 4, ValueError),
                                     (-4096, ValueError), (2**41, ValueError), (True, TypeError),
                                     (512.0 * 1024, TypeError), ("524288", TypeError)])
def test_bad_disk_read_piece_is_named(tmp_path, bad, err):
    with pytest.raises(err, match="disk_read_piece"):
        make(tmp_path, 64, 4, disk_read_piece=bad)
    with pytest.raises((ValueError, TypeError), match="disk_read_piece"):  # the engine checks it too
        _C.Engine(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=0, device_blocks=2, host_blocks=2,
                  disk_blocks=2, disk_path=str(tmp_path), window=0, sink_tokens=0, retain=True, on_cuda=False,
                  cuda_device=0, policy="lru", policy_params={}, low_watermark=0.0, high_watermark=0.0,
                  disk_read_piece=bad if isinstance(bad, int) and not isinstance(bad, bool) else -1)


@pytest.mark.parametrize("head_dim,block_size", SHAPES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupt_block_is_named_and_the_rest_stays_exact(tmp_path, head_dim, block_size, where):
    gen = torch.Generator().manual_seed(7)
    kv = make(tmp_path, head_dim, block_size)
    a, a_data = fill(kv, gen)
    fork = kv.fork(a)  # shares every block of a: a corrupt one names both
    others = [fill(kv, gen) for _ in range(3)]  # pushes a's blocks down to disk
    logical, slot = disk_block_of(kv, a)
    size = block_bytes(kv)
    flip_byte(tmp_path, slot * size + {"first": 0, "middle": size // 2 + 3, "last": size - 1}[where])
    table = kv.block_table(a)

    for layer in range(LAYERS):  # the whole block is checked, whichever layer is read
        with pytest.raises(pagedkv.CorruptBlockError) as info:
            kv.gather(a, layer)
        e = info.value
        assert isinstance(e, OSError) and e.errno == errno.EIO
        assert f"sequence {a} logical block {logical}" in e.strerror, e.strerror
        assert f"sequence {fork} logical block {logical}" in e.strerror, e.strerror
        assert f"slot {slot} " in e.strerror and "checksum" in e.strerror, e.strerror
    assert kv.block_table(a) == table  # a failed read moves nothing
    kv.check_invariants()
    for s, data in others:
        assert_exact(kv, s, data)

    # attend reads it through the host tier: the same error, the block stays on disk, corrupt.
    q = torch.randn(1, HEADS, head_dim, generator=gen)
    with pytest.raises(pagedkv.CorruptBlockError, match=f"sequence {a} logical block {logical}"):
        kv.attend([a], 0, q)
    assert kv.block_table(a)[logical] == ("disk", slot)
    kv.check_invariants()
    for s, data in others:  # other sequences: attend and gather still work, exactly
        kv.attend([s], 1, q)
        assert_exact(kv, s, data)
    with pytest.raises(pagedkv.CorruptBlockError):
        kv.gather(fork, 0)

    # Recovery: cut the sequences back to before the corrupt block and carry on.
    kv.free(fork)
    kv.truncate(a, logical * block_size)
    kv.check_invariants()
    assert_exact(kv, a, a_data, rows=logical * block_size)
    more = torch.randn(5, HEADS, head_dim, generator=gen)
    kv.append([a], 0, more, more)
    assert torch.equal(kv.gather(a, 0)[0], torch.cat([a_data[0][0][:logical * block_size], more]))
    for s, data in others:
        assert_exact(kv, s, data)
    kv.check_invariants()


# On CUDA, a block's CRC-32C is computed on the GPU beside its eviction copy (cuda/block_crc.cu) and
# carried with its host slot; a block read back from disk carries the CRC its read checked. The
# disk tier writes such blocks without checksumming them again (stats()["disk_crcs_carried"]), so
# a GPU CRC unequal to crc32c() of the bytes would fail the reads below. Shapes: head_dim 128 /
# block 16 (16 KiB blocks in bf16, O_DIRECT) and head_dim 80 / block 3 (1920 bytes, buffered).
@pytest.mark.cuda
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (80, 3)])
def test_cuda_blocks_carry_their_gpu_crc_to_disk(tmp_path, head_dim, block_size):
    gen = torch.Generator().manual_seed(23)
    kv = pagedkv.PagedKV(LAYERS, HEADS, head_dim, block_size=block_size, dtype=torch.bfloat16, device="cuda",
                         device_blocks=6, host_blocks=4, disk_blocks=96, disk_path=tmp_path)
    seqs = {}
    for _ in range(5):  # 5 x 4 blocks: most go down to disk
        s = kv.add_sequence()
        rows = [(torch.randn(4 * block_size - 1, HEADS, head_dim, generator=gen).to(torch.bfloat16).cuda(),
                 torch.randn(4 * block_size - 1, HEADS, head_dim, generator=gen).to(torch.bfloat16).cuda())
                for _ in range(LAYERS)]
        for layer, (k, v) in enumerate(rows):
            kv.append([s], layer, k, v)
        seqs[s] = rows
    for _ in range(3):  # up and down again, in turns: host slots filled by disk reads spill too
        for s, rows in seqs.items():
            kv.prefetch([s])
            for layer, (k, v) in enumerate(rows):
                got_k, got_v = kv.gather(s, layer)
                assert torch.equal(got_k, k) and torch.equal(got_v, v), f"sequence {s} layer {layer}"
            kv.check_invariants()
    st = kv.stats()
    assert st["blocks_to_disk"] > 20 and st["blocks_from_disk"] > 20, st
    assert st["disk_crcs_carried"] == st["blocks_to_disk"], st  # every block written came with its CRC

    # The carried CRC is checked like a computed one: a flipped byte is reported, the rest exact.
    a = next(s for s in seqs if any(t == "disk" for t, _ in kv.block_table(s)))
    logical, slot = disk_block_of(kv, a)
    size = LAYERS * 2 * HEADS * block_size * head_dim * 2
    flip_byte(tmp_path, slot * size + size // 3)
    with pytest.raises(pagedkv.CorruptBlockError, match=f"sequence {a} logical block {logical}"):
        kv.gather(a, 0)
    kv.check_invariants()
    for s, rows in seqs.items():
        if s != a:
            assert torch.equal(kv.gather(s, 1)[0], rows[1][0])


def test_cpu_caches_checksum_on_the_disk_tier(tmp_path):
    kv = make(tmp_path, 64, 4)
    fill(kv, torch.Generator().manual_seed(5), rows=40)
    st = kv.stats()
    assert st["blocks_to_disk"] > 0 and st["disk_crcs_carried"] == 0, st


# Blocks of 256 KiB and more are checksummed on a checksum thread while their own write runs; with
# disk_crc="fold" the CRC folds 256 bytes a step on CPUs with VPCLMULQDQ (the last size % 256 bytes
# on the crc32 path), by default it runs the crc32 instruction on three streams. (layers, head_dim, block_size): 2.5 MiB blocks (O_DIRECT) and 1,101,600-byte ones
# (buffered; 32 bytes past the last whole step). PIECE: boundaries to flip bytes on either side of.
BIG = [(40, 128, 64), (81, 100, 17)]
PIECE = 512 << 10


@pytest.mark.parametrize("layers,head_dim,block_size", BIG)
@pytest.mark.parametrize("piece,crc", [(512 * 1024, "crc32"), (512 * 1024, "fold"), (0, "crc32"), (0, "fold"),
                                       (256 * 1024, "crc32"), (768 * 1024, "fold")])
def test_big_blocks_are_checked_in_every_piece(tmp_path, layers, head_dim, block_size, piece, crc):
    # piece: PagedKV(disk_read_piece=) (the default 512 KiB; 0: whole blocks, checked after);
    # crc: PagedKV(disk_crc=) (the default crc32 instruction, or the folding)
    gen = torch.Generator().manual_seed(5)
    kv = pagedkv.PagedKV(num_layers=layers, num_kv_heads=1, head_dim=head_dim, block_size=block_size,
                         dtype=torch.float32, device="cpu", device_blocks=2, host_blocks=2, disk_blocks=16,
                         disk_path=tmp_path, disk_read_piece=piece, disk_crc=crc)
    size = layers * 2 * block_size * head_dim * 4
    seqs = []
    for _ in range(11):  # one block each: most go to disk
        s = kv.add_sequence()
        rows = [torch.randn(block_size, 1, head_dim, generator=gen) for _ in range(layers)]
        for layer, r in enumerate(rows):
            kv.append([s], layer, r, -r)
        seqs.append((s, rows))
    on_disk = [(s, rows) for s, rows in seqs if kv.block_table(s)[0][0] == "disk"]
    # one flipped byte per block: the first, either side of a 512 KiB boundary, one past 1 MiB, the
    # first of the last 512 KiB piece, the last
    offsets = [0, PIECE - 1, PIECE, 2 * PIECE + 17, (size - 1) // PIECE * PIECE, size - 1]
    victims = on_disk[:len(offsets)]
    assert len(victims) == len(offsets) and size >= 2 * PIECE + 18
    assert size in (5 * PIECE, 1_101_600)
    for (s, _), off in zip(victims, offsets):
        flip_byte(tmp_path, kv.block_table(s)[0][1] * size + off)
    for s, _ in victims:
        with pytest.raises(pagedkv.CorruptBlockError, match=f"sequence {s} logical block 0"):
            kv.gather(s, 0)
    kv.check_invariants()
    assert len(on_disk) > len(victims)  # a block read through the pieces intact, too
    for s, rows in seqs:
        if all(s != v for v, _ in victims):
            k, v = kv.gather(s, layers - 1)
            assert torch.equal(k, rows[-1]) and torch.equal(v, -rows[-1]), f"sequence {s}"


def test_disk_checksum_switch(tmp_path):
    """PagedKV(disk_checksum=) (and the engine's `_C.Engine(disk_checksum=)`) take only a bool,
    and off really skips the check."""
    args = dict(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=0, device_blocks=2, host_blocks=0,
                disk_blocks=0, disk_path="", window=0, sink_tokens=0, retain=True, on_cuda=False, cuda_device=0,
                policy="lru", policy_params={}, low_watermark=0.0, high_watermark=0.0)
    _C.Engine(**args, disk_checksum=False)
    for bad in (0, 1, "yes", None):
        with pytest.raises(TypeError):
            _C.Engine(**args, disk_checksum=bad)
        with pytest.raises(TypeError, match="disk_checksum"):
            pagedkv.PagedKV(1, 1, 8, device="cpu", device_blocks=2, disk_checksum=bad)
    for checksum in (True, False):
        gen = torch.Generator().manual_seed(2)
        path = tmp_path / str(checksum)
        path.mkdir()
        kv = pagedkv.PagedKV(LAYERS, HEADS, 64, block_size=4, dtype=torch.float32, device="cpu", device_blocks=6,
                             host_blocks=6, disk_blocks=64, disk_path=path, disk_checksum=checksum)
        assert kv.disk_checksum is checksum
        a, a_data = fill(kv, gen)
        others = [fill(kv, gen) for _ in range(3)]
        logical, slot = disk_block_of(kv, a)
        flip_byte(path, slot * block_bytes(kv))
        if checksum:
            with pytest.raises(pagedkv.CorruptBlockError):
                kv.gather(a, 0)
        else:  # the flipped byte comes back unnoticed: what the switch turns off
            assert not torch.equal(kv.gather(a, 0)[0], a_data[0][0])
        for s, data in others:
            assert_exact(kv, s, data)


def test_bench_offload_cpu_runs(tmp_path):
    """`python -m pagedkv bench offload --device cpu` (the disk tier alone) at a toy size."""
    import json

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pagedkv", "bench", "offload", "--device", "cpu", "--disk-blocks", "40",
                        "--rounds", "2", "--disk-path", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cost" in r.stdout and "target < 2%" in r.stdout, r.stdout
    (path,) = out.glob("offload-*.json")
    res = json.loads(path.read_text())
    assert res["checksum_cost"]["rounds"] == 2 and res["checksum_cost"]["write"]["gb_s_checksum"] > 0


@pytest.mark.parametrize("head_dim,block_size", SHAPES)
def test_truncated_backing_file_is_an_error_not_garbage(tmp_path, head_dim, block_size):
    gen = torch.Generator().manual_seed(3)
    kv = make(tmp_path, head_dim, block_size)
    seqs = [fill(kv, gen) for _ in range(5)]
    on_disk = [(s, d) for s, d in seqs if any(t == "disk" for t, _ in kv.block_table(s))]
    resident = [(s, d) for s, d in seqs if all(t != "disk" for t, _ in kv.block_table(s))]
    assert on_disk and resident
    fd = open_backing_file(tmp_path)
    try:
        os.ftruncate(fd, block_bytes(kv) // 2)  # cut inside slot 0: every disk block reads short
    finally:
        os.close(fd)
    for s, _ in on_disk:
        logical, _slot = disk_block_of(kv, s)
        with pytest.raises(pagedkv.CorruptBlockError, match=f"sequence {s} logical block {logical}") as info:
            kv.gather(s, 0)
        assert info.value.errno == errno.EIO and "cut short" in info.value.strerror
    kv.check_invariants()
    for s, data in resident:
        assert_exact(kv, s, data)
    # Usable: more blocks spill to the (re-grown) file and come back exact.
    spilled = kv.stats()["blocks_to_disk"]
    fresh = [fill(kv, gen) for _ in range(3)]
    assert kv.stats()["blocks_to_disk"] > spilled
    assert any(t == "disk" for s, _ in resident + fresh for t, _ in kv.block_table(s))
    for s, data in resident + fresh:
        assert_exact(kv, s, data)
    kv.check_invariants()


WRITE_FAULT = textwrap.dedent("""
    import errno, os, resource, signal, sys, torch, pagedkv
    path = sys.argv[1]
    kv = pagedkv.PagedKV(num_layers=2, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float32,
                         device="cpu", device_blocks=2, host_blocks=2, disk_blocks=64, disk_path=path)
    g = torch.Generator().manual_seed(0)
    s = kv.add_sequence()
    k = torch.randn(16, 2, 64, generator=g)
    kv.append([s], 0, k, k)          # 2 blocks on device, 2 on host: the next block spills
    table, st = kv.block_table(s), kv.stats()
    k2 = torch.randn(8, 2, 64, generator=g)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))  # every disk write now fails (EFBIG)
    try:
        kv.append([s], 0, k2, k2)
        raise SystemExit("no error")
    except pagedkv.CorruptBlockError:
        raise SystemExit("a write failure is not a corrupt block")
    except OSError as e:
        assert e.errno == errno.EFBIG, e.errno
        assert e.strerror.startswith("disk tier: writing"), e.strerror
    assert kv.block_table(s) == table, "state changed"
    assert kv.seq_len(s, 0) == 16 and kv.stats()["disk_blocks_used"] == st["disk_blocks_used"]
    kv.check_invariants()
    assert torch.equal(kv.gather(s, 0)[0], k), "data changed"
    q = torch.randn(1, 2, 64, generator=g)
    kv.attend([s], 0, q)             # everything fits above disk: still works at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    kv.append([s], 0, k2, k2)        # usable afterwards: the spill goes through now
    assert any(t == "disk" for t, _ in kv.block_table(s))
    assert torch.equal(kv.gather(s, 0)[0], torch.cat([k, k2]))
    kv.check_invariants()
    print("ok")
""")


def test_write_failure_is_an_oserror_with_errno(tmp_path):
    r = subprocess.run([sys.executable, "-c", WRITE_FAULT, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


READ_ONLY = textwrap.dedent("""
    import ctypes, errno, os, sys, torch, pagedkv
    ro, rw = sys.argv[1], sys.argv[2]
    if os.geteuid() == 0:  # root writes anywhere: drop CAP_DAC_OVERRIDE (1) from the effective set
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()
        assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
        data[0].effective &= ~(1 << 1)
        assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float32,
              device="cpu", device_blocks=2, host_blocks=2, disk_blocks=8)
    try:
        pagedkv.PagedKV(disk_path=ro, **kw)
        raise SystemExit("no error")
    except PermissionError as e:
        assert e.errno == errno.EACCES and "disk_path" in e.strerror and ro in e.strerror, e.strerror
    kv = pagedkv.PagedKV(disk_path=rw, **kw)  # the same call with a good directory works
    s = kv.add_sequence()
    k = torch.randn(40, 2, 64)
    kv.append([s], 0, k, k)
    assert torch.equal(kv.gather(s, 0)[0], k) and kv.stats()["blocks_to_disk"] > 0
    kv.check_invariants()
    print("ok")
""")


def test_read_only_disk_path_is_a_permission_error(tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    ro.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-c", READ_ONLY, str(ro), str(rw)], capture_output=True,
                           text=True, timeout=120)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_missing_disk_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="disk_path") as info:
        make(tmp_path / "nowhere", 64, 4)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("dtype,tuning", [(None, {}), ("bfloat16", {"disk_read_piece": 0, "disk_crc": "portable"})])
def test_bench_checksum_runs(tmp_path, dtype, tuning):
    """`python -m pagedkv bench checksum` at a toy size: finishes, saves its JSON, figures positive;
    --disk-read-piece / --disk-crc reach both caches and the JSON."""
    import json

    out = tmp_path / "out"
    flags = [x for k, v in tuning.items() for x in ("--" + k.replace("_", "-"), str(v))]
    r = subprocess.run([sys.executable, "-m", "pagedkv", "bench", "checksum", "--blocks", "40", "--gib", "0.05",
                        "--rounds", "2", "--disk-path", str(tmp_path), "--out", str(out)]
                       + (["--dtype", dtype] if dtype else []) + flags, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("checksum-*.json")
    res = json.loads(path.read_text())
    assert res["disk_tuning"] == {"disk_read_piece": 512 * 1024, "disk_crc": "crc32", **tuning}
    assert res["cost"]["disk_tuning"] == res["disk_tuning"]
    assert res["dtype"] == (dtype or "float32") and res["device"] == "cpu"
    assert res["block_bytes"] == res["cost"]["block_bytes"] == (2 << 20 if dtype else 4 << 20)
    assert res["crc32c_gb_s"]["portable"] > 0 and all(v > 0 for v in res["crc32c_gb_s"].values())
    for way in ("write", "read"):
        c = res["cost"][way]
        assert c["gb_s_checksum"] > 0 and c["gb_s_no_checksum"] > 0, c
        assert c["cost_q1"] <= c["cost_median"] <= c["cost_q3"], c
        assert res["bound"][way] > 0


@pytest.mark.skipif(pagedkv.cuda_available(), reason="checks the message on a machine without a usable GPU")
def test_bench_checksum_cuda_without_gpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pagedkv", "bench", "checksum", "--device", "cuda", "--rounds", "1",
                        "--disk-path", str(tmp_path), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--device cpu" in r.stderr, r.stderr


def test_checksum_cost_control_is_two_unchecked_caches(tmp_path, monkeypatch):
    """`bench checksum --control` (an A/A run): both caches without the checksum; without it, one of each."""
    from pagedkv.bench import disk_tier

    seen = []
    real = disk_tier._spilled_cache

    def spy(checksum, *args, **kw):
        seen.append(checksum)
        return real(checksum, *args, **kw)

    monkeypatch.setattr(disk_tier, "_spilled_cache", spy)
    out = disk_tier.checksum_cost(str(tmp_path), 48, 2, device="cpu", control=True)
    assert seen == [False, False] and out["control"] is True
    assert disk_tier.checksum_lines(out, {"write": 1.0, "read": 1.0})[0].startswith("A/A control")
    seen.clear()
    out = disk_tier.checksum_cost(str(tmp_path), 48, 2, device="cpu")
    assert seen == [True, False] and out["control"] is False
