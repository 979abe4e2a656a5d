"""The catalogue of bad inputs: each is refused by ``falflow`` with exit status 2 and one clear
message naming the variable, file or field, no traceback, and nothing submitted to fal.

The CLI runs in this process against the session's emulator (``FAL_KEY`` and the fal hosts set
as for a real account) with a fresh working directory per case; "nothing submitted" is read off
the emulator's own request log, and "nothing archived" off the bucket directory. Hostile outputs
(too many refused URLs, too many files, too deep) are in ``tests/tasks/test_large_outputs.py``;
hostile webhook traffic in ``tests/webhooks/test_slow_clients.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from falflow.cli import main
from falflow.emulator import RunningEmulator
from falflow.flows.dsl import generate
from falflow.flows.spec import SpecError, load_pipeline
from falflow.flows.spec.loader import read_text_file

STEP = "steps:\n  - name: image\n    endpoint: fal-ai/flux/schnell\n"


def _alias_bomb() -> str:
    """A billion values from 600 bytes: each level repeats the one before nine times."""
    lines = ['params:\n  p0: {default: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]}']
    for level in range(1, 10):
        lines.append(f"  p{level}: {{default: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]}}")
    return "\n".join(lines) + "\n" + STEP + "    arguments: {prompt: '{{ params.p9 }}'}\n"


def _alias_chain(levels: int) -> str:
    lines = ['params:\n  p0: {default: &a0 ["x"]}']
    for level in range(1, levels):
        lines.append(f"  p{level}: {{default: &a{level} [*a{level - 1}, *a{level - 1}]}}")
    return "\n".join(lines) + "\n" + STEP + f"    arguments: {{prompt: x, l: *a{levels - 1}}}\n"


def _nested(depth: int) -> str:
    return STEP + "    arguments: {prompt: x, deep: " + "[" * depth + "]" * depth + "}\n"


@dataclass
class Case:
    argv: list[str]
    expected: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes | str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # settings: a typo, a wrong type or an unsafe combination never falls back to a default
    "typo-in-env": Case(
        ["run", "sample"],
        "FALFLOW_BUCKET_URL (environment): not a falflow setting; did you mean FALFLOW_BUCKET__URL?",
        env={"FALFLOW_BUCKET_URL": "s3://somewhere/else"},
    ),
    "typo-in-dotenv": Case(
        ["run", "sample"],
        "FALFLOW_RETENTON__MEDIA_TTL_SECONDS (.env): not a falflow setting; did you mean "
        "FALFLOW_RETENTION__MEDIA_TTL_SECONDS?",
        files={".env": "FALFLOW_RETENTON__MEDIA_TTL_SECONDS=60\n"},
    ),
    "lowercase-typo": Case(
        ["run", "sample"],
        "FALFLOW_LIMITS__DELETS (environment): not a falflow setting; did you mean "
        "FALFLOW_LIMITS__DELETES?",
        env={"falflow_limits__delets": "3"},
    ),
    "key-under-falflow-prefix": Case(
        ["run", "sample"], "did you mean FAL_KEY?", env={"FALFLOW_FAL_KEY": "x"}
    ),
    "overrides-bad-json": Case(
        ["run", "sample"],
        "FALFLOW_RETENTION__OVERRIDES (environment): not valid JSON",
        env={"FALFLOW_RETENTION__OVERRIDES": "{bad json"},
    ),
    "cdn-hosts-not-json": Case(
        ["run", "sample"],
        "FALFLOW_FAL__CDN_HOSTS (environment): not valid JSON",
        env={"FALFLOW_FAL__CDN_HOSTS": "fal.media"},
    ),
    "dotenv-not-utf8": Case(
        ["run", "sample"],
        ".env: not UTF-8 text (byte 0xe9 on line 2)",
        files={".env": b"FALFLOW_LIMITS__DELETES=3\nFALFLOW_X=caf\xe9\n"},
    ),
    "fal-key-with-newline": Case(
        ["run", "sample"], "FAL_KEY: is not a usable fal key", env={"FAL_KEY": "id:se\ncret"}
    ),
    "memory-bucket": Case(
        ["run", "sample"],
        "a memory:// bucket dies with the process",
        env={"FALFLOW_BUCKET__URL": "memory://x"},
    ),
    "ttl-too-short": Case(
        ["run", "sample"],
        "FALFLOW_RETENTION__MEDIA_TTL_SECONDS: must be at least 60 seconds",
        env={"FALFLOW_RETENTION__MEDIA_TTL_SECONDS": "5"},
    ),
    "store-io-off-forever": Case(
        ["run", "sample"],
        "would keep every output file on fal forever",
        env={
            "FALFLOW_RETENTION__STORE_IO": "false",
            "FALFLOW_RETENTION__MEDIA_TTL_SECONDS": "never",
        },
    ),
    "bucket-under-a-file": Case(
        ["run", "sample"],
        "FALFLOW_BUCKET__URL: cannot create the bucket directory",
        env={"FALFLOW_BUCKET__URL": "file://./a-file/archive"},
        files={"a-file": "not a directory"},
    ),
    "run-key-escape": Case(
        ["run", "sample", "--run-key", "../../escape"], "run key '../../escape'"
    ),
    # specs and parameters: bounded, readable, naming the file
    "alias-bomb": Case(
        ["run", "bomb.yaml"], "expands to more than 1,000,000 values", files={"bomb.yaml": ""}
    ),
    "alias-chain-60": Case(
        ["run", "chain.yaml"], "expands to more than 1,000,000 values", files={"chain.yaml": ""}
    ),
    "list-50000-deep": Case(
        ["run", "deep.yaml"], "nested far deeper than a spec", files={"deep.yaml": ""}
    ),
    "list-80-deep": Case(
        ["run", "deep80.yaml"],
        "nested deeper than 64 levels (at steps[0].arguments.deep",
        files={"deep80.yaml": ""},
    ),
    "spec-not-utf8": Case(
        ["run", "latin1.yaml"],
        "latin1.yaml is not UTF-8 text (byte 0xe9 on line 4)",
        files={"latin1.yaml": (STEP + "    arguments: {prompt: caf\xe9}\n").encode("latin-1")},
    ),
    "params-not-utf8": Case(
        ["run", "sample", "--params-file", "p.json"],
        "p.json is not UTF-8 text",
        files={"p.json": '{"prompts": ["caf\xe9"]}'.encode("latin-1")},
    ),
    "params-file-deep": Case(
        ["run", "sample", "--params-file", "p.json"],
        "--params-file 'p.json'",
        files={"p.json": '{"prompts": ' + "[" * 5000 + "]" * 5000 + "}"},
    ),
    "param-deep": Case(
        ["run", "sample", "--param", "prompts=" + "[" * 5000 + "]" * 5000],
        "invalid --param 'prompts':\n  - nested far deeper than parameters may be",
    ),
    "params-file-missing": Case(
        ["run", "sample", "--params-file", "missing.json"], "cannot read missing.json"
    ),
    "endpoint-traversal": Case(
        ["run", "evil.yaml"],
        "step 'image' (steps[0]), field 'endpoint': must be a fal endpoint id",
        files={
            "evil.yaml": "steps:\n  - name: image\n"
            "    endpoint: emulator/../../v1/models/requests/x/payloads\n"
        },
    ),
    "unknown-field": Case(
        ["run", "typo.yaml"],
        "step 'image' (steps[0]), field 'argments': unknown field",
        files={"typo.yaml": STEP + "    argments: {prompt: x}\n"},
    ),
    "cycle": Case(
        ["run", "cycle.yaml"],
        "steps form a cycle",
        files={
            "cycle.yaml": "steps:\n"
            "  - {name: a, endpoint: fal-ai/esrgan, arguments: {image_url: '{{ steps.b.x }}'}}\n"
            "  - {name: b, endpoint: fal-ai/esrgan, arguments: {image_url: '{{ steps.a.x }}'}}\n"
        },
    ),
}
_GENERATED = {
    "bomb.yaml": _alias_bomb,
    "chain.yaml": lambda: _alias_chain(60),
    "deep.yaml": lambda: _nested(50_000),
    "deep80.yaml": lambda: _nested(80),
}


@pytest.fixture
def on_the_emulator(
    emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> RunningEmulator:
    """A working directory of its own and the environment of a configured fal account."""
    monkeypatch.chdir(tmp_path)
    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FALFLOW_BUCKET__URL", f"file://{tmp_path / 'archive'}")
    return emulator


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_clear_message_and_submits_nothing(
    name: str,
    on_the_emulator: RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = CASES[name]
    for file_name, content in case.files.items():
        content = _GENERATED[file_name]() if file_name in _GENERATED else content
        path = tmp_path / file_name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    for variable, value in case.env.items():
        monkeypatch.setenv(variable, value)
    requests_before = len(on_the_emulator.requests())

    try:
        status = main(case.argv)
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    err = capsys.readouterr().err

    assert status == 2, err
    assert case.expected in err
    assert "Traceback" not in err
    assert len(err) < 2000
    assert len(on_the_emulator.requests()) == requests_before
    assert not list((tmp_path / "archive").glob("runs/*"))


def test_a_long_chain_written_last_step_first_validates_without_recursion(
    tmp_path: Path,
) -> None:
    steps = []
    for n in reversed(range(3000)):
        reads = f", image_url: '{{{{ steps.s{n - 1}.images[0].url }}}}'" if n else ""
        steps.append(f"  - {{name: s{n}, endpoint: fal-ai/esrgan, arguments: {{x: {n}{reads}}}}}")
    pipeline = load_pipeline("steps:\n" + "\n".join(steps) + "\n")
    assert [s.name for s in pipeline.steps[:3]] == ["s0", "s1", "s2"]


def test_an_unreadable_spec_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=f"cannot read {tmp_path}"):
        read_text_file(tmp_path, "spec 'x'")  # a directory: reading it fails like a locked file


def test_a_spec_from_a_mapping_is_bounded_too() -> None:
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    spec = json.loads(json.dumps({"steps": [{"name": "a", "endpoint": "fal-ai/esrgan"}]}))
    spec["steps"][0]["arguments"] = {"deep": deep}
    with pytest.raises(SpecError, match="nested deeper than 64 levels"):
        load_pipeline(spec)


@pytest.mark.parametrize(
    "endpoint",
    [
        "emulator/../../v1/models/requests/x/payloads",
        "fal-ai/flux?x=1",
        "fal-ai//flux",
        "/fal-ai/flux",
        "fal-ai/flux/schnell#x",
        "fal ai/flux",
        "fal-ai/%2e%2e/flux",
    ],
)
def test_the_python_api_refuses_an_endpoint_id_that_is_not_one(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint must be a fal endpoint id"):
        generate(endpoint, {})  # refused before it even looks for a retention scope
