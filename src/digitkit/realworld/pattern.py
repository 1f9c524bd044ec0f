"""Patterns a read string must match (`digitkit read --pattern`, `/v1/read`), checked in linear time.

A pattern comes from a user, often over the network, so it is never given to Python's backtracking `re`: a pattern
such as `((\\d+)+)+x` takes `re` minutes on a 20-digit string. Here a pattern is parsed into a small regular
language and compiled to a Thompson NFA, and a string is matched by stepping the set of live states one character
at a time: time proportional to len(text) x states, whatever the pattern. The same automaton can be stepped a
character at a time (`start`, `step`, `viable`), so a decoder can keep only the prefixes that can still match.

The language (a subset of Python's `re` syntax, with the same meaning, always matched against the whole string):
  literals           7, -, /, any character but the special ones; `\\` escapes a special one (`\\.`, `\\$`)
  any character      .
  shorthands         \\d (0-9)  \\D  \\w ([A-Za-z0-9_])  \\W  \\s (space, tab, newlines)  \\S   (ASCII only)
  classes            [0-9]  [13579]  [^0]  [0-9A-F]  [\\d.]
  groups             (...)  (?:...)   for grouping and alternation only (nothing is captured)
  alternation        a|b
  repeats            *  +  ?  {n}  {n,}  {n,m}   (n, m <= MAX_REPEAT; a lazy `?` after a repeat is accepted)
  anchors            ^ at the very start, $ at the very end (they change nothing: the whole string must match)
Refused with a one-line reason: back-references, look-around, inline flags, named groups, possessive repeats,
\\b and other escapes, and patterns over MAX_LENGTH characters or MAX_STATES automaton states.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass

from digitkit.errors import DataError

MAX_LENGTH = 200
"""Characters in a pattern."""
MAX_REPEAT = 100
"""Largest count in {n}, {n,} or {n,m}."""
MAX_STATES = 5000
"""Automaton states after counted repeats are expanded ((\\d{100}){100} would be 10,000)."""

STEP_CACHE = 4096
"""(state set, character) transitions remembered per pattern."""

SPECIAL = set("\\.[](){}*+?|^$")
DIGITS = frozenset(string.digits)
WORD = frozenset(string.ascii_letters + string.digits + "_")
SPACE = frozenset(" \t\n\r\f\v")
SHORTHANDS = {"d": (DIGITS, False), "D": (DIGITS, True), "w": (WORD, False), "W": (WORD, True),
              "s": (SPACE, False), "S": (SPACE, True)}  # fmt: skip
LANGUAGE = ("digits and literals, ., \\d \\w \\s (and \\D \\W \\S), classes [...], groups (...), alternation |, "
            "repeats * + ? {n} {n,} {n,m}")  # fmt: skip


class PatternError(DataError):
    """A pattern outside the language (or over a size cap): the message says where and what is supported."""


# ------------------------------------------------------------------------------------------ syntax tree
@dataclass(frozen=True)
class CharSet:
    chars: frozenset[str]
    negated: bool = False

    def __contains__(self, ch: str) -> bool:
        return (ch in self.chars) != self.negated


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    low: int
    high: int | None  # None: no upper bound


Node = CharSet | Seq | Alt | Repeat


class _Parser:
    """Recursive descent over the pattern; every error names the position and the construct."""

    def __init__(self, text: str) -> None:
        self.text, self.i, self.depth = text, 0, 0

    def fail(self, what: str, at: int | None = None) -> PatternError:
        pos = self.i if at is None else at
        return PatternError(f"pattern {self.text!r} is not a valid regular expression for digitkit: {what} at "
                            f"position {pos}; supported: {LANGUAGE}")  # fmt: skip

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def parse(self) -> Node:
        text = self.text
        start, end = (1 if text.startswith("^") else 0), len(text)
        if end > start and text.endswith("$") and not _escaped(text, end - 1):
            end -= 1
        self.i, self.text_end = start, end
        node = self.alternation()
        if self.i < self.text_end:
            raise self.fail("unbalanced ')'" if self.text[self.i] == ")" else f"unexpected {self.text[self.i]!r}")
        return node

    def alternation(self) -> Node:
        options = [self.sequence()]
        while self.i < self.text_end and self.text[self.i] == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def sequence(self) -> Node:
        items: list[Node] = []
        while self.i < self.text_end and self.text[self.i] not in "|)":
            items.append(self.repeat(self.atom()))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def atom(self) -> Node:
        ch, at = self.text[self.i], self.i
        self.i += 1
        if ch == "(":
            return self.group(at)
        if ch == "[":
            return self.char_class(at)
        if ch == ".":
            return CharSet(frozenset("\n"), negated=True)  # as in `re`: any character but a newline
        if ch == "\\":
            return self.escape(at)
        if ch in "*+?{":
            raise self.fail(f"{ch!r} has nothing to repeat", at)
        if ch in "^$":
            raise self.fail(f"{ch!r} is only allowed at the very start (^) or end ($)", at)
        if ch == "]" or ch == "}":
            raise self.fail(f"unbalanced {ch!r} (write \\{ch} for the character)", at)
        return CharSet(frozenset(ch))

    def group(self, at: int) -> Node:
        if self.text.startswith("?", self.i):
            if self.text.startswith("?:", self.i):
                self.i += 2
            else:
                kind = {"=": "look-ahead assertions", "!": "look-ahead assertions", "<": "look-behind assertions",
                        "P": "named groups", "#": "comments"}.get(self.text[self.i + 1 : self.i + 2],
                                                                  "inline flags")  # fmt: skip
                raise self.fail(f"{kind} are not supported", at)
        self.depth += 1
        if self.depth > 50:
            raise self.fail("groups nested more than 50 deep", at)
        node = self.alternation()
        if self.i >= self.text_end or self.text[self.i] != ")":
            raise self.fail("'(' is never closed", at)
        self.i += 1
        self.depth -= 1
        return node

    def escape(self, at: int) -> CharSet:
        if self.i >= len(self.text):
            raise self.fail("a trailing '\\' escapes nothing", at)
        ch = self.text[self.i]
        self.i += 1
        if ch in SHORTHANDS:
            chars, negated = SHORTHANDS[ch]
            return CharSet(chars, negated)
        if ch in SPECIAL or ch in "-/]}" or ch in string.punctuation:
            return CharSet(frozenset(ch))
        if ch.isdigit():
            raise self.fail(f"back-references (\\{ch}) are not supported", at)
        if ch in "tnrfv":
            return CharSet(frozenset({"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}[ch]))
        raise self.fail(f"the escape \\{ch} is not supported", at)

    def char_class(self, at: int) -> CharSet:
        negated = self.text.startswith("^", self.i)
        self.i += negated
        chars: set[str] = set()
        first = True
        while True:
            if self.i >= len(self.text):
                raise self.fail("'[' is never closed", at)
            ch = self.text[self.i]
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_char()
            if isinstance(lo, CharSet):  # \d and friends inside a class
                if lo.negated:
                    raise self.fail("negated shorthands (\\D, \\W, \\S) inside [...] are not supported", at)
                chars |= lo.chars
                continue
            if self.text.startswith("-", self.i) and self.i + 1 < len(self.text) and self.text[self.i + 1] != "]":
                self.i += 1
                hi = self.class_char()
                if isinstance(hi, CharSet) or ord(hi) < ord(lo):
                    raise self.fail(f"bad range {lo}-{hi if isinstance(hi, str) else '...'} in [...]", at)
                if ord(hi) - ord(lo) > 1000:
                    raise self.fail(f"the range {lo}-{hi} spans more than 1000 characters", at)
                chars |= {chr(c) for c in range(ord(lo), ord(hi) + 1)}
            else:
                chars.add(lo)
        return CharSet(frozenset(chars), negated)

    def class_char(self) -> str | CharSet:
        ch = self.text[self.i]
        self.i += 1
        if ch != "\\":
            return ch
        if self.i >= len(self.text):
            raise self.fail("a trailing '\\' escapes nothing")
        esc = self.text[self.i]
        self.i += 1
        if esc in SHORTHANDS:
            chars, negated = SHORTHANDS[esc]
            return CharSet(chars, negated)
        if esc in "tnrfv":
            return {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}[esc]
        if esc in string.punctuation:
            return esc
        raise self.fail(f"the escape \\{esc} is not supported inside [...]", self.i - 2)

    def repeat(self, node: Node) -> Node:
        while self.i < self.text_end and self.text[self.i] in "*+?{":
            at, ch = self.i, self.text[self.i]
            self.i += 1
            if ch == "{":
                close = self.text.find("}", self.i)
                body = self.text[self.i : close] if close >= 0 else ""
                low_s, comma, high_s = body.partition(",")
                if close < 0 or not low_s.isdigit() or (high_s and not high_s.isdigit()):
                    raise self.fail("expected {n}, {n,} or {n,m} with whole numbers", at)
                low = int(low_s)
                high = None if comma and not high_s else int(high_s) if high_s else low
                if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
                    raise self.fail(f"a count over {MAX_REPEAT}", at)
                if high is not None and high < low:
                    raise self.fail(f"{{{body}}}: the largest count is below the smallest", at)
                self.i = close + 1
            else:
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            if isinstance(node, Repeat) and self.text[at - 1] in "*+?}":
                if ch == "+":
                    raise self.fail("possessive repeats (*+, ++, ?+) are not supported", at)
                if ch == "?":  # lazy: the same strings match a whole-string pattern
                    continue
            node = Repeat(node, low, high)
        return node


def _escaped(text: str, i: int) -> bool:
    """Is text[i] escaped by an odd number of backslashes before it?"""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


# ------------------------------------------------------------------------------------------ automaton
class Pattern:
    """A compiled pattern: `fullmatch(text)` in linear time, and stepping for decoders."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise PatternError(f"a pattern must be text, not {type(source).__name__}")
        if len(source) > MAX_LENGTH:
            raise PatternError(f"the pattern is {len(source)} characters; at most {MAX_LENGTH} are accepted "
                               "(a digit-string format needs far fewer)")  # fmt: skip
        self.source = source
        self.tree = _Parser(source).parse()
        # states: each is ("char", CharSet, next) or ("split", [next...]) or ("accept",)
        self._char: list[CharSet | None] = []
        self._next: list[list[int]] = []
        self.accept = self._new(None)
        self.start_state = self._build(self.tree, self.accept)
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._alive = self._can_accept()

    # -------------------------------------------------------------------------------------- building
    def _new(self, chars: CharSet | None, nexts: Iterable[int] = ()) -> int:
        if len(self._char) >= MAX_STATES:
            raise PatternError(f"pattern {self.source!r} expands to more than {MAX_STATES:,} automaton states "
                               "(counted repeats multiply); use smaller counts")  # fmt: skip
        self._char.append(chars)
        self._next.append(list(nexts))
        return len(self._char) - 1

    def _build(self, node: Node, out: int) -> int:
        """The entry state of `node`, whose exit leads to state `out` (built back to front)."""
        if isinstance(node, CharSet):
            return self._new(node, [out])
        if isinstance(node, Seq):
            for item in reversed(node.items):
                out = self._build(item, out)
            return out
        if isinstance(node, Alt):
            return self._new(None, [self._build(option, out) for option in node.options])
        # Repeat: `low` copies in a row, then `high - low` optional copies, or a loop when unbounded
        tail = out
        if node.high is None:
            loop = self._new(None, [])  # split: into the item, or out
            body = self._build(node.item, loop)
            self._next[loop] = [body, out]
            tail = loop
        else:
            for _ in range(node.high - node.low):
                tail = self._new(None, [self._build(node.item, tail), out])
        for _ in range(node.low):
            tail = self._build(node.item, tail)
        return tail

    def _can_accept(self) -> list[bool]:
        """For each state: can the accept state be reached from it (on some input)?"""
        incoming: list[list[int]] = [[] for _ in self._char]
        for s, nexts in enumerate(self._next):
            for t in nexts:
                incoming[t].append(s)
        alive = [False] * len(self._char)
        stack = [self.accept]
        alive[self.accept] = True
        while stack:
            for s in incoming[stack.pop()]:
                if not alive[s]:
                    alive[s] = True
                    stack.append(s)
        return alive

    # -------------------------------------------------------------------------------------- running
    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        """States reachable through splits (no character consumed); only char and accept states are kept."""
        out: set[int] = set()
        seen: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if self._char[s] is None and s != self.accept:
                stack.extend(self._next[s])
            else:
                out.add(s)
        return frozenset(out)

    def start(self) -> frozenset[int]:
        """The state set before any character."""
        return self._closure([self.start_state])

    def step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        """The state set after reading `ch`; empty when no match is possible any more. Results are remembered (a
        lazily built DFA, bounded by STEP_CACHE), so a string costs one lookup per character once seen."""
        key = (states, ch)
        hit = self._steps.get(key)
        if hit is not None:
            return hit
        out = self._move(states, ch)
        if len(self._steps) < STEP_CACHE:
            self._steps[key] = out
        return out

    def _move(self, states: frozenset[int], ch: str) -> frozenset[int]:
        moved = []
        for s in states:
            chars = self._char[s]
            if chars is not None and ch in chars:
                moved.extend(self._next[s])
        return self._closure(moved) if moved else frozenset()

    def viable(self, states: frozenset[int]) -> bool:
        """Can some continuation still lead to a match?"""
        return any(self._alive[s] for s in states)

    def accepts(self, states: frozenset[int]) -> bool:
        return self.accept in states

    def fullmatch(self, text: str) -> bool:
        """Does the whole of `text` match? O(len(text) x states)."""
        states = self.start()
        for ch in text:
            states = self.step(states, ch)
            if not states:
                return False
        return self.accepts(states)

    def viable_prefix(self, text: str) -> bool:
        """Can `text` be continued into a match (the empty continuation included)?"""
        states = self.start()
        for ch in text:
            states = self.step(states, ch)
        return self.viable(states)

    def __repr__(self) -> str:
        return f"Pattern({self.source!r}, {len(self._char)} states)"


def compile_pattern(source: str) -> Pattern:
    """Parse and compile, or raise PatternError saying what is wrong and what is supported."""
    return Pattern(source)
