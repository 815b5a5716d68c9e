"""The benchmark as Ray tasks on a local instance of 2 workers: the same tables as a serial run at the same thread
count, a rerun that skips every stored result, a failed task named with its log, clear errors for a cluster
that is not there; and without --ray, Ray is never imported."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mmer_cl import cli
from mmer_cl.bench import loop
from mmer_cl.bench.profiles import PROFILES

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits_stream.py"
# experts (a stage) for individual, ties, mmer_compact and average; naive for magmax; joint needs nothing
METHODS = "individual,mmer_compact,ties,average,naive,magmax,joint"
TIMING = {"method_s", "fold_s", "fold_s_total", "peak_rss_mb", "seconds"}  # wall-clock columns, the only ones allowed to differ


def numeric_tables(out: Path) -> dict[str, pd.DataFrame]:
    tables = {p.name: pd.read_csv(p, comment="#") for p in sorted(out.glob("*.csv"))}
    return {name: df[[c for c in df.columns if c not in TIMING]] for name, df in tables.items()}


def run_args(tmp_path, name, *more) -> list[str]:
    return ["run", "--stream", f"{EXAMPLE}:digits", "--profile", "quick", "--out", str(tmp_path / f"{name}-out"),
            "--cache", str(tmp_path / f"{name}-cache"), *more]


@pytest.mark.slow
def test_a_ray_run_gives_the_serial_tables_and_a_rerun_skips_what_is_stored(tmp_path):
    assert cli.main(run_args(tmp_path, "serial", "--methods", METHODS, "--threads", "1")) == 0
    assert cli.main(run_args(tmp_path, "ray", "--methods", METHODS, "--threads", "1", "--ray", "--ray-workers", "2")) == 0
    serial, on_ray = numeric_tables(tmp_path / "serial-out"), numeric_tables(tmp_path / "ray-out")
    assert list(serial) == list(on_ray) and "digits_summary.csv" in serial
    for name in serial:
        pd.testing.assert_frame_equal(serial[name], on_ray[name], check_exact=True, obj=name)
    assert set(on_ray["digits_summary.csv"]["method"]) == set(METHODS.split(","))
    logs = next((tmp_path / "ray-cache").rglob("logs"))
    assert {p.stem for p in logs.glob("*.log")} == {*METHODS.split(","), "experts"}  # one log per task
    assert all(p.read_text().rstrip().splitlines()[-1].startswith("done in") for p in logs.glob("*.log"))
    stored = {p: p.stat().st_mtime for p in (tmp_path / "ray-cache").rglob("*.json")}
    assert cli.main(run_args(tmp_path, "ray", "--methods", METHODS, "--ray", "--ray-workers", "2")) == 0
    assert {p: p.stat().st_mtime for p in stored} == stored  # every result reused, none recomputed


def test_a_failed_task_names_its_method_and_its_log(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text(f"import importlib.util\nfrom mmer_cl.bench import method\n"
                      f"spec = importlib.util.spec_from_file_location('digits_example', {str(EXAMPLE)!r})\n"
                      f"example = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(example)\n"
                      f"digits = example.digits\n\n"
                      f"@method('broken')\ndef run_broken(run, data):\n    raise RuntimeError('the method broke')\n")
    assert cli.main(["run", "--stream", f"{broken}:digits", "--methods", "broken", "--profile", "quick", "--ray",
                     "--ray-workers", "1", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 1
    error = capsys.readouterr().err
    assert "digits, seed 0, broken failed (RuntimeError: the method broke); its log: " in error
    log = Path(error.split("its log: ")[1].split()[0])
    assert log.name == "broken.log" and "RuntimeError: the method broke" in log.read_text()


def test_a_cluster_that_is_not_there_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(run_args(tmp_path, "x", "--ray", "127.0.0.1:1")) == 1
    assert "cannot join the Ray cluster at '127.0.0.1:1': nothing answers there" in capsys.readouterr().err
    assert cli.main(run_args(tmp_path, "x", "--ray-workers", "2")) == 1
    assert "--ray-workers needs --ray" in capsys.readouterr().err
    assert cli.main(run_args(tmp_path, "x", "--ray", "127.0.0.1:1", "--ray-workers", "2")) == 1
    assert "--ray-workers sizes a local Ray instance" in capsys.readouterr().err


def test_without_ray_nothing_imports_it():
    """The serial path's modules, every built-in method and stream registered, and the CLI parsed: no Ray."""
    code = ("import sys\nfrom mmer_cl import cli\nfrom mmer_cl.bench import loop, registry\n"
            "registry.load_builtins()\ncli.build_parser().parse_args(['run', '--profile', 'quick'])\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_method_runs_from_its_own_seed(tmp_path):
    """What ran before a method in the same process leaves torch's global generator elsewhere; the method's
    numbers do not move (in a Ray worker it starts from a fresh process)."""
    import torch

    from mmer_cl.bench import registry
    from mmer_cl.bench.runfolder import Run

    registry.load_builtins()
    registry.resolve_stream(f"{EXAMPLE}:digits")
    profile = PROFILES["quick"]
    data = loop.stream_data(f"{EXAMPLE}:digits", profile, 0)
    draws = []
    registry.METHODS["draw"] = registry.Method(lambda run, data: {"draw": torch.rand(1).item()})
    try:
        for folder in ("a", "b"):
            torch.rand(7)  # another method's use of the generator
            draws.append(loop.run_step(Run(profile, 0, tmp_path / folder), data, "draw")["draw"])
    finally:
        del registry.METHODS["draw"]
    assert draws[0] == draws[1]
