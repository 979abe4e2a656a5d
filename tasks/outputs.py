"""Finding the files in a fal output, deciding which may be fetched, and naming them in the bucket.

Every string in the output that is a whole URL counts: File objects (``{"url", "file_name",
"content_type", "file_size"}``) at any depth and bare URL strings alike. Only ``https`` URLs on
the configured fal CDN hosts may be fetched; anything else makes the archive incomplete (so the
request is never deleted) rather than being silently skipped. Bucket keys are derived from the
position of the file and a sanitised name, never taken raw from the output.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from falflow.tasks.models import safe_segment

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}")
_MAX_SHOWN = 120


class OutputRefused(ValueError):
    """An output file falflow will not fetch or store; the message says why and what to do."""


@dataclass(frozen=True)
class OutputFile:
    """A file referenced by an output, with what the output claims about it (untrusted)."""

    url: str
    file_name: str | None = None
    content_type: str | None = None
    file_size: int | None = None


def find_files(output: Any) -> list[OutputFile]:
    """Every distinct URL in ``output``, in document order; File objects contribute metadata."""
    found: dict[str, OutputFile] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            url = node.get("url")
            if isinstance(url, str) and _URL.match(url):
                found[url] = OutputFile(
                    url,
                    file_name=_text(node.get("file_name")),
                    content_type=_text(node.get("content_type")),
                    file_size=_whole(node.get("file_size")),
                )
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
        elif isinstance(node, str) and _URL.match(node) and node not in found:
            found[node] = OutputFile(node)

    visit(output)
    return list(found.values())


def check_source(url: str, cdn_hosts: Sequence[str]) -> None:
    """Refuse ``url`` unless it is https on one of ``cdn_hosts`` (globs on host or host:port)."""
    parts = urlsplit(url)
    hosts = ", ".join(cdn_hosts)
    if parts.scheme.lower() != "https":
        raise OutputRefused(
            f"output file {describe_url(url)} is not an https URL: falflow only downloads https "
            f"URLs on fal's CDN hosts ({hosts}) (the request is kept on fal, not deleted)"
        )
    netloc = parts.netloc.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or "@" in netloc or "\\" in url or port == -1:
        raise OutputRefused(
            f"output file {describe_url(url)} has a malformed host; falflow does not fetch it "
            "(the request is kept on fal, not deleted)"
        )
    candidates = {netloc}
    if port in (None, 443):
        candidates.add(parts.hostname)
    if not any(fnmatch.fnmatchcase(c, p.lower()) for c in candidates for p in cdn_hosts):
        raise OutputRefused(
            f"output file {describe_url(url)} is on {netloc!r}, not a fal CDN host ({hosts}); "
            "falflow does not fetch it (the request is kept on fal, not deleted). If that host "
            "is fal's, add it to FALFLOW_FAL__CDN_HOSTS"
        )


def check_file_name(name: str | None) -> None:
    """Refuse a file name that tries to be a path: keys are derived anyway, but such an output
    is hostile or broken, and archiving it as if nothing happened would hide that."""
    if name is None:
        return
    if (
        "/" in name
        or "\\" in name
        or name.strip() in (".", "..")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise OutputRefused(
            f"output file name {name[:_MAX_SHOWN]!r} contains a path, '..' or control "
            "characters; falflow refuses outputs that try to choose where they are stored "
            "(the request is kept on fal, not deleted)"
        )


def object_key(prefix: str, index: int, file: OutputFile) -> str:
    """The bucket key for the ``index``-th file of an output: ``{prefix}/files/{index}-{name}``.

    The name is a sanitised, bounded version of the file name (or of the URL's last path
    segment), keeping a short extension so a person can open it.
    """
    raw = file.file_name or unquote(PurePosixPath(urlsplit(file.url).path).name)
    path = PurePosixPath(raw.replace("\\", "/")).name
    suffix = PurePosixPath(path).suffix
    extension = suffix.lower() if _EXTENSION.fullmatch(suffix) else ""
    stem = path[: -len(suffix)] if extension else path
    return f"{prefix}/files/{index:03d}-{safe_segment(stem, max_length=60)}{extension}"


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of the JSON ``value`` with every string passed through ``change``."""
    if isinstance(value, dict):
        return {key: map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    if isinstance(value, str):
        return change(value)
    return value


def iter_strings(value: Any) -> Iterator[str]:
    """Every string in the JSON ``value``."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_strings(item)


def rewrite_urls(output: Any, locations: Mapping[str, str]) -> Any:
    """A copy of ``output`` with every URL in ``locations`` replaced (e.g. by its archived
    location)."""
    return map_strings(output, lambda text: locations.get(text, text))


def describe_url(url: str) -> str:
    """``url`` for messages: no user info, query or fragment (they may hold tokens), bounded."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{host}{parts.path}"
    return repr(shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "…")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
