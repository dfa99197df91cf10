"""One `error:` line a person can act on, instead of a traceback, for every entry point.

`describe(exc, argv, paths)` turns an exception into that line (pure: exception in, text out);
`run_cli(fn, argv, paths=...)` is the edge that calls an entry point, prints the line to stderr
and exits non-zero. The traceback is printed only with `--verbose` on the command line.

What gets a dedicated line:
- a mistyped config key on the command line (`--config.batchsize=64`): ml_collections raises a
  chain of three exceptions whose "did you mean" sits at the end; the line names the flag and
  the suggestion;
- a full disk, a read-only file system, a permission error (OSError ENOSPC / EROFS / EACCES / EPERM,
  also when a library re-raised it as text): the line names the path;
- the errors our own code raises for bad input (FileNotFoundError, ValueError, ...) and a
  diverged training run (FloatingPointError): their message, which already names the file,
  field, config key or step.
Anything else is reported as an unexpected error with the hint to rerun with `--verbose`.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

USAGE_STATUS = 2
FAILURE_STATUS = 1
VERBOSE_HINT = "rerun with --verbose for the traceback"

_OS_ERRORS = {  # errno -> (text that libraries print for it, what to do)
    errno.ENOSPC: ("No space left on device",
                   "free some space there or choose a folder on another disk"),
    errno.EROFS: ("Read-only file system",
                  "choose a writable folder"),
    errno.EACCES: ("Permission denied",
                   "choose a folder you may write to or fix its "
                   "permissions"),
    errno.EPERM: ("Operation not permitted",
                  "choose a folder you may write to"),
}
_OS_SUMMARY = {errno.ENOSPC: "no space left on the device",
               errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether the command line asks for tracebacks (`--verbose`, `--verbose=true`)."""
    return any(a in ("--verbose", "-v") or a.lower() in ("--verbose=true", "--verbose=1")
               for a in argv)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _config_key_error(exc: BaseException, argv: Sequence[str]) -> str | None:
    """The line for an unknown `--config.KEY` (ml_collections' KeyError/AttributeError)."""
    if not isinstance(exc, (AttributeError, KeyError)):
        return None
    text = "\n".join(str(e) for e in _chain(exc))
    flags = [a for a in argv if a.startswith("--config.")]
    match = _DID_YOU_MEAN.search(text.replace("\\n", "\n").replace('\\"', '"'))
    wrong = match.group(2) if match else None
    if wrong is None:
        keys = re.findall(r"'([A-Za-z_][\w]*)'", text)
        wrong = keys[0] if keys else None
    flag = next((a for a in flags if wrong and re.search(
        rf"[.]{re.escape(wrong)}(?:[.=]|$)", a.split("=", 1)[0] + "=")), None)
    if flag is None:
        return None
    name = flag.split("=", 1)[0]
    line = f"unknown config key in {name} ('{wrong}' is not a key of the config)"
    if match:
        line += f"; did you mean '{match.group(1)}'?"
    return line + " Every key and its default: mosaic_jax/training/configuration.py base_config()."


def _os_error(exc: BaseException, paths: Sequence[str]) -> str | None:
    """The line for a full disk, a read-only file system or a permission error."""
    code = filename = None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _OS_ERRORS:
            code, filename = e.errno, e.filename or filename
            break
        for number, (text, _) in _OS_ERRORS.items():
            if text.lower() in str(e).lower():
                code = number
                quoted = re.findall(r"['\"](/[^'\"]+)['\"]", str(e))
                filename = quoted[0] if quoted else None
                break
        if code is not None:
            break
    if code is None:
        return None
    where = os.fspath(filename) if filename else (paths[0] if paths else "the output folder")
    return f"{_OS_SUMMARY[code]} writing {where}: {_OS_ERRORS[code][1]}"


def describe(exc: BaseException, argv: Sequence[str] = (),
             paths: Sequence[str] = ()) -> tuple[str, int]:
    """(the one-line message without `error: `, exit status) for `exc`.

    `argv` is the command line (to name a mistyped `--config.KEY` flag); `paths` are folders
    the program writes to (named when an OSError does not say which file failed).
    """
    line = _config_key_error(exc, argv)
    if line:
        return line, USAGE_STATUS
    line = _os_error(exc, paths)
    if line:
        return line, FAILURE_STATUS
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        FileExistsError, ValueError, FloatingPointError)):
        text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
        return " ".join(text.split()), FAILURE_STATUS
    message = " ".join(str(exc).split())
    return (f"unexpected {type(exc).__name__}: {message[:300]} ({VERBOSE_HINT})",
            FAILURE_STATUS)


def run_cli(fn: Callable[[], Any], argv: Sequence[str] | None = None, *,
            paths: Sequence[str] = ()) -> Any:
    """Calls the entry point `fn`; on an exception prints one `error:` line (and, with
    `--verbose` in `argv`, the traceback first) to stderr and exits with status 1 or 2."""
    argv = sys.argv if argv is None else argv
    try:
        return fn()
    except KeyboardInterrupt:
        _exit("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 (every error ends in one line, see module doc)
        if wants_verbose(argv):
            traceback.print_exc()
        line, status = describe(exc, argv, paths)
        _exit(line, status)


def _exit(line: str, status: int) -> NoReturn:
    sys.stderr.flush()
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=VALUE` or `--name VALUE` in `argv` (None when absent); for naming
    paths in error lines before the flags are parsed."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None
