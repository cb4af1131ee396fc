"""The command line's ``--json`` and the service's answers are one shape, built by one method
(``Verification.to_json``, ``Identification.to_json``, ``IdentityInfo.to_json``): on the same
gallery and the same image files, ``deepmetric verify --json`` prints what ``POST /verify``
answers, ``deepmetric gallery identify --json`` what ``POST /identify`` answers, and
``deepmetric gallery list --json`` what ``GET /identities`` answers: the same keys in the same
order, the same names, identities and decisions, the distances equal up to float rounding
(the service embeds the uploads in batches, the command line file by file)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service import Server, files_field, new_gallery, shared_run

from deepmetric.cli import main as cli_main
from deepmetric.gallery import Gallery
from deepmetric.inference import Embedder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The service tests' tiny run, a gallery with two identities, three query files (of
    the two enrolled classes and of a stranger class) in one folder, and a server on it."""
    root = tmp_path_factory.mktemp("json_shapes")
    run, files = shared_run(tmp_path_factory)
    gallery = new_gallery(run, root / "g.db")
    embedder = Embedder.from_run(run, device="cpu", calibrate=False)
    with Gallery.open(gallery, embedder, device="cpu") as g:
        for c in (0, 1):
            g.enroll(f"class {c}", files[c][:2])
    folder = root / "images"
    folder.mkdir()
    for c, i in ((0, 3), (1, 3), (4, 3), (0, 4)):
        shutil.copy(files[c][i], folder / files[c][i].name)
    names = {c: files[c][3].name for c in (0, 1, 4)}
    server = Server(run, gallery)
    yield {"run": run, "gallery": gallery, "folder": folder, "names": names, "server": server}
    code, output = server.stop()
    assert code == 0, output


def printed_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[Any]:
    """What ``deepmetric ARGV`` prints, one JSON value per line (run in this process)."""
    capsys.readouterr()
    assert cli_main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def assert_same_json(served: Any, printed: Any, where: str = "") -> None:
    """Equal JSON values: objects with the same keys in the same order, the same types,
    floats equal up to 1e-5 (embeddings by batch or one by one), everything else exactly."""
    assert type(served) is type(printed), (where, served, printed)
    if isinstance(served, dict):
        assert list(served) == list(printed), where
        for key in served:
            assert_same_json(served[key], printed[key], f"{where}.{key}")
    elif isinstance(served, list):
        assert len(served) == len(printed), where
        for i, (s, p) in enumerate(zip(served, printed)):
            assert_same_json(s, p, f"{where}[{i}]")
    elif isinstance(served, float):
        assert served == pytest.approx(printed, abs=1e-5), where
    else:
        assert served == printed, where


def test_verify_prints_what_the_service_answers(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(served["folder"])  # the command line's names as the uploads' names
    http = served["server"].client
    a = served["names"][0]
    decisions = set()
    for b in sorted(p.name for p in Path().glob("*.png") if p.name != a):
        upload = [*files_field(Path(a), name="a"), *files_field(Path(b), name="b")]
        r = http.post("/verify", files=upload)
        assert r.status_code == 200, r.text
        (printed,) = printed_json(
            capsys, "verify", str(served["run"]), a, b, "--json", "--device", "cpu"
        )
        assert list(printed) == ["a", "b", "distance", "threshold", "same", "metric"]
        assert_same_json(r.json(), printed, "verify")
        decisions.add(printed["same"])
    assert decisions == {True, False}  # a pair of one class, pairs of two


def test_identify_and_list_print_what_the_service_answers(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(served["folder"])
    http, gallery = served["server"].client, str(served["gallery"])
    queries = [Path(served["names"][c]) for c in (0, 1, 4)]
    r = http.post("/identify", files=files_field(*queries), data={"k": "2"})
    assert r.status_code == 200, r.text
    printed = printed_json(
        capsys,
        "gallery",
        "identify",
        gallery,
        *map(str, queries),
        "--k",
        "2",
        "--json",
        "--device",
        "cpu",
    )
    assert list(printed[0]) == ["input", "identity", "distance", "threshold", "candidates"]
    assert list(printed[0]["candidates"][0]) == ["identity", "distance"]
    assert_same_json(r.json(), printed, "identify")
    assert [p["candidates"][0]["identity"] for p in printed[:2]] == ["class 0", "class 1"]

    listed = http.get("/identities")
    assert listed.status_code == 200, listed.text
    printed = printed_json(capsys, "gallery", "list", gallery, "--json")
    assert [p["identity"] for p in printed] == ["class 0", "class 1"]
    assert listed.json() == printed
