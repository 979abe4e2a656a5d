"""The fal webhook receiver: verifies fal's Ed25519 signatures and emits Prefect events.

Run it with ``falflow webhooks serve`` (or :func:`serve`); point fal at it with
``?fal_webhook=https://<your host>/fal/webhook``. On Prefect OSS there are no Prefect webhooks:
this receiver turns fal's deliveries into ``fal.request.completed`` / ``fal.request.failed``
events that automations and deployment triggers can react to.
"""

from falflow.webhooks.app import (
    COMPLETED_EVENT,
    FAILED_EVENT,
    EventSink,
    RecentIds,
    create_app,
    default_events_client,
    event_id,
    jwks_url,
    request_event,
)
from falflow.webhooks.server import serve, server_config
from falflow.webhooks.signature import (
    JwksCache,
    JwksUnavailable,
    SignedDelivery,
    WebhookRejected,
    parse_jwks,
    verify_delivery,
)

__all__ = [
    "COMPLETED_EVENT",
    "FAILED_EVENT",
    "EventSink",
    "JwksCache",
    "JwksUnavailable",
    "RecentIds",
    "SignedDelivery",
    "WebhookRejected",
    "create_app",
    "default_events_client",
    "event_id",
    "jwks_url",
    "parse_jwks",
    "request_event",
    "serve",
    "server_config",
    "verify_delivery",
]
