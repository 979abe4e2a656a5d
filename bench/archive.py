"""Archive throughput: falflow's archive step against a raw streaming copy, same files, same run.

The emulator's image-to-video model (its output size set per workload) produces the files; the
requests are made once, then each side copies the same CDN URLs into the same bucket: a
``file://`` directory, S3 on moto (Python) and on SeaweedFS (Go), and Azure Blob on Azurite
(Node), each server in its own process on loopback. The baseline is the plainest streaming copy
(httpx stream → ``obstore.put_async``, no hashing, no checks, obstore's defaults); falflow's side
is ``falflow.tasks.archive.archive`` (sha256, size checks, ledger records, ``archived.json``, S3
uploads with SHA-256 checksums) at its default ``limits.downloads``. Each side runs in a fresh
process (its peak RSS is its own).

    python -m bench --only archive [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import obstore

from bench.baseline import open_store
from bench.harness import JSON, BenchError, MiB, Row, peak_rss_row, ratio, row, run_child
from bench.servers import AzureServer, S3Server, azurite, moto_s3, seaweedfs_s3
from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process
from falflow.settings import LimitSettings

VIDEO = "fal-ai/kling-video/v2.1/standard/image-to-video"
DOWNLOADS = LimitSettings().downloads
"""Files fetched at once, both sides (falflow's default)."""
RSS_TARGET_MIB = 150.0
MB = 1000 * 1000
# A 1x1 PNG: the video model reads its input image, a data: URL spares an upload.
PIXEL_PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


@dataclass(frozen=True)
class Workload:
    name: str
    files: int
    size: int


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("64 MiB", 1, 64 * MiB), Workload("10 × 1 MB", 10, MB)]
    return [Workload("1 GiB", 1, 1024 * MiB), Workload("100 × 5 MB", 100, 5 * MB)]


@dataclass(frozen=True)
class Target:
    """A bucket both sides write to, as each side is told about it."""

    name: str
    url: str
    server: S3Server | AzureServer | None
    throughput_target: float | None
    """Least falflow/baseline throughput ratio; None: reported, not judged."""

    @property
    def endpoint(self) -> str | None:
        return None if self.server is None else self.server.endpoint

    def falflow_env(self) -> dict[str, str]:
        if self.server is None:
            return {"FALFLOW_BUCKET__URL": self.url}
        return self.server.bucket_settings_env(self.url.split("/", 3)[3])

    def empty(self) -> None:
        """Drop what the last side wrote (servers keep objects on disk or in memory)."""
        if self.server is None:
            shutil.rmtree(Path(self.url.removeprefix("file://")), ignore_errors=True)
            return
        store = open_store(self.url, self.endpoint)
        for batch in obstore.list(store):
            obstore.delete(store, [meta["path"] for meta in batch])


def _requests(emu: RunningEmulator, workload: Workload) -> list[JSON]:
    emu.configure(video_size_bytes=workload.size)
    arguments = [
        {"image_url": PIXEL_PNG, "prompt": f"archive bench {i}"} for i in range(workload.files)
    ]
    made = run_child(
        "bench.baseline:make_requests",
        {"endpoint": VIDEO, "arguments": arguments, "concurrency": 32},
        env=emu.client_env(),
        timeout=300,
    )
    requests: list[JSON] = made["requests"]
    return requests


def _side(side: str, emu: RunningEmulator, target: Target, requests: list[JSON]) -> JSON:
    target.empty()
    if side == "baseline":
        urls = [r["output"]["video"]["url"] for r in requests]
        params = {"urls": urls, "bucket_url": target.url, "prefix": "raw", "downloads": DOWNLOADS}
        if target.endpoint is not None:
            params["endpoint"] = target.endpoint
        result = run_child("bench.baseline:raw_copy_many", params, env=emu.client_env())
    else:
        result = run_child(
            "bench.falflow_side:archive_outputs",
            {"outputs": requests, "endpoint": VIDEO},
            env={**emu.client_env(), **target.falflow_env()},
        )
    result["mib_per_second"] = result["bytes"] / MiB / result["wall_seconds"]
    target.empty()
    return result


def _rows(
    label: str, falflow: JSON, baseline: JSON, judged: bool, target: float | None
) -> list[Row]:
    speed = ratio(falflow["mib_per_second"], baseline["mib_per_second"])
    return [
        row(
            f"archive {label}: throughput",
            unit="MiB/s",
            falflow=falflow["mib_per_second"],
            baseline=baseline["mib_per_second"],
            ratio=speed,
            target="" if target is None else f"≥ {target}×",
            peak_rss_mib=falflow["peak_rss_mib"],
            met=(speed is not None and speed >= target) if judged and target else None,
        ),
        peak_rss_row(
            f"archive {label}: peak RSS",
            falflow,
            baseline,
            target_mib=RSS_TARGET_MIB,
            judged=judged,
        ),
    ]


@contextmanager
def _targets(tmp: Path) -> Iterator[list[Target]]:
    with moto_s3() as moto, seaweedfs_s3() as seaweedfs, azurite() as blob:
        yield [
            Target("file://", (tmp / "bucket").as_uri(), None, 1.0),
            Target("S3 (moto)", moto.bucket_url("archive"), moto, 0.9),
            Target("S3 (SeaweedFS)", seaweedfs.bucket_url("archive"), seaweedfs, 0.95),
            Target("Azure (Azurite)", blob.bucket_url("archive"), blob, None),
        ]


def run(quick: bool = False) -> JSON:
    """Throughput ratio and peak RSS per workload and bucket kind (quick: small files, nothing
    judged)."""
    rows: list[Row] = []
    details: dict[str, JSON] = {}
    errors: list[str] = []
    # Each side runs twice (alternating) outside quick mode; the faster run of each counts.
    orders = (
        [["baseline", "falflow"]] if quick else [["baseline", "falflow"], ["falflow", "baseline"]]
    )
    with (
        tempfile.TemporaryDirectory(prefix="falflow-bench-archive-") as tmp,
        start_emulator_process(EmulatorConfig(latency_seconds=0.0)) as emu,
        _targets(Path(tmp)) as targets,
    ):
        for workload in workloads(quick):
            requests = _requests(emu, workload)
            for target in targets:
                label = f"{workload.name} → {target.name}"
                samples: dict[str, list[JSON]] = {"baseline": [], "falflow": []}
                try:
                    for order in orders:
                        for side in order:
                            samples[side].append(_side(side, emu, target, requests))
                except BenchError as exc:  # one server failing must not hide the others' figures
                    errors.append(f"{label}: {exc}")
                    continue
                best = {
                    side: max(found, key=lambda s: float(s["mib_per_second"]))
                    for side, found in samples.items()
                }
                judged = not quick
                rows += _rows(
                    label, best["falflow"], best["baseline"], judged, target.throughput_target
                )
                details[label] = samples
    return {
        "rows": rows,
        "errors": errors,
        "details": {"downloads": DOWNLOADS, "by_workload": details},
    }
