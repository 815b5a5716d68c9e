"""Your own data through Hugging Face `datasets`: an Avalanche benchmark, or a stream for `mmer-cl run`.

    benchmark = hf_benchmark(load_from_disk("my_data"), "image", "label", n_experiences=5)
    my_stream = hf_stream("mine", "my_data", "image", "label", task_column="domain")
    # then: mmer-cl run --stream my_module:my_stream

`dataset` is a `datasets.DatasetDict` with a train and a test split, or a single `Dataset` (split by
`test_fraction`, seeded and stratified by label, and by task when there is a task column), or the path of a
`save_to_disk` folder, or a function returning one of these (`hf_stream` loads it on first use). It may come
from `load_from_disk`, or from local files: `load_dataset("parquet" | "csv" | "imagefolder", ...)`.

Inputs: a numeric column (numbers, or nested lists / arrays of one fixed shape) is taken as it is, as
float32 (`hf_stream` keeps 1-D integer rows as int64 token ids); an image column (`datasets.Image`, PIL
images) becomes float32 [C, H, W] in [0, 1]. `input_column` may also list several scalar columns (a CSV's
pixel0, pixel1, ... columns), stacked per row in that order; `input_shape` reshapes each row (e.g. (1, 28,
28)). Text must be tokenized first (map it to token ids: then it is numeric); audio turned into features.
Labels: integers >= 0 (an integer or ClassLabel column). Experiences: one per distinct value of
`task_column` (in order of first appearance in the train split), or `n_experiences` groups of classes in
sorted class order, as Avalanche's `nc_benchmark` makes them.

`datasets` is imported inside the functions, so `import mmer_cl.data` stays cheap. The whole column is
read into memory as one tensor: this is for data sets that fit in RAM.
"""

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmer_cl.data.common import (
    LabelledTensors,
    as_avalanche,
    stratified_indices,
    subset,
)

TEXT_HINT = ("tokenize it first: map it to token ids (e.g. dataset.map(lambda r: tokenizer(r[column]), "
             "batched=True), then pass the ids column, which is numeric), or turn it into numeric features")


class _Table:
    """One split as tensors: inputs [N, *shape], labels [N], the task value of each row (or None), and each
    row's index in its split (`index`, kept by LabelledTensors as provenance)."""

    def __init__(self, inputs: Tensor, labels: Tensor, tasks: list | None, where: str):
        self.inputs, self.labels, self.tasks, self.where = inputs, labels, tasks, where
        self.index = torch.arange(len(labels))

    def take(self, index: Tensor) -> "_Table":
        part = _Table(self.inputs[index], self.labels[index],
                      None if self.tasks is None else [self.tasks[i] for i in index.tolist()], self.where)
        part.index = self.index[index]
        return part

    def labelled(self, rows: Tensor | None = None) -> LabelledTensors:
        rows = torch.arange(len(self.labels)) if rows is None else rows
        return LabelledTensors(self.inputs[rows], self.labels[rows], index=self.index[rows])


def _load(dataset):
    """A Dataset / DatasetDict as given, a save_to_disk folder, or what a zero-argument function returns."""
    if isinstance(dataset, (str, Path)):
        import datasets

        return datasets.load_from_disk(str(dataset))
    if callable(dataset):
        return dataset()
    return dataset


def _splits(dataset, train_split: str, test_split: str) -> dict | None:
    """{"train": Dataset, "test": Dataset} of a DatasetDict, or None for a single Dataset."""
    import datasets

    if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError("an IterableDataset (streaming=True) cannot be indexed into experiences; load it without "
                        "streaming (load_dataset(..., streaming=False)) or as a Dataset")
    if isinstance(dataset, datasets.Dataset):
        return None
    if isinstance(dataset, (datasets.DatasetDict, dict)):
        for role, split in (("train", train_split), ("test", test_split)):
            if split not in dataset:
                raise ValueError(f"the DatasetDict has no {role} split {split!r}; its splits: {sorted(dataset)}. "
                                 f"Name it with {role}_split=..., or pass one Dataset (e.g. dataset[{train_split!r}]) "
                                 f"to split it by test_fraction")
        return {"train": dataset[train_split], "test": dataset[test_split]}
    raise TypeError(f"expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")


