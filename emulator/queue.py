"""fal's queue (docs/fal-protocol.md §2): submit, status, status stream, result, cancel.

State changes are computed lazily: every read first replays what happened since the last one
(starts as slots free up, completions, start deadlines passing) as a small discrete-event
simulation, so 1,000 open requests cost nothing while nobody asks. A single timer runs only
while someone must be told without asking (webhooks, status streams).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import uuid
from collections import Counter, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from falflow.emulator.cdn import LIFECYCLE_PREFERENCE, parse_lifecycle
from falflow.emulator.clock import iso
from falflow.emulator.config import Acl
from falflow.emulator.http import (
    AbortConnection,
    HttpError,
    Request,
    Response,
    dumps,
    json_response,
)
from falflow.emulator.models import (
    MODELS,
    ModelContext,
    ModelError,
    Outcome,
    SimModel,
    infrastructure_error,
)
from falflow.emulator.webhooks import webhook_body

if TYPE_CHECKING:
    from falflow.emulator.app import Emulator

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"
NAMESPACES = ("workflows", "comfy")
NOT_FOUND = {"status": "NOT_FOUND"}
logger = logging.getLogger("emulator")


@dataclass(slots=True, eq=False)
class QueuedRequest:
    id: str
    endpoint_id: str
    app: str
    model: SimModel
    arguments: Any
    base_url: str
    submitted_at: float
    duration: float
    low_priority: bool
    deadline: float | None
    store_io: bool
    output_ttl: int | None
    output_acl: Acl | None
    webhook_url: str | None
    fails: bool
    gateway_request_id: str
    retries_left: int = 0
    """Runner failures still to come before the request runs to completion (re-queued)."""
    runs: int = 0
    state: str = IN_QUEUE
    started_at: float | None = None
    """When the request first started (a re-queued request keeps it)."""
    ended_at: float | None = None
    outcome: Outcome | None = None
    result_bytes: bytes = b""
    output_files: list[str] = field(default_factory=list)
    payloads_deleted: bool = False
    streams: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def response_url(self) -> str:
        return f"{self.base_url}/{self.app}/requests/{self.id}"

    @property
    def needs_push(self) -> bool:
        return self.webhook_url is not None or self.streams > 0

    def notify(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


def app_of(endpoint_id: str) -> str:
    """``owner/alias`` (with a namespace prefix when there is one) of an endpoint id."""
    parts = endpoint_id.split("/")
    return "/".join(parts[:3] if parts[0] in NAMESPACES else parts[:2])


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


class QueueService:
    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.requests: dict[str, QueuedRequest] = {}
        self._waiting: tuple[deque[QueuedRequest], deque[QueuedRequest]] = (deque(), deque())
        self._waiting_per_app: Counter[str] = Counter()
        self._running: list[tuple[float, int, QueuedRequest]] = []
        self._running_count = 0
        self._deadlines: list[tuple[float, int, QueuedRequest]] = []
        self._seq = itertools.count()
        self._sim_time = emu.clock.now()
        self._pushed = 0
        """Open requests that need the timer (webhook or status stream)."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # -- the simulation ------------------------------------------------------------------------

    def advance(self) -> float:
        """Replay every start, completion and start deadline up to now; return now."""
        now = max(self.emu.clock.now(), self._sim_time)
        at = self._sim_time
        while True:
            self._start_waiting(at)
            event = self._next_event()
            if event is None or event[0] > now:
                break
            at = event[0]
            if event[1] is self._running:
                _, _, running = heapq.heappop(self._running)
                self._running_count -= 1
                if running.retries_left > 0:
                    self._requeue(running)
                else:
                    self._complete(running, at, None)
            else:
                _, _, waiting = heapq.heappop(self._deadlines)
                self._dequeue(waiting)
                self._complete(
                    waiting,
                    at,
                    infrastructure_error(
                        504,
                        "Request timed out before processing started",
                        "request_timeout",
                        **{"x-fal-request-timeout-type": "user"},
                    ),
                )
        self._sim_time = now
        if self._pushed:
            self._arm_timer(now)
        return now

    def _next_event(self) -> tuple[float, list[tuple[float, int, QueuedRequest]]] | None:
        """The earliest pending completion or start deadline (dropping stale heap entries)."""
        while self._running and self._running[0][2].state != IN_PROGRESS:
            heapq.heappop(self._running)
        while self._deadlines and (
            self._deadlines[0][2].state != IN_QUEUE
            or self._deadlines[0][2].deadline != self._deadlines[0][0]
        ):
            heapq.heappop(self._deadlines)
        best: tuple[float, list[tuple[float, int, QueuedRequest]]] | None = None
        if self._running:
            best = (self._running[0][0], self._running)
        if self._deadlines and (best is None or self._deadlines[0][0] < best[0]):
            best = (self._deadlines[0][0], self._deadlines)
        return best

    def _start_waiting(self, at: float) -> None:
        limit = self.emu.config.concurrency_limit
        normal, low = self._waiting
        while (normal or low) and (limit is None or self._running_count < limit):
            request = normal.popleft() if normal else low.popleft()
            self._waiting_per_app[request.app] -= 1
            request.state = IN_PROGRESS
            if request.started_at is None:
                request.started_at = at
            request.runs += 1
            self._running_count += 1
            heapq.heappush(self._running, (at + request.duration, next(self._seq), request))
            request.notify()

    def _requeue(self, request: QueuedRequest) -> None:
        """The runner failed (a 503): fal puts the request back at the head of the queue, and
        it goes through the gateway again under a new gateway request id. Its start deadline
        was met, so it no longer has one."""
        request.retries_left -= 1
        request.gateway_request_id = str(uuid.uuid4())
        request.state = IN_QUEUE
        request.deadline = None
        self._waiting[1 if request.low_priority else 0].appendleft(request)
        self._waiting_per_app[request.app] += 1
        request.notify()

    def _dequeue(self, request: QueuedRequest) -> None:
        self._waiting[1 if request.low_priority else 0].remove(request)
        self._waiting_per_app[request.app] -= 1

    def _complete(self, request: QueuedRequest, at: float, outcome: Outcome | None) -> None:
        if request.needs_push:
            self._pushed -= 1
        request.state = COMPLETED
        request.ended_at = at
        if outcome is None:
            outcome = self._run_model(request, at)
        request.outcome = outcome
        request.result_bytes = dumps(outcome.body)
        request.notify()
        if request.webhook_url is not None:
            gateway_id = request.gateway_request_id
            use_gateway = self.emu.config.webhook_gateway_id_header
            self.emu.webhooks.schedule(
                request.webhook_url,
                request.id,
                webhook_body(
                    request.id,
                    outcome.body,
                    status="OK" if outcome.ok else "ERROR",
                    error=None if outcome.ok else f"Invalid status code: {outcome.status}",
                    gateway_request_id=gateway_id,
                ),
                header_request_id=gateway_id if use_gateway else request.id,
            )

    def _run_model(self, request: QueuedRequest, at: float) -> Outcome:
        if request.fails:
            return infrastructure_error(500, "Internal Server Error", "runner_server_error")
        if not isinstance(request.arguments, dict):
            message = "Input should be a valid dictionary"
            return Outcome(
                422,
                {"detail": [{"loc": ["body"], "msg": message, "type": "dict_type"}]},
                error=message,
                error_type="dict_type",
            )
        context = ModelContext(
            endpoint_id=request.endpoint_id,
            request_id=request.id,
            arguments=request.arguments,
            started_at=request.started_at if request.started_at is not None else at,
            ended_at=at,
            config=self.emu.config,
            cdn=self.emu.cdn,
            output_expires_at=None if request.output_ttl is None else at + request.output_ttl,
            output_acl=request.output_acl,
        )
        try:
            output = request.model.run(context)
        except Exception as exc:
            for created in context.files:
                self.emu.cdn.delete(created)
            if isinstance(exc, ModelError):
                return exc.outcome
            logger.exception("simulated model %s crashed", request.endpoint_id)
            return infrastructure_error(500, "Internal Server Error", "runner_server_error")
        request.output_files = [created.key for created in context.files]
        return Outcome(200, output)

    # -- timer for pushes (webhooks, streams) --------------------------------------------------

    def _arm_timer(self, now: float) -> None:
        event = self._next_event()
        when = None if event is None else event[0]
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, when - now), self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.advance()

    def _watch(self, request: QueuedRequest, delta: int) -> None:
        before = request.needs_push
        request.streams += delta
        if request.state != COMPLETED and before != request.needs_push:
            self._pushed += 1 if request.needs_push else -1

    # -- retention ------------------------------------------------------------------------------

    def result_expires_at(self, request: QueuedRequest) -> float | None:
        if request.ended_at is None:
            return None
        config = self.emu.config
        if request.store_io:
            return request.ended_at + config.payload_retention_seconds
        large = len(request.result_bytes) >= config.large_result_bytes
        keep = config.large_result_retention_seconds if large else config.result_retention_seconds
        return request.ended_at + keep

    def result_available(self, request: QueuedRequest, now: float) -> bool:
        expires_at = self.result_expires_at(request)
        return not request.payloads_deleted and expires_at is not None and now < expires_at

    def input_stored(self, request: QueuedRequest, now: float) -> bool:
        """The input JSON is held while the request runs, and afterwards only if stored."""
        if request.payloads_deleted:
            return False
        if request.state != COMPLETED:
            return True
        return request.store_io and self.result_available(request, now)

    def payload_inventory(self) -> dict[str, dict[str, Any]]:
        now = self.advance()
        held: dict[str, dict[str, Any]] = {}
        for request in self.requests.values():
            has_input = self.input_stored(request, now)
            has_output = request.state == COMPLETED and self.result_available(request, now)
            if has_input or has_output:
                expires_at = self.result_expires_at(request)
                held[request.id] = {
                    "endpoint_id": request.endpoint_id,
                    "status": request.state,
                    "input": has_input,
                    "output": has_output,
                    "stored": request.store_io,
                    "expires_at": None if expires_at is None else iso(expires_at),
                }
        return held

    def describe(self, request: QueuedRequest) -> dict[str, Any]:
        outcome = request.outcome
        return {
            "request_id": request.id,
            "endpoint_id": request.endpoint_id,
            "arguments": request.arguments,
            "status": request.state,
            "status_code": None if outcome is None else outcome.status,
            "submitted_at": iso(request.submitted_at),
            "started_at": None if request.started_at is None else iso(request.started_at),
            "ended_at": None if request.ended_at is None else iso(request.ended_at),
            "gateway_request_id": request.gateway_request_id,
            "runs": request.runs,
            "priority": "low" if request.low_priority else "normal",
            "store_io": request.store_io,
            "output_ttl_seconds": request.output_ttl,
            "output_acl": None if request.output_acl is None else request.output_acl.default,
            "webhook_url": request.webhook_url,
            "payloads_deleted": request.payloads_deleted,
            "output_files": [self.emu.cdn.files[key].url for key in request.output_files],
        }

    def delete_payloads(self, request: QueuedRequest) -> list[dict[str, Any]]:
        """Drop the stored JSON and the request's *output* files; inputs are never touched.

        A request sent with ``X-Fal-Store-IO: 0`` has no stored output to find its files in:
        nothing is deleted unless ``store_io_off_deletes_files``. Once the payloads are gone,
        another deletion finds no files (``redelete_retries_failed_files`` retries those whose
        deletion failed). The ``partial_cdn_delete`` fault fails one file's deletion."""
        config = self.emu.config
        cdn = self.emu.cdn
        if not request.store_io and not config.store_io_off_deletes_files:
            return []
        if not request.payloads_deleted:
            targets = [cdn.files[key] for key in request.output_files]
        elif config.redelete_retries_failed_files:
            targets = [cdn.files[key] for key in request.output_files]
            targets = [t for t in targets if not t.deleted]
        else:
            return []
        request.payloads_deleted = True
        failing = None
        if targets and self.emu.faults.draw("partial_cdn_delete"):
            failing = self.emu.faults.pick(len(targets))
        results: list[dict[str, Any]] = []
        for index, target in enumerate(targets):
            if index == failing:
                message = f"Failed to delete {target.url}: storage backend error (503)"
                results.append({"link": target.url, "exception": message})
                continue
            results.append({"link": target.url, "exception": None})
            cdn.delete(target)
        return results

    def close(self) -> None:
        """Stop the timer and wake every status stream (before this queue is replaced)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for request in self.requests.values():
            request.notify()

    # -- HTTP -------------------------------------------------------------------------------

    def _status_body(self, request: QueuedRequest, now: float, logs: bool) -> dict[str, Any]:
        url = request.response_url
        body: dict[str, Any] = {
            "status": request.state,
            "request_id": request.id,
            "response_url": url,
            "status_url": url + "/status",
            "cancel_url": url + "/cancel",
        }
        if request.state == IN_QUEUE:
            body["queue_position"] = self.position(request)
            return body
        body["logs"] = self._logs(request, now) if logs else None
        if request.state == COMPLETED and request.outcome is not None:
            if request.started_at is not None and request.ended_at is not None:
                body["metrics"] = {
                    "inference_time": round(request.ended_at - request.started_at, 4)
                }
            if not request.outcome.ok:
                body["error"] = (
                    request.outcome.error or f"Request failed ({request.outcome.status})"
                )
                body["error_type"] = request.outcome.error_type
        return body

    def position(self, request: QueuedRequest) -> int:
        normal, low = self._waiting
        if request.low_priority:
            return len(normal) + low.index(request)
        return normal.index(request)

    def _logs(self, request: QueuedRequest, now: float) -> list[dict[str, Any]]:
        if request.started_at is None:
            return []
        lines = request.model.log_lines
        step = request.duration / len(lines)
        end = request.ended_at if request.ended_at is not None else now
        return [
            {
                "message": line,
                "level": "INFO",
                "source": "user",
                "timestamp": iso(request.started_at + index * step),
            }
            for index, line in enumerate(lines)
            if request.started_at + index * step <= end
        ]

    def _find(self, request_id: str, app_path: str) -> QueuedRequest:
        found = self.requests.get(request_id)
        if found is None or app_path not in (found.app, found.endpoint_id):
            raise HttpError(404, NOT_FOUND)
        return found

    async def handle(self, request: Request) -> Response:
        path = request.path.strip("/")
        parts = path.split("/")
        # .../{owner}/{alias}[/sub]/requests/{id}[/status[/stream]|/cancel|/response]
        try:
            marker = parts.index("requests", 2)
        except ValueError:
            marker = -1
        if marker > 0 and len(parts) > marker + 1:
            app_path = "/".join(parts[:marker])
            request_id = parts[marker + 1]
            action = "/".join(parts[marker + 2 :])
            method = request.method
            if method == "GET" and action == "status":
                return self._status(request, app_path, request_id)
            if method == "GET" and action == "status/stream":
                return self._stream(request, app_path, request_id)
            if method == "GET" and action in ("", "response"):
                return self._result(app_path, request_id)
            if method == "PUT" and action == "cancel":
                return self._cancel(app_path, request_id)
            raise HttpError(405, {"detail": "Method not allowed"})
        if request.method == "POST":
            return await self._submit(request, path)
        raise HttpError(404, {"detail": "Not found"})

    async def _submit(self, request: Request, endpoint_id: str) -> Response:
        model = MODELS.get(endpoint_id)
        if model is None:
            raise HttpError(404, {"detail": f"Application '{endpoint_id}' not found"})
        arguments = await request.json()
        headers = request.headers
        ttl, acl = self.emu.cdn.choose(parse_lifecycle(headers.get(LIFECYCLE_PREFERENCE)))
        deadline_raw = headers.get("x-fal-request-timeout")
        max_queue_raw = request.arg("fal_max_queue_length")
        try:
            timeout = None if deadline_raw is None else float(deadline_raw)
            max_queue = None if max_queue_raw is None else int(max_queue_raw)
        except ValueError:
            raise HttpError(
                400, {"detail": "X-Fal-Request-Timeout and fal_max_queue_length must be numbers"}
            ) from None
        now = self.advance()
        app = app_of(endpoint_id)
        if max_queue is not None and self._waiting_per_app[app] >= max_queue:
            raise HttpError(
                429,
                {
                    "detail": f"Queue is full ({max_queue} requests waiting)",
                    "error_type": "queue_full",
                },
            )
        config = self.emu.config
        duration = config.latency_for(endpoint_id)
        if model.latency_argument and isinstance(arguments, dict):
            override = arguments.get("latency_seconds")
            if isinstance(override, int | float) and override >= 0:
                duration = float(override)
        request_id = str(uuid.uuid4())
        faults = self.emu.faults
        queued = QueuedRequest(
            id=request_id,
            endpoint_id=endpoint_id,
            app=app,
            model=model,
            arguments=arguments,
            base_url=self.emu.base_url,
            submitted_at=now,
            duration=duration,
            low_priority=headers.get("x-fal-queue-priority", "").lower() == "low",
            deadline=None if timeout is None else now + timeout,
            store_io=headers.get("x-fal-store-io", "1").strip() != "0",
            output_ttl=ttl,
            output_acl=acl,
            webhook_url=request.arg("fal_webhook"),
            fails=faults.draw("model_error"),
            gateway_request_id=str(uuid.uuid4()) if config.always_new_gateway_id else request_id,
            retries_left=1 if faults.draw("runner_retry") else 0,
        )
        self.requests[queued.id] = queued
        self._waiting[1 if queued.low_priority else 0].append(queued)
        self._waiting_per_app[app] += 1
        if queued.deadline is not None:
            heapq.heappush(self._deadlines, (queued.deadline, next(self._seq), queued))
        if queued.needs_push:
            self._pushed += 1
        self._start_waiting(now)
        if self._pushed:
            self._arm_timer(now)
        if self.emu.faults.draw("lost_submit_answer"):
            raise AbortConnection
        url = queued.response_url
        return json_response(
            200,
            {
                "status": IN_QUEUE,
                "request_id": queued.id,
                "gateway_request_id": queued.gateway_request_id,
                "response_url": url,
                "status_url": url + "/status",
                "cancel_url": url + "/cancel",
                "queue_position": self.position(queued) if queued.state == IN_QUEUE else 0,
            },
            request_id=queued.id,
        )

    def _status(self, request: Request, app_path: str, request_id: str) -> Response:
        found = self._find(request_id, app_path)
        now = self.advance()
        body = self._status_body(found, now, _flag(request.arg("logs")))
        return json_response(200 if found.state == COMPLETED else 202, body, request_id=found.id)

    def _stream(self, request: Request, app_path: str, request_id: str) -> Response:
        found = self._find(request_id, app_path)
        return Response(
            200,
            content_type=b"text/event-stream",
            headers={"cache-control": "no-cache"},
            request_id=found.id,
            stream=self._events(request, found, _flag(request.arg("logs"))),
        )

    async def _events(
        self, request: Request, found: QueuedRequest, logs: bool
    ) -> AsyncGenerator[bytes, None]:
        gone = request.gone()
        loop = asyncio.get_running_loop()
        self._watch(found, +1)
        try:
            while True:
                now = self.advance()
                yield b"data: " + dumps(self._status_body(found, now, logs)) + b"\n\n"
                if found.state == COMPLETED:
                    return
                changed: asyncio.Future[None] = loop.create_future()
                found.waiters.append(changed)
                await asyncio.wait(
                    (changed, gone),
                    timeout=self.emu.config.stream_keepalive_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not changed.done():
                    changed.cancel()
                if gone.done():
                    return
        finally:
            self._watch(found, -1)

    def _result(self, app_path: str, request_id: str) -> Response:
        found = self._find(request_id, app_path)
        now = self.advance()
        if found.state != COMPLETED or found.outcome is None:
            return json_response(
                400, {"detail": "Request is still in progress"}, request_id=found.id
            )
        if not self.result_available(found, now):
            gone = "Request result not found: it expired or its payloads were deleted"
            return json_response(404, {"detail": gone}, request_id=found.id)
        outcome = found.outcome
        return Response(
            outcome.status, found.result_bytes, headers=outcome.headers, request_id=found.id
        )

    def _cancel(self, app_path: str, request_id: str) -> Response:
        found = self._find(request_id, app_path)
        now = self.advance()
        if found.state == COMPLETED:
            return json_response(400, {"status": "ALREADY_COMPLETED"}, request_id=found.id)
        if found.state == IN_QUEUE:
            self._dequeue(found)
        else:
            self._running_count -= 1  # its heap entry goes stale and is dropped later
        self._complete(
            found, now, infrastructure_error(499, "Request was cancelled", "client_cancelled")
        )
        self._start_waiting(now)
        return json_response(202, {"status": "CANCELLATION_REQUESTED"}, request_id=found.id)
