"""``deepmetric serve`` for real: the server runs in a subprocess on a free loopback port (as a
user starts it) and the tests talk HTTP to it with httpx. Every endpoint against the command
line's ``--json`` answers on the same gallery file, every kind of bad input (4xx JSON, and the
server still answers afterwards), the API key rules, an enroll by the command line seen by the
running server, concurrent identify requests while enrolling, and the micro-batcher."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import train_tiny_run, write_learnable_idx

from deepmetric.data import load_dataset
from deepmetric.gallery import Gallery, GalleryStore
from deepmetric.inference import Embedder
from deepmetric.service.workers import MicroBatcher

CLASSES = 6
KEY = "k3y-0123456789abcdef"
KEY_ENV = "DEEPMETRIC_TEST_API_KEY"
STARTUP_S = 60


# ------------------------------------------------------------------------------ helpers


def make_run(root: Path) -> tuple[Path, dict[int, list[Path]]]:
    """A tiny trained run and its test images as PNG files, one list per class (made once
    per test session under ``root`` and reused: ``test_page`` serves the same run)."""
    run = root / "run"
    files: dict[int, list[Path]] = {c: [] for c in range(CLASSES)}
    if not (run / "done").is_file():
        data = write_learnable_idx(root / "toy", n_classes=CLASSES, n_train=30, n_test=8)
        train_tiny_run(data, run, "mode=batch", "epochs=2", "train.val_fraction=0.25")
        test = load_dataset(f"idx:{data}", "test")
        for i in range(len(test)):
            folder = root / "pngs" / f"class_{int(test.y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (test.x[i, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        Embedder.from_run(run, device="cpu", progress=lambda _: None)  # + its threshold
        (run / "done").write_text("")
    for c in range(CLASSES):
        files[c] = sorted((root / "pngs" / f"class_{c}").glob("*.png"))
    return run, files


def shared_run(factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[Path]]]:
    """:func:`make_run` in the session's base temp folder."""
    root = factory.getbasetemp() / "service_run"
    root.mkdir(exist_ok=True)
    return make_run(root)


def new_gallery(run: Path, path: Path) -> Path:
    """An empty gallery for ``run`` at ``path``."""
    Gallery.create(path, Embedder.from_run(run, device="cpu", calibrate=False), source=run).close()
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m deepmetric ARGS`` in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


class Server:
    """``deepmetric serve`` in a subprocess on a free loopback port, up once /health answers;
    on the CPU (``--device cpu``), as the tests' own embeddings (tests/test_cuda.py serves on
    CUDA).

    ``stop()`` sends SIGINT (Ctrl-C) and returns the exit code and everything it printed.
    """

    def __init__(self, run: Path, gallery: Path, *extra: str, key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if key is not None:
            env[KEY_ENV] = key
            extra = (*extra, "--api-key-env", KEY_ENV)
        argv = [sys.executable, "-m", "deepmetric", "serve", str(run), "--gallery", str(gallery)]
        argv += ["--device", "cpu"]
        self.log = gallery.with_name(gallery.name + f".{self.port}.log")
        self._log = open(self.log, "w")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited at start: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"no /health within {STARTUP_S} s: {self.output()}")
            time.sleep(0.2)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text()

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode, self.log.read_text()


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def bomb_png() -> bytes:
    """A valid-looking PNG that declares 20,000 x 20,000 pixels (400 million) in its header."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = 8  # after the signature: length (4), "IHDR" (4), width (4), height (4), ...
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", 20_000, 20_000)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def files_field(*paths: Path, name: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(name, (p.name, png_bytes(p), "image/png")) for p in paths]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tiny run, a new gallery, and a server on it (key needed for writes, uploads up to
    1 MiB)."""
    root = tmp_path_factory.mktemp("service")
    run, files = shared_run(tmp_path_factory)
    gallery = new_gallery(run, root / "g.db")
    server = Server(run, gallery, "--max-upload-mb", "1", key=KEY)
    yield {"root": root, "run": run, "files": files, "gallery": gallery, "server": server}
    code, output = server.stop()
    assert code == 0, output
    assert "Traceback" not in output, output


@pytest.fixture()
def http(env: dict) -> httpx.Client:
    return env["server"].client


WRITE = {"X-API-Key": KEY}


def enroll(http: httpx.Client, name: str, *paths: Path) -> httpx.Response:
    return http.post(
        "/identities", data={"identity": name}, files=files_field(*paths), headers=WRITE
    )


