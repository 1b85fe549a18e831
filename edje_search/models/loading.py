"""Building a model only to load saved weights into it: skip the random initialisation.

open_clip and transformers fill every parameter with random values when a model is built;
for a model that is about to be overwritten by its saved weights this is wasted work (about
12 s of a 30 s `query` start-up with SigLIP2-L/16-384, measured: benchmarks/results/
startup_fingerprint.json). transformers' ``no_init_weights`` turns torch's init functions into
no-ops while the modules are built; the weights loaded afterwards replace the uninitialised
memory. Used for the first stage only: transformers models also tie weights in the init step it
skips (the reranker's BERT is small: its initialisation costs little).
"""
from __future__ import annotations

import contextlib


def skip_init():
    """Context manager: build modules without initialising their parameters."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x keeps it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
