"""Leases: a running retention scope says, in the bucket, that it is alive.

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
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
from pydantic import BaseModel, ValidationError

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
    lease = await write_lease(bucket, run_key, flow_run_id, seconds)
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
    lease is judged by Prefect's state."""
    lease = leases.get(run_key)
    if lease is not None:
        return lease.valid(now) and lease.flow_run_id not in finished_flow_runs
    return prefect_live(run_key)
