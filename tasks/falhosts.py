"""Point the unmodified ``fal_client`` at the configured fal hosts: the one place that does it.

``fal_client`` reads its queue/run hosts from the environment at import time and hard-codes the
REST and CDN URLs as module globals, and trusts only what ``SSL_CERT_FILE`` names. Real fal needs
none of this; the emulator (or a proxy) needs all of it, so it is kept here and nowhere else.
"""

from __future__ import annotations

import os

import fal_client.client as _fal

from falflow.settings import FalSettings


def configure_fal_client(fal: FalSettings) -> None:
    """Make every later ``fal_client`` call go to ``fal``'s hosts and trust its CA bundle."""
    _fal.QUEUE_URL_FORMAT = f"https://{fal.queue_host}/"
    _fal.RUN_URL_FORMAT = f"https://{fal.run_host}/"
    _fal.REALTIME_URL_FORMAT = f"wss://{fal.run_host}/"
    _fal.REST_URL = fal.rest_url
    _fal.CDN_URL = fal.cdn_url
    if fal.ca_bundle is not None:
        # fal_client builds its httpx clients with default trust: SSL_CERT_FILE is its only input.
        os.environ["SSL_CERT_FILE"] = str(fal.ca_bundle)