def _leaf(feature):
    """The innermost feature of nested List / Sequence / LargeList features."""
    import datasets

    while isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        feature = feature.feature
    return feature


def _is_text(dtype: str) -> bool:
    return dtype in ("string", "large_string", "large_utf8", "utf8")


def _numeric(ds, column: str, where: str, feature, fetch: bool = True) -> np.ndarray | None:
    """The column as one array [N, *shape] (after checking that `feature`, its type, is numeric and the rows
    have one shape); fetch=False only checks the type of a column of scalars."""
    import datasets

    leaf = _leaf(feature)
    if isinstance(leaf, datasets.Image) and leaf is not feature:
        raise ValueError(f"column {column!r} ({where}) holds lists of images; one image per row is supported")
    if isinstance(leaf, (datasets.Audio, datasets.Video)) or type(leaf).__name__ in ("Pdf", "Nifti", "Mesh"):
        raise ValueError(f"column {column!r} ({where}) holds {type(leaf).__name__} values; turn them into numeric "
                         f"features first (e.g. log-mel spectrograms with dataset.map), then pass that column")
    dtype = getattr(leaf, "dtype", None)
    if isinstance(leaf, datasets.ClassLabel):
        dtype = "int64"
    if dtype is None or _is_text(str(dtype)):
        what = "text" if dtype is not None else type(leaf).__name__
        raise ValueError(f"column {column!r} ({where}) holds {what} ({feature}), not numbers; {TEXT_HINT}. "
                         f"(A CSV cannot hold an array in one cell: write one column per value and pass "
                         f"input_column=[their names], with input_shape=... to restore the shape)")
    if dtype != "bool" and not dtype.startswith(("int", "uint", "float")):
        raise ValueError(f"column {column!r} ({where}) holds {dtype} values; expected numbers")
    nulls = ds.data.column(column).null_count
    if nulls:
        raise ValueError(f"column {column!r} ({where}) has {nulls} missing values")
    if not fetch:
        if not isinstance(feature, datasets.Value | datasets.ClassLabel):
            raise ValueError(f"column {column!r} ({where}) holds {feature}; input_column may list several "
                             f"columns only of one number each (e.g. a CSV's pixel columns)")
        return None
    values = ds.with_format("numpy", columns=[column])[:][column]
    if values.dtype == object:  # rows of different shapes (or lengths)
        shapes = [np.shape(v) for v in values]
        first = next((i for i, s in enumerate(shapes) if s != shapes[0]), None)
        which = (f"rows 0 and {first} have shapes {shapes[0]} and {shapes[first]}" if first is not None
                 else "rows hold nested lists of different lengths")
        raise ValueError(f"column {column!r} ({where}): {which}; every input must have one shape (pad, crop or "
                         f"resize them first, e.g. with dataset.map)")
    return values


def _image(image, column: str, where: str, row: int) -> np.ndarray:
    """A PIL image as an [C, H, W] array scaled to [0, 1]."""
    if image is None:
        raise ValueError(f"column {column!r} ({where}): row {row} has no image")
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255)
    elif array.dtype == np.uint16 or image.mode.startswith("I;16"):
        array = array.astype(np.float32) / np.float32(65535)
    else:
        raise ValueError(f"column {column!r} ({where}): row {row} is a {image.mode} image of {array.dtype}; "
                         f"convert it to 'L' or 'RGB' first")
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _images(ds, column: str, where: str) -> np.ndarray:
    arrays, first = [], None
    for row, image in enumerate(ds[column]):
        array = _image(image, column, where, row)
        if first is None:
            first = array.shape
        elif array.shape != first:
            raise ValueError(f"column {column!r} ({where}): image 0 is {_describe(first)} and image {row} "
                             f"{_describe(array.shape)}; every image must have one size and mode (resize or "
                             f"convert them first, e.g. dataset.map(lambda r: {{'{column}': "
                             f"r['{column}'].convert('RGB').resize((w, h))}}))")
        arrays.append(array)
    if not arrays:
        raise ValueError(f"{where} has no rows")
    return np.stack(arrays)


