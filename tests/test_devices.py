"""--device: auto is the CPU on a machine without CUDA, cuda there is a one-line error, and the device never
changes the keys of CPU results (a run folder made before --device existed is still reused)."""

import torch

from mmer_cl import cli
from mmer_cl.bench import loop
from mmer_cl.bench.profiles import PROFILES
from mmer_cl.bench.runfolder import RESULTS_VERSION, Run, digest


class Stream:
    name, fingerprint = "modality", "f"


def test_auto_is_cuda_only_where_torch_sees_it_and_cuda_without_it_is_an_error(tmp_path, capsys):
    assert loop.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loop.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert cli.main(["run", "--device", "cuda", "--profile", "quick", "--cache", str(tmp_path)]) == 1
        error = capsys.readouterr().err
        assert "--device cuda: torch" in error and "sees no CUDA device" in error and "Traceback" not in error


def test_cpu_results_keep_their_keys_and_other_devices_get_their_own(tmp_path):
    profile = PROFILES["quick"]
    before = digest(profile.key(), 0, "modality", "f", "ties", None, RESULTS_VERSION)  # the key as it always was
    assert Run(profile, 0, tmp_path).key(Stream, "ties") == before
    assert Run(profile, 0, tmp_path, device="cpu").key(Stream, "ties") == before
    assert Run(profile, 0, tmp_path, device="cuda").key(Stream, "ties") != before
