"""The janitor's work: which runs are live, what their records and fal hold, and what to do.

The :func:`falflow.flows.janitor.janitor` flow runs these phases in order (each also as a Prefect
task: :func:`survey_task`, :func:`resolve_task`, :func:`purge_task`):

1. :func:`survey` (read only) — reads every ledger record, lists fal's requests for every endpoint
   the ledger knows (plus ``endpoints``) over explicit closed windows ``[now - lookback, now)``,
   at most a day each (:func:`falflow.tasks.lost.list_fal_requests`), and sorts what it finds;
2. :func:`resolve` — gives a lost submit (a record whose submit was attempted but whose request id
   never reached the ledger) the one request fal holds for it (the rule of
   :func:`falflow.tasks.lost.match`, the same the pipeline's own reconciliation uses: same
   endpoint, sent since the attempt, same input as the record's ``input.json``); then archives
   every completed request not yet archived, reusing the pipeline's own resume path
   (:func:`falflow.tasks.jobs.run_job`);
3. :func:`purge` — deletes fal's payloads of every verified archive
   (:func:`falflow.tasks.cleanup.cleanup`: never a request whose archive is not verified);
4. with ``verify_sample``, :func:`falflow.tasks.verify.verify` on that many archived objects
   picked at random across every run (:func:`damage_findings`);
5. :func:`build_report` and :func:`publish_report` — one finding per request, and the table
   artifact ``falflow-janitor``.

What is safe to touch
---------------------
A record is *settled*, and only then touched, when both hold:

- its run is not live, by the one rule of :func:`falflow.tasks.liveness.run_is_live`: a running
  retention scope renews a lease beside its ledger (``leases/<run key>.json``, valid for
  ``limits.lease_seconds``); a run whose lease expired is dead whatever Prefect reports (a
  SIGKILLed ``falflow run`` stays Running in the ephemeral API's database forever; so does the
  flow run of a machine lost with its worker: the janitor marks such a flow run Crashed), and a
  valid lease held by a flow run Prefect reports finished is dead too. Only a run with no lease
  (one that never opened a scope) is judged by Prefect alone: live while a flow run in a
  non-final state has it as its ``run_key`` parameter or default run key
  (``<flow>-<flow run id>``), unless its ledger has been still for ``stale_after_hours``;
- its last ledger change is older than ``grace_minutes``: the instant between fal accepting a
  submit and the run writing its request id.

A request fal holds that no ledger record knows is only touched when it is older than the grace
period too; if it is not a lost submit of a settled record it is an *orphan*: reported, and
archived under ``runs/orphans-<date>/`` and deleted only with ``adopt_orphans`` (an account used
by falflow alone), because other tools on the same fal account make requests falflow must not
delete. A lost submit that several such requests match is left unresolved (reported, never
guessed). A request still running on fal is left for the next janitor run. A request fal failed
is deleted from fal once its input and fal's error are in the bucket (unless the policy's
``keep_failed_on_fal``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import anyio
from prefect import task
from prefect.artifacts import acreate_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from falflow.tasks.cleanup import cleanup, gone_from_fal
from falflow.tasks.errors import JobFailed
from falflow.tasks.events import RunCounts
from falflow.tasks.jobs import run_job
from falflow.tasks.ledger import run_prefix
from falflow.tasks.liveness import LiveRuns
from falflow.tasks.lost import (
    LISTING_LAG,
    FalRequest,
    list_fal_requests,
    match,
    past_start_deadline,
    requests_elsewhere,
    stored_input,
)
from falflow.tasks.models import Job, JobRecord, JobState, safe_segment, utcnow
from falflow.tasks.platform import PlatformError
from falflow.tasks.report import MAX_TABLE_ROWS, in_prefect_run
from falflow.tasks.runtime import Runtime, current_runtime, run_logger
from falflow.tasks.verify import VerifyReport

ARTIFACT_KEY = "falflow-janitor"

Action = Literal[
    "deleted",
    "archived",
    "adopted",
    "waiting",
    "live",
    "kept",
    "unresolved",
    "never_submitted",
    "orphan",
    "damaged",
]


_MAX_NOTED_MATCHES = 5


class JanitorOptions(BaseModel):
    """What the janitor may do; the flow's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grace_minutes: float = Field(default=15.0, ge=0)
    """Records changed (and fal requests sent) more recently than this are left alone."""
    lookback_hours: float = Field(default=72.0, gt=0, le=31 * 24)
    """How far back fal's request listing is searched (fal keeps payloads 30 days)."""
    stale_after_hours: float = Field(default=24.0, gt=0)
    """A run Prefect still calls live whose ledger has not changed for this long is presumed
    dead (its machine and worker were lost before they could report a crash)."""
    endpoints: tuple[str, ...] = ()
    """Endpoints to list besides those the ledger knows (e.g. ones used outside falflow runs)."""
    delete: bool = True
    """Delete fal's payloads of verified archives (the retention policy); off: archive only."""
    adopt_orphans: bool = False
    """Archive (and, with ``delete``, delete) fal requests no ledger record knows. Only for a fal
    account used by falflow alone."""
    verify_sample: int = Field(default=0, ge=0)
    """Archived objects, picked at random across every run, to re-read and re-hash against the
    ledger (``falflow verify`` on a sample); 0: none."""


