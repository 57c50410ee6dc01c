"""data/download.py: resumable, checksummed downloads and Hugging Face model fetches.

Only the standard library's urllib is used (plus tqdm for the progress bar), so
the same code handles https://, http:// and file:// URLs and needs no hub client.

    download(url, dest, sha256=None, size=None)   -> dest (str)
    resolve_model("Qwen/Qwen2.5-1.5B-Instruct")   -> local model folder (str)
"""

import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

# -----------------------------------------------------------------------------
DEFAULT_CACHE = "~/.cache/memgen"
HF_ENDPOINT = "https://huggingface.co"
CHUNK_BYTES = 1 << 20          # read/write/hash granularity
TIMEOUT_S = 60                 # per socket operation, not for the whole file
USER_AGENT = "memgen/0.1 (+urllib)"
# tqdm's disable=None hides the bar when stderr is not a terminal (log files stay clean)
PROGRESS_DISABLE = None
# the files a model folder needs; everything else in a hub repo (READMEs, .bin/.pt
# duplicates of the weights, onnx exports, ...) is skipped
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors",
    "model.safetensors.index.json",
)
SHARD_RE = re.compile(r"model-\d+-of-\d+\.safetensors")
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
LOCAL_HINT = "pass --model PATH to a local Hugging Face model folder"


class DownloadError(RuntimeError):
    """A download failed; the message is one line saying which URL/file and why."""


def cache_dir():
    """Root of everything memgen downloads: $MEMGEN_CACHE, else ~/.cache/memgen."""
    return Path(os.path.expanduser(os.environ.get("MEMGEN_CACHE") or DEFAULT_CACHE))


def _one_line(x):
    # error reasons from the OS/urllib occasionally span lines; we promise one line
    return " ".join(str(x).split())


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _is_good(path, sha256, size):
    """True when `path` exists and matches whichever of sha256/size were given."""
    if not os.path.isfile(path):
        return False
    if size is not None and os.path.getsize(path) != size:
        return False
    return sha256 is None or _sha256_file(path) == sha256.lower()


def _open(url, offset):
    """urlopen with an optional Range header; every failure becomes a DownloadError."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:  # must come before URLError (it is a subclass)
        e.close()
        if e.code == 416 and offset:
            return None  # our .part is already >= the file: caller starts over
        raise DownloadError(f"could not download {url}: HTTP {e.code} {_one_line(e.reason)}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"could not reach {url} ({_one_line(e.reason)})") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise DownloadError(f"could not reach {url} ({_one_line(e) or type(e).__name__})") from None


def _connect(url, offset):
    """Open url asking for bytes from `offset` on; returns (response, offset actually served)."""
    if offset and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        offset = 0  # only HTTP knows Range; a local file is cheap to re-read
    resp = _open(url, offset)
    if resp is None:  # 416: our .part is not a prefix of this file, start over
        return _open(url, 0), 0
    if offset:
        status = getattr(resp, "status", None)
        if status == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            return resp, offset
        if status == 206:  # a partial answer for some other range: ask for the whole file
            resp.close()
            return _open(url, 0), 0
        offset = 0  # plain 200: the server ignored Range and sends everything
    return resp, offset


def _stream(resp, url, part, offset, size, name):
    """Write resp's body to `part` (appending after `offset` bytes); return the sha256 of all of it."""
    length = resp.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else size
    if size is not None and total is not None and total != size:
        raise DownloadError(f"{url} has {total} bytes but {size} were expected")
    h = hashlib.sha256()
    try:
        f = open(part, "r+b" if offset else "wb")
    except OSError as e:
        raise DownloadError(f"cannot write {part} ({_one_line(e.strerror or e)})") from None
    got = 0
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=name, disable=PROGRESS_DISABLE, leave=False)
    with f, bar:
        # when resuming, the bytes already on disk go into the hash first
        while got < offset and (block := f.read(min(CHUNK_BYTES, offset - got))):
            h.update(block)
            got += len(block)
        f.seek(offset)
        f.truncate()
        try:
            while block := resp.read(CHUNK_BYTES):
                f.write(block)
                h.update(block)
                got += len(block)
                bar.update(len(block))
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
            raise DownloadError(f"download of {url} broke off after {got} bytes "
                                f"({_one_line(e) or type(e).__name__}); rerun to resume") from None
    # http.client does not raise when the server hangs up early, so count ourselves
    if total is not None and got < total:
        raise DownloadError(f"download of {url} is truncated: got {got} of {total} bytes; rerun to resume")
    return h.hexdigest()


