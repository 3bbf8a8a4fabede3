"""`python -m pagedkv bench distributed` at toy sizes on the CPU (gloo): it finishes, writes its
JSON where --out says, and reports figures that hold together (one row per world, context and
batch; sizes as requested; bytes as the shapes say; times finite and positive), never timings
against a bound. A rank that dies makes the run fail, not hang."""
import json
import math
import subprocess
import sys

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "pagedkv", "bench", "distributed", "--device", "cpu",
                           *args, "--out", str(tmp_path)], capture_output=True, text=True, timeout=240)


def test_bench_distributed_rows(tmp_path):
    done = bench(tmp_path, "--world", "1,2", "--contexts", "100,64", "--batches", "2", "--reps", "1",
                 "--layers", "1", "--dtype", "float32")
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("distributed-*.json")
    assert str(path) in done.stdout
    rows = json.loads(path.read_text())["rows"]
    assert [(r["world"], r["context"], r["batch"]) for r in rows] == [(w, c, 2) for w in (1, 2) for c in (100, 64)]
    for r in rows:
        out_bytes, lse_bytes = 2 * 32 * 128 * 4, 2 * 32 * 4
        assert r["merge_bytes_per_layer"] == {"allreduce": r["world"] * lse_bytes + out_bytes,
                                              "allgather": r["world"] * (lse_bytes + out_bytes)}
        assert r["merge_bytes_per_step"] == r["merge_bytes_per_layer"]  # (one layer)
        times = [r["local_ms"], r["step_ms"], *r["attend_ms"].values(), *r["merge_us"].values(),
                 *r["collective_us"].values(), r["copy_ceiling_gb_s"], r["local_read_gb_s"]]
        assert all(positive(t) for t in times), r
        blocks = -(-r["context"] // 16)  # this rank's share of each sequence's blocks
        assert r["device_blocks_used"] == 2 * len(range(0, blocks, r["world"])), r


def test_bench_distributed_skips_what_does_not_fit(tmp_path):
    """A row larger than the memory free is skipped on every rank, with a note, not an error."""
    done = bench(tmp_path, "--world", "2", "--contexts", "64,1099511627776", "--batches", "1", "--reps", "1",
                 "--layers", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("distributed-*.json")
    small, huge = json.loads(path.read_text())["rows"]
    assert "skipped" not in small and positive(small["local_ms"])
    assert huge["context"] == 1099511627776 and "GiB of K/V per rank" in huge["skipped"], huge
    assert "skipped: needs" in done.stdout


def test_bench_distributed_refuses_a_bad_world(tmp_path):
    done = bench(tmp_path, "--world", "0", "--contexts", "64", "--batches", "1", "--reps", "1", "--layers", "1")
    assert done.returncode != 0 and not list(tmp_path.glob("*.json"))
    assert "--world must list positive world sizes, got '0'" in done.stderr, done.stderr
