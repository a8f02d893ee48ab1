"""Sentence pieces: a memory is found by its best sentence, not only by its average.

A turn such as "Yeah, our trip got off to a bad start. I was really scared when we
got into the accident. ..." has one mean-pooled vector that sits between its
sentences; a question about one of them ("Did Melanie have an accident?") is nearer
to that sentence alone. Stores that hold several vectors per item (Qdrant
multivectors, scored by their best match: MaxSim) keep one per sentence instead of
the whole text's. A speaker label ("Melanie: ...") is repeated on every piece, so a
piece keeps who said it. Measured on LoCoMo (bench/locomo_recall.py): MiniLM dense
recall@10 goes from 0.50 to 0.60 alone; keeping the whole text's vector beside the
pieces' adds nothing there (0.7652 against 0.7641 overall), and would double the
tokens embedded per memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from memory.embedding.base import Embedder

#: More sentences than this are grouped, consecutive ones together, into this many
#: pieces: a long text costs a bounded number of vectors.
MAX_PIECES = 8

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e|No)\.$", re.I)
_LABEL = re.compile(r"^([A-Z][\w.'-]*(?: [A-Z][\w.'-]*){0,2}): (?=\S)")


def pieces(text: str) -> list[str]:
    """The sentence pieces of ``text`` besides the whole; none for a single sentence."""
    label_match = _LABEL.match(text)
    label = label_match.group(0) if label_match else ""
    body = text[len(label):]
    sentences: list[str] = []
    for part in _SENTENCE_END.split(body):
        if sentences and _ABBREVIATION.search(sentences[-1]):  # "Mr. Smith" is one sentence
            sentences[-1] += " " + part.strip()
        elif part.strip():
            sentences.append(part.strip())
    if len(sentences) < 2:
        return []
    if len(sentences) > MAX_PIECES:
        step = len(sentences) / MAX_PIECES
        sentences = [" ".join(sentences[round(i * step):round((i + 1) * step)])
                     for i in range(MAX_PIECES)]
    return [label + s for s in sentences]


def embed_with_pieces(embedder: Embedder, texts: Sequence[str]
                      ) -> tuple[list[list[float]], list[list[list[float]]]]:
    """Each text's vector, and its pieces' vectors, from one embedding batch. A text
    of one sentence has no pieces; for a text with pieces, only they are embedded, and
    its vector is their normalised mean (what a store without pieces would keep)."""
    split = [pieces(t) for t in texts]
    embedded = embedder.embed([p for t, ps in zip(texts, split, strict=True) for p in (ps or [t])])
    whole: list[list[float]] = []
    out: list[list[list[float]]] = []
    at = 0
    for ps in split:
        if not ps:
            whole.append(embedded[at])
            out.append([])
            at += 1
            continue
        vs = embedded[at:at + len(ps)]
        at += len(ps)
        mean = [sum(col) / len(vs) for col in zip(*vs, strict=True)]
        norm = math.sqrt(sum(x * x for x in mean)) or 1.0
        whole.append([x / norm for x in mean])
        out.append(vs)
    return whole, out
