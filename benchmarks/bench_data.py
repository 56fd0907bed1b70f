"""Benchmark of `rlhfkit data stackexchange`: throughput and peak memory at two file sizes.

Synthesises Posts.xml files of ~50 MB and ~200 MB by replicating a real dump with fresh ids (every copy
shifts Id / ParentId / AcceptedAnswerId by a multiple of the source's largest id, so each copy is a
distinct set of questions), in a temporary folder that is deleted afterwards. Each build runs in its own
subprocess. Peak RSS is the kernel's high-water mark VmHWM (/proc/<pid>/status) of that process and,
polled, of its Markdown worker processes. (getrusage's ru_maxrss is reported too but is not used: on
Linux a child's ru_maxrss starts at its parent's RSS at fork time, even after exec.) CPU time (self +
children) gives a throughput that does not depend on how busy the machine is.

    python benchmarks/bench_data.py                     # 50 MB and 200 MB, default settings
    python benchmarks/bench_data.py --sizes 20 --modes markdown,no-markdown --workers 1
    python benchmarks/bench_data.py --converter python     # markdownify even when markdownify-rs is installed

Prints one JSON document, then a one-line summary. Targets: >= 20 MB/s, peak RSS flat in file size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "stackexchange"

_ID_ATTRS = re.compile(rb'(\s(?:Id|ParentId|AcceptedAnswerId)=")(\d+)(")')


def default_source() -> Path:
    dumps = sorted(SHARED.glob("*/Posts.xml"), key=lambda p: p.stat().st_size, reverse=True)
    if not dumps:
        sys.exit(f"no real dump found under {SHARED}; pass --source path/to/Posts.xml")
    return dumps[0]


def synthesise(source: Path, target: Path, size_mb: float) -> dict:
    """Write `target` (≥ size_mb MB) from copies of source's <row> lines with shifted ids."""
    rows = [line.strip() for line in source.read_bytes().splitlines() if line.strip().startswith(b"<row ")]
    max_id = max(int(m.group(2)) for line in rows for m in _ID_ATTRS.finditer(line))
    stride = 10 ** len(str(max_id))
    want = int(size_mb * 1e6)
    copies = 0
    with open(target, "wb") as fh:
        fh.write(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n')
        written = 0
        while written < want:
            shift = copies * stride
            block = b"".join(
                b"  "
                + _ID_ATTRS.sub(lambda m: m.group(1) + str(int(m.group(2)) + shift).encode() + m.group(3), line)
                + b"\r\n"
                for line in rows
            )
            fh.write(block)
            written += len(block)
            copies += 1
        fh.write(b"</posts>")
    return {"copies": copies, "rows": copies * len(rows), "bytes": target.stat().st_size}


CHILD = r"""
import json, os, resource, sys, threading, time

def hwm_kb(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0

workers, done = {}, threading.Event()
def watch():  # peak RSS of the Markdown worker processes (VmHWM is a high-water mark: polling is enough)
    me = os.getpid()
    while not done.wait(0.2):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        if int(fh.read().rsplit(")", 1)[1].split()[1]) != me:
                            continue
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:  # only exec'd multiprocessing workers:
                        if b"spawn_main" not in fh.read():  # a fork not yet exec'd shows our own pages
                            continue
                    workers[pid] = max(workers.get(pid, 0), hwm_kb(pid))
                except (OSError, ValueError, IndexError):
                    pass
threading.Thread(target=watch, daemon=True).start()
t0 = time.time()
from rlhfkit.data import build_stackexchange
t1 = time.time()
stats = build_stackexchange([sys.argv[1]], sys.argv[2], **json.loads(sys.argv[3]))
t2 = time.time()
done.set()
me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "build_s": t2 - t1, "import_s": t1 - t0,
    "cpu_s": me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime,
    "peak_rss_mb": hwm_kb() / 1024,  # VmHWM of this process
    "ru_maxrss_mb": me.ru_maxrss / 1024,  # includes the parent's image at fork time (Linux), for reference
    "peak_rss_workers_mb": max(workers.values(), default=0) / 1024,
    "n_workers_seen": len(workers),
    "rows": stats["rows"], "questions": stats["questions"], "answers": stats["answers"],
    "parse_s": sum(i["parse_seconds"] for i in stats["inputs"]),
    "markdown_converter": stats["inputs"][0].get("markdown_converter"),
}))
"""


def run_child(xml: Path, out: Path, options: dict, converter: str) -> dict:
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(xml), str(out), json.dumps(options)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "RLHFKIT_MARKDOWN": converter},
    )
    if proc.returncode != 0:
        sys.exit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.time() - t
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source", type=Path, default=None, help="real Posts.xml to replicate (default: largest shared dump)"
    )
    ap.add_argument("--sizes", default="50,200", help="file sizes in MB, comma-separated")
    ap.add_argument("--modes", default="markdown", help="markdown (full stage) and/or no-markdown (parse + pairs only)")
    ap.add_argument("--workers", type=int, default=0, help="DataConfig.workers (0: automatic)")
    ap.add_argument("--format", default="arrow", choices=["arrow", "parquet"])
    ap.add_argument(
        "--converter",
        default=os.environ.get("RLHFKIT_MARKDOWN", "auto"),
        choices=["auto", "python", "rust"],
        help="HTML → Markdown: markdownify (python) or markdownify-rs (rust); sets RLHFKIT_MARKDOWN",
    )
    ap.add_argument("--tmp", default=None, help="folder for the synthetic files (default: system temp)")
    args = ap.parse_args(argv)

    source = args.source or default_source()
    sizes = [float(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        for size in sizes:
            xml = tmp / f"Posts-{size:g}MB.xml"
            synth = synthesise(source, xml, size)
            mb = synth["bytes"] / 1e6
            for mode in args.modes.split(","):
                options = {
                    "overwrite": True,
                    "workers": args.workers,
                    "format": args.format,
                    "markdown": mode == "markdown",
                }
                res = run_child(xml, tmp / f"out-{size:g}-{mode}", options, args.converter)
                res.update(
                    mode=mode,
                    size_mb=round(mb, 1),
                    copies=synth["copies"],
                    mb_per_s=round(mb / res["build_s"], 2),
                    parse_mb_per_s=round(mb / res["parse_s"], 1),
                    mb_per_cpu_s=round(mb / res["cpu_s"], 2),
                )
                results.append(res)
                conv = res["markdown_converter"] or "-"
                print(
                    f"  {mode:<11} {mb:7.1f} MB [{conv}]: {res['mb_per_s']:6.2f} MB/s wall, "
                    f"{res['mb_per_cpu_s']:5.2f} MB per "
                    f"CPU-second (parse pass {res['parse_mb_per_s']} MB/s), peak RSS {res['peak_rss_mb']:.0f} MiB "
                    f"(workers {res['peak_rss_workers_mb']:.0f} MiB each at most)",
                    file=sys.stderr,
                    flush=True,
                )
            xml.unlink()
    report = {
        "source": str(source),
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
        "format": args.format,
        "converter": args.converter,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    parts = []
    for mode in args.modes.split(","):
        rs = [r for r in results if r["mode"] == mode]
        if not rs:
            continue
        rss = ", ".join(f"{r['size_mb']:.0f}MB→{r['peak_rss_mb']:.0f}MiB" for r in rs)
        speed = ", ".join(f"{r['mb_per_s']:.1f}" for r in rs)
        cpu = ", ".join(f"{r['mb_per_cpu_s']:.1f}" for r in rs)
        growth = rs[-1]["peak_rss_mb"] - rs[0]["peak_rss_mb"]
        wgrowth = rs[-1]["peak_rss_workers_mb"] - rs[0]["peak_rss_workers_mb"]
        parts.append(
            f"{mode}: {speed} MB/s wall ({cpu} MB/CPU-s; target 20 MB/s); peak RSS {rss} "
            f"(growth {growth:+.0f} MiB, workers {wgrowth:+.0f} MiB)"
        )
    print(f"bench_data [RLHFKIT_MARKDOWN={args.converter}]: " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
