"""What the benchmark scripts share: each case runs in a process of its own (its peak memory is its own, and no
library state leaks between the systems compared), started once the machine is idle, with the CPU time other
processes took while it ran; scripts that are not package modules loaded by path; the machine's description.

Benchmarks are scripts (`python benchmarks/sft.py`). Python puts a script's directory first on sys.path, so they
import this file as `harness`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
IDLE_CORES = 0.3
"""Before a case, wait (up to its max_wait s) until other processes use fewer cores than this."""
BUSY_CORES = 0.2
"""A run during which other processes used more cores than this on average was measured on a busy machine."""
RESULT_PREFIX = "RESULT "


def load_script(name: str, path: Path) -> ModuleType:
    """The Python file at `path` as module `name` (recipes/ and benchmarks/ are not packages), loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (every /proc/stat field but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float) -> float:
    """Wait (at most `max_wait` s) until other processes use less than IDLE_CORES cores; returns the seconds waited."""
    begin = time.perf_counter()
    while time.perf_counter() - begin < max_wait:
        before = busy_cpu_seconds()
        time.sleep(1.0)
        if busy_cpu_seconds() - before < IDLE_CORES:
            break
    return time.perf_counter() - begin


def run_process(command: list[str], threads: int, max_wait: float = 0.0) -> tuple[str, dict]:
    """Run `command` with `threads` OpenMP/MKL threads once the machine is idle; returns its stdout and stats: peak
    resident MB, and the cores other processes used on average while it ran (`foreign_cores`)."""
    waited = wait_for_idle(max_wait) if max_wait else 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy, tic = busy_cpu_seconds(), time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        wall, busy = time.perf_counter() - tic, busy_cpu_seconds() - busy
        returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({returncode}):\n{stderr[-3000:]}")
    foreign = max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall
    return stdout, {"peak_rss_mb": usage.ru_maxrss / 1024, "foreign_cores": foreign, "waited_for_idle_s": waited}


def add_worker_option(parser) -> None:
    """The hidden `--worker SPEC_JSON` option through which `in_subprocess` starts a case; args.worker is the spec."""
    parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)


def print_result(result: dict) -> None:
    """A worker's answer to `in_subprocess`, on its stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def in_subprocess(script: str | Path, spec: dict, threads: int, max_wait: float = 0.0) -> dict:
    """Run `python SCRIPT --worker SPEC_JSON` (`run_process`) and return the dict its worker printed with
    `print_result`, merged with the process's stats."""
    stdout, stats = run_process([sys.executable, str(script), "--worker", json.dumps(spec)], threads, max_wait)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"benchmark case {spec} printed no result")
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), **stats}


def write_report(path: str | Path, report: dict) -> None:
    """The benchmark's JSON record (benchmarks/results/NAME.json by default; run_all.py reads them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def package_version(name: str) -> str:
    return version(name)


def cpu_description(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and widest matrix instructions, e.g. "AMD EPYC (AVX2)": VMs of the same size differ
    up to 2.5x in speed by the CPU behind them, and bfloat16 is fast only with AMX."""
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")),
                     []))
    isa = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), "")
    return f"{name} ({isa})" if isa else name


def machine_description(threads: int) -> str:
    import torch

    return f"{cpu_description()}, {threads} threads, torch {torch.__version__}, Python {platform.python_version()}"
