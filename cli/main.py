"""`edje-search`: the click group; every command is registered here, explicitly."""
from __future__ import annotations

import click

from . import (duplicate_commands, index_commands, maintenance_commands, model_commands, query_commands, score_commands,
               serve_commands, train_commands)
from .common import BACKENDS, FriendlyGroup  # noqa: F401  (BACKENDS: torch-free, so --help stays fast)

COMMAND_MODULES = (index_commands, query_commands, maintenance_commands, duplicate_commands, model_commands,
                   score_commands, serve_commands, train_commands)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Two-stage image search: embeddings recall, a joint encoder reranks (EDJE).

    Typical use: `edje-search build-index ./photos` then `edje-search query "dog in snow"`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def register_commands() -> None:
    """Attach every command module's ``COMMANDS`` to the group (idempotent)."""
    for module in COMMAND_MODULES:
        for command in module.COMMANDS:
            cli.add_command(command)


register_commands()


def main() -> None:
    cli(prog_name="edje-search")


if __name__ == "__main__":  # `python -m edje_search_cli.main`: use the package's module, not __main__
    from edje_search_cli.main import main as _main

    _main()
