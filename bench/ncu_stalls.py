"""Where a kernel's warps wait, per SASS instruction: reads `ncu -i REPORT --page source --csv
--print-source sass` (a report taken with `--section SourceCounters`) and prints the stall
reasons over all samples, then the instructions holding the most samples with their top reasons.
Usage: ncu_stalls.py SOURCE.csv [TOP=25]   (bench/kernel_check.sh writes one with NCU_SRC=1)"""
import collections
import csv
import sys


def main(path: str, top: int = 25) -> None:
    rows = list(csv.reader(open(path)))
    hdr = rows[1]
    data = [r for r in rows[2:] if len(r) == len(hdr)]
    ix = {h: i for i, h in enumerate(hdr)}
    samples = ix["Warp Stall Sampling (All Samples)"]
    reasons = [h for h in hdr if h.startswith("stall_") and "(Not Issued)" not in h]
    total = sum(int(r[samples] or 0) for r in data)
    if total == 0:
        raise SystemExit(f"{path}: no stall samples (was the report taken with --section SourceCounters?)")
    by_reason = collections.Counter()
    for r in data:
        for h in reasons:
            by_reason[h] += int(r[ix[h]] or 0)
    print(f"{rows[0][1] if len(rows[0]) > 1 else ''}\n{total} samples; by reason: "
          + ", ".join(f"{h[6:]} {100 * v / total:.1f}%" for h, v in by_reason.most_common(10)))
    base = int(data[0][ix["Address"]], 16)
    for r in sorted(data, key=lambda r: -int(r[samples] or 0))[:top]:
        n = int(r[samples] or 0)
        why = sorted(((int(r[ix[h]] or 0), h[6:]) for h in reasons), reverse=True)[:3]
        print(f"{int(r[ix['Address']], 16) - base:6x} {100 * n / total:5.1f}%  {r[ix['Source']].strip()[:58]:58s} "
              + " ".join(f"{name}:{100 * v / total:.1f}" for v, name in why if v))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