def _describe(shape) -> str:
    return f"{shape[2]}x{shape[1]} with {shape[0]} channel{'s' if shape[0] > 1 else ''}"


def _inputs(ds, input_column, where: str, input_shape, token_ids: bool) -> Tensor:
    import datasets

    columns = [input_column] if isinstance(input_column, str) else list(input_column)
    if not columns:
        raise ValueError("input_column names no column")
    for column in columns:
        _has(ds, column, where, "input")
    features = ds.features  # a deep copy each time it is read
    if len(columns) == 1 and isinstance(features[columns[0]], datasets.Image):
        values = _images(ds, columns[0], where)
    elif isinstance(input_column, str):
        values = _numeric(ds, input_column, where, features[input_column])
    else:  # several columns of one number each (a CSV's pixel columns), stacked per row
        for column in columns:
            _numeric(ds, column, where, features[column], fetch=False)
        table = ds.data.select(columns)  # one read of all of them, not one per column
        values = np.stack([np.asarray(table.column(c).to_numpy()) for c in columns], axis=1)
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if math.prod(values.shape[1:]) != math.prod(shape):
            raise ValueError(f"{where}: inputs of shape {tuple(values.shape[1:])} ({math.prod(values.shape[1:])} "
                             f"values) do not fit input_shape {shape}")
        values = values.reshape(len(values), *shape)
    if values.ndim == 1:  # one number per row
        values = values[:, None]
    if token_ids and values.ndim == 2 and values.dtype.kind in "iu":
        return torch.from_numpy(values.astype(np.int64))
    tensor = torch.from_numpy(np.ascontiguousarray(values).astype(np.float32))
    if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
        raise ValueError(f"{where}: the inputs hold missing values (NaN)")
    return tensor


def _has(ds, column: str, where: str, role: str) -> None:
    if column not in ds.column_names:
        raise ValueError(f"{role} column {column!r} is not in {where}; its columns: {ds.column_names}")


def _labels(ds, column: str, where: str) -> Tensor:
    import datasets

    _has(ds, column, where, "label")
    feature = ds.features[column]
    dtype = "int64" if isinstance(feature, datasets.ClassLabel) else getattr(feature, "dtype", None)
    if not isinstance(feature, (datasets.Value, datasets.ClassLabel)) or not str(dtype).startswith(("int", "uint")):
        hint = (f"; encode them as integers first, e.g. dataset.class_encode_column({column!r})"
                if isinstance(feature, datasets.Value) and _is_text(str(dtype)) else "")
        raise ValueError(f"label column {column!r} ({where}) holds {feature}, not integer class labels{hint}")
    if ds.data.column(column).null_count:
        raise ValueError(f"label column {column!r} ({where}) has {ds.data.column(column).null_count} missing labels")
    labels = torch.as_tensor(ds.with_format("numpy", columns=[column])[:][column].astype(np.int64))
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"label column {column!r} ({where}) has negative labels ({int(labels.min())}); "
                         f"labels must be class ids 0, 1, ...")
    return labels


def _table(ds, where: str, input_column, label_column, task_column, input_shape, token_ids) -> _Table:
    if len(ds) == 0:
        raise ValueError(f"{where} has no rows")
    labels = _labels(ds, label_column, where)
    tasks = None
    if task_column is not None:
        _has(ds, task_column, where, "task")
        tasks = list(ds[task_column])
        if any(t is None for t in tasks):
            raise ValueError(f"task column {task_column!r} ({where}) has rows without a task")
    return _Table(_inputs(ds, input_column, where, input_shape, token_ids), labels, tasks, where)


