"""A flow run whose console reader dies (its process worker) goes on to the end.

The flow runs in a real child process against the session's Prefect API, its stderr a pipe the
test reads, as a process worker does; the test closes the pipe mid-run, as a dying worker does.
Without :func:`outlive_the_console` the same run ends with ``SystemExit`` (rich's answer to a
broken pipe): the control case shows the hazard is real with the installed Prefect and rich.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

CHILD = """
import sys
from pathlib import Path

import anyio
from prefect import flow, get_run_logger

from falflow.flows.console import outlive_the_console

folder, outlive = Path(sys.argv[1]), sys.argv[2] == "outlive"


@flow
async def chatty() -> int:
    if outlive:
        outlive_the_console()
    log = get_run_logger()
    log.info("before the reader is gone")
    while not (folder / "reader-gone").exists():
        await anyio.sleep(0.05)
    for i in range(50):
        log.info("line %d after the reader is gone", i)
    return 50


state = anyio.run(lambda: chatty(return_state=True))
(folder / "finished").write_text(state.type.value)
"""


@pytest.mark.parametrize("outlive", [True, False], ids=["outlived", "control"])
def test_a_flow_run_outlives_the_reader_of_its_console(
    prefect_harness: None, tmp_path: Path, outlive: bool
) -> None:
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    argv = [sys.executable, "-c", CHILD, str(tmp_path), "outlive" if outlive else "control"]
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert child.stderr is not None
        seen = b""
        deadline = time.monotonic() + 120
        while b"before the reader is gone" not in seen:
            line = child.stderr.readline()
            assert line, seen.decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            seen += line
        child.stderr.close()  # the worker is gone
        (tmp_path / "reader-gone").touch()
        code = child.wait(timeout=120)
    finally:
        child.kill()
    if outlive:
        assert (code, (tmp_path / "finished").read_text()) == (0, "COMPLETED")
    else:
        assert code != 0
        assert not (tmp_path / "finished").exists()
