"""``python -m benchmarks``: run the benchmarks, print one table per row, write the JSON.

    python -m benchmarks                       everything (about 8 minutes on 2 cores)
    python -m benchmarks --quick               small sizes, short runs (about 1 minute)
    (Wall time grows with other load on the machine: the load average is recorded.)
    python -m benchmarks --only attention-cpu,grading
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from .common import RESULTS, log, machine_info, print_table, write_json

BENCHMARKS = {  # name -> module; each module's run(args) returns a list of sections
    "attention-cpu": "attention_cpu",
    "attention-gpu": "attention_gpu",
    "training": "training",
    "ddp": "ddp",
    "grading": "grading",
    "book": "book",
    "flash-cpu": "flash",  # chapter 15: qkv.np tiled / naive attention, time and memory
    "flash-gpu": "flash_gpu",  # chapter 15: the Triton kernel / SDPA (needs CUDA)
    "bpe": "bpe",
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short runs")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help=f"run only these benchmarks: {', '.join(BENCHMARKS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for NumPy and PyTorch in attention-cpu and training "
                        "(default: 1 for attention-cpu, where NumPy's elementwise work has one "
                        "thread anyway; every core for training, as python -m qkv.train uses)")
    p.add_argument("--out", type=Path,
                   help="JSON file to write (default benchmarks/results/bench-<date>.json)")
    args = p.parse_args(argv)
    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.names = names
    args.attention_threads = args.threads or 1
    args.training_threads = args.threads or os.cpu_count() or 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    machine = machine_info({"attention-cpu": args.attention_threads,
                            "training": args.training_threads})
    print(f"# qkv benchmarks{' (--quick)' if args.quick else ''}: {machine['date']}")
    print(f"# {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'}; "
          f"numpy {machine['numpy']}, torch {machine['torch']}; threads: attention-cpu "
          f"{args.attention_threads}, training {args.training_threads}; "
          f"load average {machine['load_avg_1min']}")
    sections, failed = {}, []
    for name in args.names:
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f".{BENCHMARKS[name]}", __package__)
            results = module.run(args)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the rest
            traceback.print_exc()
            failed.append(name)
            results = [dict(name=name, title=name, columns=["status"],
                            rows=[dict(status=f"error: {type(e).__name__}: {e}")], notes=[])]
        for section in results:
            section["seconds"] = round(time.perf_counter() - t0, 1)
            print_table(section["title"], section["columns"], section["rows"])
            for note in section["notes"]:
                print(f"  {note}")
            sections[section.pop("name")] = section
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    out = args.out or RESULTS / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    run_args = dict(quick=args.quick, only=args.names, threads=args.threads,
                    total_s=round(time.perf_counter() - start, 1),
                    load_avg_1min_at_end=round(os.getloadavg()[0], 2))
    write_json(out, machine, run_args, sections)
    print(f"\n# {run_args['total_s']:.0f} s in all (load average at the end "
          f"{run_args['load_avg_1min_at_end']}); JSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
