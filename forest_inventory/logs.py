"""Logging of the command line: the only place that installs handlers (the library only has module loggers,
``logging.getLogger(__name__)``).

Console (stderr): one line per record, ``warning: ...`` / ``error: ...``, never a traceback; WARNING and up
by default, INFO with ``--verbose``, DEBUG with ``-vv``, ERROR only with ``--quiet``. Prefect's own records
(flow and task run states, their tracebacks) stay off the console unless ``-vv``. ``--log-file PATH``: every
record at DEBUG (Prefect's at INFO) with time, logger and the full traceback, appended.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.errors import InputError

_MARK = "_forest_inventory_handler"
LIBRARY_LOGGERS = ("pipeline", "models", "flows", "forest_inventory")


class OneLineFormatter(logging.Formatter):
    """``level: message`` on one line: the first line of the message, no traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().splitlines()
        return f"{record.levelname.lower()}: {text[0] if text else ''}"


class StderrHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (a progress display or a test runner may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class ConsoleFilter(logging.Filter):
    """Drops Prefect's records (run states, tracebacks) and other libraries' info (pyogrio's "Created N
    records") unless ``show_all`` (-vv)."""

    def __init__(self, show_all: bool) -> None:
        super().__init__()
        self.show_all = show_all

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show_all:
            return True
        if record.name.startswith(("prefect", "httpx", "uvicorn")):
            return False
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in LIBRARY_LOGGERS


def console_level(verbose: int = 0, quiet: bool = False) -> int:
    """Console threshold: ERROR (quiet), WARNING (default), INFO (-v), DEBUG (-vv)."""
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def setup_logging(verbose: int = 0, quiet: bool = False, log_file: str | Path | None = None,
                  debug: bool = False) -> None:
    """Install the console (and file) handlers on the root logger, replacing Prefect's console handler and
    any handler an earlier call installed. Safe to call again after Prefect is imported (it configures the
    root logger at import). ``debug``: tracebacks on the console too (``--debug``)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False) or type(handler).__name__ == "PrefectConsoleHandler":
            root.removeHandler(handler)
            if getattr(handler, _MARK, False) and isinstance(handler, logging.FileHandler):
                handler.close()
    level = console_level(verbose, quiet)
    console = StderrHandler(level)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s") if debug else OneLineFormatter())
    console.addFilter(ConsoleFilter(show_all=verbose >= 2))
    setattr(console, _MARK, True)
    root.addHandler(console)
    lowest = level
    if log_file is not None:
        path = Path(log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=False)
        except OSError as exc:
            raise InputError(f"{path}: cannot write the log file ({exc.strerror}); pass a writable "
                             "--log-file") from None
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
        lowest = logging.DEBUG
    # other libraries (GDAL bindings, HTTP clients, Prefect) at INFO at most: their DEBUG is chatter
    root.setLevel(min(level, logging.INFO) if log_file is not None else level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(lowest)
    logging.getLogger("prefect").setLevel(logging.INFO)


def reset_logging() -> None:
    """Remove the handlers :func:`setup_logging` installed (closing a log file) and its logger levels."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
