"""Non-public fal files: signed URLs to read them, and the same inputs with signatures removed.

With ``private_outputs`` a request's output files are created ``forbid`` (non-public). falflow
downloads them through short-lived signed URLs, and a later step that reads an earlier step's
output gets a signed URL in its arguments. Signed URLs are bearer credentials: they go only into
the HTTP request that uses them, never into the ledger, logs or artifacts, where the plain URL
stands instead (so resumed runs and lost-submit matching see the same arguments).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from falflow.tasks.outputs import OutputRefused, check_source, map_strings
from falflow.tasks.runtime import Runtime

SIGNED_SECONDS = 3600
"""How long a signed URL for an archive download stays valid."""


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
    """A signed URL for ``url`` (a fal CDN file), checked to stay on fal's CDN hosts."""
    signed = await rt.platform.sign_url(url, seconds)
    check_source(signed, rt.settings.fal.cdn_hosts)
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
