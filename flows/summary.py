"""What a run did, for people and callers: live progress, the closing summary, the run-failed error.

:class:`RunSummary` is what ``run_pipeline`` returns, what the CLI prints and what
:class:`RunFailed` carries; it never holds a secret. :meth:`RunSummary.problem_lines` is the one
place problems are worded, wherever they are shown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prefect.serializers import (
    JSONSerializer,
    prefect_json_object_decoder,
    prefect_json_object_encoder,
)
from pydantic import BaseModel

from falflow.tasks.report import ReportItem, counts_text, human_bytes

PROBLEMS_LISTED = 20
"""Problems listed per kind in messages; the rest are counted (the ledger has them all)."""


class Problem(BaseModel):
    """One request or step that did not end archived-and-deleted, and why."""

    job: str
    """The ledger's job id (a skipped item has none: its label)."""
    item: str = ""
    """How the run page names it (``image[1]``)."""
    endpoint: str = ""
    state: str
    request_id: str | None = None
    error: str = ""


class RunSummary(BaseModel):
    """What a scope did: shown by the CLI, returned by ``run_pipeline``; never holds a secret."""

    run_key: str
    bucket: str
    """The bucket URL; the run's files are under ``runs/<run_key>/``, its ledger ``ledger/<run_key>/``."""
    shards: int = 0
    """How many shards the run was split into (0: none): each has its own run key,
    ``<run_key>.shard-<i>``, so its own folders (:meth:`folder`)."""
    requests: int
    """Requests fal accepted."""
    archived: int
    archived_files: int
    archived_bytes: int
    deleted: int
    """Requests whose payloads and output files are gone from fal."""
    failed: list[Problem]
    """Requests fal answered with an error, or that could not be made."""
    skipped: list[Problem]
    """Steps (or fan-out items) not run because something they refer to failed."""
    unverified: list[Problem]
    """Requests fal holds whose archive is not verified: never deleted, left to the lifecycle TTL."""
    unknown: list[Problem] = []
    """Submits whose answer was lost: fal may or may not hold them (the janitor resolves them)."""
    not_deleted: list[Problem]
    """Verified archives whose deletion on fal failed or is not confirmed (the janitor retries)."""
    expiring: list[Problem] = []
    """Verified archives fal holds no payload of, whose files fal could not delete (``store_io =
    false``): hidden, and gone at their media TTL (``error`` says when). Not a failure."""
    kept_for_resume: list[Problem] = []
    """Verified archives a cancelled run left on fal because an unfinished step reads them:
    re-running with the same run key deletes them at its end (else the janitor does)."""
    ok: bool
    """Nothing failed, skipped or left on fal (unverified archives count unless
    ``retention.allow_unverified``)."""

    def folder(self, kind: str) -> str:
        """Where the run's ``runs`` (files) or ``ledger`` records are in the bucket."""
        key = f"{self.run_key}.shard-<0..{self.shards - 1}>" if self.shards else self.run_key
        return f"{self.bucket.rstrip('/')}/{kind}/{key}/"

    def sections(self) -> Iterator[tuple[str, list[Problem]]]:
        """Each kind of problem with its title, in the order people should read them."""
        yield "not verified (left on fal, never deleted)", self.unverified
        yield "submit outcome unknown (the janitor resolves it)", self.unknown
        yield "archived but not deleted from fal", self.not_deleted
        yield "kept on fal for the resumed run", self.kept_for_resume
        yield "hidden on fal until their TTL ends (store_io off)", self.expiring
        yield "failed", self.failed
        yield "skipped", self.skipped

    def failed_jobs(self) -> set[str]:
        """Job ids that produced no verified archive (failed, unverified, or unknown)."""
        return {p.job for p in [*self.failed, *self.unverified, *self.unknown]}

    def tally(self, planned: int) -> tuple[int, int, int]:
        """``(ok, failed, skipped)`` of ``planned`` requests: ok went through to a verified
        archive (whether fal's copy is gone yet is told apart)."""
        failed = len(self.failed_jobs())
        return planned - failed - len(self.skipped), failed, len(self.skipped)

    def problem_lines(self, limit: int = PROBLEMS_LISTED) -> list[str]:
        """One line per problem, ``limit`` per kind, then how many more."""
        lines = []
        for title, items in self.sections():
            for item in items[:limit]:
                request = f" (request {item.request_id})" if item.request_id else ""
                name = item.item or item.job
                lines.append(f"{title}: {name}{request}: {item.error or item.state}")
            if len(items) > limit:
                lines.append(f"{title}: … and {len(items) - limit} more (see the ledger)")
        return lines


