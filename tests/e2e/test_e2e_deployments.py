"""End to end on a real Prefect server: `prefect deploy` from prefect.yaml, process workers, the
emulator in its own process, a local directory as the bucket.

- an emitted ``falflow.pipeline.requested`` event starts the pipeline; it archives every output
  and leaves nothing on fal;
- the janitor leaves a live run alone; once that run's flow process is SIGKILLed, the next
  janitor run finishes it with nothing lost, and a re-run with the same run key submits nothing
  again;
- two workers on one pool both take runs;
- the webhook receiver, restarted between two deliveries of one request, makes one event;
- a deployment run with its keys from a ``FalCredentials`` block and its bucket from an
  ``S3Bucket`` block (moto), one prompt refused by the model: its run page (summary, table and
  progress artifacts) tells what failed, what was skipped and where everything went, and
  ``run_deployment``'s caller reads the summary from the persisted result;
- last, after all of that: no secret is anywhere in the Prefect server's database, its logs, the
  workers' logs or the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process, webhook_body
from falflow.flows.spec import load_pipeline
from tests.support.fixtures import S3_BUCKET
from tests.support.stack import (
    BIN,
    TERMINAL,
    Stack,
    descendants,
    free_port,
    prefect_stack,
    wait_for,
)

pytestmark = pytest.mark.slow

POOL = "falflow"
VIDEO = "fal-ai/kling-video/v2.1/standard/image-to-video"
ONE_PROMPT = {"prompts": ["a red fox in fresh snow"]}
SAMPLE = [step.spec.endpoint for step in load_pipeline("sample").steps]
IMAGE, UPSCALE = "fal-ai/flux/schnell", "fal-ai/esrgan"


def _in_state(e2e: E2E, run_key: str, state: str) -> list[dict[str, Any]]:
    return [r for r in e2e.records(run_key) if r["state"] == state]


"""The shipped sample: one request per step for one prompt, the video last."""
SECRETS = {
    "the fal key": f"e2e-fal-key-{uuid.uuid4().hex}",
    "the fal admin key": f"e2e-fal-admin-key-{uuid.uuid4().hex}",
    "the bucket secret": f"e2e-bucket-secret-{uuid.uuid4().hex}",
}
"""Unique values, so finding one anywhere can only mean it leaked. The bucket is a local
directory, which needs no secret: the workers get one anyway, read into the settings like an S3
secret key would be, to catch settings that end up in Prefect."""
BLOCK_SECRET = f"e2e-block-bucket-secret-{uuid.uuid4().hex}"
"""The S3 secret key held only by an ``AwsCredentials`` block on the server."""


@dataclass
class E2E:
    stack: Stack
    emulator: RunningEmulator
    bucket: Path
    worker_env: dict[str, str]

    def request(self, *run_keys: str, spec: str = "sample", parameters: Any = ONE_PROMPT) -> None:
        """Emit one ``falflow.pipeline.requested`` event per run key, as a user's process would."""
        code = (
            "import json, sys\n"
            "from falflow import request_pipeline\n"
            "for key in sys.argv[3:]:\n"
            "    assert request_pipeline(sys.argv[1], json.loads(sys.argv[2]), key) is not None\n"
        )
        argv = [sys.executable, "-c", code, spec, json.dumps(parameters), *run_keys]
        self.stack.run(argv, timeout=60)

    def run_waiting_on_the_video(self, run_key: str) -> dict[str, Any]:
        """Start the sample as ``run_key``; its flow run once its video (which the test keeps
        from ending) is submitted, every earlier step archived."""
        self.request(run_key)

        def video_submitted() -> bool:
            return any(
                r["endpoint"] == VIDEO and r.get("request_id") for r in self.records(run_key)
            )

        wait_for("the video request to be submitted", video_submitted, 120, 0.25)
        deployment_id = self.stack.deployment_id("falflow-pipeline/on-event")
        [run] = [
            r
            for r in self.stack.flow_runs(deployment_id={"any_": [deployment_id]})
            if r["parameters"].get("run_key") == run_key
        ]
        return run

    def run_of(self, deployment: str, run_key: str, timeout: float = 120) -> dict[str, Any]:
        """The flow run of ``deployment`` for ``run_key``, once it is in a final state."""
        deployment_id = self.stack.deployment_id(deployment)

        def finished() -> dict[str, Any] | None:
            for run in self.stack.flow_runs(deployment_id={"any_": [deployment_id]}):
                if run["parameters"].get("run_key") == run_key and run["state_type"] in TERMINAL:
                    return run
            return None

        try:
            run: dict[str, Any] = wait_for(f"run {run_key} of {deployment}", finished, timeout, 0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.stack.diagnostics()}") from None
        return run

    def records(self, run_key: str) -> list[dict[str, Any]]:
        folder = self.bucket / "ledger" / run_key
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def held_on_fal(self, request_ids: set[str]) -> set[str]:
        inventory = self.emulator.inventory(hashes=False)
        held = set(inventory["payloads"]) | {f.get("request_id") for f in inventory["files"]}
        return held & request_ids

    def assert_all_archived_and_deleted(self, run_key: str, count: int) -> list[dict[str, Any]]:
        records = self.records(run_key)
        assert len(records) == count, [r["job_id"] for r in records]
        for record in records:
            assert record["state"] == "deleted", record
            assert record["objects"], record
            for obj in record["objects"]:
                data = (self.bucket / obj["key"]).read_bytes()
                assert len(data) == obj["size"]
                assert hashlib.sha256(data).hexdigest() == obj["sha256"]
        assert self.held_on_fal({r["request_id"] for r in records}) == set()
        return records


