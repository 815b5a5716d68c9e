"""A user's own data through Hugging Face `datasets` (mmer_cl.data.hf), offline: a few hundred Fashion-MNIST
images as a DatasetDict, saved and loaded back (load_from_disk), written to Parquet, CSV and an image folder
and read back with load_dataset; Avalanche benchmarks split by a task column or by classes, trained with
Naive + MMERPlugin; a benchmark stream checked against the quick profile."""

import csv
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: nothing may reach the network

import numpy as np
import pytest
import torch

from mmer_cl import data
from mmer_cl.data import hf_benchmark, hf_stream

datasets = pytest.importorskip("datasets")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def source():
    """300 train / 100 test Fashion-MNIST images (float32 [1, 28, 28] in [0, 1]) with their labels and a task
    column: "upper" for classes 5-9, "lower" for 0-4."""
    splits = data.load_fashion_mnist()
    parts = {"train": data.subset(splits.train, 300), "test": data.subset(splits.test, 100)}
    out = {}
    for split, part in parts.items():
        x = part.inputs.float().div(255).numpy()
        y = part.targets.numpy()
        out[split] = {"x": x, "y": y, "task": np.where(y >= 5, "upper", "lower").tolist(), "pixels": part.inputs}
    return out


def as_dataset(part, **extra):
    return datasets.Dataset.from_dict({"x": part["x"], "y": part["y"], "task": part["task"], **extra})


@pytest.fixture(scope="module")
def dataset_dict(source):
    return datasets.DatasetDict(train=as_dataset(source["train"]), test=as_dataset(source["test"]))


@pytest.fixture(scope="module")
def from_disk(dataset_dict, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "fmnist"
    dataset_dict.save_to_disk(str(folder))
    return folder


def stacked(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items]), \
        torch.tensor([item[2] for item in items])


def rows_of(part, keep):
    keep = np.asarray(keep)
    return torch.from_numpy(part["x"][keep]), torch.from_numpy(part["y"][keep])


def by_class(part, classes):
    return [i for c in classes for i in np.nonzero(part["y"] == c)[0]]


@pytest.mark.parametrize("task_labels", [True, False], ids=["task-incremental", "class-incremental"])
def test_load_from_disk_split_by_classes_as_nc_benchmark(source, from_disk, task_labels):
    benchmark = hf_benchmark(datasets.load_from_disk(str(from_disk)), "x", "y", n_experiences=5,
                             task_labels=task_labels)
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == 5
    for i, (train, test) in enumerate(zip(benchmark.train_stream, benchmark.test_stream)):
        group = [2 * i, 2 * i + 1]
        assert sorted(train.classes_in_this_experience) == group
        assert train.task_labels == [i if task_labels else 0] == test.task_labels
        for experience, split in ((train, "train"), (test, "test")):
            x, y, t = stacked(experience.dataset)
            # nc_benchmark keeps each class's rows in their order, the classes one after the other
            want_x, want_y = rows_of(source[split], by_class(source[split], group))
            assert x.dtype == torch.float32 and torch.equal(x, want_x) and torch.equal(y, want_y)  # labels as given
            assert set(t.tolist()) == {i if task_labels else 0}


