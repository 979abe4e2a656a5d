"""Raw-HTTP helpers shared by the emulator's tests."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx


def wait_completed(http: httpx.Client, status_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll a status URL until it answers 200 (COMPLETED); its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = http.get(status_url)
        if answer.status_code == 200:
            body: dict[str, Any] = answer.json()
            return body
        assert answer.status_code == 202
        time.sleep(0.02)
    raise AssertionError(f"{status_url} did not complete in {timeout} s")


def submit(
    http: httpx.Client, endpoint: str, arguments: dict[str, Any], **headers: str
) -> dict[str, Any]:
    answer = http.post(f"/{endpoint}", json=arguments, headers=headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def run(http: httpx.Client, endpoint: str, arguments: dict[str, Any], **headers: str) -> Any:
    """Submit, wait, and return the result body (whatever its status)."""
    submitted = submit(http, endpoint, arguments, **headers)
    wait_completed(http, submitted["status_url"])
    return http.get(submitted["response_url"]).json()


def lifecycle(seconds: int | None) -> str:
    """An ``X-Fal-Object-Lifecycle-Preference`` value."""
    return json.dumps({"expiration_duration_seconds": seconds})
