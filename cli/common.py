"""What every `edje-search` command shares: options, JSON and text output, one-line errors."""
from __future__ import annotations

import json
import os
import re
import sys

import click
from edje_search.models.names import BACKENDS  # noqa: F401  (torch-free, so --help stays fast)

DEFAULT_INDEX = "indexes/default"


# Exit status of each deliberate library error (edje_search.errors), checked in order: 2 for bad
# arguments, like click's usage errors; 75 (EX_TEMPFAIL) for an index another process is
# writing, so scripts can retry; 1 for the rest. Library messages are already written for users.
EXIT_STATUS = (("BadQuery", 2), ("BadInput", 2), ("IndexLocked", 75), ("EdjeError", 1))
LOCKED_HINT = "retry when it has finished, or pass --wait SECONDS"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_error(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception reaching the command line."""
    if isinstance(e, MemoryError):
        return "out of memory", 1
    msg = first_line(e)
    errors = sys.modules.get("edje_search.errors")  # loaded whenever the library raised one of its own
    if errors is None or not isinstance(e, errors.EdjeError):
        return msg, 1
    status = next(code for name, code in EXIT_STATUS if isinstance(e, getattr(errors, name)))
    if isinstance(e, errors.IndexLocked) and "--wait" not in msg:
        msg = f"{msg} ({LOCKED_HINT})"
    return msg, status


class Failure(click.ClickException):
    """A command that cannot do what was asked: one line "error: ..." on stderr, exit 1."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class FriendlyGroup(click.Group):
    """Turns library exceptions into one line on stderr and a non-zero exit (traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad option or argument: one line, pointing at --help
            where = e.ctx.command_path if e.ctx else ctx.command_path
            click.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError as e:
            if not _stdout_gone():  # another pipe or socket broke: an error like any other
                click.echo(f"error: {describe_error(e)[0]}", err=True)
                sys.exit(1)
            # the reader of the output went away (`| head`): stop quietly, as a tool killed by SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            sys.exit(141)
        except Exception as e:  # noqa: BLE001 - the CLI boundary: every failure becomes one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg, status = describe_error(e)
            click.echo(f"error: {msg}", err=True)
            sys.exit(status)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor behind stdout (captured)
        return False


_SURROGATE = re.compile("[\ud800-\udfff]")

JSON_HELP = ("Print machine-readable JSON (UTF-8). File names that are not valid UTF-8 appear with "
             "surrogate escapes: each undecodable byte 0xXY as \\udcXY (Python's os.fsencode gives the bytes back).")


def to_json(data, indent: int | None = 2) -> str:
    """JSON text that is valid UTF-8 whatever the file names: readable Unicode stays as is, lone
    surrogates (``os.fsdecode`` of bytes that are not UTF-8) become ``\\udcXY`` escapes."""
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def emit_json(data) -> None:
    click.echo(to_json(data))


def echo_text(line: str, err: bool = False) -> None:
    """Print a line that may hold file names that are not UTF-8: their original bytes are
    written back (as `ls` does), instead of failing to encode them."""
    try:
        data = line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that no file name decodes to
        data = line.encode("utf-8", "backslashreplace")
    click.echo(data, err=err)


def index_option(f):
    return click.option("--index", "index_dir", default=DEFAULT_INDEX, show_default=True,
                        type=click.Path(file_okay=False),
                        help="Index directory.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(f)
