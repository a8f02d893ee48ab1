"""Sentence pieces: a memory is found by its best sentence, not only by its average.

A turn such as "Yeah, our trip got off to a bad start. I was really scared when we
got into the accident. ..." has one mean-pooled vector that sits between its
sentences; a question about one of them ("Did Melanie have an accident?") is nearer
to that sentence alone. Stores that hold several vectors per item (Qdrant
multivectors, scored by their best match: MaxSim) keep one per sentence instead of
the whole text's. A speaker label ("Melanie: ...") is repeated on every piece, so a
piece keeps who said it. Measured on LoCoMo (bench/locomo_recall.py): MiniLM dense
recall@10 goes from 0.50 to 0.60 alone; keeping the whole text's vector beside the
pieces' adds nothing there (recall@10 0.765 either way, offline), and would double
the tokens embedded per memory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from memory.embedding.base import Embedder

#: More sentences than this are grouped, consecutive ones together, into this many
#: pieces: a long text costs a bounded number of vectors.
MAX_PIECES = 8

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: Ends of text after which a full stop ends no sentence ("Mr. Smith", "e.g. this").
_ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e)\.$")
_NUMBER_SIGN = re.compile(r"(?:^|\s)No\.$")  # "No. 5", but not "No. Not at all."
#: "Melanie: ..." or "Dr. Ann Lee: ...": up to three capitalised words and a colon.
_LABEL = re.compile(r"^((?:[^\W\d_][\w.'-]*)(?: [^\W\d_][\w.'-]*){0,2}): (?=\S)")


def _label(text: str) -> str:
    m = _LABEL.match(text)
    return m.group(0) if m and all(w[0].isupper() for w in m.group(1).split()) else ""


def _starts_lower(part: str) -> bool:
    first = next((ch for ch in part if ch.isalnum()), "")
    return first.islower()


def pieces(text: str) -> list[str]:
    """The sentence pieces of ``text`` besides the whole; none for a single sentence.
    A sentence ends at ., ! or ? and a space, unless an abbreviation ends there or the
    next word starts in lower case."""
    label = _label(text)
    sentences: list[str] = []
    for part in _SENTENCE_END.split(text[len(label):]):
        part = part.strip()
        if not part:
            continue
        tail = sentences[-1][-8:] if sentences else ""
        if sentences and (_ABBREVIATION.search(tail) or _starts_lower(part)
                          or (_NUMBER_SIGN.search(tail) and part[0].isdigit())):
            sentences[-1] += " " + part
        else:
            sentences.append(part)
    if len(sentences) < 2:
        return []
    if len(sentences) > MAX_PIECES:
        step = len(sentences) / MAX_PIECES
        sentences = [" ".join(sentences[round(i * step):round((i + 1) * step)])
                     for i in range(MAX_PIECES)]
    # A sentence with a label of its own ("Caroline: Hello.") keeps it, not the first.
    return [s if _label(s) else label + s for s in sentences]


def embed_with_pieces(embedder: Embedder, texts: Sequence[str]
                      ) -> tuple[list[list[float]], list[list[list[float]]]]:
    """Each text's vector, and its pieces' vectors, from one embedding batch. A text
    of one sentence has no pieces; for a text with pieces, only they are embedded, and
    its vector is their normalised mean."""
    split = [pieces(t) for t in texts]
    wanted = [p for t, ps in zip(texts, split, strict=True) for p in (ps or [t])]
    embedded = embedder.embed(wanted)
    if len(embedded) != len(wanted):
        raise RuntimeError(f"embedder returned {len(embedded)} vectors for {len(wanted)} texts")
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
        mean = np.mean(np.asarray(vs, dtype=np.float32), axis=0)
        whole.append((mean / (float(np.linalg.norm(mean)) or 1.0)).tolist())
        out.append(vs)
    return whole, out
