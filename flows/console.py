"""A flow run that outlives the reader of its console.

A process worker starts each flow run in a process of its own whose console (stderr) is a pipe
the worker reads. When the worker dies — restarted, redeployed, OOM-killed — its flow runs live
on, but the next line Prefect's console handler writes meets a broken pipe, and rich answers that
with ``SystemExit``: the run would crash mid-batch, its requests in flight with it.
:func:`outlive_the_console` makes the console go quiet instead; every log line still reaches the
Prefect API (the run page), which is where a worker's runs are read.

Example (``run_pipeline``, the janitor and every retention scope call it)::

    from prefect import flow

    from falflow.flows.console import outlive_the_console

    @flow
    async def nightly() -> None:
        outlive_the_console()
        ...
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler

__all__ = ["outlive_the_console"]


class _QuietWhenOrphaned(PrefectConsoleHandler):
    """Prefect's console handler, except that a broken pipe quiets it instead of ending the run.

    rich handles a broken pipe by setting ``Console.quiet`` and then raising ``SystemExit``; here
    the exit is dropped when (and only when) that write is what quieted the console.
    """

    def emit(self, record: logging.LogRecord) -> None:
        quiet = self.console.quiet
        try:
            super().emit(record)
        except SystemExit:
            if quiet or not self.console.quiet:
                raise  # not rich's broken-pipe exit


def outlive_the_console() -> None:
    """Replace Prefect's console handler (same console, formatter, level and filters) wherever
    it is attached, so losing the console's reader does not end this process. Idempotent."""
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    replaced: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in list(logger.handlers):
            if type(handler) is not PrefectConsoleHandler:
                continue
            if id(handler) not in replaced:
                replaced[id(handler)] = _adopt(handler)
            logger.removeHandler(handler)
            logger.addHandler(replaced[id(handler)])


def _adopt(handler: PrefectConsoleHandler) -> _QuietWhenOrphaned:
    quiet = _QuietWhenOrphaned(stream=handler.stream, level=handler.level)
    quiet.console = handler.console
    quiet.setFormatter(handler.formatter)
    for entry in handler.filters:
        quiet.addFilter(entry)
    return quiet
