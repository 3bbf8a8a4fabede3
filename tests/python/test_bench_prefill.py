"""`bench prefill` off the GPU: its pure helpers (FLOP count, --rows, oracle rows, table line), its
float64 oracle and SDPA variants against pagedkv's CPU reference on a toy row, and a clear refusal
to run without CUDA. (The timed comparison itself needs a GPU: bench/device_run.sh prefill.)"""
import argparse
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch


def _load():
    try:
        return importlib.import_module("pagedkv.bench.prefill")
    except ModuleNotFoundError:  # an installed pagedkv older than this checkout: load the file itself
        path = pathlib.Path(__file__).resolve().parents[2] / "python" / "pagedkv" / "bench" / "prefill.py"
        spec = importlib.util.spec_from_file_location("pagedkv.bench.prefill", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


pf = _load()


def test_flops_of_small_rows_by_hand():
    # L=5, n=3: the new rows are tokens 2, 3, 4 and see 3, 4, 5 keys
    assert pf.keys_seen(5, 3) == 3 + 4 + 5
    assert pf.flops(2, 5, 3) == 4 * 32 * 128 * 2 * 12 == 393216
    assert pf.keys_seen(8, 8) == 36  # a fresh prompt: L(L+1)/2
    assert pf.keys_seen(4096, 1) == 4096  # decode: every key once
    assert pf.flops(1, 10, 1) == 4 * 32 * 128 * 10


def test_tflops_agrees_with_the_issue_table():
    # issue 15: FlashInfer fa3 took 16296 us on 1 x 131072, n 4096, "~530 TFLOP/s"
    assert 530 < pf.tflops(1, 131072, 4096, 16296.0) < 533
    assert pf.tflops(1, 10, 1, 1.0) == pytest.approx(4 * 32 * 128 * 10 / 1e-6 / 1e12)


def test_rows_default_quick_and_override():
    assert pf.parse_rows(None) == pf.ROWS and len(pf.ROWS) == 8
    assert (1, 131072, 16384) in pf.ROWS and (8, 4096, 4096) in pf.ROWS
    assert pf.parse_rows(None, quick=True) == [(1, 8192, 2048), (1, 32768, 4096)]
    assert pf.parse_rows("2,64,8; 1,32,32;") == [(2, 64, 8), (1, 32, 32)]
    assert pf.parse_rows("4,16,1", quick=True) == [(4, 16, 1)]  # --rows wins over --quick
    for bad in ("1,8", "1,8,x", "0,8,4", "1,8,9", "1,8,0", ";"):
        with pytest.raises(ValueError, match="--rows"):
            pf.parse_rows(bad)


def test_oracle_picks_all_rows_or_a_sorted_sample():
    assert pf.oracle_picks(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    picks = pf.oracle_picks(64, 4096)
    assert len(picks) == len(set(picks)) == pf.ORACLE_ROWS and picks == sorted(picks)
    assert all(0 <= b < 64 and 0 <= i < 4096 for b, i in picks)
    assert picks == pf.oracle_picks(64, 4096)  # the same rows every run


def test_table_line_and_geomean_with_absent_peers():
    row = {"batch": 1, "context": 8192, "new": 2048, "pagedkv_us": 500.0, "pagedkv_tflops": 480.0,
           "pagedkv_err": 1.7e-3, "flashinfer_fa2_us": 700.0, "ratio_vs_best_flashinfer_paged": 1.4,
           "flashinfer_fa3_skipped": "ImportError: x"}
    line = pf.table_line(row)
    assert "500.0" in line and "700.0" in line and "1.40" in line and " - " in line
    assert len(line.split()) == len(pf.table_line({**row, **{p + "_us": 1.0 for p in pf.PEERS}}).split())
    assert pf.geomean([2.0, 0.5, float("nan")]) == pytest.approx(1.0)
    assert pf.geomean([]) != pf.geomean([])  # NaN


def test_toy_row_oracle_and_sdpa_agree_with_pagedkv_cpu():
    """The bench's filling, oracle and bottom-right-causal SDPA on the CPU tier: all three agree."""
    from pagedkv import PagedKV

    gen = torch.Generator().manual_seed(0)
    batch, ctx, new = 2, 45, 7  # partial last blocks; new rows span a block boundary
    k_all = torch.randn(batch, ctx, pf.HK, pf.D, generator=gen).bfloat16()
    v_all = torch.randn(batch, ctx, pf.HK, pf.D, generator=gen).bfloat16()
    q = torch.randn(batch * new, pf.HQ, pf.D, generator=gen).bfloat16()
    kv, seqs = pf._filled_cache(PagedKV, k_all, v_all, new)
    assert [kv.seq_len(s) for s in seqs] == [ctx] * batch
    for b, s in enumerate(seqs):
        k, v = kv.gather(s)
        assert torch.equal(k, k_all[b]) and torch.equal(v, v_all[b])
    picks = pf.oracle_picks(batch, new)
    idx = torch.tensor([b * new + i for b, i in picks])
    ref = pf._oracle(q, k_all, v_all, picks, new)
    ours = kv.attend(seqs, 0, q, lengths=[new] * batch)
    assert float((ours[idx].double() - ref).norm() / ref.norm()) < 1e-2
    for name, fn in pf._sdpa_variants(q[:new], k_all[0], v_all[0]).items():
        out = fn()
        assert out.shape == (new, pf.HQ, pf.D), name
        assert float((out.double() - ref[:new]).norm() / ref[:new].norm()) < 1e-2, name
    # the oracle is causal and bottom-right aligned: the last new row sees every key
    full = torch.softmax(q[new - 1].double().view(pf.HK, -1, pf.D) @ k_all[0].double().transpose(0, 1)
                         .transpose(-1, -2) / pf.D ** 0.5, -1) @ v_all[0].double().transpose(0, 1)
    assert torch.allclose(ref[new - 1], full.reshape(pf.HQ, pf.D))


def _gpu_usable() -> bool:
    import pagedkv

    return torch.cuda.is_available() and pagedkv.cuda_available()


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is here: the bench would run")
def test_bench_refuses_clearly_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        pf.main(argparse.Namespace(quick=True, rows=None))
    with pytest.raises(SystemExit, match="--rows"):  # bad rows are named before anything else
        pf.main(argparse.Namespace(quick=False, rows="1,8,9"))
    if importlib.util.find_spec("pagedkv.bench.prefill") is None:
        pytest.skip("the installed pagedkv predates bench prefill (the command line is not there yet)")
    env = dict(os.environ, PAGEDKV_BENCH_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pagedkv", "bench", "prefill", "--quick"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "bench prefill needs a CUDA GPU" in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.json"))
