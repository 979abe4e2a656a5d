"""Non-public fal files: signed URLs to read them, and the same inputs with signatures removed.

With ``private_outputs`` a request's output files are created ``forbid`` (non-public). falflow
downloads them through short-lived signed URLs, and a later step that reads an earlier step's
output gets a signed URL in its arguments. Signed URLs are bearer credentials: they go only into
the HTTP request that uses them, never into the ledger, logs or artifacts, where the plain URL
stands instead (so resumed runs and lost-submit matching see the same arguments).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from falflow.tasks.outputs import OutputRefused, check_source, map_strings
from falflow.tasks.runtime import Runtime

SIGNED_SECONDS = 2 * 3600
"""How long a signed URL for an archive download stays valid: long enough that the same
signature also serves the request that reads the file next (see :data:`INPUT_READ_SECONDS`)."""
INPUT_READ_SECONDS = 3600
"""How long after fal starts a request its inputs may still be read: a signed input URL lasts
the request's start deadline plus this."""
MAX_REUSED_SIGNATURES = 10_000
"""Signed URLs a run keeps for reuse (memory stays bounded whatever the number of files)."""


def fal_file(value: Any, cdn_hosts: tuple[str, ...]) -> bool:
    """Whether ``value`` is the URL of a file on fal's CDN."""
    if not isinstance(value, str) or not value.startswith("https://"):
        return False
    try:
        check_source(value, cdn_hosts)
    except OutputRefused:
        return False
    return True


async def signed_url(rt: Runtime, url: str, seconds: int = SIGNED_SECONDS) -> str:
    """A signed URL for ``url`` (a fal CDN file) valid at least ``seconds`` more, checked to stay
    on fal's CDN hosts. One made earlier in the run is reused while it lasts: a file is signed
    once for its download, the request that reads it and the check of its deletion, not three
    times (each is a call to fal's rate-limited Platform API)."""
    now = time.monotonic()
    cached = rt.signed.get(url)
    if cached is not None and cached[1] - now >= seconds:
        return cached[0]
    signed = await rt.platform.sign_url(url, seconds)
    check_source(signed, rt.settings.fal.cdn_hosts)
    if len(rt.signed) >= MAX_REUSED_SIGNATURES:
        del rt.signed[next(iter(rt.signed))]  # the oldest: its file is most likely done with
    rt.signed[url] = (signed, now + seconds)
    return signed


async def sign_inputs(rt: Runtime, value: Any, seconds: int) -> Any:
    """``value`` (a request's arguments) with every fal CDN URL replaced by a signed one."""
    hosts = rt.settings.fal.cdn_hosts
    if fal_file(value, hosts):
        return await signed_url(rt, str(value), seconds)
    if isinstance(value, dict):
        return {key: await sign_inputs(rt, item, seconds) for key, item in value.items()}
    if isinstance(value, list):
        return [await sign_inputs(rt, item, seconds) for item in value]
    return value


def unsigned(value: Any, cdn_hosts: tuple[str, ...]) -> Any:
    """``value`` with the query (a signature) removed from every fal CDN URL in it."""

    def strip(text: str) -> str:
        if not fal_file(text, cdn_hosts):
            return text
        return urlunsplit(urlsplit(text)._replace(query="", fragment=""))

    return map_strings(value, strip)
