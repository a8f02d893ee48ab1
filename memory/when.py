"""Dates named in a query, as time windows to favour memories from.

"What did Nate cook on 9 November, 2022?" is about what was said around that day,
not about every mention of cooking. Only absolute dates are read (a day, a month, a
year), in the usual English spellings; they are taken as UTC days. A regex per form
is enough, and at about 10 us per query it costs recall nothing; a general date
parser (dateparser) takes milliseconds and reads dates into words such as "may".
"""

from __future__ import annotations

import calendar
import re
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
    (re.compile(rf"\b{_YEAR}-(\d\d)-(\d\d)\b"), "iso"),
    (re.compile(rf"\b{_DAY}\s+(?:of\s+)?{_MON},?\s+{_YEAR}\b", re.I), "day month year"),
    (re.compile(rf"\b{_MON}\s+{_DAY},?\s+{_YEAR}\b", re.I), "month day year"),
    (re.compile(rf"\b{_MON},?\s+(?:of\s+)?{_YEAR}\b", re.I), "month year"),
    # A bare number is a year only after a word that says so ("in 2022", not "2022 people").
    (re.compile(rf"\b(?:in|of|during|since|before|after|by|from|until)\s+{_YEAR}\b", re.I), "year"),
)


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


@lru_cache(maxsize=4096)
def date_windows(text: str) -> tuple[Window, ...]:
    """The [start, end) epoch-second windows of the dates ``text`` names, in order of
    their kind (days first), then of appearance. Impossible dates are skipped."""
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
    return tuple(found)


def within(at: int, windows: tuple[Window, ...], slack_s: int) -> bool:
    return any(start - slack_s <= at < end + slack_s for start, end in windows)
