"""Pieces every peer benchmark needs: machine and version facts, a step clock, --configs parsing, JSONL rows,
a child's own peak RSS,
and lock-step turns between two workers. Imported as `from _common import …` (the scripts run as
`python benchmarks/bench_x.py`, so this folder is on sys.path, in the parent and in its children)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# Found relative to the repository (the shared data folder beside it; peer venvs in .peers/, built by
# benchmarks/peers.sh), or where RLHFKIT_SHARED / RLHFKIT_PEERS point: no machine's absolute paths.
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHFKIT_SHARED", REPO.parent / "shared"))
PEERS = Path(os.environ.get("RLHFKIT_PEERS", REPO / ".peers"))


def shared_data(*parts: str) -> Path:
    """A path under SHARED/data (default ../shared/data beside the repository)."""
    return SHARED.joinpath("data", *parts)


def peer_python(name: str) -> Path:
    """The interpreter of a pinned peer venv built by benchmarks/peers.sh (e.g. 'trl-classic')."""
    return PEERS / name / "bin" / "python"


def machine() -> dict:
    """CPU model and the flags that decide CPU speed (AVX-512, AMX-BF16), memory, Python, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0) / 2**20
    return {
        "cpu": cpu,
        "vcpus": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mem_gib": round(mem, 1),
        "python": platform.python_version(),
        "load_avg_1_5_15_start": os.getloadavg(),
    }


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "rlhfkit")}


class StepClock:
    """Wall and CPU time and load at each step's begin/end; the timed window runs from the end of the
    last warm-up step to the end of the last step. Benchmarks subclass it to count their own units."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.t_begin: list[float] = []
        self.t_end: list[float] = []
        self.cpu_end: list[float] = []  # process CPU seconds (user+sys, all threads) at each step end
        self.load: list[float] = []  # 1-min load average at each step end (other work on the machine)

    def begin(self):
        self.t_begin.append(time.perf_counter())

    def end(self):
        self.t_end.append(time.perf_counter())
        t = os.times()
        self.cpu_end.append(t.user + t.system)
        self.load.append(os.getloadavg()[0])

    def window(self) -> tuple[dict, list[float]]:
        """(timing facts of the timed steps, each timed step's begin→end seconds)."""
        w, n = self.warmup, len(self.t_end) - self.warmup
        if n < 1:
            raise SystemExit(f"only {len(self.t_end)} steps recorded; need more than the {w} warm-up steps")
        if w < 1:
            raise SystemExit("need at least one warm-up step (the timed window starts at its end)")
        wall = self.t_end[-1] - self.t_end[w - 1]
        inner = [e - b for b, e in zip(self.t_begin[w:], self.t_end[w:])]
        return {
            "timed_steps": n,
            "warmup_steps": w,
            "wall_s": wall,
            "s_per_step": wall / n,
            "cpu_s": self.cpu_end[-1] - self.cpu_end[w - 1],
            "load_avg_1m": [round(min(self.load[w:]), 2), round(max(self.load[w:]), 2)],
            "step_s": [round(x, 3) for x in inner],
            "step_cpu_s": [round(b - a, 2) for a, b in zip(self.cpu_end[w - 1 :], self.cpu_end[w:])],
        }, inner


def chosen_configs(ap, text: str, known) -> list[str]:
    """The comma-separated --configs value as a list; an unknown name is an argparse error."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in known]
    if bad:
        ap.error(f"unknown configuration(s) {bad}; choose from {known}")
    return names


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak RSS (VmHWM) of one process in MB; NaN when unreadable (process gone, no /proc).
    Not ru_maxrss: a forked child's ru_maxrss starts at its parent's RSS at fork time."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children_hwm_gib(pid: int | None = None) -> float:
    """Summed peak RSS (VmHWM) of every live descendant of `pid` (default: this process), in GiB: the
    memory a colocated engine (vLLM's EngineCore and worker processes) holds beside the trainer."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    root, found, frontier = pid or os.getpid(), [], [pid or os.getpid()]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        found += kids
        frontier = kids
    mb = [vm_hwm_mb(c) for c in found if c != root]
    return sum(x for x in mb if x == x) / 1024


class Turns:
    """Strict alternation of two workers' optimizer steps through a counter file: rlhfkit runs step k
    while the counter is 2k, the peer while it is 2k+1. Only one framework computes at any moment, and
    both see the same background load step by step (a shared machine). Without a directory: no waiting."""

    def __init__(self, directory: str | None, name: str):
        self.path = Path(directory) / "turn" if directory else None
        self.parity = 0 if name == "rlhfkit" else 1

    def _read(self) -> int:
        try:
            return int(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def acquire(self, timeout: float = 3600.0) -> None:
        if self.path is None:
            return
        t0 = time.monotonic()
        while self._read() % 2 != self.parity:
            if time.monotonic() - t0 > timeout:
                raise SystemExit("lock-step partner did not finish its step (crashed?)")
            time.sleep(0.02)

    def release(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".turn.{os.getpid()}")
        tmp.write_text(str(self._read() + 1))
        os.replace(tmp, self.path)
