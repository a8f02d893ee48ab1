"""Dates named in a query, as time windows to favour memories from.

"What did Nate cook on 9 November, 2022?" is about what was said around that day,
not about every mention of cooking. Read are absolute dates (a day, a month, a year)
in the usual English spellings, and past dates relative to the query's own time
("yesterday", "3 days ago", "last week", "the past month", "last year"); days are UTC
days. Present ones ("today", "this week") are not read: "How are you today?" asks
nothing about what was said today, and would lift every recent memory.
A regex per form is enough, and at about 10 us per query it costs recall nothing; a
general date parser (dateparser) takes milliseconds and reads dates into words such
as "may".
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache

Window = tuple[int, int]  # [start, end) in epoch seconds

_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_name) if m}
_MONTHS |= {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_MONTHS["sept"] = 9
_MON = (r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
        r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_YEAR = r"((?:19|20)\d\d)"
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"

# Most specific first: a span read by one form is not read again by a later one.
_FORMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"\b{_YEAR}-(\d\d)-(\d\d)(?![\d-])"), "iso"),  # "2022-01-05T10:00" too
    (re.compile(rf"\b{_DAY}\s+(?:of\s+)?{_MON},?\s+{_YEAR}\b", re.I), "day month year"),
    (re.compile(rf"\b{_MON}\s+{_DAY},?\s+{_YEAR}\b", re.I), "month day year"),
    (re.compile(rf"\b{_MON},?\s+(?:of\s+)?{_YEAR}\b", re.I), "month year"),
    # A bare number is a year only after "in" or "during" ("in 2022"; not "2022 people",
    # "sales of 2000 units", or "since 2020", which is not about 2020 itself).
    (re.compile(rf"\b(?:in|during)\s+{_YEAR}\b(?!\s*(?:%|percent\b|units?\b|people\b|times\b))",
                re.I), "year"),
)


_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
            "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_COUNT = r"(\d{1,3}|an?|one|two|three|four|five|six|seven|eight|nine|ten)"
_RELATIVE = re.compile(
    rf"\b(?:(yesterday)|(?:the\s+)?day\s+before\s+(yesterday)"
    rf"|{_COUNT}\s+(day|week|month|year)s?\s+ago"
    rf"|(last|past)\s+(week|month|year))\b", re.I)


def _month_start(day: datetime, back: int) -> datetime:
    index = day.year * 12 + day.month - 1 - back
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _relative(m: re.Match[str], today: datetime) -> Window:
    """A window for one relative expression, ``today`` being the query's UTC day."""
    def span(start: datetime, end: datetime) -> Window:
        return int(start.timestamp()), int(end.timestamp())

    day = timedelta(days=1)
    week_start = today - timedelta(days=today.weekday())
    if m.group(1):
        return span(today - day, today)
    if m.group(2):
        return span(today - 2 * day, today - day)
    if m.group(3):
        n, unit = _NUMBERS.get(m.group(3).lower()) or int(m.group(3)), m.group(4).lower()
        if unit == "day":
            return span(today - n * day, today - (n - 1) * day)
        if unit == "week":
            return span(week_start - n * 7 * day, week_start - (n - 1) * 7 * day)
        if unit == "month":
            return span(_month_start(today, n), _month_start(today, n - 1))
        return span(datetime(today.year - n, 1, 1, tzinfo=UTC),
                    datetime(today.year - n + 1, 1, 1, tzinfo=UTC))
    which, unit = m.group(5).lower(), m.group(6).lower()
    if which == "past":  # the past week: the seven days before today, and today
        length = {"week": 7, "month": 30, "year": 365}[unit]
        return span(today - length * day, today + day)
    if unit == "week":  # last week: the calendar week before this one, from Monday
        return span(week_start - 7 * day, week_start)
    if unit == "month":
        return span(_month_start(today, 1), _month_start(today, 0))
    return span(datetime(today.year - 1, 1, 1, tzinfo=UTC), datetime(today.year, 1, 1, tzinfo=UTC))


def _day(year: int, month: int, day: int) -> Window:
    start = datetime(year, month, day, tzinfo=UTC)
    return int(start.timestamp()), int((start + timedelta(days=1)).timestamp())


def _window(kind: str, g: tuple[str, ...]) -> Window:
    if kind == "iso":
        return _day(int(g[0]), int(g[1]), int(g[2]))
    if kind == "day month year":
        return _day(int(g[2]), _MONTHS[g[1].lower()], int(g[0]))
    if kind == "month day year":
        return _day(int(g[2]), _MONTHS[g[0].lower()], int(g[1]))
    if kind == "month year":
        year, month = int(g[1]), _MONTHS[g[0].lower()]
        end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
        return int(datetime(year, month, 1, tzinfo=UTC).timestamp()), int(end.timestamp())
    year = int(g[0])
    return (int(datetime(year, 1, 1, tzinfo=UTC).timestamp()),
            int(datetime(year + 1, 1, 1, tzinfo=UTC).timestamp()))


def date_windows(text: str, at: float | None = None) -> tuple[Window, ...]:
    """The [start, end) epoch-second windows of the dates ``text`` names: absolute ones
    in order of their kind (days first), then of appearance; then relative ones, taken
    from the UTC day of ``at`` (default: now). Impossible dates are skipped."""
    day = int(time.time() if at is None else at) // 86_400
    # Chat turns are read once; search queries repeat. Only short texts are cached, so
    # the cache stays small whatever users send.
    return _cached(text, day) if len(text) <= 512 else _windows(text, day)


@lru_cache(maxsize=4096)
def _cached(text: str, day: int) -> tuple[Window, ...]:
    return _windows(text, day)


def _windows(text: str, day: int) -> tuple[Window, ...]:
    found: list[Window] = []
    taken: list[tuple[int, int]] = []
    for pattern, kind in _FORMS:
        for m in pattern.finditer(text):
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            taken.append(m.span())
            try:
                found.append(_window(kind, m.groups()))
            except ValueError:  # 31 February, month 13
                continue
    today = datetime.fromtimestamp(day * 86_400, UTC)
    for m in _RELATIVE.finditer(text):
        try:
            found.append(_relative(m, today))
        except (ValueError, OverflowError):  # 999 years ago
            continue
    return tuple(found)


def within(at: int, windows: tuple[Window, ...], slack_s: int) -> bool:
    return any(start - slack_s <= at < end + slack_s for start, end in windows)
