"""Ways to run the joint encoder's scoring pass: (ids, mask, types, image tokens) -> one logit per pair.

The reranker tokenizes and checks inputs itself; a backend only runs the numeric graph, so
every backend sees identical inputs and can be compared logit for logit against ``eager``:

- ``eager``: transformers BERT in the model's own precision (fp32 by default).
- ``bf16``: eager under bfloat16 autocast (pays on GPUs and on CPUs with AMX/AVX512-BF16).
- ``dynamic-int8``: torch dynamic quantisation of every Linear (int8 weights, int8 activations
  quantised per batch).
- ``onnx``: the graph exported to ONNX and run by ONNX Runtime (fp32, fused kernels).
- ``onnx-int8``: that graph with ONNX Runtime's dynamic int8 quantisation of MatMuls.

ONNX files are cached under ``$EDJE_HOME/cache/onnx/<weights hash>/`` (export takes seconds).
The export traces the graph on a real pair encoding from the reranker's tokenizer, so the
special-token ids in the example are the model's own.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import BadInput
from ..fsutil import atomic_write
from .joint_encoder import JointEncoder
from .loading import weights_hash
from .names import BACKENDS, edje_home

logger = logging.getLogger(__name__)

CPU_ONLY = ("dynamic-int8", "onnx", "onnx-int8")  # quantised torch kernels, ONNX Runtime's CPU provider


class PairScorer(Protocol):
    name: str

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                 image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) x 3 and (B, m, H) -> (B,) float32 logits."""
        ...


class _ScoreGraph(nn.Module):
    """The scoring pass as one module (what the torch backends run and what ONNX exports)."""

    def __init__(self, joint: JointEncoder):
        super().__init__()
        self.joint = joint

    def forward(self, input_ids, attention_mask, token_type_ids, image_tokens):
        return self.joint.score_hidden(self.joint(input_ids, attention_mask, token_type_ids, image_tokens),
                                       attention_mask)


class TorchScorer:
    """Runs the graph in torch; ``device`` pins it to one device (quantised kernels are CPU-only),
    inputs are moved there and the logits back."""

    def __init__(self, name: str, graph: nn.Module, autocast_dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        self.name = name
        self.graph = graph.eval()
        self.autocast_dtype = autocast_dtype
        self.device = device

    def __call__(self, input_ids, attention_mask, token_type_ids, image_tokens) -> torch.Tensor:
        caller = input_ids.device
        run_on = self.device or caller
        inputs = [t.to(run_on) for t in (input_ids, attention_mask, token_type_ids)]
        # a pinned graph is fp32 (see make_scorer) whatever the caller's precision
        image_tokens = image_tokens.to(run_on, torch.float32 if self.device else image_tokens.dtype)
        with torch.autocast(run_on.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.graph(*inputs, image_tokens).float().to(caller)


class OnnxScorer:
    def __init__(self, name: str, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name = name
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask, token_type_ids, image_tokens) -> torch.Tensor:
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64),
                 "token_type_ids": token_type_ids.cpu().numpy().astype(np.int64),
                 "image_tokens": image_tokens.detach().float().cpu().numpy()}
        (logits,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(logits).to(input_ids.device)


def onnx_cache_dir() -> Path:
    return edje_home() / "cache" / "onnx"


def export_onnx(joint: JointEncoder, path: Path, example: Mapping[str, torch.Tensor]) -> Path:
    """Export the fp32 scoring graph with dynamic batch and sequence length (atomic write).

    ``example``: a pair encoding (input_ids, attention_mask, token_type_ids, each (B, L)) from
    the model's tokenizer, of at least two pairs with one right-padded, so the traced graph
    keeps the padding mask; random image tokens fill its <image> slots.
    """
    graph = _ScoreGraph(copy.deepcopy(joint).float().eval())
    ids = example["input_ids"].cpu()
    if ids.shape[0] < 2 or bool(example["attention_mask"].all()):
        raise BadInput("the ONNX export example needs two or more pairs, one of them padded")
    m = int((ids[0] == joint.image_token_id).sum())
    inputs = (ids, example["attention_mask"].cpu(), example["token_type_ids"].cpu(),
              torch.randn(ids.shape[0], m, joint.hidden_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("exporting the reranker's scoring graph to ONNX: %s", path)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about shape-dependent Python branches
            torch.onnx.export(graph, inputs, str(tmp), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask", "token_type_ids", "image_tokens"],
                              output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                            "attention_mask": {0: "batch", 1: "length"},
                                            "token_type_ids": {0: "batch", 1: "length"},
                                            "image_tokens": {0: "batch"}, "logits": {0: "batch"}})

    atomic_write(path, write)
    return path


def quantize_onnx(src: Path, dst: Path) -> Path:
    """ONNX Runtime dynamic quantisation: int8 weights, activations quantised on the fly.

    ONNX Runtime logs advice to pre-process the model through the root logger; it is left
    to the application's logging configuration (this library never touches the root logger).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger.info("quantising %s to int8 (ONNX Runtime dynamic quantisation): %s", src.name, dst)
    # per-channel weight scales, and 7-bit activations: AVX2 without VNNI multiplies u8 x s8
    # pairs into saturating 16-bit sums, which full-range activations overflow
    atomic_write(dst, lambda tmp: quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                                                   op_types_to_quantize=["MatMul"], per_channel=True,
                                                   reduce_range=True))
    return dst


def make_scorer(joint: JointEncoder, backend: str, example: Mapping[str, torch.Tensor], *,
                cache_dir: Path | None = None) -> PairScorer:
    """A scorer of ``backend`` (one of BACKENDS) for this joint encoder; ``example`` is a pair
    encoding from its tokenizer, traced by the ONNX backends (see :func:`export_onnx`)."""
    if backend not in BACKENDS:
        raise BadInput(f"unknown reranker backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "eager":
        return TorchScorer("eager", _ScoreGraph(joint))
    if backend == "bf16":
        return TorchScorer("bf16", _ScoreGraph(joint), torch.bfloat16)
    device = next(joint.parameters()).device
    if backend in CPU_ONLY and device.type != "cpu":
        logger.warning("the %s backend runs on the CPU only: reranking moves off %s", backend, device)
    if backend == "dynamic-int8":
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(_ScoreGraph(joint)).float().cpu(),
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return TorchScorer("dynamic-int8", quantized, device=torch.device("cpu"))
    folder = (cache_dir or onnx_cache_dir()) / weights_hash(joint)[:16]
    fp32 = folder / "scorer.onnx"
    if not fp32.is_file():
        export_onnx(joint, fp32, example)
    if backend == "onnx":
        return OnnxScorer("onnx", fp32)
    int8 = folder / "scorer-int8-pc.onnx"  # per-channel, reduced range (see quantize_onnx)
    if not int8.is_file():
        quantize_onnx(fp32, int8)
    return OnnxScorer("onnx-int8", int8)

