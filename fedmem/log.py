"""Logging and progress bars, set up once by each entry point.

Modules log through ``logging.getLogger(__name__)`` and wrap long loops in
``progress(...)``; neither takes callbacks. Bars are drawn only on a terminal and at
INFO level or below; elsewhere (CI logs, Ray workers, ``-q``) the log lines carry the
progress instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys

from tqdm import tqdm

_FORMAT = "%(message)s"


class _TqdmHandler(logging.Handler):
    """Writes records above any progress bar on the screen instead of through it, to the
    stream given or else to whatever ``sys.stderr`` is when the line is written (tests and
    callers may swap it)."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream or sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise; the stdlib handlers behave the same
            self.handleError(record)


class _Formatter(logging.Formatter):
    def __init__(self, prefix: str = ""):
        super().__init__(_FORMAT)
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tag = _context.get()
        if tag:
            text = f"[{tag}] {text}"
        if record.levelno != logging.INFO:
            text = f"{record.levelname.lower()}: {text}"
        return self.prefix + text


def setup_logging(verbosity: int = 0, stream=None, prefix: str = "") -> None:
    """Log fedmem's messages to ``stream`` (stderr): INFO by default, DEBUG with -v, WARNING with -q.

    Library warnings go through the same log, each shown once per place rather than silenced.
    Idempotent: a second call replaces the first one's handler.
    """
    level = logging.INFO - 10 * verbosity
    handler = _TqdmHandler(stream)
    handler.setFormatter(_Formatter(prefix))
    # Re-installed each time: whoever restored ``warnings.showwarning`` since (a
    # ``warnings.catch_warnings`` block) left logging believing it still captures.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    for name, logger_level in (
        ("fedmem", level),
        ("py.warnings", logging.WARNING if verbosity >= 0 else logging.ERROR),
    ):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logger_level)
        logger.propagate = False
    # Python's own filters stay: each warning meant for users (UserWarning, FutureWarning, ...)
    # is shown once per place it comes from; the categories meant for developers
    # (DeprecationWarning outside __main__, ResourceWarning) stay off, as in any Python program.
    quiet_library_progress()


def quiet_library_progress() -> None:
    """transformers draws a bar for every model load and logs its own advice at INFO; fedmem's
    own bars and log say what is going on. Its warnings stay on."""
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar over ``iterable`` on a terminal at INFO level or below; a plain iterator elsewhere."""
    shown = sys.stderr.isatty() and logging.getLogger("fedmem").isEnabledFor(logging.INFO)
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not shown, file=sys.stderr
    )


_context: contextvars.ContextVar[str] = contextvars.ContextVar("fedmem_log_context", default="")


@contextlib.contextmanager
def log_context(tag: str):
    """Prefix every fedmem log line inside the block with ``[tag]`` (an owner and its round),
    so lines of owners that train side by side can be told apart."""
    token = _context.set(tag)
    try:
        yield
    finally:
        _context.reset(token)
