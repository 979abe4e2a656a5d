"""Simulated fal models: real endpoint ids, realistic output shapes, fal-like failures.

A model runs when the queue decides its request completes; it reads inputs from the emulator's
own CDN (or ``data:`` URLs) and writes outputs as CDN files whose content is generated on demand.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from falflow.emulator.files import (
    BytesSource,
    FileSource,
    NoiseSource,
    PngSource,
    png_size,
    seed_for,
)

if TYPE_CHECKING:
    from falflow.emulator.cdn import CdnFile, CdnStore
    from falflow.emulator.config import Acl, EmulatorConfig

IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
MAX_SIDE = 8192
ERRORS_DOC = "https://docs.fal.ai/errors"


@dataclass(slots=True)
class Outcome:
    """What the runner answered: the result call replays it as is."""

    status: int
    body: Any
    error: str | None = None
    error_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ModelError(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


def validation_error(
    field_name: str, msg: str, error_type: str, value: Any = None, **extra: Any
) -> ModelError:
    """fal's 422: ``{"detail": [{loc, msg, type, ...}]}``."""
    item: dict[str, Any] = {"loc": ["body", field_name], "msg": msg, "type": error_type}
    if value is not None:
        item["input"] = value
    item.update(extra)
    return ModelError(
        Outcome(
            422,
            {"detail": [item]},
            error=msg,
            error_type=error_type,
            headers={"x-fal-retryable": "false"},
        )
    )


def infrastructure_error(status: int, detail: str, error_type: str, **headers: str) -> Outcome:
    """fal's infrastructure error: ``{"detail", "error_type"}`` plus ``X-Fal-Error-Type``."""
    return Outcome(
        status,
        {"detail": detail, "error_type": error_type},
        error=detail,
        error_type=error_type,
        headers={"x-fal-error-type": error_type, **headers},
    )


MAX_DOWNLOAD_BYTES = 64 * 1024**2


def _on_loopback(url: str) -> bool:
    """fal downloads inputs from anywhere public; the emulator reaches only this machine (e.g.
    a presigned URL of a bucket on a local S3 server), never the network."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and parts.hostname in ("127.0.0.1", "localhost", "::1")


def _download(url: str) -> FileSource | None:
    """The file at ``url`` as fal's runner would fetch it, or None if it cannot be read."""
    try:
        with httpx.stream("GET", url, timeout=10, verify=False) as response:  # noqa: S501 - loopback only
            if response.status_code != 200:
                return None
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_DOWNLOAD_BYTES:
                    return None
    except httpx.HTTPError:
        return None
    return BytesSource(bytes(data))


@dataclass(slots=True)
class ModelContext:
    """One run: the request's inputs, the clock, and where output files go."""

    endpoint_id: str
    request_id: str
    arguments: dict[str, Any]
    started_at: float
    ended_at: float
    config: EmulatorConfig
    cdn: CdnStore
    output_expires_at: float | None
    output_acl: Acl | None = None
    files: list[CdnFile] = field(default_factory=list)

    def add_file(self, file_name: str, content_type: str, source: FileSource) -> CdnFile:
        created = self.cdn.add(
            file_name=file_name,
            content_type=content_type,
            source=source,
            kind="output",
            request_id=self.request_id,
            created_at=self.ended_at,
            expires_at=self.output_expires_at,
            acl=self.output_acl,
        )
        self.files.append(created)
        return created

    def fetch(self, field_name: str) -> FileSource:
        """The file named by ``arguments[field_name]``, as fal downloads it when the run starts."""
        url = self.arguments.get(field_name)
        if not isinstance(url, str) or not url:
            raise validation_error(field_name, "Field required", "missing")
        if url.startswith("data:"):
            _, _, payload = url.partition(",")
            try:
                return BytesSource(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError):
                raise validation_error(
                    field_name, "Invalid data URI", "invalid_data_uri", url
                ) from None
        anonymous = not self.config.runner_reads_restricted_inputs
        found = self.cdn.resolve(url, at=self.started_at, anonymous=anonymous)
        if found is None and _on_loopback(url) and not url.startswith(self.cdn.emu.base_url):
            downloaded = _download(url)
            if downloaded is not None:
                return downloaded
        if found is None:
            raise validation_error(
                field_name,
                "Failed to download the file. Please check if the URL is accessible.",
                "file_download_error",
                url,
                url=f"{ERRORS_DOC}#file_download_error",
            )
        return found.source


@dataclass(frozen=True, slots=True)
class SimModel:
    endpoint_id: str
    run: Callable[[ModelContext], Any]
    """The output JSON; raises ModelError for a failed run."""
    log_lines: tuple[str, ...]
    """Logged evenly over the run time."""
    latency_argument: bool = False
    """Accept ``latency_seconds`` in the arguments (echo only, for tests)."""


def _prompt(ctx: ModelContext) -> str:
    prompt = ctx.arguments.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise validation_error("prompt", "Field required", "missing")
    if ctx.config.blocked_word and ctx.config.blocked_word.lower() in prompt.lower():
        raise validation_error(
            "prompt",
            "The content could not be processed because it contained material flagged by a "
            "content checker.",
            "content_policy_violation",
            prompt,
            url=f"{ERRORS_DOC}#content_policy_violation",
        )
    return prompt


def _image_size(ctx: ModelContext) -> tuple[int, int]:
    value = ctx.arguments.get("image_size", "landscape_4_3")
    if isinstance(value, str) and value in IMAGE_SIZES:
        return IMAGE_SIZES[value]
    if isinstance(value, dict):
        width, height = value.get("width"), value.get("height")
        if (
            isinstance(width, int)
            and isinstance(height, int)
            and 1 <= width <= MAX_SIDE
            and 1 <= height <= MAX_SIDE
        ):
            return width, height
    allowed = ", ".join(IMAGE_SIZES)
    raise validation_error(
        "image_size",
        f"Input should be one of {allowed}, or {{width, height}} up to {MAX_SIDE}",
        "enum",
        value,
    )


