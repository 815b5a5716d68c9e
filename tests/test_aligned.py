"""The aligned modalities on the real data: every covered class in every split, one meaning per label in every
modality, splits disjoint by voice (audio) and by synset and text (text), the degraded audio on the same voices
at the SNR asked, seeded text splits. Audio runs on 6 voices x 1 rendition in a temporary cache."""

import json
from pathlib import Path

import pytest
import torch

from mmer_cl.data import SpokenWordsSettings, aligned, load_aligned
from mmer_cl.data.fashion_mnist import CLASSES
from mmer_cl.data.wordnet import definition

torch.set_num_threads(1)
SPLITS = ("train", "val", "test")
SMALL = SpokenWordsSettings(voices=("f1", "Annie", "m3", "klatt2", "m7", "adam"), renditions=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tokenizer():
    from mmer_cl.backbone import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def modalities(cache, tokenizer):
    return {"vision": load_aligned("vision"), "audio": load_aligned("audio", settings=SMALL, workers=2),
            "text": load_aligned("text", tokenizer=tokenizer)}


@pytest.fixture(scope="module")
def nouns():
    return aligned.read_nouns()


def disjoint(*groups) -> bool:
    sets = [set(g) for g in groups]
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])


def test_every_covered_class_in_every_split(modalities):
    text = modalities["text"]
    assert text.info["classes_covered"] == [1, 3, 4, 7, 8, 9]  # trouser, dress, coat, sneaker, bag, ankle boot
    for name, splits in modalities.items():
        covered = splits.info["classes_covered"]
        assert splits.classes == CLASSES, name
        for split in SPLITS:
            counts = getattr(splits, split).targets.bincount(minlength=10)
            assert splits.info["per_class"][split] == counts.tolist()
            assert torch.nonzero(counts).flatten().tolist() == covered, (name, split)
    assert modalities["vision"].info["classes_covered"] == modalities["audio"].info["classes_covered"] == [*range(10)]
    for label in text.info["classes_covered"]:
        assert text.info["synsets"][label] >= aligned.MIN_SYNSETS
        assert all(text.info["synsets_per_class"][split][label] >= 1 for split in SPLITS)


def test_labels_mean_the_same_class_in_every_modality(modalities, nouns):
    assert all(answer in CLASSES[y].lower() for y, answer in enumerate(aligned.CLASS_NAMES))
    words = json.loads(Path(modalities["audio"].info["manifest"]).read_text())["settings"]["words"]
    assert words == list(aligned.CLASS_NAMES) and words[4] == "coat" and words[9] == "ankle boot"
    # the right senses: coat the garment, not a coat of paint; boot the footwear, not a car's boot
    assert definition(nouns[aligned.ROOTS[4][0]]["gloss"]).startswith("an outer garment")
    assert definition(nouns[aligned.ROOTS[9][0]]["gloss"]).startswith("footwear")

    def ancestors(offset):  # up the @ hypernym pointers, independent of the ~ walk down that built the classes
        seen, todo = set(), [offset]
        while todo:
            o = todo.pop()
            if o not in seen:
                seen.add(o)
                todo += nouns[o]["hypernyms"]
        return seen

    for split in SPLITS:
        texts = getattr(modalities["text"], split)
        for synset, y in zip(texts.synset, texts.targets.tolist()):
            assert ancestors(synset) & set(aligned.ROOTS[y]), (synset, y)


def test_a_synset_under_two_classes_goes_to_the_nearer_or_to_none(nouns):
    synsets = aligned.class_synsets(nouns)
    sandal, jersey, turtleneck = "04133789", "03595614", "04502197"
    assert sandal in synsets[5] and sandal not in synsets[7]  # a sandal is a shoe, one step below it
    assert jersey in synsets[0] and jersey not in synsets[6]  # a T-shirt is a shirt
    assert all(turtleneck not in group for group in synsets.values())  # one step under both jersey and sweater
    owners = [o for group in synsets.values() for o in group]
    assert len(owners) == len(set(owners))


def test_splits_share_no_voice_no_synset_no_text(modalities):
    audio, text = modalities["audio"], modalities["text"]
    assert disjoint(*(getattr(audio, split).voice for split in SPLITS))
    assert disjoint(*(getattr(text, split).synset for split in SPLITS))
    assert disjoint(*({aligned.normal(t) for t in getattr(text, split).text} for split in SPLITS))
    x, y = text.test[0]
    assert x.dtype == torch.long and x.shape == (32,) and x[0] == 101 and y in text.info["classes_covered"]


def test_degraded_audio_same_voices_lower_snr(modalities):
    clean = modalities["audio"]
    noisy = load_aligned("audio", settings=SMALL, snr_db=(-5.0, -2.0), workers=2)
    assert noisy.info["manifest"] != clean.info["manifest"] and noisy.info["snr_db"] == (-5.0, -2.0)
    assert noisy.info["normalization"]["mean"] == clean.info["normalization"]["mean"]
    for split in SPLITS:
        a, b = getattr(clean, split), getattr(noisy, split)
        assert a.voice == b.voice and torch.equal(a.targets, b.targets) and torch.equal(a.speed, b.speed)
        assert ((b.snr_db >= -5.0) & (b.snr_db <= -2.0)).all() and (a.snr_db >= 5.0).all()
        assert not torch.allclose(a.inputs, b.inputs)


def test_text_split_is_fixed_by_the_seed(modalities, tokenizer):
    first = modalities["text"]
    again, other = (load_aligned("text", seed=s, tokenizer=tokenizer) for s in (0, 1))
    assert again.test.synset == first.test.synset and torch.equal(again.test.inputs, first.test.inputs)
    assert set(other.test.synset) != set(first.test.synset)
