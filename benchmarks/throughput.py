"""Reranking throughput per backend, the matrix-multiply peak it is measured against, and the
"online" baseline that runs the paper's vision encoder for every image."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig

from edje_search.config import RerankerConfig
from edje_search.models.registry import bundled_minilm_dir
from edje_search.models.reranker import Reranker, add_image_token

from .timing import median_seconds

CAPTION = "a small red circle left of a large blue square on a grey table"
CAPTION_TOKENS = 16  # CAPTION's pair encoding adds [CLS] and two [SEP]: 14 words + 2 of the 3 specials


def joint_encoder(layers: int, tokens: int, variant: str = "compressed", vision_width: int = 1024) -> Reranker:
    """MiniLM-shaped joint encoder (random weights; speed does not depend on them)."""
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    add_image_token(tok, "<image>")
    bert = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=1024)
    cfg = RerankerConfig(variant=variant, vision_width=vision_width, vision_heads=16, n_queries=tokens,
                         n_vision_tokens=tokens, mlp_dim=8192)
    return Reranker(cfg, bert, tok).eval()


def pairs_per_second(r: Reranker, tokens: int, batch: int, repeats: int) -> float:
    """Pairs/s of ``r.score`` (in whatever backend ``r`` uses) on a batch of one caption x images."""
    caps = [CAPTION] * batch
    x = torch.randn(batch, tokens, 384)

    def run():
        with torch.inference_mode():
            r.score(caps, projected_tokens=x)
    return batch / median_seconds(run, warmup=2, repeats=repeats)


def bert_flops_per_pair(layers: int, seq: int, hidden: int = 384, inter: int = 1536) -> float:
    """Multiply-adds x 2 of the encoder layers (projections, attention, FFN) for one sequence."""
    per_layer = 2 * seq * (4 * hidden * hidden + 2 * hidden * inter) + 2 * 2 * seq * seq * hidden
    return layers * per_layer


def matmul_peak_gflops(precision: str, n: int = 1024, repeats: int = 5) -> float:
    """Dense n x n x n matmul rate in torch: fp32 or bf16."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats=repeats) / 1e9


def onnx_matmul_peak_gops(int8: bool, n: int = 1024, repeats: int = 5) -> float:
    """The same matmul in ONNX Runtime, fp32 or dynamically quantised to int8 (what onnx-int8 runs)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edje_search.models.backends import quantize_onnx

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        if int8:
            path = quantize_onnx(path, Path(d) / "mm-int8.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
        return 2 * n**3 / median_seconds(lambda: sess.run(None, {"x": x}), repeats=repeats) / 1e9


def online_vision_seconds(repeats: int) -> float:
    """Seconds per image of the paper's vision encoder (ViT-L/16 at 384 px, random weights)."""
    import timm

    vit = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.inference_mode():
        return median_seconds(lambda: vit.forward_features(x), warmup=1, repeats=repeats)
