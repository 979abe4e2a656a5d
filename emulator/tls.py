"""The emulator's throwaway CA, its server certificate, and the CA bundle clients trust.

httpx (so ``fal_client``) trusts exactly what ``SSL_CERT_FILE`` names, replacing the default
store: the bundle must therefore hold the system CAs *and* the emulator CA, or every real host
(S3, a Prefect server) stops verifying in the same process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import certifi
import trustme


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    """The emulator CA alone (PEM)."""
    ca_bundle: Path
    """System CAs followed by the emulator CA."""
    server_cert: Path
    server_key: Path


def system_ca_file() -> Path:
    """Where this process's trust comes from today: ``SSL_CERT_FILE`` if set, else certifi."""
    configured = os.environ.get("SSL_CERT_FILE")
    if configured and Path(configured).is_file():
        return Path(configured)
    return Path(certifi.where())


def build_ca_bundle(ca_pem: bytes, path: Path) -> Path:
    """Write the current system CAs plus ``ca_pem`` to ``path`` (appending, never replacing)."""
    system = system_ca_file().read_bytes()
    if not system.endswith(b"\n"):
        system += b"\n"
    path.write_bytes(system + ca_pem)
    return path


def make_tls_files(directory: Path) -> TlsFiles:
    """A new CA and a certificate for 127.0.0.1/localhost, written under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="falflow emulator")
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(
        ca_cert=directory / "emulator-ca.pem",
        ca_bundle=directory / "ca-bundle.pem",
        server_cert=directory / "server-cert.pem",
        server_key=directory / "server-key.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(files.server_cert), append=True)
    server.private_key_pem.write_to_path(str(files.server_key))
    files.server_key.chmod(0o600)
    build_ca_bundle(ca.cert_pem.bytes(), files.ca_bundle)
    return files