def assert_alive(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# ------------------------------------------------------------------------------ endpoints


def test_health_page_and_docs(env: dict, http: httpx.Client) -> None:
    health = http.get("/health").json()
    embedder = Embedder.from_run(env["run"], device="cpu", calibrate=False)
    assert health["status"] == "ok"
    assert health["model"] == embedder.identity()
    assert health["auth"] == {"writes": True, "reads": False}
    with Gallery.open(env["gallery"], embedder) as gallery:
        assert health["threshold"] == pytest.approx(gallery.threshold.value)
        assert health["identities"] == len(gallery)
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("/", "/static/app.js", "/static/style.css"):
        text = http.get(asset).text
        assert "http://" not in text and "https://" not in text, asset  # nothing from outside
        assert "//cdn" not in text and "@import" not in text, asset
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/health", "/embed", "/verify", "/identify", "/identities"):
        assert path in paths


def test_endpoints_answer_as_the_command_line(env: dict, http: httpx.Client) -> None:
    files, gallery = env["files"], str(env["gallery"])
    for c in (0, 1, 2):
        r = enroll(http, f"class {c}", *files[c][:2])
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["identity"] == f"class {c}" and len(body["examples"]) == 2
        assert body["files"] == [p.name for p in files[c][:2]]
    queries = [files[0][3], files[1][3], files[4][3]]
    r = http.post("/identify", files=files_field(*queries), data={"k": "2"})
    assert r.status_code == 200, r.text
    served = r.json()
    done = cli(
        "gallery", "identify", gallery, *map(str, queries), "--k", "2", "--json", "--device", "cpu"
    )
    by_cli = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(served) == len(by_cli) == 3
    for s, c, q in zip(served, by_cli, queries):
        assert s["input"] == q.name
        assert s["identity"] == c["identity"], (s, c)
        assert s["threshold"] == pytest.approx(c["threshold"])
        assert s["distance"] == pytest.approx(c["distance"], abs=1e-5)
        assert [x["identity"] for x in s["candidates"]] == [x["identity"] for x in c["candidates"]]
        assert [x["distance"] for x in s["candidates"]] == pytest.approx(
            [x["distance"] for x in c["candidates"]], abs=1e-5
        )
    assert served[0]["candidates"][0]["identity"] == "class 0"  # a trained model
    assert served[1]["candidates"][0]["identity"] == "class 1"

    # verify: the record of `deepmetric verify --json`, by the run's Embedder (the run's
    # threshold is the gallery's here); a pair of one class and a pair of two
    embedder = Embedder.from_run(env["run"], device="cpu")
    for a, b in ((files[0][4], files[0][5]), (files[0][4], files[3][5])):
        r = http.post("/verify", files=[*files_field(a, name="a"), *files_field(b, name="b")])
        assert r.status_code == 200, r.text
        got = r.json()
        want = embedder.verify(a, b)[0]
        assert set(got) == {"a", "b", "distance", "threshold", "same", "metric"}
        assert (got["a"], got["b"], got["metric"]) == (a.name, b.name, embedder.metric)
        assert got["distance"] == pytest.approx(want.distance, abs=1e-5)
        assert got["threshold"] == pytest.approx(want.threshold)
        assert got["same"] == want.same

    # embed: the Embedder's embeddings of the same files
    r = http.post("/embed", files=files_field(a, b))
    assert r.status_code == 200, r.text
    got = r.json()
    want = embedder.embed([a, b])
    assert got["inputs"] == [a.name, b.name] and got["shape"] == list(want.shape)
    np.testing.assert_allclose(np.array(got["embeddings"]), want.numpy(), atol=1e-5)
    assert got["model"] == embedder.identity()

    # list: the CLI's records; thumbnail: a PNG of at most 64 px
    listed = http.get("/identities").json()
    by_cli = [json.loads(x) for x in cli("gallery", "list", gallery, "--json").stdout.splitlines()]
    assert listed == by_cli
    r = http.get("/identities/class 0/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as image:
        assert image.format == "PNG" and max(image.size) <= 64

    # remove: gone from the list, the search, the thumbnails; a second remove is a 404
    r = http.delete("/identities/class 2", headers=WRITE)
    assert r.status_code == 200 and r.json()["identity"] == "class 2"
    assert len(r.json()["examples"]) == 2 and r.json()["identities"] == 2
    assert "class 2" not in [x["identity"] for x in http.get("/identities").json()]
    r = http.post("/identify", files=files_field(files[2][3]), data={"k": "5"})
    assert "class 2" not in [x["identity"] for x in r.json()[0]["candidates"]]
    for response in (
        http.delete("/identities/class 2", headers=WRITE),
        http.get("/identities/class 2/thumbnail"),
    ):
        assert response.status_code == 404
        assert "class 2" in response.json()["error"]


def test_unknown_answer_for_a_stranger(env: dict, http: httpx.Client, tmp_path: Path) -> None:
    noise = tmp_path / "noise.png"
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(noise)
    r = http.post("/identify", files=files_field(noise), data={"k": "1"})
    answer = r.json()[0]
    assert r.status_code == 200 and len(answer["candidates"]) <= 1
    if answer["candidates"]:
        nearest = answer["candidates"][0]
        want = nearest["identity"] if nearest["distance"] <= answer["threshold"] else None
        assert answer["identity"] == want


# ------------------------------------------------------------------------------ bad input


def _bad_requests(env: dict, tmp_path: Path) -> list[tuple[str, dict, int, str]]:
    """(what, httpx.request kwargs, expected status, a word the error must contain)."""
    good = png_bytes(env["files"][0][0])
    truncated = good[: len(good) // 2]
    big = os.urandom(1_200_000)  # over the server's 1 MiB

    def chunked() -> Iterator[bytes]:  # a body without Content-Length
        boundary = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
        yield boundary + b"Content-Type: image/png\r\n\r\n"
        for _ in range(12):
            yield b"\0" * 100_000
        yield b"\r\n--b--\r\n"

    upload = "POST", "/identify"
    return [
        (
            "not an image",
            {"files": {"files": ("a.png", b"hello, not a png", "image/png")}},
            422,
            "not an image",
        ),
        ("truncated", {"files": {"files": ("t.png", truncated, "image/png")}}, 422, "t.png"),
        ("empty file", {"files": {"files": ("e.png", b"", "image/png")}}, 422, "empty"),
        (
            "decompression bomb",
            {"files": {"files": ("bomb.png", bomb_png(), "image/png")}},
            422,
            "decompression bomb",
        ),
        ("over the size limit", {"files": {"files": ("big.png", big, "image/png")}}, 413, "MiB"),
        (
            "over the limit, chunked",
            {"content": chunked(), "headers": {"content-type": "multipart/form-data; boundary=b"}},
            413,
            "MiB",
        ),
        ("JSON body", {"json": {"files": ["/etc/passwd"]}}, 415, "multipart/form-data"),
        ("no content type", {"content": b"files=/etc/passwd"}, 415, "multipart/form-data"),
        (
            "malformed multipart",
            {
                "content": b"garbage",
                "headers": {"content-type": "multipart/form-data; boundary=zz"},
            },
            400,
            "",
        ),
        ("missing field", {"files": {"other": ("a.png", good, "image/png")}}, 422, "files"),
        ("k = 0", {"files": {"files": ("a.png", good, "image/png")}, "data": {"k": "0"}}, 422, "k"),
        (
            "k not a number",
            {"files": {"files": ("a.png", good, "image/png")}, "data": {"k": "five"}},
            422,
            "k",
        ),
    ], upload


@pytest.mark.parametrize("case", range(12))
def test_bad_input_is_a_4xx_json_error(case: int, env: dict, http: httpx.Client, tmp_path) -> None:
    cases, (method, path) = _bad_requests(env, tmp_path)
    what, kwargs, status, word = cases[case]
    r = http.request(method, path, **kwargs)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), what
    error = r.json()["error"]
    assert isinstance(error, str) and error and word in error, (what, error)
    assert_alive(http)


def test_bad_verify_and_enroll_requests(env: dict, http: httpx.Client) -> None:
    good = env["files"][0][0]
    r = http.post("/verify", files=files_field(good, name="a"))
    assert r.status_code == 422 and "b" in r.json()["error"]
    r = http.post(
        "/verify",
        files=[*files_field(good, name="a"), ("b", ("b.txt", b"text", "text/plain"))],
    )
    assert r.status_code == 422 and "b.txt" in r.json()["error"]
    for name in ("", " padded", "new\nline", "x" * 300):
        r = http.post(
            "/identities", data={"identity": name}, files=files_field(good), headers=WRITE
        )
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"]
    r = http.post("/identities", files=files_field(good), headers=WRITE)
    assert r.status_code == 422 and "identity" in r.json()["error"]
    r = http.post(
        "/identities",
        data={"identity": "nobody"},
        files={"files": ("x.png", b"not an image", "image/png")},
        headers=WRITE,
    )
    assert r.status_code == 422 and "x.png" in r.json()["error"]
    assert "nobody" not in [x["identity"] for x in http.get("/identities").json()]
    assert http.get("/no/such/page").status_code == 404
    assert http.get("/no/such/page").json() == {"error": "Not Found"}
    assert_alive(http)


def test_names_with_path_and_sql_metacharacters_are_data(env: dict, http: httpx.Client) -> None:
    root = env["root"]
    before = sorted(p.name for p in root.iterdir())
    names = [
        "../../etc/passwd",
        "a/b",
        "'; DROP TABLE identities; --",
        '" OR 1=1 --',
        "<script>alert(1)</script>",
        "Zoë 😀 %2F ?x=1#frag",
        "C:\\Windows\\system32",
    ]
    image = env["files"][3][0]
    for name in names:
        r = enroll(http, name, image)
        assert r.status_code == 201, (name, r.text)
        assert r.json()["identity"] == name
    listed = {x["identity"] for x in http.get("/identities").json()}
    assert set(names) <= listed
    for name in names:
        path = "/identities/" + "".join(
            c if c.isalnum() else "".join(f"%{b:02X}" for b in c.encode()) for c in name
        )
        r = http.get(path + "/thumbnail")
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), name
        r = http.delete(path, headers=WRITE)
        assert r.status_code == 200 and r.json()["identity"] == name, name
    assert not set(names) & {x["identity"] for x in http.get("/identities").json()}
    assert sorted(p.name for p in root.iterdir()) == before  # no file made from a name
    assert_alive(http)


# ------------------------------------------------------------------------------ API key


def test_writes_need_the_key(env: dict, http: httpx.Client) -> None:
    image = env["files"][5][0]
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}, {"X-API-Key": ""}):
        r = http.post(
            "/identities", data={"identity": "intruder"}, files=files_field(image), headers=headers
        )
        assert r.status_code == 401, (headers, r.text)
        assert "API key" in r.json()["error"]
        r = http.delete("/identities/class 0", headers=headers)
        assert r.status_code == 401
    assert "intruder" not in [x["identity"] for x in http.get("/identities").json()]
    assert http.post("/identify", files=files_field(image)).status_code == 200  # reads open
    assert http.get("/identities").status_code == 200


