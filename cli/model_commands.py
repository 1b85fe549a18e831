"""models: list the registered model recipes."""
from __future__ import annotations

import click

from .main import cli, emit_json, json_option


@cli.command("models")
@json_option
def models(as_json):
    """List registered model names usable with --model (a model directory also works)."""
    from edje_search.models.registry import list_recipes

    recipes = list_recipes()
    if as_json:
        emit_json([{"name": r.name, "description": r.description} for r in recipes])
        return
    for r in recipes:
        click.echo(f"{r.name:<18} {r.description}")
