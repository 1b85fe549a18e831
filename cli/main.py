"""`edje-search`: the click group, shared options and one-line error reporting."""
from __future__ import annotations

import json
import sys

import click
from edje_search.models.names import BACKENDS  # noqa: F401  (torch-free, so --help stays fast)

DEFAULT_INDEX = "indexes/default"


class FriendlyGroup(click.Group):
    """Turns library exceptions into one line on stderr and a non-zero exit (traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI boundary: every failure becomes one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Two-stage image search: embeddings recall, a joint encoder reranks (EDJE).

    Typical use: `edje-search build-index ./photos` then `edje-search query "dog in snow"`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def index_option(f):
    return click.option("--index", "index_dir", default=DEFAULT_INDEX, show_default=True,
                        type=click.Path(file_okay=False),
                        help="Index directory.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def register_commands() -> None:
    from . import index_commands  # noqa: F401  (commands attach themselves to `cli`)
    from . import model_commands  # noqa: F401
    from . import train_commands  # noqa: F401


def main() -> None:
    register_commands()
    cli(prog_name="edje-search")


if __name__ == "__main__":  # `python -m edje_search_cli.main`: use the package's module, not __main__
    from edje_search_cli.main import main as _main

    _main()
