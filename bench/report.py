"""The one summary table ``python -m bench`` prints."""

from __future__ import annotations

from collections.abc import Iterable

from bench.harness import JSON, Row

HEADERS = ("what", "falflow", "baseline", "ratio", "target", "peak RSS", "met")


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1f} %"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def _cells(item: Row) -> tuple[str, ...]:
    met = {True: "yes", False: "NO", None: "-"}[item["met"]]
    return (
        item["what"],
        _value(item["falflow"], item["unit"]),
        _value(item["baseline"], item["unit"]),
        "-" if item["ratio"] is None else f"{item['ratio']:.2f}×",
        item["target"] or "-",
        "-" if item["peak_rss_mib"] is None else f"{item['peak_rss_mib']:.0f} MiB",
        met,
    )


def header_line(machine: JSON) -> str:
    return (
        f"falflow benchmarks on {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
        f"Python {machine['python']}, {machine['platform']}; "
        f"load average at start {machine['load_average_at_start']}"
    )


def table(rows: Iterable[Row], errors: dict[str, str]) -> str:
    lines = [_cells(r) for r in rows]
    lines += [(f"{name}: FAILED", "-", "-", "-", "-", "-", "NO") for name in errors]
    widths = [max(len(line[i]) for line in [HEADERS, *lines]) for i in range(len(HEADERS))]

    def fmt(cells: tuple[str, ...]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([fmt(HEADERS), rule, *(fmt(line) for line in lines)])
