"""
ScienceWorld smoke tests: the task module's environment against the real simulator (a gold trajectory reaches
score 100), and a few turns of one episode of a tiny random model through agent.py. They need the scienceworld
package and a Java runtime (docs/agent.md), and skip with that reason where either is missing.
"""
import importlib.util
import shutil

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("scienceworld") is None,
                       reason="the scienceworld package is not installed (pip install scienceworld; docs/agent.md)"),
    pytest.mark.skipif(shutil.which("java") is None,
                       reason="no Java runtime on PATH (ScienceWorld runs on Java 17; docs/agent.md)"),
]

ROW = {"id": "find-living-thing-0", "task": "find-living-thing", "variation": 0}


@pytest.fixture(scope="module")
def env():
    from data import scienceworld

    e = scienceworld.make_env()
    yield e
    e.close()


def test_gold_trajectory_completes_the_task(env, tmp_path, monkeypatch):
    from data import scienceworld

    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path))
    g = scienceworld.gold(ROW, env)
    assert g["score"] == 100 and len(g["turns"]) > 3
    assert "living thing" in g["question"] and g["observation"].startswith("This room is called")
    assert scienceworld.gold(ROW, None) == g  # the second time from the cache, no simulator needed
    question, observation, score = env.reset(ROW)  # reset starts the same episode again
    assert (question, observation, score) == (g["question"], g["observation"], 0)
    assert env.step("xyzzy")[0] == "No known action matches that input."


def test_one_episode_of_a_tiny_random_model(env, tmp_path):
    import agent
    from conftest import build_model_folder
    from data import scienceworld
    from model import load_model
    from tokenizer import load_tokenizer

    path = str(tmp_path / "tiny")
    build_model_folder(path, max_position_embeddings=4096)  # the tiny vocabulary spends a token per character or so
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    eps = agent.run_episodes(model, tok, "vanilla", [env], [ROW], scienceworld.messages, max_turns=3, turn_tokens=8,
                             max_context=4096, parse=lambda text: "look around")
    ep = eps[0]
    assert ep["end"] == "turn_limit" and len(ep["turns"]) == 3
    assert all(t["observation"].startswith("This room is called") for t in ep["turns"])  # the simulator answered
    assert "living thing" in ep["question"] and ep["score"] == 0 and not ep["success"]
    assert sum(ep["agent"]) == sum(t["tokens"] for t in ep["turns"]) <= 3 * 8


def test_close_waits_for_the_java_process():
    """The package's __del__ closes again; while Java is still exiting that write hits a closed pipe and prints a
    BrokenPipeError traceback mid-run (seen in an eval), so close() returns only once the process has exited."""
    from data import scienceworld

    e = scienceworld.make_env()
    java = e.env._gateway.java_process
    e.close()
    assert java.poll() is not None
    e.close()  # twice is harmless


def test_rows_go_round_robin_over_the_named_task_types(tmp_path, monkeypatch):
    import json

    from data import get_task, scienceworld

    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path))
    names = scienceworld.task_names()
    assert len(names) == 30 and "boil" in names
    cache = scienceworld._cache()
    cache.mkdir(parents=True)
    (cache / "variations.json").write_text(json.dumps(  # the simulator's split lists, made up here
        {t: {"train": [0, 1], "dev": [2], "test": [5, 6, 7] if t == "boil" else [8]} for t in names}))
    rows = get_task("scienceworld:boil+melt").load("test")
    assert [r["id"] for r in rows] == ["boil-5", "melt-8", "boil-6", "boil-7"]
    assert len(get_task("scienceworld").load("test")) == 29 + 3
    with pytest.raises(Exception, match="unknown ScienceWorld task freez;"):
        get_task("scienceworld:boil+freez")
