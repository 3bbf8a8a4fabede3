"""Print the metrics that separate memory-bound decode kernels, one column per profiled kernel,
from `ncu -i REPORT --page raw --csv` output (bench/ncu_kernel.py). Usage: ncu_summary.py RAW.csv"""
import csv
import re
import sys

KEYS = [
    "gpu__time_duration.sum", "launch__grid_size", "launch__block_size", "launch__registers_per_thread",
    "launch__shared_mem_per_block_dynamic", "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem",
    "sm__warps_active.avg.pct_of_peak_sustained_active", "sm__cycles_elapsed.avg.per_second",
    "dram__cycles_elapsed.avg.per_second", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__t_sectors_srcunit_tex.sum", "lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_sectors_srcunit_ltcfabric.sum",
    "lts__t_sector_hit_rate.pct", "lts__t_sectors_srcunit_tex_lookup_miss.sum", "lts__d_sectors_fill_device.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "smsp__inst_executed.sum", "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_tensor.sum", "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1tex__throughput.avg.pct_of_peak_sustained_active",
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def main() -> None:
    rows = list(csv.reader(open(sys.argv[1], newline="")))
    head, data = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
    col = {h: i for i, h in enumerate(head)}
    name_i = col.get("Kernel Name", col.get("kernel_name"))
    names = [re.sub(r"\(.*", "", r[name_i])[-38:] for r in data]
    print(f"{'metric':>58} " + " ".join(f"{n[-24:]:>24}" for n in names))
    for k in KEYS:
        if k in col:
            print(f"{k:>58} " + " ".join(f"{r[col[k]][:24]:>24}" for r in data))
    for r, n in zip(data, names):
        stalls = []
        for h, i in col.items():
            m = STALL.match(h)
            if m:
                try:
                    stalls.append((float(r[i].replace(",", "")), m.group(1)))
                except ValueError:
                    pass
        top = ", ".join(f"{s}={v:.2f}" for v, s in sorted(stalls, reverse=True)[:6])
        print(f"stalls {n}: {top}")


if __name__ == "__main__":
    main()
