"""Downloader and hub-model fetch against a local HTTP server (no internet needed)."""

import hashlib
import http.server
import json
import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest

from data import gsm8k
from data.download import DownloadError, cache_dir, download, resolve_model

from conftest import SHARED_GSM8K, write_gsm8k
HINT = "; pass --model PATH to a local Hugging Face model folder"


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.root; server.ranges: True honours `Range: bytes=N-`, False ignores it,
    "wrong" answers 206 with the whole file (a broken proxy)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)  # query ignored, like the hub mock needs
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if path == "/truncated":  # promises 1000 bytes, sends 100, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        f = srv.root / path.lstrip("/")
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.ranges == "wrong":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
            body = data
        elif m and srv.ranges:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    write_gsm8k(root / "gsm8k-fixture")
    if SHARED_GSM8K.is_dir():
        (root / "gsm8k").symlink_to(SHARED_GSM8K)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.root, srv.ranges, srv.requests = root, True, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def srv(server, tmp_path, monkeypatch):
    """The shared server, reset, plus a private cache dir for this test."""
    server.ranges = True
    server.requests.clear()
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    return server


def closed_port_url(path="/x"):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}{path}"


def put(srv, name, data):
    f = srv.root / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f"{srv.url}/{name}", hashlib.sha256(data).hexdigest()


BLOB = bytes(range(256)) * 40  # 10 KiB, every byte value


# -----------------------------------------------------------------------------
# download()

def test_cache_dir_follows_memgen_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MEMGEN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "memgen"


def test_gsm8k_over_http_checks_the_pinned_sha_and_caches(srv, gsm8k_fixture):
    """The fixture rows with their own pins (conftest.gsm8k_fixture), served over HTTP: downloaded once, cached."""
    train = gsm8k.load_split("train", base_url=f"{srv.url}/gsm8k-fixture/")
    test = gsm8k.load_split("test", base_url=f"{srv.url}/gsm8k-fixture")
    assert (len(train), len(test)) == (20, 20)
    assert train[0]["answer"] == "72" and test[0]["answer"] == "647.5"  # conftest.gsm8k_row(18)
    assert (cache_dir() / "gsm8k" / "train.jsonl").is_file()
    assert not (cache_dir() / "gsm8k" / "train.jsonl.part").exists()
    n = len(srv.requests)
    gsm8k.load_split("test", base_url=f"{srv.url}/gsm8k-fixture")  # cached: no new request
    assert len(srv.requests) == n


def test_memgen_gsm8k_url_points_gsm8k_downloads_elsewhere(srv, gsm8k_fixture, monkeypatch):
    monkeypatch.setenv("MEMGEN_GSM8K_URL", f"{srv.url}/gsm8k-fixture/")
    assert len(gsm8k.load_split("test")) == 20 and any("gsm8k-fixture/test.jsonl" in p for p, _ in srv.requests)


@pytest.mark.shared
def test_full_gsm8k_over_http_with_the_real_pinned_sha(srv):
    train = gsm8k.load_split("train", base_url=f"{srv.url}/gsm8k/")
    test = gsm8k.load_split("test", base_url=f"{srv.url}/gsm8k")
    assert (len(train), len(test)) == (7473, 1319)


def test_gsm8k_offline_error_names_memgen_gsm8k_url(srv, monkeypatch):
    monkeypatch.setenv("MEMGEN_GSM8K_URL", closed_port_url("/data/"))
    with pytest.raises(DownloadError, match=r"^could not reach .*/data/test\.jsonl \(.*; set MEMGEN_GSM8K_URL"):
        gsm8k.load_split("test")


def test_a_wrong_gsm8k_file_fails_its_pinned_sha(srv):
    put(srv, "fake/test.jsonl", b'{"question": "q", "answer": "a\\n#### 1"}\n')
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        gsm8k.load_split("test", base_url=f"{srv.url}/fake")


def test_download_checks_sha_and_size_and_writes_the_file(srv, tmp_path):
    url, sha = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "out" / "blob.bin"
    assert download(url, dest, sha256=sha, size=len(BLOB)) == str(dest)
    assert dest.read_bytes() == BLOB


def test_a_sha_mismatch_is_named_and_leaves_no_file_or_part(srv, tmp_path):
    url, sha = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError) as e:
        download(url, dest, sha256="0" * 64)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and str(dest) in msg and "0" * 64 in msg and sha in msg
    assert not dest.exists() and not Path(str(dest) + ".part").exists()  # retry starts clean


