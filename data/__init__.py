"""data: the task registry. A task is one module under data/ with this interface:

    NAME = "humaneval"
    load(split, path=None) -> [row]   split in ("train", "val", "test"); each row a dict with at least "id",
                                      "answer" (what grade needs) and "target" (the SFT completion, or None);
                                      path: a local file in the task's format; a split the task lacks -> DataError
    messages(row) -> [{"role": "user", "content": ...}]   the chat (one ChatML user turn, no system message)
    grade(row, completion) -> bool    never raises on a bad completion: anything unparsable is wrong
    grade_many(rows, completions, workers=2) -> [bool]    optional, for graders worth running in parallel

A multi-turn task (data/scienceworld.py) also has AGENT = True and make_env(): eval.py runs its rows as episodes
(agent.py); get_task("NAME:OPTIONS") hands OPTIONS to such a module's select() instead of reading a file.

Adding a task is adding one file, data/NAME.py: get_task("NAME") imports any such module, and a line in TASKS
(or FORMATS) lists it in error messages. Modules are imported only when asked for.

    get_task("gsm8k")                  the module
    get_task("choice:path/file.jsonl") the same functions, with load() reading that file (any NAME:PATH)
    get_task("path/file.jsonl")        the same as "qa:path/file.jsonl"
"""

import functools
import importlib
import os
import types

from data.gsm8k import DataError

# name -> module; TASKS bring their own data, FORMATS read a local jsonl named as FORMAT:PATH
TASKS = {"gsm8k": "data.gsm8k", "humaneval": "data.humaneval", "scienceworld": "data.scienceworld"}
FORMATS = {"qa": "data.qa", "choice": "data.choice", "fever": "data.fever"}
INTERFACE = ("NAME", "load", "messages", "grade")


def _choices():
    return ", ".join([*TASKS, *(f"{name}:FILE.jsonl" for name in FORMATS), "FILE.jsonl (= qa:FILE.jsonl)"])


def _module(name):
    """Import the task module for `name` (registered, or any data/NAME.py with the interface)."""
    module_name = TASKS.get(name) or FORMATS.get(name) or f"data.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the task exists but one of its own imports is missing: show that error as it is
        raise DataError(f"unknown task {name!r}; use one of: {_choices()}") from None
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    if missing:
        raise DataError(f"{module_name} is not a task module: it lacks {', '.join(missing)} (see data/__init__.py); "
                        f"use one of: {_choices()}")
    return module


def get_task(spec):
    """The task named by `spec`: "NAME", "NAME:PATH" (a local file in that task's format), or "PATH.jsonl"."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"a task must be a name or FORMAT:PATH, got {spec!r}; use one of: {_choices()}")
    name, sep, path = spec.partition(":")
    if sep and name.isidentifier():
        module = _module(name)
        if hasattr(module, "select"):  # a task that takes options after its name, e.g. scienceworld:boil+melt
            return module.select(path)
        return _reading(module, path, spec)
    if spec.endswith(".jsonl"):  # a bare path is the question/answer format, as before tasks were plug-ins
        return _reading(_module("qa"), spec, spec)
    if spec in FORMATS:
        raise DataError(f"the {spec} format reads a local file: use {spec}:path/to/file.jsonl")
    if not spec.isidentifier():
        raise DataError(f"unknown task {spec!r}; use one of: {_choices()}")
    return _module(spec)


def _reading(module, path, spec):
    """The task's functions, with load() reading the local file `path`."""
    if not os.path.isfile(path):
        raise DataError(f"task file {path} (from {spec!r}) does not exist")
    task = types.SimpleNamespace(**{attr: getattr(module, attr)
                                    for attr in (*INTERFACE, "grade_many") if hasattr(module, attr)})
    task.load = functools.partial(module.load, path=path)
    task.path = path
    return task


def grade_all(task, rows, completions, workers=2):
    """[grade(row, completion)] for a task; through its grade_many (in parallel) when it has one."""
    if len(rows) != len(completions):
        raise DataError(f"grade_all got {len(rows)} rows but {len(completions)} completions")
    if hasattr(task, "grade_many"):
        return task.grade_many(rows, completions, workers=workers)
    return [task.grade(row, completion) for row, completion in zip(rows, completions)]