LEASE_SECONDS = 10
"""The workers' runs' lease: a lost run is finished this soon after it went silent."""


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Iterator[E2E]:
    home = tmp_path_factory.mktemp("prefect-home")
    bucket = tmp_path_factory.mktemp("bucket")
    config = EmulatorConfig(
        api_key=SECRETS["the fal key"],
        admin_key=SECRETS["the fal admin key"],
        latency_seconds=0.2,
        video_size_bytes=256 * 1024,
        stream_keepalive_seconds=0.5,
    )
    with start_emulator_process(config) as emulator, prefect_stack(home) as stack:
        prefect = str(BIN / "prefect")
        stack.run([prefect, "work-pool", "create", POOL, "--type", "process"])
        worker_env = {
            **emulator.client_env(),
            "FALFLOW_BUCKET__URL": bucket.as_uri(),
            "FALFLOW_BUCKET__SECRET_ACCESS_KEY": SECRETS["the bucket secret"],
            "FALFLOW_LIMITS__LEASE_SECONDS": str(LEASE_SECONDS),
        }
        # two workers, one run at a time each: a janitor run can start while a pipeline runs
        for name in ("worker-1", "worker-2"):
            stack.start_worker(POOL, name, worker_env)
        stack.run([prefect, "--no-prompt", "deploy", "--all"], timeout=180)
        # the schedules stay out of the way of the tests (they are checked, then paused)
        for name in ("falflow-pipeline/nightly", "falflow-janitor/hourly"):
            deployment = stack.api("GET", f"/deployments/name/{name}")
            assert [s["schedule"].get("cron") for s in deployment["schedules"]], name
            stack.api("PATCH", f"/deployments/{deployment['id']}", {"paused": True})
        save_blocks(stack, emulator, moto_endpoint)
        yield E2E(stack, emulator, bucket, worker_env)


def save_blocks(stack: Stack, emulator: RunningEmulator, moto_endpoint: str) -> None:
    """``fal-credentials/e2e-tenant`` (the emulator's keys) and ``s3-bucket/e2e-archive`` (moto,
    its secret key only in the block), saved on the server as a user would."""
    code = (
        "import os\n"
        "from prefect_aws import AwsCredentials, S3Bucket\n"
        "from prefect_aws.client_parameters import AwsClientParameters\n"
        "from falflow import FalCredentials\n"
        "env = os.environ\n"
        "FalCredentials(api_key=env['K'], admin_key=env['A']).save('e2e-tenant')\n"
        "credentials = AwsCredentials(aws_access_key_id='e2e-key-id',\n"
        "    aws_secret_access_key=env['S'], region_name='us-east-1',\n"
        "    aws_client_parameters=AwsClientParameters(endpoint_url=env['M']))\n"
        "S3Bucket(bucket_name=env['B'], bucket_folder='e2e-tenant',\n"
        "    credentials=credentials).save('e2e-archive')\n"
    )
    secrets = {"K": emulator.api_key, "A": emulator.admin_key, "S": BLOCK_SECRET}
    stack.run([sys.executable, "-c", code], env={**secrets, "M": moto_endpoint, "B": S3_BUCKET})


