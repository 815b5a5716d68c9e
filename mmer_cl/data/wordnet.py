"""WordNet 3.0 glosses labelled by lexicographer file, from the Debian package wordnet-base, offline.

A synset's line in data.noun / data.verb / ... reads `offset lex_filenum ss_type ... | gloss`; the label is
the lexicographer file (`noun.animal`, `verb.motion` ...: LEXNAMES, from lexnames(5WN)) and the text is the
gloss's definition, the part before its quoted example sentences.

Default classes: the 10 below (each has 1395 or more distinct definitions). Duplicates are removed on the
lower-cased, whitespace-normalised definition: a definition found in two of the chosen classes is dropped,
one found twice in a class is kept once, so no definition can be in two splits. Per class `seed` draws 1200
definitions: 100 test, 100 val, 1000 train -> 10000 / 1000 / 1000.

x is a LongTensor [max_length = 32] of the backbone tokenizer's ids ([CLS] ... [SEP]), truncated (about 4% of
definitions are longer) and right-padded with 0, the BERT padding id, so the attention mask is x != 0.
"""

import os
import re
from collections import defaultdict
from pathlib import Path

import torch

from mmer_cl.data.common import LabelledTensors, Splits, missing

DEBIAN_DIR = Path("/usr/share/wordnet")
# lexnames(5WN): lexicographer file number -> name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
CLASSES = ("noun.act", "noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.person", "noun.plant",
           "noun.substance", "verb.communication", "verb.motion")


def source_dir(root: str | Path | None = None) -> Path:
    """The WordNet dict folder: `root`, else $MMER_WORDNET_DIR, else WordNet's own $WNSEARCHDIR, else Debian's."""
    return Path(root or os.environ.get("MMER_WORDNET_DIR") or os.environ.get("WNSEARCHDIR") or DEBIAN_DIR)


def definition(gloss: str) -> str:
    """The gloss without its example sentences: `def; "example"; "example"` -> `def`."""
    return re.split(r';\s*"', gloss, maxsplit=1)[0].strip()


def read_definitions(classes: tuple[str, ...], root: str | Path | None = None) -> dict[str, list[str]]:
    """lexname -> its synsets' definitions, in file order, from the data.<pos> files the classes need."""
    unknown = [c for c in classes if c not in LEXNAMES]
    if unknown:
        raise ValueError(f"{unknown} are not WordNet lexicographer files; see LEXNAMES")
    wanted = {LEXNAMES.index(c) for c in classes}
    found: dict[str, list[str]] = {c: [] for c in classes}
    for pos in sorted({c.split(".")[0] for c in classes}):
        path = source_dir(root) / f"data.{pos}"
        if not path.is_file():
            raise missing("WordNet 3.0", path, "wordnet-base",
                          "point MMER_WORDNET_DIR (or root=) at a WordNet dict folder with data.noun and data.verb")
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("  "):  # the licence header
                    continue
                head, _, gloss = line.partition("|")
                lexfile = int(head.split()[1])
                if lexfile in wanted:
                    found[LEXNAMES[lexfile]].append(definition(gloss))
    return found


def deduplicate(found: dict[str, list[str]]) -> dict[str, list[str]]:
    """Keep each normalised definition once, in its class; drop those that occur in two classes. Sorted,
    so the result does not depend on file order."""
    classes_of = defaultdict(set)
    text_of = {}
    for lexname, texts in found.items():
        for text in texts:
            key = " ".join(text.lower().split())
            classes_of[key].add(lexname)
            text_of.setdefault(key, text)
    unique = {lexname: [] for lexname in found}
    for key in sorted(classes_of):
        if len(classes_of[key]) == 1:
            unique[next(iter(classes_of[key]))].append(text_of[key])
    return unique


def tokenize(texts: list[str], max_length: int, tokenizer) -> torch.Tensor:
    """[len(texts), max_length] token ids, truncated, right-padded with 0."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    out = torch.zeros(len(texts), max_length, dtype=torch.long)
    for row, tokens in enumerate(ids):
        out[row, :len(tokens)] = torch.tensor(tokens)
    return out


def load_wordnet(seed: int = 0, classes: tuple[str, ...] = CLASSES, per_class: int = 1200, val_per_class: int = 100,
                 test_per_class: int = 100, max_length: int = 32, root: str | Path | None = None,
                 tokenizer=None) -> Splits:
    """Class-balanced WordNet splits (see the module docstring). Each example carries `.text` (its
    definition) and `.lexname`."""
    if per_class <= val_per_class + test_per_class:
        raise ValueError(f"per_class={per_class} leaves no training examples after {val_per_class} val and "
                         f"{test_per_class} test")
    unique = deduplicate(read_definitions(tuple(classes), root))
    small = {c: len(t) for c, t in unique.items() if len(t) < per_class}
    if small:
        raise ValueError(f"classes {small} have fewer than per_class={per_class} distinct definitions")
    generator = torch.Generator().manual_seed(seed)
    parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, lexname in enumerate(classes):
        texts = unique[lexname]
        order = torch.randperm(len(texts), generator=generator)[:per_class].tolist()
        cuts = {"test": order[:test_per_class], "val": order[test_per_class:test_per_class + val_per_class],
                "train": order[test_per_class + val_per_class:]}
        for name, rows in cuts.items():
            parts[name][0].extend(texts[i] for i in rows)
            parts[name][1].extend([label] * len(rows))
    if tokenizer is None:
        from mmer_cl.backbone import load_tokenizer

        tokenizer = load_tokenizer()

    def split(name: str) -> LabelledTensors:
        texts, labels = parts[name]
        return LabelledTensors(tokenize(texts, max_length, tokenizer), torch.tensor(labels), text=texts,
                               lexname=[classes[y] for y in labels])

    return Splits(train=split("train"), val=split("val"), test=split("test"), classes=list(classes),
                  info={"source": str(source_dir(root)), "x": f"int64 [{max_length}] token ids, 0 = padding",
                        "distinct_definitions": {c: len(t) for c, t in unique.items()}})