@pytest.mark.parametrize("task_labels", [True, False], ids=["task-incremental", "class-incremental"])
def test_a_task_column_gives_one_experience_per_task_in_order_of_first_appearance(source, from_disk, task_labels):
    benchmark = hf_benchmark(datasets.load_from_disk(str(from_disk)), "x", "y", task_column="task",
                             task_labels=task_labels)
    order = list(dict.fromkeys(source["train"]["task"]))
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == len(order) == 2
    for i, (task, train, test) in enumerate(zip(order, benchmark.train_stream, benchmark.test_stream)):
        expected = set(range(5, 10)) if task == "upper" else set(range(5))
        assert set(train.classes_in_this_experience) == expected
        assert train.task_label == test.task_label == (i if task_labels else 0)
        for experience, split in ((train, "train"), (test, "test")):
            x, y, _ = stacked(experience.dataset)
            want_x, want_y = rows_of(source[split], [v == task for v in source[split]["task"]])
            assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_a_single_dataset_is_split_by_test_fraction_seeded_and_stratified(source):
    whole = as_dataset(source["train"])
    benchmark = hf_benchmark(whole, "x", "y", task_column="task", test_fraction=0.2, seed=3)
    train = torch.cat([torch.tensor(list(exp.dataset.targets)) for exp in benchmark.train_stream])
    test = torch.cat([torch.tensor(list(exp.dataset.targets)) for exp in benchmark.test_stream])
    assert len(train) + len(test) == 300 and len(test) == 60
    counts = torch.bincount(torch.as_tensor(source["train"]["y"]), minlength=10)
    assert (torch.bincount(test, minlength=10) - counts * 0.2).abs().max() <= 1  # every class keeps its share
    # the same seed gives the same split, another seed another one; train and test are disjoint rows
    x_test = torch.cat([stacked(exp.dataset)[0] for exp in benchmark.test_stream])
    again = hf_benchmark(whole, "x", "y", task_column="task", test_fraction=0.2, seed=3)
    other = hf_benchmark(whole, "x", "y", task_column="task", test_fraction=0.2, seed=4)
    assert torch.equal(x_test, torch.cat([stacked(exp.dataset)[0] for exp in again.test_stream]))
    assert not torch.equal(x_test, torch.cat([stacked(exp.dataset)[0] for exp in other.test_stream]))
    x_train = torch.cat([stacked(exp.dataset)[0] for exp in benchmark.train_stream]).flatten(1)
    assert not (x_train[:, None] == x_test.flatten(1)[None]).all(-1).any()


def test_parquet_files_read_back_with_load_dataset(source, dataset_dict, tmp_path):
    files = {}
    for split in ("train", "test"):
        files[split] = str(tmp_path / f"{split}.parquet")
        dataset_dict[split].to_parquet(files[split])
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    benchmark = hf_benchmark(loaded, "x", "y", n_experiences=2)
    x, y, _ = stacked(benchmark.train_stream[1].dataset)
    want_x, want_y = rows_of(source["train"], by_class(source["train"], range(5, 10)))
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def write_pixel_csv(part, path):
    """The usual CSV of images (Kaggle's Fashion-MNIST): label, task, then one column per pixel."""
    flat = part["x"].reshape(len(part["y"]), -1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "task"] + [f"pixel{i}" for i in range(flat.shape[1])])
        for label, task, row in zip(part["y"], part["task"], flat):
            writer.writerow([int(label), task] + [repr(float(v)) for v in row])


def test_csv_files_with_one_column_per_pixel_read_back_with_load_dataset(source, tmp_path):
    files = {}
    for split in ("train", "test"):
        files[split] = str(tmp_path / f"{split}.csv")
        write_pixel_csv(source[split], files[split])
    loaded = datasets.load_dataset("csv", data_files=files, cache_dir=str(tmp_path / "cache"))
    pixels = [f"pixel{i}" for i in range(784)]
    benchmark = hf_benchmark(loaded, pixels, "label", task_column="task", input_shape=(1, 28, 28))
    order = list(dict.fromkeys(source["train"]["task"]))
    x, y, _ = stacked(benchmark.test_stream[0].dataset)
    want_x, want_y = rows_of(source["test"], [v == order[0] for v in source["test"]["task"]])
    assert x.shape[1:] == (1, 28, 28) and torch.equal(x, want_x) and torch.equal(y, want_y)
    # an array column written to CSV as it is comes back as text: refused, saying what to do
    as_dataset(source["test"]).to_csv(str(tmp_path / "arrays.csv"))
    arrays = datasets.load_dataset("csv", data_files=str(tmp_path / "arrays.csv"), cache_dir=str(tmp_path / "c2"))
    with pytest.raises(ValueError, match=r"column 'x' .*holds text.*tokenize.*one column per value"):
        hf_benchmark(arrays["train"], "x", "y", n_experiences=2)


