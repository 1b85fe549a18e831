"""Our FAISS recipe choice against autofaiss's (the library clip-retrieval uses), by running both.

To repeat (autofaiss gets its own venv: it pins numpy<2, ours has numpy 2):

    python3 -m venv /tmp/afvenv
    /tmp/afvenv/bin/pip install autofaiss==2.18.0 pyarrow==25.0.1
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.autofaiss_compare

pyarrow is pinned because pip picks pyarrow 26, which needs numpy 2, and autofaiss then fails
to import under its own numpy<2 pin.

It takes about 25 minutes on 2 busy cores, almost all of it in autofaiss's two builds.

What it does. It writes N vectors from benchmarks.scale.Vectors (the rows scale.py adds) to a
.npy file under --work, and draws 1,000 held-out queries the same way. It builds each index
in its own process on one thread:
- ours: choose_recipe, new_segment_index, a training sample, tune_recall, as
  storage/compaction.encode_all does;
- autofaiss: build_index in the other venv, once with should_be_memory_mappable (our segments
  are memory-mapped, so this is the like-for-like case) and once with its defaults.
Then it measures each index on the same queries with k=10: recall@10 against exact search
(IndexFlatIP), single-query latency (wall and CPU) with the nprobe/efSearch that side chose,
file size, build seconds, and the builder's peak RSS. Build seconds are timed inside the
builder: reading, training, adding, tuning, writing. The builder's whole wall time, imports
included, is recorded too. For sizes too big to build here (--plan-rows), it records only
which recipe each side would choose. Writes benchmarks/results/autofaiss.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import timing
from benchmarks.scale import Vectors
from edje_search.storage import vector_index
from edje_search.storage.compaction import TARGET_RECALL, tune_recall

faiss = vector_index.faiss
RESULTS = Path(__file__).parent / "results" / "autofaiss.json"
K = 10
QUERY_START = 10**9  # query rows come from far past any data row: same centres, other noise

# Runs in the autofaiss venv. argv[1] is a JSON object of arguments; prints "RESULT {json}".
AUTOFAISS_BUILD = r"""
import json, sys, time
t0 = time.perf_counter()
import faiss, numpy, autofaiss
from autofaiss import build_index
a = json.loads(sys.argv[1])
t1 = time.perf_counter()
_, infos = build_index(embeddings=a["embeddings"], index_path=a["index"], index_infos_path=a["infos"],
                       max_index_memory_usage=a["max_index_memory"], current_memory_available=a["memory"],
                       metric_type="ip", nb_cores=1, should_be_memory_mappable=a["memory_mappable"])
hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("RESULT " + json.dumps({"import_s": t1 - t0, "build_index_s": time.perf_counter() - t1, "peak_rss_mb": hwm,
                              "autofaiss": autofaiss.__version__ if hasattr(autofaiss, "__version__") else None,
                              "faiss": faiss.__version__, "numpy": numpy.__version__}))
"""

# Runs in the autofaiss venv: what autofaiss would choose, without building anything.
AUTOFAISS_PLAN = r"""
import json, sys, logging
logging.disable(logging.CRITICAL)
from autofaiss.external.optimize import get_optimal_index_keys_v2, get_optimal_train_size
from autofaiss.external.build import estimate_memory_required_for_index_creation
from autofaiss.external.metadata import IndexMetadata
a = json.loads(sys.argv[1])
out = []
for n, dim, budget, mmap in a["cases"]:
    keys = get_optimal_index_keys_v2(n, dim, budget, should_be_memory_mappable=mmap)
    key = keys[0] if keys else None
    row = {"rows": n, "dim": dim, "max_index_memory_usage": budget, "memory_mappable": mmap, "recipe": key,
           "alternatives": keys[1:]}
    if key:
        row["index_bytes_estimate"] = int(IndexMetadata(key, n, dim).estimated_index_size_in_bytes())
        row["build_memory_bytes_estimate"] = int(estimate_memory_required_for_index_creation(n, dim, key, budget)[0])
        try:
            row["training_rows"] = int(get_optimal_train_size(n, key, a["memory"], dim))
        except ValueError:  # HNSW and Flat take no training sample
            row["training_rows"] = 0
    out.append(row)
print("RESULT " + json.dumps(out))
"""


# ----------------------------------------------------------------------------- data
def write_vectors(gen: Vectors, n: int, path: Path, batch: int = 10_000) -> None:
    """The first n rows of ``gen``, batch by batch as scale.py adds them, into one .npy file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, gen.dim))
    for start in range(0, n, batch):
        out[start:start + batch] = gen.batch(start, min(batch, n - start))
    out.flush()
    del out


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Exact top-k rows by inner product, an IndexFlatIP per chunk so RAM stays at one chunk."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(vectors), chunk):
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors[start:start + chunk]))
        s, r = flat.search(queries, k)
        all_s, all_r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r + start], 1)
        top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_r, top, 1)
    return best_r


