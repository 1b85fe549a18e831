"""`edje-search query` start-up with the paper model before and after the stored fingerprint (issue 16).

    python benchmarks/fingerprint_startup.py --old-tree /tmp/old_wt --work /tmp/fpbench \
        [--repeats 5] [--open-repeats 3] [--out benchmarks/results/startup_fingerprint.json]

Before (``--old-tree``, a checkout of the older code, e.g. `git worktree add /tmp/old_wt 2dd638b`)
the model fingerprint hashed every weight file on every open; now it is computed once at save time
and read from edje.json. Model and index formats differ between the two, so each side builds its
own model directory and index with its own code: the `edje-siglip2-l16-384` recipe at full size
(SigLIP2 ViT-L/16-384 + MiniLM-L12-H384 shapes, 64 x 384 stored tokens) with random weights, the
bundled MiniLM tokenizer standing in for SigLIP2's hub tokenizer (its ids fit the 256k vocabulary),
and an index over 4 generated images. Then, interleaved old/new:

- whole-process ``python -m edje_search_cli query TEXT --index IDX -k 2 --rerank-k 2``;
- in a fresh process, the model open alone: ``load_model(dir)`` + ``fingerprint()``.

The script runs itself as a child process per side (``_build`` and ``_open``); which package a
child imported is recorded, so a side silently importing the other side's code shows up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUERY = "a red circle"
COLORS = [("red", (220, 30, 30)), ("blue", (30, 60, 220)), ("green", (30, 170, 60)), ("yellow", (230, 210, 40))]


# ------------------------------------------------------------------------- child: one side's code
def _build_model(out: Path) -> dict:
    """Save the paper recipe's shapes with random weights as a model directory (this side's code)."""
    import importlib.util

    import edje_search

    # paper_model.py beside this file, imported by path: it builds with whichever edje_search this side imports
    spec = importlib.util.spec_from_file_location("paper_model", Path(__file__).with_name("paper_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.paper_model("cpu")
    model.save_pretrained(out)
    del model
    params_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    return {"edje_search": edje_search.__file__, "weights_bytes": params_bytes,
            "edje_json": json.loads((out / "edje.json").read_text())}


def _write_images(out: Path) -> None:
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(COLORS):
        img = Image.new("RGB", (384, 384), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((80 + 10 * i, 80, 300, 300 - 10 * i), fill=rgb)
        img.save(out / f"{i}_{name}_circle.png")


def _open_model(model_dir: str) -> dict:
    """Seconds for load_model(dir) and fingerprint() in this process (this side's code)."""
    t0 = time.perf_counter()
    import edje_search
    from edje_search.models.registry import load_model
    t1 = time.perf_counter()
    model = load_model(model_dir)
    t2 = time.perf_counter()
    fp = model.fingerprint()
    t3 = time.perf_counter()
    return {"edje_search": edje_search.__file__, "import_s": t1 - t0, "load_model_s": t2 - t1,
            "fingerprint_s": t3 - t2, "open_s": t3 - t1, "fingerprint": fp}


# -------------------------------------------------------------------------------- orchestration
class Side:
    def __init__(self, name: str, tree: Path, work: Path, shim: Path | None):
        self.name, self.tree, self.dir = name, tree, work / name
        self.env = dict(os.environ)
        self.env.pop("PYTHONPATH", None)
        if shim is not None:  # the old tree's CLI package is cli/, installed as edje_search_cli
            self.env["PYTHONPATH"] = f"{tree}{os.pathsep}{shim}"
        self.model, self.index = self.dir / "model", self.dir / "index"

    def run(self, argv: list[str], capture: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, cwd=self.tree, env=self.env, text=True,
                              stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise SystemExit(f"[{self.name}] {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        return proc

    def child(self, *args: str) -> dict:
        return json.loads(self.run([sys.executable, str(Path(__file__).resolve()), *args]).stdout.splitlines()[-1])

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "edje_search_cli", *args]

    def query_argv(self) -> list[str]:
        return self.cli("query", QUERY, "--index", str(self.index), "-k", "2", "--rerank-k", "2")


def _timed(side: Side, argv: list[str]) -> float:
    t0 = time.perf_counter()
    side.run(argv, capture=False)
    return time.perf_counter() - t0


def _summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
            "runs_s": [round(v, 3) for v in values]}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_build":
        print(json.dumps(_build_model(Path(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "_open":
        print(json.dumps(_open_model(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-tree", type=Path, required=True, help="checkout of the code before the change")
    ap.add_argument("--old-label", default=None, help="what --old-tree is (default: its git HEAD)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (two ~3.5 GB model directories)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--open-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the model directories and indexes")
    ap.add_argument("--reuse", action="store_true", help="reuse model directories and indexes kept by --keep")
    args = ap.parse_args()

    new_tree = Path(__file__).resolve().parents[1]
    old_tree = args.old_tree.resolve()
    shim = args.work / "old_shim"
    shim.mkdir(parents=True, exist_ok=True)
    if not (shim / "edje_search_cli").exists():
        (shim / "edje_search_cli").symlink_to(old_tree / "cli")
    sides = [Side("old", old_tree, args.work, shim), Side("new", new_tree, args.work, None)]
    images = args.work / "images"
    _write_images(images)
    labels = {s.name: s.run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() for s in sides}
    if args.old_label:
        labels["old"] = args.old_label

    built = {}
    for s in sides:
        if args.reuse and (s.model / "edje.json").is_file() and (s.index / "index.json").is_file():
            built[s.name] = {"reused": str(s.dir), "edje_json": json.loads((s.model / "edje.json").read_text()),
                             "weights_bytes": sum(p.stat().st_size for p in s.model.rglob("*.safetensors"))}
            print(f"[{s.name}] reusing {s.dir}", file=sys.stderr)
            continue
        shutil.rmtree(s.dir, ignore_errors=True)
        t0 = time.perf_counter()
        built[s.name] = s.child("_build", str(s.model))
        built[s.name]["build_model_s"] = time.perf_counter() - t0
        if not built[s.name]["edje_search"].startswith(str(s.tree)):
            raise SystemExit(f"[{s.name}] imported {built[s.name]['edje_search']}, not the code in {s.tree}")
        s.run(s.cli("build-index", str(images), "--index", str(s.index), "--model", str(s.model), "--no-progress"))
        built[s.name]["index_files"] = sorted(p.name for p in s.index.iterdir())
        b = built[s.name]
        print(f"[{s.name}] built in {b['build_model_s']:.0f} s: {b['weights_bytes'] / 1e9:.2f} GB of weights; "
              f"edje.json {b['edje_json']}", file=sys.stderr)
        out = s.run(s.query_argv()).stdout  # also the warm-up: page cache holds the weights afterwards
        print(f"[{s.name}] {out.strip()}", file=sys.stderr)

    load = {"before": os.getloadavg()}
    query = {s.name: [] for s in sides}
    opens = {s.name: [] for s in sides}
    loads = []
    for i in range(max(args.repeats, args.open_repeats)):
        order = sides if i % 2 == 0 else sides[::-1]
        for s in order:
            if i < args.repeats:
                query[s.name].append(_timed(s, s.query_argv()))
                loads.append(os.getloadavg()[0])
            if i < args.open_repeats:
                opens[s.name].append(s.child("_open", str(s.model)))
        print(f"round {i + 1}: " + ", ".join(f"{n} {v[-1]:.1f} s" for n, v in query.items() if v)
              + f" (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    load["after"] = os.getloadavg()
    for s in sides:
        files = {o["edje_search"] for o in opens[s.name]}
        if any(not f.startswith(str(s.tree)) for f in files):
            raise SystemExit(f"[{s.name}] a timed open imported {files}, not the code in {s.tree}")

    result = {
        "what": "edje-search query start-up with the edje-siglip2-l16-384 recipe at full size, random weights: "
                "before (fingerprint = sha256 of every weight file on every open) vs now (fingerprint stored "
                "in edje.json at save time)",
        "commits": labels,
        "commands": {
            "query": "python -m edje_search_cli query " + json.dumps(QUERY) + " --index IDX -k 2 --rerank-k 2 "
                     "(fresh process, wall time; old side with PYTHONPATH=OLD_TREE:SHIM, SHIM/edje_search_cli -> "
                     "OLD_TREE/cli)",
            "open": "fresh process: t = perf_counter(); m = load_model(DIR); m.fingerprint()",
            "this": "python benchmarks/fingerprint_startup.py " + " ".join(sys.argv[1:]),
        },
        "models": built,
        "query": {n: _summary(v) for n, v in query.items()},
        "query_speedup_median": statistics.median(query["old"]) / statistics.median(query["new"]),
        "open": {n: {k: _summary([o[k] for o in v]) for k in ("load_model_s", "fingerprint_s", "open_s")}
                 | {"fingerprint": v[0]["fingerprint"]} for n, v in opens.items()},
        "open_speedup_median": (statistics.median(o["open_s"] for o in opens["old"])
                                / statistics.median(o["open_s"] for o in opens["new"])),
        "order": "interleaved: rounds alternate old-first and new-first; one untimed warm-up query per side first",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
                    "loadavg_before": load["before"], "loadavg_after": load["after"],
                    "loadavg_1min_during_runs": [round(x, 2) for x in loads]},
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    if not args.keep:
        for s in sides:
            shutil.rmtree(s.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
