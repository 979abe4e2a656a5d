"""A running scope's lease: written at once, renewed while it runs, released at its end."""

from __future__ import annotations

from pathlib import Path

import anyio

from falflow.settings import BucketSettings
from falflow.tasks.liveness import holding_lease, read_leases
from falflow.tasks.models import utcnow
from falflow.tasks.store import open_bucket


def test_a_lease_is_renewed_while_held_and_released_after(tmp_path: Path) -> None:
    bucket = open_bucket(BucketSettings(url=(tmp_path / "bucket").as_uri()))

    async def main() -> None:
        async with holding_lease(bucket, "run-1", "flow-run-1", 0.2) as first:
            assert first.valid(utcnow())
            await anyio.sleep(0.15)
            held = (await read_leases(bucket))["run-1"]
            assert held.renewed_at > first.renewed_at  # renewed in the background
            assert held.flow_run_id == "flow-run-1"
            assert held.valid(utcnow())
        released = (await read_leases(bucket))["run-1"]
        assert released.released
        assert not released.valid(utcnow())

    anyio.run(main)
