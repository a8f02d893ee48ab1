from __future__ import annotations

from collections.abc import Callable

import pytest

from memory.redact import MASK, redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [("my key is sk-proj-abcdefghijklmnop1234567890", "sk-proj-abcdefghijklmnop1234567890"),
     ("use sk-ABCDEFGHIJKLMNOPQRSTUVWX please", "sk-ABCDEFGHIJKLMNOPQRSTUVWX"),
     ("token ghp_abcdefghijklmnopqrstuvwxyz0123", "ghp_abcdefghijklmnopqrstuvwxyz0123"),
     ("aws AKIAABCDEFGHIJKLMNOP here", "AKIAABCDEFGHIJKLMNOP"),
     ("my password is hunter2!", "hunter2"),
     ("password: correct-horse", "correct-horse"),
     ("api_key=abc123def456", "abc123def456"),
     ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
     ("card 4111-1111-1111-1111", "4111-1111-1111-1111"),
     ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmnopqrstuvwxyz012345")],
)
def test_secrets_are_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert MASK in out


@pytest.mark.parametrize(
    "text",
    ["I live in Lisbon and like tea.",
     "My phone order number is 1234 5678 9012 3456",  # fails Luhn: not a card
     "We met on 8 May 2023 at 1:56 pm.",
     "The sky-blue kite cost 12 euros."],
)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert redact(text) == text


# The table: realistic turns, each must-mask (the secret substring, which alone becomes MASK) or
# must-keep (None: the text comes back unchanged). score() turns it into precision and recall.
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkphbmUifQ"
       ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