def test_protect_reads(env: dict, tmp_path: Path) -> None:
    shared = env["server"].client  # "class 0" is needed below, whichever tests ran before
    if "class 0" not in [x["identity"] for x in shared.get("/identities").json()]:
        assert enroll(shared, "class 0", env["files"][0][0]).status_code == 201
    server = Server(env["run"], env["gallery"], "--protect-reads", key=KEY)
    try:
        http = server.client
        assert http.get("/health").status_code == 200  # liveness stays open
        assert http.get("/").status_code == 200  # the page, which then asks for the key
        image = env["files"][0][0]
        for call in (
            lambda h: http.get("/identities", headers=h),
            lambda h: http.get("/identities/class 0/thumbnail", headers=h),
            lambda h: http.post("/identify", files=files_field(image), headers=h),
            lambda h: http.post("/embed", files=files_field(image), headers=h),
        ):
            assert call({}).status_code == 401
            assert call({"X-API-Key": "nope"}).status_code == 401
            assert call(WRITE).status_code == 200
    finally:
        code, output = server.stop()
    assert code == 0, output


def test_serve_refuses_bad_settings(env: dict) -> None:
    run, gallery = str(env["run"]), str(env["gallery"])
    done = cli("serve", run, "--gallery", gallery, "--protect-reads", check=False)
    assert done.returncode == 2 and "--protect-reads needs an API key" in done.stderr
    environ = {k: v for k, v in os.environ.items() if k != "UNSET_VARIABLE_FOR_TEST"}
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "serve", run, "--gallery", gallery,
         "--api-key-env", "UNSET_VARIABLE_FOR_TEST"],
        capture_output=True, text=True, timeout=60, env=environ,
    )  # fmt: skip
    assert done.returncode == 2 and "UNSET_VARIABLE_FOR_TEST" in done.stderr


