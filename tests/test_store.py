"""The state folder survives a fold killed at any point: SIGKILL a folding subprocess at several moments,
then the previous state must load bit-identical, and a rerun must finish the fold."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmer_cl import fold as F
from mmer_cl import store
from mmer_cl.checkpoints import sha256_file
from test_checkpoints import finetune, save, tiny_llama

torch.set_num_threads(1)

KILL_POINTS = ["tensor-1", "tensor-9", "staged", "published", "manifest-written", "committed"]
FOLD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from mmer_cl.fold import fold
fold(sys.argv[1], sys.argv[2], "second", mode=sys.argv[3], progress=False)
"""


def snapshot(state_dir) -> dict:
    """sha256 of the manifest and of every file it names: what 'the state' is, bit for bit."""
    manifest = store.read_manifest(state_dir)
    files = {rel: sha256_file(state_dir / rel) for rel in manifest["files"]}
    return {"manifest": sha256_file(state_dir / store.MANIFEST), **files}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama()
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    save(base, root / "base")
    for i in (1, 2):
        save(finetune(tiny_llama(), base_state, seed=i), root / f"ft{i}")
    return root


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_fold_killed_anywhere_leaves_previous_state_and_reruns(models, tmp_path, mode):
    first = tmp_path / "first"
    F.fold(first, models / "ft1", "first", base=models / "base", mode=mode, progress=False)
    before = snapshot(first)
    reference = tmp_path / "reference"
    shutil.copytree(first, reference)
    finished = F.fold(reference, models / "ft2", "second", mode=mode, progress=False)

    runs = {}
    for point in KILL_POINTS + ["timed"]:
        state = tmp_path / point
        shutil.copytree(first, state)
        env = dict(os.environ, **({store.KILL_ENV: point} if point != "timed" else {}))
        runs[point] = (state, subprocess.Popen([sys.executable, "-c", FOLD_SCRIPT, str(state), str(models / "ft2"), mode],
                                               env=env, stderr=subprocess.PIPE))
    # the timed run is killed from outside as soon as it has started writing its new generation
    state, timed = runs["timed"]
    deadline = time.time() + 120
    while not (state / "g000002.partial").exists() and timed.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    timed.send_signal(signal.SIGKILL)

    for point, (state, process) in runs.items():
        process.wait(timeout=180)
        assert process.returncode in (-signal.SIGKILL, 0), (point, process.stderr.read().decode()[-2000:])
        if point != "timed":
            assert process.returncode == -signal.SIGKILL, point
        if point == "committed" or process.returncode == 0:  # the fold had finished: the new state stands
            assert [t["name"] for t in store.load(state).tasks] == ["first", "second"]
            continue
        store.load(state)  # verifies every checksum
        assert snapshot(state) == before, point
        rerun = F.fold(state, models / "ft2", "second", mode=mode, progress=False)
        assert rerun["files"] == finished["files"], point  # bit-identical to an uninterrupted fold
        assert sorted(p.name for p in state.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_load_names_the_corrupt_file(models, tmp_path):
    state = tmp_path / "state"
    manifest = F.fold(state, models / "ft1", "first", base=models / "base", progress=False)
    victim = manifest["tau_star_files"][0]
    data = bytearray((state / victim).read_bytes())
    data[-1] ^= 1
    (state / victim).write_bytes(bytes(data))
    with pytest.raises(store.StateError, match=f"{victim}.*corrupt"):
        store.load(state)
    (state / victim).unlink()
    with pytest.raises(store.StateError, match=f"{victim}.*missing"):
        store.load(state)


def test_leftovers_of_an_interrupted_fold_are_collected(models, tmp_path):
    state = tmp_path / "state"
    F.fold(state, models / "ft1", "first", base=models / "base", progress=False)
    (state / "g000009.partial").mkdir()
    (state / "g000008").mkdir()
    (state / "tasks" / "001-second").mkdir()
    (state / "manifest.json.tmp").write_text("{")
    F.fold(state, models / "ft2", "second", progress=False)
    names = sorted(p.name for p in state.iterdir())
    assert names == ["g000002", "manifest.json", "tasks"]
    assert sorted(p.name for p in (state / "tasks").iterdir()) == ["000-first", "001-second"]
