"""Needle (passkey) retrieval: a random key hidden at a chosen depth of a long text, asked for at the
end, scored by exact match of the greedy continuation.

Everything works on token ids with a tokenizer that has ``encode(str) -> list[int]`` and
``decode(list[int]) -> str`` (the byte-level one of ``megatron_s2.training.data`` by default). A model is any
``generate(prompts, max_new_tokens) -> continuations`` callable, so this module needs neither
Megatron nor Hugging Face. Training documents use the same templates as the evaluation prompts;
only the keys, labels and haystacks are new at evaluation.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from megatron_s2.training.data import ByteTokenizer

NEEDLE = "\nThe pass key of the {label} is {key}. Remember it.\n"
QUESTION = "\nWhat is the pass key of the {label}? The pass key of the {label} is "
ANSWER = "{key}.\n"
LABELS = ("red door", "blue box", "green gate", "old clock", "black cat", "white ship", "gold ring",
          "tall tree", "small boat", "north tower", "silver cup", "quiet room")
KEY_DIGITS = (5, 7)  # keys have 5 to 7 digits, drawn uniformly

Generate = Callable[[Sequence[Sequence[int]], int], Sequence[Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    """An evaluation prompt of exactly ``len(tokens)`` tokens: haystack, one needle, the question."""

    tokens: list
    key: str
    depth: float         # requested depth: 0 = needle at the start of the haystack, 1 = at its end
    needle_start: int    # token index where the needle text begins
    question_start: int  # token index where the question begins (the haystack ends here)


def random_key(rng: random.Random) -> str:
    digits = rng.randint(*KEY_DIGITS)
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))


def _needle_tokens(tokenizer, label, key):
    return tokenizer.encode(NEEDLE.format(label=label, key=key))


def _question_tokens(tokenizer, label):
    return tokenizer.encode(QUESTION.format(label=label))


def haystack_room(length: int, needle: list, question: list) -> int:
    room = length - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"a needle sample of {length} tokens cannot hold the needle and the question "
                         f"({len(needle) + len(question)} tokens): use a longer length")
    return room


def make_sample(haystack: Sequence[int], length: int, depth: float, rng: random.Random,
                tokenizer=None) -> NeedleSample:
    """A prompt of exactly ``length`` tokens: a window of ``haystack`` starting at a random offset,
    a new random key at ``depth`` of it (any token offset, not block-aligned), the question last."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    tokenizer = tokenizer or ByteTokenizer()
    label, key = rng.choice(LABELS), random_key(rng)
    needle, question = _needle_tokens(tokenizer, label, key), _question_tokens(tokenizer, label)
    room = haystack_room(length, needle, question)
    if len(haystack) < room:
        raise ValueError(f"haystack of {len(haystack)} tokens is shorter than the {room} tokens needed")
    start = rng.randint(0, len(haystack) - room)
    text = list(haystack[start:start + room])
    at = round(depth * room)
    tokens = text[:at] + needle + text[at:] + question
    return NeedleSample(tokens=tokens, key=key, depth=depth, needle_start=at, question_start=room + len(needle))


def make_training_document(text: Sequence[int], length: int, num_needles: int, rng: random.Random,
                           tokenizer=None) -> list:
    """``length`` tokens of training text carrying ``num_needles`` keys with distinct labels at random
    depths, then every question with its answer, in random order (the evaluation template)."""
    tokenizer = tokenizer or ByteTokenizer()
    labels = rng.sample(LABELS, num_needles)
    keys = [random_key(rng) for _ in labels]
    needles = [_needle_tokens(tokenizer, label, key) for label, key in zip(labels, keys)]
    order = rng.sample(range(num_needles), num_needles)
    qa = []
    for i in order:
        qa += _question_tokens(tokenizer, labels[i]) + tokenizer.encode(ANSWER.format(key=keys[i]))
    room = length - sum(map(len, needles)) - len(qa)
    if room < 0 or len(text) < room:
        raise ValueError(f"cannot fit {num_needles} needles into a {length}-token document")
    body = list(text[:room])
    for needle in sorted(needles, key=lambda _: rng.random()):
        at = rng.randint(0, len(body))
        body[at:at] = needle
    return body + qa


def leading_digits(text: str) -> str:
    digits = []
    for char in text:
        if not char.isdigit():
            break
        digits.append(char)
    return "".join(digits)


def score(continuation: str, key: str) -> dict:
    """Exact match: the continuation starts with the key and no further digit. Digit accuracy: the
    share of the key's digits reproduced in place (chance: about 10%)."""
    answer = leading_digits(continuation)
    return {"exact": float(answer == key),
            "digits": sum(a == b for a, b in zip(answer, key)) / len(key)}


def needle_grid(generate: Generate, haystack: Sequence[int], lengths: Sequence[int],
                depths: Sequence[float], samples_per_cell: int, seed: int = 0, tokenizer=None,
                batch_size: int = 8) -> list:
    """Retrieval accuracy for every (length, depth) cell: ``samples_per_cell`` new keys each,
    greedy continuations scored by ``score``. A cell of ``length`` tokens holds the prompt and the
    answer. Returns one dict per cell."""
    tokenizer = tokenizer or ByteTokenizer()
    max_new = len(tokenizer.encode("9" * KEY_DIGITS[1])) + 1  # one more: a longer number is wrong
    cells = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")
            samples = [make_sample(haystack, length - max_new, depth, rng, tokenizer)
                       for _ in range(samples_per_cell)]
            scores = []
            for i in range(0, len(samples), batch_size):
                batch = samples[i:i + batch_size]
                outputs = generate([s.tokens for s in batch], max_new)
                scores += [score(tokenizer.decode(out), s.key) for out, s in zip(outputs, batch)]
            distance = [s.question_start - s.needle_start for s in samples]
            cells.append({
                "length": length, "depth": depth, "samples": len(samples),
                "exact": sum(s["exact"] for s in scores) / len(scores),
                "digits": sum(s["digits"] for s in scores) / len(scores),
                "mean_distance": sum(distance) / len(distance),
            })
    return cells
