"""The benchmarks that run on the CPU tier, at toy sizes: they finish, write their JSON where
--out says, and report figures that hold together (sizes as requested, counts that agree with
each other, rates finite and positive), never timings against a bound."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedkv.bench import offload


def run_bench(tmp_path, *args, ok=True):
    done = subprocess.run([sys.executable, "-m", "pagedkv", "bench", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    files = sorted(tmp_path.glob("*.json"))
    if not ok:
        return done, files
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(files) == 1, done.stdout
    res = json.loads(files[0].read_text())
    assert res["bench"] == args[0] and files[0].name.startswith(args[0] + "-")
    assert str(files[0]) in done.stdout  # the run says where its results went
    return res, done.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_summary(s, n):
    """A bench.common.summary() of n samples of seconds."""
    assert s["n"] == n
    assert positive(s["median"]) and positive(s["p10"]) and positive(s["p90"]), s
    assert s["p10"] <= s["median"] <= s["p90"], s


SERVE = dict(sessions=16, batch=2, context=256, rounds=4, turn=4, new=4, layers=2, kv_heads=2, head_dim=16)


def test_serve_on_cpu_pairs_every_tiered_run_with_an_unlimited_one(tmp_path):
    a = SERVE
    res, out = run_bench(tmp_path, "serve", "--device", "cpu", "--tiers", "2", "--repeats", "1",
                         *[x for k, v in a.items() for x in (f"--{k.replace('_', '-')}", str(v))])
    assert res["config"]["sessions"] == a["sessions"] and res["config"]["decode"] == "graph"
    rows = res["results"]["tiers"]
    assert [r["policy"] for r in rows] == ["lru", "window", "hybrid"]  # one row per policy and tier
    # The device tier is half of what the sessions can grow to: 256 + 4 rounds x 8 rows each.
    total = a["sessions"] * ((a["context"] + a["rounds"] * (a["turn"] + a["new"])) // 16 + 2) + 64
    block_bytes = a["layers"] * 2 * a["kv_heads"] * 16 * a["head_dim"] * 4  # float32 on the CPU
    for r in rows:
        assert r["device_blocks"] == total // 2 and r["device_fraction"] == 0.5
        assert r["captures"] == 0  # --decode graph runs eagerly off CUDA
        assert positive(r["tokens_per_s"]) and positive(r["unlimited_tokens_per_s"]) and positive(r["vs_unlimited"])
        # 16 sessions of 16+ blocks each through a 192-block device tier: blocks really moved
        assert 0 < r["blocks_fetched"] <= r["blocks_requested"], r
        assert r["hit_rate"] == pytest.approx(1 - r["blocks_fetched"] / r["blocks_requested"])
        assert 0.0 <= r["hit_rate"] < 1.0 and 0.0 < r["lookup_hit_rate"] <= 1.0, r
        assert r["bytes_from_host"] == r["blocks_fetched"] * block_bytes, r
        assert r["bytes_to_host"] > 0 and r["bytes_to_host"] % block_bytes == 0, r
        assert r["bytes_moved"] == r["bytes_to_host"] + r["bytes_from_host"]
        assert r["bytes_to_disk"] == r["bytes_from_disk"] == 0  # no disk tier
    assert out.count("1/2 of KV") == 3


def test_serve_refuses_a_batch_larger_than_the_sessions(tmp_path):
    done, files = run_bench(tmp_path, "serve", "--device", "cpu", "--sessions", "3", "--batch", "4", ok=False)
    assert done.returncode != 0 and "--batch (4)" in done.stderr
    assert not files


@pytest.mark.parametrize("positions", ["original", "cache"])
def test_longctx_on_cpu_keeps_windowed_memory_flat(tmp_path, positions):
    res, _ = run_bench(tmp_path, "longctx", "--device", "cpu", "--modes", "c,d", "--batches", "1",
                       "--contexts", "256,768", "--window", "64", "--chunk", "64", "--steps", "3",
                       "--host-gib", "1", "--positions", positions)
    assert res["config"]["positions"] == positions
    rows = {(r["mode"], r["context"]): r for r in res["rows"]}
    assert len(res["rows"]) == 4 and set(rows) == {(m, c) for m in "cd" for c in (256, 768)}
    for r in rows.values():
        assert "skipped" not in r, r
        assert positive(r["tokens_per_s"]) and positive(r["host_gib"]), r
        assert math.isnan(r["device_gib"])  # no driver to ask on the CPU: NaN, not a made-up figure
        assert r["staged_gb_s"] == 0.0  # the scope always fits the device tier here
    # (c): the window's blocks only, whatever the context; every block that left it was freed
    assert rows[("c", 256)]["device_blocks"] == rows[("c", 768)]["device_blocks"] <= (64 + 4) // 16 + 2
    assert rows[("c", 768)]["drops"] - rows[("c", 256)]["drops"] == (768 - 256) // 16
    assert rows[("c", 256)]["drops"] > 0 and rows[("c", 768)]["host_blocks"] == 0
    # (d): nothing dropped; the device tier (the scope plus two growth chunks) stays as sized and
    # what left the window went down to the host tier: every block of the context is kept
    assert rows[("d", 256)]["drops"] == rows[("d", 768)]["drops"] == 0
    assert rows[("d", 768)]["device_blocks"] <= (64 + 4 + 2 * 64) // 16 + 6
    assert rows[("d", 768)]["host_blocks"] > rows[("d", 256)]["host_blocks"]
    for ctx in (256, 768):
        r = rows[("d", ctx)]
        assert r["device_blocks"] + r["host_blocks"] >= ctx // 16, r


def test_host_bench_on_cpu_honours_seqs_and_steps(tmp_path):
    seqs, layers, steps, context = 4, 2, 4, 64
    res, out = run_bench(tmp_path, "host", "--seqs", str(seqs), "--layers", str(layers), "--steps", str(steps),
                         "--context", str(context))
    c = res["config"]
    assert (c["seqs"], c["layers"], c["steps"], c["device"]) == (seqs, layers, steps, "cpu")
    check_summary(res["append_per_step_s"], steps)
    check_summary(res["prepare_per_step_s"], steps)
    # 8 KV heads x 128 x K and V in bf16, one row per sequence and layer
    assert res["kv_bytes_written_per_step"] == seqs * layers * 2 * 8 * 128 * 2
    # rows 32..35 after a 32-token prompt: only row 32 starts a block of 16
    assert res["steps_with_new_blocks"] == 1
    pl = res["planned"]
    assert (pl["seqs"], pl["layers"], pl["steps"], pl["context"]) == (seqs, layers, steps, context)
    check_summary(pl["resident"], steps)
    check_summary(pl["host tier"], steps)
    st = res["staged"]
    assert (st["layers"], st["steps"], st["device_blocks"]) == (layers, steps, st["blocks"] // 4)
    check_summary(st["layer0_s"], steps)
    check_summary(st["other_layers_s"], steps * (layers - 1))
    # 3/4 of the context is on the host tier: every attend stages slices of it
    assert 0 < st["slices_staged"] <= layers * steps * st["blocks"]
    assert f"{seqs} sequences x {layers} layers" in out and f"{seqs} sequences x {context} tokens" in out


@pytest.mark.parametrize("arg", ["--seqs", "--steps"])
def test_host_bench_refuses_a_count_below_one(tmp_path, arg):
    done, files = run_bench(tmp_path, "host", arg, "0", ok=False)
    assert done.returncode != 0 and arg in done.stderr and "positive" in done.stderr
    assert not files


def test_offload_variants_are_constructor_config():
    v = offload.staging_variants("4,256,8; 2,128,4")
    assert v == {"kernel": {"staging": "kernel"},
                 "kernel:4,256,8": {"staging": "kernel", "gather_shape": (4, 256, 8)},
                 "kernel:2,128,4": {"staging": "kernel", "gather_shape": (2, 128, 4)},
                 "dma": {"staging": "dma"}}
    assert offload.staging_variants("") == {"kernel": {"staging": "kernel"}, "dma": {"staging": "dma"}}
    assert set(offload.ISSUE.values()) == {"batch", "overlap", "off"}
    for bad in ("4,256", "4,0,8", "a,b,c"):
        with pytest.raises(ValueError, match="unroll,threads,ctas_per_sm"):
            offload.staging_variants(bad)


def test_benches_set_no_environment_variables():
    bench_dir = Path(offload.__file__).parent
    sources = sorted(bench_dir.glob("*.py"))
    assert len(sources) >= 6, sources
    for path in sources:
        assert "environ" not in path.read_text(), f"{path.name} passes configuration through os.environ"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("name", ["kernel", "offload"])
def test_gpu_only_benches_say_so_without_a_gpu(tmp_path, name):
    done, files = run_bench(tmp_path, name, ok=False)
    assert done.returncode != 0 and f"bench {name} needs a CUDA GPU" in done.stderr
    assert not files
