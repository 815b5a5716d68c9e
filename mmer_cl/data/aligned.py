"""The ten Fashion-MNIST classes in three aligned modalities, one label space: label y means the same class
(fashion_mnist.CLASSES[y], named CLASS_NAMES[y] as an answer) in every modality, as the expansion setting needs.

- vision: Fashion-MNIST itself (`load_fashion_mnist`).
- audio: the class names spoken by espeak-ng (`load_spoken_words` with words=SPOKEN; the default voices,
  accents, speeds, pitches, noise and voice-held-out splits, only the words differ). espeak-ng reads "t-shirt"
  as /ti:S3:t/ ("tee-shirt") in all eight accents, and "ankle boot" as two words, so the names are spoken as
  written. `snr_db=(lo, hi)` gives a degraded copy (its own cache; same voices, splits and draws), standardised
  with the clean training split's mean and std, so a model trained on clean speech can be tested on it.
- text: WordNet 3.0 noun synsets under each class: the class's own senses (ROOTS) and all their hyponyms,
  following `~` pointers in data.noun. A synset under two classes goes to the one whose root is fewer hyponym
  steps above it (sandals under shoe go to sandal, jersey under shirt to t-shirt); a tie (turtleneck: one
  step under both jersey and sweater) goes to neither. Each synset gives up to three kinds of text, each a
  separate example: its definition, its lemmas ("gym shoe, sneaker, tennis shoe") and each usage example; a
  text found in two synsets is dropped. Splits are by synset, per class about 60/20/20 (val and test
  round(n / 5) each, at least 1), seeded, so no synset and no text is in two splits. Classes with fewer than
  `min_synsets` (10) synsets are left out: trouser (27 synsets), dress (21), coat (54), sneaker (30: shoes
  that are not sandals), bag (66: containers, pockets, handbags) and ankle boot (10) are covered; t-shirt (1),
  pullover (4), sandal (7) and shirt (9) have too few. `info["classes_covered"]` lists the covered labels.
  x is tokenised as in `load_wordnet` (LongTensor [32], 0 = padding); examples carry `.text` and `.synset`.

Every `info["per_class"]` gives examples per label (0..9) per split.
"""

import re
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch

from mmer_cl.data.common import LabelledTensors, Splits, missing
from mmer_cl.data.fashion_mnist import CLASSES, load_fashion_mnist
from mmer_cl.data.spoken_words import SpokenWordsSettings, load_spoken_words
from mmer_cl.data.wordnet import definition, source_dir, tokenize

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPOKEN = CLASS_NAMES  # espeak-ng says each sensibly as written (see the module docstring)

# label -> root synsets (data.noun offsets): the garment / footwear / container sense of the class's words.
ROOTS = {
    0: ("03595614",),  # jersey, T-shirt, tee_shirt: a close-fitting pullover shirt
    1: ("04489008",),  # trouser, pant: a garment extending from the waist to the knee or ankle, covering each leg
    2: ("04370048",),  # sweater, jumper: a crocheted or knitted garment covering the upper part of the body
    3: ("03236735",),  # dress, frock: a one-piece garment for a woman; has skirt and bodice
    4: ("03057021",),  # coat: an outer garment that has sleeves and covers the body from shoulder down
    5: ("04133789",),  # sandal: a shoe consisting of a sole fastened by straps to the foot
    6: ("04197391",),  # shirt: a garment worn on the upper half of the body
    7: ("04199027",    # shoe: footwear shaped to fit the foot (below the ankle) with a flexible upper
        "03472535"),   # gym_shoe, sneaker, tennis_shoe: a canvas shoe with a pliable rubber sole
    8: ("02773037",    # bag: a flexible container with a single opening
        "02774152"),   # bag, handbag, pocketbook, purse: a container used for carrying money and small items
    9: ("02872752",),  # boot: footwear that covers the whole foot and lower leg
}
MIN_SYNSETS = 10


def per_class(splits: Splits) -> dict[str, list[int]]:
    return {name: torch.bincount(getattr(splits, name).targets, minlength=len(CLASSES)).tolist()
            for name in ("train", "val", "test")}


# ---- text ------------------------------------------------------------------------------------------------------


def read_nouns(root: str | Path | None = None) -> dict[str, dict]:
    """offset -> {"lemmas", "gloss", "hyponyms", "hypernyms"} for every synset in data.noun. A line reads
    `offset lex_filenum n w_cnt(hex) (word lex_id)* p_cnt (symbol offset pos source/target)* | gloss`."""
    path = source_dir(root) / "data.noun"
    if not path.is_file():
        raise missing("WordNet 3.0", path, "wordnet-base", "point MMER_WORDNET_DIR (or root=) at a WordNet dict folder")
    nouns = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition("|")
            fields = head.split()
            n_words = int(fields[3], 16)
            at = 4 + 2 * n_words
            pointers = [fields[at + 1 + 4 * i:at + 3 + 4 * i] for i in range(int(fields[at]))]
            nouns[fields[0]] = {"lemmas": [w.replace("_", " ") for w in fields[4:at:2]], "gloss": gloss.strip(),
                                "hyponyms": [o for s, o in pointers if s == "~"],
                                "hypernyms": [o for s, o in pointers if s == "@"]}
    return nouns


