"""`edje-search serve` attacked the way a hostile client would, one test per finding of the
security review: (1) a tiny upload that decodes to gigabytes, (2) a swapped parent folder,
(3) the token in the access log, (4) slow bodies holding every request slot, (5) a foreign
Host header (DNS rebinding), (6) numbers past every type limit, (8) control characters in a
query. (7), destructive empty arguments, is in test_destructive_args.py.

Findings 1, 3, 4 and 5 run against a real `edje-search serve` process (its memory, its
access log and its sockets are what is measured); the others use the ASGI app in-process.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'edje-search[serve]')")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from edje_search import Engine, load_model  # noqa: E402
from edje_search.errors import BadQuery  # noqa: E402
from edje_search.serve import ServeLimits, create_app  # noqa: E402
from edje_search.serve.hardening import RedactSecrets, default_allowed_hosts  # noqa: E402
from edje_search.serve.server import free_port  # noqa: E402

TOKEN = "S3cr3t-t0ken-value-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_TIMEOUT = 2.0
HEADER_TIMEOUT = 3.0
PER_CLIENT = 60
QUERY = "a small red circle"


def strip_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, format="PNG", optimize=True)
    return out.getvalue()


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.fixture(scope="module")
def live(_built_index, tmp_path_factory):
    """`edje-search serve` on a loopback port with a token and small limits; (url, process, log file)."""
    index = tmp_path_factory.mktemp("attacks") / "idx"
    shutil.copytree(_built_index, index)
    log = index.parent / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "edje_search_cli.main", "serve", "--index", str(index), "--port", str(port),
           "--max-queue", "16", "--max-batch", "4", "--body-timeout", str(BODY_TIMEOUT), "--device", "cpu",
           "--header-timeout", str(HEADER_TIMEOUT), "--max-connections-per-client", str(PER_CLIENT)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "EDJE_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", headers=AUTH, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start: " + log.read_text()
            time.sleep(0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def engine(_built_index, tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks_inproc") / "idx"
    shutil.copytree(_built_index, d)
    return Engine.from_pretrained(d)


# ---------------------------------------------------------------- 1: decompression by aspect ratio
def test_1_a_one_pixel_strip_upload_gets_400_and_the_server_memory_stays_bounded(live):
    url, proc, _ = live
    strips = [strip_png(500_000, 1), strip_png(1, 500_000), strip_png(1_000_000, 1)]
    assert max(len(s) for s in strips) < 4096  # a few hundred bytes each
    # warm the upload path once (first-call imports and allocations are not what is measured)
    ok = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(ok, format="PNG")
    assert httpx.post(f"{url}/search/image", headers=AUTH, files={"file": ("ok.png", ok.getvalue())},
                      data={"k": 1}, timeout=60).status_code == 200
    rss_before = proc_kib(proc.pid, "VmRSS")
    try:  # reset the peak to the current RSS, so VmHWM afterwards is the peak during the attack
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        baseline = rss_before
    except OSError:
        baseline = proc_kib(proc.pid, "VmHWM")  # the peak so far: a spike above it still shows

    def upload(data: bytes) -> httpx.Response:
        return httpx.post(f"{url}/search/image", headers=AUTH, files={"file": ("strip.png", data, "image/png")},
                          data={"k": 3}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # one at a time would not add up; six at once
        responses = list(pool.map(upload, strips * 2))
    for r in responses:
        assert r.status_code == 400, r.text[:300]
        assert "aspect ratio" in r.json()["error"]
    growth_mb = (proc_kib(proc.pid, "VmHWM") - baseline) / 1024
    print(f"server peak RSS growth during 12 strip uploads (6 at once): {growth_mb:.1f} MB")
    assert growth_mb < 200, f"server peak memory grew by {growth_mb:.0f} MB"


# ----------------------------------------------------------------------- 2: swapped parent folder
def test_2_a_parent_folder_swapped_for_a_symlink_is_not_served(tmp_path, tiny_model_dir):
    photos, other = tmp_path / "S", tmp_path / "other"
    (photos / "sub").mkdir(parents=True)
    other.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(photos / "sub" / "inner.png")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(photos / "top.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(other / "inner.png")  # the private file of the same name
    engine = Engine.create(tmp_path / "idx", load_model(tiny_model_dir))
    engine.sync(photos, num_workers=0, progress=False)
    rows = {Path(e.path).name: e.row for e in engine.store.entries}
    with TestClient(create_app(engine)) as c:
        for name in ("inner.png", "top.png"):
            assert c.get(f"/images/{rows[name]}").status_code == 200
        assert c.get(f"/thumbnails/{rows['inner.png']}").status_code == 200
        shutil.rmtree(photos / "sub")
        os.symlink(other, photos / "sub")  # S/sub/inner.png now resolves to other/inner.png
        for kind in ("images", "thumbnails"):
            r = c.get(f"/{kind}/{rows['inner.png']}")
            assert r.status_code == 403, (kind, r.status_code)
            assert "outside the folder it was indexed in" in r.json()["error"]
        assert c.get(f"/images/{rows['top.png']}").status_code == 200  # the rest is still served
        # the whole collection folder swapped too: the recorded location of S no longer matches
        decoy = tmp_path / "decoy"
        decoy.mkdir()
        shutil.copy(photos / "top.png", decoy / "top.png")
        os.rename(photos, tmp_path / "S-moved")
        os.symlink(decoy, photos)
        assert c.get(f"/images/{rows['top.png']}").status_code == 403


# --------------------------------------------------------------------------- 3: token in the log
def test_3_the_token_never_reaches_the_access_log(live):
    url, _, log = live
    before = log.stat().st_size
    httpx.get(f"{url}/?token={TOKEN}")
    httpx.get(f"{url}/search?q=x&TOKEN={TOKEN}&k=1")
    httpx.get(f"{url}/health?access_token={TOKEN}", headers=AUTH)
    httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {TOKEN}x"})
    httpx.get(f"{url}/no/such/{TOKEN}", headers=AUTH)
    login = httpx.post(f"{url}/login", data={"token": TOKEN})  # the browser login: token in the body only
    assert login.status_code == 303 and "edje_session" in login.headers["set-cookie"]
    assert httpx.get(f"{url}/", cookies=login.cookies).status_code == 200
    time.sleep(0.5)  # the access log is written after each response
    written = log.read_bytes()[before:].decode("utf-8", "replace")
    assert "GET /?token=[redacted]" in written and "/health?access_token=[redacted]" in written  # logged...
    assert "POST /login" in written
    assert TOKEN not in written and TOKEN[:12] not in written  # ...without the secret


def test_3_the_redaction_filter_blanks_headers_params_and_the_token():
    f = RedactSecrets(("hunter2-token",))
    assert f.redact('GET /a?q=1&token=abc&k=2 Authorization: Bearer xyz') == \
        "GET /a?q=1&token=[redacted]&k=2 Authorization: Bearer [redacted]"
    assert f.redact("path /x/hunter2-token/y") == "path /x/[redacted]/y"
    assert f.redact("/s?api_key=1&Access_Token=2") == "/s?api_key=[redacted]&Access_Token=[redacted]"


# ------------------------------------------------------------------------------ 4: slow bodies
def test_4_fifty_slow_bodies_are_cut_off_and_searches_are_served_again(live):
    url, _, _ = live
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /search HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n").encode()
    stop = threading.Event()
    answers: list[bytes] = []
    lock = threading.Lock()

    def slow_client():
        s = socket.create_connection((host, int(port)))
        s.settimeout(0.05)
        got = b""
        try:
            s.sendall(head)
            while not stop.is_set():  # one byte a second, as long as the server keeps listening
                s.sendall(b" ")
                try:
                    chunk = s.recv(4096)
                except socket.timeout:
                    time.sleep(0.95)
                    continue
                got += chunk
                if not chunk:
                    break  # closed by the server
        except OSError:
            pass  # reset by the server: cut off too
        finally:
            s.close()
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=slow_client, daemon=True) for _ in range(50)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)
    statuses = []
    served_at = None
    while time.monotonic() - start < 20:
        r = httpx.get(f"{url}/search", params={"q": QUERY, "k": 2}, headers=AUTH, timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 200:
            served_at = time.monotonic() - start
            break
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=5)
    stop.set()
    assert 503 in statuses, statuses  # the attack did fill every request slot at first
    assert served_at is not None and served_at < BODY_TIMEOUT + 3, (served_at, statuses)
    assert len(answers) == 50  # every slow connection was closed by the server, none left hanging
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 1
    assert all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) for a in answers), answers[:3]


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), or None if it stayed open that long."""
    start = time.monotonic()
    s.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_4_slow_headers_are_cut_off_and_one_client_cannot_take_every_connection(live):
    url, _, _ = live
    host, port = url.removeprefix("http://").split(":")
    # a request head trickling in a byte every half second is closed after the header timeout
    slow = socket.create_connection((host, int(port)))
    start = time.monotonic()
    closed_at = None
    for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40:
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            closed_at = time.monotonic() - start
            break
        if closed_within(slow, 0.5) is not None:
            closed_at = time.monotonic() - start
            break
    slow.close()
    assert closed_at is not None and HEADER_TIMEOUT - 0.5 < closed_at < HEADER_TIMEOUT + 2, closed_at
    # a body the server answered without reading (401: no token) cannot keep trickling in either
    unread = socket.create_connection((host, int(port)))
    unread.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4096\r\n\r\n")
    start, closed_at, answer = time.monotonic(), None, b""
    unread.settimeout(0.5)
    while time.monotonic() - start < HEADER_TIMEOUT + 5:
        try:
            unread.sendall(b" ")
            chunk = unread.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            closed_at = time.monotonic() - start
            break
        answer += chunk
        if not chunk:
            closed_at = time.monotonic() - start
            break
    unread.close()
    assert answer.startswith(b"HTTP/1.1 401") and closed_at is not None and closed_at < HEADER_TIMEOUT + 2
    # one address opening connection after connection: past the cap they are closed at once
    held = [socket.create_connection((host, int(port))) for _ in range(PER_CLIENT)]
    try:
        extra = socket.create_connection((host, int(port)))
        assert closed_within(extra, 1.0) is not None
        extra.close()
        # the idle ones are closed by the header timeout, and the server answers again
        assert all(closed_within(s, HEADER_TIMEOUT + 2) is not None for s in held)
        assert httpx.get(f"{url}/health", headers=AUTH, timeout=5).status_code == 200
    finally:
        for s in held:
            s.close()


