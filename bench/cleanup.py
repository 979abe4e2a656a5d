"""Cleanup rate: falflow's real cleanup against the emulator's rate-limited Platform API.

The emulator answers the Platform API at ``R`` calls per second (a token bucket, 429 with
``Retry-After`` beyond it). Completed requests are made first (not timed); then
``falflow.tasks.cleanup.cleanup`` deletes their payloads with ``limits.delete_rate_per_second = R``, and
again with falflow told twice the real rate (it must then live off the 429s without failing).
The figure is the achieved rate as a fraction of ``R``, and failures; the emulator's inventory
confirms nothing was left.

    python -m bench --only cleanup [--quick]
"""

from __future__ import annotations

from bench.harness import JSON, Row, row, run_child
from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process

ENDPOINT = "fal-ai/flux/schnell"
RATE = 50.0
"""The Platform API's allowed rate in this benchmark (calls per second)."""
RATE_TARGET = 0.9


def _requests(emu: RunningEmulator, count: int) -> list[str]:
    made = run_child(
        "bench.baseline:make_requests",
        {
            "endpoint": ENDPOINT,
            "arguments": [{"prompt": f"cleanup bench {i}"} for i in range(count)],
            "concurrency": 64,
        },
        env=emu.client_env(),
        timeout=600,
    )
    return [r["request_id"] for r in made["requests"]]


def _left(emu: RunningEmulator, request_ids: list[str]) -> int:
    inventory = emu.inventory(hashes=False)
    wanted = set(request_ids)
    files = [f for f in inventory["files"] if f.get("request_id") in wanted]
    return sum(1 for rid in inventory["payloads"] if rid in wanted) + len(files)


def _measure(emu: RunningEmulator, request_ids: list[str], client_rate: float) -> JSON:
    result = run_child(
        "bench.falflow_side:delete_all",
        {"request_ids": request_ids, "endpoint": ENDPOINT},
        env={
            **emu.client_env(),
            "FALFLOW_LIMITS__DELETE_RATE_PER_SECOND": str(client_rate),
        },
        timeout=120 + 4 * len(request_ids) / RATE,
    )
    result["left_on_fal"] = _left(emu, request_ids)
    result["rate_per_second"] = result["deletions"] / result["wall_seconds"]
    result["fraction_of_allowed"] = result["rate_per_second"] / RATE
    result["client_rate_per_second"] = client_rate
    return result


def _rows(label: str, result: JSON, judged: bool) -> list[Row]:
    fraction = result["fraction_of_allowed"]
    clean = result["failed"] == 0 and result["left_on_fal"] == 0
    return [
        row(
            f"cleanup {label}: achieved rate / allowed",
            unit="/s",
            falflow=result["rate_per_second"],
            baseline=RATE,
            ratio=fraction,
            target=f"≥ {RATE_TARGET}×",
            peak_rss_mib=result["peak_rss_mib"],
            met=fraction >= RATE_TARGET if judged else None,
        ),
        row(
            f"cleanup {label}: failures, left on fal",
            unit="",
            falflow=result["failed"] + result["left_on_fal"],
            target="0",
            met=clean,
        ),
    ]


def run(quick: bool = False) -> JSON:
    """Deletion of 1,000 requests (quick: 50) at R = 50/s, falflow paced at R and at 2R."""
    count = 50 if quick else 1000
    rows: list[Row] = []
    details: dict[str, JSON] = {}
    with start_emulator_process(EmulatorConfig(latency_seconds=0.0)) as emu:
        made = _requests(emu, 2 * count)
        emu.configure(platform_rate_per_second=RATE)
        for index, (label, client_rate) in enumerate(
            ((f"{count:,} at R={RATE:.0f}/s", RATE), (f"{count:,}, falflow told 2R", 2 * RATE))
        ):
            result = _measure(emu, made[index * count : (index + 1) * count], client_rate)
            rows += _rows(label, result, judged=not quick)
            details[label] = result
    return {"rows": rows, "details": {"allowed_rate_per_second": RATE, "runs": details}}
