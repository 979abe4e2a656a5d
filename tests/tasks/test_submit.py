"""What a submit and an upload send fal under a policy."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

import anyio

from falflow.emulator import RunningEmulator
from falflow.settings import BucketSettings, RetentionPolicy, Settings
from falflow.tasks.runtime import open_runtime
from falflow.tasks.submit import submit_headers
from falflow.tasks.uploads import upload_input


def test_a_policy_without_a_start_deadline_sends_no_timeout_header() -> None:
    assert "X-Fal-Request-Timeout" not in submit_headers(
        RetentionPolicy(start_timeout_seconds=None)
    )
    assert submit_headers(RetentionPolicy())["X-Fal-Request-Timeout"] == "600.0"


def test_private_outputs_ask_fal_for_non_public_files() -> None:
    private = submit_headers(RetentionPolicy(private_outputs=True, media_ttl_seconds=3600))
    assert json.loads(private["X-Fal-Object-Lifecycle-Preference"]) == {
        "expiration_duration_seconds": 3600,
        "initial_acl": {"default": "forbid", "rules": []},
    }
    public = submit_headers(RetentionPolicy(private_outputs=False, store_io=False))
    assert "initial_acl" not in json.loads(public["X-Fal-Object-Lifecycle-Preference"])
    assert public["X-Fal-Store-IO"] == "0"


def _lifetime(emulator: RunningEmulator, url: str) -> float | None:
    [record] = [f for f in emulator.inventory(hashes=False)["files"] if f["url"] == url]
    if record["expires_at"] is None:
        return None
    expires, created = (datetime.fromisoformat(record[k]) for k in ("expires_at", "created_at"))
    return (expires - created).total_seconds()


def test_an_upload_ttl_of_never_is_sent_as_never_not_left_to_the_account_default(
    emulator: RunningEmulator, settings_for: Callable[..., Settings], file_bucket: BucketSettings
) -> None:
    emulator.set_storage_settings(expiration_duration_seconds=600, initial_acl=None)
    try:
        never = settings_for(file_bucket, retention={"upload_ttl_seconds": "never"})
        hour = settings_for(file_bucket, retention={"upload_ttl_seconds": 3600})

        async def upload(settings: Settings, data: bytes) -> str:
            async with open_runtime(settings, "uploads") as rt:
                return await upload_input(rt, data, content_type="text/plain", file_name="a.txt")

        kept = anyio.run(upload, never, b"kept")
        assert _lifetime(emulator, kept) is None  # not the account's 600 s
        assert _lifetime(emulator, anyio.run(upload, hour, b"an hour")) == 3600
    finally:
        emulator.reset()
