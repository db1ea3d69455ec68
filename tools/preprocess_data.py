"""Turn text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for pretrain_gpt_s2.py.

Inputs: plain-text files (one document per file, or one per line with --line-documents), JSONL files
(one document per line, text under --json-key), or the built-in corpus that ships with every Python
installation (--default-corpus: the reference documentation in ``pydoc_data.topics``, ~0.5 MB of
English prose), so a first run needs no download.

Tokenizers: the built-in byte-level tokenizer (token = UTF-8 byte, end-of-document = 256, vocabulary
257; train with ``--tokenizer-type NullTokenizer --vocab-size 257``) or any Hugging Face tokenizer
(``--tokenizer hf:NAME_OR_PATH``; train with ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model
NAME_OR_PATH``). Each document ends with the end-of-document token. The files are written with
Megatron's own ``IndexedDatasetBuilder``.

    python tools/preprocess_data.py --default-corpus --output-prefix data/python_docs
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer hf:gpt2 --output-prefix data/corpus
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterable, Iterator


from megatron_s2.training.data import ByteTokenizer, write_indexed_dataset

class HuggingFaceTokenizer:
    """A Hugging Face tokenizer by name or local path; end-of-document is its EOS token."""

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        self.name_or_path = name_or_path
        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self._tokenizer.eos_token_id is None:
            raise SystemExit(f"error: tokenizer {name_or_path!r} has no EOS token to end documents with")
        self.eod = self._tokenizer.eos_token_id
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> list:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def training_flags(self) -> str:
        return f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {self.name_or_path}"


def build_tokenizer(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return HuggingFaceTokenizer(spec[3:])
    raise SystemExit(f"error: --tokenizer {spec!r}: use 'byte' or 'hf:NAME_OR_PATH' (e.g. hf:gpt2)")


def default_corpus() -> Iterator[str]:
    """Python's own reference documentation (pydoc_data.topics), one document per topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def read_documents(path: str, json_key: str, line_documents: bool) -> Iterator[str]:
    """Documents of one input file: JSONL by extension (.jsonl/.json), else plain text."""
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"error: {path}:{number}: not a JSON object per line ({err})")
                if not isinstance(record, dict) or json_key not in record:
                    raise SystemExit(f"error: {path}:{number}: no key {json_key!r} "
                                     "(choose it with --json-key)")
                yield str(record[json_key])
        elif line_documents:
            yield from (line.rstrip("\n") for line in f if line.strip())
        else:
            yield f.read()


def write_text_dataset(documents: Iterable[str], tokenizer, output_prefix: str) -> dict:
    """Tokenize ``documents`` (each ends with the end-of-document token) into OUTPUT_PREFIX.bin/.idx."""
    def token_documents():
        for text in documents:
            ids = tokenizer.encode(text)
            if ids:
                yield ids + [tokenizer.eod]

    try:
        return write_indexed_dataset(token_documents(), tokenizer.vocab_size, output_prefix)
    except ValueError:
        raise SystemExit("error: no non-empty documents in the input") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help="text files, or JSONL files (.jsonl/.json) with one document per line")
    source.add_argument("--default-corpus", action="store_true",
                        help="use Python's bundled reference documentation (offline, ~0.5 MB)")
    parser.add_argument("--output-prefix", required=True,
                        help="write OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (built-in, vocabulary 257) or 'hf:NAME_OR_PATH' (default: byte)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--line-documents", action="store_true",
                        help="plain-text input: each non-empty line is a document (default: each file)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    missing = [path for path in args.input or [] if not os.path.isfile(path)]
    if missing:  # all of them, before any tokenizing
        raise SystemExit(f"error: --input: no such file: {', '.join(missing)}")
    tokenizer = build_tokenizer(args.tokenizer)
    if args.default_corpus:
        documents = default_corpus()
    else:
        documents = (doc for path in args.input
                     for doc in read_documents(path, args.json_key, args.line_documents))
    counts = write_text_dataset(documents, tokenizer, args.output_prefix)
    print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
          f"{counts['tokens']} tokens (vocabulary {tokenizer.vocab_size})")
    print(f"train with: --data-path {args.output_prefix} {tokenizer.training_flags()}")
    return counts


if __name__ == "__main__":
    main()