def write_image_folder(source, root, per_class, rgb=False):
    """<root>/<split>/c<label>/<row>.png for the first `per_class` rows of each class, with a metadata.csv
    (file_name, label, task, row) when rgb (then the labels come from the metadata, not the folders)."""
    from PIL import Image

    written = {}
    for split, part in source.items():
        pixels = part["pixels"].squeeze(1).numpy()
        rows = [i for c in range(10) for i in np.nonzero(part["y"] == c)[0][:per_class]]
        meta = []
        for i in rows:
            folder = root / split / f"c{part['y'][i]}"
            folder.mkdir(parents=True, exist_ok=True)
            image = np.stack([pixels[i], 255 - pixels[i], pixels[i] // 2], -1) if rgb else pixels[i]
            Image.fromarray(image).save(folder / f"{i:05d}.png")
            meta.append([f"c{part['y'][i]}/{i:05d}.png", int(part["y"][i]), part["task"][i], int(i)])
        if rgb:
            with open(root / split / "metadata.csv", "w", newline="") as f:
                csv.writer(f).writerows([["file_name", "label", "task", "row"]] + meta)
        written[split] = rows
    return written


def test_an_image_folder_by_class_folders(source, tmp_path):
    write_image_folder(source, tmp_path / "images", per_class=4)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), cache_dir=str(tmp_path / "c"))
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert loaded["train"].features["label"].names == [f"c{i}" for i in range(10)]
    benchmark = hf_benchmark(loaded, "image", "label", n_experiences=5)
    assert [sorted(e.classes_in_this_experience) for e in benchmark.train_stream] == [[0, 1], [2, 3], [4, 5],
                                                                                      [6, 7], [8, 9]]
    x, y, _ = stacked(benchmark.train_stream[2].dataset)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1

    def key(images, labels):  # order-free comparison of the images of each class
        return sorted((int(label), image.numpy().tobytes()) for image, label in zip(images, labels))
    part = source["train"]
    chosen = [i for c in (4, 5) for i in np.nonzero(part["y"] == c)[0][:4]]
    assert key(x, y) == key(part["pixels"][chosen].float().div(255), part["y"][chosen])


def test_an_image_folder_with_metadata_rgb_and_a_task_column(source, tmp_path):
    rows = write_image_folder(source, tmp_path / "images", per_class=3, rgb=True)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), cache_dir=str(tmp_path / "c"))
    benchmark = hf_benchmark(loaded, "image", "label", task_column="task")
    assert len(benchmark.train_stream) == 2
    x, y, _ = stacked(benchmark.train_stream[0].dataset)
    assert x.shape[1:] == (3, 28, 28)
    # row r of the loaded train split is source row loaded["train"]["row"][r]: channel 1 is the inverted image
    first_task = loaded["train"]["task"][0]
    source_rows = [r for r, t in zip(loaded["train"]["row"], loaded["train"]["task"]) if t == first_task]
    gray = source["train"]["pixels"][source_rows].float()
    assert torch.equal(x[:, 0:1], gray.div(255)) and torch.equal(x[:, 1:2], (255 - gray).div(255))
    assert torch.equal(y, torch.as_tensor(source["train"]["y"][source_rows]))
    assert sorted(rows["train"]) == sorted(loaded["train"]["row"])