# ------------------------------------------------------------------------------ concurrency


def test_cli_enroll_is_seen_by_the_running_server(env: dict, http: httpx.Client) -> None:
    files, gallery = env["files"], str(env["gallery"])
    cli("gallery", "enroll", gallery, "from the cli", *map(str, files[4][:2]), "--device", "cpu")
    assert "from the cli" in [x["identity"] for x in http.get("/identities").json()]
    r = http.post("/identify", files=files_field(files[4][4]), data={"k": "1"})
    assert r.json()[0]["candidates"][0]["identity"] == "from the cli"
    with Gallery.open(
        gallery, Embedder.from_run(env["run"], device="cpu", calibrate=False)
    ) as other:
        other.remove("from the cli")  # and a remove by another process (this one)
    r = http.post("/identify", files=files_field(files[4][4]), data={"k": "5"})
    assert "from the cli" not in [c["identity"] for c in r.json()[0]["candidates"]]


def test_another_process_closing_the_gallery_keeps_the_server_writes(
    env: dict, http: httpx.Client
) -> None:
    """Regression: the server holds several connections to the file; another process that
    opens and closes it must not be able to delete the WAL under them (it could when opening
    a store read the file's header with a plain open()/close(), which dropped the process's
    SQLite locks), or the server's later writes are invisible to everyone else and lost."""
    GalleryStore.open(env["gallery"]).close()
    assert enroll(http, "after a close", env["files"][5][1]).status_code == 201
    with GalleryStore.open(env["gallery"]) as store:
        assert "after a close" in store
    assert Path(f"{env['gallery']}-wal").exists()  # still there while the server runs
    assert http.delete("/identities/after a close", headers=WRITE).status_code == 200
    with GalleryStore.open(env["gallery"]) as store:
        assert "after a close" not in store


