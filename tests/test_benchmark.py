"""The benchmark's run folder resumes: a finished result is reused, an interrupted one leaves nothing behind."""

import json

import pytest

from mmer_cl import benchmark


def test_cached_results_resume_after_an_interrupted_run(tmp_path):
    run = benchmark.Run(benchmark.PROFILES["quick"], seed=0, run_dir=tmp_path, progress=False)
    calls = []

    def finished():
        calls.append("finished")
        return {"matrix": [[0.5]]}

    def interrupted():
        calls.append("interrupted")
        raise KeyboardInterrupt

    first = run.cached("modality/ties", finished)
    assert first["matrix"] == [[0.5]] and first["seconds"] >= 0 and first["peak_rss_mb"] > 0
    with pytest.raises(KeyboardInterrupt):
        run.cached("modality/tall", interrupted)
    assert not (tmp_path / "modality" / "tall.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))

    rerun = benchmark.Run(benchmark.PROFILES["quick"], seed=0, run_dir=tmp_path, progress=False)
    assert rerun.cached("modality/ties", finished) == json.loads((tmp_path / "modality" / "ties.json").read_text())
    assert rerun.cached("modality/tall", finished)["matrix"] == [[0.5]]
    assert calls == ["finished", "interrupted", "finished"]  # ties was not recomputed


def test_cli_rejects_unknown_methods():
    import argparse

    parser = argparse.ArgumentParser()
    benchmark.register_cli(parser.add_subparsers())
    args = parser.parse_args(["run", "--methods", "ties,nonsense"])
    with pytest.raises(SystemExit, match="nonsense"):
        args.func(args)


@pytest.mark.slow
def test_tiny_run_end_to_end_then_resume(tmp_path):
    """A tiny real run (real data, real MiniLM experts, real folds) writes the tables and plots with their
    provenance; a rerun with one more method reuses the experts and results already on disk."""
    from dataclasses import replace

    profile = replace(benchmark.PROFILES["quick"], name="tiny", steps=2, train_per_task=32, val_per_task=16,
                      test_per_task=16, alphas=(1.0,), lams=(1.0,))
    out, cache = tmp_path / "results", tmp_path / "cache"
    benchmark.run(profile, streams=["modality"], methods=["individual", "mmer_exact"], out=out, cache=cache, progress=False)
    summary = (out / "modality_summary.csv").read_text()
    assert summary.startswith("# command:") and "mmer_exact" in summary
    assert (out / "modality_accuracy_matrices.png").exists() and (out / "SUMMARY.md").exists()
    run_dir = cache / "tiny-seed0"
    experts = sorted((run_dir / "modality" / "experts").glob("*/DONE"))
    assert len(experts) == 3
    stamps = {p: p.stat().st_mtime_ns for p in [*experts, run_dir / "modality" / "mmer_exact.json"]}
    benchmark.run(profile, streams=["modality"], methods=["individual", "mmer_exact", "ties"], out=out, cache=cache,
                  progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "ties" in (out / "modality_summary.csv").read_text()