def test_clear_errors(source, dataset_dict):
    with pytest.raises(ValueError, match=r"input column 'image' is not in the 'train' split; "
                                         r"its columns: \['x', 'y', 'task'\]"):
        hf_benchmark(dataset_dict, "image", "y", n_experiences=2)
    with pytest.raises(ValueError, match=r"label column 'label' is not in the 'train' split"):
        hf_benchmark(dataset_dict, "x", "label", n_experiences=2)
    with pytest.raises(ValueError, match=r"task column 'domain' is not in the 'train' split"):
        hf_benchmark(dataset_dict, "x", "y", task_column="domain")
    with pytest.raises(ValueError, match=r"no test split 'test'; its splits: \['train', 'validation'\]"):
        hf_benchmark(datasets.DatasetDict(train=dataset_dict["train"], validation=dataset_dict["test"]), "x", "y",
                     n_experiences=2)
    new_task = dataset_dict["test"].map(lambda row, i: {"task": "new" if i == 0 else row["task"]},
                                        with_indices=True)
    with pytest.raises(ValueError, match=r"task column 'task': the 'test' split has tasks the train split "
                                         r"lacks: \['new'\]"):
        hf_benchmark(datasets.DatasetDict(train=dataset_dict["train"], test=new_task), "x", "y", task_column="task")
    with pytest.raises(ValueError, match=r"n_experiences=3 does not divide the 10 classes"):
        hf_benchmark(dataset_dict, "x", "y", n_experiences=3)
    with pytest.raises(ValueError, match=r"exactly one of the two"):
        hf_benchmark(dataset_dict, "x", "y")
    with pytest.raises(ValueError, match=r"exactly one of the two"):
        hf_stream("s", dataset_dict, "x", "y", task_column="task", n_experiences=2)
    small = {"x": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 1.0]], "task": ["a", "a", "b", "b"]}
    with pytest.raises(ValueError, match=r"label column 'y' \(the dataset\) holds Value\('float64'\), not integer"):
        hf_benchmark(datasets.Dataset.from_dict({**small, "y": [0.0, 1.0, 0.0, 1.0]}), "x", "y", n_experiences=2)
    with pytest.raises(ValueError, match=r"not integer class labels; encode them .*class_encode_column\('y'\)"):
        hf_benchmark(datasets.Dataset.from_dict({**small, "y": ["cat", "dog", "cat", "dog"]}), "x", "y",
                     n_experiences=2)
    ragged = datasets.Dataset.from_dict({"x": [[0.0, 1.0], [1.0], [0.5, 0.5], [1.0, 1.0]], "y": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=r"column 'x' \(the dataset\): rows 0 and 1 have shapes \(2,\) and \(1,\)"):
        hf_benchmark(ragged, "x", "y", n_experiences=2)
    nested = datasets.Dataset.from_dict({"x": [[[0.0, 1.0], [1.0]]] * 4, "y": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=r"rows hold nested lists of different lengths"):
        hf_benchmark(nested, "x", "y", n_experiences=2)
    text = datasets.Dataset.from_dict({"x": ["a shirt", "a shoe", "a bag", "a coat"], "y": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=r"column 'x' \(the dataset\) holds text .*tokenize it first.*token ids"):
        hf_benchmark(text, "x", "y", n_experiences=2)
    with pytest.raises(ValueError, match=r"do not fit input_shape \(3, 3\)"):
        hf_benchmark(dataset_dict, "x", "y", n_experiences=2, input_shape=(3, 3))


def test_images_of_different_sizes_are_refused():
    from PIL import Image

    images = [Image.new("L", (8, 8)), Image.new("L", (8, 8)), Image.new("L", (6, 8)), Image.new("L", (8, 8))]
    ds = datasets.Dataset.from_dict({"image": images, "y": [0, 1, 0, 1]}).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match=r"image 0 is 8x8 with 1 channel and image 2 6x8 with 1 channel"):
        hf_benchmark(ds, "image", "y", n_experiences=2, test_fraction=0.5)


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_the_benchmark_trains_with_naive_and_the_mmer_plugin(from_disk, tmp_path):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import SimpleMLP
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from mmer_cl import MMERPlugin, store

    benchmark = hf_benchmark(datasets.load_from_disk(str(from_disk)), "x", "y", n_experiences=5, task_labels=False)
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=784, hidden_size=16, drop_rate=0)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=100,
                     plugins=[MMERPlugin(tmp_path / "state")],
                     evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    for experience in benchmark.train_stream:
        strategy.train(experience)
    results = strategy.eval(benchmark.test_stream)
    assert 0 <= results["Top1_Acc_Stream/eval_phase/test_stream/Task000"] <= 1
    assert [t["name"] for t in store.load(tmp_path / "state").tasks] == [f"exp{i:03d}" for i in range(5)]


def test_a_stream_with_a_task_column_passes_check_on_the_quick_profile(source, from_disk):
    from mmer_cl.bench.profiles import PROFILES

    quick = PROFILES["quick"]
    fn = hf_stream("fm", str(from_disk), "x", "y", task_column="task")  # a save_to_disk folder, loaded on first use
    stream = fn(quick, 0).check()
    order = list(dict.fromkeys(source["train"]["task"]))
    assert stream.tasks == [f"fm_{t}" for t in order]
    assert [s.modality for s in stream.specs] == ["vision", "vision"]
    assert all(s.input_shape == (1, 28, 28) and s.input_dtype == torch.float32 for s in stream.specs)
    assert stream.steps == quick.steps and stream.batch_size == quick.batch_size
    for spec, task in zip(stream.specs, order):
        train, val, test = stream.train[spec.name], stream.val[spec.name], stream.test[spec.name]
        classes = set(range(5, 10)) if task == "upper" else set(range(5))
        assert spec.num_classes == max(classes) + 1  # labels as given
        assert set(train.targets.tolist()) == set(val.targets.tolist()) == set(test.targets.tolist()) == classes
        assert len(train) == quick.train_per_task and len(test) == min(quick.test_per_task, 50)
        assert len(val) == 15  # 10% of the task's 150 train rows (quick asks for up to 32)
        assert not set(train.index.tolist()) & set(val.index.tolist())  # val carved from train, disjoint
        for part, split in ((train, "train"), (val, "train"), (test, "test")):
            want_x = torch.from_numpy(source[split]["x"][part.index.numpy()])
            assert torch.equal(part.inputs, want_x)
            assert torch.equal(part.targets, torch.from_numpy(source[split]["y"][part.index.numpy()]))
            assert all(source[split]["task"][i] == task for i in part.index.tolist())
    other = fn(quick, 1)  # another seed: another validation set, the same test rows
    name = stream.tasks[0]
    assert not torch.equal(other.val[name].index, stream.val[name].index)
    assert torch.equal(other.test[name].index, stream.test[name].index)  # all 50 test rows (quick asks for 64)


def test_a_stream_split_by_classes_remaps_labels_and_takes_a_model_of_its_own(dataset_dict):
    from mmer_cl.bench.profiles import PROFILES

    class Model(torch.nn.Module):
        def __init__(self, specs):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8))
            self.heads = torch.nn.ModuleDict({s.name: torch.nn.Linear(8, s.num_classes) for s in specs})

        def forward(self, x, task):
            return self.heads[task](self.backbone(x))

    stream = hf_stream("pairs", dataset_dict, "x", "y", n_experiences=5, steps=2, new_model=Model,
                       shared=lambda n: n.startswith("backbone."))(PROFILES["quick"], 0).check()
    assert stream.tasks == [f"pairs_{i}" for i in range(5)] and stream.steps == 2
    assert all(s.num_classes == 2 for s in stream.specs)
    for split in ("train", "val", "test"):
        assert all(set(d.targets.tolist()) == {0, 1} for d in getattr(stream, split).values())
    model = stream.model()
    assert set(model.heads) == set(stream.tasks) and stream.shared("backbone.1.weight")
    x, _ = stream.train["pairs_3"][0]
    assert model(x[None], task="pairs_3").shape == (1, 2)


