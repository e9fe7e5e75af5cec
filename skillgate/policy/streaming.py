"""Masking text that arrives in pieces: the deltas of a streamed answer.

A value may be split across two deltas (``"sk-ant-api03-ab"`` then ``"cdef…"``): masking each
delta alone would find it in neither. :class:`StreamTextMasker` therefore holds back the tail of
the text that could still become (part of) a value, and releases everything before it:

* **Only what could still be a value is held.** For every pattern of the types masked, the
  masker knows the language of its *prefixes* (:func:`prefix_pattern`, built from the pattern's
  structure and run on RE2 like the pattern itself). A value that ends after the current text
  must start at a position ``s`` where ``text[s:]`` is such a prefix; the leftmost such position
  over all patterns is where the hold begins, and everything before it is released. In prose
  that is the last word or two (``"ghp_ab"`` is held, ``"the fox "`` is not), so text flows
  delta by delta; a PEM block is held from its ``-----BEGIN`` until it ends. Assertions
  (``\\b``, ``^``) are treated as always true, which only holds more. A position that is not the
  start of a prefix never becomes one (more text cannot turn a non-prefix into a prefix), so
  released text never needs to be taken back.
* **Values still growing.** A complete value at (or within a few characters of) the end may
  still continue, or be judged differently by validators that look just past it: the hold
  also covers a whole match followed by up to 8 characters.
* **Bounded memory.** At most ``max_hold`` characters are held; beyond that the oldest are
  released, masked where they hold a value (a value longer than that is cut, its parts masked
  where they still match). Patterns whose structure cannot be analysed (RE2 syntax that
  Python's parser reads differently) fall back to a window of ``cap`` characters.
* **Values are never cut.** When the release point falls inside a complete value, the whole
  value is held (or released whole, as its placeholder, when the hold is full).
* **Context.** Each scan also sees the last released characters (raw, in memory only), so
  validators that look before a value (word boundaries, key names) decide as on whole text.

Placeholders come from the call's :class:`~skillgate.policy.masking.MaskingSession`, so one
value has one placeholder in the whole stream.

Pure code, no I/O: unit-tested in ``tests/unit/test_streaming_guard.py``. The input text only
ever meets RE2 (linear time); Python's regex parser reads the *patterns*, never the text.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Collection, Sequence
from typing import Any, Final

import re2

from skillgate.policy.detectors import DetectorSet, Finding
from skillgate.policy.masking import MaskingSession

__all__ = [
    "DEFAULT_HOLDBACK_CAP",
    "LiveTail",
    "StreamTextMasker",
    "holdback_chars",
    "live_tail",
    "max_match_chars",
    "prefix_pattern",
    "tail_for",
]

#: Default window for patterns whose structure cannot be analysed (characters).
DEFAULT_HOLDBACK_CAP: Final = 256
#: A value ending this close to the end of the text may still change (validators look up to 8
#: bytes after a value), so it is treated as still growing.
_TAIL: Final = 8
_RE2_HEX: Final = re.compile(r"\\x\{([0-9A-Fa-f]+)\}")
#: The standard library's own regex parser, which knows the structure of a pattern.
_SRE_PARSE: Final[Any] = importlib.import_module("re._parser")
_SRE: Final[Any] = importlib.import_module("re._constants")
#: RE2 syntax that Python's parser would read as something else (POSIX classes: ``[[:alpha:]]``).
_UNSAFE_SYNTAX: Final = re.compile(r"\[:\^?[a-z]+:\]")
_CATEGORIES: Final[dict[Any, str]] = {
    _SRE.CATEGORY_DIGIT: r"\d",
    _SRE.CATEGORY_NOT_DIGIT: r"\D",
    _SRE.CATEGORY_SPACE: r"\s",
    _SRE.CATEGORY_NOT_SPACE: r"\S",
    _SRE.CATEGORY_WORD: r"\w",
    _SRE.CATEGORY_NOT_WORD: r"\W",
}
#: Scoped flags RE2 knows (the others only affect parsing, or are Python's own).
_FLAGS: Final = ((_SRE.SRE_FLAG_IGNORECASE, "i"), (_SRE.SRE_FLAG_DOTALL, "s"), (_SRE.SRE_FLAG_MULTILINE, "m"))


def _parse(pattern: str) -> Any:
    """Python's parse tree of an RE2 pattern (``\\x{…}`` escapes translated)."""
    if _UNSAFE_SYNTAX.search(pattern):
        raise ValueError("RE2-only syntax")
    translated = _RE2_HEX.sub(lambda m: f"\\U{int(m.group(1), 16):08x}", pattern)
    return _SRE_PARSE.parse(translated)


