"""The edge-runtime wheel and the control plane's distribution page (``/agent/v1/dist/``)."""

from __future__ import annotations

import base64
import email.parser
import hashlib
import io
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.test import Client

import edge_runtime
from edge_runtime.onnxruntime_variants import VARIANTS
from orchestrator import http, keys
from sites import distribution, wheel

REPO = Path(__file__).resolve().parents[2]
DIST = "/agent/v1/dist/"
EDGE_PROJECT = tomllib.loads((REPO / "edge_runtime" / "pyproject.toml").read_text())["project"]


def _zip(data: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(data))


def _metadata(built: wheel.Wheel) -> Any:
    text = _zip(built.data).read(f"edge_runtime-{built.version}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text)


@pytest.fixture
def wheelhouse(settings: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    settings.WHEELHOUSE_DIR = folder
    return folder


def _fake_wheel(folder: Path, name: str, size: int = 5000) -> bytes:
    data = bytes((i * 7) % 256 for i in range(size))
    (folder / name).write_bytes(data)
    return data


def _bytes(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def _links(html: str) -> dict[str, str]:
    return dict(re.findall(r'<a href="([^"#]+)#sha256=([0-9a-f]{64})"', html))


# -- the wheel ---------------------------------------------------------------


def test_it_builds_the_same_bytes_from_the_same_source(tmp_path: Path) -> None:
    first = wheel.build_wheel(wheel.source_files())
    second = wheel.build_wheel(wheel.source_files())
    assert first.data == second.data
    assert first.sha256 == hashlib.sha256(first.data).hexdigest()
    # A copy of the package elsewhere (another control plane) gives the same wheel.
    copy = tmp_path / "edge_runtime"
    shutil.copytree(wheel.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert wheel.runtime_wheel(copy).sha256 == first.sha256
    assert wheel.runtime_wheel().sha256 == first.sha256


def test_it_serves_new_code_when_the_source_changes(tmp_path: Path) -> None:
    copy = tmp_path / "edge_runtime"
    shutil.copytree(wheel.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = wheel.runtime_wheel(copy)
    (copy / "signing.py").write_text((copy / "signing.py").read_text() + "\n# upgraded\n")
    after = wheel.runtime_wheel(copy)
    assert after.sha256 != before.sha256
    assert _zip(after.data).read("edge_runtime/signing.py").endswith(b"# upgraded\n")


def test_it_names_the_wheel_and_packs_every_module_but_no_bytecode() -> None:
    built = wheel.runtime_wheel()
    assert built.filename == f"edge_runtime-{edge_runtime.__version__}-py3-none-any.whl"
    names = _zip(built.data).namelist()
    modules = sorted(f"edge_runtime/{p.relative_to(wheel.SOURCE_DIR).as_posix()}"
                     for p in wheel.SOURCE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert modules and set(modules) <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert names[-1] == f"edge_runtime-{built.version}.dist-info/RECORD"
    for info in _zip(built.data).infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0), info.filename


def test_it_records_every_file_with_its_hash_and_size() -> None:
    built = wheel.runtime_wheel()
    archive = _zip(built.data)
    info = f"edge_runtime-{built.version}.dist-info"
    rows = [line.split(",") for line in archive.read(f"{info}/RECORD").decode().splitlines()]
    recorded = {path: (digest, size) for path, digest, size in rows}
    assert set(recorded) == set(archive.namelist())
    assert recorded.pop(f"{info}/RECORD") == ("", "")
    for path, (digest, size) in recorded.items():
        data = archive.read(path)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={expected}", path
        assert int(size) == len(data), path
    wheel_file = archive.read(f"{info}/WHEEL").decode()
    assert "Wheel-Version: 1.0" in wheel_file and "Root-Is-Purelib: true" in wheel_file
    assert "Tag: py3-none-any" in wheel_file
    assert archive.read(f"{info}/entry_points.txt").decode().splitlines() == [
        "[console_scripts]", "edge-runtime = edge_runtime.cli:main"]


def test_it_requires_what_the_edge_runtime_distribution_requires() -> None:
    built = wheel.runtime_wheel()
    metadata = _metadata(built)
    assert metadata["Metadata-Version"] == "2.1"
    assert metadata["Name"] == "edge-runtime" == EDGE_PROJECT["name"]
    assert metadata["Version"] == edge_runtime.__version__
    assert metadata["Requires-Python"] == ">=3.11" == built.requires_python
    requires = metadata.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert tuple(base) == tuple(EDGE_PROJECT["dependencies"]) == built.requires
    assert {"httpx>=0.27", "cryptography>=42", "pydantic>=2.6", "websockets>=12", "numpy>=1.26",
            "orjson>=3.10"} <= set(base)
    # onnxruntime only through one extra per variant: stock onnxruntime is never put over another build.
    assert not [r for r in base if r.startswith("onnxruntime")]
    assert tuple(requires) == built.requires_dist
    assert metadata.get_all("Provides-Extra") == ["cpu", "gpu", "openvino", "directml"]
    assert [r for r in requires if "extra ==" in r] == [
        'onnxruntime>=1.18; extra == "cpu"', 'onnxruntime-gpu>=1.18; extra == "gpu"',
        'onnxruntime-openvino>=1.18; extra == "openvino"', 'onnxruntime-directml>=1.18; extra == "directml"']
    # The runtime's own table of them (what its start-up check names) is the pyproject's.
    assert {extra: [dist + ">=1.18"] for extra, dist in VARIANTS.items()} == EDGE_PROJECT["optional-dependencies"]
    # Declared once: the control plane depends on the edge runtime by name and repeats none of its extras.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "edge-runtime" in pyproject["dependencies"]
    assert "edge" not in pyproject.get("optional-dependencies", {})
    assert not [r for r in requires if r.lower().startswith(("django", "celery", "channels"))]


def test_it_reads_the_pyproject_but_ships_no_build_leftovers(tmp_path: Path) -> None:
    copy = tmp_path / "edge_runtime"
    shutil.copytree(wheel.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    clean = wheel.runtime_wheel(copy)
    # What `pip install -e ./edge_runtime` and `pip wheel ./edge_runtime` leave behind.
    for leftover in ("edge_runtime.egg-info/SOURCES.txt", "build/lib/edge_runtime/cli.py"):
        (copy / leftover).parent.mkdir(parents=True, exist_ok=True)
        (copy / leftover).write_text("leftover\n")
    assert wheel.runtime_wheel(copy).sha256 == clean.sha256
    names = _zip(clean.data).namelist()
    assert "edge_runtime/pyproject.toml" not in names
    assert not [n for n in names if "egg-info" in n or n.startswith("edge_runtime/build/")]


def test_it_refuses_a_package_without_its_pyproject(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text('__version__ = "1.0"\n')
    with pytest.raises(wheel.WheelError, match="pyproject.toml is missing"):
        wheel.runtime_wheel(tmp_path)


def test_it_puts_an_extra_into_the_marker_a_requirement_already_has() -> None:
    assert wheel._requires_dist(("numpy>=1.26",), {"win": ("pywin32>=306; sys_platform == 'win32'",)}) == (
        "numpy>=1.26", "pywin32>=306; (sys_platform == 'win32') and extra == \"win\"")


@pytest.mark.parametrize(("table", "says"), [
    ('[project.optional-dependencies]\nOpenVINO = ["onnxruntime-openvino"]\n', "not a normalized name"),
    ('[project.optional-dependencies]\ncpu = "onnxruntime"\n', "must be a list of requirement strings"),
])
def test_it_refuses_an_extra_pip_could_not_ask_for(tmp_path: Path, table: str, says: str) -> None:
    (tmp_path / "__init__.py").write_text('__version__ = "1.0"\n')
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "edge-runtime"\ndescription = "d"\n'
                                             'requires-python = ">=3.11"\ndependencies = []\n' + table)
    with pytest.raises(wheel.WheelError, match=says):
        wheel.runtime_wheel(tmp_path)


def test_it_refuses_a_package_without_a_literal_version(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("__version__ = compute()\n")
    shutil.copy2(wheel.SOURCE_DIR / "pyproject.toml", tmp_path / "pyproject.toml")
    with pytest.raises(wheel.WheelError, match="__version__"):
        wheel.runtime_wheel(tmp_path)


def test_it_installs_with_pip_into_a_fresh_venv(tmp_path: Path) -> None:
    built = wheel.runtime_wheel()
    path = tmp_path / built.filename
    path.write_bytes(built.data)
    venv = tmp_path / "venv"
    # Without pip inside: this test's own pip installs into it, which is quicker.
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # type: ignore[attr-defined]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "--quiet", str(path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    script = venv / "bin" / "edge-runtime"
    assert script.is_file() and "edge_runtime.cli" in script.read_text()
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, edge_runtime, sys;"
         "d = m.distribution('edge-runtime');"
         "print(d.version); print(edge_runtime.__file__); print(sorted(d.requires))"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )
    version, location, requires = probe.stdout.splitlines()
    assert version == edge_runtime.__version__
    assert location.startswith(str(venv))
    assert requires == str(sorted(built.requires_dist))


# -- the index ---------------------------------------------------------------


def test_it_lists_the_runtime_wheel_and_the_wheelhouse_with_sha256(client: Client, wheelhouse: Path) -> None:
    dep = _fake_wheel(wheelhouse, "httpx-0.28.1-py3-none-any.whl")
    (wheelhouse / "notes.txt").write_text("not a wheel")
    (wheelhouse / "nested").mkdir()
    _fake_wheel(wheelhouse / "nested", "hidden-1.0-py3-none-any.whl")
    response = client.get(DIST)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    built = wheel.runtime_wheel()
    assert _links(response.content.decode()) == {
        built.filename: built.sha256,
        "httpx-0.28.1-py3-none-any.whl": hashlib.sha256(dep).hexdigest(),
    }
    assert 'data-requires-python="&gt;=3.11"' in response.content.decode()


def test_it_never_lets_a_wheelhouse_file_shadow_the_runtime_wheel(client: Client, wheelhouse: Path) -> None:
    built = wheel.runtime_wheel()
    _fake_wheel(wheelhouse, built.filename)
    assert _links(client.get(DIST).content.decode())[built.filename] == built.sha256
    assert _bytes(client.get(DIST + built.filename)) == built.data


def test_it_lists_an_empty_wheelhouse_as_only_the_runtime(client: Client, settings: Any, tmp_path: Path) -> None:
    settings.WHEELHOUSE_DIR = tmp_path / "missing"
    assert list(_links(client.get(DIST).content.decode())) == [wheel.runtime_wheel().filename]


# -- downloads ---------------------------------------------------------------


def test_it_serves_a_listed_file_whole(client: Client, wheelhouse: Path) -> None:
    built = wheel.runtime_wheel()
    response = client.get(DIST + built.filename)
    assert response.status_code == 200
    assert _bytes(response) == built.data
    assert response["Content-Length"] == str(built.size)
    assert response["Accept-Ranges"] == "bytes"
    assert response["ETag"] == f'"{built.sha256}"'
    dep = _fake_wheel(wheelhouse, "pydantic-2.0-py3-none-any.whl", size=700_000)
    response = client.get(DIST + "pydantic-2.0-py3-none-any.whl")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == dep
    assert response["Content-Length"] == str(len(dep))


def test_it_answers_head_with_headers_only(client: Client) -> None:
    built = wheel.runtime_wheel()
    response = client.head(DIST + built.filename)
    assert response.status_code == 200
    assert response["Content-Length"] == str(built.size)
    assert response.content == b""


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=0-99", 0, 99), ("bytes=100-", 100, None), ("bytes=-50", -50, None), ("bytes=10-10", 10, 10),
     ("bytes=4000-999999", 4000, None)],
)
def test_it_serves_a_byte_range_with_206(client: Client, wheelhouse: Path, header: str, first: int,
                                         last: int | None) -> None:
    built = wheel.runtime_wheel()
    dep = _fake_wheel(wheelhouse, "websockets-12.0-py3-none-any.whl", size=600_000)
    for name, data in ((built.filename, built.data), ("websockets-12.0-py3-none-any.whl", dep)):
        expected = data[first:] if last is None else data[first : last + 1]
        response = client.get(DIST + name, headers={"Range": header})
        assert response.status_code == 206, (name, header)
        body = response.content if not response.streaming else b"".join(response.streaming_content)
        assert body == expected, (name, header)
        assert response["Content-Length"] == str(len(expected))
        start = first if first >= 0 else len(data) + first
        assert response["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"


def test_it_resumes_a_download_to_the_exact_file(client: Client) -> None:
    built = wheel.runtime_wheel()
    head = _bytes(client.get(DIST + built.filename, headers={"Range": "bytes=0-1023"}))
    etag = client.head(DIST + built.filename)["ETag"]
    tail = _bytes(client.get(DIST + built.filename, headers={"Range": f"bytes={len(head)}-", "If-Range": etag}))
    assert hashlib.sha256(head + tail).hexdigest() == built.sha256


def test_it_sends_the_whole_file_when_if_range_names_another_version(client: Client) -> None:
    built = wheel.runtime_wheel()
    response = client.get(DIST + built.filename, headers={"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert response.status_code == 200
    assert _bytes(response) == built.data


@pytest.mark.parametrize(
    ("header", "says"),
    [("bytes=999999999-", "past the end"), ("bytes=20-10", "ends before it starts"),
     ("bytes=0-1,5-9", "one byte range"), ("items=0-9", "malformed"), ("bytes=abc", "malformed"),
     ("bytes=-0", "no bytes"), ("bytes=-", "no bytes")],
)
def test_it_refuses_an_unsatisfiable_or_malformed_range_with_416(client: Client, header: str, says: str) -> None:
    built = wheel.runtime_wheel()
    response = client.get(DIST + built.filename, headers={"Range": header})
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{built.size}"
    assert says in response.content.decode()


@pytest.mark.parametrize(
    "path",
    ["edge_runtime-0.0.0-py3-none-any.whl", "notes.txt", "..%2Fsecret.whl", "../secret.whl",
     "%2e%2e/%2e%2e/signing_key.pem", "nested/hidden-1.0-py3-none-any.whl", "nested", ".", "..",
     "..%2F..%2Fwheelhouse%2Fnotes.txt"],
)
def test_it_answers_404_for_anything_not_listed(client: Client, wheelhouse: Path, path: str) -> None:
    (wheelhouse / "notes.txt").write_text("not a wheel")
    (wheelhouse / "nested").mkdir()
    _fake_wheel(wheelhouse / "nested", "hidden-1.0-py3-none-any.whl")
    (wheelhouse.parent / "secret.whl").write_bytes(b"outside the wheelhouse")
    response = client.get(DIST + path)
    assert response.status_code == 404
    assert b"outside the wheelhouse" not in response.content


def test_it_refuses_writes_to_the_distribution(client: Client) -> None:
    built = wheel.runtime_wheel()
    assert client.post(DIST).status_code == 405
    assert client.put(DIST + built.filename, data=b"x").status_code == 405


def test_it_parses_a_range_against_the_file_size() -> None:
    assert http.parse_range("bytes=0-0", 1) == (0, 0)
    assert http.parse_range("bytes = 5 - ", 10) == (5, 9)
    assert http.parse_range("bytes=-100", 10) == (0, 9)
    with pytest.raises(http.RangeNotSatisfiable, match="empty"):
        http.parse_range("bytes=0-", 0)


# -- the signing key's proof ---------------------------------------------------


@pytest.mark.django_db
def test_it_proves_it_holds_the_signing_key_for_a_challenge(client: Client) -> None:
    challenge = secrets.token_hex(32)
    response = client.get("/agent/v1/signing-key", {"challenge": challenge})
    assert response.status_code == 200
    body = response.json()
    raw = base64.b64decode(body["public_key"])
    assert body["fingerprint"] == hashlib.sha256(raw).hexdigest() == keys.public_key_fingerprint()
    public = Ed25519PublicKey.from_public_bytes(raw)
    public.verify(base64.b64decode(body["signature"]), distribution.KEY_PROOF_PREFIX + challenge.encode())
    # The proof is bound to the challenge: it does not verify for another one.
    with pytest.raises(InvalidSignature):
        public.verify(base64.b64decode(body["signature"]), distribution.KEY_PROOF_PREFIX + b"0" * 64)


@pytest.mark.parametrize("challenge", [None, "", "abc", "z" * 64, "A" * 64, "0" * 129, '{"generation": 9}'])
def test_it_refuses_a_challenge_that_is_not_hex(client: Client, challenge: str | None) -> None:
    response = client.get("/agent/v1/signing-key", {} if challenge is None else {"challenge": challenge})
    assert response.status_code == 400
    assert response.json()["field"] == "challenge"
