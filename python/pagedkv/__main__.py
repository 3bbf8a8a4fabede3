"""Command line: `python -m pagedkv demo` and `python -m pagedkv bench <name>`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pagedkv")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="long-context decode loop on the default device")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    demo.add_argument("--batch", type=int, default=None)
    demo.add_argument("--prompt", type=int, default=None)
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--layers", type=int, default=None)

    bench = sub.add_parser("bench", help="benchmarks; results go to bench/results/*.json")
    bsub = bench.add_subparsers(dest="bench", required=True)
    host = bsub.add_parser("host", help="append + block-table preparation per decode step")
    host.add_argument("--seqs", type=int, default=256)
    host.add_argument("--layers", type=int, default=32)
    host.add_argument("--steps", type=int, default=64)
    host.add_argument("--device", default="cpu")

    kern = bsub.add_parser("kernel", help="paged decode attention vs SDPA, FlashInfer, copy ceiling")
    kern.add_argument("--quick", action="store_true", help="first two rows only")

    hfb = bsub.add_parser("hf", help="transformers generate(): default cache vs DynamicCache(offloading=True) vs pagedkv")
    hfb.add_argument("--layers", type=int, default=32, help="decoder layers (2 for a smoke run)")
    hfb.add_argument("--prompts", default="8192,32768,131072", help="comma-separated prompt lengths")
    hfb.add_argument("--new", type=int, default=64, help="tokens generated per run")
    hfb.add_argument("--block-size", type=int, default=16)
    hfb.add_argument("--modes", default=None, help="subset of default,offload,pagedkv,pagedkv_host")

    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run

        run(device=args.device, batch=args.batch, prompt=args.prompt, steps=args.steps,
            layers=args.layers)
    elif args.bench == "host":
        from .bench.host import main as host_main

        host_main(args)
    elif args.bench == "kernel":
        from .bench.kernel import main as kernel_main

        kernel_main(args)
    elif args.bench == "hf":
        from .hf.bench import main as hf_main

        hf_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