def test_concurrent_identify_while_enrolling(env: dict, http: httpx.Client) -> None:
    files, url = env["files"], env["server"].url
    query = files[1][6]
    errors: list[str] = []
    answers: list[list[str]] = []
    stop = threading.Event()

    def searcher() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                r = client.post("/identify", files=files_field(query), data={"k": "3"})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                answers.append([c["identity"] for c in r.json()[0]["candidates"]])

    threads = [threading.Thread(target=searcher) for _ in range(6)]
    for t in threads:
        t.start()
    written, removed = [], []
    # Write until the searchers have answered a dozen times while the writes go on (at least
    # six writes; a slow machine takes more rounds, not a weaker check), within a minute.
    deadline = time.monotonic() + 60
    try:
        i = 0
        while (i < 6 or len(answers) < 12) and time.monotonic() < deadline and not errors:
            name = f"busy {i}"
            r = enroll(http, name, files[i % CLASSES][7])
            assert r.status_code == 201, r.text
            written.append(name)
            if i % 2:
                assert http.delete(f"/identities/{name}", headers=WRITE).status_code == 200
                written.remove(name)
                removed.append(name)
            i += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert len(answers) >= 12
    assert all(len(a) == len(set(a)) and a for a in answers)  # identities, each once
    listed = {x["identity"] for x in http.get("/identities").json()}
    assert set(written) <= listed and not set(removed) & listed
    for name in written:
        assert http.delete(f"/identities/{name}", headers=WRITE).status_code == 200


def test_micro_batcher_takes_waiting_requests_together() -> None:
    release = threading.Event()
    seen: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        release.wait(10)
        return x.flatten(1) * 2

    batcher = MicroBatcher(forward, max_batch=8)
    try:
        first = batcher.submit(torch.ones(1, 3))
        while not seen:  # the first pass runs (and waits) before the others arrive
            time.sleep(0.001)
        rest = [batcher.submit(torch.full((n, 3), float(n))) for n in (2, 3, 1)]
        release.set()
        assert first.result(10).tolist() == [[2.0] * 3]
        for n, future in zip((2, 3, 1), rest):
            assert future.result(10).tolist() == [[2.0 * n] * 3] * n
        assert seen == [1, 6]  # the three waiting requests went through in one pass
        assert (batcher.batches, batcher.items) == (2, 7)
        with pytest.raises(ValueError, match="at least one"):
            batcher.submit(torch.ones(0, 3))
    finally:
        release.set()
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(torch.ones(1, 3))
