"""Issue 12, items 3, 4, 6, 7, 8, 10: nothing lost, whatever the user does.

3  every numeric option refused unless finite and in range, before anything is written; no non-finite
   tau_star; manifest.json always standard JSON
4  the base recorded by content (sha256 per file) and checked by fold, refit and export; a fold verifies
   what it reads of the state; readers keep reading their generation while a fold collects it
6  LoRA NaN, a bad adapter config, 0-element tensors, integer tensors (never merged, copied exactly)
7  a state re-pointed to a moved base (`rebase`), checked by content
8  export never reuses a stale `<out>.partial` and removes its own when it fails
10 every CLI error one line naming the culprit, exit 1; `--debug` before or after the subcommand
"""

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmer_cl import cli, decoupled
from mmer_cl import fold as F
from mmer_cl import store
from mmer_cl.checkpoints import Checkpoint, CheckpointError, sha256_file
from test_checkpoints import _adapter, finetune, save, state_of, tiny_llama

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama base (sharded in many files), three fine-tunes of it, and another model of its layout."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama()
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    save(base, root / "base")
    for i in range(3):
        save(finetune(tiny_llama(), base_state, seed=30 + i), root / f"ft{i}")
    save(tiny_llama(seed=99), root / "other")  # same names, shapes and files; other values
    return root


@pytest.fixture(scope="module")
def folded(models, tmp_path_factory):
    """Template states with tasks a and b folded, per mode; copy one before changing it."""
    root = tmp_path_factory.mktemp("folded")
    for mode in ("exact", "compact"):
        F.fold(root / mode, models / "ft0", "a", base=models / "base", mode=mode, progress=False)
        F.fold(root / mode, models / "ft1", "b", progress=False)
    return root


def copy_state(folded, tmp_path, mode="exact") -> Path:
    shutil.copytree(folded / mode, tmp_path / "s")
    return tmp_path / "s"


