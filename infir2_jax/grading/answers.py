"""Reading a final answer out of a model's response, in time linear in its length, and
screening answers whose symbolic evaluation could run away.

Responses are the policy's own output, so every function here must stay cheap on hostile
text: no regular expression with nested quantifiers over a whole response, no integer
conversion of unbounded digit strings (Python refuses more than 4300 digits), and no
expression handed to sympy that it would expand into a huge number (a power tower, a
factorial of a factorial) inside C code, where no timeout signal lands.
"""

from __future__ import annotations

import re

THINK_END = "</think>"
# Longer answers are not expressions worth handing to sympy.
MAX_ANSWER_CHARS = 1000
# Integer literals longer than this are compared as digit strings, never converted.
MAX_DIGITS = 300
# Literal exponents and factorial arguments above these are not evaluated symbolically.
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000

_INTEGER = re.compile(r"-?\d[\d,]*")  # linear: no nested quantifiers
_DIGITS = re.compile(r"\d+")


def after_thinking(response: str, require_thinking: bool) -> str | None:
    """The part of `response` after its last `</think>`; without one, the whole response, or
    None if thinking is required."""
    head, sep, tail = response.rpartition(THINK_END)
    if sep:
        return tail
    return None if require_thinking else response


def _closing(text: str, start: int) -> int | None:
    """Index of the brace closing the one opened at text[start - 1], or None."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    begin = text.index("{", start) + 1
    end = _closing(text, begin)
    return None if end is None else text[begin:end]


def _after_colon(line: str) -> int | None:
    """Where the value starts on a line opening with `Answer:` (or `Final answer:`, any case,
    markdown bold allowed), or None for any other line."""
    s = line.lstrip()
    s = s.lstrip("*")
    if s[:5].lower() == "final" and s[5:6].isspace():
        s = s[5:].lstrip()
    if s[:6].lower() != "answer":
        return None
    s = s[6:].lstrip("*").lstrip()
    if s[:1] not in (":", "："):
        return None
    return len(line) - len(s) + 1


def _skip(text: str, i: int, space: bool) -> int:
    while i < len(text) and (text[i].isspace() if space else text[i] == "*"):
        i += 1
    return i


def answer_line(text: str) -> str | None:
    """The value of the last `Answer: ...` line of `text`; a value may start on a later line
    (`Answer:` alone, then the value). One pass: every character is looked at a bounded
    number of times, whatever the text."""
    found, pos = None, 0
    while pos <= len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        start = _after_colon(text[pos:end])
        if start is None:
            pos = end + 1
            continue
        i = _skip(text, _skip(text, _skip(text, pos + start, True), False), True)
        if i >= len(text):
            break
        stop = text.find("\n", i)
        stop = len(text) if stop < 0 else stop
        value = text[i:stop]
        found = value.rstrip().rstrip("*").rstrip() or value[:1]
        pos = stop + 1
    return found


def extract_answer(response: str, require_thinking: bool = False) -> str | None:
    """The final answer of a response: the last `\\boxed{}`, else the last `Answer:` line."""
    text = after_thinking(response, require_thinking)
    if text is None:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    line = answer_line(text)
    if line is not None:
        return line.rstrip(".").strip("$ ") or None
    return None


def last_integer(text: str) -> str | None:
    """The last integer of `text` in canonical digits (sign kept, commas and leading zeros
    dropped), as a string: any length compares exactly, nothing is converted."""
    found = _INTEGER.findall(text)
    return None if not found else canonical_integer(found[-1])


def canonical_integer(text: str) -> str | None:
    """`-0,012` -> `-12`; None when `text` is not an integer."""
    text = text.strip().replace(",", "")
    sign = "-" if text.startswith("-") else ""
    digits = text[1:] if sign or text.startswith("+") else text
    if not digits.isdigit() or not digits.isascii():
        return None
    digits = digits.lstrip("0") or "0"
    return ("" if digits == "0" else sign) + digits


def _literal_before(text: str, end: int) -> str:
    """The digits ending at text[end - 1]."""
    start = end
    while start > 0 and text[start - 1].isdigit():
        start -= 1
    return text[start:end]


def _group_before(text: str, end: int) -> str | None:
    """The bracketed group closing at text[end - 1] (`(...)`, `{...}`, `[...]`), or None."""
    pairs = {")": "(", "}": "{", "]": "["}
    close = text[end - 1] if end > 0 else ""
    if close not in pairs:
        return None
    depth = 0
    for i in range(end - 1, -1, -1):
        if text[i] == close:
            depth += 1
        elif text[i] == pairs[close]:
            depth -= 1
            if depth == 0:
                return text[i + 1 : end - 1]
    return None


def _exponent_after(text: str, caret: int) -> str:
    """The exponent written after the `^` at `caret`: a braced group or one token."""
    rest = text[caret + 1 :].lstrip()
    if rest.startswith("{"):
        end = _closing(rest, 1)
        return rest[1:end] if end is not None else rest[1:]
    match = re.match(r"\d+|\\?[A-Za-z]+|.", rest)
    return match.group(0) if match else ""


def costly_reason(answer: str) -> str | None:
    """Why evaluating `answer` symbolically could blow up (None: it is safe to try)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if any(len(d) > MAX_DIGITS for d in _DIGITS.findall(answer)):
        return f"an integer of more than {MAX_DIGITS} digits"
    text = answer.replace("**", "^").replace("\\left", "").replace("\\right", "")
    for caret in (i for i, c in enumerate(text) if c == "^"):
        exponent = _exponent_after(text, caret)
        if "^" in exponent or text[caret + 1 + len(exponent) :].lstrip().startswith("^"):
            return "a power tower"
        if exponent.isdigit() and int(exponent) > MAX_EXPONENT:
            return f"an exponent above {MAX_EXPONENT}"
    for bang in (i for i, c in enumerate(text) if c == "!"):
        literal = _literal_before(text, bang)
        if literal and int(literal) > MAX_FACTORIAL:
            return f"a factorial above {MAX_FACTORIAL}!"
        group = _group_before(text, bang)
        if group is not None and ("!" in group or "^" in group):
            return "a factorial of an expression"
        if group is not None and group.strip().isdigit() and int(group) > MAX_FACTORIAL:
            return f"a factorial above {MAX_FACTORIAL}!"
    return None