def test_http_404_is_one_line_and_leaves_no_file(srv, tmp_path):
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/nope\.bin: HTTP 404"):
        download(f"{srv.url}/nope.bin", tmp_path / "nope.bin")
    assert not (tmp_path / "nope.bin").exists()


def test_a_short_body_keeps_its_part_file_to_resume(srv, tmp_path):
    dest = tmp_path / "t.bin"
    with pytest.raises(DownloadError, match="truncated: got 100 of 1000 bytes"):
        download(f"{srv.url}/truncated", dest)
    assert not dest.exists()
    assert Path(str(dest) + ".part").stat().st_size == 100  # kept, so a rerun resumes


def test_a_file_shorter_than_its_expected_size_is_refused(srv, tmp_path):
    url, _ = put(srv, "small.bin", b"x" * 100)
    with pytest.raises(DownloadError, match="100 bytes but 200 were expected"):
        download(url, tmp_path / "small.bin", size=200)
    assert not (tmp_path / "small.bin").exists()


def test_a_part_file_resumes_with_a_range_request(srv, tmp_path):
    url, sha = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "blob.bin"
    half = len(BLOB) // 2
    Path(str(dest) + ".part").write_bytes(BLOB[:half])
    download(url, dest, sha256=sha, size=len(BLOB))
    assert dest.read_bytes() == BLOB
    assert srv.requests == [("/blob.bin", f"bytes={half}-")]


def test_restart_when_server_ignores_range(srv, tmp_path):
    srv.ranges = False
    url, sha = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(BLOB[:1000])
    download(url, dest, sha256=sha)
    assert dest.read_bytes() == BLOB


def test_restart_when_server_sends_wrong_range(srv, tmp_path):
    srv.ranges = "wrong"
    url, _ = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(BLOB[:1000])
    download(url, dest)  # no checks given: only the download logic keeps the file right
    assert dest.read_bytes() == BLOB
    assert srv.requests == [("/blob.bin", "bytes=1000-"), ("/blob.bin", None)]


def test_restart_when_part_is_too_long(srv, tmp_path):
    url, sha = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(BLOB + b"junk")  # server answers 416
    download(url, dest, sha256=sha)
    assert dest.read_bytes() == BLOB


def test_complete_part_needs_no_request(srv, tmp_path):
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(BLOB)
    download(closed_port_url(), dest, sha256=hashlib.sha256(BLOB).hexdigest(), size=len(BLOB))
    assert dest.read_bytes() == BLOB


