"""Masking text that arrives in pieces: the deltas of a streamed answer.

A value may be split across two deltas (``"sk-ant-api03-ab"`` then ``"cdef…"``): masking each
delta alone would find it in neither. :class:`StreamTextMasker` therefore holds back the tail of
the text that could still be the start of a value, and releases text only once no detector can
match across the point where it cuts:

* **Hold-back window.** The last ``holdback`` characters are never released before the block
  ends. ``holdback`` is the longest span a selected detector's pattern can match
  (:func:`holdback_chars`, from the pattern's structure), where patterns with unbounded
  repetitions (``[A-Za-z0-9]{20,}``) count as ``cap`` characters: the operator's bound on how
  long a value may be *before it becomes a match*. Only the types policy chose for the call
  count, so a call that masks nothing holds nothing back.
* **Values still growing.** A value found at (or within a few characters of) the end of the
  text may continue in the next delta (a token is longer than its minimum length): it is held
  from its start, however far back that is, until it ends or ``max_hold`` characters are held
  (then it is released masked, so memory stays bounded).
* **Values are never cut.** When the release point falls inside a complete value, the whole
  value is released, as its placeholder.
* **Context.** Each scan also sees the last released characters (raw, in memory only), so
  validators that look before a value (word boundaries, key names) decide as on whole text, and
  a value that began in released text still has its unreleased rest masked.

Placeholders come from the call's :class:`~skillgate.policy.masking.MaskingSession`, so one
value has one placeholder in the whole stream.

Pure code, no I/O: unit-tested in ``tests/unit/test_streaming_masking.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Collection
from typing import Any, Final

from skillgate.policy.detectors import DetectorSet
from skillgate.policy.masking import MaskingSession

__all__ = ["DEFAULT_HOLDBACK_CAP", "StreamTextMasker", "holdback_chars", "max_match_chars"]

#: Default bound for patterns with unbounded repetitions (characters).
DEFAULT_HOLDBACK_CAP: Final = 256
#: A value ending this close to the end of the text may still change (validators look up to 8
#: bytes after a value), so it is treated as still growing.
_TAIL: Final = 8
_RE2_HEX: Final = re.compile(r"\\x\{([0-9A-Fa-f]+)\}")
#: The standard library's own regex parser, which knows the width range of a pattern.
_SRE_PARSE: Final[Any] = importlib.import_module("re._parser")


@functools.lru_cache(maxsize=4096)
def max_match_chars(pattern: str, cap: int) -> int:
    """The longest text ``pattern`` can match, in characters; ``cap`` when it is unbounded or
    cannot be analysed (RE2 syntax that Python's parser does not read counts as unbounded).

    Cached: parsing the built-in patterns takes about 10 ms, which would otherwise be paid by
    every streamed call before its first byte.
    """
    translated = _RE2_HEX.sub(lambda m: f"\\U{int(m.group(1), 16):08x}", pattern)
    try:
        _, high = _SRE_PARSE.parse(translated).getwidth()
    except (re.error, OverflowError, ValueError, RecursionError):
        return cap
    return min(int(high), cap)


def holdback_chars(detectors: DetectorSet, types: Collection[str], cap: int = DEFAULT_HOLDBACK_CAP) -> int:
    """The hold-back window for masking ``types`` of ``detectors``: the longest span any of
    their patterns can match (unbounded ones count as ``cap``); 0 when nothing is masked."""
    wanted = set(types)
    widths = [
        max_match_chars(pattern, cap)
        for type_, patterns in detectors.patterns().items()
        if type_ in wanted
        for pattern in patterns
    ]
    return max(widths, default=0)


class StreamTextMasker:
    """Masks one text (a content block) fed in deltas; see the module docstring.

    ``feed`` returns what may be released now (masked), ``flush`` the rest at the end of the
    block. Concatenated, the outputs equal the masked whole text, except where a value's
    non-matching beginning was longer than the window (then only its unreleased part is masked).
    """

    def __init__(
        self,
        session: MaskingSession,
        detectors: DetectorSet,
        types: Collection[str],
        *,
        holdback: int,
        max_hold: int = 16 * 1024,
        location: str = "text",
    ) -> None:
        self._session = session
        self._detectors = detectors
        self._types = frozenset(types)
        self._holdback = holdback if self._types else 0
        self._max_hold = max(max_hold, self._holdback)
        self._context_chars = max(self._holdback, 64)
        self._location = location
        self._pending = ""
        self._context = ""

    @property
    def active(self) -> bool:
        """Whether anything is masked at all (otherwise deltas pass through unchanged)."""
        return bool(self._types)

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
        offset = len(self._context)
        text = self._context + pending
        findings = self._detectors.scan(text, types=self._types)
        cut = len(pending) if final else max(0, len(pending) - self._holdback)
        chosen = []
        for finding in findings:
            if finding.end <= offset:
                continue  # wholly in released text: it was masked when released
            start, end = max(finding.start - offset, 0), finding.end - offset
            growing = not final and finding.end > len(text) - _TAIL
            if growing and len(pending) - start <= self._max_hold:
                cut = min(cut, start)  # may still continue: hold it from its start
                break
            if start >= cut:
                break
            cut = max(cut, end)  # never cut a complete value: release it whole
            chosen.append(dataclasses.replace(finding, start=start, end=end))
        if cut <= 0:
            return ""
        released, self._pending = pending[:cut], pending[cut:]
        self._context = (self._context + released)[-self._context_chars :]
        if not chosen:
            return released
        return self._session.mask_findings(released, chosen, location=self._location).text
