"""settings.py: the one settings mechanism of every entry point."""
import pytest

import settings
from settings import SettingsError

SCRIPT = '''"""demo.py: a demo script.

More text."""
LR = 1e-5  # the learning rate
# the number of steps
STEPS = 10
NAME = "x"  # a name
FLAG = True  # a switch
_INTERNAL = 3
TABLE = (1, 2)
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "demo.py"
    path.write_text(SCRIPT)
    scope = {"__file__": str(path)}
    exec(compile(SCRIPT, str(path), "exec"), scope)
    return scope


def test_defaults_are_the_upper_case_simple_constants_only(script):
    assert settings.defaults(script) == {"lr": 1e-5, "steps": 10, "name": "x", "flag": True}


def test_overrides_convert_to_the_default_type_and_dashes_alias_underscores(script):
    cfg, given = settings.parse(["--lr=3e-4", "--steps", "7", "--flag=off", "--name=a=b"], script)
    assert cfg == {"lr": 3e-4, "steps": 7, "name": "a=b", "flag": False} and given == {"lr", "steps", "flag", "name"}
    assert type(cfg["steps"]) is int
    script["MAX_LEN"] = 5
    assert settings.parse(["--max-len=6"], script)[0]["max_len"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--lr=abc"], r"--lr='abc': expected float"),
    (["--lr=nan"], r"--lr='nan': must be a finite number"),
    (["--lr=inf"], r"--lr='inf': must be a finite number"),
    (["--steps=2.5"], r"--steps='2.5': expected int"),
    (["--flag=maybe"], r"--flag='maybe': expected true or false"),
    (["--step=3"], r"unknown setting --step \(did you mean --steps\?\)"),
    (["--lr"], r"--lr needs a value"),
    (["lr=3"], r"unexpected argument 'lr=3'"),
    (["-x"], r"unexpected argument '-x'"),
])
def test_bad_flags_get_one_clear_error(script, argv, message):
    with pytest.raises(SettingsError, match=message):
        settings.parse(argv, script)


def test_config_file_then_flags(script, tmp_path):
    conf = tmp_path / "ablate.py"
    conf.write_text("STEPS = 20\nLR = 1\n")
    cfg, given = settings.parse([str(conf), "--steps=30"], script)
    assert cfg["steps"] == 30 and cfg["lr"] == 1.0 and type(cfg["lr"]) is float and given == {"steps", "lr"}
    conf.write_text("STEPZ = 1\n")
    with pytest.raises(SettingsError, match="STEPZ is not a setting"):
        settings.parse([str(conf)], script)
    conf.write_text("STEPS = 'many'\n")
    with pytest.raises(SettingsError, match=r"STEPS = 'many' should be a int"):
        settings.parse([str(conf)], script)
    conf.write_text("STEPS = 1/0\n")
    with pytest.raises(SettingsError, match="failed: ZeroDivisionError"):
        settings.parse([str(conf)], script)


def test_help_lists_each_setting_with_default_and_comment(script, capsys):
    with pytest.raises(SystemExit) as e:
        settings.parse(["--help"], script)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "demo.py: a demo script." in out and "More text" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert lines["--lr=1e-05"].endswith("the learning rate")
    assert lines["--steps=10"].endswith("the number of steps")  # a comment line above the constant counts too
    assert lines["--name='x'"].endswith("a name") and "--_internal=3" not in lines and len(lines) == 4


def test_checks_name_the_setting():
    cfg = {"method": "x", "batch_size": 0, "warmup": 1.0}
    with pytest.raises(SettingsError, match=r"unknown --method='x'; use one of a, b"):
        settings.one_of(cfg, "method", ("a", "b"))
    with pytest.raises(SettingsError, match=r"--batch_size must be >= 1, got 0"):
        settings.at_least(cfg, 1, "batch_size")
    with pytest.raises(SettingsError, match=r"--warmup must be in \[0, 1\), got 1.0"):
        settings.in_range(cfg, "warmup", 0, 1)
    with pytest.raises(SettingsError, match=r"--batch_size must be > 0, got 0"):
        settings.above(cfg, 0, "batch_size", "not_a_setting_here")
    settings.above(cfg, 0.5, "warmup")
