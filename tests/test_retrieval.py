"""Retrieval's parts on their own: dates in queries, sentence pieces, score fusion with
date and conversation evidence; then the retriever over a store."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memory.embedding.base import HashEmbedder
from memory.models import MemoryItem, Source
from memory.pieces import MAX_PIECES, embed_with_pieces, pieces
from memory.retrieval import RetrievalConfig, Retriever, fuse
from memory.store.base import Hit, Scope
from memory.store.edge import EdgeStore
from memory.when import date_windows, within

DAY = 86_400


def ts(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp())


# -- dates -------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("What did Nate cook on 9 November, 2022?", [(ts(2022, 11, 9), ts(2022, 11, 10))]),
    ("on the 3rd of June 2023", [(ts(2023, 6, 3), ts(2023, 6, 4))]),
    ("May 3rd, 2021", [(ts(2021, 5, 3), ts(2021, 5, 4))]),
    ("Sept. 14 2020", [(ts(2020, 9, 14), ts(2020, 9, 15))]),
    ("on 2022-01-05", [(ts(2022, 1, 5), ts(2022, 1, 6))]),
    ("at 2022-01-05T10:00", [(ts(2022, 1, 5), ts(2022, 1, 6))]),
    ("What did John volunteer for in August 2023?", [(ts(2023, 8, 1), ts(2023, 9, 1))]),
    ("in December of 2021", [(ts(2021, 12, 1), ts(2022, 1, 1))]),
    ("trips in 2022", [(ts(2022, 1, 1), ts(2023, 1, 1))]),
    ("what happened during 2019?", [(ts(2019, 1, 1), ts(2020, 1, 1))]),
    # Days before months before years, then in order of appearance.
    ("between March 2020 and 5 May 2021", [(ts(2021, 5, 5), ts(2021, 5, 6)),
                                           (ts(2020, 3, 1), ts(2020, 4, 1))]),
])
def test_dates_in_a_query_become_windows(text: str, expected: list[tuple[int, int]]) -> None:
    assert list(date_windows(text, NOW)) == expected


@pytest.mark.parametrize("text", [
    "What does Nate like to cook?",
    "2022 people came",  # a bare number is not a year
    "May I ask what Jon did?",  # nor is "may" a month without a year
    "on 31 February 2022",  # no such day
    "on 2022-13-01",
    "room 1999 in building 7",
    "sales of 2000 units",  # only "in" and "during" make a number a year
    "page 12 of 2019",
    "since 2020",  # not about 2020 itself
    "in 2000 units",
    "How are you today?",  # the present asks nothing about what was said then
    "what are we doing this week",
    "last weekend I read",  # not "last week"
])
def test_text_without_a_date_gives_no_window(text: str) -> None:
    assert date_windows(text, NOW) == ()


NOW = datetime(2026, 11, 24, 15, 30, tzinfo=UTC).timestamp()  # a Tuesday afternoon


@pytest.mark.parametrize(("text", "start", "end"), [
    ("what did we say yesterday", (2026, 11, 23), (2026, 11, 24)),
    ("the day before yesterday", (2026, 11, 22), (2026, 11, 23)),
    ("3 days ago", (2026, 11, 21), (2026, 11, 22)),
    ("a day ago", (2026, 11, 23), (2026, 11, 24)),
    ("last week", (2026, 11, 16), (2026, 11, 23)),  # the calendar week before, from Monday
    ("two weeks ago", (2026, 11, 9), (2026, 11, 16)),
    ("the past week", (2026, 11, 17), (2026, 11, 25)),
    ("last month", (2026, 10, 1), (2026, 11, 1)),
    ("13 months ago", (2025, 10, 1), (2025, 11, 1)),
    ("last year", (2025, 1, 1), (2026, 1, 1)),
    ("2 years ago", (2024, 1, 1), (2025, 1, 1)),
])
def test_relative_dates_are_taken_from_the_query_time(
        text: str, start: tuple[int, int, int], end: tuple[int, int, int]) -> None:
    assert date_windows(text, NOW) == ((ts(*start), ts(*end)),)


def test_relative_dates_follow_the_clock() -> None:
    assert date_windows("yesterday", NOW + DAY) == ((ts(2026, 11, 24), ts(2026, 11, 25)),)
    assert date_windows("on 9 Nov 2022, not last year", NOW) == (
        (ts(2022, 11, 9), ts(2022, 11, 10)), (ts(2025, 1, 1), ts(2026, 1, 1)))
    assert date_windows("999 years ago", NOW) == ((ts(1027, 1, 1), ts(1028, 1, 1)),)
    assert date_windows("5000 years ago", NOW) == ()  # counts of four digits are not read


def test_a_date_is_read_once_as_a_day_not_also_as_its_month() -> None:
    assert len(date_windows("on 9 November, 2022")) == 1


def test_within_allows_slack_on_both_sides() -> None:
    day = (ts(2022, 11, 9), ts(2022, 11, 10))
    assert within(ts(2022, 11, 9) + 3600, (day,), 0)
    assert not within(ts(2022, 11, 10), (day,), 0)  # the end is open
    assert within(ts(2022, 11, 3), (day,), 7 * DAY)
    assert within(ts(2022, 11, 16), (day,), 7 * DAY)
    assert not within(ts(2022, 11, 18), (day,), 7 * DAY)
    assert not within(ts(2022, 11, 9), (), 7 * DAY)


# -- sentence pieces ---------------------------------------------------------------

def test_one_sentence_has_no_pieces() -> None:
    assert pieces("I like green tea") == []
    assert pieces("Melanie: I like green tea.") == []


def test_pieces_are_sentences_with_the_speaker_label_repeated() -> None:
    text = "Melanie: Our trip got off to a bad start. I was scared! Is my son ok? He is."
    assert pieces(text) == ["Melanie: Our trip got off to a bad start.", "Melanie: I was scared!",
                            "Melanie: Is my son ok?", "Melanie: He is."]


def test_abbreviations_do_not_end_a_sentence() -> None:
    assert pieces("I met Dr. Smith today. We talked, e.g. about Mr. Brown.") == [
        "I met Dr. Smith today.", "We talked, e.g. about Mr. Brown."]
    assert pieces("It is No. 5 on the list. Nice.") == ["It is No. 5 on the list.", "Nice."]
    assert pieces("No. Not at all.") == ["No.", "Not at all."]
    assert pieces("I said no. Then left.") == ["I said no.", "Then left."]
    assert pieces("He is 5 ft. tall and well.") == []  # a lower-case word goes on
    assert pieces("Dr. A " * 4000) == []  # one sentence, read in linear time


def test_sentences_in_any_script_and_with_their_own_labels() -> None:
    assert pieces("Élise went home. Édouard stayed.") == ["Élise went home.", "Édouard stayed."]
    assert pieces("Melanie: Hi. Caroline: Hello.") == ["Melanie: Hi.", "Caroline: Hello."]
    assert pieces("Dr. Ann Lee: Hi there. Bye now.") == [
        "Dr. Ann Lee: Hi there.", "Dr. Ann Lee: Bye now."]
    assert pieces("note: buy milk. Call mom.") == ["note: buy milk.", "Call mom."]  # no label
    assert pieces("...") == [] and pieces("") == []


def test_a_long_text_is_grouped_into_at_most_max_pieces_in_order() -> None:
    sentences = [f"Sentence number {i} is here." for i in range(3 * MAX_PIECES + 1)]
    got = pieces(" ".join(sentences))
    assert len(got) == MAX_PIECES
    assert " ".join(got) == " ".join(sentences)


class CountingEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__(dim=64)
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return super().embed(texts)


def test_embed_with_pieces_refuses_an_embedder_that_drops_texts() -> None:
    class Short(HashEmbedder):
        def embed(self, texts: Sequence[str]) -> list[list[float]]:
            return super().embed(texts)[:-1]

    with pytest.raises(RuntimeError, match="2 vectors for 3 texts"):
        embed_with_pieces(Short(8), ["one", "Two here. Three there."])


def test_embed_with_pieces_embeds_once_and_keeps_single_sentences_whole() -> None:
    emb = CountingEmbedder()
    texts = ["Just one sentence", "First part here. Second part there."]
    vectors, piece_vectors = embed_with_pieces(emb, texts)
    assert len(emb.calls) == 1
    # A text with pieces is embedded as its pieces only, not also whole.
    assert emb.calls[0] == ["Just one sentence", "First part here.", "Second part there."]
    assert vectors[0] == HashEmbedder(64).embed_one("Just one sentence")
    assert piece_vectors[0] == []
    assert piece_vectors[1] == HashEmbedder(64).embed(["First part here.", "Second part there."])
    mean = [(a + b) / 2 for a, b in zip(*piece_vectors[1], strict=True)]
    norm = math.sqrt(sum(x * x for x in mean))
    assert vectors[1] == pytest.approx([x / norm for x in mean])


# -- fusion ------------------------------------------------------------------------

T0 = ts(2023, 1, 1)


def item(memory_id: str, text: str | None = None, *, at: int = T0, session: str | None = None,
         user: str = "u") -> MemoryItem:
    return MemoryItem(id=memory_id, tenant="t", cube_id="c", user=user,
                      text=text or f"memory {memory_id}", created_at=at,
                      sources=[Source(session_id=session)] if session else [])


def hits(*pairs: tuple[MemoryItem, float]) -> list[Hit]:
    return [Hit(i, s) for i, s in pairs]


PLAIN = RetrievalConfig(date_boost=0.0, session_boost=0.0)


def test_scores_are_standardised_over_the_union_with_missing_ones_at_the_floor() -> None:
    a, b, c = item("a"), item("b"), item("c")
    out = fuse(hits((a, 0.9), (b, 0.5)), hits((c, 4.0), (a, 2.0)), PLAIN)
    dense = [0.9, 0.5, 0.5]  # c is missing from dense: the lowest dense score
    sparse = [2.0, 0.0, 4.0]  # b is missing from BM25: it shares no word, BM25 0

    def z(xs: list[float]) -> list[float]:
        mean = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        return [(x - mean) / sd for x in xs]

    expected = {k: d + s for k, d, s in zip("abc", z(dense), z(sparse), strict=True)}
    assert [h.item.id for h in out] == sorted(expected, key=lambda k: -expected[k])
    for h in out:
        assert h.score == pytest.approx(expected[h.item.id])


def test_a_clear_keyword_winner_beats_a_dense_near_tie() -> None:
    # Rank fusion would put d first (first and second); score fusion keeps the margins.
    d, k, x = item("d"), item("k"), item("x")
    out = fuse(hits((d, 0.61), (k, 0.60), (x, 0.20)), hits((k, 9.0), (d, 1.0), (x, 0.9)), PLAIN)
    assert out[0].item.id == "k"


def test_a_single_keyword_hit_counts() -> None:
    # The rare name matched one memory only: it must not read as no match at all.
    a, b, z = item("a"), item("b"), item("z")
    out = fuse(hits((a, 0.62), (b, 0.60), (z, 0.30)), hits((b, 7.5)), PLAIN)
    assert [h.item.id for h in out] == ["b", "a", "z"]


def test_one_list_alone_still_ranks() -> None:
    a, b = item("a"), item("b")
    assert [h.item.id for h in fuse(hits((a, 0.2), (b, 0.9)), [], PLAIN)] == ["b", "a"]
    assert [h.item.id for h in fuse(hits((a, 0.2), (b, 0.9)), [], PLAIN, limit=1)] == ["b"]
    assert fuse([], [], PLAIN) == []


def test_items_from_a_date_the_query_names_are_lifted() -> None:
    config = RetrievalConfig(session_boost=0.0)
    on_day = item("on", at=ts(2022, 11, 9) + 3600)
    near = item("near", at=ts(2022, 11, 14))
    far = item("far", at=ts(2022, 12, 30))
    dense = hits((far, 0.9), (near, 0.5), (on_day, 0.4))
    window = date_windows("on 9 November 2022")
    assert [h.item.id for h in fuse(dense, [], config)] == ["far", "near", "on"]
    assert [h.item.id for h in fuse(dense, [], config, window)] == ["near", "on", "far"]
    no_slack = RetrievalConfig(session_boost=0.0, date_slack_days=0)
    assert [h.item.id for h in fuse(dense, [], no_slack, window)] == ["on", "far", "near"]


def test_a_strong_hit_lifts_the_other_items_of_its_conversation() -> None:
    config = RetrievalConfig(date_boost=0.0, session_boost=0.5)
    top = item("top", session="s1")
    mate = item("mate", session="s1")
    other = item("other", session="s2")
    loner = item("loner")  # no session: neither lifts nor is lifted
    dense = hits((top, 0.9), (other, 0.5), (mate, 0.5), (loner, 0.5), (item("z"), 0.1))
    plain = fuse(dense, [], PLAIN)
    out = fuse(dense, [], config)
    assert [h.item.id for h in out][:2] == ["top", "mate"]
    scores = {h.item.id: h.score for h in out}
    before = {h.item.id: h.score for h in plain}
    assert scores["mate"] == pytest.approx(before["mate"] + 0.5 * before["top"])
    assert scores["top"] == pytest.approx(before["top"])  # its mate scores below zero
    assert scores["other"] == pytest.approx(before["other"])
    assert scores["loner"] == pytest.approx(before["loner"])


def test_sessions_are_told_apart_by_user() -> None:
    config = RetrievalConfig(date_boost=0.0, session_boost=0.5)
    top = item("top", session="s1", user="alice")
    stranger = item("stranger", session="s1", user="bob")
    dense = hits((top, 0.9), (stranger, 0.5), (item("x"), 0.5), (item("z"), 0.1))
    scores = {h.item.id: h.score for h in fuse(dense, [], config)}
    assert scores["stranger"] == pytest.approx(scores["x"])


def test_the_same_words_twice_are_injected_once() -> None:
    a, b = item("a", "I like  Tea"), item("b", "i like tea")
    out = fuse(hits((a, 0.9), (b, 0.8)), [], PLAIN)
    assert [h.item.id for h in out] == ["a"]


# -- the retriever over a store ------------------------------------------------------

def test_retriever_finds_a_memory_by_one_of_its_sentences_and_by_its_date(tmp_path: Path) -> None:
    emb = HashEmbedder(dim=256)
    store = EdgeStore(tmp_path / "store", embedding_model=emb.model_id, dim=emb.dim)
    try:
        items = [
            item("trip", "We drove along the coast all week. The car broke down near a fishing "
                         "village.", at=ts(2023, 5, 2), session="s1"),
            item("car", "Cars and coasts and villages and fishing, every weekend.", at=ts(2023, 1, 8),
                 session="s2"),
            item("cake", "I baked a lemon cake for the party.", at=ts(2023, 5, 2), session="s1"),
            item("bread", "I baked rye bread for the party.", at=ts(2023, 3, 9), session="s3"),
        ]
        vectors, piece_vectors = embed_with_pieces(emb, [i.text for i in items])
        store.upsert(items, vectors, piece_vectors)
        retriever = Retriever(store, emb)
        scope = Scope("t")
        found = retriever.search(scope, "the car broke down near a fishing village", 2)
        assert found[0].item.id == "trip"
        # Two cakes of a party; the date picks the one baked that day.
        assert retriever.search(scope, "What did I bake on 2 May 2023?", 1)[0].item.id == "cake"
        assert retriever.search(scope, "What did I bake in March 2023?", 1)[0].item.id == "bread"
        # Relative to now: yesterday's bake over the one of last spring.
        pie = item("pie", "I baked an apple pie for the party.", at=int(time.time()) - DAY,
                   session="s4")
        store.upsert([pie], emb.embed([pie.text]))
        assert retriever.search(scope, "What did I bake yesterday?", 1)[0].item.id == "pie"
        assert retriever.search(scope, "   ", 3) == []
        assert retriever.search(scope, "cake", 0) == []
    finally:
        store.close()
