"""Token data on disk: the byte-level tokenizer and Megatron indexed datasets (PREFIX.bin/.idx).

Used by tools/preprocess_data.py (text in) and the quality experiment (token documents built in
memory). Megatron is imported only when a dataset is written.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Iterable

import numpy

BYTE_VOCAB_SIZE = 257  # 256 byte values + end-of-document
BYTE_EOD = 256


class ByteTokenizer:
    """Token = UTF-8 byte; matches Megatron's NullTokenizer with --vocab-size 257 (eod = 256)."""

    vocab_size = BYTE_VOCAB_SIZE
    eod = BYTE_EOD

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def training_flags(self) -> str:
        return f"--tokenizer-type NullTokenizer --vocab-size {self.vocab_size}"


def _megatron_dataset_builder():
    """Megatron's ``(DType, IndexedDatasetBuilder)``, imported without the warnings that importing
    megatron.core prints on every machine without Transformer Engine, Apex or CUDA: true, and
    irrelevant to writing a dataset."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (is|are) not installed")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


def write_indexed_dataset(documents: Iterable, vocab_size: int, output_prefix: str) -> dict:
    """Write token documents (sequences of ids, each already ending as it should) to
    OUTPUT_PREFIX.bin/.idx with Megatron's ``IndexedDatasetBuilder``; returns counts.

    Both files are written under temporary names and renamed at the end, so a failed run (a bad
    input, an interrupt) never leaves a .bin that does not match its .idx.
    """
    DType, IndexedDatasetBuilder = _megatron_dataset_builder()
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    partial = f"{output_prefix}.partial-{os.getpid()}"
    builder = IndexedDatasetBuilder(partial + ".bin", dtype=DType.optimal_dtype(vocab_size))
    try:
        num_documents = num_tokens = 0
        for ids in documents:
            ids = numpy.asarray(ids, dtype=numpy.int64)
            if ids.size == 0:
                continue
            builder.add_document(ids, [ids.size])
            num_documents += 1
            num_tokens += int(ids.size)
        if num_documents == 0:
            raise ValueError("no non-empty documents to write")
        builder.finalize(partial + ".idx")
        os.replace(partial + ".bin", output_prefix + ".bin")
        os.replace(partial + ".idx", output_prefix + ".idx")
    finally:
        builder.data_file.close()  # finalize() closed it already unless the run failed
        for leftover in (partial + ".bin", partial + ".idx"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return {"documents": num_documents, "tokens": num_tokens}