# ----------------------------------------------------------------------------- builders
def build_ours(vectors_path: Path, out_dir: Path) -> dict:
    """One-shot build the way storage/compaction.encode_all retrains: recipe by size, a training sample,
    every row added under its row id, nprobe/efSearch tuned to TARGET_RECALL. Run in a child."""
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    vecs = np.load(vectors_path, mmap_mode="r")
    n, dim = vecs.shape
    recipe = vector_index.choose_recipe(n, dim)
    template = vector_index.new_segment_index(recipe, dim)
    n_train = 0
    if not template.is_trained:
        n_train = min(n, max(vector_index.training_rows(recipe), 64 * vector_index.n_lists(recipe)))
        sample = np.sort(np.random.default_rng(1).choice(n, n_train, replace=False))
        template.train(np.ascontiguousarray(vecs[sample]))
    trained_s = time.perf_counter() - t0
    index = faiss.clone_index(template)
    rows = np.arange(n, dtype=np.int64)
    for s in range(0, n, 100_000):
        index.add_with_ids(np.ascontiguousarray(vecs[s:s + 100_000]), rows[s:s + 100_000])
    out_dir.mkdir(parents=True, exist_ok=True)
    vector_index.write_index(index, out_dir / "segment.index")
    if vector_index.training_rows(recipe):
        vector_index.write_index(template, out_dir / "template.index")
    knob = "nprobe" if vector_index.n_lists(recipe) else "ef_search" if "HNSW" in recipe else None
    value, recall = (None, None)
    if knob:
        value, recall = tune_recall(index, rows, vecs, recipe, knob, k=K, target=TARGET_RECALL,
                                    refine=vector_index.needs_refine(recipe))
    return {"recipe": recipe, "training_rows": n_train, "knob": knob, "value": value,
            "tune_recall_at_10": recall, "train_s": trained_s, "build_index_s": time.perf_counter() - t0,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which keeps the parent's)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM"))


def run_child(cmd: list[str], log: Path) -> tuple[dict, float]:
    """Run a builder process: (its RESULT json, wall seconds including interpreter start and imports)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    t = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        proc.wait()
    wall = time.perf_counter() - t
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd[:3]} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):]), wall


# ----------------------------------------------------------------------------- measuring
def measure(index, queries: np.ndarray, truth: np.ndarray, search) -> dict:
    """recall@10 and one-query-at-a-time latency over every query (after 50 warm-up queries): wall
    time, and CPU time, which the other jobs on a busy machine do not inflate."""
    for q in queries[:50]:
        search(index, q[None])
    found, wall, cpu = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        found.append(search(index, q[None])[0])
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    found = np.asarray(found)
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))
    wall_ms, cpu_ms = 1000 * np.asarray(wall), 1000 * np.asarray(cpu)
    return {"recall_at_10": recall, "p50_ms": float(np.median(wall_ms)), "p95_ms": float(np.percentile(wall_ms, 95)),
            "cpu_p50_ms": float(np.median(cpu_ms))}


def measure_ours(out_dir: Path, built: dict, queries, truth) -> dict:
    seg = vector_index.read_segment(out_dir / "segment.index", built["recipe"])  # memory-mapped, as the engine opens it
    knob = {built["knob"]: built["value"]} if built["knob"] else {}

    def search(index, q):
        return vector_index.search_segments([index], q, K, **knob)[1]

    files = {p.name: p.stat().st_size for p in out_dir.iterdir()}
    return {**measure(seg, queries, truth, search), "index_bytes": files["segment.index"],
            "template_bytes": files.get("template.index", 0)}


def measure_autofaiss(index_path: Path, infos: dict, queries, truth) -> dict:
    plain = faiss.read_index(str(index_path))
    ivf = vector_index.is_ivf(plain)
    stored = {"nprobe": faiss.extract_index_ivf(plain).nprobe} if ivf else {}
    hnsw = faiss.downcast_index(plain)
    if hasattr(hnsw, "hnsw"):
        stored["efSearch"] = hnsw.hnsw.efSearch
    del plain, hnsw
    # Opened as clip-retrieval opens it with memory mapping on (IVF lists on disk); HNSW is read whole.
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if ivf \
        else faiss.read_index(str(index_path))
    if infos.get("index_param"):
        faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])

    def search(idx, q):
        return idx.search(q, K)[1]

    return {**measure(index, queries, truth, search), "index_bytes": index_path.stat().st_size,
            "params_stored_in_file": stored}


# ----------------------------------------------------------------------------- main
def machine() -> dict:
    """timing.machine() plus memory, load and the FAISS/numpy versions of our side."""
    mem = next((ln.split(":", 1)[1].strip() for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), "")
    return {**timing.machine(), "mem_total": mem, "loadavg": open("/proc/loadavg").read().split()[:3],
            "python": platform.python_version(), "faiss_ours": faiss.__version__, "numpy_ours": np.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[200_000], help="sizes built and measured")
    ap.add_argument("--plan-rows", type=int, nargs="*", default=[999_999, 1_000_000],
                    help="sizes only planned (what each side would choose), at --dim and 512")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--centres", type=int, default=50_000)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--modes", nargs="+", default=["memory_mappable", "default"],
                    choices=["memory_mappable", "default"],
                    help="autofaiss runs: should_be_memory_mappable=True, and its default (HNSW when RAM allows)")
    ap.add_argument("--max-index-memory", default="4G", help="autofaiss max_index_memory_usage")
    ap.add_argument("--memory", default="5G", help="autofaiss current_memory_available")
    ap.add_argument("--autofaiss-python", default="/tmp/afvenv/bin/python")
    ap.add_argument("--work", default="/tmp/autofaiss_compare", help="vectors and indexes go here")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--build-ours", nargs=2, metavar=("VECTORS", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_ours:  # child process
        print("RESULT " + json.dumps(build_ours(Path(args.build_ours[0]), Path(args.build_ours[1]))))
        return

    faiss.omp_set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pip = Path(args.autofaiss_python).parent / "pip"
    freeze = subprocess.run([str(pip), "freeze"], capture_output=True, text=True).stdout.split()
    result = {"command": "OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.autofaiss_compare "
                         f"--rows {' '.join(map(str, args.rows))} --dim {args.dim}",
              "data": {"generator": "benchmarks.scale.Vectors", "dim": args.dim, "centres": args.centres,
                       "noise": args.noise, "queries": args.queries, "query_rows_from": QUERY_START, "k": K},
              "autofaiss_args": {"max_index_memory_usage": args.max_index_memory,
                                 "current_memory_available": args.memory, "metric_type": "ip", "nb_cores": 1},
              "our_target_recall": TARGET_RECALL, "threads": 1, "machine_start": machine(),
              "autofaiss_venv_packages": freeze, "runs": [], "plans": []}

    def save():
        result["machine_end"] = machine()
        result["main_process_peak_rss_mb"] = _peak_rss_mb()
        Path(args.out).parent.mkdir(exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    # What each side would pick, without building (cheap).
    cases = [[n, d, budget, mmap] for n in args.plan_rows + args.rows for d in sorted({args.dim, 512}, reverse=True)
             for budget in (args.max_index_memory, "16G") for mmap in (False, True)]
    plan_args = json.dumps({"cases": cases, "memory": args.memory})
    plan, _ = run_child([args.autofaiss_python, "-c", AUTOFAISS_PLAN, plan_args], work / "plan.log")
    for row in plan:
        recipe = vector_index.choose_recipe(row["rows"], row["dim"])
        row["ours"] = {"recipe": recipe, "training_rows": min(row["rows"], max(vector_index.training_rows(recipe),
                                                                              64 * vector_index.n_lists(recipe)))}
    result["plans"] = plan
    save()

    gen = Vectors(args.dim, args.centres, args.noise)
    queries = np.ascontiguousarray(gen.batch(QUERY_START, args.queries))
    for n in args.rows:
        folder = work / f"n{n}"
        emb_dir = folder / "embeddings"  # autofaiss reads every .npy in this folder: the vectors only
        vectors_path = emb_dir / "vectors.npy"
        t = time.perf_counter()
        write_vectors(gen, n, vectors_path)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        truth = exact_neighbours(np.load(vectors_path, mmap_mode="r"), queries, K)
        run = {"rows": n, "dim": args.dim, "generate_s": gen_s, "exact_search_s": time.perf_counter() - t}
        result["runs"].append(run)
        print(f"{n} rows written ({gen_s:.0f} s), exact top-{K} in {run['exact_search_s']:.0f} s", flush=True)

        built, wall = run_child([sys.executable, "-m", "benchmarks.autofaiss_compare", "--build-ours",
                                      str(vectors_path), str(folder / "ours")], folder / "ours.log")
        run["ours"] = {**built, "process_wall_s": wall,
                       **measure_ours(folder / "ours", built, queries, truth)}
        print("ours", json.dumps(run["ours"]), flush=True)
        save()

        for mode in args.modes:
            index_path, infos_path = folder / f"autofaiss_{mode}.index", folder / f"autofaiss_{mode}_infos.json"
            arg = {"embeddings": str(emb_dir), "index": str(index_path), "infos": str(infos_path),
                   "max_index_memory": args.max_index_memory, "memory": args.memory,
                   "memory_mappable": mode == "memory_mappable"}
            try:
                built, wall = run_child([args.autofaiss_python, "-c", AUTOFAISS_BUILD, json.dumps(arg)],
                                             folder / f"autofaiss_{mode}.log")
            except RuntimeError as e:
                run[f"autofaiss_{mode}"] = {"error": str(e)[-1500:]}
                save()
                continue
            infos = json.loads(infos_path.read_text())
            run[f"autofaiss_{mode}"] = {"recipe": infos.get("index_key"), "params": infos.get("index_param"),
                                        "process_wall_s": wall, **built,
                                        **measure_autofaiss(index_path, infos, queries, truth),
                                        "autofaiss_infos": infos}
            print(mode, json.dumps({k: v for k, v in run[f"autofaiss_{mode}"].items() if k != "autofaiss_infos"}),
                  flush=True)
            save()
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
