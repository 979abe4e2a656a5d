"""A local fal: queue, CDN, uploads, Platform API and webhooks on one HTTPS server with its own
throwaway CA, spoken to by the unmodified ``fal_client``, with fault injection.

Example:
    ```python
    from falflow.emulator import EmulatorConfig, start_emulator
    from falflow.tasks.falhosts import configure_fal_client

    with start_emulator(EmulatorConfig(latency_seconds=0.01)) as fal:
        configure_fal_client(fal.fal_settings())
        ...  # fal_client.AsyncClient(key=fal.api_key) now talks to the emulator
        fal.inventory()  # what the emulator still stores
    ```
"""

from falflow.emulator.app import Emulator
from falflow.emulator.config import Acl, AclRule, EmulatorConfig, Faults, StorageSettings
from falflow.emulator.models import MODELS
from falflow.emulator.server import (
    RunningEmulator,
    export_lines,
    serve,
    start_emulator,
    start_emulator_process,
)
from falflow.emulator.tls import build_ca_bundle
from falflow.emulator.webhooks import WebhookDelivery, webhook_body

__all__ = [
    "MODELS",
    "Acl",
    "AclRule",
    "Emulator",
    "EmulatorConfig",
    "Faults",
    "RunningEmulator",
    "StorageSettings",
    "WebhookDelivery",
    "build_ca_bundle",
    "export_lines",
    "serve",
    "start_emulator",
    "start_emulator_process",
    "webhook_body",
]