def test_deploy_created_the_trigger_schedules_and_janitor(e2e: E2E) -> None:
    event = e2e.stack.api("GET", "/deployments/name/falflow-pipeline/on-event")
    nightly = e2e.stack.api("GET", "/deployments/name/falflow-pipeline/nightly")
    janitor = e2e.stack.api("GET", "/deployments/name/falflow-janitor/hourly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["spec"] == "sample"
    assert janitor["schedules"][0]["schedule"]["cron"] == "17 * * * *"
    assert janitor["global_concurrency_limit"]["limit"] == 1
    assert janitor["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert event["global_concurrency_limit"]["limit"] == 4  # bursts of events queue up
    assert event["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    automations = e2e.stack.api("POST", "/automations/filter", {})
    [trigger] = [
        a["trigger"]
        for a in automations
        if any(act.get("deployment_id") == event["id"] for act in a["actions"])
    ]
    assert trigger["expect"] == ["falflow.pipeline.requested"]
    assert all(d["work_pool_name"] == POOL for d in (event, nightly, janitor))


def test_an_event_runs_the_pipeline_which_archives_everything_and_leaves_nothing_on_fal(
    e2e: E2E,
) -> None:
    started = time.monotonic()
    e2e.request("e2e-event")
    run = e2e.run_of("falflow-pipeline/on-event", "e2e-event")
    assert run["state_type"] == "COMPLETED", e2e.stack.diagnostics()
    assert run["parameters"]["spec"] == "sample"
    assert run["parameters"]["parameters"] == ONE_PROMPT  # JSON types survive the trigger
    records = e2e.assert_all_archived_and_deleted("e2e-event", len(SAMPLE))
    assert sorted(r["endpoint"] for r in records) == sorted(SAMPLE)
    print(f"event → completed pipeline: {time.monotonic() - started:.1f} s")
    # the run announced itself for automations, linked to its flow run
    [finished] = wait_for(
        "the run-finished event",
        lambda: e2e.stack.events("falflow.run.finished", "falflow.run.e2e-event"),
        30,
    )
    counts = {k: finished["payload"][k] for k in ("submitted", "archived", "deleted", "failed")}
    n = len(SAMPLE)
    assert counts == {"submitted": n, "archived": n, "deleted": n, "failed": 0}
    assert finished["payload"]["status"] == "completed"
    related = {r["prefect.resource.id"] for r in finished["related"]}
    assert f"prefect.flow-run.{run['id']}" in related


def run_janitor(e2e: E2E) -> dict[str, Any]:
    janitor = e2e.stack.deployment_id("falflow-janitor/hourly")
    flow_run_id = e2e.stack.run_deployment(janitor, {"grace_minutes": 0})

    def done() -> dict[str, Any] | None:
        [run] = e2e.stack.flow_runs(id={"any_": [flow_run_id]})
        return run if run["state_type"] in TERMINAL else None

    run: dict[str, Any] = wait_for("the janitor run", done, 120, 0.5)
    assert run["state_type"] == "COMPLETED", e2e.stack.diagnostics()
    return run


def test_a_worker_lost_with_its_run_is_finished_by_the_janitor_once_the_lease_expires(
    e2e: E2E,
) -> None:
    """A machine lost with its worker: nobody reports the flow run, which stays Running in
    Prefect forever. Its lease in the bucket expires; the janitor marks it Crashed and
    finishes its records."""
    run_key = "e2e-worker-lost"
    e2e.emulator.configure(model_latency={VIDEO: 3600.0})  # the video never ends by itself
    try:
        run = e2e.run_waiting_on_the_video(run_key)
        flow_pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
        [worker] = [
            p
            for p in e2e.stack.procs
            if p.name.startswith("worker") and flow_pid in descendants(p.popen.pid)
        ]
        os.killpg(worker.popen.pid, signal.SIGKILL)  # the worker, and the machine with it
        os.kill(flow_pid, signal.SIGKILL)
        worker.popen.wait(timeout=10)
        e2e.stack.procs.remove(worker)
        time.sleep(2)
        [still] = e2e.stack.flow_runs(id={"any_": [run["id"]]})
        assert still["state_type"] == "RUNNING"  # Prefect cannot know
        e2e.emulator.advance_clock(3700)  # fal finishes the video meanwhile
        time.sleep(LEASE_SECONDS + 1)  # the run's lease expires
    finally:
        e2e.emulator.configure(model_latency={})
        # a new machine joins the pool (a new name: the lost worker's log stays for the scans)
        e2e.stack.start_worker(POOL, "worker-3", e2e.worker_env)

    run_janitor(e2e)
    e2e.assert_all_archived_and_deleted(run_key, len(SAMPLE))
    [crashed] = e2e.stack.flow_runs(id={"any_": [run["id"]]})
    assert crashed["state_type"] == "CRASHED"
    assert "lease expired" in crashed["state"]["message"]


def test_the_janitor_spares_a_live_run_then_finishes_it_once_killed(e2e: E2E) -> None:
    run_key = "e2e-killed"
    e2e.emulator.configure(model_latency={VIDEO: 3600.0})  # the video never ends by itself
    try:
        run = e2e.run_waiting_on_the_video(run_key)
        assert SAMPLE == [IMAGE, UPSCALE, VIDEO]

        # rolling cleanup: the image leaves fal once the upscale reading it is done; the
        # upscale stays, the video (still running) reads it
        def image_deleted() -> bool:
            return any(r["endpoint"] == IMAGE for r in _in_state(e2e, run_key, "deleted"))

        wait_for("the image's rolling deletion", image_deleted, 60, 0.25)
        states = sorted(r["state"] for r in e2e.records(run_key))
        assert states == ["archived", "deleted", "submitted"]
        [upscale] = _in_state(e2e, run_key, "archived")
        assert upscale["endpoint"] == UPSCALE

        # the run is live: the janitor must not delete what its later steps may still read
        run_janitor(e2e)
        assert sorted(r["state"] for r in e2e.records(run_key)) == states
        held = {r["request_id"] for r in e2e.records(run_key) if r["state"] != "deleted"}
        assert e2e.held_on_fal({r["request_id"] for r in e2e.records(run_key)}) == held

        [run] = e2e.stack.flow_runs(id={"any_": [run["id"]]})
        assert run["state_type"] == "RUNNING"
        pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
        os.kill(pid, signal.SIGKILL)
        crashed = e2e.run_of("falflow-pipeline/on-event", run_key, timeout=60)
        assert crashed["state_type"] == "CRASHED", crashed["state_type"]
        assert sorted(r["state"] for r in e2e.records(run_key)) == states  # no cleanup ran
        e2e.emulator.advance_clock(3700)  # fal finishes the video meanwhile
    finally:
        e2e.emulator.configure(model_latency={})

    janitor_run = run_janitor(e2e)
    e2e.assert_all_archived_and_deleted(run_key, len(SAMPLE))
    artifacts = e2e.stack.api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [janitor_run["id"]]}}}
    )
    [table] = [a for a in artifacts if a["key"] == "falflow-janitor"]
    rows = table["data"] if isinstance(table["data"], list) else json.loads(table["data"])
    assert sorted((row["run"], row["before"], row["action"]) for row in rows) == [
        (run_key, "archived", "deleted"),  # the upscale
        (run_key, "submitted", "deleted"),  # the video, archived first
    ]

    # a re-run with the same run key resumes from the ledger: nothing is submitted again
    submitted = len(e2e.emulator.requests())
    e2e.request(run_key)
    deployment_id = e2e.stack.deployment_id("falflow-pipeline/on-event")

    def rerun_done() -> bool:
        runs = [
            r
            for r in e2e.stack.flow_runs(deployment_id={"any_": [deployment_id]})
            if r["parameters"].get("run_key") == run_key
        ]
        return len(runs) == 2 and all(r["state_type"] in TERMINAL for r in runs)

    wait_for("the re-run", rerun_done, 120, 0.5)
    assert len(e2e.emulator.requests()) == submitted
    e2e.assert_all_archived_and_deleted(run_key, len(SAMPLE))


