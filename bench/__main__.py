"""``python -m bench``: run the benchmarks, print one table, write ``bench/results/latest.json``.

    python -m bench                       # everything (overhead N=100 and 1,000)
    python -m bench --full                # adds overhead N=10,000 and 100,000 (hours: see README)
    python -m bench --quick               # small sizes, proves the benchmarks work (< 2 min)
    python -m bench --only archive,cleanup
    python -m bench --profile /tmp/prof   # cProfile each side's process too

Every figure is a ratio against a baseline measured in the same run, plus peak memory; nothing
here asserts a time. A section that fails is reported and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import JSON, PROFILE_DIR_ENV, REPO, Row, machine_info, row
from bench.report import header_line, table

RESULTS = REPO / "bench" / "results" / "latest.json"


def _overhead(quick: bool, full: bool) -> JSON:
    from bench import overhead

    return overhead.run(quick=quick, full=full)


def _archive(quick: bool, full: bool) -> JSON:
    from bench import archive

    return archive.run(quick=quick)


def _cleanup(quick: bool, full: bool) -> JSON:
    from bench import cleanup

    return cleanup.run(quick=quick)


def _scale(quick: bool, full: bool) -> JSON:
    from bench import scale

    return scale.run(quick=quick, full=full)


def _capacity(quick: bool, full: bool) -> JSON:
    from bench import emulator_capacity

    return capacity_section(emulator_capacity.run(quick=quick))


def capacity_section(figures: JSON) -> JSON:
    """Rows for the emulator's own figures (no baseline: they bound what the other benchmarks can
    show). Each nested measurement with ``calls_per_second`` (one per kind of client) gets rows."""
    rows: list[Row] = []
    if isinstance(figures.get("submits_per_second"), int | float):
        rows.append(row("emulator: submits", unit="/s", falflow=figures["submits_per_second"]))
    for client, found in figures.items():
        if not isinstance(found, dict) or "calls_per_second" not in found:
            continue
        label = f"emulator: status calls, {client.removesuffix('_client').replace('_', ' ')} client"
        rows.append(row(label, unit="/s", falflow=found["calls_per_second"]))
        for side in ("emulator", "client"):
            cpu = found.get(f"{side}_cpu_ms_per_call")
            if isinstance(cpu, int | float):
                rows.append(row(f"{label}: {side} CPU per call", unit="ms", falflow=cpu))
        errors = found.get("transport_errors")
        if isinstance(errors, int):
            rows.append(
                row(f"{label}: errors", unit="", falflow=errors, target="0", met=errors == 0)
            )
    return {"rows": rows, "details": figures}


SECTIONS: dict[str, Callable[[bool, bool], JSON]] = {
    "overhead": _overhead,
    "archive": _archive,
    "cleanup": _cleanup,
    "scale": _scale,
    "capacity": _capacity,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, no timing judged")
    mode.add_argument("--full", action="store_true", help="also overhead at N=10,000 and 100,000")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="cProfile every side's process into DIR"
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_DIR_ENV] = str(args.profile.resolve())
    machine = machine_info()
    mode = "quick" if args.quick else "full" if args.full else "default"
    print(header_line(machine), f"; mode {mode}", flush=True)
    started = time.perf_counter()
    sections: dict[str, JSON] = {}
    errors: dict[str, str] = {}
    for name in args.only:
        print(f"== {name} ...", flush=True)
        section_start = time.perf_counter()
        try:
            sections[name] = SECTIONS[name](args.quick, args.full)
        except Exception as exc:  # one broken section must not hide the others' figures
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            sections[name] = {"errors": [errors[name]], "rows": []}
        if sections[name].get("errors"):
            errors[name] = "; ".join(str(e).split("\n")[0] for e in sections[name]["errors"])
        sections[name]["seconds"] = round(time.perf_counter() - section_start, 1)
        print(f"== {name} done in {sections[name]['seconds']} s", flush=True)
    rows: list[Row] = [r for s in sections.values() for r in s.get("rows", [])]
    result = {
        "machine": machine,
        "mode": mode,
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "finished_at": datetime.now(UTC).isoformat(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "sections": sections,
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(header_line(machine) + f"; mode {mode}; total {result['total_seconds']} s")
    print(table(rows, errors))
    print(f"\nJSON: {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