def test_existing_good_file_skips_network(tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(BLOB)
    assert download(closed_port_url(), dest, sha256=hashlib.sha256(BLOB).hexdigest()) == str(dest)


def test_existing_bad_file_is_replaced(srv, tmp_path):
    url, sha = put(srv, "blob.bin", BLOB)
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    download(url, dest, sha256=sha)
    assert dest.read_bytes() == BLOB


def test_unreachable_is_one_line(tmp_path):
    url = closed_port_url("/data.bin")
    with pytest.raises(DownloadError) as e:
        download(url, tmp_path / "data.bin")
    msg = str(e.value)
    assert msg.startswith(f"could not reach {url} (") and msg.endswith(")")
    assert "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback


def test_file_urls_download_and_a_missing_file_is_one_line(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(BLOB)
    dest = tmp_path / "dst" / "copy.bin"
    download(src.as_uri(), dest, sha256=hashlib.sha256(BLOB).hexdigest(), size=len(BLOB))
    assert dest.read_bytes() == BLOB
    with pytest.raises(DownloadError, match="could not reach file://"):
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "m.bin")


def test_an_unknown_url_scheme_is_one_line(tmp_path):
    with pytest.raises(DownloadError, match="could not reach"):
        download("nosuchscheme://x/y", tmp_path / "y")


# -----------------------------------------------------------------------------
# resolve_model()

def make_hub_repo(srv, repo, files, extra=(), bad_sha=()):
    """Write a fake hub repo: the listing JSON plus resolve/main/<file> for each file."""
    siblings = []
    for name, data in {**files, **dict(extra)}.items():
        put(srv, f"{repo}/resolve/main/{name}", data)
        entry = {"rfilename": name, "size": len(data)}
        if name.endswith(".safetensors"):  # LFS files carry size + sha256
            sha = "f" * 64 if name in bad_sha else hashlib.sha256(data).hexdigest()
            entry["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
        siblings.append(entry)
    put(srv, f"api/models/{repo}/revision/main", json.dumps({"id": repo, "siblings": siblings}).encode())


TINY = {"config.json": b'{"model_type": "qwen2"}', "tokenizer.json": b"{}", "model.safetensors": BLOB}
JUNK = {"README.md": b"# tiny", ".gitattributes": b"*", "pytorch_model.bin": b"old", "onnx/model.onnx": b"o"}


@pytest.fixture
def hub(srv, monkeypatch):
    monkeypatch.setenv("MEMGEN_HF_ENDPOINT", srv.url + "/")  # trailing slash is tolerated
    return srv


def test_an_existing_folder_resolves_to_itself(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_local_looking_missing_paths_fail_as_missing_folders_without_network(tmp_path, monkeypatch):
    """A path that looks local (starts with . / ~, has more than one /, or exists in part) is never a hub id."""
    import data.download

    def no_network(url, offset):
        raise AssertionError(f"network call for {url}")

    monkeypatch.setattr(data.download, "_open", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "notes").write_text("a file")
    for name in (str(tmp_path / "no" / "such" / "model"), "./not-a-model", "~/no-such-model-here", "a/b/c",
                 "models/mistyped", "notes/x", "plainname"):
        with pytest.raises(DownloadError, match=r"model folder .* does not exist"):
            resolve_model(name)
    with pytest.raises(AssertionError, match="network call"):  # the same shape with no local part is a hub id
        resolve_model("org/name", cache=tmp_path / "cache")


def test_resolve_from_hub(hub, tmp_path):
    make_hub_repo(hub, "org/tiny", TINY, extra=JUNK)
    folder = resolve_model("org/tiny", cache=tmp_path)
    assert folder == str(tmp_path / "models" / "org--tiny")
    assert sorted(os.listdir(folder)) == sorted(TINY)
    for name, data in TINY.items():
        assert (Path(folder) / name).read_bytes() == data
    assert hub.requests[0][0] == "/api/models/org/tiny/revision/main?blobs=true"
    assert [p for p, _ in hub.requests if "resolve" in p and "README" in p] == []
    assert not any(p.name.startswith(".") for p in (tmp_path / "models").iterdir())  # build folder gone
    n = len(hub.requests)
    assert resolve_model("org/tiny", cache=tmp_path) == folder  # cached: no new request
    assert len(hub.requests) == n


def test_resolve_default_cache_and_shards(hub):
    shards = {"model-00001-of-00002.safetensors": BLOB[:5000], "model-00002-of-00002.safetensors": BLOB[5000:]}
    files = {"config.json": b"{}", "model.safetensors.index.json": b'{"weight_map": {}}', **shards}
    make_hub_repo(hub, "org/sharded", files, extra={"model-00001-of-00002.bin": b"old"})
    folder = resolve_model("org/sharded")
    assert folder == str(cache_dir() / "models" / "org--sharded")
    assert sorted(os.listdir(folder)) == sorted(files)


def test_resolve_resumes_partial_build(hub, tmp_path):
    make_hub_repo(hub, "org/tiny", TINY)
    # an interrupted earlier run left half the weights behind in the build folder
    build = tmp_path / "models" / ".org--tiny.incomplete"
    build.mkdir(parents=True)
    (build / "model.safetensors.part").write_bytes(BLOB[:4096])
    folder = resolve_model("org/tiny", cache=tmp_path)
    assert (Path(folder) / "model.safetensors").read_bytes() == BLOB
    assert ("/org/tiny/resolve/main/model.safetensors", "bytes=4096-") in hub.requests


def test_resolve_sha_mismatch(hub, tmp_path):
    make_hub_repo(hub, "org/bad", TINY, bad_sha={"model.safetensors"})
    with pytest.raises(DownloadError) as e:
        resolve_model("org/bad", cache=tmp_path)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and "model.safetensors" in msg and msg.endswith(HINT)
    assert not (tmp_path / "models" / "org--bad").exists()


def test_resolve_unknown_repo_404(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404.*--model PATH"):
        resolve_model("org/missing", cache=tmp_path)


def test_resolve_repo_without_weights(hub, tmp_path):
    make_hub_repo(hub, "org/noweights", {"config.json": b"{}"}, extra={"pytorch_model.bin": b"x"})
    with pytest.raises(DownloadError, match="no config.json \\+ safetensors weights"):
        resolve_model("org/noweights", cache=tmp_path)


def test_resolve_offline(monkeypatch, tmp_path):
    endpoint = closed_port_url("")
    monkeypatch.setenv("MEMGEN_HF_ENDPOINT", endpoint)
    with pytest.raises(DownloadError) as e:
        resolve_model("org/tiny", cache=tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"could not reach {endpoint}/api/models/org/tiny/revision/main?blobs=true (")
    assert msg.endswith(HINT) and "\n" not in msg
