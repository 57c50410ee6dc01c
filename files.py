"""
files.py: writing files that a kill cannot leave half-written - the text goes to a temp file beside the target,
which is then renamed over it, so a reader sees the old file or the new one, never a mix. Every script's JSON,
markdown and HTML outputs go through here.
"""
import json
import os


def write_atomic(path, data):
    """Write str (UTF-8) or bytes to path through a temp file, fsync and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    """obj as indented JSON (non-ASCII kept as is), atomically."""
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
