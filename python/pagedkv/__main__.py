"""Command line: `python -m pagedkv demo` and `python -m pagedkv bench <name>`."""
from __future__ import annotations

import argparse
import importlib
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cuda() -> bool:
    try:
        import torch

        from . import cuda_available

        return cuda_available() and torch.cuda.is_available()
    except Exception:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pagedkv")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="long-context decode loop on the default device")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    demo.add_argument("--batch", type=int, default=None)
    demo.add_argument("--prompt", type=int, default=None)
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--layers", type=int, default=None)
    demo.add_argument("--window", type=int, default=None, help="sliding window (0: full causal)")
    demo.add_argument("--sinks", type=int, default=4, help="attention sink tokens kept with the window")

    bench = sub.add_parser("bench", help="benchmarks; results go to bench/results/*.json (or --out)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="bench/results", help="folder the JSON (and plots) go to")

    def add_bench(name, **kw):  # every benchmark takes --out
        return bsub.add_parser(name, parents=[common], **kw)

    host = add_bench("host", help="append + block-table preparation per decode step")
    host.add_argument("--seqs", type=_positive, default=None,
                      help="sequences per step in every part (default: 256 for append, 8 for begin_step)")
    host.add_argument("--steps", type=_positive, default=None,
                      help="timed steps in every part (default: 64 append, 32 begin_step, 8 staged attend)")
    host.add_argument("--layers", type=_positive, default=32)
    host.add_argument("--context", type=_positive, default=8192, help="tokens per sequence of the begin_step part")
    host.add_argument("--device", default="cpu")

    kern = add_bench("kernel", help="paged decode attention vs SDPA, FlashInfer, copy ceiling")
    kern.add_argument("--quick", action="store_true", help="first two rows only")

    pre = add_bench("prefill", help="paged prefill (n new rows over L keys) vs FlashInfer, SDPA")
    pre.add_argument("--quick", action="store_true", help="first two rows only")
    pre.add_argument("--rows", default=None, help='rows to run instead of the table, "B,L,n;B,L,n"')

    off = add_bench("offload", help="swap bandwidth vs pinned-copy and disk ceilings; decode under swaps")
    off.add_argument("--blocks", type=int, default=1024, help="blocks per transfer (2 MiB each)")
    off.add_argument("--batch", type=int, default=8)
    off.add_argument("--context", type=int, default=8192)
    off.add_argument("--disk-path", default=None)
    off.add_argument("--gather", default="4,256,8",
                     help="staging-kernel shapes to compare, ';'-separated unroll,threads,ctas_per_sm")
    off.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                     help="cpu: only the disk tier (ceilings, swaps, checksum cost), no GPU needed")
    off.add_argument("--disk-blocks", type=_positive, default=128,
                     help="blocks per swap of the checksum-cost rounds")
    off.add_argument("--rounds", type=_positive, default=41,
                     help="swaps of a cache with the disk checksum and one without, taking turns; "
                          "median and quartiles reported")

    ck = add_bench("checksum", help="the disk tier's crc32c against the disk tier's throughput")
    ck.add_argument("--blocks", type=_positive, default=128,
                    help="blocks per swap through the disk tier (4 MiB each in float32, 2 MiB in bfloat16)")
    ck.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the caches live (cuda: blocks cross the pinned host tier on the copy engines)")
    ck.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="the caches' dtype (default: float32 on cpu, bfloat16 on cuda)")
    ck.add_argument("--gib", type=float, default=1.0, help="size of the file system ceiling runs")
    ck.add_argument("--rounds", type=_positive, default=41,
                    help="swaps of a cache with the checksum and one without, taking turns; median and quartiles")
    ck.add_argument("--disk-path", default=None, help="folder of the disk tier (default: the temp dir)")
    ck.add_argument("--control", action="store_true",
                    help="A/A run: neither cache checksums, so the reported cost is the method's own bias")
    ck.add_argument("--disk-read-piece", type=int, default=512 * 1024,
                    help="both caches' PagedKV(disk_read_piece=): bytes per read piece (0: whole blocks)")
    ck.add_argument("--disk-crc", default="crc32", choices=["fold", "crc32", "portable"],
                    help="both caches' PagedKV(disk_crc=): the CPU CRC path at most")

    srv = add_bench("serve", help="Zipf chat sessions over a device tier smaller than their KV, per policy")
    srv.add_argument("--device", default="cuda")
    srv.add_argument("--sessions", type=int, default=48)
    srv.add_argument("--context", type=int, default=4096)
    srv.add_argument("--tiers", default="2,1.6", help="total KV / device tier, one run per value")
    srv.add_argument("--repeats", type=int, default=2, help="paired (unlimited, tiered) runs; best of each")
    srv.add_argument("--batch", type=int, default=8)
    srv.add_argument("--turn", type=int, default=32)
    srv.add_argument("--new", type=int, default=64)
    srv.add_argument("--rounds", type=int, default=24)
    srv.add_argument("--zipf", type=float, default=1.1)
    srv.add_argument("--layers", type=int, default=32)
    srv.add_argument("--kv-heads", type=int, default=8)
    srv.add_argument("--head-dim", type=int, default=128)
    srv.add_argument("--decode", default="graph", choices=("graph", "planned", "plain"),
                     help="decode steps: begin_step + one CUDA graph replay (eager off CUDA), begin_step + "
                          "eager calls, or calls that each plan for themselves")

    lc = add_bench("longctx", help="memory and tokens/s against context: full, offloaded, windowed")
    lc.add_argument("--device", default="cuda")
    lc.add_argument("--contexts", default="8192,32768,131072,524288,1048576")
    lc.add_argument("--batches", default="1,8")
    lc.add_argument("--modes", default="a,b,c,d")
    lc.add_argument("--window", type=int, default=4096)
    lc.add_argument("--sinks", type=int, default=4)
    lc.add_argument("--steps", type=int, default=16, help="decode steps per context (the first untimed)")
    lc.add_argument("--chunk", type=int, default=4096, help="tokens appended per call while growing")
    lc.add_argument("--device-gib", type=float, default=16.0, help="device tier of mode (b)")
    lc.add_argument("--host-gib", type=float, default=96.0, help="host tier of modes (b) and (d)")
    lc.add_argument("--full-gib", type=float, default=100.0, help="device tier of mode (a)")
    lc.add_argument("--positions", default="original", choices=("original", "cache"),
                    help="modes (c) and (d): 'cache' scores the sinks at StreamingLLM positions")
    lc.add_argument("--disk-gib", type=float, default=0.0, help="disk tier of mode (d), after the host tier")
    lc.add_argument("--disk-path", default=None, help="folder of mode (d)'s disk tier (default: the temp dir)")
    lc.add_argument("--token-budget", type=int, default=1 << 20,
                    help="batch x context at most: writing 512 KiB per token, 1M tokens take minutes")

    dst = add_bench("distributed", help="decode attention striped over a torch.distributed group: per world size")
    dst.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cuda (NCCL, a GPU per rank) or cpu (gloo)")
    dst.add_argument("--world", default="1,2,4", help="comma-separated world sizes")
    dst.add_argument("--contexts", default=None, help="tokens per sequence (default 1M,4M on cuda, 16K,64K on cpu)")
    dst.add_argument("--batches", default="1,32" if _cuda() else "1,4")
    dst.add_argument("--layers", type=_positive, default=None,
                     help="layers in the cache, a step attends every one (default 4 on cuda, 2 on cpu)")
    dst.add_argument("--reps", type=_positive, default=None, help="timed repeats (default 20 on cuda, 5 on cpu)")
    dst.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))

    hfb = add_bench("hf", help="transformers generate(): default cache vs DynamicCache(offloading=True) vs pagedkv")
    hfb.add_argument("--layers", type=int, default=32, help="decoder layers (2 for a smoke run)")
    hfb.add_argument("--prompts", default="8192,32768,131072", help="comma-separated prompt lengths")
    hfb.add_argument("--new", type=int, default=64, help="tokens generated per run")
    hfb.add_argument("--block-size", type=int, default=16)
    hfb.add_argument("--prefill-chunk", type=int, default=4096, help="prefill_chunk_size of pagedkv_host")
    hfb.add_argument("--check-new", type=int, default=256,
                     help="greedy tokens compared with the default cache first (0: skip)")
    hfb.add_argument("--modes", default=None, help="subset of default,offload,pagedkv,pagedkv_host")

    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run

        run(device=args.device, batch=args.batch, prompt=args.prompt, steps=args.steps,
            layers=args.layers, window=args.window, sinks=args.sinks)
    else:  # each benchmark imports only what it needs (transformers, flashinfer) when it runs
        from .bench.common import set_results_dir

        set_results_dir(args.out)
        module = "pagedkv.hf.bench" if args.bench == "hf" else f"pagedkv.bench.{args.bench}"
        importlib.import_module(module).main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
