"""The offline loaders on the real Debian data: split sizes and disjointness, determinism (splits and the
generated audio), shapes and dtypes, Avalanche datasets and SplitFMNIST offline, clear errors when data is
missing. Audio runs on a tiny setting in a temporary cache."""

import dataclasses
import json
import re

import pytest
import torch
from torch.utils.data import Dataset

from mmer_cl import data
from mmer_cl.data import spoken_words, wordnet

torch.set_num_threads(1)
TINY = data.SpokenWordsSettings(words=("yes", "no", "seven"), voices=("f1", "Annie", "m3", "klatt2"), renditions=2)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MMER_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def fmnist():
    return data.load_fashion_mnist(seed=0)


@pytest.fixture(scope="module")
def glosses():
    return data.load_wordnet(seed=0)


def disjoint(*groups) -> bool:
    sets = [set(g) for g in groups]
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])


# ---- Fashion-MNIST -----------------------------------------------------------------------------------------


def test_fashion_mnist_splits(fmnist):
    assert fmnist.sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert len(fmnist.classes) == 10
    train, val = fmnist.train.index.tolist(), fmnist.val.index.tolist()
    assert disjoint(train, val) and sorted(train + val) == list(range(60000))
    assert fmnist.val.targets.bincount().tolist() == [600] * 10
    assert fmnist.test.index.tolist() == list(range(10000))
    x, y = fmnist.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert type(y) is int and fmnist.train.targets.dtype == torch.long


def test_fashion_mnist_split_is_fixed_by_the_seed(fmnist):
    assert torch.equal(data.load_fashion_mnist(seed=0).val.index, fmnist.val.index)
    assert not torch.equal(data.load_fashion_mnist(seed=1).val.index, fmnist.val.index)


def test_fashion_mnist_missing_names_the_package(tmp_path, monkeypatch):
    with pytest.raises(data.MissingDataError, match=r"apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path)
    monkeypatch.setenv("MMER_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(data.MissingDataError, match=str(tmp_path)):
        data.load_fashion_mnist()


def test_split_fmnist_constructs_offline(monkeypatch):
    import torchvision.datasets.mnist as tv_mnist
    from avalanche.benchmarks.classic import SplitFMNIST

    def no_network(*args, **kwargs):
        raise AssertionError("SplitFMNIST tried to download")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    root = data.fashion_mnist_root()
    bm = SplitFMNIST(n_experiences=5, return_task_id=True, dataset_root=root, seed=0)
    assert len(bm.train_stream) == 5 and len(bm.test_stream) == 5
    assert sum(len(e.dataset) for e in bm.train_stream) == 60000
    first = bm.train_stream[0]
    assert first.task_label == 0 and len(first.classes_in_this_experience) == 2
    x, y, t = first.dataset[0]
    assert x.shape == (1, 28, 28) and t == 0


# ---- subsets and Avalanche ----------------------------------------------------------------------------------


def test_subset_is_stratified_and_seeded(fmnist):
    small = data.subset(fmnist.val, 100, seed=3)
    assert isinstance(small, data.LabelledTensors) and len(small) == 100
    assert small.targets.bincount().tolist() == [10] * 10
    assert set(small.index.tolist()) <= set(fmnist.val.index.tolist())
    assert torch.equal(data.subset(fmnist.val, 100, seed=3).index, small.index)
    assert not torch.equal(data.subset(fmnist.val, 100, seed=4).index, small.index)
    assert data.subset(fmnist.val, None, 0) is fmnist.val and data.subset(fmnist.val, 10**6, 0) is fmnist.val


class ListTargets(Dataset):
    """A dataset that keeps its labels in a list, as relabelling wrappers do."""

    def __init__(self, base):
        self.base, self.targets = base, [int(t) % 2 for t in base.targets]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], self.targets[i]


def test_subset_of_any_dataset_with_targets(fmnist):
    wrapped = ListTargets(data.subset(fmnist.val, 200, 0))
    small = data.subset(wrapped, 50, seed=0)
    assert isinstance(small, data.TargetSubset) and small.targets.tolist() == [small[i][1] for i in range(50)]
    assert small.targets.bincount().tolist() == [25, 25]


def test_as_avalanche_benchmark(fmnist):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    train = [data.as_avalanche(data.subset(fmnist.train, 60, t), task_label=t) for t in range(2)]
    test = [data.as_avalanche(ListTargets(data.subset(fmnist.test, 40, t)), task_label=t) for t in range(2)]
    x, y, t = train[1][0]
    assert x.shape == (1, 28, 28) and y == int(data.subset(fmnist.train, 60, 1).targets[0]) and t == 1
    assert list(test[0].targets) == [test[0][i][1] for i in range(len(test[0]))]
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train, test=test)))
    assert [e.task_label for e in bm.train_stream] == [0, 1]
    assert set(bm.test_stream[1].classes_in_this_experience) == {0, 1}
    batch = next(iter(torch.utils.data.DataLoader(train[0], batch_size=8)))
    assert [tuple(b.shape) for b in batch] == [(8, 1, 28, 28), (8,), (8,)]


# ---- spoken words --------------------------------------------------------------------------------------------


