"""Blocks on the test harness: the sample runs with its fal keys from a ``FalCredentials`` block
and its bucket from a prefect-aws ``S3Bucket`` block on a moto server, with nothing of either in
the environment; the block-held secrets reach no log, artifact, ledger record or the API's
database. Bad block names are refused naming the setting."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from falflow.emulator import RunningEmulator
from falflow.flows.pipeline import run_pipeline
from falflow.settings import SettingsError, load_settings
from falflow.settings.blocks import FalCredentials, with_blocks
from falflow.tasks.store import open_bucket
from tests.support.fixtures import S3_BUCKET

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def blocks(emulator: RunningEmulator, moto_endpoint: str) -> dict[str, str]:
    """A FalCredentials block holding the emulator's keys and an S3Bucket block on moto, under
    fresh names; what the test may look for."""
    tag = uuid.uuid4().hex[:8]
    secret = f"block-bucket-secret-{tag}"
    FalCredentials(
        api_key=SecretStr(emulator.api_key), admin_key=SecretStr(emulator.admin_key)
    ).save(f"tenant-{tag}")
    credentials = AwsCredentials(
        aws_access_key_id=f"block-key-id-{tag}",
        aws_secret_access_key=SecretStr(secret),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint),
    )
    S3Bucket(bucket_name=S3_BUCKET, bucket_folder=f"tenant-{tag}", credentials=credentials).save(
        f"archive-{tag}"
    )
    return {
        "tag": tag,
        "fal": f"tenant-{tag}",
        "bucket": f"s3-bucket/archive-{tag}",
        "secret": secret,
    }


@pytest.fixture
def no_env_keys(emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator's hosts, and no key or bucket in the environment: only the blocks have them."""
    for name, value in emulator.client_env().items():
        if name not in ("FAL_KEY", "FAL_ADMIN_KEY"):
            monkeypatch.setenv(name, value)
    for name in ("FAL_KEY", "FAL_ADMIN_KEY", "FALFLOW_BUCKET__URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FALFLOW_LIMITS__POLL_INTERVAL_SECONDS", "0.05")


async def _artifacts(flow_run_id: uuid.UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _database() -> list[Path]:
    url = make_url(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    assert url.database
    path = Path(url.database)
    return sorted(path.parent.glob(path.name + "*"))


@pytest.mark.usefixtures("no_env_keys")
def test_a_run_takes_its_keys_and_bucket_from_blocks_and_never_leaks_them(
    emulator: RunningEmulator, blocks: dict[str, str], all_logs: list[str]
) -> None:
    called = run_pipeline(
        "sample",
        {"prompts": ["a red fox"]},
        run_key=f"blocks-{blocks['tag']}",
        fal_credentials=blocks["fal"],
        bucket_block=blocks["bucket"],
        return_state=True,
    )
    state: State[Any] = asyncio.run(called)  # type: ignore[arg-type]
    assert state.is_completed(), state.message
    summary = asyncio.run(state.aresult())
    assert summary["bucket"] == f"s3://{S3_BUCKET}/tenant-{blocks['tag']}"
    assert summary["deleted"] == 3

    settings = asyncio.run(with_blocks(load_settings(), bucket=blocks["bucket"]))
    bucket = open_bucket(settings.bucket)

    async def stored() -> dict[str, bytes]:
        import obstore

        keys = [o["path"] for batch in obstore.list(bucket.store) for o in batch]
        return {
            k: bytes(await (await obstore.get_async(bucket.store, k)).bytes_async()) for k in keys
        }

    objects = asyncio.run(stored())
    assert any("/files/" in key for key in objects), sorted(objects)
    assert any(key.startswith("ledger/") for key in objects)

    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    artifacts = json.dumps(
        [a.model_dump(mode="json") for a in asyncio.run(_artifacts(flow_run_id))]
    )
    assert f"s3://{S3_BUCKET}/tenant-{blocks['tag']}/runs/" in artifacts
    ledger = b"".join(v for k, v in objects.items() if k.endswith(".json"))
    for secret in (emulator.api_key, emulator.admin_key, blocks["secret"]):
        assert secret not in "\n".join(all_logs)
        assert secret not in artifacts
        assert secret.encode() not in ledger
        # block documents are stored encrypted: the database never holds the plain value
        assert [p for p in _database() if secret.encode() in p.read_bytes()] == []


def test_unknown_or_wrong_blocks_are_refused_naming_the_setting(blocks: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="FALFLOW_FAL__CREDENTIALS_BLOCK=nobody"):
        asyncio.run(with_blocks(load_settings(), fal_credentials="nobody"))
    with pytest.raises(SettingsError, match=r"FALFLOW_BUCKET__BLOCK=.*needs an s3://"):
        asyncio.run(
            with_blocks(
                load_settings(bucket={"url": "file:///tmp/x"}),
                bucket=f"fal-credentials/{blocks['fal']}",
            )
        )
    settings = load_settings(fal_key="from-env")
    assert asyncio.run(with_blocks(settings)) is settings  # no block named: no API call