def tree(folder: Path) -> dict:
    """Every file under `folder`, bit for bit: what "unchanged" means."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mmer-cl {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- item 3: numbers validated before anything is written -----------------------------------------------

BAD_NUMBERS = [("alpha", math.inf), ("alpha", math.nan), ("alpha", -1.0), ("lam", -1.0), ("lam", math.nan),
               ("lam", math.inf), ("k", 0.0), ("k", 1.5), ("k", math.nan)]


@pytest.mark.parametrize("how", ["fold", "refit", "cli fold", "cli refit"])
@pytest.mark.parametrize("option,value", BAD_NUMBERS, ids=[f"{o}={v}" for o, v in BAD_NUMBERS])
def test_a_bad_number_is_refused_and_the_state_unchanged(models, folded, tmp_path, capsys, how, option, value):
    state = copy_state(folded, tmp_path)
    before = tree(state)
    if how == "fold":
        with pytest.raises(store.StateError, match=f"{option} must"):
            F.fold(state, models / "ft2", "c", progress=False, **{option: value})
    elif how == "refit":
        with pytest.raises(store.StateError, match=f"{option} must"):
            F.refit(state, **{"lams" if option == "lam" else option: value})
    else:
        command = how.split()[1]
        argv = [command, state] + ([models / "ft2", "--task", "c"] if command == "fold" else [])
        code, err = run_cli(capsys, *argv, f"--{option}", str(value))
        assert code == 1 and f"{option} must" in one_line_error(err, command)
    assert tree(state) == before


@pytest.mark.parametrize("option,value", [("alpha", math.inf), ("lam", math.nan), ("k", 0.0), ("p", 1.0),
                                          ("energy", math.nan), ("seed", 1.5)])
def test_a_bad_number_creates_no_state_folder(models, tmp_path, option, value):
    """The first fold checks its options before the state folder (and its marker and lock) is made."""
    with pytest.raises(store.StateError, match=f"{option} must"):
        F.fold(tmp_path / "new", models / "ft0", "a", base=models / "base", progress=False, **{option: value})
    assert not (tmp_path / "new").exists()
    with pytest.raises(CheckpointError, match="nobase is not a folder of weights"):  # a missing base, likewise
        F.fold(tmp_path / "new", models / "ft0", "a", base=tmp_path / "nobase", progress=False)
    assert not (tmp_path / "new").exists()


def test_a_fold_that_would_overflow_float32_is_refused(models, folded, tmp_path):
    """Finite inputs can still give a non-finite tau_star: alpha = 1e300 passes every range check, and two
    finite float32 weights 3e38 apart differ by more than float32 holds. Both are refused, nothing written."""
    state = copy_state(folded, tmp_path)
    before = tree(state)
    with pytest.raises(store.StateError, match="tau_star has NaN or Inf"):
        F.fold(state, models / "ft2", "c", alpha=1e300, progress=False)
    assert tree(state) == before
    base = state_of(models / "base")
    name = "model.layers.0.mlp.up_proj.weight"
    huge_base = dict(base)
    huge_base[name] = base[name].clone()
    huge_base[name][0, 0] = -3e38
    huge_ft = dict(huge_base)
    huge_ft[name] = huge_base[name].clone()
    huge_ft[name][0, 0] = 3e38  # finite; 3e38 - (-3e38) is not
    save_folder(tmp_path / "huge", huge_base)
    new = tmp_path / "overflow"
    with pytest.raises(ValueError, match=f"'{name}'.*NaN or Inf"):
        F.fold(new, huge_ft, "a", base=tmp_path / "huge", progress=False)
    assert not (new / store.MANIFEST).exists()


def test_the_manifest_is_always_standard_json(folded, tmp_path):
    state = copy_state(folded, tmp_path)
    before = tree(state)
    manifest = store.read_manifest(state)
    for bad in (math.nan, math.inf):
        with pytest.raises(store.StateError, match="JSON cannot represent"):
            store.commit(state, dict(manifest, settings=dict(manifest["settings"], alpha=bad)))
        assert tree(state) == before  # not even a manifest.json.tmp
    text = (state / store.MANIFEST).read_text()
    (state / store.MANIFEST).write_text(text.replace('"alpha": 1.0', '"alpha": Infinity'))
    with pytest.raises(store.StateError, match="not standard JSON"):  # one an older version wrote
        store.read_manifest(state)


# ---- item 4 (a): the base recorded and checked by content ---------------------------------------------


def replace_in_place(base: Path, other: Path) -> str:
    """Overwrites one of `base`'s shards, in place, with the same-named shard of a model of the same layout."""
    shard = sorted(base.glob("model-*.safetensors"))[2]
    assert shard.read_bytes()[:200] == (other / shard.name).read_bytes()[:200]  # same header: same layout
    with open(shard, "r+b") as f:  # in place: the same inode, as an editor or a `cp` over it would
        f.write((other / shard.name).read_bytes())
    return shard.name


def test_the_first_fold_records_the_base_by_content(models, folded):
    recorded = store.read_manifest(folded / "exact")["base"]["sha256"]
    assert recorded == {p.name: sha256_file(p) for p in Checkpoint(models / "base").files}


