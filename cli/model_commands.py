"""models, convert-official, import-first-stage: where models come from."""
from __future__ import annotations

import click

from .common import emit_json, json_option


@click.command("models")
@json_option
def models(as_json):
    """List registered model names usable with --model (a model directory also works)."""
    from edje_search.models.recipes import list_recipes

    recipes = list_recipes()
    if as_json:
        emit_json([{"name": r.name, "description": r.description} for r in recipes])
        return
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        click.echo(f"{r.name:<{width}}  {r.description}")


@click.command("convert-official")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--vision-model", required=True, type=click.Path(exists=True, file_okay=False),
              help="transformers SiglipModel directory (config, weights, tokenizer) the checkpoint was trained with.")
@click.option("--language-model", required=True, type=click.Path(exists=True, file_okay=False),
              help="BERT directory (config and tokenizer) of the joint encoder, e.g. MiniLM-L12-H384-uncased.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory to write (usable with --model).")
@click.option("--name", default="edje-official", show_default=True, help="Name recorded in the model directory.")
def convert_official_cmd(checkpoint, vision_model, language_model, out_dir, name):
    """Import a checkpoint of the official EDJE code ({"model": state_dict}; compressed or local variant)."""
    from edje_search.convert import convert_official

    model = convert_official(checkpoint, vision_model, language_model, out_dir, name=name)
    cfg = model.reranker.config
    click.echo(f"{cfg.variant} model ({cfg.tokens_per_image} tokens x {model.reranker.token_width} per image) "
               f"written to {out_dir}")


@click.command("import-first-stage")
@click.argument("name")
@click.option("--pretrained", default=None,
              help="open_clip pretrained tag (e.g. webli, openai, laion2b_s34b_b79k); required for architecture "
                   "names, not used with hf-hub: names.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="First-stage directory to write (give it to `train reranker --first-stage`).")
def import_first_stage_cmd(name, pretrained, out_dir):
    """Make a first stage from any open_clip model: NAME is an architecture (ViT-B-16-SigLIP2-256,
    ViT-L-14, ...) with --pretrained, or hf-hub:ORG/REPO. Weights come from the Hugging Face cache
    (downloaded once when online)."""
    from edje_search.models.hub import save_open_clip_first_stage

    first = save_open_clip_first_stage(name, out_dir, pretrained=pretrained)
    click.echo(f"first stage {name}{' ' + pretrained if pretrained else ''}: {first.embed_dim}-d embeddings, "
               f"{first.n_vision_tokens} vision tokens x {first.vision_width}, written to {out_dir}")


COMMANDS = (models, convert_official_cmd, import_first_stage_cmd)