class Finding(BaseModel):
    """One request the janitor looked at, what it did, and why."""

    run_key: str
    job_id: str | None
    request_id: str | None
    endpoint: str
    before: str
    after: str
    action: Action
    note: str = ""


class Survey(BaseModel):
    """What the janitor found, before changing anything."""

    window_start: datetime
    window_end: datetime
    ledger_records: int = 0
    live_run_keys: list[str] = Field(default_factory=list)
    to_archive: list[JobRecord] = Field(default_factory=list)
    """Settled records fal completed (or may have) and the bucket does not hold yet."""
    to_delete: list[JobRecord] = Field(default_factory=list)
    """Settled, verified, not yet deleted."""
    lost_submits: list[tuple[JobRecord, FalRequest]] = Field(default_factory=list)
    never_submitted: list[JobRecord] = Field(default_factory=list)
    """Settled lost submits proven never to have reached fal (past their start deadline, not
    listed): nothing to clean; the next run with their run key submits them again."""
    """Settled records whose submit's answer was lost, with the request fal holds for each."""
    orphans: list[tuple[FalRequest, dict[str, Any]]] = Field(default_factory=list)
    """Requests fal holds that no record knows, with their stored input (for adoption)."""
    findings: list[Finding] = Field(default_factory=list)
    """Things left alone, and why."""


class JanitorReport(BaseModel):
    run_key: str
    survey: Survey
    findings: list[Finding]
    """Everything acted on or left alone, problems first."""
    counts: RunCounts
    """Counts over the records the janitor acted on, as they stand after it."""

    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.action in ("damaged", "kept", "unresolved", "orphan")]


# --- survey --------------------------------------------------------------------------------------


def last_change(record: JobRecord) -> datetime | None:
    """When the record last changed, as far as its timestamps tell."""
    stamps = [at for _, at in record.history]
    stamps += [
        at
        for at in (
            record.submit_attempted_at,
            record.submitted_at,
            record.finished_at,
            record.archived_at,
            record.deleted_at,
        )
        if at is not None
    ]
    return max(stamps, default=None)


async def _read_json(rt: Runtime, key: str | None) -> Any:
    data = None if key is None else await rt.bucket.get_bytes(key)
    return None if data is None else json.loads(data)


def _finding(
    record: JobRecord, action: Action, note: str = "", after: str | None = None
) -> Finding:
    return Finding(
        run_key=record.run_key,
        job_id=record.job_id,
        request_id=record.request_id,
        endpoint=record.endpoint,
        before=record.state.value,
        after=after or record.state.value,
        action=action,
        note=note,
    )


