"""Service reliability, for real: ``deepmetric serve`` in a subprocess on loopback (as in
``test_service.py``), under a bounded concurrent mixed load of identify / enroll / remove
requests from several threads (no lost write, no 5xx, every answer consistent with the
identities that existed during its request), and the input-hardening cases
``test_service.py`` does not cover (malformed JSON and wrong content types on every POST,
oversize bodies on the write endpoint, names with path / SQL metacharacters checked in the
database itself, the API key rules on writes)."""

from __future__ import annotations

import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from test_service import KEY, Server, files_field, new_gallery, shared_run

from deepmetric.distances import pairwise
from deepmetric.gallery.check import check_gallery
from deepmetric.gallery.store import GalleryStore
from deepmetric.inference import Embedder

WRITE = {"X-API-Key": KEY}
POSTS = ["/identify", "/embed", "/verify", "/identities"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny trained run, its test images, and a function making a gallery served on it."""
    run, files = shared_run(tmp_path_factory)
    servers: list[Server] = []

    def serve(name: str) -> tuple[Server, Path]:
        folder = tmp_path_factory.mktemp(name)
        gallery = new_gallery(run, folder / "g.db")
        server = Server(run, gallery, "--max-upload-mb", "1", key=KEY)
        servers.append(server)
        return server, gallery

    yield {"run": run, "files": files, "serve": serve}
    for server in servers:
        code, output = server.stop()
        assert code == 0 and "Traceback" not in output, output


@pytest.fixture(scope="module")
def hardening(env: dict[str, Any]) -> dict[str, Any]:
    server, gallery = env["serve"]("hardening")
    return {"http": server.client, "gallery": gallery, "image": env["files"][0][0]}


def _alive(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _names(gallery: Path) -> list[str]:
    """The identity names in the database, read by this process (not through the server)."""
    with GalleryStore.open(gallery) as store:
        return [info.name for info in store.identities()]


# ------------------------------------------------------------------------------ hardening


@pytest.mark.parametrize("path", POSTS)
def test_malformed_json_and_wrong_content_types_are_415(hardening, path: str) -> None:
    http = hardening["http"]
    bodies = [
        ("application/json", b'{"identity": "x", "files": ['),  # malformed JSON
        ("application/json", b'{"identity": "x", "files": ["/etc/passwd"]}'),
        ("text/plain", b"identity=x"),
        ("application/x-www-form-urlencoded", b"identity=x&files=%2Fetc%2Fpasswd"),
        ("image/png", hardening["image"].read_bytes()),  # an image, but not multipart
    ]
    for kind, body in bodies:
        r = http.post(path, content=body, headers={**WRITE, "content-type": kind})
        assert r.status_code == 415, (path, kind, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert "multipart/form-data" in r.json()["error"], r.text
    r = http.post(
        path,
        content=b"--zz\r\nnot a part",
        headers={**WRITE, "content-type": "multipart/form-data"},  # no boundary
    )
    assert 400 <= r.status_code < 500 and r.json()["error"], (path, r.status_code, r.text)
    assert "x" not in _names(hardening["gallery"])
    _alive(http)


def test_oversize_writes_are_refused_and_nothing_is_written(hardening) -> None:
    http, gallery = hardening["http"], hardening["gallery"]
    big = [("files", ("big.png", b"\x89PNG" + bytes(1_200_000), "image/png"))]  # > 1 MiB
    r = http.post("/identities", data={"identity": "big"}, files=big, headers=WRITE)
    assert r.status_code == 413 and "MiB" in r.json()["error"], r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="identity"\r\n\r\nchunked\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'
        for _ in range(12):
            yield b"\0" * 100_000
        yield b"\r\n--b--\r\n"

    headers = {**WRITE, "content-type": "multipart/form-data; boundary=b"}
    r = http.post("/identities", content=chunks(), headers=headers)
    assert r.status_code == 413, r.text
    # a huge declared length is refused from the headers alone, before any body is sent
    with socket.create_connection(("127.0.0.1", http.base_url.port), timeout=10) as raw:
        raw.sendall(
            b"POST /identities HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + b"Content-Length: 1099511627776\r\n\r\n"
        )  # fmt: skip
        reply = raw.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:100]
    # the key is checked first: without it, even an oversize write is a 401
    r = http.post("/identities", data={"identity": "big"}, files=big)
    assert r.status_code == 401, r.text
    assert not {"big", "chunked"} & set(_names(gallery))
    _alive(http)


NAMES = [
    "...",
    ".hidden",
    "../../../tmp/x",
    "/etc/passwd",
    "a/thumbnail",
    "x' OR '1'='1",
    "Robert'); DROP TABLE examples;--",
    "%2e%2e%2f",
    "name?query=1&x=2#frag",
    "back\\slash",
    "😀 Zoë",
]


def _url(name: str) -> str:
    """The identity's URL, every character but letters and digits percent-encoded (dots too:
    a client would otherwise resolve ``..`` as a path step before sending)."""
    quoted = "".join(
        c if c.isascii() and c.isalnum() else urllib.parse.quote(c, safe="") for c in name
    )
    return "/identities/" + quoted.replace(".", "%2E")


def test_names_with_path_and_sql_metacharacters_are_stored_verbatim(hardening) -> None:
    http, gallery, image = hardening["http"], hardening["gallery"], hardening["image"]
    folder = gallery.parent
    files_before = sorted(p.name for p in folder.iterdir())
    keep = "bystander"  # an unrelated identity: no name may reach it
    r = http.post("/identities", data={"identity": keep}, files=files_field(image), headers=WRITE)
    assert r.status_code == 201
    for step in (".", ".."):  # a path step in a URL: no client could reach it, so refused
        r = http.post(
            "/identities", data={"identity": step}, files=files_field(image), headers=WRITE
        )
        assert r.status_code in (400, 422) and "path step" in r.text, (step, r.text)
    for name in NAMES:
        r = http.post(
            "/identities", data={"identity": name}, files=files_field(image), headers=WRITE
        )
        assert r.status_code == 201 and r.json()["identity"] == name, (name, r.text)
    with GalleryStore.open(gallery) as store:  # the database itself: exact strings, intact
        assert set(NAMES) | {keep} <= {info.name for info in store.identities()}
        for name in NAMES:
            assert store.identity(name).examples == 1, name
        tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
        assert {"identities", "examples", "meta"} <= tables
        assert store.problems() == []
    listed = [x["identity"] for x in http.get("/identities").json()]
    assert set(NAMES) <= set(listed)
    for name in NAMES:  # the thumbnail and the remove reach exactly that identity
        r = http.get(_url(name) + "/thumbnail")
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), (name, r.status_code)
        before = set(_names(gallery))
        r = http.delete(_url(name), headers=WRITE)
        assert r.status_code == 200 and r.json()["identity"] == name, (name, r.text)
        assert set(_names(gallery)) == before - {name}, name
    assert _names(gallery) == [keep]
    assert sorted(p.name for p in folder.iterdir()) == files_before  # no file made from a name
    assert http.delete(_url(keep), headers=WRITE).status_code == 200
    _alive(http)


def test_writes_without_the_right_key_change_nothing(hardening) -> None:
    http, gallery, image = hardening["http"], hardening["gallery"], hardening["image"]
    r = http.post("/identities", data={"identity": "kept"}, files=files_field(image), headers=WRITE)
    assert r.status_code == 201
    wrong = [
        {},
        {"X-API-Key": KEY.upper()},
        {"X-API-Key": KEY[:-1] + "0"},  # same length, one character off
        {"X-API-Key": KEY[:-1]},
        {"Authorization": f"Bearer {KEY}"},
        {"X-Api-Key-Other": KEY},
    ]
    for headers in wrong:
        r = http.delete(_url("kept"), headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"], (headers, r.text)
        assert r.headers["www-authenticate"] == "X-API-Key"
        r = http.post(
            "/identities", data={"identity": "intruder"}, files=files_field(image), headers=headers
        )
        assert r.status_code == 401, (headers, r.text)
        r = http.post("/identities", content=b"{bad json", headers=headers)  # key before body
        assert r.status_code == 401, (headers, r.text)
    r = http.delete(_url("kept") + f"?api_key={KEY}")  # the key in the query: not accepted
    assert r.status_code == 401
    assert "kept" in _names(gallery) and "intruder" not in _names(gallery)
    r = http.delete(_url("kept"), headers={"x-api-key": KEY})  # header names: any case
    assert r.status_code == 200 and "kept" not in _names(gallery)
    _alive(http)


# ------------------------------------------------------------------------------ under load


class Call(NamedTuple):
    """One request of the load: what, on which identity or file, when, and the answer."""

    kind: str  # "identify", "enroll", "remove"
    name: str  # the identity enrolled / removed; the query file for identify
    start: float
    end: float
    status: int
    body: Any


THREADS = 8
CALLS_PER_THREAD = 40
BASE = 4  # identities enrolled before the load, never removed
#: distances computed by the server and here (other thread counts): float32 rounding, and its
#: square root for the euclidean distance of an image to itself
TOL = 2e-3


def _worker(
    url: str, seed: int, files: list[Path], owner: dict[str, Path], out: list[Call]
) -> None:
    """Identify (50 %), enroll a new identity (30 %), remove one it enrolled (20 %)."""
    rng = random.Random(seed)
    mine: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for j in range(CALLS_PER_THREAD):
            roll = rng.random()
            start = time.monotonic()
            if roll < 0.5:
                query = rng.choice(files)
                r = http.post("/identify", files=files_field(query), data={"k": "5"})
                kind, name = "identify", str(query)
            elif roll < 0.8 or not mine:
                name, image = f"load {seed}-{j}", rng.choice(files)
                owner[name] = image
                r = http.post(
                    "/identities", data={"identity": name}, files=files_field(image), headers=WRITE
                )
                kind = "enroll"
                if r.status_code == 201:
                    mine.append(name)
            else:
                name = mine.pop(rng.randrange(len(mine)))
                r = http.delete(_url(name), headers=WRITE)
                kind = "remove"
            body = (
                r.json()
                if r.headers.get("content-type", "").startswith("application/json")
                else r.text
            )
            out.append(Call(kind, name, start, time.monotonic(), r.status_code, body))


def test_concurrent_mixed_load_loses_nothing_and_answers_consistently(env) -> None:
    server, gallery = env["serve"]("load")
    http = server.client
    files = [p for c in sorted(env["files"]) for p in env["files"][c]]
    owner: dict[str, Path] = {}  # identity -> the one image it was enrolled with
    for i in range(BASE):
        owner[f"base {i}"] = files[i * 7]
        r = http.post(
            "/identities",
            data={"identity": f"base {i}"},
            files=files_field(files[i * 7]),
            headers=WRITE,
        )
        assert r.status_code == 201
    calls: list[Call] = []
    began = time.monotonic()
    threads = [
        threading.Thread(target=_worker, args=(server.url, seed, files, owner, calls))
        for seed in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    seconds = time.monotonic() - began
    assert len(calls) == THREADS * CALLS_PER_THREAD, "a worker died"

    # no 5xx, no refusal: every request was a valid one
    want = {"identify": 200, "enroll": 201, "remove": 200}
    bad = [c for c in calls if c.status != want[c.kind]]
    assert not bad, bad[:3]
    enrolls = {c.name: c for c in calls if c.kind == "enroll"}
    removes = {c.name: c for c in calls if c.kind == "remove"}
    assert len(enrolls) >= 20 and len(removes) >= 5, (len(enrolls), len(removes))

    # no lost write: every acknowledged enroll is there, every acknowledged remove is not
    expected = {f"base {i}" for i in range(BASE)} | (set(enrolls) - set(removes))
    listed = {x["identity"]: x["examples"] for x in http.get("/identities").json()}
    assert set(listed) == expected and set(listed.values()) == {1}
    assert set(_names(gallery)) == expected  # the file, as another process reads it
    assert http.get("/health").json()["identities"] == len(expected)
    for c in enrolls.values():  # each enroll returned the ids of its one example
        assert c.body["identity"] == c.name and len(c.body["examples"]) == 1

    # every identify answer: only identities that existed during the request, at their true
    # distance; none that existed all through it missing from the k nearest
    embedder = Embedder.from_run(env["run"], device="cpu", calibrate=False)  # as the server
    paths = sorted(set(owner.values()) | {Path(c.name) for c in calls if c.kind == "identify"})
    vectors = dict(zip(paths, embedder.embed(paths)))

    def distance(query: Path, name: str) -> float:
        d = pairwise(vectors[query][None], vectors[owner[name]][None], embedder.metric)
        return float(d[0, 0])

    identifies = [c for c in calls if c.kind == "identify"]
    for c in identifies:
        [answer] = c.body
        names = [x["identity"] for x in answer["candidates"]]
        dists = [x["distance"] for x in answer["candidates"]]
        assert len(names) == len(set(names)) and dists == sorted(dists), answer
        for name, d in zip(names, dists):
            existed = name.startswith("base ") or (
                name in enrolls
                and enrolls[name].start < c.end
                and not (name in removes and removes[name].end < c.start)
            )
            assert existed, (name, c)
            assert d == pytest.approx(distance(Path(c.name), name), abs=TOL), (name, c)
        stable = {f"base {i}" for i in range(BASE)} | {
            n
            for n, e in enrolls.items()
            if e.end < c.start and (n not in removes or removes[n].start > c.end)
        }
        for name in stable - set(names):  # a stable identity left out must be farther
            assert len(names) == 5 and distance(Path(c.name), name) >= dists[-1] - TOL, (name, c)
        top = names[0] if dists and dists[0] <= answer["threshold"] else None
        assert answer["identity"] == top

    code, output = server.stop()  # Ctrl-C: the gallery is closed, its index saved
    assert code == 0 and "Traceback" not in output, output
    report = check_gallery(gallery)
    assert report.ok, report.problems
    assert set(_names(gallery)) == expected
    print(
        f"\n{len(calls)} requests from {THREADS} threads in {seconds:.1f} s: "
        f"{len(identifies)} identify, {len(enrolls)} enroll, {len(removes)} remove"
    )
