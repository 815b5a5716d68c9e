"""Offline data: Fashion-MNIST (vision), espeak-ng spoken words (audio), WordNet glosses (text); and
`load_aligned(modality)`, the ten Fashion-MNIST classes in all three, one label space (mmer_cl.data.aligned).

Each `load_*(seed=0, ...)` returns `Splits(train, val, test, classes, info)`; every split is a torch Dataset of
`(x, y)` with a `.targets` LongTensor, usable in Avalanche through `as_avalanche`.
"""

from mmer_cl.data.aligned import load_aligned
from mmer_cl.data.common import (LabelledTensors, MissingDataError, Splits, TargetSubset, as_avalanche, cache_dir,
                                 subset)
from mmer_cl.data.fashion_mnist import fashion_mnist_root, load_fashion_mnist
from mmer_cl.data.hf import hf_benchmark, hf_stream
from mmer_cl.data.spoken_words import SpokenWordsSettings, load_spoken_words
from mmer_cl.data.wordnet import load_wordnet


LOADERS = {"vision": load_fashion_mnist, "audio": load_spoken_words, "text": load_wordnet}


def load(modality: str, seed: int = 0) -> Splits:
    """The default splits of one modality: vision, audio or text."""
    if modality not in LOADERS:
        raise ValueError(f"unknown modality {modality!r}; known: {', '.join(LOADERS)}")
    return LOADERS[modality](seed=seed)


__all__ = ["LOADERS", "LabelledTensors", "MissingDataError", "Splits", "SpokenWordsSettings", "TargetSubset",
           "as_avalanche", "cache_dir", "fashion_mnist_root", "hf_benchmark", "hf_stream", "load",
           "load_aligned", "load_fashion_mnist", "load_spoken_words", "load_wordnet", "subset"]