def test_a_base_replaced_in_place_is_refused_by_fold_refit_export_and_switch(models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models / "base", base)
    state = tmp_path / "s"
    F.fold(state, models / "ft0", "a", base=base, progress=False)
    F.fold(state, models / "ft1", "b", progress=False)
    before = tree(state)
    shard = replace_in_place(base, models / "other")
    message = f"base file {base / shard} is not the one this state was built on"
    with pytest.raises(store.StateError, match=message):
        F.fold(state, models / "ft2", "c", progress=False)
    with pytest.raises(store.StateError, match=message):
        F.refit(state, alpha=1.5)
    assert tree(state) == before
    with pytest.raises(store.StateError, match=message):
        decoupled.export(state, "a", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(store.StateError, match=message):
        decoupled.decoupled_state_dict(state, "a")
    with pytest.raises(store.StateError, match=message):
        decoupled.TaskSwitcher(tiny_llama(), state)


# ---- item 4 (b): a fold verifies what it reads of the state --------------------------------------------


def corrupt(path: Path) -> None:
    """One bit of the data (not the header) flipped, size unchanged: only a content check sees it."""
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("mode,what", [("exact", "vector_files"), ("compact", "tau_star_files"),
                                       ("compact", "mask_files")])
def test_a_corrupt_state_is_refused_by_a_fold_and_left_as_it_is(models, folded, tmp_path, mode, what):
    state = copy_state(folded, tmp_path, mode)
    manifest = store.read_manifest(state)
    files = manifest[what] if what == "tau_star_files" else manifest["tasks"][0][what]
    victim = files[len(files) // 2]
    corrupt(state / victim)
    store.verify(state, manifest, full=False)  # sizes are fine: what the fold checked before
    before = tree(state)
    with pytest.raises(store.StateError, match=f"state file {state / victim} is corrupt: its sha256 differs"):
        F.fold(state, models / "ft2", "c", progress=False)
    assert tree(state) == before  # not laundered into a new generation
    if mode == "exact":
        with pytest.raises(store.StateError, match=f"{state / victim} is corrupt"):
            F.refit(state, alpha=1.5)
        with pytest.raises(store.StateError, match=f"{state / victim} is corrupt"):
            F.remove(state, "b")
        assert tree(state) == before
    with pytest.raises(store.StateError, match=f"{state / victim} is corrupt"):  # readers: store.load, as before
        decoupled.export(state, "a", tmp_path / "out", progress=False)


# ---- item 4: readers keep their generation while a fold collects it -------------------------------------


def test_readers_keep_reading_their_generation_while_a_fold_collects_it(models, folded, tmp_path):
    state = copy_state(folded, tmp_path, "compact")
    expected = decoupled.decoupled_state_dict(state, "a")  # generation 2
    old_generation = state / store.generation_dir(2)
    reader = store.load(state)
    tensors = decoupled.decoupled_tensors(reader, reader.task("a"), decoupled.open_base(reader))
    first = [next(tensors)]  # an export under way
    model = tiny_llama()
    switcher = decoupled.TaskSwitcher(model, state)
    F.fold(state, models / "ft2", "c", progress=False)  # generation 3 commits; generation 2 is collected
    assert not old_generation.exists() and store.read_manifest(state)["generation"] == 3
    got = dict(first + list(tensors))
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    switcher.switch("a")  # opened its masks and tau_star on generation 2, reads them now
    weights = model.state_dict()
    assert all(torch.equal(weights[n], expected[n]) for n in expected)
    after = decoupled.decoupled_state_dict(state, "a")  # a new reader sees generation 3
    assert any(not torch.equal(after[n], expected[n]) for n in expected)


def test_load_reads_again_when_a_fold_commits_between_manifest_and_files(models, folded, tmp_path, monkeypatch):
    state = copy_state(folded, tmp_path, "compact")
    stale = store.read_manifest(state)
    F.fold(state, models / "ft2", "c", progress=False)  # stale's generation is gone now
    calls, read = [], store.read_manifest

    def racing(state_dir):  # the reader read the manifest just before that fold committed
        calls.append(1)
        return stale if len(calls) == 1 else read(state_dir)

    monkeypatch.setattr(store, "read_manifest", racing)
    loaded = store.load(state)
    assert loaded.manifest["generation"] == 3 and len(calls) >= 3


# ---- item 6: consistent validation ---------------------------------------------------------------------


def test_a_nan_in_a_lora_factor_is_refused(models, folded, tmp_path):
    state = copy_state(folded, tmp_path)
    before = tree(state)
    base_model = tiny_llama()
    base_model.load_state_dict(state_of(models / "base"))
    _adapter(tmp_path, base_model)
    weights_file = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    name = next(n for n in weights if "lora_B" in n)
    weights[name][1, 2] = math.nan
    save_file(weights, weights_file)
    with pytest.raises(ValueError, match=rf"'{name}' in .*adapter_model.safetensors has 1 NaN or Inf"):
        F.fold(state, tmp_path / "adapter", "lora", progress=False)
    assert tree(state) == before


def test_an_invalid_adapter_config_is_named(models, folded, tmp_path):
    state = copy_state(folded, tmp_path)
    before = tree(state)
    base_model = tiny_llama()
    base_model.load_state_dict(state_of(models / "base"))
    _adapter(tmp_path, base_model)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text('{"r": 4, "lora_alpha": ')
    with pytest.raises(CheckpointError, match=f"{config}: not a readable adapter config"):
        F.fold(state, tmp_path / "adapter", "lora", progress=False)
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=f"{config}: not a readable adapter config"):
        F.fold(state, tmp_path / "adapter", "lora", progress=False)
    assert tree(state) == before


class Odd(torch.nn.Module):
    """A model with an int64 buffer (and a 0-element parameter) beside a plain weight."""

    def __init__(self, empty: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8, 8))
        if empty:
            self.empty = torch.nn.Parameter(torch.zeros(0, 4))
        self.register_buffer("count", torch.zeros(3, dtype=torch.int64))


