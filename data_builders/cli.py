"""The command-line convention of every entry point, and the one `error:` line of a failure.

Convention (README, Troubleshooting): flags only (`--name value` or `--name=value`); `--help`
lists them and exits 0; a wrong command line exits 2 with argparse's usage line or one
`error:` line; any other failure ends in exactly one `error: ...` line on stderr and exit
status 1; `--verbose` prints the traceback before that line; Ctrl-C ends in
`error: interrupted` and exit status 130, without a traceback.

`new_parser(prog, doc)` is the argparse parser every tool starts from (it has `--verbose`);
`parse_absl(...)` parses the absl flags of `python -m mosaic_jax.main` and `aot` under the same
rules; `describe(exc, argv, paths)` turns an exception into the line (pure: exception in, text
out); `run(fn, argv, paths=...)` is the edge that calls the work, prints the line to stderr and
exits non-zero; `check_input`/`check_output` find an unusable input or output path before
minutes of work. Standard library only: the launchers, on a workstation without JAX, use it.

What gets a dedicated line:
- a mistyped config key on the command line (`--config.batchsize=64`): ml_collections raises a
  chain of three exceptions whose "did you mean" sits at the end; the line names the flag and
  the suggestion;
- a full disk, a read-only file system, a permission error (OSError ENOSPC / EROFS / EACCES / EPERM,
  also when a library re-raised it as text): the line names the path;
- a wrong command line (`UsageError`, absl flag errors, a config file or config argument that
  does not exist, with "did you mean"): exit status 2;
- any other OSError (a missing or unreadable input, GDAL's "not recognized as a supported file
  format", a network path that cannot be read): its message and file name;
- the errors our own code raises for bad input (FileNotFoundError, ValueError, ...) and a
  diverged training run (FloatingPointError): their message, which already names the file,
  field, config key or step.
Anything else is reported as an unexpected error with the hint to rerun with `--verbose`.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

USAGE_STATUS = 2
FAILURE_STATUS = 1
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report Ctrl-C
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
_LAST_ERROR = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception): (.+)$", re.MULTILINE)


class UsageError(Exception):
    """A wrong command line (a flag, a config file or argument): exit status 2."""


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argparse parser of a tool: `prog` as typed, the first paragraph of the module's
    docstring `doc` as description, and `--verbose`."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="print the traceback of an error, not only its one line")
    return parser


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`; did you mean 'x'?` for the closest of `choices` to `word`, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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


def _absl_flag_error(exc: BaseException) -> str | None:
    """The line for an absl flag error (unknown flag, missing value, a config file whose
    `get_config` raised): the flag and the last error message, without the traceback text."""
    if not type(exc).__module__.startswith("absl.flags"):
        return None
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        errors = _LAST_ERROR.findall(text)
        flag = re.match(r"flag (--\S+?): ", text)
        text = (f"{flag.group(1)}: " if flag else "") + (errors[-1] if errors else text)
    return " ".join(text.split())


def _config_file_error(exc: BaseException) -> str | None:
    """The line for ml_collections' "Failed loading config file" (a config file that cannot be
    read): its last line, which names the file."""
    for e in _chain(exc):
        if isinstance(e, OSError) and "Failed loading config file" in str(e):
            return "config file: " + str(e).strip().splitlines()[-1].strip()
    return None


def describe(exc: BaseException, argv: Sequence[str] = (),
             paths: Sequence[str] = ()) -> tuple[str, int]:
    """(the one-line message without `error: `, exit status) for `exc`.

    `argv` is the command line (to name a mistyped `--config.KEY` flag); `paths` are folders
    the program writes to (named when an OSError does not say which file failed).
    """
    if isinstance(exc, UsageError):
        return " ".join(str(exc).split()), USAGE_STATUS
    line = _absl_flag_error(exc) or _config_key_error(exc, argv) or _config_file_error(exc)
    if line:
        return line, USAGE_STATUS
    line = _os_error(exc, paths)
    if line:
        return line, FAILURE_STATUS
    if isinstance(exc, OSError):  # a missing, unreadable or foreign input: the system's words
        text = " ".join(str(exc.strerror or exc).split())
        name = os.fspath(exc.filename) if exc.filename else ""
        return (f"{text}: {name}" if name and name not in text else text), FAILURE_STATUS
    if isinstance(exc, (ValueError, FloatingPointError)):
        text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
        return " ".join(text.split()), FAILURE_STATUS
    message = " ".join(str(exc).split())
    return (f"unexpected {type(exc).__name__}: {message[:300]} ({VERBOSE_HINT})",
            FAILURE_STATUS)


def run(fn: Callable[[], Any], argv: Sequence[str] | None = None, *,
        paths: Sequence[str] = ()) -> Any:
    """Calls the work `fn` of an entry point; on an exception prints one `error:` line (and,
    with `--verbose` in `argv`, the traceback first) to stderr and exits with status 1 or 2;
    on Ctrl-C prints `error: interrupted` and exits with status 130."""
    argv = sys.argv if argv is None else argv
    try:
        return fn()
    except KeyboardInterrupt:
        _exit("interrupted", INTERRUPTED_STATUS)
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


def check_input(path: str, flag: str) -> None:
    """Raises before any work when the local input file `path` of `flag` is missing, a folder or
    empty (its format is the reader's to judge). Remote paths (`gs://...`) are left to it."""
    if "://" in path:
        return
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path} is a folder; give a file")
    if os.path.getsize(full) == 0:
        raise ValueError(f"{flag} {path} is empty (0 bytes)")


