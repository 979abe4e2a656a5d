"""The CDN (outputs and uploads, with expiry, deletion, ACLs, signed URLs and Range), the
account's storage settings, and the upload protocol that ``fal_client`` speaks: CDN token,
single-shot and multipart uploads, and the ``storage/upload/initiate`` fallback
(docs/fal-protocol.md §3, §4, §5, §6)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, quote, unquote

from pydantic import ValidationError

from falflow.emulator.clock import iso
from falflow.emulator.config import PUBLIC, Acl, StorageSettings
from falflow.emulator.files import BytesSource, FileSource, sha256_of
from falflow.emulator.http import AbortConnection, HttpError, Request, Response, json_response

if TYPE_CHECKING:
    from falflow.emulator.app import Emulator

FileKind = Literal["output", "upload"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
LIFECYCLE = "x-fal-object-lifecycle"
LIFECYCLE_PREFERENCE = "x-fal-object-lifecycle-preference"


@dataclass(slots=True, eq=False)
class CdnFile:
    key: str
    url: str
    file_name: str
    content_type: str
    source: FileSource
    kind: FileKind
    request_id: str | None
    created_at: float
    expires_at: float | None
    acl: Acl | None = None
    """None: no ACL, public (reported as ``allow`` with no rules)."""
    deleted: bool = False
    sha256: str | None = None

    def live(self, at: float) -> bool:
        return not self.deleted and (self.expires_at is None or at < self.expires_at)

    @property
    def decision(self) -> str:
        """What an anonymous download gets: ``allow``, ``forbid`` or ``hide``."""
        return (self.acl or PUBLIC).default

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "file_name": self.file_name,
            "content_type": self.content_type,
            "size": self.source.size,
            "sha256": self.sha256,
            "kind": self.kind,
            "request_id": self.request_id,
            "created_at": iso(self.created_at),
            "expires_at": None if self.expires_at is None else iso(self.expires_at),
            "acl": self.decision,
        }


@dataclass(slots=True)
class _Pending:
    """An upload announced but not finished: a multipart upload (its parts so far) or an
    ``upload_url`` handed out by ``storage/upload/initiate`` (a signed-URL stand-in)."""

    key: str
    file_name: str
    content_type: str
    expires_in: int | None
    acl: Acl | None
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A parsed lifecycle header. A part the header leaves out (``*_set`` False) falls to the
    account's storage settings when a file is stored."""

    expires_in: int | None = None
    """Seconds until expiry; None: never."""
    expires_set: bool = False
    acl: Acl | None = None
    """The initial ACL; None: none (public)."""
    acl_set: bool = False


NO_LIFECYCLE = Lifecycle()


def safe_file_name(name: str | None, default: str = "file.bin") -> str:
    """A file name that cannot escape its directory in a URL (fal normalises them too)."""
    cleaned = _UNSAFE.sub("_", (name or "").rsplit("/", 1)[-1]).lstrip(".")
    return cleaned[:200] or default


def parse_lifecycle(raw: str | None) -> Lifecycle:
    """A lifecycle header: ``{"expiration_duration_seconds": <int or null>, "initial_acl":
    <acl or null>}``, either part optional (absent: the account's setting). An expiry of null
    or 0 means never; an ``initial_acl`` of null means no ACL (public)."""
    if raw is None:
        return NO_LIFECYCLE
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise HttpError(400, {"detail": "Invalid object lifecycle header: expected a JSON object"})
    expires_in: int | None = None
    if "expiration_duration_seconds" in value:
        seconds = value["expiration_duration_seconds"]
        if seconds is not None and (
            not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 0
        ):
            raise HttpError(
                400,
                {"detail": "expiration_duration_seconds must be a non-negative integer or null"},
            )
        expires_in = seconds or None
    acl: Acl | None = None
    if value.get("initial_acl") is not None:
        try:
            acl = Acl.model_validate(value["initial_acl"])
        except ValidationError:
            raise HttpError(
                400,
                {
                    "detail": "initial_acl must be null or {default: allow|forbid|hide, "
                    "rules: [{user, decision}]}"
                },
            ) from None
    return Lifecycle(
        expires_in, "expiration_duration_seconds" in value, acl, "initial_acl" in value
    )


