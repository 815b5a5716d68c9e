"""The state folder survives a fold killed at any point: SIGKILL a folding subprocess at several moments,
then the previous state must load bit-identical, and a rerun must finish the fold."""

import multiprocessing
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


@pytest.mark.parametrize("mode", ["exact", "sparse", "compact"])
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
    names = sorted(p.name for p in state.iterdir() if p.name not in (store.LOCK_FILE, store.MARKER))
    assert names == ["g000002", "manifest.json", "tasks"]
    assert store.is_state(state) and (state / store.LOCK_FILE).is_file()  # the store's own files stay
    assert sorted(p.name for p in (state / "tasks").iterdir()) == ["000-first", "001-second"]


# ---- one writer at a time (issue 12, item 1) ------------------------------------------------------


def _contend(state, barrier, results):
    """Child process: take the writer lock at the same moment as another; the winner holds it until killed."""
    barrier.wait(timeout=60)
    try:
        with store.lock(state, create=True):
            results.put(("locked", os.getpid(), ""))
            (state / "g000002.partial").mkdir()  # a live writer's work in progress
            time.sleep(600)
    except store.StateError as error:
        results.put(("refused", os.getpid(), str(error)))


def test_two_writers_one_lock_which_dies_with_its_holder(tmp_path):
    state = tmp_path / "new" / "state"  # absent: the first fold's lock creates it, parents included
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_contend, args=(state, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    try:
        outcomes = sorted(results.get(timeout=60) for _ in processes)
        (got, winner, _), (refused, loser, message) = outcomes
        assert (got, refused) == ("locked", "refused"), outcomes
        assert message.startswith(f"{state} is being folded by pid {winner}"), message
        assert (state / store.LOCK_FILE).read_text().strip() == str(winner)
        with pytest.raises(store.StateError, match=f"being folded by pid {winner}"):
            with store.lock(state):  # nor can this process, not even after waiting a little
                pass
        start = time.monotonic()
        with pytest.raises(store.StateError, match=f"pid {winner}"):
            with store.lock(state, wait=0.3):
                pass
        assert time.monotonic() - start >= 0.3
        while not (state / "g000002.partial").exists():
            time.sleep(0.01)
        with pytest.raises(store.StateError, match=f"being folded by pid {winner}"):
            store.collect_garbage(state, None)  # never touches a live writer's files
        with pytest.raises(store.StateError, match="g000002.partial already exists"):
            store.stage(state, "g000002")
        assert (state / "g000002.partial").is_dir()
        store.commit(state, {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "files": {}, "tasks": []})
        assert store.load(state).tasks == []  # readers take no lock: reading never waits for a writer
        os.kill(winner, signal.SIGKILL)
        next(p for p in processes if p.pid == winner).join(timeout=60)
        with store.lock(state) as locked:  # the kernel released the dead holder's lock
            assert locked == state and store.holds_lock(state)
            assert (state / store.LOCK_FILE).read_text().strip() == str(os.getpid())
            with store.lock(state):  # re-entrant in one thread
                pass
            assert store.holds_lock(state)
            store.collect_garbage(state, None)  # now the dead writer's partial is garbage
            assert not (state / "g000002.partial").exists()
        assert not store.holds_lock(state)
        assert sorted(p.name for p in state.iterdir()) == [store.LOCK_FILE, store.MARKER, store.MANIFEST]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=60)


# ---- the store deletes only what it owns (issue 12, item 2) ---------------------------------------

USER_FILES = ["tasks/notes.txt", "g000001/keep.txt", "report.partial", "some.tmp", "g000002.partial/draft.txt",
              "tasks/001-mine/data.txt", "manifest.json.tmp"]


def _write_files(folder, relpaths):
    for relpath in relpaths:
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_text(relpath)


