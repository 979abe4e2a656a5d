"""``python -m emulator``: run the fal emulator in the foreground and print the exports to use."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from falflow.emulator.config import EmulatorConfig
from falflow.emulator.server import RunningEmulator, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--config", type=Path, help="EmulatorConfig as a JSON file")
    parser.add_argument("--latency", type=float, help="seconds each simulated model runs")
    parser.add_argument("--state-dir", type=Path, help="where the CA files go (default: temp)")
    parser.add_argument(
        "--ready-json", action="store_true", help="print one JSON line when ready (for tools)"
    )
    args = parser.parse_args(argv)
    config = (
        EmulatorConfig.model_validate_json(args.config.read_text())
        if args.config
        else EmulatorConfig()
    )
    if args.latency is not None:
        config.latency_seconds = args.latency

    def ready_json(running: RunningEmulator) -> None:
        files = {name: str(path) for name, path in asdict(running.tls).items()}
        print(json.dumps({"port": running.port, **files}), flush=True)

    serve(
        config,
        args.port,
        state_dir=args.state_dir,
        on_ready=ready_json if args.ready_json else None,
    )


if __name__ == "__main__":
    main()
