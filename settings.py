"""
settings.py: one way to set things, the same in every entry point (nanoGPT style).

The upper-case constants at the top of a script ARE its settings: each is a bool, int, float or str with a comment
on its line saying what it does. On the command line

    python train_weaver.py [config.py ...] [--key=value | --key value ...]

a Python file given first is executed and its upper-case assignments override the defaults (a saved ablation:
`K = 16`), then each --key=value overrides one setting. Keys are spelled with underscores; dashes are accepted as an
alias in every script (--max-steps = --max_steps). A value is converted to the type of the default and checked
(`--lr=abc`, `--lr=nan`, `--k=2.5` are refused with one line). `-h` / `--help` lists every setting with its default
and its comment read from the script's source, so --help is the documentation.

Scripts catch SettingsError (and their own ValueErrors) and print one line: `die(prog, message)`.
"""
import ast
import io
import math
import os
import sys
import tokenize

KINDS = (bool, int, float, str)
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A bad setting; the message names it and says what to do."""


def die(prog, msg):
    """The one-line error every script ends with; exit status 2 like argparse."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def defaults(script_globals):
    """{lower-case name: value} of a script's settings: its upper-case bool/int/float/str constants. Names starting
    with "_" are internal (not settings)."""
    return {k.lower(): v for k, v in script_globals.items()
            if k.isupper() and not k.startswith("_") and type(v) in KINDS}


def comments(path):
    """{lower-case name: comment} from a script's source: the comment on a constant's line, else the comment line(s)
    right above it."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError:
        return {}
    by_line, above = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (by_line if tok.line.strip() != tok.string.strip() else above)[tok.start[0]] = text
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            line = node.lineno
            text = by_line.get(node.end_lineno) or by_line.get(line) or above.get(line - 1, "")
            out[node.targets[0].id.lower()] = text
    return out


def convert(key, value, default):
    """The string `value` of setting `key` as the type of its default, or SettingsError."""
    kind = type(default)
    if kind is str:
        return value
    if kind is bool:
        if value.lower() in TRUE:
            return True
        if value.lower() in FALSE:
            return False
        raise SettingsError(f"--{key}={value!r}: expected true or false (like the default {default!r})")
    try:
        out = kind(value)
    except ValueError:
        raise SettingsError(f"--{key}={value!r}: expected {kind.__name__} (like the default {default!r})") from None
    if kind is float and not math.isfinite(out):
        raise SettingsError(f"--{key}={value!r}: must be a finite number")
    return out


def from_file(path, base):
    """The upper-case assignments of a config file, checked against the settings."""
    scope = {}
    try:
        with open(path, encoding="utf-8") as f:
            code = f.read()
        exec(compile(code, path, "exec"), scope)
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror or e}") from None
    except Exception as e:  # a config file is Python: report its error in one line
        raise SettingsError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    out = {}
    for name, value in scope.items():
        if not name.isupper() or name.startswith("_"):
            continue
        key = name.lower()
        if key not in base:
            raise SettingsError(f"{path}: {name} is not a setting of this script; see --help")
        if type(value) is int and type(base[key]) is float:
            value = float(value)
        if type(value) is not type(base[key]):
            raise SettingsError(f"{path}: {name} = {value!r} should be a {type(base[key]).__name__} "
                                f"(like the default {base[key]!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{path}: {name} must be a finite number")
        out[key] = value
    return out


def usage(prog, base, notes, doc):
    lines = [f"usage: python {prog} [config.py] [--key=value ...]", ""]
    if doc:
        lines += [doc.strip().split("\n\n")[0].strip(), ""]
    lines.append("settings (--key=default  what it does):")
    shown = {k: f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in base.items()}
    width = min(max(map(len, shown.values())), 40)
    for key, flag in shown.items():
        lines.append(f"  {flag:<{width}}  {notes.get(key, '')}".rstrip())
    return "\n".join(lines)


def parse(argv, script_globals, prog=None):
    """
    Settings of the script whose globals() are given, after a config file and --key=value overrides in argv.
    Returns (cfg, given): cfg maps lower-case names to values; given is the set of keys set on the command line or
    by a config file (a resumed run keeps its saved settings except these).
    """
    base = defaults(script_globals)
    path = script_globals.get("__file__", "")
    prog = prog or (path.rsplit("/", 1)[-1] if path else "script")
    cfg, given = dict(base), set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            try:
                print(usage(prog, base, comments(path), script_globals.get("__doc__")), flush=True)
            except BrokenPipeError:  # `--help | head`: the reader left early, which is fine
                sys.stdout = open(os.devnull, "w")
            raise SystemExit(0)
        if not arg.startswith("-"):
            if arg.endswith(".py") and not given:
                override = from_file(arg, base)
                cfg.update(override)
                given |= set(override)
                i += 1
                continue
            raise SettingsError(f"unexpected argument {arg!r}: settings are given as --key=value "
                                "(a config file, if any, comes first); see --help")
        if not arg.startswith("--") or len(arg) < 3:
            raise SettingsError(f"unexpected argument {arg!r}: settings are given as --key=value; see --help")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:
            raise SettingsError(f"--{arg[2:]} needs a value: --{arg[2:]}=VALUE")
        key = key.replace("-", "_")
        if key not in base:
            close = [k for k in base if key in k or k in key]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise SettingsError(f"unknown setting --{key}{hint}; see --help for the list")
        cfg[key] = convert(key, value, base[key])
        given.add(key)
    return cfg, given


# ---------------------------------------------------------------------------------------------------------------
# checks shared by the scripts: each raises SettingsError naming the setting


def one_of(cfg, key, options):
    if cfg[key] not in options:
        raise SettingsError(f"unknown --{key}={cfg[key]!r}; use one of {', '.join(map(str, options))}")


def at_least(cfg, low, *keys):
    for key in keys:
        if key in cfg and cfg[key] < low:
            raise SettingsError(f"--{key} must be >= {low}, got {cfg[key]}")


def in_range(cfg, key, low, high, what=""):
    """low <= value < high."""
    if not low <= cfg[key] < high:
        raise SettingsError(f"--{key} must be in [{low}, {high}){what}, got {cfg[key]}")


def above(cfg, low, *keys):
    """value > low, for each key present."""
    for key in keys:
        if key in cfg and not cfg[key] > low:
            raise SettingsError(f"--{key} must be > {low}, got {cfg[key]}")
