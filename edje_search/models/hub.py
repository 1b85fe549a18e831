"""Models from the Hugging Face hub cache: edje-search model repos and open_clip first stages.

Both go through ``huggingface_hub``, so they use the usual cache (``$HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``): with network access files are fetched once; offline, what the
cache holds is used and anything missing is named in one :class:`ModelNotAvailable` message.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..config import FirstStageConfig
from .first_stage import TOKENIZER_DIR, FirstStage
from .names import ModelNotAvailable, is_hub_ref, split_hub_ref

logger = logging.getLogger(__name__)
OPENAI_CLIP_DEFAULTS = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}


def _missing(what: str, repo: str, err: Exception) -> ModelNotAvailable:
    from huggingface_hub import constants

    return ModelNotAvailable(
        f"{what} '{repo}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be "
        f"downloaded ({type(err).__name__}); on a machine with network run `huggingface-cli download {repo}` "
        f"and copy that cache here (or set HF_HUB_CACHE), or pass a local directory instead")


def hub_snapshot(ref: str) -> Path:
    """``hf-hub:org/name[@revision]`` -> local snapshot directory (cache first, then network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = split_hub_ref(ref)
    try:
        return Path(snapshot_download(repo, revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise _missing("model", repo, e) from e


def _hub_file(repo: str, filename: str, revision: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise _missing(f"file {filename} of", repo, e) from e


def _cache_first(auto_class, repo: str, what: str):
    """``auto_class.from_pretrained(repo)`` from the cache alone when it is there (no network
    round trips, which offline cost a minute of retries), else through the hub."""
    try:
        return auto_class.from_pretrained(repo, local_files_only=True)
    except OSError:
        logger.info("%s %s is not in the Hugging Face cache; asking the hub", what, repo)
    try:
        return auto_class.from_pretrained(repo)
    except OSError as e:
        raise _missing(what, repo, e) from e


def _open_clip_configs(name: str, pretrained: str | None) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of an open_clip architecture or ``hf-hub:`` repo."""
    import open_clip

    if is_hub_ref(name):
        repo, revision = split_hub_ref(name)
        cfg = json.loads(_hub_file(repo, "open_clip_config.json", revision).read_text())
        return cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelNotAvailable(f"'{name}' is not an open_clip architecture (see open_clip.list_models())")
    pre = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if not pre:  # without weights a first stage ranks at random
        tags = ", ".join(t for n, t in open_clip.list_pretrained() if n == name) or "none"
        if pretrained:
            raise ModelNotAvailable(f"open_clip has no pretrained tag '{pretrained}' for {name} (known: {tags})")
        raise ModelNotAvailable(f"no --pretrained tag given for {name}; pick one of: {tags}")
    return model_cfg, pre


def save_open_clip_first_stage(name: str, out_dir: str | Path, pretrained: str | None = None) -> FirstStage:
    """Write a first-stage directory from any open_clip architecture + pretrained tag, or an
    ``hf-hub:`` open_clip repo; ``edje-search train reranker --first-stage OUT_DIR`` then trains on it.

    Weights come through open_clip (and so through the hub cache); the tokenizer (and, for a
    Hugging Face text tower, its config) is copied into the directory, so it loads offline.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        return _write_open_clip_first_stage(name, out_dir, pretrained)
    except BaseException:
        if created:  # a failed import leaves nothing behind (e.g. a tokenizer without weights)
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _write_open_clip_first_stage(name: str, out_dir: Path, pretrained: str | None) -> FirstStage:
    import open_clip
    from transformers import AutoConfig, AutoTokenizer

    model_cfg, pre = _open_clip_configs(name, pretrained)
    text_cfg = model_cfg.get("text_cfg", {})
    vision_size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    image_size = int(vision_size[0] if isinstance(vision_size, (list, tuple)) else vision_size)
    tok_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    tokenizer_dir = None
    if tok_name:  # cheap checks first: the tokenizer, then the weights file, then build the model
        tokenizer_dir = out_dir / TOKENIZER_DIR
        _cache_first(AutoTokenizer, tok_name, "tokenizer").save_pretrained(str(tokenizer_dir))
        if text_cfg.get("hf_model_name"):
            _cache_first(AutoConfig, text_cfg["hf_model_name"], "text tower config").save_pretrained(
                str(tokenizer_dir))
    try:
        if is_hub_ref(name):  # without require_pretrained, missing weights only warn
            source = open_clip.create_model(name, require_pretrained=True)
        else:
            source = open_clip.create_model(name, pretrained=open_clip.download_pretrained(pre))
    except (OSError, RuntimeError, ValueError) as e:
        raise _missing("open_clip weights of", f"{name} {pretrained or ''}".strip(), e) from e
    config = FirstStageConfig(
        model_cfg=model_cfg, image_size=image_size,
        mean=tuple(pre.get("mean", OPENAI_CLIP_DEFAULTS["mean"])),
        std=tuple(pre.get("std", OPENAI_CLIP_DEFAULTS["std"])),
        resize_mode=pre.get("resize_mode", "shortest"), interpolation=pre.get("interpolation", "bicubic"),
        context_length=int(text_cfg.get("context_length", 77)),
        tokenizer="hf" if tok_name else "openai", tokenizer_kwargs=dict(text_cfg.get("tokenizer_kwargs", {})),
    )
    first = FirstStage(config, tokenizer_dir=tokenizer_dir)
    first.clip.load_state_dict(source.state_dict())
    first.save_pretrained(out_dir)
    return first.eval()