def _int_argument(ctx: ModelContext, name: str, default: int, low: int, high: int) -> int:
    value = ctx.arguments.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise validation_error(
            name, f"Input should be an integer from {low} to {high}", "int_range", value
        )
    return value


def _file_name(extension: str) -> str:
    return f"{secrets.token_urlsafe(9)}.{extension}"


def text_to_image(ctx: ModelContext) -> Any:
    prompt = _prompt(ctx)
    width, height = _image_size(ctx)
    count = _int_argument(ctx, "num_images", 1, 1, 4)
    seed = _int_argument(ctx, "seed", seed_for(prompt) % 2**31, 0, 2**63 - 1)
    images = []
    for index in range(count):
        source = PngSource(width, height, seed_for(ctx.endpoint_id, prompt, seed, index))
        added = ctx.add_file(_file_name("png"), "image/png", source)
        images.append(
            {"url": added.url, "width": width, "height": height, "content_type": "image/png"}
        )
    return {
        "images": images,
        "timings": {"inference": round(ctx.ended_at - ctx.started_at, 4)},
        "seed": seed,
        "has_nsfw_concepts": [False] * count,
        "prompt": prompt,
    }


def upscale(ctx: ModelContext) -> Any:
    source = ctx.fetch("image_url")
    scale = _int_argument(ctx, "scale", 2, 1, 8)
    head = b"".join(source.iter_range(0, min(24, source.size)))
    width, height = png_size(head) or (512, 512)
    width, height = width * scale, height * scale
    if width > MAX_SIDE or height > MAX_SIDE:
        raise validation_error(
            "scale", f"The upscaled image would exceed {MAX_SIDE} pixels a side", "value_error"
        )
    image = PngSource(width, height, seed_for(ctx.endpoint_id, ctx.arguments["image_url"], scale))
    added = ctx.add_file(_file_name("png"), "image/png", image)
    return {
        "image": {
            "url": added.url,
            "content_type": "image/png",
            "file_name": added.file_name,
            "file_size": image.size,
            "width": width,
            "height": height,
        }
    }


def image_to_video(ctx: ModelContext) -> Any:
    prompt = _prompt(ctx)
    ctx.fetch("image_url")
    duration = ctx.arguments.get("duration", "5")
    if str(duration) not in ("5", "10"):
        raise validation_error("duration", "Input should be '5' or '10'", "enum", duration)
    size = ctx.config.video_size_bytes
    seed = seed_for(ctx.endpoint_id, prompt, ctx.arguments["image_url"], duration)
    added = ctx.add_file("output.mp4", "video/mp4", NoiseSource(size, seed))
    return {
        "video": {
            "url": added.url,
            "content_type": "video/mp4",
            "file_name": added.file_name,
            "file_size": size,
        }
    }


def echo(ctx: ModelContext) -> Any:
    """Returns ``arguments["output"]`` verbatim. Test helpers: ``fail: {status, body}`` fails the
    run with that answer; ``files: [{file_name, size, content_type?}]`` adds real CDN outputs
    under ``output["files"]``; ``nest: N`` wraps the output in N levels of ``{"n": …}`` (a deep
    output from shallow arguments)."""
    fail = ctx.arguments.get("fail")
    if isinstance(fail, dict):
        status = fail.get("status", 500)
        body = fail.get("body", {"detail": "echo failure"})
        detail = body.get("detail") if isinstance(body, dict) else None
        error_type = body.get("error_type") if isinstance(body, dict) else None
        raise ModelError(
            Outcome(
                int(status),
                body,
                error=detail if isinstance(detail, str) else f"Request failed with {status}",
                error_type=error_type if isinstance(error_type, str) else None,
            )
        )
    if "output" not in ctx.arguments:
        raise validation_error("output", "Field required", "missing")
    output = ctx.arguments["output"]
    nest = ctx.arguments.get("nest", 0)
    for _ in range(nest if isinstance(nest, int) else 0):
        output = {"n": output}
    specs = ctx.arguments.get("files")
    if specs is None:
        return output
    if not isinstance(specs, list) or not isinstance(output, dict):
        raise validation_error(
            "files", "files needs a list and an object output", "type_error", specs
        )
    files = []
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("size"), int):
            raise validation_error("files", "each file needs an integer size", "type_error", spec)
        name = str(spec.get("file_name") or f"file_{index}.bin")
        content_type = str(spec.get("content_type") or "application/octet-stream")
        source = NoiseSource(spec["size"], seed_for(ctx.request_id, index))
        added = ctx.add_file(name, content_type, source)
        files.append(
            {
                "url": added.url,
                "content_type": content_type,
                "file_name": added.file_name,
                "file_size": source.size,
            }
        )
    return {**output, "files": files}


_IMAGE_LOGS = ("Loading model weights", "Running inference", "Encoding images")

MODELS: dict[str, SimModel] = {
    model.endpoint_id: model
    for model in (
        SimModel("fal-ai/flux/schnell", text_to_image, _IMAGE_LOGS),
        SimModel("fal-ai/flux/dev", text_to_image, _IMAGE_LOGS),
        SimModel("fal-ai/esrgan", upscale, ("Downloading input image", "Upscaling")),
        SimModel(
            "fal-ai/kling-video/v2.1/standard/image-to-video",
            image_to_video,
            ("Downloading input image", "Generating frames", "Encoding video"),
        ),
        SimModel("emulator/echo", echo, ("Echoing",), latency_argument=True),
    )
}