class CdnStore:
    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.files: dict[str, CdnFile] = {}
        self.settings = emu.config.seed_storage_settings()
        """The account's storage settings (``/v1/storage/settings``)."""
        self._signed: dict[str, tuple[str, float]] = {}
        """Signed-URL ``identity`` tokens: file key and expiry."""
        self._tokens: dict[str, float] = {}
        self._multipart: dict[str, _Pending] = {}
        self._slots: dict[str, _Pending] = {}

    @property
    def files_url(self) -> str:
        return f"{self.emu.base_url}/cdn/files/"

    def add(
        self,
        *,
        file_name: str,
        content_type: str,
        source: FileSource,
        kind: FileKind,
        request_id: str | None,
        created_at: float,
        expires_at: float | None,
        acl: Acl | None = None,
        key: str | None = None,
    ) -> CdnFile:
        key = key or self.new_key(file_name)
        created = CdnFile(
            key=key,
            url=self.files_url + quote(key),
            file_name=key.rsplit("/", 1)[-1],
            content_type=content_type,
            source=source,
            kind=kind,
            request_id=request_id,
            created_at=created_at,
            expires_at=expires_at,
            acl=acl,
        )
        self.files[key] = created
        return created

    def new_key(self, file_name: str) -> str:
        return f"{secrets.token_hex(8)}/{safe_file_name(file_name)}"

    def resolve(self, url: str, *, at: float, anonymous: bool = False) -> CdnFile | None:
        """The live file behind one of this CDN's URLs at time ``at``, else None; with
        ``anonymous``, only if a download of ``url`` (signed or not) would be served."""
        if not url.startswith(self.files_url):
            return None
        path, _, query = url[len(self.files_url) :].partition("?")
        found = self.files.get(unquote(path))
        if found is None or not found.live(at):
            return None
        if anonymous:
            identity = parse_qs(query).get("identity", [None])[0]
            if self.access(found, identity, at) != 200:
                return None
        return found

    def lookup(self, url: str, *, at: float) -> CdnFile | None:
        """The live file at exactly ``url`` (no query string), else None."""
        if not url.startswith(self.files_url) or "?" in url:
            return None
        found = self.files.get(unquote(url[len(self.files_url) :]))
        return found if found is not None and found.live(at) else None

    def access(self, found: CdnFile, identity: str | None, at: float) -> int:
        """The status a download of a live file gets: a signed URL (``identity``) is served
        whatever the ACL while its signature is valid (403 after); otherwise the ACL decides
        (``allow`` 200, ``forbid`` 403, ``hide`` 404)."""
        if identity is not None:
            grant = self._signed.get(identity)
            if grant is None or grant[0] != found.key or at >= grant[1]:
                return 403
            return 200
        return {"allow": 200, "forbid": 403, "hide": 404}[found.decision]

    def sign(self, found: CdnFile, seconds: int) -> str:
        now = self.emu.clock.now()
        for stale in [t for t, (_, expires) in self._signed.items() if expires <= now]:
            del self._signed[stale]
        token = secrets.token_urlsafe(24)
        self._signed[token] = (found.key, now + seconds)
        return f"{found.url}?identity={token}"

    def known_acl(self, acl: Acl | None) -> Acl | None:
        """``acl`` without rules for users that do not exist (fal drops them)."""
        if acl is None:
            return None
        config = self.emu.config
        users = {config.user_id, *config.acl_known_users}
        kept = [rule for rule in acl.rules if rule.user in users]
        return acl if len(kept) == len(acl.rules) else Acl(default=acl.default, rules=kept)

    def set_settings(self, settings: StorageSettings) -> StorageSettings:
        self.settings = settings.model_copy(
            update={"initial_acl": self.known_acl(settings.initial_acl)}
        )
        return self.settings

    def choose(self, lifecycle: Lifecycle) -> tuple[int | None, Acl | None]:
        """Lifetime (seconds, None: never) and initial ACL of a new file: what its lifecycle
        header says, else the account's storage settings."""
        settings = self.settings
        expires_in = (
            lifecycle.expires_in if lifecycle.expires_set else settings.expiration_duration_seconds
        )
        acl = lifecycle.acl if lifecycle.acl_set else settings.initial_acl
        return expires_in, self.known_acl(acl)

    def delete(self, target: CdnFile) -> None:
        target.deleted = True
        target.source = BytesSource(b"")

    def _expiry(self, now: float, seconds: int | None) -> float | None:
        return None if seconds is None else now + seconds

    def upload_lifecycle(self, request: Request, header: str) -> tuple[int | None, Acl | None]:
        raw = request.headers.get(header)
        if raw is None:  # fal_client sends both; accept either
            raw = request.headers.get(LIFECYCLE_PREFERENCE if header == LIFECYCLE else LIFECYCLE)
        return self.choose(parse_lifecycle(raw))

    async def inventory(self, hashes: bool) -> list[dict[str, Any]]:
        now = self.emu.clock.now()
        live = [f for f in self.files.values() if f.live(now)]
        if hashes:
            missing = [f for f in live if f.sha256 is None]
            if missing:
                # Hashing a 1 GiB synthetic file takes a second or two: keep the loop free.
                digests = await asyncio.to_thread(lambda: [sha256_of(f.source) for f in missing])
                for target, digest in zip(missing, digests, strict=True):
                    target.sha256 = digest
        return [f.describe() for f in live]

    # -- REST: tokens and the upload fallback ----------------------------------------------

    def issue_token(self) -> dict[str, Any]:
        now = self.emu.clock.now()
        token = secrets.token_urlsafe(24)
        expires_at = now + self.emu.config.cdn_token_ttl_seconds
        self._tokens[token] = expires_at
        return {
            "token": token,
            "token_type": "Bearer",
            "base_url": f"{self.emu.base_url}/cdn",
            "expires_at": iso(expires_at).replace("Z", "+00:00"),
        }

    def check_token(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expires_at = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if expires_at is None or self.emu.clock.now() >= expires_at:
            raise HttpError(
                401, {"detail": "Invalid or expired CDN token: fetch a new one from the REST API"}
            )

    async def initiate_upload(self, request: Request) -> Response:
        body = await request.json()
        if not isinstance(body, dict):
            raise HttpError(422, {"detail": "expected {file_name, content_type}"})
        file_name = safe_file_name(body.get("file_name"), "upload.bin")
        content_type = str(body.get("content_type") or "application/octet-stream")
        token = secrets.token_urlsafe(24)
        slot = _Pending(
            self.new_key(file_name),
            file_name,
            content_type,
            *self.upload_lifecycle(request, LIFECYCLE_PREFERENCE),
        )
        self._slots[token] = slot
        return json_response(
            200,
            {
                "upload_url": f"{self.emu.base_url}/cdn/upload-slots/{token}",
                "file_url": self.files_url + quote(slot.key),
            },
        )

    # -- CDN routes --------------------------------------------------------------------------

    async def handle(self, request: Request, path: str) -> Response:
        """``path`` is what follows ``/cdn/``."""
        method = request.method
        if path == "files/upload" and method == "POST":
            return await self._upload(request)
        if path == "files/upload/multipart" and method == "POST":
            return await self._multipart_create(request)
        if path.startswith("upload-slots/") and method == "PUT":
            return await self._slot_put(request, path.removeprefix("upload-slots/"))
        if path.startswith("files/"):
            key = unquote(path.removeprefix("files/"))
            if "/multipart/" in key:
                key, _, rest = key.partition("/multipart/")
                return await self._multipart_part(request, key, rest)
            if method in ("GET", "HEAD"):
                return self.serve(request, key)
        raise HttpError(404, {"detail": "Not found"})

    async def _upload(self, request: Request) -> Response:
        if not self.emu.config.v3_upload_available:
            raise HttpError(
                500,
                {"detail": "CDN upload backend unavailable", "error_type": "internal_error"},
            )
        self.check_token(request)
        expires_in, acl = self.upload_lifecycle(request, LIFECYCLE)
        data = await request.body()
        added = self._store_upload(
            safe_file_name(request.headers.get("x-fal-file-name"), "upload.bin"),
            request.headers.get("content-type", "application/octet-stream"),
            data,
            expires_in,
            acl,
        )
        return json_response(
            200,
            {
                "access_url": added.url,
                "content_type": added.content_type,
                "file_name": added.file_name,
                "file_size": len(data),
            },
        )

    def _store_upload(
        self,
        file_name: str,
        content_type: str,
        data: bytes,
        expires_in: int | None,
        acl: Acl | None,
        key: str | None = None,
    ) -> CdnFile:
        now = self.emu.clock.now()
        return self.add(
            file_name=file_name,
            content_type=content_type,
            source=BytesSource(data),
            kind="upload",
            request_id=None,
            created_at=now,
            expires_at=self._expiry(now, expires_in),
            acl=acl,
            key=key,
        )

    async def _multipart_create(self, request: Request) -> Response:
        self.check_token(request)
        file_name = safe_file_name(request.headers.get("x-fal-file-name"), "upload.bin")
        upload = _Pending(
            self.new_key(file_name),
            file_name,
            request.headers.get("content-type", "application/octet-stream"),
            *self.upload_lifecycle(request, LIFECYCLE),
        )
        upload_id = secrets.token_hex(12)
        self._multipart[upload_id] = upload
        return json_response(
            200, {"access_url": self.files_url + quote(upload.key), "uploadId": upload_id}
        )

    async def _multipart_part(self, request: Request, key: str, rest: str) -> Response:
        self.check_token(request)
        upload_id, _, step = rest.partition("/")
        upload = self._multipart.get(upload_id)
        if upload is None or upload.key != key:
            raise HttpError(404, {"detail": "Unknown multipart upload"})
        if step == "complete" and request.method == "POST":
            return await self._multipart_complete(request, upload_id, upload)
        if not step.isdigit() or request.method != "PUT":
            raise HttpError(404, {"detail": "Not found"})
        data = await request.body()
        upload.parts[int(step)] = data
        return json_response(200, {"partNumber": int(step)}, headers={"etag": f'"{_md5(data)}"'})

    async def _multipart_complete(
        self, request: Request, upload_id: str, upload: _Pending
    ) -> Response:
        body = await request.json()
        parts = body.get("parts") if isinstance(body, dict) else None
        if not isinstance(parts, list) or not parts:
            raise HttpError(422, {"detail": "expected {parts: [{partNumber, etag}]}"})
        ordered: list[bytes] = []
        for part in sorted(parts, key=lambda p: int(p.get("partNumber", 0))):
            number = int(part.get("partNumber", 0))
            data = upload.parts.get(number)
            if data is None or str(part.get("etag", "")).strip('"') != _md5(data):
                raise HttpError(400, {"detail": f"part {number} is missing or its etag differs"})
            ordered.append(data)
        del self._multipart[upload_id]
        added = self._store_upload(
            upload.file_name,
            upload.content_type,
            b"".join(ordered),
            upload.expires_in,
            upload.acl,
            upload.key,
        )
        return json_response(200, {"access_url": added.url})

    async def _slot_put(self, request: Request, token: str) -> Response:
        slot = self._slots.pop(token, None)
        if slot is None:
            raise HttpError(403, {"detail": "Upload URL is invalid or was already used"})
        data = await request.body()
        self._store_upload(
            slot.file_name, slot.content_type, data, slot.expires_in, slot.acl, slot.key
        )
        return json_response(200, {})

    def serve(self, request: Request, key: str) -> Response:
        now = self.emu.clock.now()
        found = self.files.get(key)
        if found is None or not found.live(now):
            raise HttpError(404, {"detail": "File not found"})
        status = self.access(found, request.arg("identity"), now)
        if status == 403:
            raise HttpError(403, {"detail": "Access denied"})
        if status == 404:
            raise HttpError(404, {"detail": "File not found"})
        size = found.source.size
        start, end, status = 0, size, 200
        etag = hashlib.sha256(key.encode()).hexdigest()[:32]
        headers = {"accept-ranges": "bytes", "etag": f'"{etag}"'}
        wanted = _parse_range(request.headers.get("range"), size)
        if wanted is not None:
            start, end, status = wanted[0], wanted[1], 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        truncate = request.method == "GET" and self.emu.faults.draw("truncated_download")
        return Response(
            status,
            content_type=found.content_type.encode("latin-1"),
            headers=headers,
            stream=_body(found.source, start, end, truncate, request.method == "HEAD"),
            content_length=end - start,
        )


async def _body(
    source: FileSource, start: int, end: int, truncate: bool, head: bool
) -> AsyncGenerator[bytes, None]:
    if head:
        return
    # A truncated answer stops half-way (at least one byte short) and drops the connection.
    stop = start + (end - start) // 2 if truncate else end
    for chunk in source.iter_range(start, stop):
        yield chunk
        await asyncio.sleep(0)  # let other requests in between 1 MiB chunks
    if truncate:
        raise AbortConnection


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for one ``bytes=`` range, or None to send it all (no header,
    several ranges or a malformed one, as RFC 9110 allows). Raises 416 when unsatisfiable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header.removeprefix("bytes=").strip().partition("-")
    try:
        if first:
            start, end = int(first), (int(last) + 1 if last else size)
        else:
            start, end = size - int(last), size
    except ValueError:
        return None
    if start >= size or end <= start or (not first and int(last) <= 0):
        raise HttpError(
            416, {"detail": "Range not satisfiable"}, {"content-range": f"bytes */{size}"}
        )
    return max(0, start), min(end, size)