def test_two_workers_on_one_pool_both_take_runs(e2e: E2E) -> None:
    pool_workers = f"/work_pools/{POOL}/workers/filter"

    alive = {p.name for p in e2e.stack.procs if p.name.startswith("worker-")}
    assert len(alive) == 2  # a lost worker (an earlier test) was replaced by a new one

    def both_online() -> bool:
        workers = e2e.stack.api("POST", pool_workers, {})
        return {w["name"] for w in workers if w["status"] == "ONLINE"} >= alive

    wait_for("two online workers", both_online, 60, 0.5)
    e2e.emulator.configure(latency_seconds=2.0)  # runs long enough to overlap
    try:
        keys = ("e2e-worker-a", "e2e-worker-b")
        e2e.request(*keys)
        runs = [e2e.run_of("falflow-pipeline/on-event", key) for key in keys]
    finally:
        e2e.emulator.configure(latency_seconds=0.2)
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    logs = {p.name: p.log.read_text() for p in e2e.stack.procs if p.name.startswith("worker-")}
    takers = {
        name for name, text in logs.items() for run in runs if f"flow run '{run['id']}'" in text
    }
    assert takers == alive, logs
    for key in keys:
        e2e.assert_all_archived_and_deleted(key, len(SAMPLE))


def test_the_webhook_receiver_emits_one_event_per_request_across_restarts(e2e: E2E) -> None:
    """``webhooks.serve`` as its own process: two receivers (a restart) get the same delivery;
    the event id derived from the request id makes the server keep one event."""
    request_id = f"e2e-webhook-{uuid.uuid4().hex[:8]}"
    body = webhook_body(request_id, {"images": [{"url": "https://x.fal.media/files/a.png"}]})
    delivery = e2e.emulator.sign_webhook(request_id, body)
    code = (
        "import sys\n"
        "from falflow.settings import load_settings\n"
        "from webhooks import serve\n"
        "serve(load_settings(), '127.0.0.1', int(sys.argv[1]))\n"
    )
    answers = []
    for attempt in ("a", "b"):
        port = free_port()
        receiver = e2e.stack.start(
            f"receiver-{attempt}", [sys.executable, "-c", code, str(port)], e2e.worker_env
        )
        base = f"http://127.0.0.1:{port}"

        def up(base: str = base) -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the webhook receiver", up, 60, 0.2)
        answer = httpx.post(
            f"{base}/fal/webhook", content=delivery.body, headers=delivery.headers, timeout=30
        )
        answers.append(answer.json())
        receiver.popen.send_signal(signal.SIGTERM)  # uvicorn drains; queued events are sent
        receiver.popen.wait(30)
    assert [a["status"] for a in answers] == ["accepted", "accepted"]  # new process, new memory
    assert answers[0]["event_id"] == answers[1]["event_id"]
    resource = f"fal.request.{request_id}"
    wait_for("the stored event", lambda: e2e.stack.events("fal.request.completed", resource), 30)
    time.sleep(1.5)  # several persister flushes: a second event would show by now
    [event] = e2e.stack.events("fal.request.completed", resource)
    assert event["id"] == answers[0]["event_id"]
    assert event["payload"]["status"] == "OK"


