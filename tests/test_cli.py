"""The ``falflow`` command: help, errors that say what to do, and ``run sample`` for real."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from falflow.cli import build_parser, main, parse_params
from falflow.emulator import RunningEmulator


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
        (["run", "sample", "--params-file", "missing.json"], "cannot read missing.json"),
        (["run", "sample", "--shard-size", "2", "--run-key", "k" * 115], "--run-key: shard run"),
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


def _falflow(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``falflow`` command in ``cwd`` with nothing configured but ``env``."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("FAL", "PREFECT_", "SSL_CERT"))
    }
    falflow = Path(sys.executable).with_name("falflow")
    command = [str(falflow)] if falflow.exists() else [sys.executable, "-m", "falflow"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**clean, "PREFECT_HOME": str(cwd / "prefect-home"), **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_run_sample_from_an_empty_directory_on_the_embedded_default(tmp_path: Path) -> None:
    """No FAL_KEY: the emulator in-process, ./falflow-archive, Prefect's ephemeral API."""
    done = _falflow(
        tmp_path, "run", "sample", "-p", 'prompts=["a koi pond", "a neon alley"]',
        "--run-key", "cli-sample",
    )  # fmt: skip
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
    assert all(r["deletion"]["confirmed_at"] for r in records)
    assert "at the end the emulator holds 0 payloads and 0 files" in done.stderr
    assert "run page" not in done.stdout  # the ephemeral API has no UI to link to


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_on_a_prefect_server_links_its_run_page(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from falflow.cli import _run_flow, format_summary
    from falflow.flows.summary import RunProgress

    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FALFLOW_BUCKET__URL", (tmp_path / "archive").as_uri())
    run = _run_flow("sample", {"prompts": ["a koi pond"]}, RunProgress(), progress=False)
    summary, link = asyncio.run(run)
    assert summary.ok
    assert link is not None
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}", link), link
    assert f"  run page     {link}" in format_summary(summary, "fal", link)


def test_run_with_a_shard_size_runs_each_shard_with_its_own_ledger(tmp_path: Path) -> None:
    done = _falflow(
        tmp_path, "run", "sample", "-p", 'prompts=["a koi pond", "a neon alley", "a red fox"]',
        "--run-key", "cli-sharded", "--shard-size", "2", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "requests     9 made, 9 archived and verified" in done.stdout
    assert "/ledger/cli-sharded.shard-<0..1>/" in done.stdout  # where the shards' ledgers are
    ledger = tmp_path / "falflow-archive" / "ledger"
    assert sorted(p.name for p in ledger.iterdir()) == [
        "cli-sharded.shard-0",
        "cli-sharded.shard-1",
    ]
    assert [len(list((ledger / p).glob("*.json"))) for p in sorted(ledger.iterdir())] == [6, 3]
    assert "at the end the emulator holds 0 payloads and 0 files" in done.stderr


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("FALFLOW_BUCKET__URL", "s3://team-bucket/falflow", "a bucket (FALFLOW_BUCKET__*)"),
        ("PREFECT_API_URL", "http://127.0.0.1:9/api", "a Prefect API (PREFECT_API_URL)"),
    ],
)
def test_no_fal_key_with_a_real_setup_refuses_instead_of_using_the_emulator(
    variable: str,
    value: str,
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.delenv("FAL_ADMIN_KEY", raising=False)
    monkeypatch.setenv(variable, value)
    assert main(["run", "sample", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"FAL_KEY is not set, but {named} is configured: nothing was submitted" in err
    assert "--emulator" in err
    assert "running against the built-in fal emulator" not in err


def test_emulator_flag_runs_on_the_emulator_into_the_configured_bucket(tmp_path: Path) -> None:
    bucket = tmp_path / "team-bucket"
    done = _falflow(
        tmp_path, "run", "sample", "--emulator", "--run-key", "flag",
        "-p", 'prompts=["a koi pond"]', "--no-progress",
        FALFLOW_BUCKET__URL=bucket.as_uri(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "running against the built-in fal emulator (not fal)" in done.stderr
    records = [json.loads(p.read_text()) for p in (bucket / "ledger" / "flag").glob("*.json")]
    assert sorted(r["state"] for r in records) == ["deleted"] * 3


def test_doctor_reports_the_accounts_defaults_and_applies_the_policy_only_when_asked(
    emulator: RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    emulator.set_storage_settings(expiration_duration_seconds=None, initial_acl=None)
    try:
        assert main(["doctor"]) == 1
        out = capsys.readouterr().out
        assert "FAIL account default media TTL: never" in out
        assert "FAIL account default ACL: public" in out
        assert "fix: run `falflow doctor --apply`" in out
        assert "ok   payload deletion (FAL_ADMIN_KEY): allowed" in out
        assert emulator.storage_settings().expiration_duration_seconds is None  # only read

        assert main(["doctor", "--apply"]) == 0
        out = capsys.readouterr().out
        assert "account      media TTL never, default ACL public (system default)" in out
        assert "applied      media TTL 604800 s, default ACL forbid" in out
        saved = emulator.storage_settings()
        assert saved.expiration_duration_seconds == 7 * 24 * 3600
        assert saved.initial_acl is not None
        assert saved.initial_acl.default == "forbid"
        assert main(["doctor"]) == 0
        assert emulator.api_key not in capsys.readouterr().out
    finally:
        emulator.reset()
