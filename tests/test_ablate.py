"""ablate.py: the quick grid runs end to end, resumes without redoing work, and its variants differ as named."""
import json
import os

import pytest

import ablate


def lines(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_quick_grid_runs_every_variant_and_writes_table_and_plots(tmp_path):
    out = str(tmp_path / "grid")
    res = ablate.main(["--quick=true", f"--out_dir={out}", "--progress=false"])
    rows = lines(out)
    final = {r["variant"]: r for r in rows if r["final"]}
    assert list(final) == list(ablate.VARIANTS)  # every variant finished, in grid order
    steps = {r["variant"]: sorted(x["step"] for x in rows if x["variant"] == r["variant"]) for r in rows}
    assert steps["vanilla"] == [0] and steps["memgen"] == [0, 2, 4]
    ins = {k: v["insertions"] for k, v in final.items()}
    # the synthetic targets have 3 sentence ends (", " "." and a newline) before the answer
    assert ins["vanilla"] == ins["sft-lora"] == ins["memgen-n0"] == 0
    assert ins["memgen-n1"] == 1 and ins["memgen"] == ins["memgen-n5"] == 3 and 0 < ins["memgen-trigger-random"] < 3
    t = {k: v["trainable"] for k, v in final.items()}
    assert t["vanilla"] == 0 and t["memgen-k2"] < t["memgen"] < t["memgen-k16"] and t["sft-lora"] > 0
    # training moved the in-domain NLL of every trained variant, and nothing moved vanilla's
    first = {r["variant"]: r["in_nll"] for r in rows if r["step"] == 0}
    assert all(final[k]["in_nll"] != first[k] for k in final if ablate.variant(k)["method"] != "none")
    saved = sorted(os.listdir(os.path.join(out, "adapters")))
    assert saved == sorted(k for k in ablate.VARIANTS if ablate.variant(k)["method"] != "none")
    assert sorted(os.listdir(os.path.join(out, "adapters", "memgen"))) == ["weaver.json", "weaver.safetensors"]
    md = open(os.path.join(out, "results.md")).read()
    assert md.count("\n| ") == len(ablate.VARIANTS) + 1 and "| memgen-init-small | " in md
    pytest.importorskip("matplotlib")
    assert sorted(os.path.basename(p) for p in res["plots"]) == ["in_vs_ood.png", "nll_vs_step.png"]
    assert all(os.path.getsize(p) > 5000 for p in res["plots"])


def same_numbers(got, want):
    for a, b in zip(got, want):
        assert a["in_nll"] == pytest.approx(b["in_nll"], abs=1e-5) and a["ood_nll"] == pytest.approx(b["ood_nll"], abs=1e-5)


def test_a_killed_grid_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    args = ["--quick=true", "--progress=false", "--plots=false", "--only=vanilla,memgen"]
    whole = str(tmp_path / "whole")
    ablate.main(args + [f"--out_dir={whole}"])
    out = str(tmp_path / "killed")
    append = ablate.append

    def append_then_die(path, row):  # killed right after memgen's step-2 eval point was written
        append(path, row)
        if row["variant"] == "memgen" and row["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        ablate.main(args + [f"--out_dir={out}"])
    monkeypatch.setattr(ablate, "append", append)
    capsys.readouterr()
    ablate.main(args + [f"--out_dir={out}"])
    err = capsys.readouterr().err
    assert "vanilla: finished earlier, skipped" in err and "memgen step 0" not in err and "memgen step 2" not in err
    got, want = lines(out), lines(whole)
    assert [(r["variant"], r["step"]) for r in got] == [(r["variant"], r["step"]) for r in want]
    same_numbers(got, want)  # the same training, resumed


def test_a_run_killed_between_eval_points_resumes_from_its_last_saved_step(tmp_path, capsys, monkeypatch):
    args = ["--quick=true", "--progress=false", "--plots=false", "--only=memgen"]
    whole = str(tmp_path / "whole")
    ablate.main(args + [f"--out_dir={whole}"])
    out = str(tmp_path / "killed")
    save, saved = ablate.save_state, []

    def save_then_die(path, step, *rest):  # the quick grid measures at steps 0, 2, 4 and saves every step
        save(path, step, *rest)
        saved.append(step)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ablate.main(args + [f"--out_dir={out}"])
    assert saved == [1, 2, 3]
    saved.clear()
    ablate.main(args + [f"--out_dir={out}"])
    assert saved == [4]  # steps 1-3 were not trained again
    got, want = lines(out), lines(whole)
    assert [(r["variant"], r["step"]) for r in got] == [(r["variant"], r["step"]) for r in want]
    same_numbers(got, want)  # resumed mid-way between eval points


def test_bad_settings_get_one_line(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--quick=true", "--only=memgen-k3"])
    assert "unknown variant 'memgen-k3' in --only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.main([])
    assert "--model is required" in capsys.readouterr().err


def test_a_variant_still_at_its_first_point_is_not_drawn_as_a_baseline(tmp_path, monkeypatch):
    """Only an untrained variant (a single, final point) is a dashed level; one paused at step 0 is a point."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    levels = []
    real = matplotlib.axes.Axes.axhline
    def axhline(self, y=0, *a, **kw):
        levels.append(kw.get("label"))
        return real(self, y, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    rows = [dict(variant="vanilla", step=0, in_nll=1.4, ood_nll=1.1, final=True),
            dict(variant="memgen", step=0, in_nll=1.7, ood_nll=1.8, final=False)]
    ablate.plot(str(tmp_path), rows, ["vanilla", "memgen"])
    assert levels == ["vanilla"]


def test_without_matplotlib_the_plots_are_skipped_with_one_message_and_no_files(tmp_path, monkeypatch, capsys):
    """Plots are a dev-only extra: every plotting site goes through files.pyplot, which says what to install."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    rows = [dict(variant="vanilla", step=0, in_nll=1.4, ood_nll=1.1, final=True)]
    assert ablate.plot(str(tmp_path), rows, ["vanilla"]) == []
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "requirements-dev.txt" in err
    assert os.listdir(tmp_path) == []


def test_seeds_run_one_grid_each_and_report_mean_spread_and_paired_differences(tmp_path, capsys):
    out = str(tmp_path / "g")
    args = ["--quick=true", f"--out_dir={out}", "--progress=false", "--only=vanilla,memgen,memgen-n0", "--seeds=3,5"]
    res = ablate.main(args)
    finals = {}
    for s in (3, 5):
        rows = lines(os.path.join(out, f"seed-{s}"))
        finals[s] = {r["variant"]: r for r in rows if r["final"]}
        assert list(finals[s]) == ["vanilla", "memgen", "memgen-n0"]
    assert finals[3]["memgen"]["in_nll"] != finals[5]["memgen"]["in_nll"]  # the seed reaches the training
    report = json.load(open(os.path.join(out, "seeds.json")))
    assert report["seeds"] == [3, 5]
    for name in ("vanilla", "memgen", "memgen-n0"):
        for metric in ("in_nll", "ood_nll"):
            st = report["variants"][name][metric]
            xs = [finals[s][name][metric] for s in (3, 5)]
            assert st["values"] == {"3": xs[0], "5": xs[1]}
            assert st["mean"] == pytest.approx(sum(xs) / 2)
            assert st["sd"] == pytest.approx(abs(xs[0] - xs[1]) / 2 ** 0.5)
    pair = next(p for p in report["pairs"] if (p["a"], p["b"], p["metric"]) == ("memgen", "memgen-n0", "in_nll"))
    assert pair["diff"] == {str(s): pytest.approx(finals[s]["memgen"]["in_nll"] - finals[s]["memgen-n0"]["in_nll"])
                            for s in (3, 5)}
    md = open(os.path.join(out, "seeds.md")).read()
    assert "| memgen | in_nll | 2 |" in md and "| memgen | memgen-n0 | in_nll |" in md
    assert os.path.isfile(os.path.join(out, "seeds_in_vs_ood.png")) and res["report"][0].endswith("seeds.md")
    capsys.readouterr()
    ablate.main(args)  # everything finished: nothing is trained again, the report is the same
    assert capsys.readouterr().err.count("finished earlier, skipped") == 6
    assert json.load(open(os.path.join(out, "seeds.json"))) == report


def test_bad_seeds_get_one_line(capsys):
    for bad, said in (("42,x", "give whole numbers"), ("1,1", "names a seed twice")):
        with pytest.raises(SystemExit):
            ablate.main(["--quick=true", f"--seeds={bad}"])
        assert said in capsys.readouterr().err
