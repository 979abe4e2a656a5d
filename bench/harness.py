"""What every benchmark shares: machine info, a stopwatch, running one side in a fresh process.

Each side of a comparison (falflow, the hand-written baseline) runs in its own child process so
that its peak RSS and CPU are its own, and so neither shares a GIL with the emulator or the other
side. The child runs ``bench.child``, which calls one function and writes its result as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
JSON = dict[str, Any]
PROFILE_DIR_ENV = "BENCH_PROFILE_DIR"
"""Set (``python -m bench --profile DIR``) to cProfile every side's child process into DIR."""
PROFILE_ENV = "BENCH_PROFILE"
"""Set by ``run_child`` for one child: the file its cProfile goes to (``python -m pstats FILE``)."""


class BenchError(RuntimeError):
    """A benchmark could not run; the message says which part failed and what its log said."""


class Row(TypedDict):
    """One line of the summary table (raw numbers; the table formats them)."""

    what: str
    unit: str
    falflow: float | None
    baseline: float | None
    ratio: float | None
    target: str
    peak_rss_mib: float | None
    met: bool | None


def row(
    what: str,
    *,
    unit: str,
    falflow: float | None,
    baseline: float | None = None,
    ratio: float | None = None,
    target: str = "",
    peak_rss_mib: float | None = None,
    met: bool | None = None,
) -> Row:
    return Row(
        what=what,
        unit=unit,
        falflow=falflow,
        baseline=baseline,
        ratio=ratio,
        target=target,
        peak_rss_mib=peak_rss_mib,
        met=met,
    )


def peak_rss_row(
    what: str, falflow: JSON, baseline: JSON, *, target_mib: float | None, judged: bool
) -> Row:
    """Both sides' peak RSS; judged against ``target_mib`` (if any) when ``judged``."""
    rss = falflow["peak_rss_mib"]
    return row(
        what,
        unit="MiB",
        falflow=rss,
        baseline=baseline["peak_rss_mib"],
        ratio=ratio(rss, baseline["peak_rss_mib"]),
        target="" if target_mib is None else f"≤ {target_mib:,.0f} MiB",
        peak_rss_mib=rss,
        met=rss <= target_mib if judged and target_mib is not None else None,
    )


def machine_info() -> JSON:
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Stopwatch:
    """Wall time and this process's CPU time (all threads) of a block."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    watch = Stopwatch()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield watch
    finally:
        watch.wall = time.perf_counter() - wall0
        watch.cpu = time.process_time() - cpu0


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds another process has used so far (Linux ``/proc``), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_child(
    target: str,
    params: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
) -> JSON:
    """Call ``module:function(**params)`` in a fresh interpreter; its JSON result plus its peak RSS.

    The child's environment is this one's plus ``env``. Its output goes to a log whose tail is put
    into the error if it fails.
    """
    child_env = {**os.environ, **(env or {})}
    profile_dir = os.environ.get(PROFILE_DIR_ENV)
    if profile_dir:
        name = target.replace(":", "-").replace(".", "-")
        child_env[PROFILE_ENV] = str(
            Path(profile_dir) / f"{name}-{time.strftime('%H%M%S')}-{time.perf_counter_ns()}.prof"
        )
    with tempfile.TemporaryDirectory(prefix="falflow-bench-child-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "child.log"
        with log.open("wb") as log_file:
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "bench.child", target, json.dumps(params), str(out)],
                    cwd=REPO,
                    env=child_env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise BenchError(
                    f"{target} did not finish in {timeout:.0f} s; its log ends with:\n" + _tail(log)
                ) from None
        if proc.returncode != 0 or not out.exists():
            raise BenchError(
                f"{target} exited with {proc.returncode}; its log ends with:\n{_tail(log)}"
            )
        result: JSON = json.loads(out.read_text())
        return result


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
