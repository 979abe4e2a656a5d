"""The janitor's phases as plain functions, against the emulator and a local bucket.

Each test leaves records in the states a crashed run leaves them (using the pipeline's own steps,
stopped half-way), runs survey → resolve → purge, and checks the bucket, the ledger and what the
emulator still holds.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from falflow.emulator import RunningEmulator
from falflow.settings import BucketSettings, Settings
from falflow.tasks.archive import save_input, save_output
from falflow.tasks.events import RunCounts
from falflow.tasks.janitor import (
    Finding,
    JanitorOptions,
    JanitorReport,
    damage_findings,
    purge,
    resolve,
    spare_live,
    survey,
)
from falflow.tasks.janitor import build_report as _report
from falflow.tasks.jobs import run_job
from falflow.tasks.liveness import Lease, LiveRuns
from falflow.tasks.lost import listing_windows
from falflow.tasks.models import Job, JobRecord, JobState, utcnow
from falflow.tasks.runtime import Runtime, open_runtime
from falflow.tasks.submit import submit
from falflow.tasks.verify import verify
from falflow.tasks.wait import wait

NOW_GRACE = JanitorOptions(grace_minutes=0)


@pytest.fixture
def settings(emulator: RunningEmulator, tmp_path: Path) -> Iterator[Settings]:
    """Settings for the emulator and a fresh local bucket. The janitor lists every request fal
    holds, so the emulator starts empty (other tests' requests would be orphans here)."""
    emulator.reset()
    yield Settings(
        fal_key=emulator.api_key,
        fal_admin_key=emulator.admin_key,
        fal=emulator.fal_settings(),
        bucket=BucketSettings(url=(tmp_path / "bucket").as_uri()),
    )
    emulator.reset()


def job(
    settings: Settings, run_key: str, prompt: str, endpoint: str = "fal-ai/flux/schnell"
) -> Job:
    return Job(
        job_id=Job.make_id(run_key, "image", prompt),
        endpoint=endpoint,
        arguments={"prompt": prompt},
        policy=settings.retention.policy_for(endpoint),
    )


def with_runtime(
    settings: Settings, run_key: str, body: Callable[[Runtime], Awaitable[Any]]
) -> Any:
    async def main() -> Any:
        async with open_runtime(settings, run_key) as rt:
            return await body(rt)

    return anyio.run(main)


def janitor(
    settings: Settings, options: JanitorOptions = NOW_GRACE, live: LiveRuns | None = None
) -> JanitorReport:
    """The janitor flow's phases, in its order, without Prefect."""

    async def body(rt: Runtime) -> JanitorReport:
        found = await survey(rt, options, live or LiveRuns())
        verified, resolved = await resolve(rt, found, options)
        touched, purged = verified, []
        if options.delete:
            touched, purged = await purge(rt, verified)
        damaged: list[Finding] = []
        if options.verify_sample:
            damaged = damage_findings(await verify(rt.bucket, sample=options.verify_sample))
        return _report(rt.run_key, found, [*resolved, *purged, *damaged], touched)

    return with_runtime(settings, f"janitor-{uuid.uuid4().hex[:8]}", body)


async def crash_after_submit(rt: Runtime, j: Job) -> JobRecord:
    """The run died right after fal accepted the submit (request id recorded)."""
    record = JobRecord(job_id=j.job_id, run_key=rt.run_key, endpoint=j.endpoint, policy=j.policy)
    record, _ = await submit(rt, j, await save_input(rt, j, record))
    return record


async def crash_before_archive(rt: Runtime, j: Job) -> JobRecord:
    """The run died after fal's output was saved, before any file was archived."""
    record = JobRecord(job_id=j.job_id, run_key=rt.run_key, endpoint=j.endpoint, policy=j.policy)
    record, urls = await submit(rt, j, await save_input(rt, j, record))
    output = await wait(rt, j, record, urls)
    return await save_output(rt, record, output)


async def crash_before_request_id(rt: Runtime, j: Job) -> JobRecord:
    """The run died between its submit POST reaching fal and the request id reaching the ledger
    (the record says a submit was attempted, fal has the request, nobody knows its id)."""
    record = JobRecord(job_id=j.job_id, run_key=rt.run_key, endpoint=j.endpoint, policy=j.policy)
    record = await save_input(rt, j, record)
    record = await rt.ledger.put(record.model_copy(update={"submit_attempted_at": utcnow()}))
    await rt.fal.submit(j.endpoint, j.arguments, headers=j.policy.headers())
    return record


def ledger(settings: Settings) -> dict[str, JobRecord]:
    async def body(rt: Runtime) -> dict[str, JobRecord]:
        return {r.job_id: r async for r in rt.ledger.list()}

    return with_runtime(settings, "reader", body)


def held_on_fal(emulator: RunningEmulator) -> set[str]:
    inventory = emulator.inventory(hashes=False)
    return set(inventory["payloads"]) | {
        f["request_id"] for f in inventory["files"] if f.get("request_id")
    }


def assert_archived(settings: Settings, emulator: RunningEmulator, record: JobRecord) -> None:
    """Every output file of ``record`` is in the bucket with the sha256 fal's copy had."""
    assert record.objects, record
    root = Path(settings.bucket.url.removeprefix("file://"))
    for obj in record.objects:
        data = (root / obj.key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == obj.sha256
        assert len(data) == obj.size


def test_crashed_runs_are_archived_then_deleted_and_nothing_is_left_on_fal(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "crashed-1"
    jobs = [job(settings, key, p) for p in ("a fox", "a boat", "a lighthouse", "a moon")]

    async def crash(rt: Runtime) -> list[JobRecord]:
        archived = (await run_job(rt, jobs[0])).record  # archived, cleanup never ran
        completed = await crash_before_archive(rt, jobs[1])
        submitted = await crash_after_submit(rt, jobs[2])
        lost = await crash_before_request_id(rt, jobs[3])
        return [archived, completed, submitted, lost]

    before = with_runtime(settings, key, crash)
    assert [r.state for r in before] == [
        JobState.ARCHIVED,
        JobState.COMPLETED,
        JobState.SUBMITTED,
        JobState.PENDING,
    ]
    on_fal = held_on_fal(emulator)
    assert len(on_fal) == 4
    emulator.advance_clock(3)  # past fal's listing lag: the lost submit's request is listed

    report = janitor(settings)

    after = ledger(settings)
    assert {r.state for r in after.values()} == {JobState.DELETED}
    for record in after.values():
        assert_archived(settings, emulator, record)
    assert held_on_fal(emulator) == set()
    # the lost submit got the request fal held for it, and nothing was submitted again
    assert {r.request_id for r in after.values()} == on_fal
    assert len(emulator.requests()) == 4
    actions = {f.job_id: f.action for f in report.findings}
    assert actions == {j.job_id: "deleted" for j in jobs}
    assert report.counts.deleted == 4
    assert report.problems() == []
    # a second janitor run finds nothing to do
    assert janitor(settings).findings == []


def test_a_crashed_runs_request_fal_failed_is_archived_and_deleted_in_one_janitor_run(
    settings: Settings, emulator: RunningEmulator
) -> None:
    """The run died while fal ran the request, and fal failed it: the janitor archives fal's
    error and deletes the request like any other (it was left on fal until a second run)."""
    key = "crashed-failing"
    failing = Job(
        job_id=Job.make_id(key, "echo"),
        endpoint="emulator/echo",
        arguments={"fail": {"status": 500, "body": {"detail": "Internal Server Error"}}},
        policy=settings.retention.policy_for("emulator/echo"),
    )
    submitted = with_runtime(settings, key, lambda rt: crash_after_submit(rt, failing))
    assert submitted.request_id in held_on_fal(emulator)

    report = janitor(settings)

    [after] = [r for r in ledger(settings).values() if r.run_key == key]
    assert after.state is JobState.FAILED
    assert after.error_key is not None  # fal's error is in the bucket
    assert after.deletion is not None
    assert after.deletion.confirmed_at is not None
    assert submitted.request_id not in held_on_fal(emulator)
    assert [f.action for f in report.findings if f.run_key == key] == ["deleted"]
    assert report.problems() == []


def test_live_runs_and_recent_records_are_left_alone(
    settings: Settings, emulator: RunningEmulator
) -> None:
    busy, recent = "busy-run", "recent-run"
    with_runtime(settings, busy, lambda rt: run_job(rt, job(settings, busy, "a fox")))
    with_runtime(
        settings, recent, lambda rt: crash_after_submit(rt, job(settings, recent, "a cat"))
    )
    flow_run_id = str(uuid.uuid4())
    default_key = f"sample-{flow_run_id}"
    with_runtime(settings, default_key, lambda rt: run_job(rt, job(settings, default_key, "x")))
    live = LiveRuns(run_keys=frozenset({busy}), flow_run_ids=frozenset({flow_run_id}))

    report = janitor(settings, JanitorOptions(grace_minutes=15), live)

    states = {r.run_key: r.state for r in ledger(settings).values()}
    assert states == {
        busy: JobState.ARCHIVED,
        recent: JobState.SUBMITTED,
        default_key: JobState.ARCHIVED,
    }
    assert len(held_on_fal(emulator)) == 3
    assert {f.run_key: f.action for f in report.findings} == {
        busy: "live",
        recent: "live",
        default_key: "live",
    }
    assert sorted(report.survey.live_run_keys) == sorted([busy, default_key])

    # once the runs are over and the grace period has passed, the same records are finished
    janitor(settings, NOW_GRACE, LiveRuns())
    assert {r.state for r in ledger(settings).values()} == {JobState.DELETED}
    assert held_on_fal(emulator) == set()


def test_a_run_reported_live_but_silent_for_too_long_is_presumed_dead(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "machine-lost"
    with_runtime(settings, key, lambda rt: run_job(rt, job(settings, key, "a fox")))
    live = LiveRuns(run_keys=frozenset({key}), stale_after_hours=1)
    stale = JanitorOptions(grace_minutes=0, stale_after_hours=1)

    async def body(rt: Runtime) -> None:
        found = await survey(rt, stale, live, now=utcnow() + timedelta(hours=2))
        assert [r.job_id for r in found.to_delete] == [job(settings, key, "a fox").job_id]
        found = await survey(rt, stale, live)
        assert found.to_delete == []

    with_runtime(settings, "janitor-x", body)


def test_requests_on_endpoints_no_ledger_uses_are_found_by_search_and_reported(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "known-endpoint"
    with_runtime(settings, key, lambda rt: run_job(rt, job(settings, key, "a fox")))

    async def elsewhere(rt: Runtime) -> str:  # another tool, on an endpoint falflow never used
        handle = await rt.fal.submit("fal-ai/flux/dev", {"prompt": "not ours either"})
        await handle.get()
        return str(handle.request_id)

    stranger = with_runtime(settings, "other-tool", elsewhere)
    emulator.advance_clock(3)  # past fal's listing lag
    report = janitor(settings)
    [finding] = [f for f in report.findings if f.request_id == stranger]
    assert finding.action == "orphan"
    assert finding.endpoint == "fal-ai/flux/dev"
    assert "an endpoint no ledger record uses" in finding.note
    assert finding in report.problems()


def test_orphans_are_reported_and_only_adopted_when_asked(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "with-orphan"
    with_runtime(settings, key, lambda rt: run_job(rt, job(settings, key, "a fox")))

    async def foreign(rt: Runtime) -> str:  # another tool on the same account and endpoint
        handle = await rt.fal.submit("fal-ai/flux/schnell", {"prompt": "not ours"})
        await handle.get()
        return str(handle.request_id)

    orphan = with_runtime(settings, "other-tool", foreign)
    emulator.advance_clock(3)  # past fal's listing lag
    report = janitor(settings)
    [finding] = [f for f in report.findings if f.action == "orphan"]
    assert finding.request_id == orphan
    assert held_on_fal(emulator) == {orphan}
    assert report.problems() == [finding]

    report = janitor(settings, JanitorOptions(grace_minutes=0, adopt_orphans=True))
    assert held_on_fal(emulator) == set()
    adopted = [r for r in ledger(settings).values() if r.request_id == orphan]
    assert [r.state for r in adopted] == [JobState.DELETED]
    assert adopted[0].run_key.startswith("orphans-")
    assert_archived(settings, emulator, adopted[0])


def test_delete_off_archives_but_keeps_fal_copies(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "archive-only"
    with_runtime(settings, key, lambda rt: crash_before_archive(rt, job(settings, key, "a fox")))
    report = janitor(settings, JanitorOptions(grace_minutes=0, delete=False))
    [record] = ledger(settings).values()
    assert record.state is JobState.ARCHIVED
    assert_archived(settings, emulator, record)
    assert len(held_on_fal(emulator)) == 1
    assert [f.action for f in report.findings] == ["archived"]


def test_unverifiable_archives_are_never_deleted(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "gone-file"
    j = Job(
        job_id=Job.make_id(key, "echo", 0),
        endpoint="emulator/echo",
        arguments={"output": {"image": {"url": "https://example.com/not-a-fal-host.png"}}},
        policy=settings.retention.policy_for("emulator/echo"),
    )
    with_runtime(settings, key, lambda rt: crash_before_archive(rt, j))
    report = janitor(settings)
    [record] = ledger(settings).values()
    assert record.state is JobState.COMPLETED
    assert record.error
    assert len(held_on_fal(emulator)) == 1
    [problem] = report.problems()
    assert problem.action == "kept"
    assert "example.com" in problem.note or "host" in problem.note


def test_a_sample_of_the_archive_is_re_hashed_and_damage_is_a_problem(
    settings: Settings, emulator: RunningEmulator
) -> None:
    key = "damaged-later"
    with_runtime(settings, key, lambda rt: crash_before_archive(rt, job(settings, key, "fox")))
    janitor(settings)
    [record] = ledger(settings).values()
    assert record.state is JobState.DELETED  # the bucket holds the only copy now
    path = Path(settings.bucket.url.removeprefix("file://")) / record.objects[0].key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    report = janitor(settings, JanitorOptions(grace_minutes=0, verify_sample=100))
    [problem] = report.problems()
    assert (problem.action, problem.run_key, problem.job_id) == ("damaged", key, record.job_id)
    assert problem.before == "deleted"
    assert f"{record.objects[0].key} changed" in problem.note


def test_fal_requests_older_than_a_day_are_found_with_explicit_windows(
    settings: Settings, emulator: RunningEmulator
) -> None:
    """fal starts a listing 24 h ago unless told otherwise: the janitor always sends both ends."""
    key = "old-lost-submit"
    with_runtime(settings, key, lambda rt: crash_before_request_id(rt, job(settings, key, "old")))
    emulator.advance_clock(30 * 3600)  # fal's clock: the request was sent 30 h ago
    janitor(settings)
    [record] = ledger(settings).values()
    assert record.state is JobState.DELETED
    assert held_on_fal(emulator) == set()


def test_listing_windows_are_closed_and_at_most_a_day() -> None:
    start = utcnow()
    end = start + timedelta(hours=60)
    windows = listing_windows(start, end)
    assert [b - a for a, b in windows] == [timedelta(hours=24)] * 2 + [timedelta(hours=12)]
    assert windows[0][0] == start
    assert windows[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))


def test_live_runs_match_explicit_and_default_run_keys() -> None:
    flow_run = str(uuid.uuid4())
    live = LiveRuns(run_keys=frozenset({"nightly-1"}), flow_run_ids=frozenset({flow_run}))
    now = utcnow()
    assert live.holds("nightly-1", now, now)
    assert live.holds(f"sample-{flow_run}", now, now)
    assert not live.holds("nightly-2", now, now)
    assert not live.holds(f"sample-{uuid.uuid4()}", now, now)


def lease(run_key: str, *, expires_in: float, flow_run_id: str | None = None) -> Lease:
    now = utcnow()
    return Lease(
        run_key=run_key,
        holder="test",
        flow_run_id=flow_run_id,
        renewed_at=now,
        expires_at=now + timedelta(seconds=expires_in),
    )


def test_a_lease_decides_liveness_whatever_prefect_reports() -> None:
    now = utcnow()
    flow_run = str(uuid.uuid4())
    live = LiveRuns(
        run_keys=frozenset({"killed", "running"}),
        flow_run_ids=frozenset({flow_run}),
        leases={
            "killed": lease("killed", expires_in=-1, flow_run_id=flow_run),
            "running": lease("running", expires_in=60),
            "elsewhere": lease("elsewhere", expires_in=60),  # a CLI run on another Prefect API
        },
    )
    assert not live.holds("killed", now, now)  # Prefect says Running: its lease says dead
    assert live.holds("running", now, now)
    assert live.holds("elsewhere", now, now)  # Prefect does not know it: its lease says live
    assert [x.run_key for x in live.dead_but_running(now)] == ["killed"]
    released = lease("done", expires_in=60).model_copy(update={"released": True})
    assert not LiveRuns(run_keys=frozenset({"done"}), leases={"done": released}).holds(
        "done", now, now
    )


def test_the_records_of_a_killed_run_are_finished_at_once_and_not_spared_at_purge(
    settings: Settings, emulator: RunningEmulator
) -> None:
    """A SIGKILLed ``falflow run`` stays Running in Prefect: its expired lease lets the janitor
    finish its records without waiting ``stale_after_hours``, and purge applies the same rule."""
    key = "killed-cli-run"
    with_runtime(settings, key, lambda rt: run_job(rt, job(settings, key, "a fox")))
    live = LiveRuns(run_keys=frozenset({key}), leases={key: lease(key, expires_in=-5)})

    async def body(rt: Runtime) -> list[str]:
        found = await survey(rt, NOW_GRACE, live)
        verified, _ = await resolve(rt, found, NOW_GRACE)
        free, spared = spare_live(verified, live)
        assert spared == []
        touched, _ = await purge(rt, free)
        return [r.state.value for r in touched]

    assert with_runtime(settings, "janitor-killed", body) == ["deleted"]
    assert held_on_fal(emulator) == set()


def test_run_counts_follow_each_request_to_where_it_stopped(settings: Settings) -> None:
    policy = settings.retention.policy_for("fal-ai/flux/schnell")

    def record(n: int, state: JobState, request_id: str | None = "r", **extra: Any) -> JobRecord:
        return JobRecord(
            job_id=f"j{n}",
            run_key="k",
            endpoint="fal-ai/flux/schnell",
            policy=policy,
            state=state,
            request_id=request_id and f"{request_id}{n}",
            **extra,
        )

    counts = RunCounts.of(
        [
            record(1, JobState.DELETED),
            record(2, JobState.ARCHIVED),
            record(3, JobState.COMPLETED),
            record(4, JobState.SUBMITTED),
            record(5, JobState.FAILED),
            record(6, JobState.PENDING, None),  # never sent
            record(7, JobState.SUBMIT_UNKNOWN, None),
            record(8, JobState.PENDING, None, submit_attempted_at=utcnow()),
        ]
    )
    assert counts == RunCounts(
        submitted=5, archived=2, deleted=1, failed=1, unverified=2, unknown=2
    )


def test_a_crashed_shard_is_left_to_its_live_parent_then_finished_like_any_crashed_run(
    settings: Settings, emulator: RunningEmulator
) -> None:
    """A shard's run key is ``<run key>.shard-<i>``: its own ledger and lease. While the sharded
    run's parent holds its lease, the parent starts a crashed shard again; once the parent is
    gone too, the janitor finishes the shard like any crashed run."""
    parent, key = "nightly-7", "nightly-7.shard-2"
    shard_run, parent_run = str(uuid.uuid4()), str(uuid.uuid4())
    with_runtime(settings, key, lambda rt: crash_after_submit(rt, job(settings, key, "a fox")))
    shard_lease = lease(key, expires_in=-5, flow_run_id=shard_run)  # killed with its worker
    live = LiveRuns(
        run_keys=frozenset({key, parent}),
        flow_run_ids=frozenset({shard_run, parent_run}),
        leases={key: shard_lease, parent: lease(parent, expires_in=60, flow_run_id=parent_run)},
    )
    assert [x.run_key for x in live.dead_but_running(utcnow())] == [key]  # marked Crashed

    report = janitor(settings, NOW_GRACE, live)
    assert {f.run_key: f.action for f in report.findings} == {key: "live"}
    assert {r.state for r in ledger(settings).values()} == {JobState.SUBMITTED}

    # the parent is gone as well (its flow run finished, or its lease expired)
    for gone in (
        live.model_copy(update={"finished_flow_run_ids": frozenset({parent_run})}),
        live.model_copy(
            update={"leases": {key: shard_lease, parent: lease(parent, expires_in=-1)}}
        ),
    ):
        assert not gone.holds(key, None, utcnow())
    report = janitor(settings, NOW_GRACE, gone)
    assert {f.run_key: f.action for f in report.findings} == {key: "deleted"}
    [record] = ledger(settings).values()
    assert record.state is JobState.DELETED
    assert_archived(settings, emulator, record)
    assert held_on_fal(emulator) == set()
