"""Opening a saved model fast: build without initialising, then map the weights instead of copying.

Two costs dominate opening a full-size first stage (SigLIP2-L/16-384, 3.5 GB of fp32 weights)
when the weights come from a file right after:

- open_clip, timm and transformers fill every parameter with random values when a model is
  built. :func:`skip_init` turns torch's init functions into no-ops (transformers'
  ``no_init_weights``) and timm's ViT initialisation too while the modules are built; the
  weights loaded afterwards replace the uninitialised memory (measured on SigLIP2-L/16-384:
  3.3 s of timm init and about 1 s of BERT init per `query` start).
- ``safetensors.torch.load_model`` copies every tensor into the module's parameters, so all
  3.5 GB are read before the first query although a text query never touches the vision tower
  and only a few rows of the 256k-token embedding table. :func:`map_weights` instead memory-maps
  the file (safetensors' own lazy ``load_file``) and makes the parameters *be* those tensors
  (``load_state_dict(assign=True)``): pages are read when first used, so a query-only process
  reads the text tower alone, and processes on one machine share the page cache. The mapping is
  private copy-on-write: training in place never writes to the file. Our own saves replace
  files by atomic rename (fsutil.atomic_write), which leaves a mapped model on the old file;
  a tool that rewrites a weight file in place (``cp`` over it) while a model is open would show
  through in pages not yet read, as with any memory-mapped file. Windows cannot rename over a
  mapped file, so there the weights are copied as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_model
from torch import nn

from ..config import save_config
from ..fsutil import atomic_write

logger = logging.getLogger(__name__)


def _timm_vit_init_skipped():
    """timm's VisionTransformer initialises itself with timm's own functions (not torch.nn.init),
    which transformers' context does not reach: about 3 s for a ViT-L. Same effect as timm's
    ``weight_init='skip'``, which open_clip gives no way to pass."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return contextlib.nullcontext()
    return mock.patch.object(VisionTransformer, "init_weights", lambda self, *args, **kwargs: None)


@contextlib.contextmanager
def skip_init():
    """Context manager: build modules without initialising their parameters.

    transformers models built inside it are not tied either (tying is part of the skipped init
    step): call ``tie_weights()`` before loading weights into them. The patches are
    process-wide while the block runs (torch's init functions, timm's ViT init): do not build
    other models on other threads meanwhile.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x keeps it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            logger.info("transformers has no no_init_weights: models are initialised before loading")
            no_init_weights = contextlib.nullcontext
    with no_init_weights(), _timm_vit_init_skipped():
        yield


def _shares_parameters(module: nn.Module) -> bool:
    seen: set[int] = set()
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            return True
        seen.add(id(p))
    return False


def map_weights(module: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a safetensors file into ``module`` by memory map; returns (missing, unexpected) keys.

    Copied instead (``safetensors.torch.load_model``, which casts to the module's dtypes) when
    the module has tied parameters (one tensor under two names, stored once: assigning would
    untie them), when a tensor's dtype differs from the module's, or on Windows. Parameters stay
    on the CPU; ``.to(device)`` copies them.
    """
    from safetensors.torch import load_file, load_model

    state = load_file(str(path))  # lazy: tensors are views of a private mapping of the file
    own = module.state_dict()
    why = ("tied parameters" if _shares_parameters(module)
           else "dtypes differ" if any(k in own and own[k].dtype != v.dtype for k, v in state.items())
           else "Windows" if os.name == "nt" else "")
    if why:
        logger.info("%s: copying the weights (%s)", path, why)
        return load_model(module, str(path), strict=False)
    result = module.load_state_dict(state, strict=False, assign=True)
    return list(result.missing_keys), list(result.unexpected_keys)


def save_component(directory: str | Path, config, config_name: str, module: nn.Module, weights_name: str) -> Path:
    """Write one model part's directory: its frozen config as JSON and its weights as safetensors.

    The weights file is replaced by an atomic rename, so a process that has the old weights
    memory-mapped (:func:`map_weights`) keeps reading its own copy."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(config, directory / config_name)
    atomic_write(directory / weights_name, lambda tmp: save_model(module, str(tmp)))
    return directory


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes) of a module in memory
    (cache keys; a saved model is identified by models.info.tensor_fingerprint of its files)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    return h.hexdigest()