BIG = 2**40 + 1  # float32 (and float64 past 2**53) would round it
COUNT = [BIG, -3, 2**62 + 7]


def odd_weights(seed: int, count=tuple(COUNT), empty: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(8, 8, generator=generator), "count": torch.tensor(count, dtype=torch.int64),
            **({"empty": torch.zeros(0, 4)} if empty else {})}


def save_folder(folder: Path, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    return folder


def fold_and_export_odd(tmp_path, mode, empty):
    base = odd_weights(0, empty=empty)
    save_folder(tmp_path / "base", base)
    tuned = dict(base, weight=base["weight"] + 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    save_folder(tmp_path / "ft", tuned)
    state = tmp_path / "s"
    F.fold(state, tmp_path / "ft", "a", base=tmp_path / "base", mode=mode, progress=False)
    F.fold(state, dict(tuned, weight=tuned["weight"] * 1.1), "b", progress=False)  # a state dict in memory
    decoupled.export(state, "a", tmp_path / "out", progress=False)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert not torch.equal(exported["weight"], base["weight"])
    model = Odd(empty)
    decoupled.TaskSwitcher(model, state).switch("a")
    assert torch.equal(model.weight.data, exported["weight"])
    return state, exported, model


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_int64_tensors_are_never_merged_and_round_trip_exactly(tmp_path, mode):
    state, exported, model = fold_and_export_odd(tmp_path, mode, empty=False)
    assert exported["count"].dtype == torch.int64 and exported["count"].tolist() == COUNT
    assert model.count.tolist() == COUNT
    assert not store.load(state).tau_star().read("count").any()  # an integer tensor's task vector is zero


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_a_base_with_a_zero_element_tensor_folds_and_exports(tmp_path, mode):
    state, exported, model = fold_and_export_odd(tmp_path, mode, empty=True)
    assert exported["empty"].shape == (0, 4) and model.empty.shape == (0, 4)
    assert exported["count"].tolist() == COUNT
    text = (state / store.MANIFEST).read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the manifest"))  # its trim threshold: inf


def test_an_integer_tensor_that_differs_from_the_base_is_refused(tmp_path):
    save_folder(tmp_path / "base", odd_weights(0))
    state = tmp_path / "s"
    F.fold(state, odd_weights(1), "a", base=tmp_path / "base", progress=False)
    before = tree(state)
    save_folder(tmp_path / "ft", odd_weights(2, count=(BIG - 1, -3, 2**62 + 7)))  # off by one, below 2**41
    with pytest.raises(CheckpointError, match=r"tensor 'count' \(torch.int64, not floating point.*differs from the "
                                              rf"base's.*{tmp_path / 'ft'}"):
        F.fold(state, tmp_path / "ft", "b", progress=False)
    assert tree(state) == before


# ---- item 7: the state can move ---------------------------------------------------------------------


def test_a_moved_base_is_named_and_the_state_rebased_onto_it(models, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(models / "base", base)
    state = tmp_path / "s"
    F.fold(state, models / "ft0", "a", base=base, progress=False)
    F.fold(state, models / "ft1", "b", progress=False)
    expected = decoupled.decoupled_state_dict(state, "a")
    moved = tmp_path / "elsewhere" / "base"
    moved.parent.mkdir()
    shutil.move(base, moved)
    with pytest.raises(store.StateError, match=f"base {base} this state was built on is missing.*mmer-cl rebase"):
        decoupled.export(state, "a", tmp_path / "out", progress=False)
    code, err = run_cli(capsys, "export", state, "a", tmp_path / "out")
    assert code == 1 and "mmer-cl rebase" in one_line_error(err, "export")
    with pytest.raises(store.StateError, match=f"not {moved}.*mmer-cl rebase {state} {moved}"):
        F.fold(state, models / "ft2", "c", base=moved, progress=False)

    before = tree(state)  # a copy with other weights (same files, names and shapes) is refused
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    shard = replace_in_place(other, models / "other")
    with pytest.raises(store.StateError, match=f"cannot rebase .*{other / shard} differs"):
        F.rebase(state, other)
    code, err = run_cli(capsys, "rebase", state, other)
    assert code == 1 and str(other / shard) in one_line_error(err, "rebase")
    assert tree(state) == before

    code, _ = run_cli(capsys, "rebase", state, moved)
    assert code == 0 and store.read_manifest(state)["base"]["path"] == str(moved)
    decoupled.export(state, "a", tmp_path / "out", progress=False)
    exported = state_of(tmp_path / "out")
    assert exported.keys() == expected.keys() and all(torch.equal(exported[n], expected[n]) for n in expected)
    F.fold(state, models / "ft2", "c", progress=False)  # and folds go on


def test_a_state_holding_its_base_moves_whole(models, tmp_path):
    state = tmp_path / "s"
    F.fold(state, models / "ft0", "a", base=models / "base", progress=False)
    shutil.copytree(models / "base", state / "base")
    F.rebase(state, state / "base")
    assert store.read_manifest(state)["base"]["path"] == "base"  # relative: inside the state
    expected = decoupled.decoupled_state_dict(state, "a")
    shutil.move(state, tmp_path / "moved")
    got = decoupled.decoupled_state_dict(tmp_path / "moved", "a")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    F.fold(tmp_path / "moved", models / "ft1", "b", progress=False)


# ---- item 8: export's partial folder -----------------------------------------------------------------


@pytest.mark.parametrize("stale", ["folder", "file"])
def test_export_reuses_no_stale_partial(folded, tmp_path, stale):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    if stale == "folder":
        (partial / "sub").mkdir(parents=True)
        (partial / "leftover.txt").write_text("an export that died")
        (partial / "sub" / "model-00009-of-00009.safetensors").write_bytes(b"junk")
    else:
        partial.write_text("not even a folder")
    decoupled.export(folded / "exact", "a", out, progress=False)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert "leftover.txt" not in names and "sub" not in names and "config.json" in names
    assert not partial.exists()


def test_a_failed_export_removes_its_partial_folder(folded, tmp_path, monkeypatch):
    calls = []
    write = decoupled.PlannedWriter.write

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return write(self, name, tensor)

    monkeypatch.setattr(decoupled.PlannedWriter, "write", failing)
    with pytest.raises(OSError, match="No space"):
        decoupled.export(folded / "exact", "a", tmp_path / "out", progress=False)
    assert len(calls) == 5
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- item 10: one line per error, --debug for the traceback ---------------------------------------------


def test_cli_errors_are_one_line_naming_the_culprit(models, folded, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    code, err = run_cli(capsys, "fold", a_file, models / "ft0", "--task", "a", "--base", models / "base")
    assert code == 1 and f"{a_file} is a file" in one_line_error(err, "fold")
    code, err = run_cli(capsys, "export", folded / "exact", "a", a_file)
    assert code == 1 and f"export target {a_file} is a file" in one_line_error(err, "export")
    code, err = run_cli(capsys, "fold", tmp_path / "s", models / "ft0", "--task", "a", "--base", models / "base",
                        "--prefix-map", "foo")
    assert code == 1 and "--prefix-map takes BASE_PREFIX=TASK_PREFIX" in one_line_error(err, "fold")
    assert "'foo'" in err and not (tmp_path / "s").exists()
    code, err = run_cli(capsys, "fold", tmp_path / "s", models / "ft0", "--task", "a", "--base", tmp_path / "nobase")
    assert code == 1 and str(tmp_path / "nobase") in one_line_error(err, "fold")
    assert not (tmp_path / "s").exists()


def test_an_os_error_without_a_path_says_where(folded, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")  # as a write() raises it: no file name

    monkeypatch.setattr(decoupled, "export", full)
    code, err = run_cli(capsys, "export", folded / "exact", "a", tmp_path / "out")
    assert code == 1 and f"No space left on device (while writing {tmp_path / 'out'})" in one_line_error(err, "export")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_subcommand_shows_the_traceback(models, tmp_path, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = ["fold", str(a_file), str(models / "ft0"), "--task", "a", "--base", str(models / "base")]
    argv = ["--debug"] + argv if where == "before" else argv + ["--debug"]
    with pytest.raises(store.StateError, match="is a file"):
        cli.main(argv)
    assert cli.build_parser().parse_args(argv[1:] if where == "before" else argv[:-1]).debug is False


def test_the_command_line_exits_1_with_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "mmer_cl.cli", "export", str(ROOT), "a", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(ROOT) in result.stderr
    result = subprocess.run([sys.executable, "-m", "mmer_cl.cli", "--debug", "export", str(ROOT), "a",
                             str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr
