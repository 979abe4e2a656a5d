"""The doctor flow: check the fal account's own retention defaults against the policy.

Deploy it next to the pipelines (``entrypoint: falflow.flows.doctor.doctor``) to be told when
someone changes the account's defaults. Run it by hand with ``falflow doctor``::

    from falflow.flows.doctor import doctor

    report = await doctor()  # fails, listing what to fix, when the account keeps files
                             # forever or public, or a key cannot list, delete or hide
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from falflow.tasks.doctor import AccountNotReady, doctor_task


@flow(name="falflow-doctor")
async def doctor(apply: bool = False, fal_credentials: str | None = None) -> dict[str, Any]:
    """Report the account's storage defaults and the keys' permissions beside the policy.

    ``apply`` first sets the account's defaults to the policy (``PUT /v1/storage/settings``).
    ``fal_credentials`` names a ``FalCredentials`` block to check instead of the environment's
    keys (:mod:`falflow.settings.blocks`).

    Raises:
        AccountNotReady: something does not fit; the message says what to fix.
    """
    report = await doctor_task(apply, fal_credentials)
    if not report.ok:
        raise AccountNotReady(report)
    return report.model_dump(mode="json")