def test_a_stream_infers_audio_and_text_and_refuses_what_no_modality_fits():
    from mmer_cl.bench.profiles import PROFILES

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    audio = datasets.Dataset.from_dict({"mel": rng.random((40, 8, 16), dtype=np.float32), "y": y})
    assert hf_stream("a", audio, "mel", "y", n_experiences=1)(PROFILES["quick"], 0).check().specs[0].modality == "audio"
    text = datasets.Dataset.from_dict({"ids": rng.integers(0, 100, (40, 12)), "y": y})
    spec = hf_stream("t", text, "ids", "y", n_experiences=1)(PROFILES["quick"], 0).check().specs[0]
    assert spec.modality == "text" and spec.input_dtype == torch.int64 and spec.input_shape == (12,)
    flat = datasets.Dataset.from_dict({"v": rng.random((40, 5), dtype=np.float32), "y": y})
    with pytest.raises(ValueError, match=r"stream 'f': cannot infer a modality for inputs of shape \(5,\)"):
        hf_stream("f", flat, "v", "y", n_experiences=1)(PROFILES["quick"], 0)
    custom = hf_stream("f", flat, "v", "y", n_experiences=1, new_model=lambda specs: torch.nn.Linear(5, 2))
    assert custom(PROFILES["quick"], 0).check().specs[0].modality == "custom"


def test_importing_mmer_cl_data_imports_neither_datasets_nor_avalanche():
    code = "import sys, mmer_cl.data; print(sorted({'datasets', 'avalanche'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