def check_output(path: str, flag: str = "--output", *, folder: bool = False) -> None:
    """Raises before any work when the output `path` cannot be written: a file output that is
    an existing folder, or a folder (the nearest existing one above `path`) that is read-only,
    full or not ours. Remote paths (`gs://...`) are left to the write itself."""
    if "://" in path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing folder; give a file path")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing file; give a folder")
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write_check_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, e.strerror, parent) from None


def check_config_file(value: str | None, flag: str = "--config") -> None:
    """Raises UsageError when the file of a `--config=FILE[:ARGS]` value does not exist,
    suggesting the closest config file of its folder."""
    if not value:
        return
    path = value.split(":", 1)[0]
    if os.path.isfile(path):
        return
    folder, name = os.path.split(path)
    names = ([n for n in sorted(os.listdir(folder or "."))
              if n.endswith(".py") and not n.startswith("_")]
             if os.path.isdir(folder or ".") else [])
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {os.path.join(folder, close[0])!r}?" if close else ""
    raise UsageError(f"{flag}: config file {path} does not exist{hint}")


_HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse_absl(flag_values: Any, argv: Sequence[str], holders: Sequence[Any], *, prog: str,
               doc: str | None) -> list[str]:
    """Parses `argv` (program name first) into the absl `flag_values` under this module's
    convention: `--help` lists the flags of `holders` (absl FlagHolders) and exits 0; a wrong
    flag, a missing config file or a config file that rejects its argument raises UsageError.
    Returns `argv` without its flags (only the program name: positional words are refused)."""
    if any(a in _HELP_FLAGS for a in argv[1:]):
        print(absl_help(flag_values, holders, prog=prog, doc=doc))
        raise SystemExit(0)
    check_config_file(flag_value(argv, "config"))
    flag_values.unparse_flags()
    saved, sys.argv = sys.argv, list(argv)  # ml_collections finds --config.KEY in sys.argv
    try:
        rest = flag_values(list(argv))
    except Exception as e:
        line = _absl_flag_error(e)
        if line is None:
            raise
        raise UsageError(line) from e
    finally:
        sys.argv = saved
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])} (every input is a flag; "
                         "see --help)")
    return rest


def absl_help(flag_values: Any, holders: Sequence[Any], *, prog: str, doc: str | None) -> str:
    """The `--help` text of an absl entry point: usage, description, one line per flag."""
    lines = [f"usage: {prog} [flags]", "", (doc or "").split("\n\n")[0].strip(), "", "flags:"]
    for holder in holders:
        flag = flag_values[holder.name]
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{flag.name}: {' '.join(str(flag.help).split())}{default}")
    return "\n".join(lines)