PEM_BODY = "\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
TABLE: list[tuple[str, str | None]] = [
    # must-mask: passwords stated in prose
    ("I changed my email password, the current one is hunter2-Secret!", "hunter2-Secret!"),
    ("password: Tr0ub4dor&3", "Tr0ub4dor&3"),
    ("pw is hunter2", "hunter2"),
    ("pw: s3cr3t, don't share it", "s3cr3t"),
    ("my password is hunter2!", "hunter2!"),
    ("The wifi password for the guest network is Blue-Otter-42.", "Blue-Otter-42"),
    ("wifi password: swordfish", "swordfish"),
    ("my password is 'open sesame' and I never change it", "open sesame"),
    ("the passphrase is correct-horse-battery-staple", "correct-horse-battery-staple"),
    ("My bank PIN is 4821, please remember it", "4821"),
    ("I reset my password and changed it to Summer2024!", "Summer2024!"),
    ("my password is SuperSecretPass", "SuperSecretPass"),
    ("api_key=abc123def456", "abc123def456"),
    ("client secret = q8Rr-Zt3v_Lm", "q8Rr-Zt3v_Lm"),
    ("token: 9f86d081884c7d659a2feaea0ad0c15b", "9f86d081884c7d659a2feaea0ad0c15b"),
    ("The password for the router is admin123", "admin123"),
    ("rotate the DB_PASSWORD=hunter22 tonight", "hunter22"),
    ("I changed my password. It's now Gr33n!Tea", "Gr33n!Tea"),
    ("her wifi pass is kittens99", "kittens99"),
    ("the alarm code is 7391", "7391"),
    ("my pin's 2580", "2580"),
    ("cvv is 123", "123"),
    ("Login: admin / Password: Adm1n!2024", "Adm1n!2024"),
    # must-mask: known formats
    ("My API key is sk-proj-Ab3dE5gH7jK9mN1pQ3sT5vX7zB9cD1fG", "sk-proj-Ab3dE5gH7jK9mN1pQ3sT5vX7zB9cD1fG"),
    ("export OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwxyz123456", "sk-abcdefghijklmnopqrstuvwxyz123456"),
    ("anthropic: sk-ant-api03-AbCdEf0123456789_xyzXYZ-9876543210abcdEFGH",
     "sk-ant-api03-AbCdEf0123456789_xyzXYZ-9876543210abcdEFGH"),
    ("aws key AKIAIOSFODNN7EXAMPLE for the backup bucket", "AKIAIOSFODNN7EXAMPLE"),
    ("the CI uses ghp_16C7e42F292c6912E7710c838347Ae178B4a now", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("fine-grained github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN works",
     "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"),
    ("slack bot token xoxb-2345678901-abcdefghijkl0123", "xoxb-2345678901-abcdefghijkl0123"),
    ("Stripe live key sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("use sk_test_4eC39HqLyjWDarjtT1zdp7dc in staging", "sk_test_4eC39HqLyjWDarjtT1zdp7dc"),
    ("HF token hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"),
    ("Maps key AIzaSyA-1234567890abcdefghijklmnopqrstu", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("gitlab glpat-AbCdEfGhIjKlMnOpQrSt9 expires soon", "glpat-AbCdEfGhIjKlMnOpQrSt9"),
    (f"the session JWT is {JWT}.", JWT),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmnopqrstuvwxyz012345"),
    ("curl -H 'Authorization: Bearer 7f9c2ba4e88f827d61604550760585a3' https://api.example.com",
     "7f9c2ba4e88f827d61604550760585a3"),
    (f"-----BEGIN RSA PRIVATE KEY-----{PEM_BODY}-----END RSA PRIVATE KEY-----", PEM_BODY),
    ("pasted -----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmU",
     " b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"),
    ("connect to postgres://app:pa55w0rd@db.internal:5432/prod", "pa55w0rd"),
    ("visit https://bob:hunter2@example.com", "hunter2"),
    ("cache at redis://:s3cretP4ss@cache:6379/0", "s3cretP4ss"),
    ("GET https://api.example.com/v1/data?api_key=Zx81Qw3Er7Ty1Ui5Op2As8Df", "Zx81Qw3Er7Ty1Ui5Op2As8Df"),
    ("use 8Hk3ZpQ1xLm9Vw2RtY7uNc4B for the staging login", "8Hk3ZpQ1xLm9Vw2RtY7uNc4B"),
    # must-mask: card numbers (Luhn-valid)
    ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("pay with 5555-5555-5555-4444 please", "5555-5555-5555-4444"),
    ("My Amex is 378282246310005.", "378282246310005"),
    ("Discover 6011 1111 1111 1117 is the backup card", "6011 1111 1111 1117"),
    # must-keep: prose around secret words
    ("The VPN password rotates every 90 days", None),
    ("I forgot my password again", None),
    ("Secret plan: buy the blue house", None),
    ("the token economy is booming", None),
    ("passwords must be 12 characters", None),
    ("my password is 12 characters long", None),
    ("The password is wrong, try again.", None),
    ("password: see the vault entry", None),
    ("Reset your password at https://example.com/reset", None),
    ("Use a password manager like 1Password.", None),
    ("My secret is that I love pineapple pizza", None),
    ("the secret ingredient is cinnamon", None),
    ("Secret Santa is on Dec 12", None),
    ("The API key goes in the Authorization header", None),
    ("The token limit is 4096 for this model", None),
    ("The 2FA token expires in 30 seconds", None),
    ("password reset emails take 5 minutes", None),
    ("Pin the tab to the top of the window", None),
    ("Meeting ID 845 2231 9087, no passcode needed", None),
    ("He was the bearer of extraordinarily good news", None),
    ("I forgot my password; it's annoying.", None),
    ("The password is on the fridge", None),
    ("My password is the same as before", None),
    ("Secret: the cake is a lie", None),
    ("the secret to good bread is time", None),
    ("The code is in the repo and the zip code is 94107", None),
    ("Pass the salt, please", None),
    # must-keep: numbers that are not cards
    ("My phone order number is 1234 5678 9012 3456", None),
    ("Call me at +1 415 555 2671 after six", None),
    ("Order id 88231904553 shipped", None),
    ("card ending 4929 1234 5678 9012 was declined", None),  # fails Luhn
    ("ISBN 978-0-306-40615-7 is on the shelf", None),
    ("We met on 8 May 2023 at 1:56 pm.", None),
    ("Upgrade to Python 3.11.4 and numpy 1.26.0", None),
    # must-keep: identifiers. A git SHA or UUID is a public name for a commit or record, useful
    # in memory and no credential; hex only becomes a secret when a keyword names it (token: ...).
    ("The fix landed in commit 3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39", None),
    ("short sha 3f2a9c1 broke the build", None),
    ("The UUID is 123e4567-e89b-12d3-a456-426614174000", None),
    ("Version v2.4.1-rc3 is out", None),
    ("load Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf from disk", None),
    ("Tracking number 1Z999AA10123456784", None),
    ("the file is IMG_20230512_184233.jpg", None),
    ("email me at jane.doe@example.com or visit http://localhost:8000/docs", None),
    ("my playlist https://www.youtube.com/playlist?list=PLx0sYbCqOb8TBPRdmBHs5Iftvv9TPboYG", None),
    ("camelCase helpers like getUserAccountSettingsById are fine", None),
]


@pytest.mark.parametrize(("text", "secret"), [row for row in TABLE if row[1] is not None])
def test_table_masks_only_the_secret(text: str, secret: str) -> None:
    assert redact(text) == text.replace(secret, MASK)


@pytest.mark.parametrize("text", [text for text, secret in TABLE if secret is None])
def test_table_keeps_prose(text: str) -> None:
    assert redact(text) == text


def score(redactor: Callable[[str], str]) -> dict[str, float]:
    """Precision and recall of a redactor over TABLE. A must-mask row counts as found when its
    secret is gone; exact counts found rows whose only change is the secret becoming MASK. A
    must-keep row that changes is a false positive."""
    tp = fn = fp = exact = 0
    for text, secret in TABLE:
        out = redactor(text)
        if secret is None:
            fp += out != text
        elif secret in out:
            fn += 1
        else:
            tp += 1
            exact += out == text.replace(secret, MASK)
    return {"tp": tp, "fn": fn, "fp": fp, "exact": exact,
            "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn)}


def test_table_size_and_score() -> None:
    assert len(TABLE) >= 40
    masked = sum(secret is not None for _, secret in TABLE)
    assert score(redact) == {"tp": masked, "fn": 0, "fp": 0, "exact": masked,
                             "precision": 1.0, "recall": 1.0}
    # The scorer itself: doing nothing finds nothing; masking everything hits every kept row.
    assert score(lambda t: t) == {"tp": 0, "fn": masked, "fp": 0, "exact": 0,
                                  "precision": 0.0, "recall": 0.0}
    everything = score(lambda t: MASK)
    assert (everything["recall"], everything["fp"]) == (1.0, len(TABLE) - masked)


if __name__ == "__main__":  # python tests/test_redact.py [old_redact.py]: the scores, one JSON line
    import importlib.util
    import json
    import sys

    scores = {"new": score(redact)}
    if len(sys.argv) > 1:
        spec = importlib.util.spec_from_file_location("old_redact", sys.argv[1])
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        scores["old"] = score(old.redact)
    print(json.dumps(scores))
