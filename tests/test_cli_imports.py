"""`mmer-cl fold`, `inspect` and `export` start without the packages only other commands need: a fold of a
transformers folder or of a PEFT LoRA adapter, an inspect and an export import neither Avalanche, PEFT,
transformers, torchvision, datasets nor Ray (torch and numba they do need). Run in a fresh interpreter, since
this one has imported them all."""

import json
import subprocess
import sys

from test_checkpoints import _adapter, finetune, save, tiny_llama

HEAVY = ("avalanche", "peft", "transformers", "torchvision", "datasets", "ray")

CHILD = """
import json, sys
from mmer_cl import cli
heavy = {heavy!r}
def loaded():
    return sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))
import mmer_cl.fold, mmer_cl.decoupled, mmer_cl.analysis
seen = {{"import": loaded()}}
root = sys.argv[1]
commands = {{"fold a model": ["fold", root + "/s", root + "/ft", "--task", "full", "--base", root + "/base"],
            "fold an adapter": ["fold", root + "/s", root + "/adapter", "--task", "lora"],
            "inspect": ["inspect", root + "/s"], "export": ["export", root + "/s", "lora", root + "/out"]}}
for label, command in commands.items():
    if cli.main(command):
        raise SystemExit(f"mmer-cl {{label}} failed")
    seen[label] = loaded()
print(json.dumps(seen))
"""


def test_fold_inspect_and_export_import_no_heavy_package(tmp_path):
    base = tiny_llama()
    save(base, tmp_path / "base")
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    save(finetune(tiny_llama(), base_state, seed=1), tmp_path / "ft")
    _adapter(tmp_path, tiny_llama())
    child = subprocess.run([sys.executable, "-c", CHILD.format(heavy=HEAVY), str(tmp_path)], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert list(seen) == ["import", "fold a model", "fold an adapter", "inspect", "export"]
    assert all(loaded == [] for loaded in seen.values()), seen
