"""An offline text corpus for the quality experiment, split three ways, and its training documents.

The text is the source and documentation of the running Python's standard library and installed
packages (on every machine with Python, no download; the standard library alone is 10-40 MB, the
installed packages of a PyTorch environment several hundred). Files are split by a hash of their path: ``train`` (90%),
``valid`` (5%: held-out text for the validation loss) and ``haystack`` (5%: held-out text for needle
prompts), so no evaluation text was seen in training. Tokens are bytes (``megatron_s2.training.data``).
"""

from __future__ import annotations

import os
import random
import sysconfig
import zlib
from typing import Iterator, Optional

import numpy

from megatron_s2.training.data import BYTE_EOD
from megatron_s2.eval.needle import make_training_document

SPLITS = ("train", "valid", "haystack")
SUFFIXES = (".py", ".rst", ".txt")
FILE_SEPARATOR = b"\n\n"


def split_of(relative_path: str) -> str:
    bucket = zlib.crc32(relative_path.encode()) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "haystack"


def default_roots() -> dict:
    """``{name: folder}``: the standard library first, then the installed packages."""
    paths = sysconfig.get_paths()
    return {"stdlib": paths["stdlib"], "packages": paths["purelib"]}


def corpus_files(roots: Optional[dict] = None) -> list:
    """``(name/relative path, absolute path)`` of the corpus files under ``roots``, sorted, so every
    machine with the same installation reads the same stream."""
    found = []
    for name, root in (roots or default_roots()).items():
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
            for file_name in files:
                if file_name.endswith(SUFFIXES):
                    path = os.path.join(directory, file_name)
                    found.append((f"{name}/{os.path.relpath(path, root)}", path))
    return sorted(found)


def token_streams(max_bytes: Optional[int] = None, roots: Optional[dict] = None) -> dict:
    """``{split: uint8 array}``: each split's files concatenated (UTF-8 bytes, blank line between).
    ``max_bytes`` caps the whole corpus (each split keeps its share)."""
    parts = {split: [] for split in SPLITS}
    sizes = {split: 0 for split in SPLITS}
    share = {"train": 0.90, "valid": 0.05, "haystack": 0.05}
    for relative, path in corpus_files(roots):
        split = split_of(relative)
        if max_bytes is not None and sizes[split] >= share[split] * max_bytes:
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # test fixtures in other encodings
        parts[split] += [data, FILE_SEPARATOR]
        sizes[split] += len(data) + len(FILE_SEPARATOR)
    streams = {split: numpy.frombuffer(b"".join(parts[split]), dtype=numpy.uint8) for split in SPLITS}
    empty = [split for split in SPLITS if streams[split].size == 0]
    if empty:
        raise ValueError(f"the corpus has no {'/'.join(empty)} text")
    return streams


def plain_documents(stream: numpy.ndarray, seq_length: int) -> Iterator[numpy.ndarray]:
    """Consecutive windows of ``seq_length`` tokens, the last one the end-of-document token.

    Megatron's GPT dataset cuts its samples every ``seq_length`` tokens; documents of exactly that
    length therefore align with samples, so every needle sits in the same sample as its question."""
    body = seq_length - 1
    for start in range(0, stream.size - body + 1, body):
        yield numpy.append(stream[start:start + body].astype(numpy.int64), BYTE_EOD)


def training_documents(stream: numpy.ndarray, seq_length: int, num_documents: int,
                       needle_fraction: float, max_needles: int, seed: int) -> Iterator[list]:
    """``num_documents`` documents of ``seq_length`` tokens from windows of ``stream`` at random
    offsets (so repeated passes over a small corpus see new cuts); ``needle_fraction`` of them carry
    1 to ``max_needles`` passkeys with their questions and answers at the end."""
    rng = random.Random(seed)
    body = seq_length - 1
    if stream.size < body:
        raise ValueError(f"training text ({stream.size} tokens) is shorter than one sequence ({seq_length})")
    for _ in range(num_documents):
        start = rng.randint(0, stream.size - body)
        text = stream[start:start + body].tolist()
        if rng.random() < needle_fraction:
            text = make_training_document(text, body, rng.randint(1, max_needles), rng)
        yield text + [BYTE_EOD]
