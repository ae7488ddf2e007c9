"""The demo's data: real English text that ships with Python, or a synthetic language for the tiny model.

Text: the Python Language Reference as the interpreter ships it for ``help()`` (``pydoc_data.topics``: 79
topics, about 465,000 characters of English prose and grammar). Topics are split by name, deterministically:
every ``held_out_every``-th topic in sorted order is held out, the rest is training text. Training batches
are windows of ``seq_len`` tokens at random offsets in the training text (a seeded generator, so both
variants see the same batches); the held-out set is the first ``held_out_windows`` consecutive windows of
the held-out text.

Synthetic language (``--model tiny``): sentences in which each word may be followed by exactly
``successors`` words (a fixed random table), so the best possible loss is ln(successors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextData:
    train_ids: torch.Tensor  # 1-D token ids of the training topics
    held_out: torch.Tensor  # held_out_windows x seq_len
    train_topics: int
    held_out_topics: list[str]
    source: str


def python_reference_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions strip pydoc_data from the standard library
        raise RuntimeError(
            "the demo trains on the Python Language Reference shipped in the standard library (pydoc_data), "
            "which this Python lacks; run python -m fastft.demo --model tiny instead"
        ) from error
    return dict(topics)


def load_text(tokenizer, seq_len: int, held_out_windows: int, held_out_every: int = 10) -> TextData:
    topics = python_reference_topics()
    names = sorted(topics)
    held = names[::held_out_every]
    train = [name for name in names if name not in held]
    encode = lambda names_: torch.tensor(  # noqa: E731
        tokenizer("\n\n".join(topics[n] for n in names_))["input_ids"], dtype=torch.long)
    train_ids, held_ids = encode(train), encode(held)
    needed = held_out_windows * seq_len
    if held_ids.numel() < needed:
        raise ValueError(f"the held-out text has {held_ids.numel()} tokens, fewer than {needed}")
    return TextData(
        train_ids=train_ids,
        held_out=held_ids[:needed].view(held_out_windows, seq_len),
        train_topics=len(train),
        held_out_topics=held,
        source="the Python Language Reference shipped with Python (pydoc_data.topics)",
    )


def text_batches(data: TextData, steps: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.train_ids.numel() - seq_len, (steps, batch), generator=generator)
    return [torch.stack([data.train_ids[s: s + seq_len] for s in row.tolist()]) for row in starts]


def grammar_table(words: int, successors: int, seed: int) -> torch.Tensor:
    """``table[w]``: the ``successors`` distinct words that may follow word ``w`` (row 0: after the start)."""
    generator = torch.Generator().manual_seed(seed + 1)
    table = torch.zeros(words + 1, successors, dtype=torch.long)
    for word in range(1, words + 1):
        table[word] = torch.randperm(words, generator=generator)[:successors] + 1
    return table


def grammar_batches(words: int, successors: int, count: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of sentences: token 0, a random word, then walks of the grammar."""
    table = grammar_table(words, successors, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    batches = []
    for _ in range(count):
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        ids[:, 1] = torch.randint(1, words + 1, (batch,), generator=generator)
        choices = torch.randint(0, successors, (batch, seq_len), generator=generator)
        for position in range(2, seq_len):
            ids[:, position] = table[ids[:, position - 1], choices[:, position]]
        batches.append(ids)
    return batches
