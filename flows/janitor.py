"""The janitor: finish what crashed or cancelled runs left on fal, and find lost submits.

Run on a schedule (``prefect.yaml``: ``falflow-janitor/hourly``) or by hand. Each run:

1. **survey** (read only) — every ledger record, and fal's requests for every endpoint the
   ledger knows (plus ``endpoints``) over explicit closed windows ``[now - lookback, now)``;
2. **resolve** — gives each lost submit the one request fal holds for it, then archives every
   completed request not yet archived through the pipeline's own resume path;
3. **purge** — deletes fal's payloads of every verified archive;
4. **verify** (with ``verify_sample``) — re-hashes that many archived objects against the ledger;
5. **report** — a table artifact ``falflow-janitor`` and a ``falflow.run.finished`` event.

The phases, and what the janitor considers safe to touch, are in :mod:`falflow.tasks.janitor`
(the lost-submit rule in :mod:`falflow.tasks.lost`); this module only runs them in order.
"""

from __future__ import annotations

from prefect import flow
from prefect.context import FlowRunContext

from falflow.flows.console import outlive_the_console
from falflow.settings import load_settings
from falflow.settings.blocks import with_blocks
from falflow.tasks.events import emit_run_finished
from falflow.tasks.janitor import (
    Finding,
    JanitorOptions,
    JanitorReport,
    build_report,
    damage_findings,
    publish_report,
    purge_task,
    resolve_task,
    spare_live,
    survey_task,
)
from falflow.tasks.liveness import live_runs, mark_crashed
from falflow.tasks.models import JobRecord, utcnow
from falflow.tasks.runtime import new_run_key, open_runtime, run_logger
from falflow.tasks.verify import verify_task

FLOW_NAME = "falflow-janitor"


@flow(name=FLOW_NAME)
async def janitor(
    grace_minutes: float = 15.0,
    lookback_hours: float = 72.0,
    stale_after_hours: float = 24.0,
    endpoints: list[str] | None = None,
    delete: bool = True,
    adopt_orphans: bool = False,
    verify_sample: int = 0,
    fal_credentials: str | None = None,
    bucket_block: str | None = None,
) -> JanitorReport:
    """Archive and delete what crashed or cancelled runs left on fal; find lost submits.

    Safe while pipelines run: records of runs Prefect reports live, and anything changed within
    ``grace_minutes``, are left alone (see :mod:`falflow.tasks.janitor`). Ends Completed with a
    table artifact listing every problem; a ``falflow.run.finished`` event carries the counts.
    The parameters are those of :class:`falflow.tasks.janitor.JanitorOptions`, and the blocks
    to take the fal keys and the bucket from instead of the environment
    (:mod:`falflow.settings.blocks`), as for the pipeline runs it finishes.

    Usage, by hand (settings from ``FAL_KEY``, ``FAL_ADMIN_KEY``, ``FALFLOW_*`` or ``.env``)::

        import asyncio

        from falflow.flows.janitor import janitor

        # archive what crashed runs left, but keep fal's copies for now
        report = asyncio.run(janitor(grace_minutes=0, delete=False))
        for problem in report.problems():
            print(problem.action, problem.run_key, problem.job_id, problem.note)

    or through its deployment: ``prefect deployment run falflow-janitor/hourly -p grace_minutes=0``.
    """
    outlive_the_console()
    options = JanitorOptions(
        grace_minutes=grace_minutes,
        lookback_hours=lookback_hours,
        stale_after_hours=stale_after_hours,
        endpoints=tuple(endpoints or ()),
        delete=delete,
        adopt_orphans=adopt_orphans,
        verify_sample=verify_sample,
    )
    settings = await with_blocks(
        load_settings(), fal_credentials=fal_credentials, bucket=bucket_block
    )
    context = FlowRunContext.get()
    own = [str(context.flow_run.id)] if context is not None and context.flow_run else []
    run_key = f"janitor-{new_run_key()}"
    async with open_runtime(settings, run_key) as rt:
        live = await live_runs(rt.bucket, own, options.stale_after_hours)
        await mark_crashed(live.dead_but_running(utcnow()))
        found = await survey_task(options, live)
        verified, resolved = await resolve_task(found, options)
        touched: list[JobRecord] = verified
        purged: list[Finding] = []
        if options.delete:
            # A run started since the survey may resume these records and read their fal URLs.
            live = await live_runs(rt.bucket, own, options.stale_after_hours)
            touched, spared = spare_live(verified, live)
            resolved += spared
            touched, purged = await purge_task(touched)
        damaged: list[Finding] = []
        if options.verify_sample:
            damaged = damage_findings(await verify_task(sample=options.verify_sample))
        report = build_report(run_key, found, [*resolved, *purged, *damaged], touched)
    await publish_report(report)
    problems = report.problems()
    run_logger().info(
        "janitor %s: %d archived, %d deleted from fal, %d problems, %d live runs left alone",
        run_key,
        report.counts.archived,
        report.counts.deleted,
        len(problems),
        len(found.live_run_keys),
    )
    emit_run_finished(
        run_key,
        report.counts,
        flow=FLOW_NAME,
        status="completed" if not problems else "attention",
        extra={"problems": len(problems), "live_runs": len(found.live_run_keys)},
    )
    return report
