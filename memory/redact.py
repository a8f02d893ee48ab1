"""Secrets never become memories: mask the credential values in a text before it is written.

Only the value is masked ("my password is [REDACTED]"); the words around it stay. A value is
masked when it has a known credential format, or when a secret-naming word ("password", "api
key", "pw", ...) introduces something that looks like a credential: digits, symbols, mixed case,
high entropy, a quoted value, or a lone value after "password:". An ordinary word after such a
word is prose and is kept ("The VPN password rotates every 90 days", "Secret plan: buy ...").

Known formats come from Yelp's detect-secrets, in-process: its detectors' regexes, its JWT
check and its keyword vocabulary. Its scan machinery is not used: it costs ~2 ms a line, reports
every prose word as an entropy candidate when scanning ad hoc, reads global settings and may call
a detector's verify() over the network. Our own patterns add what it lacks: newer provider key
formats, Luhn-checked card numbers, PEM key bodies, credentials in URLs and Authorization
headers, passwords stated in prose, and long random tokens without a label.
This runs on the write path of every memory, so each finder first checks, with plain string
operations, whether the text could hold what it looks for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import DENYLIST
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

MASK = "[REDACTED]"

Span = tuple[int, int]


# --- Known formats -------------------------------------------------------------------------------
def _denylist(detector: RegexBasedDetector) -> list[re.Pattern[str]]:
    return list(detector.denylist)


# detect-secrets' fixed-format detectors. Left out: its keyword-scoped IBM/Softlayer/Cloudant
# detectors (the prose rules below cover "key: value"), Artifactory (matches words such as
# "APEX..."), public IPs (not secrets). Their regexes run with finditer, not analyze_string:
# GitHubTokenDetector's findall yields only its prefix group ("ghp"), not the token.
_DS_PATTERNS = [
    pattern
    for detector in (AWSKeyDetector, AzureStorageKeyDetector, DiscordBotTokenDetector,
                     GitHubTokenDetector, GitLabTokenDetector, MailchimpDetector, NpmDetector,
                     OpenAIDetector, PypiTokenDetector, SendGridDetector, SlackDetector,
                     SquareOAuthDetector, StripeDetector, TelegramBotTokenDetector, TwilioKeyDetector)
    for pattern in _denylist(detector())
]
# Formats detect-secrets lacks, or knows in one length only (ghp_ with exactly 36 characters).
_PROVIDER_KEYS = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-[A-Za-z0-9_-]{20,}"                       # OpenAI sk-/sk-proj-/sk-svcacct-, Anthropic sk-ant-
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{24,}"  # Stripe
    r"|(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}|ya29\.[0-9A-Za-z_-]{20,}|GOCSPX-[A-Za-z0-9_-]{20,}"  # Google
    r"|hf_[A-Za-z0-9]{30,}|gsk_[A-Za-z0-9]{20,}|xai-[A-Za-z0-9]{20,}|r8_[A-Za-z0-9]{20,}"
    r"|pplx-[A-Za-z0-9]{20,}|npm_[A-Za-z0-9]{36}|do[opr]_v1_[a-f0-9]{64}"
    r"|shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}|lin_api_[A-Za-z0-9]{40}|ATATT3[A-Za-z0-9_=-]{20,}"
    r"|key-[0-9a-f]{32}"                             # Mailgun
    r")"
)
_AWS_SECRET = AWSKeyDetector.denylist[1]  # "aws ... key ... '<40 characters>'" spans words
_TOKEN_PATTERNS = [p for p in _DS_PATTERNS if p is not _AWS_SECRET] + [_PROVIDER_KEYS]
_RUN = re.compile(r"\S{16,}")  # every fixed format lies in one whitespace-free run this long
# ...and has 16+ key characters in a row: URLs, paths and dates do not, and skip the patterns.
_DENSE = re.compile(r"[A-Za-z0-9_+=-]{16,}")
_JWT = JwtTokenDetector.denylist[0]
_AUTH_HEADER = re.compile(r"(?i)\b(?:bearer|basic)\s+([A-Za-z0-9._~+/=-]{16,})")
_URL_CREDENTIALS = re.compile(r"://[^\s:/@]*:([^\s@/]+)@")  # detect-secrets' BasicAuth, narrowed
_PEM = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----(.*?)(?:-----END \1-----|\Z)",
                  re.DOTALL)
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9+=_-])[A-Za-z0-9+_-]{20,}=*")  # "=" only as padding
_LEFT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+/")
_RIGHT = _LEFT | {"=", "."}


def _widen(text: str, start: int, end: int) -> Span:
    """A format match stretched to its whole token: a key's tail is as secret as its head."""
    while start > 0 and text[start - 1] in _LEFT:
        start -= 1
    while end < len(text) and text[end] in _RIGHT:
        end += 1
    while end > start and text[end - 1] == ".":
        end -= 1
    return start, end


