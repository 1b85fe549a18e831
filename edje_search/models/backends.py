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
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .joint_encoder import JointEncoder

BACKENDS = ("eager", "bf16", "dynamic-int8", "onnx", "onnx-int8")


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
        return self.joint.score_hidden(self.joint(input_ids, attention_mask, token_type_ids, image_tokens))


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


def weights_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("EDJE_HOME", Path.home() / ".cache" / "edje-search")) / "cache" / "onnx"


def export_onnx(joint: JointEncoder, path: Path, n_image_tokens: int) -> Path:
    """Export the fp32 scoring graph with dynamic batch and sequence length (atomic write)."""
    graph = _ScoreGraph(copy.deepcopy(joint).float().eval())
    # two pair sequences, the second right-padded, so the traced graph keeps the padding mask
    m, img = n_image_tokens, joint.image_token_id
    ids = torch.tensor([[101, 2000, 2001, 102] + [img] * m + [102], [101, 2000, 102] + [img] * m + [102, 0]])
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[ids.shape[1]], [ids.shape[1] - 1]])).long()
    types = torch.zeros_like(ids)
    types[0, 4:] = 1
    types[1, 3:-1] = 1
    example = (ids, mask, types, torch.randn(2, m, joint.hidden_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about shape-dependent Python branches
            torch.onnx.export(graph, example, str(tmp_file), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask", "token_type_ids", "image_tokens"],
                              output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                            "attention_mask": {0: "batch", 1: "length"},
                                            "token_type_ids": {0: "batch", 1: "length"},
                                            "image_tokens": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp_file, path)
    return path


def quantize_onnx(src: Path, dst: Path) -> Path:
    """ONNX Runtime dynamic quantisation: int8 weights, activations quantised on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        tmp_file = Path(tmp) / dst.name
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its advice to pre-process does not apply here
        try:
            # per-channel weight scales, and 7-bit activations: AVX2 without VNNI multiplies u8 x s8
            # pairs into saturating 16-bit sums, which full-range activations overflow
            quantize_dynamic(str(src), str(tmp_file), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             per_channel=True, reduce_range=True)
        finally:
            root.setLevel(level)
        os.replace(tmp_file, dst)
    return dst


def make_scorer(joint: JointEncoder, backend: str, n_image_tokens: int, *,
                cache_dir: Path | None = None) -> PairScorer:
    """A scorer of ``backend`` (one of BACKENDS) for this joint encoder."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown reranker backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "eager":
        return TorchScorer("eager", _ScoreGraph(joint))
    if backend == "bf16":
        return TorchScorer("bf16", _ScoreGraph(joint), torch.bfloat16)
    if backend == "dynamic-int8":
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(_ScoreGraph(joint)).float().cpu(),
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return TorchScorer("dynamic-int8", quantized, device=torch.device("cpu"))
    folder = (cache_dir or onnx_cache_dir()) / weights_hash(joint)
    fp32 = folder / "scorer.onnx"
    if not fp32.is_file():
        export_onnx(joint, fp32, n_image_tokens)
    if backend == "onnx":
        return OnnxScorer("onnx", fp32)
    int8 = folder / "scorer-int8-pc.onnx"  # per-channel, reduced range (see quantize_onnx)
    if not int8.is_file():
        quantize_onnx(fp32, int8)
    return OnnxScorer("onnx-int8", int8)

