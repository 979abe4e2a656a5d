"""The ``falflow`` command: run a pipeline spec with retention done right, locally or on real fal.

With ``FAL_KEY`` (and a bucket) it runs against real fal. With nothing configured at all it runs
the embedded default: the built-in fal emulator in-process, ``./falflow-archive`` as the bucket
and Prefect's ephemeral API. The emulator is never a silent fallback: without ``FAL_KEY`` but with
a bucket or a Prefect API configured, ``run`` refuses (fake outputs must not land in a real
bucket); ``--emulator`` asks for it explicitly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import traceback
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

    from falflow.flows.spec import Pipeline
    from falflow.flows.summary import RunProgress, RunSummary
    from falflow.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_PREFECT_DEFAULTS = {
    # The ephemeral API's first start migrates a new database: over Prefect's 20 s on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the client-side switch: without it Prefect prints its telemetry notice over the progress bar
    "DO_NOT_TRACK": "1",
}
_QUIET_PREFECT = {
    # Prefect's own console lines (temporary server, task states, tracebacks of failed lanes)
    # would tear the progress bar apart; they still reach the Prefect API. --verbose keeps them.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
}

_EPILOG = """\
examples:
  falflow run sample                          # the shipped sample (the emulator if nothing is set up)
  falflow run sample --emulator               # on the built-in emulator, whatever is configured
  falflow run sample --param 'prompts=["a koi pond", "a neon alley"]'
  falflow run my-pipeline.yaml --params-file params.json --run-key nightly-2025-01-31
  falflow validate my-pipeline.yaml           # check a spec without submitting anything
  falflow specs                               # list the shipped specs
  falflow doctor                              # the fal account's own defaults vs the policy
  falflow janitor                             # finish what killed or crashed runs left on fal
  falflow verify nightly-2025-01-31           # re-hash a run's archive against its ledger
  falflow emulator --port 8443                # a local fal for other tools; prints what to export
  falflow webhooks serve --port 8780          # fal webhooks -> verified -> Prefect events

