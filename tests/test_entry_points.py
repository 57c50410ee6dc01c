"""The entry points as a new user meets them: `--help` / `-h` lists every setting with a comment, the same
setting has the same name everywhere, and the layout stays library modules below, scripts on top."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import settings

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_weaver.py", "train_trigger.py", "eval.py", "bench.py", "ablate.py", "show.py", "build_memory.py")


def script_settings(name):
    """The settings a script declares, read from its source without running it."""
    scope = {}
    for node in ast.parse((ROOT / name).read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                scope[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # computed from a module (K = memgen.K): a setting all the same; a table is not
                if not isinstance(node.value, (ast.Dict, ast.List, ast.Tuple, ast.Set)):
                    scope[node.targets[0].id] = 0
    return settings.defaults(scope)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_0_and_lists_every_setting_with_a_comment(name):
    listed = {}
    for flag in ("--help", "-h"):
        r = subprocess.run([sys.executable, str(ROOT / name), flag], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: python {name}")
        lines = [x.strip() for x in r.stdout.splitlines() if x.startswith("  --")]
        listed = {x.split("=", 1)[0][2:]: x.split("  ", 1)[1].strip() if "  " in x else "" for x in lines}
    assert set(listed) == set(script_settings(name))
    assert [k for k, comment in listed.items() if not comment] == []


def test_the_same_setting_has_the_same_name_in_every_entry_point():
    every = {"model", "data", "dtype", "device", "seed"}
    for name in SCRIPTS:
        assert every <= set(script_settings(name)), name
    for name in ("train_weaver.py", "train_trigger.py", "eval.py", "bench.py", "ablate.py"):
        assert {"batch_size", "max_new_tokens"} <= set(script_settings(name)), name
    for name in ("train_weaver.py", "train_trigger.py", "eval.py"):
        assert {"out_dir", "adapter", "limit", "allow_other_base"} <= set(script_settings(name)), name
    assert "trigger_mode" in script_settings("eval.py") and "trigger_mode" in script_settings("train_weaver.py")


def imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_an_entry_point_or_the_tests_and_model_imports_no_data():
    scripts = {Path(s).stem for s in SCRIPTS}
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "data").glob("*.py")):
        found = imports(path) & (scripts | {"tests", "conftest"})
        assert found <= {path.stem}, f"{path.name} imports {found - {path.stem}}"
    assert "data" not in imports(ROOT / "model.py")
