"""The Ray build (edje_search/distributed) against the single-process build, on a real
two-node Ray cluster that this module starts on this machine and stops at the end.

Ray binds its nodes to the machine's own address even when told 127.0.0.1 (it replaces
loopback addresses for multi-node clusters), so all traffic stays on this machine.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edje_search import Engine, load_model
from edje_search.data.synthetic import make_dataset
from edje_search.distributed.sources import SHARD_SEPARATOR, iter_shard, resolve_source

N_IMAGES = 240
RAY_START_TIMEOUT = 120


# ------------------------------------------------------------------------------ the cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _descendants(roots: list[int]) -> set[int]:
    parents = _ppid_map()
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _embed_actor_restarts() -> int:
    """Restarts Ray recorded for this driver's embedding actors. ``ray._private.state.actors`` reads the GCS
    actor table directly; the public state API needs the dashboard, which the test cluster does not run."""
    import ray
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    return sum(a["NumRestarts"] for a in actors().values()
               if "EmbedWorker" in a["ActorClassName"] and a["JobID"] == job)


class LocalCluster:
    """A head and a worker node (`ray start --block`), each with 2 logical CPUs."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="edjeray", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = str(Path(sys.executable).parent / "ray")
        # a token of its own (Ray 2.5x+ enables token authentication); the driver uses it through the environment
        self.token = secrets.token_hex(32)
        self._saved_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # the driver has left: stop at once
        common = ["--block", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        log = open(Path(self.tmp) / "ray-start.log", "wb")
        self.head = subprocess.Popen([ray_bin, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                                      f"--temp-dir={self.tmp}", *common], env=env, stdout=log, stderr=log,
                                     start_new_session=True)
        self.procs = [self.head]
        try:
            self._join(ray_bin, env, common, log)
        except BaseException:
            self.stop()
            raise

    def _join(self, ray_bin, env, common, log) -> None:
        import ray

        deadline = time.monotonic() + RAY_START_TIMEOUT
        # connect only once the head says it runs: it writes the cluster's auth token on start
        while b"Ray runtime started" not in (Path(self.tmp) / "ray-start.log").read_bytes():
            if time.monotonic() > deadline or self.head.poll() is not None:
                raise TimeoutError("the Ray head node did not start")
            time.sleep(0.2)
        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        self.procs.append(subprocess.Popen([ray_bin, "start", f"--address={self.address}", *common], env=env,
                                           stdout=log, stderr=log, start_new_session=True))
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray worker node did not join")
            time.sleep(0.2)

    def embed_actor_pids(self) -> set[int]:
        return {pid for pid in _descendants([p.pid for p in self.procs]) if "EmbedWorker" in _cmdline(pid)}

    def stop(self) -> None:
        import ray

        ray.shutdown()
        for p in reversed(self.procs):  # SIGTERM makes `ray start --block` stop its node's processes
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------ the data
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray_images")
    make_dataset(d, n_train=0, n_val=0, n_test=N_IMAGES, image_size=32, seed=3, progress=False)
    return d / "test"


def _write_shards(images: list[Path], captions: dict[str, str], out: Path, per_shard: int) -> list[Path]:
    """img2dataset's layout: KEY.png + KEY.txt + KEY.json per sample, 9-digit keys."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(images), per_shard):
        shard = out / f"{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, img in enumerate(images[s:s + per_shard], start=s):
                key = f"{i:09d}"
                caption = captions.get(img.name, "")
                for name, data in ((f"{key}.png", img.read_bytes()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key, "url": f"file://{img.name}",
                                                               "caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


def _single_process(index_dir: Path, model_dir: Path, images: Path) -> Engine:
    engine = Engine.create(index_dir, load_model(model_dir))
    engine.sync(images, num_workers=0, progress=False)
    return engine


def _rows_by_path(engine: Engine) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    entries = list(engine.store.iter_entries())
    rows = [e.row for e in entries]
    vectors = engine.store.vectors(rows)
    tokens = engine.store.tokens.get(rows).astype(np.float32)
    return {e.path: (vectors[i], tokens[i]) for i, e in enumerate(entries)}


def _assert_same_rows(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_allclose(a[path][0], b[path][0], atol=1e-5)
        np.testing.assert_allclose(a[path][1], b[path][1], atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------ the tests
def test_ray_build_equals_single_process_and_survives_a_killed_actor(cluster, images, tiny_model_dir, tmp_path):
    from edje_search.distributed import ray_build_index

    reference = _rows_by_path(_single_process(tmp_path / "single", tiny_model_dir, images))
    assert len(reference) == N_IMAGES

    seen: set[int] = set()
    state = {"victim": None, "received_at_kill": 0, "received": 0}
    stop = threading.Event()

    def watch() -> None:  # every actor process that exists during the build
        while not stop.is_set():
            seen.update(cluster.embed_actor_pids())
            time.sleep(0.1)

    def on_batch(received: int) -> None:
        state["received"] = received
        if state["victim"] is None:
            pids = cluster.embed_actor_pids()
            assert pids, "no embedding actor process found"
            state["victim"] = min(pids)
            state["received_at_kill"] = received
            os.kill(state["victim"], signal.SIGKILL)  # kill -9 of one actor, mid-build

    engine = Engine.create(tmp_path / "ray", load_model(tiny_model_dir))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = ray_build_index(engine, images, actors=2, actor_cpus=0.5, batch_size=8, decode_batch=16,
                                 commit_every=40, progress=False, on_batch=on_batch)
    finally:
        stop.set()
        watcher.join()

    assert state["victim"] is not None
    assert state["received_at_kill"] < N_IMAGES <= state["received"]  # the kill came with work left to do
    assert seen - {state["victim"]}, "no other actor process ran"
    # Whether the replacement's process shows up before the surviving actor drains the queue is a race,
    # so the restart is read from the cluster's actor table (GCS), where Ray counts it when it begins.
    assert _embed_actor_restarts() >= 1, f"Ray did not restart the killed actor (actor pids seen: {seen})"
    assert report.added == N_IMAGES and not report.skipped
    assert engine.verify() == []
    _assert_same_rows(reference, _rows_by_path(engine))

    again = ray_build_index(engine, images, actors=2, actor_cpus=0.5, progress=False)  # nothing new
    assert (again.added, again.unchanged) == (0, N_IMAGES)


def test_cli_ray_build_of_webdataset_shards_keeps_captions(cluster, images, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from edje_search_cli.main import cli, register_commands

    register_commands()
    files = sorted(images.glob("*.png"))[:60]
    captions = {p.name: f"caption of {p.stem}" for p in files}
    shards = _write_shards(files, captions, tmp_path / "shards", per_shard=25)
    result = CliRunner().invoke(cli, ["build-index", str(tmp_path / "shards"), "--index", str(tmp_path / "idx"),
                                      "--model", str(tiny_model_dir), "--ray", cluster.address, "--actors", "2",
                                      "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == len(files) == report["images"] and not report["skipped"]
    engine = Engine.from_pretrained(tmp_path / "idx")
    assert engine.verify() == []
    entries = {e.path: e for e in engine.store.iter_entries()}
    first = f"{shards[0]}{SHARD_SEPARATOR}000000000.png"
    assert first in entries
    assert entries[first].meta["caption"] == captions[files[0].name]
    assert entries[first].meta["key"] == "000000000"
    # the rows equal the single-process embedding of the same image bytes
    reference = _rows_by_path(_single_process(tmp_path / "single", tiny_model_dir, files[0]))
    got = _rows_by_path(engine)[first]
    np.testing.assert_allclose(got[0], reference[str(files[0])][0], atol=1e-5)


# ------------------------------------------------------------------------ sources, no Ray
def test_sources_tell_folders_lists_and_shards_apart(images, tmp_path):
    folder = resolve_source(images)
    assert folder.kind == "files" and len(folder.paths) == N_IMAGES
    listed = tmp_path / "list.txt"
    listed.write_text("# two files\n" + "\n".join(os.path.relpath(p, tmp_path) for p in folder.paths[:2]) + "\n\n")
    assert resolve_source(listed).paths == folder.paths[:2]
    files = [Path(p) for p in folder.paths[:3]]
    shards = _write_shards(files, {files[0].name: "a red square"}, tmp_path / "shards", per_shard=2)
    assert resolve_source(tmp_path / "shards").paths == tuple(str(s) for s in shards)
    assert resolve_source(shards[0]).kind == "shards"
    samples = list(iter_shard(str(shards[0])))
    assert [s.path.rsplit(SHARD_SEPARATOR, 1)[1] for s in samples] == ["000000000.png", "000000001.png"]
    assert samples[0].data == files[0].read_bytes()
    assert samples[0].meta["caption"] == "a red square" and samples[1].meta["caption"] == ""
    # a sample without an image and a member over the size limit are reported, not dropped
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name, data in (("k1.txt", b"no image"), ("k2.jpg", b"x" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    odd = list(iter_shard(str(tmp_path / "odd.tar"), max_member_bytes=50))
    assert [s.error for s in odd] == ["sample has no image member", "file too large (100 bytes)"]


def test_decode_and_embed_workers_in_one_process(images, tiny_model_dir, tmp_path):
    """The functions Ray runs, called directly: failures travel as reasons with zero rows, and an
    actor refuses a model whose fingerprint is not the index's."""
    from edje_search.distributed.workers import DecodeSpec, EmbedWorker, decode_files
    from edje_search.errors import ModelMismatch
    from edje_search.pipeline import embed_files

    model = load_model(tiny_model_dir)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = [str(p) for p in sorted(images.glob("*.png"))[:3]] + [str(bad)]
    decoded = decode_files({"path": np.array(paths, dtype=object)}, DecodeSpec.for_model(model))
    assert [bool(e) for e in decoded["error"]] == [False, False, False, True]
    worker = EmbedWorker(str(tiny_model_dir), model.fingerprint(), device="cpu", precision="fp32")
    out = worker(decoded)
    reference = next(iter(embed_files(model, paths[:3], num_workers=0, progress=False)))
    np.testing.assert_allclose(out["vector"][:3], reference.vectors, atol=1e-6)
    np.testing.assert_allclose(out["tokens"][:3].astype(np.float32), reference.tokens.astype(np.float32), atol=1e-3)
    assert not out["vector"][3].any() and out["tokens"].dtype == np.float16
    assert list(out["sha256"][:3]) == reference.hashes
    with pytest.raises(ModelMismatch):
        EmbedWorker(str(tiny_model_dir), "0" * 16, device="cpu")
