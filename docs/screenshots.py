"""Screenshots of a falflow run page in the Prefect UI, to look at what a Prefect user sees.

Starts a real ``prefect server`` (UI on, loopback, a temporary PREFECT_HOME) and the fal emulator
in its own process, runs the sample through the ``falflow`` CLI with three prompts of which the
emulator refuses one (one failed request, two skipped), then photographs the run page (task runs
and logs) and its three artifacts with headless Chromium (``apt-get install -y chromium``).

    .venv/bin/python docs/screenshots.py [--out docs/screenshots]

Prints where the PNGs went. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support: the same Prefect stack the e2e tests start

from falflow.emulator import EmulatorConfig, start_emulator_process  # noqa: E402
from tests.support.stack import BIN, prefect_stack  # noqa: E402

PROMPTS = '["a red fox in fresh snow", "a forbidden door", "a lighthouse on a cliff at dusk"]'
"""The emulator refuses a prompt holding ``forbidden`` (content_policy_violation)."""
ARTIFACTS = ("summary", "requests", "progress")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium: apt-get install -y chromium")


def shoot(url: str, path: Path, *, height: int = 1300) -> None:
    """One PNG of ``url`` once the UI's scripts have run (virtual time lets them settle)."""
    subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            # nothing but 127.0.0.1: no update checks, metrics or fonts from the internet
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--window-size=1600,{height}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    out: Path = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    config = EmulatorConfig(latency_seconds=0.3, video_size_bytes=512 * 1024)
    with (
        tempfile.TemporaryDirectory(prefix="falflow-shots-") as tmp,
        start_emulator_process(config) as emulator,
        prefect_stack(Path(tmp), ui=True) as stack,
    ):
        env = {**emulator.client_env(), "FALFLOW_BUCKET__URL": (Path(tmp) / "bucket").as_uri()}
        argv = [str(BIN / "falflow"), "run", "sample", "--no-progress"]
        argv += ["--param", f"prompts={PROMPTS}", "--run-key", "screenshots"]
        done = subprocess.run(
            argv, cwd=REPO, env={**stack.env, **env}, capture_output=True, text=True, timeout=300
        )
        print(done.stdout)
        found = re.search(r"run page\s+(\S+/runs/flow-run/(\S+))", done.stdout)
        if found is None:
            raise SystemExit(f"no run page link in the CLI's output:\n{done.stderr}")
        run_url, flow_run_id = found.groups()
        shoot(run_url, out / "run.png", height=1700)  # the task runs and every log line
        ui = run_url.split("/runs/")[0]
        artifacts = stack.api(
            "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        by_key = {a["key"]: a["id"] for a in artifacts if a["key"]}
        for kind in ARTIFACTS:
            key = f"falflow-sample-{kind}"
            shoot(f"{ui}/artifacts/artifact/{by_key[key]}", out / f"artifact-{kind}.png")


if __name__ == "__main__":
    main()