def steps_below(roots: tuple[str, ...], nouns: dict) -> dict[str, int]:
    """Every synset under `roots` (them included) -> its fewest hyponym steps from one of them."""
    steps, queue = dict.fromkeys(roots, 0), deque(roots)
    while queue:
        offset = queue.popleft()
        for child in nouns[offset]["hyponyms"]:
            if child not in steps:
                steps[child] = steps[offset] + 1
                queue.append(child)
    return steps


def class_synsets(nouns: dict) -> dict[int, list[str]]:
    """label -> its synsets, sorted: each synset to the class whose root is nearest; ties to none."""
    below = {label: steps_below(roots, nouns) for label, roots in ROOTS.items()}
    owner = {}
    for offset in set().union(*below.values()):
        steps = sorted((s[offset], label) for label, s in below.items() if offset in s)
        if len(steps) == 1 or steps[0][0] < steps[1][0]:
            owner[offset] = steps[0][1]
    return {label: sorted(o for o, y in owner.items() if y == label) for label in ROOTS}


def synset_texts(synset: dict) -> list[str]:
    """Definition, lemma list and usage examples (the quoted parts of the gloss), each once."""
    gloss = synset["gloss"]
    texts = [definition(gloss), ", ".join(synset["lemmas"])] + re.findall(r'"([^"]+)"', gloss[len(definition(gloss)):])
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def load_text(seed: int = 0, min_synsets: int = MIN_SYNSETS, max_length: int = 32, root: str | Path | None = None,
              tokenizer=None) -> Splits:
    """WordNet texts of the classes with `min_synsets` or more synsets, split by synset (module docstring)."""
    if min_synsets < 3:
        raise ValueError(f"min_synsets={min_synsets}: a class needs 3 synsets for one in each split")
    nouns = read_nouns(root)
    synsets = class_synsets(nouns)
    texts = {o: synset_texts(nouns[o]) for group in synsets.values() for o in group}
    synsets_of = {}
    for offset, group in texts.items():
        for text in group:
            synsets_of.setdefault(normal(text), set()).add(offset)
    covered = [label for label, group in synsets.items() if len(group) >= min_synsets]
    generator = torch.Generator().manual_seed(seed)
    parts = {name: [] for name in ("train", "val", "test")}  # (text, label, synset)
    for label in covered:
        group = synsets[label]
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        held = max(1, round(len(group) / 5))
        for name, chosen in (("test", order[:held]), ("val", order[held:2 * held]), ("train", order[2 * held:])):
            parts[name] += [(t, label, o) for o in chosen for t in texts[o] if len(synsets_of[normal(t)]) == 1]
    if tokenizer is None:
        from mmer_cl.backbone import load_tokenizer

        tokenizer = load_tokenizer()

    def split(name: str) -> LabelledTensors:
        text, labels, synset = (list(column) for column in zip(*parts[name]))
        return LabelledTensors(tokenize(text, max_length, tokenizer), torch.tensor(labels), text=text, synset=synset)

    splits = Splits(split("train"), split("val"), split("test"), list(CLASSES))
    splits.info = {"source": str(source_dir(root)), "x": f"int64 [{max_length}] token ids, 0 = padding",
                   "classes_covered": covered, "roots": ROOTS,
                   "synsets": {label: len(group) for label, group in synsets.items()},
                   "synsets_per_class": {name: [len({o for _, y, o in parts[name] if y == label}) for label in ROOTS]
                                         for name in parts},
                   "texts": "definition, lemma list, usage examples", "per_class": per_class(splits)}
    return splits


# ---- audio -----------------------------------------------------------------------------------------------------


def load_audio(seed: int = 0, settings: SpokenWordsSettings | None = None, snr_db: tuple[float, float] | None = None,
               normalize: bool = True, **options) -> Splits:
    """`options` go to load_spoken_words (espeak, workers). With `snr_db`, the same utterances at that SNR,
    standardised with the clean training split's mean and std, as a model trained on clean speech saw them."""
    clean = replace(settings or SpokenWordsSettings(), words=SPOKEN)
    if snr_db is None:
        splits = load_spoken_words(seed, settings=clean, normalize=normalize, **options)
    else:
        splits = load_spoken_words(seed, settings=replace(clean, snr_db=tuple(snr_db)), normalize=False, **options)
        if normalize:
            stats = load_spoken_words(seed, settings=clean, **options).info["normalization"]
            for name in ("train", "val", "test"):
                getattr(splits, name).inputs = (getattr(splits, name).inputs - stats["mean"]) / stats["std"]
            splits.info["normalization"] = {**stats, "from": "the clean training split"}
    splits.info.update(words=list(SPOKEN), snr_db=tuple(snr_db or clean.snr_db or ()))
    return splits


def load_aligned(modality: str, seed: int = 0, **options) -> Splits:
    """Splits of one modality ("vision", "audio" or "text") with labels 0..9 = Fashion-MNIST's classes.
    `options` go to the modality's loader: vision load_fashion_mnist; audio `settings` (a SpokenWordsSettings
    whose words are replaced), `snr_db`, `workers`, `espeak`; text `min_synsets`, `max_length`, `root`,
    `tokenizer`."""
    if modality == "vision":
        splits = load_fashion_mnist(seed=seed, **options)
    elif modality == "audio":
        splits = load_audio(seed, **options)
    elif modality == "text":
        return load_text(seed, **options)
    else:
        raise ValueError(f"unknown modality {modality!r}; known: vision, audio, text")
    splits.classes = list(CLASSES)
    splits.info.update(classes_covered=list(range(len(CLASSES))), per_class=per_class(splits))
    return splits
