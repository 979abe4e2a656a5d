"""Settings: read once from env/.env, invalid values fail at load naming the variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falflow.settings import MIN_MEDIA_TTL_SECONDS, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts from an empty falflow environment in a directory without a .env."""
    import os

    for name in list(os.environ):
        if name.startswith("FALFLOW_") or name in ("FAL_KEY", "FAL_ADMIN_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_point_at_real_fal_and_a_local_bucket() -> None:
    s = load_settings()
    assert s.fal.queue_host == "queue.fal.run"
    assert s.fal.platform_url == "https://api.fal.ai/v1"
    assert s.bucket.url.startswith("file://")
    assert s.fal_key is None
    policy = s.retention.policy_for("fal-ai/flux/dev")
    assert policy.media_ttl_seconds == 7 * 24 * 3600
    assert policy.headers() == {
        "X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": 604800}),
        "X-Fal-Store-IO": "1",
    }


def test_fal_key_is_read_from_its_standard_name_and_never_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAL_KEY", "key-id:very-secret")
    s = load_settings()
    assert s.fal_key is not None
    assert s.fal_key.get_secret_value() == "key-id:very-secret"
    assert s.delete_key == s.fal_key
    assert "very-secret" not in repr(s)
    assert "very-secret" not in str(s.model_dump())


def test_nested_env_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "FALFLOW_BUCKET__URL=s3://archive/falflow\nFALFLOW_LIMITS__DELETES=3\n"
    )
    monkeypatch.setenv("FALFLOW_LIMITS__DELETES", "5")  # the environment wins over .env
    s = load_settings()
    assert s.bucket.url == "s3://archive/falflow"
    assert s.limits.deletes == 5


def test_per_endpoint_overrides_match_by_glob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FALFLOW_RETENTION__OVERRIDES",
        json.dumps(
            {
                "fal-ai/kling-video/*": {"never_expire": True, "priority": "low"},
                "fal-ai/flux/*": {"store_io": False, "media_ttl_seconds": 3600},
            }
        ),
    )
    s = load_settings()
    video = s.retention.policy_for("fal-ai/kling-video/v2.1/standard/image-to-video")
    assert video.media_ttl_seconds is None
    assert video.priority == "low"
    assert video.headers()["X-Fal-Object-Lifecycle-Preference"] == (
        '{"expiration_duration_seconds": null}'
    )
    flux = s.retention.policy_for("fal-ai/flux/schnell")
    assert flux.headers()["X-Fal-Store-IO"] == "0"
    assert flux.media_ttl_seconds == 3600
    assert s.retention.policy_for("fal-ai/esrgan").media_ttl_seconds == 604800


@pytest.mark.parametrize("value", ["never", "null", ""])
def test_ttl_never(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FALFLOW_RETENTION__MEDIA_TTL_SECONDS", value)
    assert load_settings().retention.media_ttl_seconds is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FALFLOW_RETENTION__MEDIA_TTL_SECONDS", "30", f"at least {MIN_MEDIA_TTL_SECONDS} seconds"),
        ("FALFLOW_RETENTION__MEDIA_TTL_SECONDS", "soon", "whole seconds or 'never'"),
        ("FALFLOW_RETENTION__UPLOAD_TTL_SECONDS", "10", f"at least {MIN_MEDIA_TTL_SECONDS}"),
        ("FALFLOW_RETENTION__START_TIMEOUT_SECONDS", "1", "more than 1 second"),
        ("FALFLOW_RETENTION__PRIORITY", "urgent", "'normal' or 'low'"),
        ("FALFLOW_BUCKET__URL", "ftp://host/x", "unknown bucket scheme 'ftp'"),
        ("FALFLOW_BUCKET__URL", "s3://", "needs a bucket name"),
        ("FALFLOW_FAL__PLATFORM_URL", "http://api.fal.ai/v1", "https://"),
        ("FALFLOW_FAL__CA_BUNDLE", "/nonexistent/ca.pem", "no such file"),
        ("FALFLOW_LIMITS__DELETES", "0", "greater than or equal to 1"),
        ("FALFLOW_LIMITS__MAX_POLL_INTERVAL_SECONDS", "0.1", "max_poll_interval_seconds"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert expected in message
    if "MAX_POLL" not in variable:  # a cross-field rule names both fields in its text instead
        assert variable in message


def test_unknown_override_field_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALFLOW_RETENTION__OVERRIDES", '{"fal-ai/*": {"ttl": 60}}')
    with pytest.raises(SettingsError, match="FALFLOW_RETENTION__OVERRIDES__FAL-AI/\\*__TTL"):
        load_settings()


def test_errors_never_echo_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALFLOW_BUCKET__SECRET_ACCESS_KEY", "hunter2-secret")
    monkeypatch.setenv("FALFLOW_BUCKET__URL", "nope://x")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "hunter2-secret" not in str(info.value)
    assert info.value.__cause__ is None  # no chained pydantic error carrying the input
    assert info.value.__context__ is None or info.value.__suppress_context__


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_an_empty_or_blank_fal_key_is_no_key(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FAL_KEY", value)
    monkeypatch.setenv("FAL_ADMIN_KEY", value)
    settings = load_settings()
    assert settings.fal_key is None
    assert settings.delete_key is None


def test_a_fal_key_no_header_can_carry_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAL_KEY", "abc-secret-123\nX-Injected: 1")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "FAL_KEY: is not a usable fal key" in str(info.value)
    assert "abc-secret-123" not in str(info.value)
    monkeypatch.setenv("FAL_KEY", "  key-with-spaces-around  ")
    key = load_settings().fal_key
    assert key is not None
    assert key.get_secret_value() == "key-with-spaces-around"
