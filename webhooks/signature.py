"""Verifying fal's webhook signatures (docs/fal-protocol.md §7) against fal's published JWKS.

A delivery is genuine when all four ``X-Fal-Webhook-*`` headers are present, its timestamp is
within the tolerance of now, and one of fal's Ed25519 keys verifies the signature over
``request_id \\n user_id \\n timestamp \\n hex(sha256(raw body))``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

REQUEST_ID_HEADER = "X-Fal-Webhook-Request-Id"
USER_ID_HEADER = "X-Fal-Webhook-User-Id"
TIMESTAMP_HEADER = "X-Fal-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Fal-Webhook-Signature"
_HEADERS = (REQUEST_ID_HEADER, USER_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)


class WebhookRejected(Exception):
    """A delivery that must not be acted on; ``status_code`` is what the receiver answers."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason


class JwksUnavailable(Exception):
    """fal's signing keys could not be fetched: answer 503 so fal delivers again later."""


@dataclass(frozen=True)
class SignedDelivery:
    """The signed parts of one webhook delivery, parsed from its headers and raw body."""

    request_id: str
    user_id: str
    timestamp: int
    signature: bytes
    body: bytes

    @classmethod
    def parse(cls, headers: Mapping[str, str], body: bytes) -> SignedDelivery:
        """Raises WebhookRejected (400) when a header is missing or malformed."""
        missing = [name for name in _HEADERS if not headers.get(name)]
        if missing:
            raise WebhookRejected(400, f"missing header(s): {', '.join(missing)}")
        try:
            timestamp = int(headers[TIMESTAMP_HEADER])
        except ValueError:
            raise WebhookRejected(400, f"{TIMESTAMP_HEADER} is not Unix seconds") from None
        try:
            signature = bytes.fromhex(headers[SIGNATURE_HEADER])
        except ValueError:
            raise WebhookRejected(400, f"{SIGNATURE_HEADER} is not hex") from None
        return cls(
            request_id=headers[REQUEST_ID_HEADER],
            user_id=headers[USER_ID_HEADER],
            timestamp=timestamp,
            signature=signature,
            body=body,
        )

    @property
    def message(self) -> bytes:
        """The bytes fal signs."""
        digest = hashlib.sha256(self.body).hexdigest()
        return f"{self.request_id}\n{self.user_id}\n{self.timestamp}\n{digest}".encode()

    def check_fresh(self, now: float, tolerance_seconds: float) -> None:
        """Refuse deliveries from too far in the past (replays) or the future (401)."""
        if abs(now - self.timestamp) > tolerance_seconds:
            raise WebhookRejected(
                401, f"timestamp {self.timestamp} is more than {tolerance_seconds:g} s from now"
            )

    def verified_by(self, keys: tuple[Ed25519PublicKey, ...]) -> bool:
        for key in keys:
            try:
                key.verify(self.signature, self.message)
            except InvalidSignature:
                continue
            return True
        return False


def parse_jwks(document: object) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 keys of a JWKS document; other key types are skipped.

    Raises:
        ValueError: when the document holds no usable Ed25519 key.
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document has no 'keys' list")
    keys = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP":
            continue
        if entry.get("crv") != "Ed25519" or not isinstance(entry.get("x"), str):
            continue
        encoded = entry["x"]
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (binascii.Error, ValueError):
            continue
    if not keys:
        raise ValueError("JWKS document holds no Ed25519 (OKP) key")
    return tuple(keys)


class JwksCache:
    """fal's signing keys, fetched lazily and kept at most ``max_age_seconds``.

    A signature no cached key verifies may mean fal rotated its keys: ``refetch_for_unknown_key``
    fetches again, but at most once per ``refetch_interval_seconds`` (whatever other fetches
    happened meanwhile), so forged deliveries cannot turn the receiver into a JWKS request flood.
    """

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        max_age_seconds: float,
        refetch_interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._http = http
        self._max_age = max_age_seconds
        self._refetch_interval = refetch_interval_seconds
        self._clock = clock
        self._keys: tuple[Ed25519PublicKey, ...] = ()
        self._fetched_at = float("-inf")
        self._last_refetch = float("-inf")
        self._lock = anyio.Lock()
        self.fetches = 0
        """Number of fetch attempts (observability; tests assert on the refetch limit)."""

    async def keys(self) -> tuple[Ed25519PublicKey, ...]:
        """The cached keys, fetched first when there are none or they are too old."""
        async with self._lock:
            if not self._keys or self._clock() - self._fetched_at >= self._max_age:
                await self._fetch()
            return self._keys

    async def refetch_for_unknown_key(self) -> tuple[Ed25519PublicKey, ...] | None:
        """Fresh keys if the rate limit allows a fetch now, else None."""
        async with self._lock:
            now = self._clock()
            if now - self._last_refetch < self._refetch_interval:
                return None
            self._last_refetch = now
            await self._fetch()
            return self._keys

    async def _fetch(self) -> None:
        started = self._clock()
        self.fetches += 1
        try:
            response = await self._http.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            keys = parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            # A stale key set is never used past its age: fal retries the delivery later.
            self._keys = ()
            raise JwksUnavailable(
                f"could not load fal's signing keys from {self.url} ({type(exc).__name__}: {exc});"
                " check the JWKS URL (FALFLOW_WEBHOOKS__JWKS_URL) and network access"
            ) from None
        self._keys = keys
        self._fetched_at = started


async def verify_delivery(
    delivery: SignedDelivery,
    jwks: JwksCache,
    *,
    now: float,
    tolerance_seconds: float,
) -> None:
    """Raise WebhookRejected unless the delivery is fresh and signed by one of fal's keys.

    Raises:
        WebhookRejected: stale (401) or not verified by any key (401).
        JwksUnavailable: the keys could not be fetched (the receiver answers 503).
    """
    delivery.check_fresh(now, tolerance_seconds)
    if delivery.verified_by(await jwks.keys()):
        return
    fresh = await jwks.refetch_for_unknown_key()
    if fresh is not None and delivery.verified_by(fresh):
        return
    raise WebhookRejected(401, "signature is not valid for any of fal's published keys")