def _value_group(m: re.Match[str]) -> int:
    """0, or the group a pattern captures its value in (npm's token after "_authToken=")."""
    best = max(range(1, m.re.groups + 1), key=lambda g: len(m.group(g) or ""), default=0)
    return best if best and len(m.group(best) or "") >= 16 else 0


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character: detect-secrets' HighEntropyString measure, counted
    over the value's own characters instead of looping over its 66-character alphabet (~3x faster)."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in map(value.count, set(value)))


def _high_entropy(run: str, base: int) -> Iterator[Span]:
    """A random-looking token without a label: upper, lower and digits, long, high entropy. Hex
    (git SHAs, UUIDs, hashes) is an identifier and stays; a hex secret needs a keyword before it."""
    for m in _LONG_TOKEN.finditer(run):
        core = max(re.split(r"[-_]", m.group()), key=len)  # model-Q4_K_M-names split into short parts
        if (len(core) >= 16 and any(c.isupper() for c in core) and any(c.islower() for c in core)
                and sum(c.isdigit() for c in core) >= 2 and _entropy(core) >= 3.7):
            yield base + m.start(), base + m.end()


def _known_formats(text: str, low: str) -> Iterator[Span]:
    for token in _RUN.finditer(text):
        run, base = token.group(), token.start()
        if not _DENSE.search(run):
            continue
        known = False
        for pattern in _TOKEN_PATTERNS:
            for m in pattern.finditer(run):
                start, end = m.span(_value_group(m))
                known = True
                yield _widen(text, base + start, base + end)
        if "eyJ" in run:
            for m in _JWT.finditer(run):
                span = _widen(text, base + m.start(), base + m.end())
                if JwtTokenDetector.is_formally_valid(text[span[0]:span[1]]):
                    known = True
                    yield span
        if not known and "://" not in run:  # ids in URLs (docs, playlists) are addresses
            yield from _high_entropy(run, base)
    if "aws" in low:
        yield from (m.span(1) for m in _AWS_SECRET.finditer(text))
    if "bearer" in low or "basic" in low:
        yield from (m.span(1) for m in _AUTH_HEADER.finditer(text) if _looks_secret(m.group(1)))
    if "://" in text and "@" in text:
        yield from (m.span(1) for m in _URL_CREDENTIALS.finditer(text))
    if "PRIVATE KEY" in text:
        yield from (m.span(2) for m in _PEM.finditer(text) if m.group(2).strip())


