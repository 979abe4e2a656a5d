"""The fal account against the retention policy: what fal keeps when falflow does not say.

fal stores every new CDN file under the account's defaults (``GET /v1/storage/settings``) unless
the request says otherwise: files uploaded by other tools, or any request sent without falflow,
live forever and public unless the account says otherwise. :func:`check_account` reads those
defaults and probes what the configured keys may do, side by side with the policy;
``apply=True`` sets the account's defaults to the policy (``PUT /v1/storage/settings``).

Example::

    report = await check_account(load_settings())
    print("\\n".join(report.lines()))
"""

from __future__ import annotations

import uuid

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from falflow.settings import Settings, load_settings
from falflow.settings.blocks import with_blocks
from falflow.tasks.models import JSON
from falflow.tasks.platform import ACL_PERMITTED, PlatformClient, PlatformError
from falflow.tasks.runtime import http_client, platform_client, require_fal_key


class Check(BaseModel):
    """One thing ``falflow doctor`` looked at."""

    name: str
    ok: bool
    found: str
    fix: str = ""


class DoctorReport(BaseModel):
    before: JSON
    """The account's storage settings as read."""
    after: JSON | None = None
    """The account's storage settings after ``apply`` (None: nothing was changed)."""
    policy: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def lines(self) -> list[str]:
        lines = [f"policy       {self.policy}", f"account      {_describe(self.before)}"]
        if self.after is not None:
            lines.append(f"applied      {_describe(self.after)}")
        for check in self.checks:
            mark = "ok  " if check.ok else "FAIL"
            lines.append(f"{mark} {check.name}: {check.found}")
            if check.fix and not check.ok:
                lines.append(f"     fix: {check.fix}")
        return lines


async def check_account(settings: Settings, *, apply: bool = False) -> DoctorReport:
    """Read the account's storage defaults and probe the keys; with ``apply``, first set the
    defaults to the policy (media TTL, and non-public unless ``private_outputs`` is off).

    Raises:
        SettingsError: no fal key is configured.
    """
    require_fal_key(settings)
    async with http_client(settings, 8) as http:
        platform = platform_client(settings, http)
        before = await _storage_settings(platform)
        after = None
        if apply and before is not None:
            after = await platform.put_storage_settings(wanted_account_settings(settings))
        checks = [
            *_account_checks(settings, after if after is not None else before),
            await _listing_check(platform),
            await _deletion_check(platform),
            await _acl_check(platform, settings),
        ]
    policy = settings.retention
    return DoctorReport(
        before=before or {},
        after=after,
        policy=(
            f"media TTL {_ttl(policy.media_ttl_seconds)}, store_io {'on' if policy.store_io else 'off'}, "
            f"private outputs {_private(policy.private_outputs)}"
        ),
        checks=checks,
    )


def wanted_account_settings(settings: Settings) -> JSON:
    """The account defaults the policy asks for (the whole object: PUT replaces it)."""
    policy = settings.retention
    return {
        "expiration_duration_seconds": policy.media_ttl_seconds,
        "initial_acl": {
            "default": "allow" if policy.private_outputs is False else "forbid",
            "rules": [],
        },
    }


async def _storage_settings(platform: PlatformClient) -> JSON | None:
    try:
        return await platform.storage_settings()
    except PlatformError:
        return None


def _account_checks(settings: Settings, account: JSON | None) -> list[Check]:
    if account is None:
        return [
            Check(
                name="account storage settings",
                ok=False,
                found="cannot be read with FAL_KEY",
                fix="give the key the account:settings:read permission",
            )
        ]
    apply = "run `falflow doctor --apply` (sets the account's defaults to the policy)"
    ttl = account.get("expiration_duration_seconds")
    acl = account.get("initial_acl")
    default = acl.get("default") if isinstance(acl, dict) else None
    public = default in (None, "allow")
    return [
        Check(
            name="account default media TTL",
            ok=isinstance(ttl, int),
            found=(
                f"{_ttl(ttl)}: files stored without falflow's lifecycle header expire"
                if isinstance(ttl, int)
                else "never: files stored without falflow's lifecycle header stay forever"
            ),
            fix=apply,
        ),
        Check(
            name="account default ACL",
            ok=not public or settings.retention.private_outputs is False,
            found=(
                "public: new files are readable by anyone with the URL"
                if public
                else f"{default}: new files are not public"
            ),
            fix=apply,
        ),
    ]


async def _listing_check(platform: PlatformClient) -> Check:
    status = await _status(
        platform,
        "GET",
        "/models/requests/by-endpoint",
        admin=False,
        params={"endpoint_id": "fal-ai/flux/schnell", "limit": 1},
    )
    return Check(
        name="request listing (FAL_KEY)",
        ok=status == 200,
        found="works" if status == 200 else f"answered {status}",
        fix="FAL_KEY must be a valid fal API key: lost submits and the janitor need the listing",
    )


async def _deletion_check(platform: PlatformClient) -> Check:
    probe = f"falflow-doctor-{uuid.uuid4().hex}"  # no such request: nothing is deleted
    status = await _status(platform, "DELETE", f"/models/requests/{probe}/payloads", admin=True)
    allowed = status in (400, 404)
    return Check(
        name="payload deletion (FAL_ADMIN_KEY)",
        ok=allowed,
        found="allowed" if allowed else f"answered {status}",
        fix="set FAL_ADMIN_KEY to a key with admin scope: without it nothing is deleted from fal",
    )


async def _acl_check(platform: PlatformClient, settings: Settings) -> Check:
    status = await platform.acl_status(settings.fal.cdn_url)
    allowed = status in ACL_PERMITTED
    return Check(
        name="file ACLs and signed URLs",
        ok=allowed or settings.retention.private_outputs is False,
        found="allowed" if allowed else f"answered {status}: outputs stay public until cleanup",
        fix="give the key the assets:read and assets:write permissions (private outputs, hiding "
        "what fal cannot delete), or set FALFLOW_RETENTION__PRIVATE_OUTPUTS=false",
    )


async def _status(platform: PlatformClient, method: str, path: str, **kwargs: object) -> int:
    try:
        return await platform.probe(method, path, **kwargs)  # type: ignore[arg-type]
    except PlatformError:
        return 0


def _ttl(seconds: object) -> str:
    return "never" if seconds is None else f"{seconds} s"


def _private(value: bool | None) -> str:
    return {None: "auto", True: "on", False: "off"}[value]


def _describe(account: JSON) -> str:
    acl = account.get("initial_acl")
    default = acl.get("default") if isinstance(acl, dict) else "public (system default)"
    return f"media TTL {_ttl(account.get('expiration_duration_seconds'))}, default ACL {default}"


class AccountNotReady(RuntimeError):
    """The account or the keys do not fit the policy; the message says what to fix."""

    def __init__(self, report: DoctorReport) -> None:
        self.report = report
        super().__init__("\n".join(["the fal account does not fit the policy:", *report.lines()]))


@task(name="doctor", cache_policy=NONE, persist_result=False)
async def doctor_task(apply: bool = False, fal_credentials: str | None = None) -> DoctorReport:
    """:func:`check_account` as a Prefect task (settings from the environment and the blocks it
    or ``fal_credentials`` names, as every flow reads them: never a task parameter, which the
    Prefect API would store)."""
    settings = await with_blocks(load_settings(), fal_credentials=fal_credentials)
    return await check_account(settings, apply=apply)