# ----------------------------------------------------------------------------- 5: DNS rebinding
def test_5_a_foreign_host_header_gets_400(live):
    url, _, _ = live
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example"):
        r = httpx.get(f"{url}/health", headers={**AUTH, "Host": host})
        assert r.status_code == 400, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{url}/health", headers={**AUTH, "Host": host}).status_code == 200, host
    assert default_allowed_hosts("0.0.0.0") is None and "[::1]" in default_allowed_hosts("::1")


def test_5_allowed_hosts_names_the_public_ones_and_bad_lists_exit_2(engine, tmp_path):
    app = create_app(engine, allowed_hosts=["search.example.org"])
    with TestClient(app, base_url="http://search.example.org") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "localhost"}).status_code == 400
    from click.testing import CliRunner

    from edje_search_cli.main import cli

    for bad in (" , ", "a*b", "*example.org"):
        result = CliRunner().invoke(cli, ["serve", "--index", str(tmp_path), "--allowed-hosts", bad])
        assert result.exit_code == 2 and result.output.startswith("error: Invalid value for --allowed-hosts")


# ------------------------------------------------------------------- 6: numbers at type limits
HUGE = [10**20, 2**63, 2**64, -(2**63) - 1, -1]


@pytest.mark.parametrize("value", HUGE + ["1e309", "nan", "9" * 400])
def test_6_every_numeric_parameter_at_type_limits_gets_4xx_never_500(engine, value):
    with TestClient(create_app(engine, limits=ServeLimits()), raise_server_exceptions=False) as c:
        v = str(value)
        responses = {
            "image row": c.post("/search/image", data={"row": v, "k": 3}),
            "image k": c.post("/search/image", data={"row": 0, "k": v}),
            "search k": c.get("/search", params={"q": QUERY, "k": v}),
            "search rerank_k": c.get("/search", params={"q": QUERY, "rerank_k": v}),
            "images row": c.get(f"/images/{v}"),
            "thumbnails row": c.get(f"/thumbnails/{v}"),
        }
        if isinstance(value, int):
            responses["batch k"] = c.post("/search", json={"queries": [QUERY], "k": value})
            responses["batch rerank_k"] = c.post("/search", json={"queries": [QUERY], "rerank_k": value})
    for where, r in responses.items():
        assert r.status_code in (400, 404, 422), (where, r.status_code, r.text[:200])
        assert r.json()["status"] == r.status_code and "Traceback" not in r.text


