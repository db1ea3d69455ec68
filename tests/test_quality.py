"""The quality experiment: needle samples, scoring, corpus splits, held-out loss and the --tiny
pipeline of tools/quality_run.py end to end (CPU)."""

import json
import random
import re

import numpy
import pytest
import torch

from megatron_s2.training.data import BYTE_EOD, ByteTokenizer
from megatron_s2.eval import corpus, needle
from megatron_s2.eval.hf_eval import loss_by_position
from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig
from megatron_s2.hf.modeling_s2_llama import S2LlamaForCausalLM

import tools.quality_run as quality_run

TOKENIZER = ByteTokenizer()


def random_text(n, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "x", "y"]
    return TOKENIZER.encode(" ".join(rng.choice(words) for _ in range(n // 3)))[:n]


@pytest.mark.parametrize("length", [300, 517, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle_sample_has_exact_length_and_key_at_depth(length, depth):
    haystack = random_text(6000, seed=length)
    sample = needle.make_sample(haystack, length, depth, random.Random(3))
    assert len(sample.tokens) == length
    text = TOKENIZER.decode(sample.tokens)
    assert TOKENIZER.encode(text) == sample.tokens  # byte tokens round-trip (ASCII haystack)
    # The needle text begins exactly at needle_start, the question exactly at question_start.
    found = re.search(r"\nThe pass key of the ([a-z ]+) is (\d+)\. Remember it\.\n", text)
    assert found.start() == sample.needle_start and found.group(2) == sample.key
    assert text[sample.question_start:].startswith(f"\nWhat is the pass key of the {found.group(1)}?")
    assert text.endswith(f"The pass key of the {found.group(1)} is ")
    # Depth: the needle starts at that fraction of the haystack part of the prompt.
    haystack_tokens = sample.question_start - len(found.group(0))
    assert sample.needle_start == round(depth * haystack_tokens)
    assert needle.KEY_DIGITS[0] <= len(sample.key) <= needle.KEY_DIGITS[1]


def test_needle_sample_refuses_a_length_that_cannot_hold_it():
    with pytest.raises(ValueError, match="longer length"):
        needle.make_sample(random_text(1000, 0), 50, 0.5, random.Random(0))


def test_training_document_holds_every_needle_and_its_answer():
    rng = random.Random(11)
    text = random_text(5000, seed=1)
    doc = needle.make_training_document(text, 4000, 3, rng)
    assert len(doc) == 4000
    decoded = TOKENIZER.decode(doc)
    keys = dict(re.findall(r"The pass key of the ([a-z ]+) is (\d+)\. Remember it\.", decoded))
    answers = dict(re.findall(r"What is the pass key of the ([a-z ]+)\? The pass key of the \1 is (\d+)\.\n",
                              decoded))
    assert len(keys) == 3 and answers == keys
    # Every needle comes before the first question.
    assert decoded.rindex("Remember it.") < decoded.index("What is the pass key")


def test_score_is_exact_match_of_the_leading_number():
    assert needle.score("48213.\n", "48213") == {"exact": 1.0, "digits": 1.0}
    assert needle.score("482139", "48213")["exact"] == 0.0  # a longer number is wrong
    assert needle.score("48013.", "48213") == {"exact": 0.0, "digits": 0.8}
    assert needle.score("x48213", "48213") == {"exact": 0.0, "digits": 0.0}


def test_grid_scores_an_oracle_fully_and_a_blind_model_at_chance():
    haystack = random_text(20000, seed=5)

    def oracle(prompts, max_new):  # reads the key from the prompt, as a perfect model would
        out = []
        for prompt in prompts:
            key = re.search(r"pass key of the [a-z ]+ is (\d+)\.", TOKENIZER.decode(prompt)).group(1)
            out.append(TOKENIZER.encode(key + ".\n")[:max_new])
        return out

    rng = random.Random(0)

    def blind(prompts, max_new):  # cannot see the key: random digits of a plausible length
        return [TOKENIZER.encode("".join(str(rng.randint(0, 9)) for _ in range(6)))[:max_new] for _ in prompts]

    grid = dict(haystack=haystack, lengths=[400, 900], depths=[0.0, 0.5, 1.0], samples_per_cell=40)
    perfect = needle.needle_grid(oracle, **grid)
    assert len(perfect) == 6 and all(c["exact"] == 1.0 and c["samples"] == 40 for c in perfect)
    chance = needle.needle_grid(blind, **grid)
    assert all(c["exact"] == 0.0 for c in chance)
    digits = sum(c["digits"] for c in chance) / len(chance)
    assert 0.05 < digits < 0.16  # one digit in ten by chance
    # Deeper needles are further from the question.
    far, near = chance[0]["mean_distance"], chance[2]["mean_distance"]
    assert far > near


def test_corpus_splits_are_disjoint_and_deterministic(tmp_path):
    root = tmp_path / "lib"
    for i in range(200):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i % 7 + 1))
    roots = {"lib": str(root)}
    files = corpus.corpus_files(roots)
    assert len(files) == 200
    streams = corpus.token_streams(roots=roots)
    texts = {split: bytes(streams[split]).decode() for split in corpus.SPLITS}
    for relative, path in files:
        body = open(path).read()
        assert [split for split in corpus.SPLITS if body in texts[split]] == [corpus.split_of(relative)]
    again = corpus.token_streams(roots=roots)
    assert all(numpy.array_equal(streams[s], again[s]) for s in corpus.SPLITS)


def test_plain_documents_fill_sequences_exactly():
    stream = numpy.frombuffer(bytes(random_text(5000, 2)), dtype=numpy.uint8)
    docs = list(corpus.plain_documents(stream, 512))
    assert len(docs) == 5000 // 511
    assert all(d.size == 512 and d[-1] == BYTE_EOD for d in docs)
    assert numpy.array_equal(numpy.concatenate([d[:-1] for d in docs]), stream[: 511 * len(docs)])


def test_training_documents_mix_needles_at_the_requested_fraction():
    stream = numpy.frombuffer(bytes(random_text(50000, 3)), dtype=numpy.uint8)
    docs = list(corpus.training_documents(stream, 1024, 200, needle_fraction=0.3, max_needles=2, seed=4))
    assert len(docs) == 200 and all(len(d) == 1024 and d[-1] == BYTE_EOD for d in docs)
    with_needles = sum("Remember it." in TOKENIZER.decode(d) for d in docs)
    assert 40 <= with_needles <= 80


def test_loss_by_position_equals_direct_cross_entropy():
    torch.manual_seed(0)
    config = S2LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=700,
                           s2_layers=[None, None])
    model = S2LlamaForCausalLM(config).double().eval()
    stream = numpy.random.default_rng(0).integers(0, 256, 3 * 600 + 10).astype(numpy.uint8)
    result = loss_by_position(model, stream, 600, 3, "cpu")
    ids = torch.tensor(stream[:1800].astype(numpy.int64)).view(3, 600)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    per_position = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].mean(0)
    assert result["sequences"] == 3
    assert result["overall"] == pytest.approx(float(per_position.mean()), rel=1e-6)  # the evaluator computes in float32
    assert [(r["start"], r["end"]) for r in result["ranges"]] == [(0, 512), (512, 599)]
    assert result["ranges"][1]["loss"] == pytest.approx(float(per_position[512:].mean()), rel=1e-6)  # the evaluator computes in float32


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, monkeypatch):
    """Data, four variants trained by pretrain_gpt_s2.py, export, evaluation and the report."""
    # As a user runs it: on CPU the S2 layers take the PyTorch path, not Triton's interpreter (which
    # the test session switches on for the kernel tests and the child processes would inherit).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "quality"
    results = quality_run.main(["--out", str(out), "--tiny"])
    assert list(results) == list(quality_run.VARIANTS)
    report = json.loads((out / "quality.json").read_text())
    setup = quality_run.TINY
    for name, result in report["variants"].items():
        assert result["layers"] == setup.layer_letters(name)
        assert result["train_tokens"] == setup.train_iters * setup.global_batch * setup.seq_length
        assert len(result["needle"]) == len(setup.lengths) * len(setup.depths)
        assert 0.0 <= result["needle_exact"] <= 1.0 and result["tokens_per_s"] > 0
        assert result["validation_curve"][-1][0] == setup.train_iters
        assert (out / f"needle_{name}.png").stat().st_size > 0
    # Same data and seed: the variants differ only in attention, so their first losses are close,
    # and the window-only layers are the ones the layout says they are.
    assert {r["layers"] for r in report["variants"].values()} == {"DDDD", "DSSS", "SSSS", "WWWW"}
    assert (out / "loss.png").stat().st_size > 0
    table = (out / "quality.md").read_text()
    assert all(f"| {name} |" in table for name in quality_run.VARIANTS)
    # A second call reuses the finished variants instead of training again.
    trained = (out / "s2" / "train.log").stat().st_mtime_ns
    again = quality_run.main(["--out", str(out), "--tiny", "--variants", "s2"])
    assert again["s2"] == report["variants"]["s2"]
    assert (out / "s2" / "train.log").stat().st_mtime_ns == trained
