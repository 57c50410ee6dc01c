"""The evidence files stay portable and the documentation's links hold: no absolute machine path in README.md or
any text file under docs/ (a path of the machine a run happened on means nothing on a clone), and every relative
link or image in the markdown names a file that exists, with its #anchor a heading there."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".md", ".json", ".jsonl", ".txt", ".csv", ".html")
# a POSIX path from the root with at least two parts (/home/x/..., /work/runs/...), not the middle of a URL, a
# ratio (1/100), a unit (tok/s), a relative path (docs/x.md) or a home-relative one (~/.cache); or a Windows drive
ABSOLUTE = re.compile(r"(?<![\w.~:/\\\-\]\)])/(?:[\w.-]+/)+[\w.-]*|\b[A-Za-z]:\\\\?[\w.-]+")
PLACEHOLDERS = ("/path/to/",)  # documentation's own examples of "a path of yours"


def absolute_paths(text):
    return [m.group(0) for m in ABSOLUTE.finditer(text) if not m.group(0).startswith(PLACEHOLDERS)]


def doc_files():
    files = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*") if p.suffix in TEXT)
    assert len(files) > 5  # the scan sees the docs
    return files


def test_the_detector_tells_machine_paths_from_everything_else():
    assert absolute_paths('"model": "/work/models/qwen", "out": "/home/me/runs/x"') == ["/work/models/qwen",
                                                                                       "/home/me/runs/x"]
    assert absolute_paths(r'"C:\\Users\\me"') == [r"C:\\Users"]
    fine = ("26/100, 24.9 tok/s, https://github.com/openai/human-eval/blob/x, docs/ablate-core/x.png, ~/.cache/memgen, "
            "`--model=/path/to/folder`, in / out, (a/b), runs/memgen/final, `--lr=1e-4`")
    assert absolute_paths(fine) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_absolute_machine_paths(path):
    found = absolute_paths(path.read_text(encoding="utf-8", errors="replace"))
    assert found == [], f"{path.relative_to(ROOT)} holds absolute paths {found[:5]}: make them relative to the " \
                        "repository or to the run folder"


def slug(heading):
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md):
    return {slug(h) for h in re.findall(r"^#+ (.+)$", strip_code(md), re.M)}


def strip_code(md):
    md = re.sub(r"^```.*?^```", "", md, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", md)


def test_the_slug_is_githubs():
    assert slug("Cross-domain pass@1 on Qwen2.5-Coder-0.5B") == "cross-domain-pass1-on-qwen25-coder-05b"
    assert slug("K: latents per insertion") == "k-latents-per-insertion"


@pytest.mark.parametrize("path", [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    text = path.read_text(encoding="utf-8")
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", strip_code(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no heading with that anchor")
    assert bad == [], f"{path.relative_to(ROOT)}: {bad}"