def test_spoken_words_tiny(tmp_cache):
    splits = data.load_spoken_words(seed=0, settings=TINY, workers=2)
    assert splits.classes == ["yes", "no", "seven"]
    assert sum(splits.sizes().values()) == 3 * 4 * 2
    voices = [set(getattr(splits, name).voice) for name in ("train", "val", "test")]
    assert disjoint(*voices) and set.union(*voices) == set(TINY.voices) and all(voices)
    x, y = splits.test[0]
    assert x.shape == (40, 64) and x.dtype == torch.float32 and torch.isfinite(x).all() and type(y) is int
    train = splits.train.inputs
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-4  # standardised on train
    manifest = json.loads((tmp_cache / "spoken_words" / TINY.key() / "manifest.json").read_text())
    assert manifest["espeak_ng"]["version"] and manifest["counts"]["utterances"] == 24
    assert manifest["settings"]["voices"] == list(TINY.voices) and manifest["settings"]["seed"] == 0


def test_spoken_words_are_deterministic_and_cached(tmp_path, monkeypatch):
    first = data.load_spoken_words(settings=TINY, normalize=False).train
    monkeypatch.setattr(spoken_words, "generate", lambda *a, **k: pytest.fail("regenerated a cached setting"))
    assert torch.equal(data.load_spoken_words(settings=TINY, normalize=False).train.inputs, first.inputs)
    monkeypatch.undo()
    monkeypatch.setenv("MMER_CACHE", str(tmp_path))  # a fresh cache: generated again from scratch
    again = data.load_spoken_words(settings=TINY, normalize=False).train
    assert torch.equal(again.inputs, first.inputs) and again.voice == first.voice
    noisier = data.load_spoken_words(settings=dataclasses.replace(TINY, seed=1), normalize=False)
    assert not torch.equal(noisier.train.inputs, first.inputs)


def test_default_voices_split_by_seed_and_gender():
    voices = data.SpokenWordsSettings().voices
    split = spoken_words.split_voices(voices, seed=0)
    assert split == spoken_words.split_voices(voices, seed=0) != spoken_words.split_voices(voices, seed=1)
    for name, (count, female) in {"test": (8, 3), "val": (8, 3), "train": (32, 10)}.items():  # 16 of 48 female
        held = [v for v, s in split.items() if s == name]
        assert len(held) == count and sum(v in spoken_words.FEMALE_VOICES for v in held) == female


def test_spoken_words_missing_espeak_names_the_package():
    with pytest.raises(data.MissingDataError, match=r"apt-get install espeak-ng"):
        data.load_spoken_words(settings=TINY, espeak="/nonexistent/espeak-ng")


def test_unknown_voice_is_an_error():
    bad = data.SpokenWordsSettings(words=("yes",), voices=("f1", "m3", "nosuchvoice"), renditions=1)
    with pytest.raises(ValueError, match="nosuchvoice"):
        data.load_spoken_words(settings=bad)


# ---- WordNet -------------------------------------------------------------------------------------------------


def test_wordnet_splits(glosses):
    assert glosses.sizes() == {"train": 10000, "val": 1000, "test": 1000}
    assert glosses.classes == list(wordnet.CLASSES)
    assert glosses.train.targets.bincount().tolist() == [1000] * 10
    assert glosses.test.targets.bincount().tolist() == [100] * 10
    keys = [{" ".join(t.lower().split()) for t in getattr(glosses, s).text} for s in ("train", "val", "test")]
    assert disjoint(*keys) and sum(map(len, keys)) == 12000  # no definition twice, within or across splits
    x, y = glosses.val[0]
    assert x.dtype == torch.long and x.shape == (32,) and x[0] == 101 and type(y) is int
    assert glosses.val.lexname[0] == glosses.classes[y]


def test_wordnet_tokens_spell_the_definition(glosses):
    from mmer_cl.backbone import load_tokenizer

    tokenizer = load_tokenizer()
    plain = [i for i, text in enumerate(glosses.test.text) if re.fullmatch(r"[a-z ]{10,80}", text.lower())]
    assert len(plain) > 100
    for i in plain[:20]:
        ids = glosses.test.inputs[i]
        assert tokenizer.decode(ids[ids != 0], skip_special_tokens=True) == glosses.test.text[i].lower()


def test_wordnet_split_is_fixed_by_the_seed(glosses):
    small = dict(classes=("noun.food", "verb.motion"), per_class=300, val_per_class=50, test_per_class=50)
    a, b, c = (data.load_wordnet(seed=s, **small) for s in (0, 0, 1))
    assert a.test.text == b.test.text and torch.equal(a.test.inputs, b.test.inputs)
    assert a.test.text != c.test.text


def test_wordnet_deduplicates(tmp_path):
    # Lines in the data.noun format: offset, lexfile (05 noun.animal, 13 noun.food), ..., | gloss.
    lines = ["  1 licence header line", "00000001 05 n 01 a 0 000 | a small furry animal",
             "00000002 05 n 01 b 0 000 | A  small furry animal; \"a quoted example\"",
             "00000003 13 n 01 c 0 000 | something to eat", "00000004 05 n 01 d 0 000 | something to eat",
             "00000005 13 n 01 e 0 000 | a sweet dessert"]
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    found = wordnet.read_definitions(("noun.animal", "noun.food"), root=tmp_path)
    assert found["noun.animal"] == ["a small furry animal", "A  small furry animal", "something to eat"]
    assert wordnet.deduplicate(found) == {"noun.animal": ["a small furry animal"], "noun.food": ["a sweet dessert"]}


def test_wordnet_missing_names_the_package(tmp_path):
    with pytest.raises(data.MissingDataError, match=r"apt-get install wordnet-base"):
        data.load_wordnet(root=tmp_path)