configuration (environment or .env): FAL_KEY, FAL_ADMIN_KEY, FALFLOW_BUCKET__URL
(file://, s3://, gs://, az://), FALFLOW_RETENTION__MEDIA_TTL_SECONDS, FALFLOW_LIMITS__*;
PREFECT_API_URL to record runs on a Prefect server instead of the ephemeral API.
"""


class CliError(Exception):
    """A problem the user can fix; the message says how. Exits 2 without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falflow",
        description=_para(
            "Run generative-media pipelines on fal under Prefect with the data-retention policy "
            "done right: every request carries the retention headers, every output is copied "
            "into your bucket and verified, then fal's copy is deleted."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a pipeline spec end to end (on fal with FAL_KEY, or on the emulator)",
        description=_para(
            "Validate the spec and its parameters, run every step as soon as what it needs is "
            "done, archive every output into the bucket, then delete fal's copy of everything "
            "archived. With nothing configured (no FAL_KEY, bucket or Prefect API) the built-in "
            "fal emulator runs in this process and the bucket is ./falflow-archive; without "
            "FAL_KEY but with a bucket or Prefect API configured it refuses unless --emulator "
            "is given. Exit status: 0 all archived and cleaned, "
            "1 some request failed or is left on fal (the summary says which), 2 invalid spec, "
            "parameters or settings (nothing submitted), 130 interrupted."
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              falflow run sample
              falflow run sample --param 'prompts=["a koi pond"]' --param motion='slow orbit'
              falflow run ./pipeline.yaml --params-file params.yaml --run-key nightly-01
            re-running with the same --run-key resumes: recorded requests are never re-submitted.
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _spec_arguments(run)
    run.add_argument(
        "--run-key",
        type=_run_key,
        help="name of the run in the bucket (ledger/RUN_KEY/); reuse it to resume a run",
    )
    run.add_argument(
        "--shard-size",
        type=_shard_size,
        metavar="N",
        help="split the batch into shards of N items, each its own run (RUN_KEY.shard-I) with "
        "its own ledger; here they run one after another, on a work pool side by side",
    )
    run.add_argument(
        "--emulator",
        action="store_true",
        help="run against the built-in fal emulator (needs falflow[emulator]), even with FAL_KEY",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument(
        "--json", action="store_true", help="print the summary as JSON on stdout instead of text"
    )
    run.add_argument(
        "--verbose", action="store_true", help="show Prefect's own log lines (and tracebacks)"
    )

    janitor = commands.add_parser(
        "janitor",
        help="finish what crashed, killed or abandoned runs left on fal",
        description=_para(
            "Archive what crashed or killed runs completed, delete fal's copy of every verified "
            "archive (and of failed requests), resolve lost submits through fal's listing, and "
            "report requests no ledger knows. Runs whose lease in the bucket is still valid are "
            "left alone, and so are records changed within the grace period. Exit status 0 "
            "when nothing needs attention, 1 with the problems listed."
        ),
        epilog="examples:\n  falflow janitor\n  falflow janitor --grace-minutes 0 --keep-on-fal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    janitor.add_argument(
        "--grace-minutes",
        type=float,
        default=15.0,
        help="leave records changed this recently alone (default 15)",
    )
    janitor.add_argument(
        "--keep-on-fal",
        action="store_true",
        help="archive only: do not delete anything from fal",
    )
    janitor.add_argument(
        "--adopt-orphans",
        action="store_true",
        help="also archive and delete fal requests no ledger knows (an account used by falflow "
        "alone)",
    )
    janitor.add_argument(
        "--verify-sample",
        type=int,
        default=0,
        metavar="N",
        help="also re-hash N archived objects, picked at random across every run, against the "
        "ledger (damage is a problem)",
    )
    janitor.add_argument(
        "--verbose", action="store_true", help="show Prefect's own log lines (and tracebacks)"
    )

    verify = commands.add_parser(
        "verify",
        help="re-read a run's archive from the bucket and compare it with its ledger",
        description=_para(
            "Read back every file a run archived, re-hash it and compare size and sha256 with "
            "its ledger record; check that the JSON documents the records name exist. Exit "
            "status 0 when all match, 1 with every missing or changed object listed, 2 for an "
            "unknown run key or invalid settings."
        ),
        epilog="example:\n  falflow verify nightly-2025-01-31",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("run_key", metavar="RUN_KEY", help="the run's key (ledger/RUN_KEY/)")

    doctor = commands.add_parser(
        "doctor",
        help="check the fal account's own retention defaults and the keys' permissions",
        description=_para(
            "Read the fal account's storage defaults (the media TTL and ACL of files stored "
            "without falflow's lifecycle header) and check what FAL_KEY and FAL_ADMIN_KEY may do "
            "(list requests, delete payloads, hide and sign files), side by side with the "
            "retention policy. Exit status 0 when everything fits, 1 with what to fix."
        ),
        epilog="examples:\n  falflow doctor\n  falflow doctor --apply   # set the account's "
        "defaults to the policy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument(
        "--apply",
        action="store_true",
        help="set the account's defaults to the policy (PUT /v1/storage/settings), never implied",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    validate = commands.add_parser(
        "validate",
        help="check a spec and its parameters without submitting anything",
        description=_para(
            "Load and validate a spec (unknown fields, types, references, cycles, fan-out "
            "shapes) and its parameters, then print the plan. Exit status 0 when valid, 2 if not."
        ),
        epilog='example:\n  falflow validate sample --param \'prompts=["one", "two"]\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _spec_arguments(validate)

    commands.add_parser(
        "specs",
        help="list the specs shipped with falflow",
        description="List the pipeline specs shipped in flows/specs (use their name with run).",
    )

    emulator = commands.add_parser(
        "emulator",
        help="serve the fal emulator for other tools and print what to export",
        description=_para(
            "Serve the built-in fal emulator (queue, CDN, uploads, Platform API) over HTTPS on "
            "127.0.0.1 until interrupted, and print the environment variables that point "
            "fal_client and falflow at it."
        ),
        epilog="example:\n  falflow emulator --port 8443   # then paste the printed exports",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    emulator.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")

    webhooks = commands.add_parser(
        "webhooks",
        help="receive fal's webhooks and turn them into Prefect events",
        description=_para(
            "fal webhook deliveries: 'serve' runs a small HTTP receiver that verifies fal's "
            "Ed25519 signatures (keys from FALFLOW_WEBHOOKS__JWKS_URL, cached at most 24 h), "
            "refuses stale, forged or tampered deliveries, acknowledges repeats once, and emits "
            "fal.request.completed / fal.request.failed events to the Prefect API "
            "(PREFECT_API_URL) for automations to react to."
        ),
        epilog=(
            "example:\n  PREFECT_API_URL=http://127.0.0.1:4200/api falflow webhooks serve --port 8780"
            "\n  # then submit with fal_webhook=https://<public host>/fal/webhook"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    webhook_commands = webhooks.add_subparsers(dest="webhooks_command", required=True)
    serve = webhook_commands.add_parser(
        "serve",
        help="run the receiver until interrupted",
        description="Run the webhook receiver until interrupted (settings: FALFLOW_WEBHOOKS__*).",
    )
    serve.add_argument("--host", help="interface to listen on (default FALFLOW_WEBHOOKS__HOST)")
    serve.add_argument("--port", type=int, help="port (default FALFLOW_WEBHOOKS__PORT, 8780)")
    return parser


def _para(text: str) -> str:
    return textwrap.fill(text, 88)


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", help="a shipped spec's name (see `falflow specs`), or a .yaml/.json file path"
    )
    parser.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter; VALUE is read as JSON when it parses, else as text "
        "(repeatable; wins over --params-file)",
    )
    parser.add_argument(
        "--params-file", type=Path, help="a YAML or JSON file mapping parameter names to values"
    )


def parse_params(pairs: Sequence[str], params_file: Path | None) -> dict[str, Any]:
    """``--params-file`` then ``--param NAME=VALUE`` (JSON if it parses, else text).

    Raises:
        SpecError: naming the file or the ``--param`` that cannot be read or is not valid.
    """
    from falflow.flows.spec import SpecError
    from falflow.flows.spec.loader import read_document, read_text_file

    params: dict[str, Any] = {}
    if params_file is not None:
        label = f"--params-file {str(params_file)!r}"
        loaded = read_document(read_text_file(params_file, label), label)
        if not isinstance(loaded, dict):
            raise SpecError(["must map parameter names to values"], source=label)
        params.update(loaded)
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--param {pair!r}: write NAME=VALUE, e.g. --param 'prompts=[\"a\"]'")
        try:
            params[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[name.strip()] = raw
        except RecursionError:
            raise SpecError(
                ["nested far deeper than parameters may be"], source=f"--param {name.strip()!r}"
            ) from None
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``falflow`` console script."""
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    for name, value in {**_PREFECT_DEFAULTS, **({} if verbose else _QUIET_PREFECT)}.items():
        os.environ.setdefault(name, value)  # before Prefect is imported; the user's values win
    try:
        from falflow.settings import load_settings

        # Before Prefect is imported: it reads .env too, and crashes on one that is not UTF-8.
        settings = load_settings()
        if args.command == "specs":
            return _specs()
        if args.command == "validate":
            return _validate(args)
        if args.command == "emulator":
            return _emulator(args.port)
        if args.command == "doctor":
            return _doctor(settings, apply=args.apply, as_json=args.json)
        if args.command == "janitor":
            return _janitor(args)
        if args.command == "verify":
            return _verify(settings, args.run_key)
        if args.command == "webhooks":
            return _webhooks_serve(settings, args.host, args.port)
        return _run(args, settings)
    except Exception as exc:
        from falflow.settings import SettingsError

        # SettingsError first: SpecError's module imports Prefect, which may be what failed
        if isinstance(exc, CliError | SettingsError) or _is_spec_error(exc):
            print(f"falflow: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if verbose:
            traceback.print_exc()
        print(
            f"falflow: {type(exc).__name__}: {exc}\n(run again with --verbose for details)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _run_key(value: str) -> str:
    from falflow.tasks.ledger import check_segment

    try:
        return check_segment(value, "run key")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard_size(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of items, at least 1 (got {value!r})"
        )
    return int(value)


def _is_spec_error(exc: Exception) -> bool:
    from falflow.flows.spec import SpecError

    return isinstance(exc, SpecError)


# --- commands ------------------------------------------------------------------------------------


def _specs() -> int:
    from falflow.flows.spec import shipped_specs

    for name, description in shipped_specs().items():
        print(f"{name}\n" + textwrap.indent(textwrap.fill(description, 76), "    "))
    return EXIT_OK


def _load(args: argparse.Namespace) -> tuple[Pipeline, dict[str, Any]]:
    from falflow.flows.spec import load_pipeline

    pipeline = load_pipeline(args.spec)
    return pipeline, pipeline.bind(parse_params(args.param, args.params_file))


def _validate(args: argparse.Namespace) -> int:
    pipeline, params = _load(args)
    print(f"{pipeline.source} is valid: {len(pipeline.steps)} steps")
    for step in pipeline.steps:
        if step.chain:
            shape = f"one request per item of '{step.chain}'"
        elif step.fans_out:
            shape = f"one request per item of {step.spec.for_each}"
        else:
            shape = "one request"
        after = f", after all of {', '.join(sorted(step.needs))}" if step.needs else ""
        print(f"  {step.name}: {step.spec.endpoint} — {shape}{after}")
    for name, value in params.items():
        print(f"  param {name} = {json.dumps(value)[:100]}")
    return EXIT_OK


def _janitor(args: argparse.Namespace) -> int:
    from falflow.flows.janitor import janitor

    report = asyncio.run(
        janitor(
            grace_minutes=args.grace_minutes,
            delete=not args.keep_on_fal,
            adopt_orphans=args.adopt_orphans,
            verify_sample=args.verify_sample,
        )
    )
    counts = report.counts
    print(
        f"falflow janitor {report.run_key}: {counts.archived} archived, {counts.deleted} "
        f"deleted from fal, {len(report.survey.live_run_keys)} live runs left alone"
    )
    problems = report.problems()
    for finding in problems[:20]:
        where = f"{finding.run_key}/{finding.job_id}" if finding.job_id else finding.request_id
        print(f"  {finding.action}: {where}: {finding.note}")
    if len(problems) > 20:
        print(f"  … and {len(problems) - 20} more (see the janitor's table artifact)")
    return EXIT_OK if not problems else EXIT_FAILED


def _verify(settings: Settings, run_key: str) -> int:
    from falflow.settings.blocks import with_blocks
    from falflow.tasks.ledger import check_segment
    from falflow.tasks.store import open_bucket, settle
    from falflow.tasks.verify import VerifyReport, verify

    try:
        check_segment(run_key, "run key")
    except ValueError as exc:
        raise CliError(str(exc)) from None

    async def checked() -> tuple[VerifyReport, str]:
        try:
            bucket = open_bucket((await with_blocks(settings)).bucket)  # the bucket runs use
            return await verify(bucket, run_key=run_key), bucket.url
        finally:
            await settle()

    report, url = asyncio.run(checked())
    if not report.records:
        raise CliError(
            f"no ledger records for run {run_key!r} in {url} (ledger/{run_key}/): "
            "check the run key and FALFLOW_BUCKET__URL"
        )
    print("\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_FAILED


def _doctor(settings: Settings, *, apply: bool, as_json: bool) -> int:
    from falflow.tasks.doctor import check_account

    report = asyncio.run(check_account(settings, apply=apply))
    print(report.model_dump_json(indent=2) if as_json else "\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_FAILED


def _extra(name: str, exc: ImportError) -> CliError:
    return CliError(f"this needs falflow's {name} extra ({exc}): pip install 'falflow[{name}]'")


def _emulator(port: int) -> int:
    try:
        from falflow.emulator import EmulatorConfig, serve
    except ImportError as exc:
        raise _extra("emulator", exc) from None

    try:
        serve(EmulatorConfig(), port)
    except KeyboardInterrupt:
        print("\nfalflow: emulator stopped", file=sys.stderr)
    return EXIT_OK


def _webhooks_serve(settings: Settings, host: str | None, port: int | None) -> int:
    try:
        from falflow.webhooks import serve
    except ImportError as exc:
        raise _extra("webhooks", exc) from None
    serve(settings, host, port)
    return EXIT_OK


def _run(args: argparse.Namespace, settings: Settings) -> int:
    pipeline, params = _load(args)  # invalid specs stop here, before anything starts
    if args.shard_size is not None:  # so does a spec that cannot be sharded
        from falflow.flows.shards import plan_shards

        try:
            plan_shards(pipeline, params, args.shard_size, args.run_key or pipeline.spec.name)
        except ValueError as exc:  # a run key too long for the shard suffix
            if _is_spec_error(exc):
                raise
            raise CliError(f"--run-key: {exc}") from None
    from falflow.flows.spec import shipped_specs

    # A shipped spec goes by name; any other is passed whole, so the flow run records it.
    spec: str | dict[str, Any] = (
        args.spec
        if args.spec in shipped_specs() and not Path(args.spec).exists()
        else pipeline.spec.model_dump(mode="json", exclude_unset=True)
    )
    from falflow.flows.summary import RunProgress

    live = RunProgress(run_key=args.run_key or "")
    try:
        with _fal_or_emulator(_use_emulator(args.emulator, settings)) as where:
            summary, link = asyncio.run(
                _run_flow(
                    spec, params, live, progress=not args.no_progress, shard_size=args.shard_size
                )
            )
    except KeyboardInterrupt:
        again = f"re-run with --run-key {live.run_key}" if live.run_key else "run again"
        print(
            f"\nfalflow: interrupted; {again} to resume (recorded requests are not re-submitted)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        print(format_summary(summary, where, link))
    return EXIT_OK if summary.ok else EXIT_FAILED


def _use_emulator(asked: bool, settings: Settings) -> bool:
    """The emulator when asked for, or as the embedded default when nothing is configured (a
    ``FalCredentials`` block named in the settings is a fal key).

    Raises:
        CliError: no ``FAL_KEY`` but a bucket or a Prefect API is configured.
    """
    if asked or settings.fal_key is not None or settings.fal.credentials_block:
        return asked
    from prefect.settings import Settings as PrefectSettings

    configured = [
        what
        for what, present in (
            ("a bucket (FALFLOW_BUCKET__*)", "bucket" in settings.model_fields_set),
            # read afresh: the environment and the active profile, as the flow run will see them
            ("a Prefect API (PREFECT_API_URL)", PrefectSettings().api.url is not None),
        )
        if present
    ]
    if configured:
        raise CliError(
            f"FAL_KEY is not set, but {' and '.join(configured)} is configured: nothing was "
            "submitted. Set FAL_KEY (and FAL_ADMIN_KEY for deletions) to run on fal, or pass "
            "--emulator to run against the built-in fal emulator on purpose."
        )
    return True


@contextmanager
def _fal_or_emulator(use_emulator: bool) -> Iterator[str]:
    """Real fal as configured, or the emulator in this process with the environment set for it."""
    if not use_emulator:
        yield "fal"
        return
    try:
        from falflow.emulator import EmulatorConfig, start_emulator
    except ImportError as exc:
        raise _extra("emulator", exc) from None

    print("falflow: running against the built-in fal emulator (not fal)", file=sys.stderr)
    with start_emulator(EmulatorConfig()) as running:
        saved = dict(os.environ)
        os.environ.update(running.client_env())
        try:
            yield f"the fal emulator at {running.base_url}"
        finally:
            os.environ.clear()
            os.environ.update(saved)
            held = running.inventory(hashes=False)  # the proof a demo can give
            print(
                f"falflow: at the end the emulator holds {len(held['payloads'])} payloads and "
                f"{len(held['files'])} files",
                file=sys.stderr,
            )


async def _run_flow(
    spec: str | dict[str, Any],
    params: dict[str, Any],
    live: RunProgress,
    *,
    progress: bool,
    shard_size: int | None = None,
) -> tuple[RunSummary, str | None]:
    """The run's summary, and its page in the Prefect UI when a Prefect server is configured."""
    from prefect.utilities.urls import url_for

    from falflow.flows.pipeline import run_pipeline
    from falflow.flows.scope import watching
    from falflow.flows.summary import RunFailed, RunSummary

    bar = _Bar(live, sys.stderr)
    drawer = asyncio.create_task(bar.run()) if progress else None
    try:
        with watching(live):
            called = run_pipeline(
                spec=spec,
                parameters=params,
                run_key=live.run_key or None,
                shard_size=shard_size,
                return_state=True,
            )
            # (Prefect types an async flow's return_state call as a State; it is awaitable)
            state = await cast("Awaitable[State[Any]]", called)
            result = await state.aresult(raise_on_failure=False)
    finally:
        if drawer is not None:
            drawer.cancel()
            await asyncio.gather(drawer, return_exceptions=True)
            bar.draw(final=True)
        await asyncio.sleep(0.05)  # obstore can abort the process if the loop closes right away
    if isinstance(result, RunFailed):
        summary = result.summary
    elif isinstance(result, BaseException):
        raise result  # an invalid spec or settings, a crash: reported as before
    else:
        summary = RunSummary.model_validate(result)
    flow_run_id = state.state_details.flow_run_id
    link = url_for("flow-run", obj_id=flow_run_id) if flow_run_id else None
    return summary, link


# --- terminal output -----------------------------------------------------------------------------


class _Bar:
    """A one-line progress bar redrawn with ``\\r`` (a phase log when stderr is not a terminal)."""

    def __init__(self, progress: RunProgress, stream: TextIO) -> None:
        self.progress, self.stream = progress, stream
        self.tty = stream.isatty()
        self.shown = 0
        self.phase = ""

    async def run(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(0.2)

    def draw(self, *, final: bool = False) -> None:
        from falflow.tasks.report import counts_text, human_bytes

        p = self.progress
        if not self.tty:
            if p.phase != self.phase:
                print(f"falflow: {p.phase} {p.run_key}".rstrip(), file=self.stream)
                self.phase = p.phase
            return
        width = 24
        filled = width * p.finished // max(p.planned, p.finished, 1)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] "
            f"{counts_text(p.archived, p.failed, p.skipped)} of {p.planned} · "
            f"{human_bytes(p.archived_bytes)} archived · {p.phase}"
        )
        self.stream.write("\r" + line.ljust(self.shown) + ("\n" if final else ""))
        self.shown = len(line)
        self.stream.flush()


def format_summary(summary: RunSummary, where: str, link: str | None = None) -> str:
    """The closing summary: requests, what was archived where, what was deleted, what was not,
    and the run's page in the Prefect UI (``link``)."""
    from falflow.tasks.report import human_bytes

    lines = [
        f"falflow run {summary.run_key} on {where}",
        f"  requests     {summary.requests} made, {summary.archived} archived and verified",
        f"  archived     {summary.archived_files} files, {human_bytes(summary.archived_bytes)} "
        f"in {summary.folder('runs')}",
        f"  ledger       {summary.folder('ledger')}",
        f"  deleted      {summary.deleted} requests' payloads and output files from fal",
    ]
    if link:
        lines.append(f"  run page     {link}")
    for title, items in summary.sections():
        if items:
            lines.append(f"  {title}: {len(items)}")
    lines += [f"    - {line}" for line in summary.problem_lines(limit=10)]
    if not summary.unverified:
        lines.append("  not verified none (every request fal holds was archived and checked)")
    if summary.ok:
        lines.append("  all archived, verified and deleted from fal")
    else:
        lines.append(
            f"  re-run with --run-key {summary.run_key} to resume (nothing recorded is submitted "
            "twice), or let the janitor finish the cleanup"
        )
    return "\n".join(lines)