@functools.lru_cache(maxsize=4096)
def max_match_chars(pattern: str, cap: int) -> int:
    """The longest text ``pattern`` can match, in characters; ``cap`` when it is unbounded or
    cannot be analysed (RE2 syntax that Python's parser does not read counts as unbounded).

    Cached: parsing the built-in patterns takes about 10 ms.
    """
    try:
        _, high = _parse(pattern).getwidth()
    except (re.error, OverflowError, ValueError, RecursionError):
        return cap
    return min(int(high), cap)


def holdback_chars(detectors: DetectorSet, types: Collection[str], cap: int = DEFAULT_HOLDBACK_CAP) -> int:
    """The longest span any pattern of ``types`` can match (unbounded ones count as ``cap``);
    0 when nothing is masked. The most a value can span, not what streaming holds back (that is
    what could still become a value: :class:`LiveTail`)."""
    wanted = set(types)
    widths = [
        max_match_chars(pattern, cap)
        for type_, patterns in detectors.patterns().items()
        if type_ in wanted
        for pattern in patterns
    ]
    return max(widths, default=0)


# -- prefixes of a pattern's matches ------------------------------------------------------------


class _Unsupported(ValueError):
    """A construct the prefix builder does not translate (the pattern falls back to a window)."""


def _hex(code: int) -> str:
    return f"\\x{{{code:x}}}"


def _flags(add: int, remove: int) -> str:
    on = "".join(letter for flag, letter in _FLAGS if add & flag)
    off = "".join(letter for flag, letter in _FLAGS if remove & flag)
    return on + (f"-{off}" if off else "")


def _class(items: Sequence[tuple[Any, Any]]) -> str:
    out, negate = [], False
    for op, av in items:
        if op is _SRE.NEGATE:
            negate = True
        elif op is _SRE.LITERAL:
            out.append(_hex(av))
        elif op is _SRE.RANGE:
            out.append(f"{_hex(av[0])}-{_hex(av[1])}")
        elif op is _SRE.CATEGORY and av in _CATEGORIES:
            out.append(_CATEGORIES[av])
        else:
            raise _Unsupported(str(op))
    return "[" + ("^" if negate else "") + "".join(out) + "]"


def _emit(nodes: Sequence[tuple[Any, Any]]) -> str:
    """RE2 syntax for a parsed sequence, assertions dropped (always true: a larger language)."""
    return "".join(_emit_node(op, av) for op, av in nodes)


def _emit_node(op: Any, av: Any) -> str:
    if op is _SRE.LITERAL:
        return _hex(av)
    if op is _SRE.NOT_LITERAL:
        return f"[^{_hex(av)}]"
    if op is _SRE.ANY:
        return "."
    if op is _SRE.IN:
        return _class(av)
    if op is _SRE.AT:
        return ""
    if op is _SRE.BRANCH:
        return "(?:" + "|".join(_emit(alt) for alt in av[1]) + ")"
    if op is _SRE.SUBPATTERN:
        _, add, remove, body = av
        return f"(?{_flags(add, remove)}:{_emit(body)})"
    if op in (_SRE.MAX_REPEAT, _SRE.MIN_REPEAT):
        low, high, body = av
        top = "" if high is _SRE.MAXREPEAT else str(high)
        return f"(?:{_emit(body)}){{{low},{top}}}"
    raise _Unsupported(str(op))


