"""What a run did, for people and callers: live progress, the closing summary, the run-failed error.

:class:`RunSummary` is what ``run_pipeline`` returns, what the CLI prints and what
:class:`RunFailed` carries; it never holds a secret. :meth:`RunSummary.problem_lines` is the one
place problems are worded, wherever they are shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel

PROBLEMS_LISTED = 20
"""Problems listed per kind in messages; the rest are counted (the ledger has them all)."""


class Problem(BaseModel):
    """One request or step that did not end archived-and-deleted, and why."""

    job: str
    endpoint: str = ""
    state: str
    request_id: str | None = None
    error: str = ""


class RunSummary(BaseModel):
    """What a scope did: shown by the CLI, returned by ``run_pipeline``; never holds a secret."""

    run_key: str
    bucket: str
    """The bucket URL; the run's files are under ``runs/<run_key>/``, its ledger ``ledger/<run_key>/``."""
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

    def sections(self) -> Iterator[tuple[str, list[Problem]]]:
        """Each kind of problem with its title, in the order people should read them."""
        yield "not verified (left on fal, never deleted)", self.unverified
        yield "submit outcome unknown (the janitor resolves it)", self.unknown
        yield "archived but not deleted from fal", self.not_deleted
        yield "kept on fal for the resumed run", self.kept_for_resume
        yield "hidden on fal until their TTL ends (store_io off)", self.expiring
        yield "failed", self.failed
        yield "skipped", self.skipped

    def problem_lines(self, limit: int = PROBLEMS_LISTED) -> list[str]:
        """One line per problem, ``limit`` per kind, then how many more."""
        lines = []
        for title, items in self.sections():
            for item in items[:limit]:
                request = f" (request {item.request_id})" if item.request_id else ""
                lines.append(f"{title}: {item.job}{request}: {item.error or item.state}")
            if len(items) > limit:
                lines.append(f"{title}: … and {len(items) - limit} more (see the ledger)")
        return lines


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