def _key(table: _Table, order: list) -> Tensor:
    """A stratum per (task, label), for seeded stratified splits."""
    if table.tasks is None:
        return table.labels
    position = {t: i for i, t in enumerate(order)}
    return torch.as_tensor([position[t] for t in table.tasks]) * (int(table.labels.max()) + 1) + table.labels


def _carve(table: _Table, fraction: float, seed: int, what: str) -> tuple[_Table, _Table]:
    """(rest, part): a seeded sample of round(fraction * N) rows (at least 1), stratified by task and label."""
    if not 0 < fraction < 1:
        raise ValueError(f"{what} must be between 0 and 1, got {fraction}")
    n = max(1, round(fraction * len(table.labels)))
    if n >= len(table.labels):
        raise ValueError(f"{table.where}: {len(table.labels)} rows are too few to set {what}={fraction} of them apart")
    order = _first_seen(table.tasks) if table.tasks is not None else []
    part = stratified_indices(_key(table, order), n, torch.Generator().manual_seed(seed))
    keep = torch.ones(len(table.labels), dtype=torch.bool)
    keep[part] = False
    return table.take(torch.nonzero(keep).flatten()), table.take(part)


def _first_seen(values: list) -> list:
    return list(dict.fromkeys(values))


def _tables(dataset, input_column, label_column, task_column, train_split, test_split, test_fraction, seed,
            input_shape, token_ids) -> tuple[_Table, _Table]:
    splits = _splits(dataset, train_split, test_split)
    args = (input_column, label_column, task_column, input_shape, token_ids)
    if splits is None:
        whole = _table(dataset, "the dataset", *args)
        train, test = _carve(whole, test_fraction, seed, "test_fraction")
        train.where, test.where = "the train part", "the test part"
    else:
        train = _table(splits["train"], f"the {train_split!r} split", *args)
        test = _table(splits["test"], f"the {test_split!r} split", *args)
        if train.inputs.shape[1:] != test.inputs.shape[1:] or train.inputs.dtype != test.inputs.dtype:
            raise ValueError(f"inputs of the {train_split!r} split are {tuple(train.inputs.shape[1:])} "
                             f"{train.inputs.dtype}, of the {test_split!r} split {tuple(test.inputs.shape[1:])} "
                             f"{test.inputs.dtype}: both splits must have one input shape")
    return train, test


def _task_order(train: _Table, test: _Table, task_column: str) -> list:
    order = _first_seen(train.tasks)
    unseen = [t for t in _first_seen(test.tasks) if t not in set(order)]
    if unseen:
        raise ValueError(f"task column {task_column!r}: {test.where} has tasks the train split lacks: {unseen}")
    absent = [t for t in order if t not in set(test.tasks)]
    if absent:
        raise ValueError(f"task column {task_column!r}: {test.where} has no rows of tasks {absent}")
    return order


def _class_groups(train: _Table, test: _Table, n_experiences: int) -> list[list[int]]:
    classes = sorted(set(train.labels.tolist()))
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or n_experiences < 1:
        raise ValueError(f"n_experiences must be a positive integer, got {n_experiences!r}")
    if len(classes) % n_experiences:
        raise ValueError(f"n_experiences={n_experiences} does not divide the {len(classes)} classes of "
                         f"{train.where} ({classes}); choose a divisor of {len(classes)}")
    extra = sorted(set(test.labels.tolist()) - set(classes))
    if extra:
        raise ValueError(f"{test.where} has classes the train split lacks: {extra}")
    size = len(classes) // n_experiences
    return [classes[i * size:(i + 1) * size] for i in range(n_experiences)]


def _how(task_column, n_experiences) -> None:
    if (task_column is None) == (n_experiences is None):
        raise ValueError("say how to split the data into experiences: task_column=<column> (one experience per "
                         "task) or n_experiences=<int> (groups of classes), exactly one of the two")


