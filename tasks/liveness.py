"""Which runs are live: leases in the bucket, and what Prefect reports.

A running retention scope says, in the bucket, that it is alive.

Prefect's state alone cannot tell a dead run from a live one: a SIGKILLed ``falflow run`` stays
``Running`` in the ephemeral API's database forever, and so does a flow run whose machine was
lost with its worker. So a scope keeps a small lease object beside its ledger,
``leases/<run key>.json``, valid for ``limits.lease_seconds`` and renewed four times as often;
it is released when the scope ends. :func:`run_is_live` is the one rule
for "is this run live": a valid lease says yes (unless Prefect reports its flow run finished),
an expired or released one says no whatever Prefect reports, and only a run with no lease at all
(one that never opened a scope) is judged by Prefect's state.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from uuid import UUID

import anyio
from obstore.exceptions import BaseError as ObjectStoreError
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from falflow.settings import SettingsError
from falflow.tasks.ledger import parent_run_key
from falflow.tasks.models import utcnow
from falflow.tasks.store import Bucket

RENEWALS_PER_LEASE = 4
"""A lease is renewed this many times per its validity (``limits.lease_seconds``)."""
PREFIX = "leases/"


class Lease(BaseModel):
    """A run's claim to be alive."""

    run_key: str
    holder: str
    """Who holds it: host and process id (for people reading the bucket)."""
    flow_run_id: str | None = None
    """The Prefect flow run it belongs to, if any (the janitor marks it Crashed once expired)."""
    renewed_at: datetime
    expires_at: datetime
    released: bool = False

    def valid(self, now: datetime) -> bool:
        return not self.released and now < self.expires_at


def lease_key(run_key: str) -> str:
    return f"{PREFIX}{run_key}.json"


def holder_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


async def write_lease(
    bucket: Bucket,
    run_key: str,
    flow_run_id: str | None,
    seconds: float,
    *,
    released: bool = False,
) -> Lease:
    now = utcnow()
    lease = Lease(
        run_key=run_key,
        holder=holder_name(),
        flow_run_id=flow_run_id,
        renewed_at=now,
        expires_at=now + timedelta(seconds=seconds),
        released=released,
    )
    await bucket.put_bytes(lease_key(run_key), lease.model_dump_json(indent=2).encode())
    return lease


async def read_leases(bucket: Bucket) -> dict[str, Lease]:
    """Every lease in the bucket, by run key (unreadable ones are skipped)."""
    found: dict[str, Lease] = {}
    async for key in bucket.keys(PREFIX):
        data = await bucket.get_bytes(key)
        if data is None:
            continue
        try:
            lease = Lease.model_validate_json(data)
        except ValidationError:
            continue
        found[lease.run_key] = lease
    return found


@asynccontextmanager
async def holding_lease(
    bucket: Bucket, run_key: str, flow_run_id: str | None, seconds: float
) -> AsyncIterator[Lease]:
    """Hold ``run_key``'s lease while the block runs: written at once, renewed in the
    background, released at the end (not when the process is killed: then it expires)."""
    try:
        lease = await write_lease(bucket, run_key, flow_run_id, seconds)
    except (OSError, ObjectStoreError) as exc:  # the run's first write: nothing submitted yet
        raise SettingsError(
            f"FALFLOW_BUCKET__URL: cannot write to the bucket {bucket.url} "
            f"({type(exc).__name__}: {str(exc)[:300]}); check the location, credentials and "
            "permissions. Nothing was submitted"
        ) from None
    async with anyio.create_task_group() as tg:

        async def renew() -> None:
            while True:
                await anyio.sleep(seconds / RENEWALS_PER_LEASE)
                try:
                    await write_lease(bucket, run_key, flow_run_id, seconds)
                except Exception:  # noqa: S112 - a missed renewal is retried; expiry is the net
                    continue

        tg.start_soon(renew)
        try:
            yield lease
        finally:
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await write_lease(bucket, run_key, flow_run_id, seconds, released=True)


def run_is_live(
    run_key: str,
    leases: dict[str, Lease],
    prefect_live: Callable[[str], bool],
    now: datetime,
    finished_flow_runs: frozenset[str] = frozenset(),
) -> bool:
    """The one liveness rule: a run's lease decides — unless Prefect reports the flow run that
    holds it finished (Crashed, Failed, …: its process is known to be gone); a run without a
    lease is judged by Prefect's state. A shard of a sharded run whose parent is live is live
    too, even if its own run crashed: the parent starts it again, and it resumes."""
    parent = parent_run_key(run_key)
    if parent is not None and parent in leases:
        held = leases[parent]
        if held.valid(now) and held.flow_run_id not in finished_flow_runs:
            return True
    lease = leases.get(run_key)
    if lease is not None:
        return lease.valid(now) and lease.flow_run_id not in finished_flow_runs
    return prefect_live(run_key)


