"""The ``falflow`` command: help, errors that say what to do, and ``run sample`` for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from falflow.cli import build_parser, main, parse_params


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "validate", "specs", "emulator"):
        assert f"\n    {command} " in text
    assert "falflow run sample" in text
    for command in ("run", "validate", "specs", "emulator"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: falflow " + command in capsys.readouterr().out


def test_parameters_parse_as_json_or_text(tmp_path: Path) -> None:
    params_file = tmp_path / "p.yaml"
    params_file.write_text("prompts: [a, b]\nmotion: orbit\n")
    assert parse_params(['prompts=["x"]', "seed=3", "motion=slow pan"], params_file) == {
        "prompts": ["x"],
        "seed": 3,
        "motion": "slow pan",
    }
    args = build_parser().parse_args(["run", "sample", "-p", "a=1", "--run-key", "k"])
    assert (args.spec, args.param, args.run_key) == ("sample", ["a=1"], "k")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "no-such-spec"], "no shipped spec of that name (shipped: sample"),
        (["run", "sample", "--param", "prompts"], "write NAME=VALUE"),
        (["validate", "sample", "-p", "promts=[]"], "parameter 'promts': not declared"),
        (["run", "sample", "--params-file", "missing.json"], "cannot read --params-file"),
    ],
)
def test_mistakes_exit_2_with_what_to_do(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_bad_settings_exit_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FALFLOW_BUCKET__URL", "ftp://nowhere")
    assert main(["run", "sample"]) == 2
    assert "FALFLOW_BUCKET__URL: unknown bucket scheme 'ftp'" in capsys.readouterr().err


def test_validate_and_specs_print_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "sample"]) == 0
    out = capsys.readouterr().out
    assert "upscale: fal-ai/esrgan — one request per item of 'image'" in out
    assert main(["specs"]) == 0
    assert capsys.readouterr().out.startswith("sample\n")


def test_run_sample_from_an_empty_directory_on_the_embedded_default(tmp_path: Path) -> None:
    """No FAL_KEY: the emulator in-process, ./falflow-archive, Prefect's ephemeral API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL", "PREFECT_", "SSL_CERT"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    falflow = Path(sys.executable).with_name("falflow")
    command = [str(falflow)] if falflow.exists() else [sys.executable, "-m", "falflow"]
    done = subprocess.run(
        [
            *command,
            "run",
            "sample",
            "-p",
            'prompts=["a koi pond", "a neon alley"]',
            "--run-key",
            "cli-sample",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "running against the built-in fal emulator" in done.stderr
    assert "Traceback" not in done.stderr
    assert "requests     6 made, 6 archived and verified" in done.stdout
    assert "deleted      6 requests' payloads and output files from fal" in done.stdout
    archive = tmp_path / "falflow-archive"
    assert f"{archive.as_uri()}/runs/cli-sample/" in done.stdout
    records = [
        json.loads(p.read_text()) for p in (archive / "ledger" / "cli-sample").glob("*.json")
    ]
    assert sorted(r["state"] for r in records) == ["deleted"] * 6