def _prefixes(nodes: Sequence[tuple[Any, Any]]) -> str:
    """RE2 syntax for every prefix (the empty one included) of what ``nodes`` match."""
    if not nodes:
        return ""
    (op, av), rest = nodes[0], nodes[1:]
    head = _prefix_node(op, av)
    if not rest:
        return head
    return f"(?:{head}|{_emit_node(op, av)}{_prefixes(rest)})"


def _prefix_node(op: Any, av: Any) -> str:
    if op in (_SRE.LITERAL, _SRE.NOT_LITERAL, _SRE.ANY, _SRE.IN):
        return f"(?:{_emit_node(op, av)})?"
    if op is _SRE.AT:
        return ""
    if op is _SRE.BRANCH:
        return "(?:" + "|".join(_prefixes(alt) for alt in av[1]) + ")"
    if op is _SRE.SUBPATTERN:
        _, add, remove, body = av
        return f"(?{_flags(add, remove)}:{_prefixes(body)})"
    if op in (_SRE.MAX_REPEAT, _SRE.MIN_REPEAT):
        _, high, body = av
        if high == 0:
            return ""
        whole = f"(?:{_emit(body)})"
        # up to high - 1 whole repetitions, then a prefix of one more
        count = "*" if high is _SRE.MAXREPEAT else f"{{0,{high - 1}}}"
        return f"{whole}{count}(?:{_prefixes(body)})"
    raise _Unsupported(str(op))


@functools.lru_cache(maxsize=4096)
def prefix_pattern(pattern: str, tail: int = _TAIL) -> str | None:
    """An RE2 pattern matching every prefix of what ``pattern`` matches, and every whole match
    followed by up to ``tail`` more characters; ``None`` when the pattern cannot be analysed.

    Built from the parse tree: a prefix of ``AB`` is a prefix of ``A`` or ``A`` then a prefix of
    ``B``; of ``A{m,n}``, up to ``n - 1`` copies of ``A`` then a prefix of ``A``. Assertions are
    dropped (treated as true), which makes the language larger, never smaller: the masker may
    hold a little more, never release part of a value.
    """
    try:
        tree = _parse(pattern)
        flags = _flags(tree.state.flags, 0)
        body = f"(?:{_prefixes(list(tree))}|(?:{_emit(list(tree))})(?s:.){{0,{tail}}})"
    except (re.error, OverflowError, ValueError, RecursionError):
        return None
    return f"(?{flags}:{body})" if flags else body


@dataclasses.dataclass(frozen=True, slots=True)
class LiveTail:
    """Finds where the part of a text that could still become a value begins.

    ``regexes`` are the compiled prefix patterns (each anchored at the end of the text); ``cap``
    is the window for the ``unanalysed`` patterns (0 when every pattern was analysed).
    """

    regexes: tuple[Any, ...]
    cap: int

    def start(self, text: str) -> int:
        """The leftmost position from which ``text`` could still become (part of) a value;
        ``len(text)`` when nothing could."""
        start = len(text) - self.cap if self.cap else len(text)
        for regex in self.regexes:
            match = regex.search(text)
            if match is not None and match.start() < start:
                start = match.start()
        return max(start, 0)


