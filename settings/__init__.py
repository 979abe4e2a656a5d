"""falflow settings: pydantic-settings models, the only place configuration is read."""

from falflow.settings.loading import SettingsError, env_name, load_settings
from falflow.settings.models import (
    MIN_MEDIA_TTL_SECONDS,
    BucketSettings,
    FalSettings,
    LimitSettings,
    RetentionOverride,
    RetentionPolicy,
    RetentionSettings,
    Settings,
    WebhookSettings,
    apply_override,
)

__all__ = [
    "MIN_MEDIA_TTL_SECONDS",
    "BucketSettings",
    "FalSettings",
    "LimitSettings",
    "RetentionOverride",
    "RetentionPolicy",
    "RetentionSettings",
    "Settings",
    "SettingsError",
    "WebhookSettings",
    "apply_override",
    "env_name",
    "load_settings",
]