def story(summary: RunSummary, items: Sequence[ReportItem], name: str) -> str:
    """The run page's markdown: the outcome, where everything went, each step's tally, then every
    problem with its reason (failed, skipped because of what, left on fal)."""
    ok, failed, skipped = summary.tally(len(items))
    bad = summary.failed_jobs()
    verdict = (
        "all archived, verified and deleted from fal"
        if summary.ok
        else "not everything went through"
    )
    lines = [
        f"## {name}: {verdict}",
        "",
        f"**{counts_text(ok, failed, skipped)}** of {len(items)} planned requests "
        f"(run `{summary.run_key}`)",
        "",
        f"- **Archived** {summary.archived} requests, {summary.archived_files} files, "
        f"{human_bytes(summary.archived_bytes)}, each verified by sha256 and size, "
        f"to `{summary.folder('runs')}`",
        f"- **Deleted from fal** {summary.deleted} requests' payloads and output files, "
        "each deletion confirmed",
        f"- **Ledger** `{summary.folder('ledger')}`",
        "",
        "| step | endpoint | ok | failed | skipped | archived |",
        "|---|---|--:|--:|--:|--:|",
    ]
    steps: dict[str, list[ReportItem]] = {}
    for item in items:
        steps.setdefault(item.step, []).append(item)
    for step, its in steps.items():
        skip = sum(not i.job_id for i in its)
        fail = sum(i.job_id in bad for i in its)
        size = human_bytes(sum(i.size for i in its))
        endpoints = ", ".join(sorted({f"`{i.endpoint}`" for i in its}))
        lines.append(
            f"| {step} | {endpoints} | {len(its) - fail - skip} | {fail} | {skip} | {size} |"
        )
    for title, problems in summary.sections():
        if not problems:
            continue
        lines += ["", f"**{title[:1].upper()}{title[1:]}** ({len(problems)})", ""]
        for problem in problems[:PROBLEMS_LISTED]:
            name = problem.item or problem.job
            lines.append(f"- `{name}` {problem.endpoint}: {problem.error or problem.state}")
        if len(problems) > PROBLEMS_LISTED:
            lines.append(f"- … and {len(problems) - PROBLEMS_LISTED} more (see the ledger)")
    return "\n".join(lines)


class RunFailed(RuntimeError):
    """A run ended with failed, skipped, unverified or undeleted requests (raised after cleanup).

    ``summary`` says which; what was archived was cleaned up all the same.
    """

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        super().__init__(
            "\n".join(
                [f"falflow run {summary.run_key}: not everything went through:"]
                + [f"  {line}" for line in summary.problem_lines()]
            )
        )

    def __reduce__(self) -> tuple[type[RunFailed], tuple[RunSummary]]:
        return (type(self), (self.summary,))

    def headline(self) -> str:
        """One line for a Failed state's message: the tally, then the first problems."""
        summary = self.summary
        lines = summary.problem_lines(limit=3)
        shown = "; ".join(lines[:3]) + (f"; … ({len(lines) - 3} more)" if len(lines) > 3 else "")
        return f"falflow run {summary.run_key}: not everything went through: {shown}"


def encode_result(obj: Any) -> Any:
    """Prefect's JSON encoder, keeping a :class:`RunFailed`'s summary (a failed pipeline run's
    persisted result), which Prefect's own encoder would reduce to its message."""
    if isinstance(obj, RunFailed):
        return {"__falflow_run_failed__": obj.summary.model_dump(mode="json")}
    return prefect_json_object_encoder(obj)


def decode_result(data: dict[str, Any]) -> Any:
    """The inverse of :func:`encode_result`."""
    if "__falflow_run_failed__" in data:
        return RunFailed(RunSummary.model_validate(data["__falflow_run_failed__"]))
    return prefect_json_object_decoder(data)


RESULT_SERIALIZER = JSONSerializer(
    object_encoder=f"{__name__}.encode_result", object_decoder=f"{__name__}.decode_result"
)
"""JSON results whose failed runs keep their summary: ``run_deployment``'s caller reads a dict, or
a :class:`RunFailed` (``state.result(raise_on_failure=False)``) with ``.summary``."""


@dataclass
class RunProgress:
    """Live counters of a scope's requests (the CLI draws them; read-only for others)."""

    planned: int = 0
    """Requests known so far (a fan-out over an earlier step's output adds to it when known)."""
    started: int = 0
    archived: int = 0
    failed: int = 0
    skipped: int = 0
    archived_bytes: int = 0
    phase: str = "starting"
    run_key: str = ""

    @property
    def finished(self) -> int:
        return self.archived + self.failed + self.skipped
