"""Load test of `edje-search serve`: closed-loop asyncio clients against uvicorn on 127.0.0.1.

For batching on and off (same index, same run), 1, 4 and 16 concurrent clients each send
GET /search as fast as answers come back for a few seconds; then an overload level with more
clients than the queue holds checks that the excess is refused at once with 503 + Retry-After
instead of timing out. Requests go to loopback only; every loop is bounded in time and the
whole run stops itself within --budget seconds.

    python -m benchmarks.serve_load                 # writes benchmarks/results/serve.json
    python -m benchmarks.serve_load --docs          # and rewrites the serve block of docs/serving.md
    python -m benchmarks.serve_load --render-only   # only that block, from serve.json
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

from edje_search.serve.batching import BatchSettings

from .timing import machine

RESULTS = Path(__file__).parent / "results" / "serve.json"
DOC = Path(__file__).parent.parent / "docs" / "serving.md"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "gray"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def random_query(rng: random.Random) -> str:
    return (f"a {rng.choice(['small', 'large'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
            f"{rng.choice(['left of', 'right of', 'above', 'below'])} a {rng.choice(COLOURS)} {rng.choice(SHAPES)}")


def build_index(root: Path, n_images: int) -> Path:
    """A tiny-random model over generated 32 px scenes (speed does not depend on the weights)."""
    from edje_search import Engine, load_model
    from edje_search.data.synthetic import make_dataset
    from edje_search.models.registry import build_tiny_model

    build_tiny_model(seed=0).save_pretrained(root / "model")
    make_dataset(root / "data", n_train=0, n_val=0, n_test=n_images, image_size=32, seed=3, progress=False)
    engine = Engine.create(root / "idx", load_model(root / "model"))
    engine.sync(root / "data" / "test", num_workers=0, progress=False, batch_size=64)
    return root / "idx"


class Server:
    """`edje-search serve` in a child process on a free loopback port."""

    def __init__(self, index: Path, extra: list[str]):
        from edje_search.serve.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edje_search_cli", "serve", "--index", str(index), "--port", str(self.port),
             "--log-level", "warning", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection to a loopback server, on asyncio streams.

    Why not an httpx.AsyncClient: its connection pool is the bottleneck at these concurrencies.
    Against a trivial uvicorn app on this machine, 96 concurrent clients got about 115 requests/s
    through one httpx client and about 5,200 through these connections (1 client: 700 vs 3,500).
    """

    def __init__(self, host: str, port: int):
        from edje_search.serve.server import is_loopback

        if not is_loopback(host):
            raise ValueError("the load test sends requests to loopback addresses only")
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def get(self, target: str, timeout: float) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await asyncio.wait_for(self._get(target), timeout)
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            self.close()  # a fresh connection for the next request
            raise

    async def _get(self, target: str) -> tuple[int, dict, bytes]:
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_level(port: int, clients: int, seconds: float, warmup: float, k: int, rerank_k: int,
                    seed: int) -> dict:
    """``clients`` closed-loop clients for warmup + seconds; statistics over the measured part."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    counts = {"ok": 0, "busy_503": 0, "timeouts": 0, "other_errors": 0}
    retry_after: set[str] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = Connection("127.0.0.1", port)
        try:
            while loop.time() < stop_at:
                target = "/search?" + urlencode({"q": random_query(rng), "k": k, "rerank_k": rerank_k})
                t0 = loop.time()
                try:
                    status, headers, body = await conn.get(target, timeout=15.0)
                except asyncio.TimeoutError:
                    status = "timeout"
                except (OSError, asyncio.IncompleteReadError):
                    status = "transport"
                t1 = loop.time()
                if t0 < measure_from:
                    continue
                if status == 200:
                    counts["ok"] += 1
                    latencies.append(1000 * (t1 - t0))
                    batch_sizes.append(json.loads(body)["timings"]["batch_queries"])
                elif status == 503:
                    counts["busy_503"] += 1
                    retry_after.add(headers.get("retry-after", "missing"))
                    await asyncio.sleep(0.05)  # a polite client backs off a little
                elif status == "timeout":
                    counts["timeouts"] += 1
                else:
                    counts["other_errors"] += 1
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"clients": clients, "seconds": seconds, **counts, "retry_after": retry_after,
            "latencies": latencies, "batch_sizes": batch_sizes}


def merge_runs(runs: list[dict]) -> dict:
    """Pool the requests of repeated runs of one level: throughput over their summed time."""
    seconds = sum(r["seconds"] for r in runs)
    latencies = [x for r in runs for x in r["latencies"]]
    batch_sizes = [x for r in runs for x in r["batch_sizes"]]
    out = {"clients": runs[0]["clients"], "runs": len(runs), "seconds": seconds}
    for key in ("ok", "busy_503", "timeouts", "other_errors"):
        out[key] = sum(r[key] for r in runs)
    out["throughput_rps"] = round(out["ok"] / seconds, 1)
    out["retry_after"] = sorted(set().union(*(r["retry_after"] for r in runs)))
    if latencies:
        q = statistics.quantiles(latencies, n=20, method="inclusive")
        out.update(p50_ms=round(statistics.median(latencies), 1), p95_ms=round(q[18], 1),
                   mean_batch_queries=round(statistics.fmean(batch_sizes), 2))
    return out


def render(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores (load average "
        f"{res['machine'].get('load_average_1min_at_start', '?')} from other work when the run began), {res['date']}; "
        f"{res['index']['images']} images, tiny-random model, GET /search k={s['k']} rerank_k={s['rerank_k']}, "
        f"server torch threads 1, clients on the same machine; each level ran batching on, off, off, on "
        f"for {s['seconds_per_run']:g} s each (`python -m benchmarks.serve_load`, load phases "
        f"{res['wall_s']:.0f} s).",
        "",
        "| clients | batching | requests/s | p50 ms | p95 ms | queries per engine call | 503 | timeouts | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in range(len(res["modes"]["on"])):
        for mode in ("on", "off"):
            r = res["modes"][mode][level]
            lines.append(f"| {r['clients']} | {mode} | {r['throughput_rps']} | {r.get('p50_ms', '-')} | "
                         f"{r.get('p95_ms', '-')} | {r.get('mean_batch_queries', '-')} | {r['busy_503']} | "
                         f"{r['timeouts']} | {r['other_errors']} |")
    gains = ", ".join(f"{c} client{'' if c == '1' else 's'} {g:.2f}x" for c, g in res["batching_gain"].items())
    lines += ["", f"Throughput with micro-batching / without (same run): {gains}. The last level has more "
                  f"clients than the queue holds ({s['max_queue']} queued queries): the excess gets 503 with "
                  f"Retry-After at once."]
    return "\n".join(lines)


def write_doc(res: dict) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"<!-- serve:start -->\n{render(res)}\n<!-- serve:end -->"
    new, n = re.subn(r"<!-- serve:start -->.*?<!-- serve:end -->", lambda m: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{DOC} has no <!-- serve:start --> ... <!-- serve:end --> block")
    DOC.write_text(new, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--overload-clients", type=int, default=96)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per level, setting and repeat")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--max-wait-ms", type=float, default=None,
                    help="the batching server's --max-wait-ms (default: the server's own default)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank-k", type=int, default=20)
    ap.add_argument("--budget", type=float, default=60.0, help="the load phases stop after this many seconds")
    ap.add_argument("--docs", action="store_true", help="rewrite the serve block of docs/serving.md from the results")
    ap.add_argument("--render-only", action="store_true",
                    help="only rewrite the serve block of docs/serving.md from the existing results file")
    args = ap.parse_args()
    if args.render_only:
        write_doc(json.loads(RESULTS.read_text()))
        return

    levels = [int(x) for x in args.levels.split(",")] + [args.overload_clients]
    tmp = Path(tempfile.mkdtemp(prefix="edje-serve-load-"))
    servers: dict[str, Server] = {}
    try:
        index = build_index(tmp, args.images)
        wait = [] if args.max_wait_ms is None else ["--max-wait-ms", str(args.max_wait_ms)]
        # both servers up at once; each level runs on, off, off, on (ABBA), so drift in the
        # machine's load falls on both settings alike
        for mode, flags in (("on", wait), ("off", ["--no-batching"])):
            servers[mode] = Server(index, ["--max-queue", str(args.max_queue), *flags])
        for server in servers.values():
            server.wait_ready()
        began = time.monotonic()
        load_at_start = round(os.getloadavg()[0], 1)  # other work on the machine shares its cores
        modes: dict[str, list[dict]] = {"on": [], "off": []}
        for i, clients in enumerate(levels):
            runs: dict[str, list[dict]] = {"on": [], "off": []}
            for rep, mode in enumerate(("on", "off", "off", "on")):
                if time.monotonic() - began > args.budget:
                    raise SystemExit(f"stopped: the {args.budget:.0f} s budget ran out")
                runs[mode].append(asyncio.run(run_level(servers[mode].port, clients, args.seconds, args.warmup,
                                                        args.k, args.rerank_k, seed=10 * i + rep)))
            for mode in ("on", "off"):
                level = merge_runs(runs[mode])
                level["overload"] = clients == args.overload_clients
                modes[mode].append(level)
                print(f"batching {mode:>3} {clients:>3} clients: {level['throughput_rps']:7.1f} req/s "
                      f"p50 {level.get('p50_ms', '-')} p95 {level.get('p95_ms', '-')} ms, "
                      f"503: {level['busy_503']}, timeouts: {level['timeouts']}, errors: {level['other_errors']}",
                      flush=True)
        wall = time.monotonic() - began
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(), "load_average_1min_at_start": load_at_start},
        "command": "python -m benchmarks.serve_load " + " ".join(sys.argv[1:]),
        "index": {"images": args.images, "model": "tiny-random"},
        "settings": {"k": args.k, "rerank_k": args.rerank_k, "max_queue": args.max_queue,
                     "max_batch": BatchSettings().max_batch,
                     "max_wait_ms": BatchSettings().max_wait_ms if args.max_wait_ms is None else args.max_wait_ms,
                     "seconds_per_run": args.seconds, "runs_per_level_and_setting": 2, "warmup_s": args.warmup,
                     "levels": levels},
        "wall_s": round(wall, 1),
        "modes": modes,
        "batching_gain": {str(on["clients"]): round(on["throughput_rps"] / off["throughput_rps"], 2)
                          for on, off in zip(modes["on"], modes["off"]) if off["throughput_rps"] > 0},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if args.docs:
        write_doc(res)
        print(f"rewrote the serve block of {DOC}")


if __name__ == "__main__":
    main()
