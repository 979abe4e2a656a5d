"""Entry point of one benchmark side in a fresh process: ``python -m bench.child TARGET PARAMS OUT``.

Calls ``module:function(**params)`` (awaited on asyncio if it is async) and writes its result
dict, plus this process's peak RSS before and after, as JSON to OUT. With
``BENCH_PROFILE=FILE`` in the environment the call is profiled (cProfile) into FILE.
"""

from __future__ import annotations

import asyncio
import cProfile
import importlib
import inspect
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.harness import JSON, PROFILE_ENV, peak_rss_mib


async def _await_then_settle(awaitable: Awaitable[JSON]) -> JSON:
    result = await awaitable
    # obstore can abort the interpreter at exit right after its last async put (docs/platform-notes.md).
    await asyncio.sleep(0.05)
    return result


def main(argv: list[str]) -> int:
    target, params_json, out = argv
    module_name, _, function_name = target.partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module_name), function_name)
    params: JSON = json.loads(params_json)
    rss_before = peak_rss_mib()
    profile_path = os.environ.get(PROFILE_ENV)
    profiler = cProfile.Profile() if profile_path else None
    if profiler is not None:
        profiler.enable()
    if inspect.iscoroutinefunction(function):
        result: JSON = asyncio.run(_await_then_settle(function(**params)))
    else:
        result = function(**params)
    if profiler is not None and profile_path:
        profiler.disable()
        profiler.dump_stats(profile_path)
    result["rss_before_mib"] = round(rss_before, 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
