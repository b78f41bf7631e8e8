"""Records → batches: the embedded corpus, plain text, jsonl/json, csv/tsv."""

from .formats import Fields
from .sources import (DataConfig, Dataset, batchify, collate, load_data, load_dataset, pydoc_texts, read_examples,
                      read_stream)

__all__ = ["DataConfig", "Dataset", "Fields", "batchify", "collate", "load_data", "load_dataset", "pydoc_texts",
           "read_examples", "read_stream"]
