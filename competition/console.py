"""How the kit talks to a person at a console: one channel for notices, the standard ``logging``.

Three kinds of output, one way each:

* a command's result (a table, the line saying what it wrote, its scores): ``print`` to stdout;
* a notice, what the kit does or finds on the way (a stage, an epoch, a stale lock taken over):
  ``logging.getLogger(__name__).info`` or ``.warning``. Library code only logs; the command line
  shows the records (``console``), a program embedding the kit configures ``logging`` its own way;
* a defect of the caller's input that a library user must see (an unreadable image, a name a CSV
  cannot hold, a member that cannot be checked for leakage): ``warnings.warn``.

``console(quiet=False, keep=(), debug=False)``, for the length of a ``with`` block (every command
runs in one: ``competition.cli.run_command``):

* one ``ConsoleHandler`` on the root logger; the kit's loggers (``KIT_LOGGERS``) at INFO (WARNING
  when ``quiet``, except the loggers named in ``keep``: the command's own stage lines), every other
  library's at WARNING (faiss, timm or numexpr say nothing at INFO a person needs);
* ``warnings.formatwarning`` printing ``warning: <message>``, without the source line (unless
  ``debug``);
* Optuna's log, when Optuna is imported, through the same handler at WARNING (its per-trial INFO
  lines off).

When the block ends, returning or raising, all of it is as it was found. Nested, it adds no second
handler and keeps the outer one's warning format: a command's main may narrow or widen what the
console of ``run_command`` shows (levels, Optuna imported since).

Lines, for people: an info record is its message alone on stdout; a warning ``warning: <message>``
and an error ``error: <message>`` on stderr. No logger name, level or time.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

OPTUNA_LOGGER = "optuna"   # Optuna's library root logger (``optuna.logging``)
# the kit's packages (tests/test_layering.py's floors), and its scripts: main.py imported, any run as __main__
KIT_LOGGERS = ("competition", "rerank", "backbones", "ensemble", "tuning", "bench", "main", "__main__")


class ConsoleHandler(logging.Handler):
    """Writes each record as one line for people (module docstring), to the stdout or stderr of the
    moment it is written: ``contextlib.redirect_stdout`` and pytest's capture see the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                text, stream = f"error: {text}", sys.stderr
            elif record.levelno >= logging.WARNING:
                text, stream = f"warning: {text}", sys.stderr
            else:
                stream = sys.stdout
            stream.write(text + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own rule: a failed line never stops the program
            self.handleError(record)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for people: ``warning: <message>`` on one line, no source line."""
    return f"warning: {message}\n"


@dataclass
class _LoggerState:
    """What ``console`` may change on one logger, to put back."""

    logger: logging.Logger
    level: int
    propagate: bool
    handlers: list[logging.Handler]

    @classmethod
    def of(cls, logger: logging.Logger) -> "_LoggerState":
        return cls(logger, logger.level, logger.propagate, list(logger.handlers))

    def restore(self) -> None:
        self.logger.setLevel(self.level)
        self.logger.propagate = self.propagate
        for handler in self.handlers:
            if handler not in self.logger.handlers:
                self.logger.addHandler(handler)


@contextlib.contextmanager
def console(quiet: bool = False, keep: Sequence[str] = (), debug: bool = False) -> Iterator[None]:
    """Show the kit's notices and warnings on the console for the block (module docstring); ``keep``:
    loggers whose info lines show even when ``quiet``. Everything is restored when the block ends."""
    root = logging.getLogger()
    saved = [_LoggerState.of(logging.getLogger(name)) for name in ("", *KIT_LOGGERS, *keep)]
    optuna = logging.getLogger(OPTUNA_LOGGER) if OPTUNA_LOGGER in sys.modules else None
    if optuna is not None:
        saved.append(_LoggerState.of(optuna))
    saved_format = warnings.formatwarning
    added = None
    try:
        if not any(isinstance(h, ConsoleHandler) for h in root.handlers):   # nested: the outer one's handler
            added = ConsoleHandler()                                         # and warning format stay
            root.addHandler(added)
        root.setLevel(logging.WARNING)
        for name in KIT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
        for name in keep:
            logging.getLogger(name).setLevel(logging.INFO)
        if optuna is not None:   # its own stderr handler off: its records reach the root's handler
            for handler in list(optuna.handlers):
                optuna.removeHandler(handler)
            optuna.setLevel(logging.WARNING)
            optuna.propagate = True
        if added is not None and not debug:
            warnings.formatwarning = one_line_warning
        yield
    finally:
        warnings.formatwarning = saved_format
        if added is not None:
            root.removeHandler(added)
        for state in reversed(saved):
            state.restore()