def hf_benchmark(dataset, input_column, label_column, *, task_column=None, n_experiences=None, task_labels=True,
                 seed=0, train_split="train", test_split="test", test_fraction=0.2, input_shape=None):
    """An Avalanche 0.6 benchmark (train_stream / test_stream) from a datasets.Dataset or DatasetDict.

    By `task_column`: one experience per task value, in order of first appearance in the train split, task
    label = its index (0 for all with task_labels=False), labels as given. By `n_experiences`: Avalanche's
    `nc_benchmark` over the sorted class order (task-incremental with task_labels, else class-incremental),
    labels as given. Inputs are float32 tensors (images [C, H, W] in [0, 1]); items are (x, y, task_label).
    """
    _how(task_column, n_experiences)
    dataset = _load(dataset)
    train, test = _tables(dataset, input_column, label_column, task_column, train_split, test_split,
                          test_fraction, seed, input_shape, token_ids=False)
    if n_experiences is not None:
        from avalanche.benchmarks import nc_benchmark

        groups = _class_groups(train, test, n_experiences)
        return nc_benchmark(train.labelled(), test.labelled(), n_experiences=n_experiences,
                            task_labels=bool(task_labels), seed=seed,
                            fixed_class_order=[c for group in groups for c in group])
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    order = _task_order(train, test, task_column)
    streams = {}
    for name, table in (("train", train), ("test", test)):
        streams[name] = [as_avalanche(table.labelled(_rows(table, task)), i if task_labels else 0)
                         for i, task in enumerate(order)]
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))


def _rows(table: _Table, task) -> Tensor:
    return torch.as_tensor([i for i, t in enumerate(table.tasks) if t == task], dtype=torch.long)


def _task_name(prefix: str, value, taken: set) -> str:
    name = re.sub(r"[^0-9A-Za-z_-]+", "_", f"{prefix}_{value}").strip("_") or prefix
    base, n = name, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def infer_modality(shape: tuple, dtype: torch.dtype) -> str | None:
    """What the library's mini-MLLM calls inputs of this per-example shape and dtype: [C, H, W] float ->
    vision, [n_mels, frames] float -> audio, [length] int64 -> text; None otherwise."""
    if dtype == torch.int64 and len(shape) == 1:
        return "text"
    if dtype.is_floating_point and len(shape) == 3:
        return "vision"
    if dtype.is_floating_point and len(shape) == 2:
        return "audio"
    return None


def hf_stream(name, dataset, input_column, label_column, *, task_column=None, n_experiences=None, modality=None,
              val_fraction=0.1, steps=None, new_model=None, shared=None, train_split="train", test_split="test",
              test_fraction=0.2, input_shape=None):
    """A benchmark stream fn(profile, seed) -> StreamData of your data, for `mmer-cl run --stream module:fn`.

    Tasks as in `hf_benchmark` (task names `<name>_<task value>`, or `<name>_<i>` for class groups, whose
    labels are remapped to 0..C-1 within each task). The test split is fixed (seed 0, if split by
    test_fraction); validation is carved from each task's train rows by the run's seed (stratified,
    disjoint); the profile's train/val/test_per_task, batch_size and steps (unless `steps`) are honoured.
    `modality` is inferred from the inputs when not given (see infer_modality) so the library's mini-MLLM
    fits; or bring `new_model` (fn(specs) -> a module with forward(x, task=name)) and `shared`.
    `dataset` may also be a save_to_disk folder or a function returning the data, loaded on first use.
    """
    _how(task_column, n_experiences)
    options = dict(name=name, dataset=dataset, input_column=input_column, label_column=label_column,
                   task_column=task_column, n_experiences=n_experiences, modality=modality, train_split=train_split,
                   test_split=test_split, test_fraction=test_fraction, input_shape=input_shape, custom=new_model is not None)
    cache = {}

    def make(profile, seed):
        if not cache:
            cache.update(_stream_tasks(**options))
        return _stream_data(name, cache, profile, seed, val_fraction, steps, new_model, shared)

    make.__name__ = make.__qualname__ = f"hf_stream_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
    make.__doc__ = f"Stream '{name}' from a Hugging Face data set (mmer_cl.data.hf.hf_stream)."
    return make