def download(url, dest, sha256=None, size=None, desc=None):
    """Fetch `url` into `dest` (resuming a leftover `dest.part`), verify, and return dest.

    sha256/size are optional checks. If `dest` already exists and passes them the
    network is not touched. A failed checksum deletes the .part (it is garbage);
    a broken or truncated transfer keeps it so that a rerun resumes.
    """
    dest = str(dest)
    if _is_good(dest, sha256, size):
        return dest
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the folder for {dest} ({_one_line(e.strerror or e)})") from None
    part = dest + ".part"

    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    if size is not None and offset > size:
        offset = 0  # .part is longer than the real file: it is not ours
    if size is not None and offset == size:
        actual = _sha256_file(part)  # every byte is already here, only the checks remain
    else:
        resp, offset = _connect(url, offset)
        with resp:
            actual = _stream(resp, url, part, offset, size, desc or os.path.basename(dest))

    got = os.path.getsize(part)
    if size is not None and got != size:
        if got > size:
            os.remove(part)
        raise DownloadError(f"{dest}: got {got} bytes but {size} were expected")
    if sha256 is not None and actual != sha256.lower():
        os.remove(part)  # corrupt: a retry must start clean
        raise DownloadError(f"sha256 mismatch for {dest} (from {url}): expected {sha256.lower()}, got {actual}")
    os.replace(part, dest)
    return dest


# -----------------------------------------------------------------------------
# Hugging Face hub

def _wanted(filename):
    return filename in MODEL_FILES or SHARD_RE.fullmatch(filename) is not None


def _list_repo(endpoint, repo):
    """The repo's files as (name, size|None, sha256|None) from the hub's model-info JSON."""
    # ?blobs=true makes the hub include sizes and LFS sha256s in `siblings`
    url = f"{endpoint}/api/models/{repo}/revision/main?blobs=true"
    resp = _open(url, 0)
    try:
        with resp:
            info = json.loads(resp.read().decode("utf-8"))
        siblings = info["siblings"]
        files = []
        for s in siblings:
            lfs = s.get("lfs") or {}
            files.append((s["rfilename"], lfs.get("size", s.get("size")), lfs.get("sha256")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, http.client.HTTPException) as e:
        raise DownloadError(f"unexpected file listing from {url} ({_one_line(e) or type(e).__name__})") from None
    return files


def resolve_model(name_or_path, cache=None):
    """Return a local folder holding the model: the path itself, or a cached hub download.

    `name_or_path` is either an existing folder, or a hub id "org/name" which is
    downloaded once into <cache>/models/org--name/ (cache defaults to cache_dir()).
    """
    name = os.path.expanduser(str(name_or_path))
    if os.path.isdir(name):
        return name
    # a name that looks like a local path is a missing folder, never a hub id (no network call): one that starts
    # with ".", "/" or "~", has more than one "/" (REPO_RE refuses those), or whose first part exists here
    if not REPO_RE.fullmatch(name) or os.path.exists(name.split("/")[0]):
        raise DownloadError(f"model folder {name!r} does not exist; pass --model PATH to a local "
                            "Hugging Face model folder or a hub id like org/name")
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / "models" / name.replace("/", "--")
    if folder.is_dir():
        return str(folder)
    # assemble in a fixed side folder so that an interrupted run leaves .part files to resume
    build = root / "models" / f".{folder.name}.incomplete"
    endpoint = (os.environ.get("MEMGEN_HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    try:
        files = [f for f in _list_repo(endpoint, name) if _wanted(f[0])]
        names = {f[0] for f in files}
        if "config.json" not in names or not names & {"model.safetensors", "model.safetensors.index.json"}:
            raise DownloadError(f"hub repo {name} at {endpoint} has no config.json + safetensors weights")
        for fname, size, sha in files:
            url = f"{endpoint}/{name}/resolve/main/{urllib.parse.quote(fname)}"
            download(url, build / fname, sha256=sha, size=size, desc=fname)
    except DownloadError as e:
        raise DownloadError(f"{e}; {LOCAL_HINT}") from None
    if folder.is_dir():  # another process finished first: keep theirs
        shutil.rmtree(build, ignore_errors=True)
    else:
        os.replace(build, folder)
    return str(folder)
