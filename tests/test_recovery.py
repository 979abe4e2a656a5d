"""Recovery converges: ``falflow run`` SIGKILLed at random moments of a chained pipeline with
fal faulting, resumed, a second run key killed and abandoned, then ``falflow janitor`` with its
defaults (the grace period shortened through its option): nothing is left on fal, failed
requests included; no job is left ``submit_unknown``; nothing was submitted twice; every
archived object re-hashes right."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from falflow.emulator import Faults, RunningEmulator
from falflow.tasks.models import JobRecord, JobState

pytestmark = pytest.mark.slow

TAG = f"recovery-{os.getpid()}"
SPEC = """
name: recovery
params:
  words: {type: list}
steps:
  - name: first
    endpoint: emulator/echo
    for_each: "{{ params.words }}"
    arguments:
      output: {word: "{{ item }}"}
      files: [{size: 3000}]
      latency_seconds: 0.4
  - name: second
    endpoint: emulator/echo
    for_each: "{{ steps.first }}"
    arguments:
      output: {from: "{{ item.files[0].url }}"}
      files: [{size: 1000}]
      latency_seconds: 0.4
"""
FAULTS = Faults(
    ingress_503=0.05,
    connection_reset=0.02,
    truncated_download=0.05,
    model_error=0.1,
    lost_submit_answer=0.05,
    seed=7,
)


@pytest.fixture
def faulty(emulator: RunningEmulator) -> Iterator[RunningEmulator]:
    emulator.set_faults(FAULTS)
    yield emulator
    emulator.reset()


def _env(emulator: RunningEmulator, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FAL", "PREFECT_"))}
    return {
        **base,
        **emulator.client_env(),
        "FALFLOW_BUCKET__URL": (tmp_path / "bucket").as_uri(),
        "FALFLOW_LIMITS__POLL_INTERVAL_SECONDS": "0.1",
        "FALFLOW_LIMITS__LEASE_SECONDS": "10",
        "FALFLOW_RETENTION__START_TIMEOUT_SECONDS": "5",  # lost submits resolve in seconds
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }


def _falflow(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "falflow", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed whole, like a lost machine
    )


def _run(run_key: str) -> list[str]:
    words = json.dumps([f"{TAG}-{run_key}-{n}" for n in range(10)])  # each run its own inputs
    return ["run", "spec.yaml", "--run-key", run_key, "--no-progress", "-p", f"words={words}"]


def _run_and_kill(env: dict[str, str], cwd: Path, run_key: str, after: float) -> None:
    """Start a run and SIGKILL it ``after`` seconds after its first ledger record (on a loaded
    machine a run takes long to start: counted from the start, the kill could land before it)."""
    process = _falflow(env, cwd, *_run(run_key))
    ledger = cwd / "bucket" / "ledger" / run_key
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline and not any(ledger.glob("*")):
        time.sleep(0.1)
    time.sleep(after)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _finish(env: dict[str, str], cwd: Path, *args: str) -> str:
    process = _falflow(env, cwd, *args)
    out, _ = process.communicate(timeout=300)
    assert process.returncode in (0, 1), out  # 1: some request failed on fal (faults)
    return out


def _made_since(emulator: RunningEmulator, before: set[str]) -> dict[str, dict[str, object]]:
    """The requests made since ``before`` (other tests share the emulator), by request id."""
    return {str(r["request_id"]): r for r in emulator.requests() if r["request_id"] not in before}


def test_killed_and_abandoned_runs_converge_with_the_janitor(
    prefect_harness: None, faulty: RunningEmulator, tmp_path: Path
) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    before = {str(r["request_id"]) for r in faulty.requests()}
    env = _env(faulty, tmp_path)
    rng = random.Random(7)

    for _ in range(3):
        _run_and_kill(env, tmp_path, "resumed", rng.uniform(1.0, 8.0))
    _finish(env, tmp_path, *_run("resumed"))
    _run_and_kill(env, tmp_path, "abandoned", rng.uniform(2.0, 8.0))

    faulty.set_faults(Faults())  # fal behaves again: what is left must now converge
    time.sleep(11)  # the abandoned run's lease (10 s) expires; Prefect still calls it Running
    report = _finish(env, tmp_path, "janitor", "--grace-minutes", "0")
    print(report)

    records = [
        JobRecord.model_validate_json(p.read_bytes())
        for p in (tmp_path / "bucket" / "ledger").rglob("*.json")
    ]
    assert records
    print(Counter((r.run_key, r.state.value) for r in records))
    abandoned = [r for r in records if r.run_key == "abandoned"]
    assert abandoned  # the kill came after some of its requests were recorded
    assert not [r for r in records if r.state is JobState.SUBMIT_UNKNOWN or r.submit_unknown]
    ours = _made_since(faulty, before)
    assert len(ours) >= 20
    held = faulty.inventory(hashes=False)
    assert not set(ours) & set(held["payloads"])
    assert not [f for f in held["files"] if f["request_id"] in ours]
    # no request was made twice: one request per distinct input at most
    inputs = Counter(
        re.sub(r"\?identity=[^\"]*", "", json.dumps(r["arguments"], sort_keys=True))  # unsigned
        for r in ours.values()
    )
    assert max(inputs.values()) == 1, inputs.most_common(2)
    for record in records:
        for obj in record.objects:
            data = (tmp_path / "bucket" / obj.key).read_bytes()
            assert hashlib.sha256(data).hexdigest() == obj.sha256, obj.key