def test_a_run_on_blocks_tells_its_story_and_its_caller_reads_the_summary(
    e2e: E2E, moto_endpoint: str
) -> None:
    """Through ``run_deployment``, as another flow or a script would: the sample with three
    prompts, one refused by the model (one failed request, two skipped), keys and bucket from
    blocks. The run ends Failed with one readable line, its artifacts read back through the API
    tell the story, and the caller gets the summary from the persisted result."""
    parameters = {
        "spec": "sample",
        "parameters": {"prompts": ["a red fox", "a forbidden door", "a lighthouse at dusk"]},
        "run_key": "e2e-blocks",
        "fal_credentials": "e2e-tenant",
        "bucket_block": "s3-bucket/e2e-archive",
    }
    code = (
        "import asyncio, json, sys\n"
        "from prefect.deployments import run_deployment\n"
        "async def main():\n"
        "    run = await run_deployment('falflow-pipeline/on-event',\n"
        "        parameters=json.loads(sys.argv[1]), timeout=240)\n"
        "    failed = await run.state.aresult(raise_on_failure=False)\n"
        "    print(json.dumps({'id': str(run.id), 'state': run.state.type.value,\n"
        "        'message': run.state.message, 'summary': failed.summary.model_dump(mode='json')}))\n"
        "asyncio.run(main())\n"
    )
    out = e2e.stack.run([sys.executable, "-c", code, json.dumps(parameters)], timeout=300)
    run = json.loads(out.strip().splitlines()[-1])
    assert run["state"] == "FAILED", e2e.stack.diagnostics()
    assert "\n" not in run["message"]
    assert "image[1]" in run["message"]
    assert "content_policy_violation" in run["message"]
    summary = run["summary"]
    base = f"s3://{S3_BUCKET}/e2e-tenant"
    assert summary["bucket"] == base  # from the block: the workers' environment has a directory
    assert [p["item"] for p in summary["skipped"]] == ["upscale[1]", "video[1]"]
    assert summary["deleted"] == 6
    listing = httpx.get(f"{moto_endpoint}/{S3_BUCKET}?prefix=e2e-tenant/runs/e2e-blocks/").text
    assert listing.count("/files/") >= 6

    artifacts = e2e.stack.api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    by_key = {a["key"]: a for a in artifacts if a["key"]}
    assert set(by_key) == {
        "falflow-sample-summary",
        "falflow-sample-requests",
        "falflow-sample-progress",
    }
    markdown = by_key["falflow-sample-summary"]["data"]
    assert "**6 ok · 1 failed · 2 skipped** of 9 planned requests" in markdown
    assert f"`{base}/runs/e2e-blocks/`" in markdown
    assert "`upscale[1]` fal-ai/esrgan: not run: image[1] did not finish" in markdown
    rows = by_key["falflow-sample-requests"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [(r["item"], r["state"]) for r in rows][:3] == [
        ("image[0]", "deleted"),
        ("image[1]", "failed"),
        ("image[2]", "deleted"),
    ]
    assert sum(r["state"] == "skipped" for r in rows) == 2
    progress = by_key["falflow-sample-progress"]
    assert progress["description"].startswith("6 ok · 1 failed · 2 skipped")
    assert progress["data"] < 100
    task_runs = e2e.stack.api(
        "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
    )
    assert {"image #1", "upscale #1", "video #1", "cleanup"} <= {t["name"] for t in task_runs}


def files_holding(paths: list[Path], needle: str) -> list[Path]:
    """The files among ``paths`` whose raw bytes contain ``needle``."""
    found = []
    for path in paths:
        try:
            if needle.encode() in path.read_bytes():
                found.append(path)
        except FileNotFoundError:  # e.g. a -shm or -journal file removed meanwhile
            continue
    return found


def test_no_secret_is_in_the_prefect_database_the_logs_or_the_bucket(e2e: E2E) -> None:
    """Last on purpose: after every run of this module (pipelines, janitors, a killed run, the
    webhook receivers), no secret is in any file under the server's PREFECT_HOME (its SQLite
    database with the -wal and -shm files, the server, worker and receiver logs, any persisted
    result) or in the bucket. Run alone, it runs the event pipeline first."""
    run_key = "e2e-event"
    if not e2e.records(run_key):
        e2e.request(run_key)
    run = e2e.run_of("falflow-pipeline/on-event", run_key)
    assert run["state_type"] == "COMPLETED", e2e.stack.diagnostics()
    e2e.assert_all_archived_and_deleted(run_key, len(SAMPLE))  # the keys did their work
    workers = [p.popen.pid for p in e2e.stack.procs if p.name.startswith("worker-")]
    for secret in SECRETS.values():  # ...and the workers hold all three
        assert len(files_holding([Path(f"/proc/{pid}/environ") for pid in workers], secret)) == 2

    # The run's last log line (from the cleanup task) has reached the database.
    def cleanup_logged() -> bool:
        body = {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_DESC"}
        return any(
            "cleanup of run" in log["message"]
            for log in e2e.stack.api("POST", "/logs/filter", body)
        )

    wait_for("the cleanup task's log line", cleanup_logged, 30, 0.5)
    home = sorted(p for p in e2e.stack.home.rglob("*") if p.is_file())
    database = [p for p in home if p.name.startswith("prefect.db")]
    logs = [p for p in home if p.suffix == ".log"]
    bucket = sorted(p for p in e2e.bucket.rglob("*") if p.is_file())
    assert e2e.stack.home / "prefect.db" in database, home  # the server's default SQLite file
    assert {p.name for p in logs} >= {"server.log", "worker-1.log", "worker-2.log"}, logs

    # The scan finds what is there: the run key (a flow run parameter) and the cleanup's log
    # line in the database, the flow run id in a worker's log, the run key in the ledger.
    assert files_holding(database, run_key)
    assert files_holding(database, f"cleanup of run {run_key}")
    assert files_holding(logs, str(run["id"]))
    assert files_holding(bucket, f'"run_key": "{run_key}"')
    for what, secret in [*SECRETS.items(), ("the bucket block's secret", BLOCK_SECRET)]:
        assert files_holding(home + bucket, secret) == [], f"{what} leaked"
