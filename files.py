"""
files.py: writing files that a kill cannot leave half-written - the text goes to a temp file beside the target,
which is then renamed over it, so a reader sees the old file or the new one, never a mix. Every script's JSON,
markdown, HTML and PNG outputs go through here.
"""
import json
import os
import sys


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


def pyplot(prog):
    """matplotlib.pyplot on its file-only backend, or None with a one-line message when matplotlib is not installed:
    plots are optional (a dev dependency), so this is the only place that imports it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{prog}: matplotlib is not installed, so no plots (pip install -r requirements-dev.txt)", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path, dpi=110):
    """A matplotlib figure as PNG at path, atomically; the figure is closed. Returns path."""
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp"
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
