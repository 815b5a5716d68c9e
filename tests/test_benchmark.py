"""The benchmark: a run folder that resumes and never serves a stale result, hyperparameters chosen on
validation only, a user's own stream, model and method run through `mmer-cl run` without editing the library,
and a tiny end-to-end run on the real data and backbone."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mmer_cl import cli
from mmer_cl.bench import loop, methods, registry, tables
from mmer_cl.bench.profiles import PROFILES
from mmer_cl.bench.runfolder import Run

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits_stream.py"
TINY = replace(PROFILES["quick"], name="tiny", steps=10, batch_size=8, train_per_task=40, alphas=(1.0,), lams=(1.0,),
               ta_alphas=(1.0,), tall_lams=(0.4,), energies=(0.5,))


class Stream:
    name, fingerprint = "modality", "f"


def test_a_result_is_reused_only_while_its_key_matches_and_an_interrupted_one_leaves_nothing(tmp_path):
    run = Run(PROFILES["quick"], 0, tmp_path, progress=False)
    calls = []

    def finished():
        calls.append("finished")
        return {"matrix": [[0.5]]}

    def interrupted():
        calls.append("interrupted")
        raise KeyboardInterrupt

    first = run.cached(Stream, "ties", finished)
    assert first["matrix"] == [[0.5]] and first["seconds"] >= 0 and first["peak_rss_mb"] > 0
    with pytest.raises(KeyboardInterrupt):
        run.cached(Stream, "tall", interrupted)
    assert not list(tmp_path.rglob("tall.json")) and not list(tmp_path.rglob("*.tmp"))
    assert Run(PROFILES["quick"], 0, tmp_path).cached(Stream, "ties", finished) == first  # resumed, not recomputed
    assert calls == ["finished", "interrupted"]
    changed = Run(replace(PROFILES["quick"], steps=5), 0, tmp_path)  # same name, other values: another folder
    assert changed.dir != run.dir
    described = Run(replace(PROFILES["quick"], cost="another description", seeds=(0, 1)), 0, tmp_path)
    assert described.cached(Stream, "ties", finished) == first  # what does not decide a result keeps it
    changed_stream = type("Changed", (), {"name": "modality", "fingerprint": "g"})
    run.cached(changed_stream, "ties", finished)  # the stream's definition changed: computed again
    assert calls == ["finished", "interrupted", "finished"]


def test_a_user_stream_model_and_method_run_from_the_command_line(tmp_path, capsys):
    """examples/digits_stream.py registers a stream of its own data and model and a merge method; every method
    that applies runs on it, and the run ends by printing its summary."""
    out = tmp_path / "results"
    code = cli.main(["run", "--stream", f"{EXAMPLE}:digits", "--profile", "quick", "--out", str(out), "--cache",
                     str(tmp_path / "cache"), "--methods", "individual,mmer_compact,ties,naive,average"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "digits:" in printed and "average" in printed and "mmer_compact" in printed
    summary = (out / "digits_summary.csv").read_text()
    assert summary.startswith("# command:") and "average" in summary
    assert (out / "SUMMARY.md").exists() and (out / "digits_accuracy_matrices.png").stat().st_size > 0


def test_the_choice_reads_validation_and_never_test(tmp_path, monkeypatch):
    """Replacing every test set by another leaves the chosen settings unchanged; replacing the validation sets
    moves the scores the choice is made on."""
    registry.resolve_stream(f"{EXAMPLE}:digits")
    data = registry.STREAMS[f"{EXAMPLE}:digits"](TINY, 0).check()
    data.fingerprint = "x"
    run = Run(TINY, 0, tmp_path / "a", progress=False)
    state = methods.experts_folder(run, data) / "state"
    axes = methods.grid(alpha=(0.5, 1.0, 2.0))
    settings = dict(merge="ties", mask_rule="none", mode="exact")
    first = methods.choose(run, data, "ties", state, settings, axes)
    other = replace(data, test={n: data.val[n] for n in data.test})  # any other test split
    again = methods.choose(Run(TINY, 0, tmp_path / "b"), other, "ties", methods.experts_folder(Run(TINY, 0, tmp_path / "b"), other) / "state", settings, axes)
    assert [p["val_acc"] for p in again["grid"]] == [p["val_acc"] for p in first["grid"]]
    assert again["choice"] == first["choice"]
    swapped = replace(data, val={n: data.test[n] for n in data.val})
    moved = methods.choose(Run(TINY, 0, tmp_path / "c"), swapped, "ties", methods.experts_folder(Run(TINY, 0, tmp_path / "c"), swapped) / "state", settings, axes)
    assert [p["val_acc"] for p in moved["grid"]] != [p["val_acc"] for p in first["grid"]]


def test_a_stream_that_returns_the_wrong_thing_fails_before_training(tmp_path):
    registry.resolve_stream(f"{EXAMPLE}:digits")
    data = registry.STREAMS[f"{EXAMPLE}:digits"](TINY, 0)
    import torch

    data.train["digits_01"] = torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="task 'digits_01', train split: a TensorDataset without .targets"):
        data.check()
    data.train["digits_01"] = registry.STREAMS[f"{EXAMPLE}:digits"](TINY, 0).train["digits_23"]
    data.specs[0] = replace(data.specs[0], input_shape=(1, 7, 7))
    with pytest.raises(ValueError, match=r"task 'digits_01', train split: inputs of shape \(1, 8, 8\)"):
        data.check()


def test_unknown_names_are_one_line_errors(capsys):
    assert cli.main(["run", "--methods", "ties,nonsense", "--stream", "split_fmnist"]) == 1
    assert "unknown methods ['nonsense']" in capsys.readouterr().err
    assert cli.main(["run", "--stream", "nowhere:nothing"]) == 1
    assert "cannot import nothing from nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_on_the_real_backbone_end_to_end_then_resume(tmp_path):
    """Real data, the real MiniLM backbone, the experts trained through MMERPlugin, every merge through the fold:
    tables and plots with their provenance; a rerun with one more method reuses what is on disk."""
    profile = replace(TINY, steps=2, batch_size=4, train_per_task=8, val_per_task=8, test_per_task=8)
    out, cache = tmp_path / "results", tmp_path / "cache"
    loop.run(profile, streams=["split_fmnist"], methods=["individual", "mmer_compact"], out=out, cache=cache, progress=False)
    summary = (out / "split_fmnist_summary.csv").read_text()
    assert summary.startswith("# command:") and "mmer_compact" in summary
    result = json.loads(next(cache.rglob("mmer_compact.json")).read_text())
    assert len(result["matrix"]) == 5 and result["storage"]["masks"] > 0
    stamp = next(cache.rglob("mmer_compact.json")).stat().st_mtime
    loop.run(profile, streams=["split_fmnist"], methods=["individual", "mmer_compact", "ties"], out=out, cache=cache,
             progress=False)
    assert next(cache.rglob("mmer_compact.json")).stat().st_mtime == stamp
    assert "ties" in (out / "split_fmnist_summary.csv").read_text()
    shutil.rmtree(cache)


def test_two_seeds_give_intervals_paired_scores_and_label_free_routing(tmp_path):
    """On the user's digits stream: per-sample scores that add up to Avalanche's accuracies, MMER paired with
    each method on the same examples, the spread over two seeds, and the Gaussian router's confusion."""
    import numpy as np
    import pandas as pd

    registry.resolve_stream(f"{EXAMPLE}:digits")
    profile = replace(TINY, seeds=(0, 1), every_seed=("individual", "mmer_exact", "ties", "digits/mmer_routed"))
    out = tmp_path / "results"
    results = loop.run(profile, streams=[f"{EXAMPLE}:digits"], methods=["individual", "mmer_exact", "ties", "mmer_routed",
                       "naive"], out=out, cache=tmp_path / "cache", progress=False)["digits"]
    for name, result in results.items():  # the paired scores are the very samples Avalanche's accuracy counted
        if name != "individual":
            assert np.allclose([np.mean(c) for c in result["correct"]], result["matrix"][-1]), name
    curves = pd.read_csv(out / "digits_learning_curves.csv", comment="#")
    for t, task in enumerate(results["individual"]["expert_accuracy"]):  # the curve ends at the expert itself
        rows = curves[(curves["task"] == f"digits_{2 * t}{2 * t + 1}") & (curves["split"] == "test")]
        assert rows["step"].iloc[0] == 0 and rows["step"].is_monotonic_increasing
        assert rows["acc"].iloc[-1] == results["individual"]["expert_accuracy"][t]
    assert (out / "digits_learning_curves.png").stat().st_size > 0
    paired = pd.read_csv(out / "digits_paired.csv", comment="#")
    assert set(paired["method"]) == {"ties", "mmer_routed", "naive"}  # individual: no per-sample scores
    assert all((paired["lo"] <= paired["diff"]) & (paired["diff"] <= paired["hi"]))
    assert all(v.startswith("mmer_exact ") for v in paired["verdict"])
    seeds = pd.read_csv(out / "digits_seeds.csv", comment="#")
    assert list(seeds["seeds"]) == [2, 2, 2, 2, 1] and all(seeds["lo"][:4] <= seeds["final_avg_acc"][:4])  # naive: seed 0
    over_seeds = pd.read_csv(out / "digits_paired_seeds.csv", comment="#")
    assert list(over_seeds["method"]) == ["ties", "mmer_routed"] and all(over_seeds["seed_lo"] <= over_seeds["diff"])
    routed = results["mmer_routed"]
    sizes = [len(c) for c in routed["correct"]]
    assert [sum(row) for row in routed["routing_confusion"]] == sizes and routed["storage"]["router"] > 0
    assert "seeds: [0, 1]" in (out / "SUMMARY.md").read_text()
    timings = pd.read_csv(out / "timings.csv", comment="#")  # the next run's estimates
    assert len(timings) == 9 and (timings["seconds"] > 0).all()
    estimates = tables.read_estimates(out, profile)
    assert estimates[("digits", "naive")] == pytest.approx(results["naive"]["seconds"])  # naive: seed 0 alone
    assert tables.read_estimates(out, replace(TINY, name="other")) == {}  # another profile's times are no estimate