LIVE_STATES = (
    StateType.SCHEDULED,
    StateType.PENDING,
    StateType.RUNNING,
    StateType.PAUSED,
    StateType.CANCELLING,
)
_FLOW_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PAGE = 200


class LiveRuns(BaseModel):
    """Which runs are live, by the one rule of :func:`run_is_live`: a run's
    lease in the bucket decides; a run without one (it never opened a retention scope) is live
    while Prefect reports it unfinished, unless its ledger has been still for
    ``stale_after_hours``. The janitor leaves the records of live runs alone."""

    model_config = ConfigDict(frozen=True)

    run_keys: frozenset[str] = frozenset()
    """``run_key`` parameters of flow runs Prefect reports unfinished."""
    flow_run_ids: frozenset[str] = frozenset()
    leases: dict[str, Lease] = Field(default_factory=dict)
    finished_flow_run_ids: frozenset[str] = frozenset()
    """Flow runs holding a lease that Prefect reports finished (their process is gone)."""
    stale_after_hours: float = 24.0

    def holds(self, run_key: str, changed: datetime | None, now: datetime) -> bool:
        """Whether ``run_key``'s run is live; ``changed`` is its records' last change."""

        def by_prefect(key: str) -> bool:
            fresh = changed is None or now - changed < timedelta(hours=self.stale_after_hours)
            return fresh and self.prefect_reports(key)

        return run_is_live(run_key, self.leases, by_prefect, now, self.finished_flow_run_ids)

    def prefect_reports(self, run_key: str) -> bool:
        """Whether Prefect reports a flow run of ``run_key`` unfinished (it may be dead)."""
        if run_key in self.run_keys:
            return True
        found = _FLOW_RUN_ID.search(run_key)
        return found is not None and found.group() in self.flow_run_ids

    def dead_but_running(self, now: datetime) -> list[Lease]:
        """Expired leases whose flow run Prefect still reports unfinished (to mark Crashed)."""
        return [
            lease
            for lease in self.leases.values()
            if not lease.valid(now)
            and not lease.released
            and lease.flow_run_id is not None
            and lease.flow_run_id in self.flow_run_ids
        ]


async def live_runs(
    bucket: Bucket, exclude: Iterable[str] = (), stale_after_hours: float = 24.0
) -> LiveRuns:
    """The runs' leases in ``bucket``, and the flow runs the Prefect API reports in a non-final
    state (except ``exclude`` ids)."""
    run_keys: set[str] = set()
    ids: set[str] = set()
    skip = set(exclude)
    live = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(LIVE_STATES)))
    )
    async with get_client() as client:
        offset = 0
        while True:
            page = await client.read_flow_runs(flow_run_filter=live, limit=_PAGE, offset=offset)
            for run in page:
                if str(run.id) in skip:
                    continue
                ids.add(str(run.id))
                key = (run.parameters or {}).get("run_key")
                if isinstance(key, str) and key:
                    run_keys.add(key)
            if len(page) < _PAGE:
                break
            offset += _PAGE
    leases = await read_leases(bucket)
    holders = {
        lease.flow_run_id
        for lease in leases.values()
        if lease.flow_run_id is not None and lease.flow_run_id not in ids | skip
    }
    finished: set[str] = set()
    if holders:
        async with get_client() as client:
            for run in await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(h) for h in holders]))
            ):
                if run.state is not None and run.state.is_final():
                    finished.add(str(run.id))
    return LiveRuns(
        run_keys=frozenset(run_keys),
        flow_run_ids=frozenset(ids),
        leases=leases,
        finished_flow_run_ids=frozenset(finished),
        stale_after_hours=stale_after_hours,
    )


async def mark_crashed(leases: Sequence[Lease]) -> None:
    """Set the flow runs of expired leases Crashed: their process is gone (killed, or its
    machine lost), whatever state it last reported."""
    async with get_client() as client:
        for lease in leases:
            assert lease.flow_run_id is not None
            await client.set_flow_run_state(
                lease.flow_run_id,
                Crashed(
                    message=f"falflow: the run's lease expired at "
                    f"{lease.expires_at:%Y-%m-%d %H:%M:%S}Z (held by {lease.holder}): "
                    "its process is gone"
                ),
                force=True,
            )