def _stream_tasks(name, dataset, input_column, label_column, task_column, n_experiences, modality, train_split,
                  test_split, test_fraction, input_shape, custom: bool) -> dict:
    """The data read once: train and test tables, the modality, and each task's rows (and class group)."""
    train, test = _tables(_load(dataset), input_column, label_column, task_column, train_split, test_split,
                          test_fraction, 0, input_shape, token_ids=True)
    shape, dtype = tuple(train.inputs.shape[1:]), train.inputs.dtype
    kind = modality or infer_modality(shape, dtype)
    if kind is None:
        if not custom:
            raise ValueError(f"stream '{name}': cannot infer a modality for inputs of shape {shape} {dtype} (the "
                             f"mini-MLLM takes [C, H, W] float images, [n_mels, frames] float audio features or "
                             f"[length] int64 token ids); reshape them (input_shape=...), or pass modality=... and "
                             f"new_model=...")
        kind = "custom"
    taken, found = set(), []
    if task_column is not None:
        for value in _task_order(train, test, task_column):
            found.append((_task_name(name, value, taken), (_rows(train, value), _rows(test, value)), None))
    else:
        for i, group in enumerate(_class_groups(train, test, n_experiences)):
            rows = tuple(torch.nonzero(torch.isin(t.labels, torch.tensor(group))).flatten() for t in (train, test))
            found.append((_task_name(name, i, taken), rows, group))
    return {"train": train, "test": test, "modality": kind, "shape": shape, "dtype": dtype, "found": found}


def _stream_data(name, c: dict, profile, seed: int, val_fraction: float, steps, new_model, shared):
    """One run's StreamData: per task, labels remapped within a class group, validation carved from train by
    the seed, the profile's sizes."""
    from mmer_cl.bench.glue import TaskSpec
    from mmer_cl.bench.streams import StreamData

    specs, sets = [], {"train": {}, "val": {}, "test": {}}
    for task, (train_rows, test_rows), group in c["found"]:
        parts = {}
        for split, table, rows in (("train", c["train"], train_rows), ("test", c["test"], test_rows)):
            labels = table.labels[rows]
            if group is not None:
                labels = torch.searchsorted(torch.tensor(group), labels)
            parts[split] = LabelledTensors(table.inputs[rows], labels, index=table.index[rows])
        num_classes = len(group) if group is not None else int(max(parts["train"].targets.max(),
                                                                    parts["test"].targets.max())) + 1
        train_part, val_part = _split_val(parts["train"], val_fraction, seed, f"stream '{name}', task '{task}'")
        sets["train"][task] = subset(train_part, profile.train_per_task, seed)
        sets["val"][task] = subset(val_part, profile.val_per_task, seed)
        sets["test"][task] = subset(parts["test"], profile.test_per_task, seed)
        specs.append(TaskSpec(task, c["modality"], c["shape"], c["dtype"], num_classes))
    extra = {} if shared is None else {"shared": shared}
    model = None if new_model is None else (lambda: new_model(list(specs)))
    return StreamData(name, specs, sets["train"], sets["val"], sets["test"],
                      steps=int(steps if steps is not None else profile.steps), batch_size=profile.batch_size,
                      new_model=model, **extra)


def _split_val(train: LabelledTensors, fraction: float, seed: int, where: str):
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {fraction}")
    n = max(1, round(fraction * len(train)))
    if n >= len(train):
        raise ValueError(f"{where}: {len(train)} train rows are too few to set val_fraction={fraction} apart")
    val = stratified_indices(train.targets, n, torch.Generator().manual_seed(seed))
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val] = False
    return train.select(torch.nonzero(keep).flatten()), train.select(val)
