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
    question, observation = env.reset(ROW)  # reset starts the same episode again
    assert (question, observation) == (g["question"], g["observation"])
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
