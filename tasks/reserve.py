"""Inputs whose fal copy falflow already deleted are served again, from the archive.

A request's arguments may name an earlier step's output by its fal URL. When that output's fal
copy is gone — a re-run with changed downstream arguments, a late reader, a step that failed on
a dead input — falflow submits the archived copy instead: a presigned URL from the bucket where
the store can sign (S3, GCS, Azure; valid :data:`PRESIGNED_SECONDS`), else (a local directory) a
fresh upload to fal with the policy's upload TTL, hidden when the run's scope ends. A request
never gets a dead URL. The substitution is recorded in the ledger (``reserved_inputs``: the fal
URL → the upload, or ``<bucket location> (presigned)`` — a signature is a credential and is
never kept); the job id, ``input.json`` and lost-submit matching keep the original arguments.
"""

from __future__ import annotations

from falflow.tasks.cleanup import gone_from_fal
from falflow.tasks.models import JSON, ArchivedObject, JobRecord, JobState
from falflow.tasks.outputs import iter_strings, rewrite_urls
from falflow.tasks.runtime import Runtime
from falflow.tasks.signing import fal_file, unsigned
from falflow.tasks.uploads import upload_input

PRESIGNED_SECONDS = 3600
"""Lifetime of a presigned bucket URL handed to fal: past fal's start deadline (default 600 s),
short enough that the URL in fal's stored input is soon useless."""


async def gone_sources(rt: Runtime) -> dict[str, ArchivedObject]:
    """This run's archived outputs whose fal copy is gone, by fal URL (read once per runtime)."""
    if rt.gone is None:
        rt.gone = {
            obj.source_url: obj
            async for record in rt.ledger.list(rt.run_key)
            if gone_from_fal(record)
            for obj in record.objects
        }
    return rt.gone


async def dead_inputs(rt: Runtime, arguments: JSON) -> dict[str, ArchivedObject]:
    """The fal URLs in ``arguments`` whose file falflow archived and then deleted from fal."""
    hosts = rt.settings.fal.cdn_hosts
    urls = {unsigned(url, hosts) for url in iter_strings(arguments) if fal_file(url, hosts)}
    if not urls:
        return {}
    gone = await gone_sources(rt)
    return {url: gone[url] for url in urls if url in gone}


async def live_arguments(rt: Runtime, record: JobRecord, arguments: JSON) -> tuple[JSON, JobRecord]:
    """``arguments`` with every dead fal URL replaced by a fresh upload of its archived copy,
    and ``record`` noting the replacements (unchanged when there were none)."""
    dead = await dead_inputs(rt, arguments)
    if not dead:
        return arguments, record
    recorded = dict(record.reserved_inputs)
    served: dict[str, str] = {}
    for url, archived in dead.items():
        presigned = await rt.bucket.signed_get(archived.key, PRESIGNED_SECONDS)
        if presigned is not None:
            served[url] = presigned
            recorded[url] = f"{rt.bucket.location(archived.key)} (presigned)"
            continue
        if url in recorded:  # uploaded by an earlier attempt
            served[url] = recorded[url]
            continue
        data = await rt.bucket.get_bytes(archived.key)
        if data is None:
            continue  # not in the bucket any more: fal will say the input is unreachable
        name = archived.key.rsplit("/", 1)[-1].split("-", 1)[-1]
        served[url] = recorded[url] = await upload_input(
            rt, data, content_type=archived.content_type, file_name=name, policy=record.policy
        )
    record = await rt.ledger.put(record.model_copy(update={"reserved_inputs": recorded}))
    return rewrite_urls(arguments, served), record


def failed_on_a_dead_input(record: JobRecord) -> bool:
    """fal failed the request because it could not download an input (falflow may have handed
    it a URL it had deleted): worth submitting again with live inputs, once the failed request
    itself is gone from fal (its payloads would otherwise lose their only ledger record)."""
    return (
        record.state is JobState.FAILED
        and record.error_type == "file_download_error"
        and record.deletion is not None
        and record.deletion.confirmed_at is not None
    )