async def survey(
    rt: Runtime, options: JanitorOptions, live: LiveRuns, now: datetime | None = None
) -> Survey:
    """Sort the ledger and fal's listing into what to archive, delete, adopt, or leave alone."""
    now = now or utcnow()
    grace = timedelta(minutes=options.grace_minutes)
    found = Survey(window_start=now - timedelta(hours=options.lookback_hours), window_end=now)
    records = [record async for record in rt.ledger.list()]
    found.ledger_records = len(records)
    known = {r.request_id for r in records if r.request_id}

    settled: list[JobRecord] = []
    live_keys: set[str] = set()
    for record in records:
        if record.state in (JobState.DELETED, JobState.EXPIRING, JobState.NEVER_SUBMITTED):
            continue
        if record.state is JobState.FAILED and not record.needs_deletion:
            continue  # nothing of it on fal, or kept there on purpose (keep_failed_on_fal)
        if record.state is JobState.PENDING and record.submit_attempted_at is None:
            continue  # never sent: nothing on fal
        changed = last_change(record)
        if live.holds(record.run_key, changed, now):
            live_keys.add(record.run_key)
            found.findings.append(_finding(record, "live", "its run is still live in Prefect"))
        elif changed is not None and now - changed < grace:
            found.findings.append(_finding(record, "live", "changed within the grace period"))
        else:
            settled.append(record)
    found.live_run_keys = sorted(live_keys)

    endpoints = {r.endpoint for r in records} | set(options.endpoints)
    listed: dict[str, FalRequest] = {}
    if endpoints:
        listed = await list_fal_requests(rt, sorted(endpoints), found.window_start, now)

    unknown: list[JobRecord] = []
    for record in settled:
        if record.needs_deletion:
            found.to_delete.append(record)
        elif record.state is JobState.COMPLETED:
            found.to_archive.append(record)
        elif record.submit_unknown:
            unknown.append(record)
        elif record.request_id is not None:  # submitted: archive once fal has finished it
            item = listed.get(record.request_id)
            if item is not None and item.ended_at is None:
                found.findings.append(_finding(record, "waiting", "still running on fal"))
            else:
                found.to_archive.append(record)

    newcomers = [
        r
        for r in listed.values()
        if r.request_id not in known and (r.sent_at is None or now - r.sent_at >= grace)
    ]
    # Stored inputs are fetched one request at a time: only where they can be used.
    wanted = {r.endpoint for r in unknown}
    inputs: dict[str, Any] = {}
    for request in newcomers:
        if options.adopt_orphans or request.endpoint_id in wanted:
            inputs[request.request_id] = await stored_input(rt, request, found.window_start, now)
    claimed: set[str] = set()

    async def taken(request_id: str) -> bool:
        return request_id in claimed

    candidates = [(r, inputs.get(r.request_id)) for r in newcomers]
    for record in sorted(unknown, key=lambda r: r.submit_attempted_at or now):
        arguments = await _read_json(rt, record.input_key)
        attempted = record.submit_attempted_at or now
        matches = await match(record.endpoint, arguments, attempted, now, candidates, taken)
        if len(matches) == 1:
            claimed.add(matches[0].request_id)
            found.lost_submits.append((record, matches[0]))
            continue
        if arguments is None:
            note = "its input.json is missing, so no request on fal can be matched to it"
        elif matches:
            ids = ", ".join(r.request_id for r in matches[:_MAX_NOTED_MATCHES])
            more = ", ..." if len(matches) > _MAX_NOTED_MATCHES else ""
            note = (
                f"{len(matches)} requests on fal match its input.json since the attempt "
                f"({ids}{more}): falflow does not guess which is its own"
            )
        else:
            note = "no request on fal matches its input.json since the attempt"
            if past_start_deadline(record.policy, attempted, now):
                found.never_submitted.append(record)
                continue
            if now - attempted < LISTING_LAG:  # fal's listing may not show it yet
                found.findings.append(_finding(record, "waiting", note + " (yet)"))
                continue
        found.findings.append(_finding(record, "unresolved", note))
    found.orphans = [
        (r, {"input": inputs.get(r.request_id)}) for r in newcomers if r.request_id not in claimed
    ]
    try:
        elsewhere = await requests_elsewhere(rt, endpoints, found.window_start)
    except PlatformError as exc:  # the listing by endpoint above still found what it could
        run_logger().warning("janitor: could not search fal's requests on other endpoints: %s", exc)
    else:
        for request in elsewhere:
            if request.request_id not in known and (
                request.sent_at is None or now - request.sent_at >= grace
            ):
                found.findings.append(
                    _unseen(
                        request.request_id,
                        request.endpoint_id,
                        "on fal, on an endpoint no ledger record uses: add it to the janitor's "
                        "endpoints (with adopt_orphans=true) to archive and delete it",
                    )
                )
    return found


def _unseen(request_id: str, endpoint: str, note: str) -> Finding:
    return Finding(
        run_key="-",
        job_id=None,
        request_id=request_id,
        endpoint=endpoint,
        before="unknown",
        after="unknown",
        action="orphan",
        note=note,
    )


# --- resolve and purge ---------------------------------------------------------------------------


def _for_run(rt: Runtime, run_key: str) -> Runtime:
    """The flow's runtime (same clients, bucket and limits) acting for another run's records."""
    return dataclasses.replace(rt, run_key=run_key)