def test_6_a_huge_row_is_404_or_422_not_an_overflow(engine):
    with TestClient(create_app(engine), raise_server_exceptions=False) as c:
        assert c.post("/search/image", data={"row": str(10**20)}).status_code == 422
        assert c.post("/search/image", data={"row": str(2**63)}).status_code == 422
        assert c.post("/search/image", data={"row": str(2**63 - 1)}).status_code == 404  # a row, just not indexed
        assert c.get(f"/images/{2**63 - 1}").status_code == 404


# ------------------------------------------------------------------------ 8: control characters
@pytest.mark.parametrize("text", ["\x00", "cat\x00dog", "red\x1b[31m circle", "a\x07b", "x\x85y"])
def test_8_control_characters_are_refused_by_the_library_cli_and_http(engine, text):
    with pytest.raises(BadQuery, match="control character|NUL"):
        engine.search(text)
    with TestClient(create_app(engine)) as c:
        r = c.get("/search", params={"q": text})
        assert r.status_code == 400 and ("NUL" in r.json()["error"] or "control" in r.json()["error"])
        assert c.post("/search", json={"queries": ["fine", text]}).status_code == 400
    from click.testing import CliRunner

    from edje_search_cli.main import cli

    result = CliRunner().invoke(cli, ["query", text, "--index", str(engine.store.directory)])
    assert result.exit_code == 2 and result.output.startswith("error: query contains")
    # ordinary text with a line break or a tab is a query like any other
    assert engine.search("red\tcircle\nblue square", k=2)
