"""make-dataset, train, eval (filled in by the training work)."""
from __future__ import annotations
