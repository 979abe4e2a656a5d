"""Outputs hostile by size: thousands of refused URLs, thousands of files, deep nesting.

Each is kept on fal (never deleted unverified), with a reason that is recorded and bounded, and
the work stays linear in the number of files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from falflow.emulator import RunningEmulator
from falflow.settings import BucketSettings, Settings
from falflow.tasks.jobs import JobOutcome, run_job
from falflow.tasks.models import Job, JobState
from falflow.tasks.runtime import open_runtime

SettingsFor = Callable[..., Settings]
ECHO = "emulator/echo"


def _run(settings: Settings, run_key: str, arguments: dict[str, Any]) -> tuple[JobOutcome, int]:
    """The job's outcome, and how many ledger records the run wrote."""
    job = Job(
        job_id=Job.make_id(run_key, "step"),
        endpoint=ECHO,
        arguments=arguments,
        policy=settings.retention.policy_for(ECHO),
    )

    async def main() -> tuple[JobOutcome, int]:
        async with open_runtime(settings, run_key) as rt:
            return await run_job(rt, job), rt.ledger.writes

    return anyio.run(main)


def test_thousands_of_refused_urls_make_a_bounded_error(
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    all_logs: list[str],
) -> None:
    urls = [f"https://evil.example/{n}/cat.png" for n in range(5000)]
    record = _run(settings_for(file_bucket), "refused", {"output": {"images": urls}})[0].record
    assert record.state is JobState.COMPLETED
    assert record.error_type == "archive_refused"
    error = record.error or ""
    assert "not a fal CDN host" in error
    assert error.endswith("; … and 4,997 more")  # the first three, then a count
    assert len(error) < 4000
    assert max(len(line) for line in all_logs) < 4000
    assert record.request_id in emulator.inventory(hashes=False)["payloads"]  # kept on fal


@pytest.mark.parametrize("count", [1000])
def test_many_files_are_archived_in_time_linear_in_their_number(
    count: int, emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    """The ledger record is written per batch of files, not rewritten per file (which made an
    output of 5,000 files quadratic)."""
    files = [{"size": 64} for _ in range(count)]
    outcome, writes = _run(
        settings_for(file_bucket), f"files-{count}", {"output": {}, "files": files}
    )
    record = outcome.record
    assert record.state is JobState.ARCHIVED, record.error
    assert len(record.objects) == count
    assert len({o.key for o in record.objects}) == count
    assert writes <= 5 + count // 25  # a few per batch of files, not one per file


def test_a_deep_output_is_kept_on_fal_with_the_reason_recorded(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    record = _run(settings_for(file_bucket), "deep", {"output": {"leaf": 1}, "nest": 900})[0].record
    assert record.state is JobState.COMPLETED
    assert record.error_type == "archive_refused"
    assert "nested deeper than" in (record.error or "")
    assert not record.verified
    assert record.request_id in emulator.inventory(hashes=False)["payloads"]