async def _resume(rt: Runtime, record: JobRecord) -> tuple[JobRecord, Finding]:
    """Wait for (if needed) and archive one record through the pipeline's resume path."""
    arguments = await _read_json(rt, record.input_key)
    job = Job(
        job_id=record.job_id,
        endpoint=record.endpoint,
        arguments=arguments if isinstance(arguments, dict) else {},
        policy=record.policy,
    )
    try:
        outcome = await run_job(_for_run(rt, record.run_key), job, resubmit_cancelled=False)
    except JobFailed as exc:
        after = exc.record
        if after.needs_deletion:  # its input and fal's error are archived: deleted like the rest
            note = f"failed on fal ({after.error_type or 'error'}): input and error archived"
            return after, _finding(record, "archived", note, after.state.value)
        return after, _finding(record, "kept", after.error or "fal failed it", after.state.value)
    except Exception as exc:  # one broken record must not stop the others; it is reported
        note = rt.redact(f"{type(exc).__name__}: {exc}")[:500]
        return record, _finding(record, "kept", note)
    after = outcome.record
    if after.verified:
        return after, _finding(record, "archived", f"{len(after.objects)} files", after.state.value)
    return after, _finding(record, "kept", after.error or "archive not verified", after.state.value)


async def _adopt_orphan(rt: Runtime, request: FalRequest, stored: dict[str, Any]) -> JobRecord:
    """A ledger record (run ``orphans-<date>``) for a request no record knew, then resumable."""
    sent = request.sent_at or utcnow()
    record = JobRecord(
        job_id=safe_segment(request.request_id, max_length=100),
        run_key=f"orphans-{sent:%Y%m%d}",
        endpoint=request.endpoint_id,
        policy=rt.settings.retention.policy_for(request.endpoint_id),
    )
    if isinstance(stored.get("input"), dict):
        key = f"{run_prefix(record.run_key, record.job_id)}/input.json"
        await rt.bucket.put_bytes(key, json.dumps(stored["input"], indent=2).encode())
        record = record.model_copy(update={"input_key": key})
    return await rt.ledger.put(
        record.moved_to(JobState.SUBMITTED, request_id=request.request_id, submitted_at=sent)
    )


async def resolve(
    rt: Runtime, found: Survey, options: JanitorOptions
) -> tuple[list[JobRecord], list[Finding]]:
    """Adopt lost submits (and orphans if allowed), then archive everything completed.

    Returns the records now to delete (for :func:`purge`: verified, or failed on fal with their
    input and error archived) and one finding per record touched.
    """
    verified = list(found.to_delete)
    findings: list[Finding] = []
    resumable = list(found.to_archive)
    for record in found.never_submitted:
        await rt.ledger.put(
            record.moved_to(
                JobState.NEVER_SUBMITTED,
                error_type="never_submitted",
                error="the submit never reached fal: its start deadline passed and fal lists no "
                "request with its input; the next run with this run key submits it again",
            )
        )
        note = "never reached fal (start deadline passed, not listed): re-run its run key"
        findings.append(_finding(record, "never_submitted", note, "never_submitted"))
    for record, request in found.lost_submits:
        adopted = await rt.ledger.put(
            record.moved_to(
                JobState.SUBMITTED,
                request_id=request.request_id,
                submitted_at=record.submit_attempted_at or request.sent_at,
                error=None,
                error_type=None,
            )
        )
        run_logger().info(
            "%s: found the lost submit's request on fal: %s", record.job_id, request.request_id
        )
        if request.ended_at is None:
            findings.append(_finding(record, "adopted", "still running on fal", "submitted"))
        else:
            resumable.append(adopted)
    for request, stored in found.orphans:
        if not options.adopt_orphans:
            findings.append(
                Finding(
                    run_key="-",
                    job_id=None,
                    request_id=request.request_id,
                    endpoint=request.endpoint_id,
                    before="unknown",
                    after="unknown",
                    action="orphan",
                    note="on fal, in no ledger record (adopt_orphans=true archives and deletes it)",
                )
            )
        elif request.ended_at is not None:
            resumable.append(await _adopt_orphan(rt, request, stored))

    results: list[tuple[JobRecord, Finding]] = []

    async def one(record: JobRecord) -> None:
        results.append(await _resume(rt, record))

    async with anyio.create_task_group() as tg:
        for record in resumable:
            tg.start_soon(one, record)
    for after, finding in results:
        findings.append(finding)
        if after.state is JobState.ARCHIVED or after.needs_deletion:
            verified.append(after)
    return verified, findings


