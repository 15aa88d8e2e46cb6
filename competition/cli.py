"""What every command of the kit shares: one clear line per user error, and checked options.

A user error (a wrong path, a bad option value, a corrupt or foreign file) ends a command
with one line ``error: <what, and which file or option>`` on stderr and exit status 2.
Tracebacks are for bugs, or on request: ``--debug`` on any command, or ``KIT_DEBUG=1``.

* ``UserError``: the base of the kit's user-facing errors (``DataError``, ``BundleError``,
  ...); ``OSError`` (missing file, permission) counts as one too. ``UserErrors``: several
  found at once, printed one ``error:`` line each.
* ``run_command(main, argv)``: runs a command's ``main(argv) -> int`` under that rule.
* ``ArgumentParser``: argparse whose errors are that one line, and whose help shows defaults.
* ``number(kind, low, high)``: an argparse type that checks a range at parse time.
* ``show_progress(wanted)``: progress bars only on a terminal (a piped log stays readable).

``run_command`` runs the command inside ``competition.console.console``: notices (``logging``)
and warnings print one line each (``warning: ...``), and the process is left as it was found.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from competition.console import console

DEBUG_ENV = "KIT_DEBUG"


class UserError(Exception):
    """Something the user can fix: the message names the file or option and what is wrong."""


class UserErrors(UserError):
    """Several user errors found at once (``problems``, one line each); ``run_command`` prints each
    as its own ``error:`` line."""

    def __init__(self, problems: Sequence[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a multi-line message is joined with '; ')."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def debug_requested(argv: Sequence[str] | None) -> bool:
    return "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def show_progress(wanted: bool = True) -> bool:
    """True when progress bars should be drawn: asked for, and stderr is a terminal."""
    try:
        return bool(wanted) and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def run_command(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` with the kit's console (``competition.console``); a user error becomes
    ``error: ...`` on stderr and status 2 (traceback with --debug)."""
    debug = debug_requested(argv)
    args = list(argv if argv is not None else sys.argv[1:])
    args = [a for a in args if a != "--debug"]
    try:
        with console(debug=debug):
            return int(main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as exc:
        if debug:
            raise
        lines = [one_line(UserError(p)) for p in exc.problems] if isinstance(exc, UserErrors) else [one_line(exc)]
        print("".join(f"error: {line}\n" for line in lines), end="", file=sys.stderr)
        return 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` where a default is set."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: argument --x: ...``, status 2) and defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show a traceback for any error (or KIT_DEBUG=1)")

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], float | int]:
    """An argparse ``type`` for an int or float in [low, high] (either bound may be None)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {range_text(low, high)}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def range_text(low: float | None, high: float | None) -> str:
    """'in [a, b]', '>= a' or '<= b'."""
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}"
