"""The benchmarks that run on the CPU tier, at toy sizes: they finish, write their JSON, and
report sane figures (shapes and ranges, never timings)."""
import json
import os
import subprocess
import sys

import pytest


def run_bench(tmp_path, *args):
    env = dict(os.environ, PAGEDKV_BENCH_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pagedkv", "bench", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1, done.stdout
    return json.loads(files[0].read_text()), done.stdout


def test_serve_on_cpu_pairs_every_tiered_run_with_an_unlimited_one(tmp_path):
    res, out = run_bench(tmp_path, "serve", "--device", "cpu", "--sessions", "6", "--batch", "2", "--context", "64",
                         "--rounds", "3", "--turn", "4", "--new", "4", "--layers", "2", "--kv-heads", "2",
                         "--head-dim", "16", "--tiers", "2", "--repeats", "1")
    rows = res["results"]["tiers"]
    assert [r["policy"] for r in rows] == ["lru", "window", "hybrid"]
    for r in rows:
        assert 0.0 <= r["hit_rate"] <= 1.0
        assert r["tokens_per_s"] > 0 and r["unlimited_tokens_per_s"] > 0
        assert r["vs_unlimited"] == pytest.approx(r["tokens_per_s"] / r["unlimited_tokens_per_s"])
    assert "1/2 of KV" in out


def test_serve_refuses_a_batch_larger_than_the_sessions(tmp_path):
    env = dict(os.environ, PAGEDKV_BENCH_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pagedkv", "bench", "serve", "--device", "cpu", "--sessions", "3",
                           "--batch", "4"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--batch (4)" in done.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("positions", ["original", "cache"])
def test_longctx_on_cpu_keeps_windowed_memory_flat(tmp_path, positions):
    res, _ = run_bench(tmp_path, "longctx", "--device", "cpu", "--modes", "c,d", "--batches", "1",
                       "--contexts", "256,768", "--window", "64", "--chunk", "64", "--steps", "3",
                       "--host-gib", "1", "--positions", positions)
    rows = {(r["mode"], r["context"]): r for r in res["rows"]}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    # (c): the window's blocks only, whatever the context; the rest returned to the pool
    assert rows[("c", 256)]["device_blocks"] == rows[("c", 768)]["device_blocks"] <= (64 + 4) // 16 + 2
    assert rows[("c", 768)]["drops"] > rows[("c", 256)]["drops"] > 0
    # (d): nothing dropped; the device tier (the scope plus two growth chunks) stays as sized and
    # what left the window went down to the host tier
    assert rows[("d", 768)]["drops"] == 0
    assert rows[("d", 768)]["device_blocks"] <= (64 + 4 + 2 * 64) // 16 + 6
    assert rows[("d", 768)]["host_blocks"] > rows[("d", 256)]["host_blocks"]


def test_host_bench_on_cpu(tmp_path):
    res, _ = run_bench(tmp_path, "host", "--seqs", "4", "--layers", "2", "--steps", "4")
    assert res["bench"] == "host"
    assert res["planned"]["layers"] == 2 and res["planned"]["host tier"]["n"] == 32