@functools.lru_cache(maxsize=256)
def live_tail(patterns: frozenset[str], cap: int = DEFAULT_HOLDBACK_CAP) -> LiveTail:
    """The :class:`LiveTail` of a set of patterns, compiled once per set (cached).

    All prefix patterns go into one alternation: RE2 finds the leftmost start over all of them
    in one pass (about 7 µs on a short tail, against 200 µs for one search per pattern). If RE2
    refuses the alternation (memory), each pattern is searched on its own.
    """
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 256 << 20
    prefixes, fallback = [], False
    for pattern in sorted(patterns):
        prefix = prefix_pattern(pattern)
        if prefix is None:
            fallback = True
        else:
            prefixes.append(prefix)
    window = cap if fallback else 0
    if not prefixes:
        return LiveTail((), window)
    try:
        combined = "|".join(f"(?:{p})" for p in prefixes)
        return LiveTail((re2.compile(f"(?:{combined})\\z", options),), window)
    except re2.error:
        pass
    regexes = []
    for prefix in prefixes:
        try:
            regexes.append(re2.compile(f"(?:{prefix})\\z", options))
        except re2.error:
            window = cap
    return LiveTail(tuple(regexes), window)


def tail_for(detectors: DetectorSet, types: Collection[str], cap: int = DEFAULT_HOLDBACK_CAP) -> LiveTail:
    """The :class:`LiveTail` of the patterns of ``types`` (cached by :func:`live_tail`).

    Compiling one takes tens of ms for a large set (70 ms for the default bundle's secrets) and
    holds the GIL throughout, so the forwarder compiles the sets it expects when a bundle is
    applied rather than in the first streamed call that needs one.
    """
    patterns = detectors.patterns()
    return live_tail(frozenset(p for type_ in types for p in patterns.get(type_, ())), cap)


class StreamTextMasker:
    """Masks one text (a content block) fed in deltas; see the module docstring.

    ``feed`` returns what may be released now (masked), ``flush`` the rest at the end of the
    block. Concatenated, the outputs equal the masked whole text, except where a value outgrew
    ``max_hold`` (then only its parts still held are masked).
    """

    def __init__(
        self,
        session: MaskingSession,
        detectors: DetectorSet,
        types: Collection[str],
        *,
        cap: int = DEFAULT_HOLDBACK_CAP,
        max_hold: int = 16 * 1024,
        location: str = "text",
    ) -> None:
        self._session = session
        self._detectors = detectors
        self._types = frozenset(types)
        self._live = tail_for(detectors, self._types, cap)
        self._max_hold = max(max_hold, self._live.cap, 1)
        self._context_chars = max(self._live.cap, 64)
        self._location = location
        self._pending = ""
        self._context = ""

    @property
    def held(self) -> int:
        """Characters received but not released yet."""
        return len(self._pending)

    def feed(self, delta: str) -> str:
        """Add a delta; the masked text that is safe to release now (may be empty)."""
        if not self._types:
            return delta
        self._pending += delta
        return self._release(final=False)

    def flush(self) -> str:
        """Release everything held (the block ended), masked."""
        if not self._pending:
            return ""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        forced = False
        if final:
            cut = len(pending)
        else:
            # What could still become a value depends only on the text from there on (assertions
            # count as true), so the held tail alone is searched.
            cut = self._live.start(pending)
            if len(pending) - cut > self._max_hold:
                cut, forced = len(pending) - self._max_hold, True
            if cut <= 0:
                return ""
        offset = len(self._context)
        text = self._context + pending
        findings = [f for f in self._detectors.scan(text, types=self._types) if f.end > offset]
        # Never cut a value: hold it whole (or, when the hold is full, release it whole). Findings
        # do not overlap, so moving the cut to one's edge cannot put it inside another.
        inside = next((f for f in findings if f.start - offset < cut < f.end - offset), None)
        if inside is not None:
            cut = inside.end - offset if forced else max(inside.start - offset, 0)
        if cut <= 0:
            return ""
        chosen: list[Finding] = [
            dataclasses.replace(f, start=max(f.start - offset, 0), end=f.end - offset)
            for f in findings
            if f.start - offset < cut
        ]
        released, self._pending = pending[:cut], pending[cut:]
        self._context = (self._context + released)[-self._context_chars :]
        if not chosen:
            return released
        return self._session.mask_findings(released, chosen, location=self._location).text