async def purge(rt: Runtime, records: Sequence[JobRecord]) -> tuple[list[JobRecord], list[Finding]]:
    """Delete fal's payloads of ``records`` (verified ones only, per run); what happened to each."""
    by_run: dict[str, list[JobRecord]] = {}
    for record in records:
        by_run.setdefault(record.run_key, []).append(record)
    before = {(r.run_key, r.job_id): r for r in records}
    after: list[JobRecord] = []
    findings: list[Finding] = []
    for run_key, group in sorted(by_run.items()):
        report = await cleanup(_for_run(rt, run_key), group)
        for record in report.records:
            after.append(record)
            original = before[(record.run_key, record.job_id)]
            if gone_from_fal(record):
                findings.append(_finding(original, "deleted", "", record.state.value))
            else:
                note = record.error or "deletion failed; the next janitor run retries it"
                findings.append(_finding(original, "kept", note, record.state.value))
    return after, findings


def spare_live(
    records: Sequence[JobRecord], live: LiveRuns
) -> tuple[list[JobRecord], list[Finding]]:
    """``records`` whose runs are not ``live`` (to purge), and a finding for each of the others:
    a run started since the survey may resume them and still read their fal URLs."""
    now = utcnow()
    free = [r for r in records if not live.holds(r.run_key, last_change(r), now)]
    spared = [_finding(r, "live", "its run became live") for r in records if r not in free]
    return free, spared


def damage_findings(checked: VerifyReport) -> list[Finding]:
    """One finding per archived object that no longer matches its ledger record."""
    return [
        Finding(
            run_key=d.run_key,
            job_id=d.job_id,
            request_id=None,
            endpoint=d.endpoint,
            before=d.state,
            after=d.state,
            action="damaged",
            note=f"{d.key} {d.problem}: {d.note}",
        )
        for d in checked.damage
    ]


def build_report(
    run_key: str, found: Survey, acted: list[Finding], touched: Sequence[JobRecord]
) -> JanitorReport:
    """One finding per request: its state before the janitor, and the last thing done to it."""
    merged: dict[tuple[str, str | None], Finding] = {}
    for finding in [*found.findings, *acted]:
        key = (finding.run_key, finding.job_id or finding.request_id)
        earlier = merged.get(key)
        if earlier is not None:
            note = "; ".join(n for n in (earlier.note, finding.note) if n)
            finding = finding.model_copy(
                update={
                    "before": earlier.before,
                    "request_id": finding.request_id or earlier.request_id,
                    "note": note,
                }
            )
        merged[key] = finding
    order = {
        "damaged": 0,
        "kept": 1,
        "unresolved": 2,
        "orphan": 3,
        "waiting": 4,
        "adopted": 5,
        "live": 6,
    }
    findings = sorted(
        merged.values(), key=lambda f: (order.get(f.action, 9), f.run_key, f.job_id or "")
    )
    return JanitorReport(
        run_key=run_key, survey=found, findings=findings, counts=RunCounts.of(touched)
    )


# --- the Prefect tasks, and the report artifact --------------------------------------------------


@task(name="janitor-survey", cache_policy=NONE, persist_result=False)
async def survey_task(options: JanitorOptions, live: LiveRuns) -> Survey:
    return await survey(current_runtime(), options, live)


@task(name="janitor-resolve", cache_policy=NONE, persist_result=False)
async def resolve_task(
    found: Survey, options: JanitorOptions
) -> tuple[list[JobRecord], list[Finding]]:
    return await resolve(current_runtime(), found, options)


@task(name="janitor-purge", cache_policy=NONE, persist_result=False)
async def purge_task(records: list[JobRecord]) -> tuple[list[JobRecord], list[Finding]]:
    return await purge(current_runtime(), records)


async def publish_report(report: JanitorReport) -> None:
    """The ``falflow-janitor`` table artifact: one row per finding, problems first."""
    if not in_prefect_run():
        return
    rows = [
        {
            "action": f.action,
            "run": f.run_key,
            "job": f.job_id or "-",
            "request": f.request_id or "-",
            "endpoint": f.endpoint,
            "before": f.before,
            "after": f.after,
            "note": f.note,
        }
        for f in report.findings[:MAX_TABLE_ROWS]
    ]
    c = report.counts
    s = report.survey
    await acreate_table_artifact(
        rows,
        key=ARTIFACT_KEY,
        description=(
            f"falflow janitor {report.run_key}: {s.ledger_records} ledger records, fal listed "
            f"{s.window_start:%Y-%m-%d %H:%M} to {s.window_end:%Y-%m-%d %H:%M} UTC; "
            f"{c.archived} archived, {c.deleted} deleted from fal, {len(report.problems())} "
            f"problems, {len(s.live_run_keys)} live runs left alone"
        ),
    )
