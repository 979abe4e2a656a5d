"""Prefect blocks: fal credentials, and the bucket taken from a block a team already keeps.

Environment variables stay the default; a block named in the settings
(``FALFLOW_FAL__CREDENTIALS_BLOCK``, ``FALFLOW_BUCKET__BLOCK``) or passed to a deployable flow
(``run_pipeline(..., fal_credentials="prod", bucket_block="s3-bucket/archive")``) replaces them
for that run, so one deployment serves several tenants. Keys read from blocks follow the same
rules as keys from the environment: ``SecretStr`` everywhere, redacted from every error, never in
the ledger, logs or artifacts.

The bucket block is ``<block type slug>/<name>``: an ``S3Bucket`` (``s3-bucket/…``, prefect-aws:
its bucket, folder and credentials, AWS or MinIO) or ``AwsCredentials`` / ``MinIOCredentials``
(``aws-credentials/…``: only the credentials, for ``FALFLOW_BUCKET__URL``). prefect-aws is an
extra: ``pip install 'falflow[aws]'``.

Example:
    ```python
    from prefect import flow

    from falflow import FalCredentials, retention_scope, generate
    from falflow.settings import load_settings
    from falflow.settings.blocks import with_blocks

    FalCredentials(api_key="...", admin_key="...").save("prod")  # once, or in the UI


    @flow
    async def nightly() -> None:
        settings = await with_blocks(
            load_settings(), fal_credentials="prod", bucket="s3-bucket/archive"
        )
        async with retention_scope(settings):
            generate("fal-ai/flux/schnell", {"prompt": "a lighthouse at dusk"})
    ```
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from falflow.settings.loading import SettingsError
from falflow.settings.models import BucketSettings, Settings


class FalCredentials(Block):
    """fal API keys: ``api_key`` submits requests, ``admin_key`` (an ADMIN-scoped key, default:
    ``api_key``) deletes payloads and files through the Platform API.

    Example:
        ```python
        from falflow import FalCredentials

        FalCredentials(api_key="key-id:secret").save("prod")
        keys = await FalCredentials.aload("prod")
        ```
    """

    _block_type_name: ClassVar[str | None] = "fal Credentials"
    _block_type_slug: ClassVar[str | None] = "fal-credentials"
    _description: ClassVar[str | None] = (
        "fal API keys for falflow: the key that submits requests, and an ADMIN key for deleting "
        "fal's copies once falflow has archived them."
    )
    _documentation_url: ClassVar[Any] = "https://docs.fal.ai/model-apis/authentication"

    api_key: SecretStr = Field(description="A fal API key (FAL_KEY).")
    admin_key: SecretStr | None = Field(
        default=None,
        description="An ADMIN-scoped fal key for deletions (FAL_ADMIN_KEY); empty: the API key.",
    )


async def with_blocks(
    settings: Settings, *, fal_credentials: str | None = None, bucket: str | None = None
) -> Settings:
    """``settings`` with the fal keys and the bucket read from blocks: ``fal_credentials`` and
    ``bucket`` (block names) win over ``fal.credentials_block`` and ``bucket.block``; with no
    block named, ``settings`` unchanged (and no call to the Prefect API).

    Raises:
        SettingsError: a block does not exist, is of the wrong type, or cannot be used (the
            message names it, never a secret).
    """
    fal_credentials = fal_credentials or settings.fal.credentials_block
    bucket = bucket or settings.bucket.block
    update: dict[str, Any] = {}
    if fal_credentials:
        keys = await _load(FalCredentials, fal_credentials, "FALFLOW_FAL__CREDENTIALS_BLOCK")
        update |= {"fal_key": keys.api_key, "fal_admin_key": keys.admin_key}
    if bucket:
        block = await _load(Block, bucket, "FALFLOW_BUCKET__BLOCK")
        update["bucket"] = bucket_settings(block, settings.bucket, bucket)
    if not update:
        return settings
    try:
        return Settings.model_validate(settings.model_dump() | update)
    except ValueError as exc:
        raise SettingsError(f"settings from blocks are not usable: {exc}") from None


def bucket_settings(block: Block, base: BucketSettings, name: str) -> BucketSettings:
    """The obstore settings of a prefect-aws block: an ``S3Bucket`` gives the URL and
    credentials, a credentials block only the credentials (for ``base.url``).

    Raises:
        SettingsError: a block falflow cannot read a bucket from.
    """
    try:
        from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket
    except ImportError:
        raise SettingsError(
            f"FALFLOW_BUCKET__BLOCK={name}: reading bucket blocks needs prefect-aws: "
            "pip install 'falflow[aws]'"
        ) from None
    url = base.url
    credentials: Any = block
    if isinstance(block, S3Bucket):
        folder = block.bucket_folder.strip("/")
        url = f"s3://{block.bucket_name}" + (f"/{folder}" if folder else "")
        credentials = block.credentials
    elif not url.startswith("s3://"):
        raise SettingsError(
            f"FALFLOW_BUCKET__BLOCK={name}: a credentials block needs an s3:// "
            f"FALFLOW_BUCKET__URL (got {url!r}); or name an S3Bucket block"
        )
    if isinstance(credentials, AwsCredentials):
        if credentials.profile_name or credentials.assume_role_arn:
            raise SettingsError(
                f"FALFLOW_BUCKET__BLOCK={name}: AWS profiles and assumed roles are not read "
                "from blocks; give the block an access key, or leave the keys to the environment"
            )
        key_id, secret = credentials.aws_access_key_id, credentials.aws_secret_access_key
        token = credentials.aws_session_token
        region = credentials.region_name
    elif isinstance(credentials, MinIOCredentials):
        key_id, secret = credentials.minio_root_user, credentials.minio_root_password
        token, region = None, credentials.region_name
    else:
        raise SettingsError(
            f"FALFLOW_BUCKET__BLOCK={name}: a {type(block).__name__} block holds no bucket "
            "falflow can use: name an S3Bucket, AwsCredentials or MinIOCredentials block"
        )
    endpoint = credentials.aws_client_parameters.endpoint_url
    return BucketSettings.model_validate(
        base.model_dump()
        | {
            "url": url,
            "block": None,
            "access_key_id": SecretStr(key_id) if key_id else None,
            "secret_access_key": secret,
            "session_token": SecretStr(token) if token else None,
            "region": region or base.region,
            "endpoint": endpoint or base.endpoint,
            "allow_http": base.allow_http or bool(endpoint and endpoint.startswith("http://")),
        }
    )


B = TypeVar("B", bound=Block)


async def _load(kind: type[B], name: str, variable: str) -> B:
    try:
        found = await kind.aload(name)
    except ValueError as exc:  # Prefect: no such block, or an unknown block type
        raise SettingsError(f"{variable}={name}: {exc}") from None
    if not isinstance(found, kind):
        raise SettingsError(f"{variable}={name} is a {type(found).__name__}, not {kind.__name__}")
    return found
