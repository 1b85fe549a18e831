"""edje-search benchmarks: reranking throughput, hardware fraction, storage, gathers, query latency.

    python -m benchmarks.run --quick      # CI-sized (make bench)
    python -m benchmarks.run              # full sizes (make bench-full)

Every figure is a median over repeats after warm-up, measured in one run so ratios compare
like with like. Results go to benchmarks/results/bench.json (and bench.png when matplotlib is there).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig

from edje_search.config import RerankerConfig
from edje_search.models.registry import bundled_minilm_dir
from edje_search.models.reranker import Reranker, add_image_token
from edje_search.storage.token_store import ZarrTokenStore

from .timing import machine, median_seconds

RESULTS = Path(__file__).parent / "results"
CAPTION = "a small red circle left of a large blue square on a grey table"


def joint_encoder(layers: int, tokens: int, variant: str = "compressed", vision_width: int = 1024) -> Reranker:
    """MiniLM-shaped joint encoder (random weights; speed does not depend on them)."""
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    add_image_token(tok, "<image>")
    bert = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=1024)
    cfg = RerankerConfig(variant=variant, vision_width=vision_width, vision_heads=16, n_queries=tokens,
                         n_vision_tokens=tokens, mlp_dim=8192)
    return Reranker(cfg, bert, tok).eval()


def pairs_per_second(r: Reranker, tokens: int, batch: int, repeats: int, precision: str = "fp32") -> float:
    caps = [CAPTION] * batch
    x = torch.randn(batch, tokens, 384)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)

    def run():
        with torch.inference_mode(), ctx:
            r.score(caps, projected_tokens=x)
    return batch / median_seconds(run, repeats=repeats)


def bert_flops_per_pair(layers: int, seq: int, hidden: int = 384, inter: int = 1536) -> float:
    """Multiply-adds x 2 of the encoder layers (projections, attention, FFN) for one sequence."""
    per_layer = 2 * seq * (4 * hidden * hidden + 2 * hidden * inter) + 2 * 2 * seq * seq * hidden
    return layers * per_layer


def matmul_peak_gflops(precision: str, n: int = 1024, repeats: int = 5) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats=repeats) / 1e9


def online_vision_seconds(repeats: int) -> float:
    """Seconds per image of the paper's vision encoder (ViT-L/16 at 384 px, random weights)."""
    import timm

    vit = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.inference_mode():
        return median_seconds(lambda: vit.forward_features(x), warmup=1, repeats=repeats)


def gather_latency(n_rows: int, ks=(10, 50, 100), repeats: int = 20) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        store = ZarrTokenStore.create(Path(d) / "t.zarr", 64, 384, chunk_rows=16)
        block = np.random.default_rng(0).standard_normal((4096, 64, 384)).astype(np.float16)
        for s in range(0, n_rows, 4096):
            store.write(s, block[: min(4096, n_rows - s)])
        rng = np.random.default_rng(1)
        for k in ks:
            out[f"k={k}"] = 1000 * median_seconds(lambda k=k: store.get(rng.choice(n_rows, k, replace=False)),
                                                  warmup=2, repeats=repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    args = ap.parse_args()
    torch.manual_seed(0)
    reps = 3 if args.quick else 7
    batch = 32 if args.quick else 64
    res: dict = {"machine": machine(), "mode": "quick" if args.quick else "full", "time": time.strftime("%F %T")}

    thr = {}
    seq_text = 16  # tokens of the caption incl. [CLS]/[SEP]
    for layers, name in ((12, "L12"), (6, "L6")):
        for tokens in (64, 32):
            r = joint_encoder(layers, tokens)
            thr[f"{name} m={tokens} fp32"] = pairs_per_second(r, tokens, batch, reps)
            thr[f"{name} m={tokens} bf16"] = pairs_per_second(r, tokens, batch, reps, "bf16")
    local = joint_encoder(12, 576, variant="local")
    thr["L12 local 576 fp32"] = pairs_per_second(local, 576, 8, max(2, reps // 2))
    vision_s = online_vision_seconds(max(1, reps // 3))
    thr["L12 online (ViT-L/16-384 + m=64) fp32"] = 1 / (vision_s + 1 / thr["L12 m=64 fp32"])
    res["throughput_pairs_per_s"] = thr
    res["vision_encoder_s_per_image"] = vision_s

    peak = {p: matmul_peak_gflops(p) for p in ("fp32", "bf16")}
    flops = bert_flops_per_pair(12, 64 + seq_text)
    res["hardware"] = {
        "matmul_peak_gflops": peak,
        "L12 m=64 achieved_gflops": {p: thr[f"L12 m=64 {p}"] * flops / 1e9 for p in ("fp32", "bf16")},
        "L12 m=64 fraction_of_peak": {p: thr[f"L12 m=64 {p}"] * flops / 1e9 / peak[p] for p in ("fp32", "bf16")},
    }
    res["bytes_per_image"] = {"fp32": 64 * 384 * 4, "fp16": 64 * 384 * 2, "local fp16 (576 tokens)": 576 * 384 * 2}
    res["ratios"] = {
        "compressed/local": thr["L12 m=64 fp32"] / thr["L12 local 576 fp32"],
        "compressed/online": thr["L12 m=64 fp32"] / thr["L12 online (ViT-L/16-384 + m=64) fp32"],
        "bf16/fp32 (L12 m=64)": thr["L12 m=64 bf16"] / thr["L12 m=64 fp32"],
    }
    res["gather_ms"] = {f"N={n}": gather_latency(n) for n in ((10_000,) if args.quick else (10_000, 100_000))}

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