# --- Card numbers --------------------------------------------------------------------------------
# 13-19 digits, bare or grouped 4-4-4-x / 4-6-5 with one consistent separator, issuer digit 2-6
# (Mastercard, Amex/Diners, Visa, Mastercard, Discover), Luhn-valid. Phone numbers (+...), order
# ids and other digit runs fail one of these.
_CARD = re.compile(r"\d(?<![\w+.,-]\d)"
                   r"(?:\d{12,18}|\d{3}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{3}([ -])\d{6}\2\d{4,5})"
                   r"(?![\w-]|[.,]\d)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _cards(text: str, low: str) -> Iterator[Span]:
    if sum(map(text.count, "0123456789")) < 13:
        return
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn_ok(digits):
            yield m.span()


# --- Secrets stated in prose ---------------------------------------------------------------------
# detect-secrets' keyword vocabulary ("api_?key", "db_?pass", "password", "pwd", ...) plus words
# people use in conversation. A head word stands alone ("password") or needs one of its prefixes,
# joined by nothing, a space, "_" or "-" ("api key", "API_KEY", "apikey"; not "the key").
_STANDALONE = {k for k in DENYLIST if "_?" not in k} | {
    "pass", "passphrase", "passcode", "pw", "pin", "token", "cvv", "cvc"}
_PREFIXES: dict[str, set[str]] = {
    "key": {"access", "secret"},
    # "the code is in the repo" is prose; "the alarm code is 7391" is not.
    "code": {"alarm", "door", "gate", "safe", "lock", "entry", "access", "security", "pin", "otp",
             "2fa", "mfa", "verification", "unlock"}}
for _pair in (k.split("_?") for k in DENYLIST if "_?" in k):
    _PREFIXES.setdefault(_pair[1], set()).add(_pair[0])
_HEAD = re.compile(rf"(?:{'|'.join(sorted(_STANDALONE | set(_PREFIXES), key=len, reverse=True))})"
                   r"(?![a-z0-9])")
_PREFIX = {head: re.compile(rf"(?:{'|'.join(sorted(p, key=len, reverse=True))})[ _-]?$")
           for head, p in _PREFIXES.items()}
_PASSWORD_HEADS = frozenset({"password", "passwd", "pwd", "pw", "pin", "pass", "passphrase", "passcode"})
_HINTS = ("pass", "pw", "pin", "secret", "token", "key", "contrase", "code", "cvv", "cvc")
_VERBS = r"is now|is still|now is|will be|changed to|set to|reset to|became|is|was|are"
# What follows the word: an optional qualifier ("password for the router"), then the connector.
_AFTER = re.compile(
    r"(?i)(?P<qualifier>\s+(?:for|to|on|of|at)\s+(?:the\s+|my\s+|our\s+|your\s+)?[\w.@-]+"
    rf"(?:\s+(?!(?:{_VERBS})\b)[\w.@-]+)?)?"
    rf"(?:(?P<assign>\s*(?::=|=>|[:=](?!//))\s*)|(?P<verb>\s+(?:{_VERBS})\s+|['’]s\s+)|(?P<bare>\s+))")
# "the current one is X", "it's now X", "changed it to X": a value a password word named earlier.
_BACKREF = re.compile(r"one\s*(?:is|was)(?:\s+now)?\s+|it\s*(?:is|was|'s|’s)(?:\s+now)?\s+"
                      r"|changed\s+(?:it|that)\s+to\s+|set\s+(?:it|that)\s+to\s+"
                      r"|reset\s+(?:it|that)\s+to\s+|updated\s+(?:it|that)\s+to\s+")
_QUOTES = {"'": "'", '"': '"', "`": "`", "“": "”", "‘": "’"}
_TRAILING = ".,;:?)]}>'\"”’"
_UNIT = re.compile(r"\s+(?:characters|chars|digits|letters|symbols|long|days|weeks|months|years"
                   r"|hours|minutes|seconds|times|attempts)\b", re.I)
_NON_VALUES = frozenset({"none", "null", "empty", "blank", "n/a", "na", "unknown", "required",
                         "optional", "hidden", "redacted", "same", "changed", "expired", "reset",
                         "forgotten", "unchanged", "tbd", "secret", "password"})


def _looks_secret(value: str, shortest: int = 4) -> bool:
    """A value shaped like a credential rather than an English word."""
    if len(value) < shortest or len(value) > 256:
        return False
    if any(c.isdigit() for c in value):
        return any(c.isalpha() for c in value) or len(value) <= 12  # hunter2; a PIN, not a long number
    symbols = {c for c in value if not c.isalnum()}
    if symbols - {"-", "'", "’"}:
        return True  # p@ssword, swordfish!, a_b
    if "-" in symbols:
        return value.count("-") >= 2  # correct-horse-battery; not "self-explanatory"
    if any(a.islower() and b.isupper() for a, b in zip(value, value[1:], strict=False)):
        return True  # SuperSecret, iLoveCats
    return len(value) >= 16 and _entropy(value) >= 3.5


def _value_at(text: str, pos: int) -> tuple[Span, bool] | None:
    """The value starting at pos, and whether it was quoted."""
    if pos >= len(text):
        return None
    close = _QUOTES.get(text[pos])
    if close:
        end = text.find(close, pos + 1, pos + 120)
        return ((pos + 1, end), True) if end > pos + 1 and "\n" not in text[pos:end] else None
    end = pos
    while end < len(text) and not text[end].isspace():
        end += 1
    while end > pos and text[end - 1] in _TRAILING:
        if text[end - 1] == ")" and "(" in text[pos:end - 1]:
            break
        end -= 1
    return ((pos, end), False) if end > pos else None


def _alone_in_clause(text: str, end: int) -> bool:
    rest = text[end:]
    stop = min((i for i in (rest.find(c) for c in ".;,!?\n") if i >= 0), default=len(rest))
    return not rest[:stop].strip()


def _accept(text: str, found: tuple[Span, bool] | None, kind: str, shortest: int = 4) -> Span | None:
    """The value's span when, after this kind of connector, it reads as a secret."""
    if found is None:
        return None
    (start, end), quoted = found
    value = text[start:end]
    if quoted:
        return (start, end) if kind != "bare" else None
    if value.isdigit() and (kind == "bare" or _UNIT.match(text, end)):
        return None  # "my password is 12 characters long"
    if _looks_secret(value, shortest):
        return start, end
    # "wifi password: swordfish": a lone word after a label is the value, whatever it looks like.
    if (kind == "assign" and value.lower() not in _NON_VALUES and _alone_in_clause(text, end)
            and value.replace("-", "").isalnum()):
        return start, end
    return None


def _starts_word(low: str, at: int) -> bool:
    return at == 0 or not low[at - 1].isalnum()  # "DB_PASSWORD" counts, "1Password" does not


def _keywords(low: str) -> Iterator[tuple[str, int]]:
    """Each secret-naming word: its head ("password", "key") and where it ends."""
    for m in _HEAD.finditer(low):
        head, start = m.group(), m.start()
        if head in _STANDALONE and _starts_word(low, start):
            yield head, m.end()
        elif head in _PREFIX:
            prefix = _PREFIX[head].search(low, max(0, start - 9), start)
            if prefix and _starts_word(low, prefix.start()):
                yield head, m.end()


def _prose(text: str, low: str) -> Iterator[Span]:
    if not any(hint in low for hint in _HINTS):
        return
    if len(low) != len(text):  # a few characters lowercase to two; keep offsets aligned
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    password_end = -1
    for head, end in _keywords(low):
        if head in _PASSWORD_HEADS and password_end < 0:
            password_end = end
        after = _AFTER.match(text, end)
        if after is None:
            continue
        kind = "assign" if after.group("assign") is not None else "verb" if after.group("verb") else "bare"
        if kind == "bare" and after.group("qualifier"):
            continue  # "token for the API limits": a qualified value needs "is" or ":"
        span = _accept(text, _value_at(text, after.end()), kind, 3 if head in ("cvv", "cvc") else 4)
        if span:
            yield span
    if password_end >= 0:
        for m in _BACKREF.finditer(low, password_end):
            if _starts_word(low, m.start()):
                span = _accept(text, _value_at(text, m.end()), "verb")
                if span:
                    yield span


# --- Masking -------------------------------------------------------------------------------------
_FINDERS: tuple[Callable[[str, str], Iterator[Span]], ...] = (_known_formats, _cards, _prose)


def secret_spans(text: str) -> list[Span]:
    """Where the secrets are: sorted, merged (start, end) offsets into text."""
    low = text.lower()  # for cheap "could it be here" checks; offsets come from text
    spans = sorted(span for find in _FINDERS for span in find(text, low) if span[1] > span[0])
    merged: list[Span] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact(text: str) -> str:
    """The text with secrets masked."""
    out, last = [], 0
    for start, end in secret_spans(text):
        out += [text[last:start], MASK]
        last = end
    return "".join(out) + text[last:] if out else text
