"""falflow as users get it: the wheel built from this repository, installed into a fresh venv,
used inside a user's own Prefect project that has its own ``flows``, ``tasks`` and ``settings``.

The repository keeps falflow's code in top-level folders (``flows/``, ``tasks/``, ``settings/``,
``emulator/``, ``webhooks/``) reached through the links in ``falflow/``. Had the wheel shipped any
of them at the top level, it would collide with the user's modules of the same names: a regular
``flows`` package in site-packages even beats a user's namespace-package ``flows/`` (no
``__init__.py``) that comes earlier on ``sys.path``. So the user project below comes in both
shapes, and its flow is loaded with Prefect's entrypoint loader as a worker's flow run loads it.

Installing falflow and its dependencies into the scratch venv is a real install: the dev venv's
pip resolves and installs everything into it (``pip --python``), which skips bootstrapping a
second pip into the new venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from falflow.emulator import RunningEmulator

pytestmark = pytest.mark.timeout(900)  # the first test also pays for the wheel and the install

REPO = Path(__file__).resolve().parents[1]
FALFLOW_FOLDERS = ("flows", "tasks", "settings", "emulator", "webhooks")
"""The repository's top-level folders that must reach users only as ``falflow.<folder>``."""
NOT_SOURCE = {".git", ".venv", "venv", "build", "dist", "falflow-archive"}
"""What :func:`copy_source` leaves out at the repository's root (besides caches everywhere)."""
RESULT = "USER-FLOW-RESULT "


@dataclass(frozen=True)
class Scratch:
    """A fresh venv with the wheel installed (``falflow[emulator]``), nothing else."""

    root: Path
    python: Path
    wheel: Path

    @property
    def bin(self) -> Path:
        return self.python.parent

    def pip(self, *args: str) -> list[str]:
        """A pip command acting on this venv."""
        return [sys.executable, "-m", "pip", "--python", str(self.python), *args]


def run(
    argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on timeout the whole group (Prefect's ephemeral
    server included) is killed and the output so far reported."""
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"timed out after {timeout:.0f} s: {argv}\n{output(out, err)}")
        return subprocess.CompletedProcess(argv, process.returncode, out, err)


def output(stdout: str, stderr: str, limit: int = 12_000) -> str:
    return f"--- stdout ---\n{stdout[-limit:]}\n--- stderr ---\n{stderr[-limit:]}"


def explain(done: subprocess.CompletedProcess[str]) -> str:
    """What an assertion message needs: the command, its exit code and its output."""
    return f"{done.args} exited {done.returncode}\n{output(done.stdout, done.stderr)}"


def minimal_env() -> dict[str, str]:
    """A clean environment: none of this process's FAL*/FALFLOW_*/PREFECT_* variables, PATH
    without the dev venv."""
    env = {k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    dev_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p != dev_bin]
    env["PATH"] = os.pathsep.join(path)
    return env


def pip_env() -> dict[str, str]:
    """A clean environment plus what pip needs to reach its indexes (PIP_*, proxies, CAs)."""
    env = minimal_env()
    for name, value in os.environ.items():
        if name.startswith("PIP_") or name.lower().endswith("_proxy"):
            env[name] = value
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def venv_env(scratch: Scratch) -> dict[str, str]:
    """A clean environment with the scratch venv activated."""
    env = minimal_env()
    env["PATH"] = os.pathsep.join([str(scratch.bin), env["PATH"]])
    env["VIRTUAL_ENV"] = str(scratch.root)
    return env


def copy_source(destination: Path) -> Path:
    """The repository's working tree without VCS data, venvs and build leftovers (setuptools
    builds in the source tree: a stale ``build/lib`` would leak deleted modules into the wheel,
    and builds running at the same time would share it)."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        root = Path(folder) == REPO
        return {
            n
            for n in names
            if (root and n in NOT_SOURCE)
            or n == "__pycache__"
            or n.endswith((".egg-info", ".whl"))
            or (n.startswith(".") and n.endswith("_cache"))
        }

    shutil.copytree(REPO, destination, symlinks=True, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """falflow's wheel, built from the repository as a release would build it."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = copy_source(tmp / "source")
    started = time.monotonic()
    done = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp / "dist"), str(source)],
        env=pip_env(),
        cwd=tmp,
        timeout=300,
    )
    assert done.returncode == 0, explain(done)
    print(f"wheel built in {time.monotonic() - started:.1f} s")
    [built] = (tmp / "dist").glob("falflow-*.whl")
    return built


@pytest.fixture(scope="module")
def scratch(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    """An isolated venv (no system site-packages) with ``falflow[emulator]`` installed from the
    wheel and its dependencies from the package index (or pip's cache)."""
    root = tmp_path_factory.mktemp("scratch") / "venv"
    started = time.monotonic()
    made = run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)],
        env=minimal_env(),
        cwd=root.parent,
        timeout=120,
    )
    assert made.returncode == 0, explain(made)
    venv = Scratch(root=root, python=root / "bin" / "python", wheel=wheel)
    installed = run(
        venv.pip("install", f"{wheel}[emulator]"), env=pip_env(), cwd=root.parent, timeout=600
    )
    assert installed.returncode == 0, explain(installed)
    print(f"venv made and falflow[emulator] installed in {time.monotonic() - started:.1f} s")
    return venv