def _tree(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_a_folder_of_user_files_is_not_a_state_and_is_never_collected(tmp_path):
    folder = tmp_path / "mine"
    _write_files(folder, USER_FILES)
    before = _tree(folder)
    store.collect_garbage(folder, None)
    store.collect_garbage(folder, {"files": {}, "tasks": []})
    assert _tree(folder) == before
    assert not store.is_state(folder)
    with pytest.raises(store.StateError, match=f"{folder} is not an mmer-cl state"):
        with store.lock(folder, create=True):
            pass
    with pytest.raises(store.StateError, match=f"{folder} holds no mmer-cl state"):
        with store.lock(folder):
            pass
    assert _tree(folder) == before  # refused before anything was written into it: no lock file, no marker
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(store.StateError, match="a-file is a file"):
        with store.lock(tmp_path / "a-file", create=True):
            pass


def _manifest(generation: int, task_dirs: list[str]) -> dict:
    files = {f"{store.generation_dir(generation)}/tau_star.safetensors": {"sha256": "0", "bytes": 0}}
    files.update({f"{d}/vector.safetensors": {"sha256": "0", "bytes": 0} for d in task_dirs})
    return {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "generation": generation,
            "tasks": [{"name": d.split("-", 1)[1], "dir": d} for d in task_dirs], "files": files}


def test_a_marked_state_collects_only_its_own_leftovers(tmp_path):
    state = tmp_path / "state"
    with store.lock(state, create=True):
        assert store.is_state(state) and (state / store.MARKER).read_text().strip() == store.FORMAT
        manifest = _manifest(1, ["tasks/000-first"])
        _write_files(state, list(manifest["files"]))
        store.commit(state, manifest)
        kept = ["tasks/notes.txt", "g000001/keep.txt", "report.partial", "some.tmp", "tasks/000-first/mine.txt",
                "tasks/README"]
        leftovers = ["g000002.partial/tau_star.safetensors", "g000000/tau_star.safetensors", "g1234567/x",
                     "tasks/001-second/vector.safetensors", "tasks/001-second.partial/vector.safetensors",
                     "manifest.json.tmp", ".mmer-cl-state.tmp"]
        _write_files(state, kept + leftovers)
        store.collect_garbage(state, manifest)
    assert _tree(state) == sorted([store.LOCK_FILE, store.MANIFEST, store.MARKER, "g000001", "tasks", "tasks/000-first"]
                                  + list(manifest["files"]) + kept)
    # the committed manifest is kept even when the caller passes none
    store.collect_garbage(state, None)
    assert (state / "g000001" / "tau_star.safetensors").is_file()
    # a marked state whose first fold died before committing: all store-shaped files are leftovers
    fresh = tmp_path / "fresh"
    with store.lock(fresh, create=True):
        _write_files(fresh, ["g000001.partial/tau_star.safetensors", "tasks/000-a.partial/vector.safetensors",
                             "tasks/notes.txt"])
        assert (fresh / "g000001.partial").is_dir()
        assert store.stage(fresh, "g000001") == fresh / "g000001.partial"  # under the lock: a dead writer's
        store.collect_garbage(fresh, None)
    assert _tree(fresh) == [store.LOCK_FILE, store.MARKER, "tasks", "tasks/notes.txt"]
    with store.lock(fresh, create=True):  # taking it again on a state is fine
        pass


def test_a_state_written_before_markers_existed_is_adopted(tmp_path):
    state = tmp_path / "legacy"
    manifest = _manifest(2, [])
    _write_files(state, list(manifest["files"]) + ["g000001/tau_star.safetensors", "notes.txt"])
    store.commit(state, manifest)
    assert not store.is_state(state)
    store.collect_garbage(state, manifest)
    assert store.is_state(state)
    assert _tree(state) == sorted([store.LOCK_FILE, store.MANIFEST, store.MARKER, "g000002", "notes.txt"]
                                  + list(manifest["files"]))
    with store.lock(state):
        pass


def test_the_lock_file_and_marker_are_never_in_a_manifest(tmp_path):
    with store.lock(tmp_path / "s", create=True) as state:
        with pytest.raises(store.StateError, match="store's own files"):
            store.commit(state, {"files": {store.LOCK_FILE: {"sha256": "0", "bytes": 0}}})
