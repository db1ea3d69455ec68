"""tools/preprocess_data.py: text and JSONL -> Megatron .bin/.idx -> the same tokens back."""

from __future__ import annotations

import json

import numpy
import pytest


import tools.preprocess_data as preprocess_data
from megatron.core.datasets.indexed_dataset import IndexedDataset

DOCUMENTS = ["Sparse attention, shared across heads.", "Ünïcödé → bytes ✓", "line one\nline two"]


def _read_back(prefix: str) -> list:
    dataset = IndexedDataset(prefix)
    return [numpy.asarray(dataset[i]).tolist() for i in range(len(dataset))]


def test_jsonl_round_trip_with_byte_tokenizer(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS)))
    counts = preprocess_data.main(["--input", str(path), "--json-key", "body",
                                   "--output-prefix", str(tmp_path / "out")])
    tokenizer = preprocess_data.ByteTokenizer()
    documents = _read_back(str(tmp_path / "out"))
    assert [d[-1] for d in documents] == [tokenizer.eod] * len(DOCUMENTS)
    assert [tokenizer.decode(d[:-1]) for d in documents] == DOCUMENTS
    expected_tokens = sum(len(d.encode("utf-8")) + 1 for d in DOCUMENTS)
    assert counts == {"documents": 3, "tokens": expected_tokens}


def test_text_files_one_document_per_file_or_per_line(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("alpha\nbeta\n")
    second.write_text("gamma")
    preprocess_data.main(["--input", str(first), str(second), "--output-prefix", str(tmp_path / "files")])
    decode = preprocess_data.ByteTokenizer().decode
    assert [decode(d[:-1]) for d in _read_back(str(tmp_path / "files"))] == ["alpha\nbeta\n", "gamma"]
    preprocess_data.main(["--input", str(first), "--line-documents", "--output-prefix", str(tmp_path / "lines")])
    assert [decode(d[:-1]) for d in _read_back(str(tmp_path / "lines"))] == ["alpha", "beta"]


def test_default_corpus_is_real_text_available_offline():
    documents = list(preprocess_data.default_corpus())
    assert len(documents) > 50 and sum(map(len, documents)) > 200_000
    assert any("assert" in d for d in documents)  # Python's own reference documentation


def test_hugging_face_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "[UNK]", "s2", "attention", "is", "sparse", "dense"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        tmp_path / "tok")
    text = tmp_path / "t.txt"
    text.write_text("s2 attention is sparse\ndense attention\n")
    preprocess_data.main(["--input", str(text), "--line-documents", "--tokenizer", f"hf:{tmp_path / 'tok'}",
                          "--output-prefix", str(tmp_path / "hf")])
    assert _read_back(str(tmp_path / "hf")) == [[2, 3, 4, 5, 0], [6, 3, 0]]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\nnot json\n', ":2: not a JSON object per line"),
    ('{"body": "no text key"}\n', "no key 'text'"),
])
def test_bad_jsonl_names_the_line_and_the_fix(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        preprocess_data.main(["--input", str(path), "--output-prefix", str(tmp_path / "x")])
    assert message in str(exit_.value)