def test_the_wheel_ships_one_falflow_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        top_level = (
            archive.read(f"{dist_info}/top_level.txt").decode().split()
            if f"{dist_info}/top_level.txt" in names
            else ["falflow"]
        )

    assert re.fullmatch(r"falflow-[^-/]+\.dist-info", dist_info)
    tops = {name.split("/")[0] for name in names}
    assert tops == {"falflow", dist_info}, sorted(tops - {"falflow", dist_info})
    assert top_level == ["falflow"]
    for folder in FALFLOW_FOLDERS:
        assert f"falflow/{folder}/__init__.py" in names
    for shipped in ("falflow/py.typed", "falflow/flows/specs/sample.yaml", "falflow/cli.py"):
        assert shipped in names
    # the links in falflow/ are resolved into real files; no bytecode or caches
    links = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000]
    assert links == []
    assert [n for n in names if "__pycache__" in n or n.endswith(".pyc")] == []
    assert re.search(r"^falflow\s*=\s*falflow\.cli:main$", entry_points, re.MULTILINE)
    assert {"emulator", "webhooks"} <= set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))


def test_the_installed_package_and_its_console_script(scratch: Scratch, tmp_path: Path) -> None:
    shown = run(scratch.pip("show", "-f", "falflow"), env=pip_env(), cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, explain(shown)
    location = re.search(r"^Location: (.+)$", shown.stdout, re.MULTILINE)
    assert location is not None, explain(shown)
    assert Path(location[1]).resolve().is_relative_to(scratch.root.resolve()), explain(shown)
    files = [line.strip() for line in shown.stdout.split("Files:", 1)[1].splitlines()]
    files = [f for f in files if f]
    assert "falflow/flows/specs/sample.yaml" in files, explain(shown)
    leaked = [f for f in files if f.split("/")[0] in FALFLOW_FOLDERS]
    assert leaked == [], explain(shown)
    assert any(f.endswith("bin/falflow") for f in files), explain(shown)

    env = venv_env(scratch)
    helped = run(["falflow", "--help"], env=env, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, explain(helped)
    assert "falflow run sample" in helped.stdout, explain(helped)

    # a bucket configured but no FAL_KEY: refused before anything is submitted anywhere
    refused = run(
        ["falflow", "run", "sample"],
        env={
            **env,
            "FALFLOW_BUCKET__URL": "s3://some-bucket/x",
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
        },
        cwd=tmp_path,
        timeout=120,
    )
    assert refused.returncode == 2, explain(refused)
    assert "FAL_KEY" in refused.stderr, explain(refused)
    assert "--emulator" in refused.stderr, explain(refused)
    assert "Traceback" not in refused.stderr, explain(refused)


USER_FILES = {
    "flows/dag.py": '''\
"""The user's own module: nothing to do with falflow's flows."""

USER_DAG = "the user's dag"
''',
    "flows/poster.py": '''\
"""The user's flow: falflow's facade next to the user's own flows, tasks and settings."""

from prefect import flow

import settings
from falflow import generate, ref, retained
from flows.dag import USER_DAG
from tasks.jobs import caption


@flow(name="user-poster")
@retained
async def poster(subject: str) -> dict[str, object]:
    image = generate("fal-ai/flux/schnell", {"prompt": caption(subject)}, name="image")
    big = generate("fal-ai/esrgan", {"image_url": ref(image, "images[0].url")}, name="upscale")
    steps = [await image, await big]
    return {
        "dag": USER_DAG,
        "policy": settings.RetentionPolicy,
        "request_ids": [step.record.request_id for step in steps],
        "keys": [obj.key for step in steps for obj in step.record.objects],
    }
''',
    "tasks/__init__.py": '"""The user\'s own tasks."""\n',
    "tasks/jobs.py": """\
from prefect import task

USER_JOBS = "the user's jobs"


@task
def caption(subject: str) -> str:
    return f"{subject}, as a poster"
""",
    "settings.py": 'RetentionPolicy = "the user\'s own"\n',
}

USER_SCRIPT = f"""
import asyncio, importlib.util, json, sys
from pathlib import Path

project, venv = Path.cwd().resolve(), Path(sys.prefix).resolve()
assert sys.prefix != sys.base_prefix, "not inside the scratch venv"


def inside(module, root):
    return Path(module.__file__).resolve().is_relative_to(root)


import flows.dag, tasks.jobs, settings  # the user's own
import falflow
import falflow.flows.dsl, falflow.tasks.jobs, falflow.settings

assert settings.RetentionPolicy == "the user's own", settings
assert flows.dag.USER_DAG == "the user's dag" and tasks.jobs.USER_JOBS == "the user's jobs"
for module in (flows.dag, tasks.jobs, settings):
    assert inside(module, project), module
for package in (flows, tasks):
    assert all(Path(p).resolve().is_relative_to(project) for p in package.__path__), package
for module in (falflow, falflow.flows.dsl, falflow.tasks.jobs, falflow.settings):
    assert inside(module, venv), module
assert isinstance(falflow.Settings, type), falflow.Settings
assert falflow.Settings.__module__.startswith("falflow.settings"), falflow.Settings.__module__
for name in ("emulator", "webhooks"):
    assert importlib.util.find_spec(name) is None, importlib.util.find_spec(name)

from prefect.flows import Flow, load_flow_from_entrypoint

# as a worker's flow run loads a deployment's entrypoint (prefect.flow_engine.load_flow)
poster = load_flow_from_entrypoint("flows/poster.py:poster", use_placeholder_flow=False)
assert isinstance(poster, Flow) and poster.name == "user-poster", poster
# falflow's own flow by module path, as a deployment of the installed package names it
pipeline = load_flow_from_entrypoint(
    "falflow.flows.pipeline.run_pipeline", use_placeholder_flow=False
)
assert pipeline is falflow.run_pipeline and pipeline.name == "falflow-pipeline", pipeline

result = asyncio.run(poster("a red fox"))
print({RESULT!r} + json.dumps(result))
"""


@pytest.fixture(params=["package", "namespace"])
def user_project(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A user's Prefect project: ``flows/`` a regular package or a namespace package."""
    project = tmp_path / "project"
    for name, text in USER_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    if request.param == "package":
        (project / "flows" / "__init__.py").write_text('"""The user\'s own flows."""\n')
    return project


def test_a_users_flow_runs_end_to_end_next_to_their_own_flows_tasks_and_settings(
    scratch: Scratch, user_project: Path, emulator: RunningEmulator, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    env = {
        **venv_env(scratch),
        **emulator.client_env(),
        "FALFLOW_BUCKET__URL": archive.as_uri(),
        "FALFLOW_LIMITS__POLL_INTERVAL_SECONDS": "0.05",
        "FALFLOW_LIMITS__MAX_POLL_INTERVAL_SECONDS": "0.5",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    started = time.monotonic()
    done = run([str(scratch.python), "-c", USER_SCRIPT], env=env, cwd=user_project, timeout=300)
    print(f"user flow ran in {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, explain(done)
    [line] = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    result = json.loads(line.removeprefix(RESULT))
    assert (result["dag"], result["policy"]) == ("the user's dag", "the user's own")
    request_ids = set(result["request_ids"])
    assert len(request_ids) == 2, result
    assert all(key.startswith("runs/user-poster-") for key in result["keys"]), result

    sent = {r["request_id"]: r["endpoint_id"] for r in emulator.requests()}
    assert sorted(sent[r] for r in request_ids) == ["fal-ai/esrgan", "fal-ai/flux/schnell"]
    [run_dir] = (archive / "ledger").iterdir()  # the default run key: <flow name>-<flow run id>
    assert run_dir.name.startswith("user-poster-"), run_dir
    records = [json.loads(p.read_bytes()) for p in run_dir.glob("*.json")]
    assert sorted(r["state"] for r in records) == ["deleted", "deleted"], records
    assert {r["request_id"] for r in records} == request_ids
    for key in result["keys"]:
        assert (archive / key).is_file(), key

    inventory = emulator.inventory(hashes=False)
    assert [r for r in inventory["payloads"] if r in request_ids] == []
    assert [f["url"] for f in inventory["files"] if f.get("request_id") in request_ids] == []