def test_an_avalanche_baseline_is_tuned_on_validation_when_the_profile_gives_a_grid(tmp_path):
    """EWC over a grid of lambdas: every point trained once, the best mean validation accuracy kept, its test
    matrix reported, the grid in the tables."""
    import pandas as pd

    registry.resolve_stream(f"{EXAMPLE}:digits")
    profile = replace(TINY, ewc_lambdas=(0.0, 1e6))
    out = tmp_path / "results"
    result = loop.run(profile, streams=[f"{EXAMPLE}:digits"], methods=["ewc"], out=out, cache=tmp_path / "cache",
                      progress=False)["digits"]["ewc"]
    grid = result["hyper"]["grid"]
    assert [row["ewc_lambda"] for row in grid] == [0.0, 1e6]
    best = max(grid, key=lambda row: row["val_acc"])
    assert result["hyper"]["choice"] == {"ewc_lambda": best["ewc_lambda"]} and result["val_acc"] == best["val_acc"]
    assert result["options"] == result["hyper"]["choice"]
    table = pd.read_csv(out / "digits_grids.csv", comment="#")
    assert set(table["setting"]) == {"ewc_lambda=0.0", "ewc_lambda=1000000.0"}


def test_expansion_scores_every_candidate_and_baseline_on_the_same_mixed_inputs(tmp_path):
    """The aligned stream end to end at a tiny size: experts answering in the shared answer space, every
    candidate and baseline scored on every combination's mixed test inputs (the same examples for all, so
    they pair), choices from the validation grid, storage ordered as what each keeps, the table written."""
    import pandas as pd

    profile = replace(TINY, steps=2, batch_size=4, train_per_task=8, val_per_task=8, test_per_task=8,
                      alphas=(1.0, 2.0), ta_alphas=(0.5,))
    out = tmp_path / "results"
    result = loop.run(profile, streams=["aligned"], methods=["expansion"], out=out, cache=tmp_path / "cache",
                      progress=False)["aligned"]["expansion"]
    combos = {"vision+audio", "vision+text", "audio+text", "vision+audio+text"}
    assert set(result["mixed"]) == combos and all(m["test_examples"] == 16 for m in result["mixed"].values())
    assert result["mixed"]["vision+text"]["classes"] == [1, 3, 4, 7, 8, 9]  # the classes WordNet can cover
    methods = result["methods"]
    assert {"mmer_union", "mmer_merged", "mmer_routed", "naive_mc", "task_arithmetic", "late_fusion",
            "best_single", "single:vision", "single:audio", "single:text"} == set(methods)
    for name in ("mmer_union", "mmer_merged", "mmer_routed", "naive_mc", "late_fusion"):
        assert set(methods[name]["correct"]) == combos and all(len(c) == 16 for c in methods[name]["correct"].values())
    for name in ("mmer_union", "mmer_routed"):
        grid = methods[name]["grid"]
        assert len(grid) == 2 and methods[name]["val_acc"] == max(row["val_acc"] for row in grid)
    assert methods["naive_mc"]["choice"] == {"alpha": 1 / 3}
    assert result["mmer_choice"] in ("mmer_union", "mmer_merged", "mmer_routed")
    storage = result["storage"]
    assert storage["mmer_merged"] < storage["mmer_union"] < storage["late_fusion"]
    table = pd.read_csv(out / "aligned_expansion.csv", comment="#")
    assert set(table["method"]) == set(methods) and all(table.dropna(subset=["vs_naive_mc"])["verdict"].str.contains("naive_mc"))
