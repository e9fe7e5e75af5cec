"""Masking of Messages API bodies: detected values become typed placeholders such as ``[EMAIL_1]``.

The policy service masks requests (what Claude sees, and what the record keeps); the forwarder
masks responses before they reach Kafka, the caller or the audit store. Both use this module:

* :class:`Masker` holds the compiled :class:`~skillgate.policy.detectors.DetectorSet` and the
  fingerprint key; it is built once per bundle.
* :class:`MaskingSession` is the state of one call: the same value gets the same placeholder
  everywhere in that call (request, response, streamed text), and counters run per type, so
  ``[EMAIL_1]`` in the request and in the response are the same address.
* Each masked value is reported as a :class:`~skillgate.events.MaskedValue` (the Avro record
  ``skillgate.events.MaskedValue``): its type, placeholder, a keyed HMAC-SHA256 fingerprint, a
  JSON path to where it was and its character span there, and the scope. The value itself is in
  neither the masked body nor that list, so an investigator can ask "did this leaked key pass
  through?" (:func:`fingerprint` of the key under the same secret) without the store holding it.

The policy service needs two bodies per call — what the model may see and what the record
keeps — so :meth:`MaskingSession.mask_request_layers` builds both from one scan of each string
(the forwarder does the same for responses with :meth:`MaskingSession.mask_response_layers`).

Bodies are never mutated: masking returns a new top-level dict; containers on the path to a
masked string are copied, everything else is shared with the input (read-only by convention).
Masked locations are ``system`` (string or text blocks), message ``content`` (string), ``text``
blocks, every string leaf of ``tool_use`` / ``server_tool_use`` ``input``, and ``tool_result``
``content`` (string or text blocks); ``thinking`` blocks in the record layer only (the API signs
them: a changed thinking block sent back in a later turn is refused, and the model wrote it, so
it is no leak to the model; the caller gets it as the model wrote it). Everything else (images,
documents, tool definitions, metadata) passes through untouched.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from skillgate.events import MaskedValue
from skillgate.policy.detectors import SECRET_TYPES, DetectorSet, Finding

__all__ = [
    "LayeredMaskResult",
    "MaskResult",
    "Masker",
    "MaskingError",
    "MaskingSession",
    "Scope",
    "TextMaskResult",
    "fingerprint",
]

Scope = Literal["upstream", "record"]
"""``upstream``: the model never sees the value; ``record``: only the record and logs are masked."""

_SCOPES: Final = ("upstream", "record")
_MAX_DEPTH: Final = 256
_TOOL_INPUT_BLOCKS: Final = frozenset({"tool_use", "server_tool_use"})
#: Fields of a text block's citations that quote or name their source (masked like the text):
#: ``cited_text`` quotes a document or web page, titles and URLs name it.
CITATION_FIELDS: Final = ("cited_text", "document_title", "title", "url")


class MaskingError(ValueError):
    """A body that cannot be masked safely (e.g. a tool input nested deeper than the limit).

    Callers fail the call closed; the message never contains body content.
    """


def fingerprint(value: str, key: bytes) -> str:
    """Hex HMAC-SHA256 of ``value`` (UTF-8) under ``key``: what the record keeps of a masked value.

    Keyed, so the record does not let anyone without the key test guesses (a plain hash of a
    short password or a card number is easy to brute-force); stable, so the same value always
    has the same fingerprint under the same key.
    """
    return hmac.digest(key, value.encode("utf-8"), hashlib.sha256).hex()


@dataclass(frozen=True, slots=True)
class MaskResult:
    """A masked body (a new dict) and the values masked in this pass, in document order."""

    body: dict[str, Any]
    masked: list[MaskedValue]

    @property
    def changed(self) -> bool:
        """Whether anything was masked (if not, the caller may forward the original bytes)."""
        return bool(self.masked)


@dataclass(frozen=True, slots=True)
class LayeredMaskResult:
    """One request or response masked for two audiences from one scan.

    ``upstream``: what leaves skillgate (the model, or the caller for a response), with the
    upstream-layer types masked. ``record``: what the record and logs keep, with both layers
    masked. ``masked``: every masked value once, with its scope.
    """

    upstream: dict[str, Any]
    record: dict[str, Any]
    masked: list[MaskedValue]


@dataclass(frozen=True, slots=True)
class TextMaskResult:
    """A masked string and the values masked in it."""

    text: str
    masked: list[MaskedValue]


def _check_scope(scope: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"masking scope must be one of {_SCOPES}, not {scope!r}")


class Masker:
    """Masks bodies and text with one detector set and one fingerprint key (built once per bundle).

    ``fingerprint_key`` is skillgate's secret HMAC key (32 random bytes recommended); it must
    be the same wherever fingerprints are compared (policy, forwarder, audit tooling).
    """

    def __init__(self, detectors: DetectorSet, fingerprint_key: bytes) -> None:
        if not isinstance(fingerprint_key, bytes | bytearray) or not fingerprint_key:
            raise ValueError("fingerprint_key must be non-empty bytes")
        self.detectors = detectors
        # keyed once here, copied per value (about twice as fast as hmac.digest per value)
        self._hmac = hmac.new(bytes(fingerprint_key), digestmod=hashlib.sha256)

    def fingerprint(self, value: str) -> str:
        """The fingerprint of ``value`` under this masker's key (see :func:`fingerprint`)."""
        mac = self._hmac.copy()
        mac.update(value.encode("utf-8"))
        return mac.hexdigest()

    def session(self, seed: Iterable[MaskedValue] = ()) -> MaskingSession:
        """Fresh per-call state: placeholders are consistent across everything masked with it.

        ``seed``: values an earlier stage of the same call masked (the decision's ``masked``), so
        the forwarder gives a value the model echoes back the placeholder the request used, and
        numbers new values after the request's.
        """
        session = MaskingSession(self)
        for value in seed:
            session.reserve(value["type"], value["fingerprint"], value["placeholder"])
        return session

    def mask_request(
        self,
        body: Mapping[str, Any],
        *,
        categories: Collection[str] | None = None,
        types: Collection[str] | None = None,
        scope: Scope = "upstream",
    ) -> MaskResult:
        """Mask a Messages API request in a fresh session (see :meth:`MaskingSession.mask_request`)."""
        return self.session().mask_request(body, categories=categories, types=types, scope=scope)

    def mask_response(
        self,
        body: Mapping[str, Any],
        *,
        categories: Collection[str] | None = None,
        types: Collection[str] | None = None,
        scope: Scope = "upstream",
    ) -> MaskResult:
        """Mask a Messages API response in a fresh session (see :meth:`MaskingSession.mask_response`)."""
        return self.session().mask_response(body, categories=categories, types=types, scope=scope)

    def mask_text(
        self,
        text: str,
        *,
        location: str = "text",
        categories: Collection[str] | None = None,
        types: Collection[str] | None = None,
        scope: Scope = "upstream",
    ) -> TextMaskResult:
        """Mask one string in a fresh session (see :meth:`MaskingSession.mask_text`)."""
        return self.session().mask_text(
            text, location=location, categories=categories, types=types, scope=scope
        )


_TextFn = Callable[[str, str], str]  # (text, location) -> masked text
_Walker = Callable[[Mapping[str, Any], _TextFn], dict[str, Any]]  # applies a _TextFn to a body


class MaskingSession:
    """The masking state of one call: value -> placeholder, and counters per type.

    Use one session for everything about a call (the request for upstream, the request for the
    record, the response, streamed text) so that one value has one placeholder throughout.
    ``categories`` / ``types`` choose what a pass masks (``None``: everything the detector set
    knows); ``scope`` labels the pass in the :class:`MaskedValue` records. Not thread-safe.
    """

    def __init__(self, masker: Masker) -> None:
        self._masker = masker
        self._placeholders: dict[tuple[str, str], str] = {}  # (type, fingerprint) -> placeholder
        self._fingerprints: dict[str, str] = {}  # value -> fingerprint, for this call only
        self._counters: dict[str, int] = {}
        self.masked: list[MaskedValue] = []
        """Every value masked in this session so far, over all passes."""

    def reserve(self, type_: str, fingerprint: str, placeholder: str) -> None:
        """Use ``placeholder`` for the value of ``type_`` with ``fingerprint`` in this session (and
        number later values of the type after it)."""
        self._placeholders.setdefault((type_, fingerprint), placeholder)
        number = placeholder.rstrip("]").rpartition("_")[2]
        if number.isdigit():
            self._counters[type_] = max(self._counters.get(type_, 0), int(number))

    # -- one selection, one scope -----------------------------------------------------------

    def mask_text(
        self,
        text: str,
        *,
        location: str = "text",
        categories: Collection[str] | None = None,
        types: Collection[str] | None = None,
        scope: Scope = "upstream",
    ) -> TextMaskResult:
        """Mask a plain string (a response text, a streamed chunk); ``location`` names it.

        Each call scans only the string it is given: a value split across two stream chunks is
        found in neither. Streaming therefore needs buffering on top — holding back a tail that
        may still continue a value (a key, an address, an open PEM block) until it is complete.
        """
        masked: list[MaskedValue] = []
        out = self._single(categories, types, scope, masked)(text, location)
        self.masked.extend(masked)
        return TextMaskResult(out, masked)

    def mask_findings(
        self, text: str, findings: list[Finding], *, location: str = "text", scope: Scope = "upstream"
    ) -> TextMaskResult:
        """Replace ``findings`` (sorted, non-overlapping, offsets into ``text``) by placeholders.

        For callers that scanned a larger window than the text they mask, as streaming does
        (:mod:`skillgate.policy.streaming`): a value found with its surrounding text gets this
        session's placeholder even when only part of the window is masked now.
        """
        _check_scope(scope)
        masked: list[MaskedValue] = []
        out = self._replace(text, findings, location, lambda _t: scope, masked) if findings else text
        self.masked.extend(masked)
        return TextMaskResult(out, masked)

    def mask_request(
        self,
        body: Mapping[str, Any],
        *,
        categories: Collection[str] | None = None,
        types: Collection[str] | None = None,
        scope: Scope = "upstream",
    ) -> MaskResult:
        """Mask a Messages API request body: ``system`` and every message's content.

        Locations are JSON paths such as ``system``, ``system[0].text``, ``messages[0].content``,
        ``messages[1].content[2].text``, ``messages[1].content[0].input.command`` and
        ``messages[2].content[0].content[1].text``. Raises :class:`MaskingError` for a tool input
        nested deeper than 256 levels.
        """
        return self._pass(body, _walk_request, categories, types, scope)

    def mask_response(
        self,
        body: Mapping[str, Any],
        *,
        categories: Collection[str] | None = None,
        types: Collection[str] | None = None,
        scope: Scope = "upstream",
    ) -> MaskResult:
        """Mask a Messages API response body: its ``content`` text blocks and tool inputs.

        Locations are ``content[0].text``, ``content[1].input.query`` and so on.
        """
        return self._pass(body, _walk_response, categories, types, scope)

    # -- two layers from one scan -----------------------------------------------------------

    def mask_request_layers(
        self, body: Mapping[str, Any], *, upstream: Collection[str], record: Collection[str]
    ) -> LayeredMaskResult:
        """Mask a request for the upstream and for the record, scanning each string once.

        ``upstream`` and ``record`` are detector types (see :meth:`DetectorSet.types_for`).
        The upstream body has the ``upstream`` types masked (scope ``upstream``); the record
        body has those *and* the ``record`` types masked (the latter with scope ``record``). It
        is what :meth:`mask_request` twice would give (upstream types first, then the record
        types over the result), at the cost of one scan: the policy service's hot path.
        """
        return self._layered(body, _walk_request, upstream, record)

    def mask_response_layers(
        self, body: Mapping[str, Any], *, upstream: Collection[str], record: Collection[str]
    ) -> LayeredMaskResult:
        """:meth:`mask_request_layers` for a response body (the forwarder's hot path)."""
        return self._layered(body, _walk_response, upstream, record)

    def mask_json_layers(
        self, value: Any, *, upstream: Collection[str], record: Collection[str], path: str = ""
    ) -> tuple[Any, Any, list[MaskedValue]]:
        """Every string leaf of any JSON value (an error body, a non-Messages answer) masked for
        the upstream and for the record from one scan per string: (upstream, record, masked)."""
        masked: list[MaskedValue] = []
        up_fn, rec_fn = self._layers(upstream, record, masked)
        up, rec = _json(value, path, up_fn, 0), _json(value, path, rec_fn, 0)
        self.masked.extend(masked)
        return up, rec, masked

    # -- internals --------------------------------------------------------------------------

    def _pass(
        self,
        body: Mapping[str, Any],
        walk: _Walker,
        categories: Collection[str] | None,
        types: Collection[str] | None,
        scope: str,
    ) -> MaskResult:
        masked: list[MaskedValue] = []
        out = walk(body, self._single(categories, types, scope, masked))
        self.masked.extend(masked)
        return MaskResult(out, masked)

    def _layered(
        self, body: Mapping[str, Any], walk: _Walker, upstream: Collection[str], record: Collection[str]
    ) -> LayeredMaskResult:
        masked: list[MaskedValue] = []
        up_fn, rec_fn = self._layers(upstream, record, masked)
        up_body, rec_body = walk(body, up_fn), walk(body, rec_fn)
        self.masked.extend(masked)
        return LayeredMaskResult(up_body, rec_body, masked)

    def _single(
        self,
        categories: Collection[str] | None,
        types: Collection[str] | None,
        scope: str,
        masked: list[MaskedValue],
    ) -> _TextFn:
        _check_scope(scope)
        selected = self._masker.detectors.types_for(categories, types)
        scan = self._masker.detectors.scan

        def mask(text: str, location: str) -> str:
            if not text or not selected or (scope == "upstream" and _signed(location)):
                return text
            findings = scan(text, types=selected)
            return self._replace(text, findings, location, lambda _t: scope, masked) if findings else text

        return mask

    def _layers(
        self, upstream: Collection[str], record: Collection[str], masked: list[MaskedValue]
    ) -> tuple[_TextFn, _TextFn]:
        detectors = self._masker.detectors
        up_types = detectors.types_for(None, upstream)
        all_types = up_types | detectors.types_for(None, record)
        cache: dict[str, list[Finding]] = {}

        def findings(text: str) -> list[Finding]:
            found = cache.get(text)
            if found is None:
                # upstream types win overlaps, so the upstream subset is what a scan for the
                # upstream types alone would find
                found = detectors.scan(text, types=all_types, prefer=up_types) if all_types else []
                cache[text] = found
            return found

        def scope_of(type_: str) -> str:
            return "upstream" if type_ in up_types else "record"

        def mask_upstream(text: str, location: str) -> str:
            if not text or _signed(location):
                return text
            chosen = [f for f in findings(text) if f.type in up_types]
            return self._replace(text, chosen, location, scope_of, masked) if chosen else text

        def mask_record(text: str, location: str) -> str:
            if not text:
                return text
            found = findings(text)
            if not found:
                return text
            if _signed(location):  # only the record masks these: every value is reported here
                return self._replace(text, found, location, lambda _t: "record", masked)
            # values of the upstream layer were reported by mask_upstream already
            return self._replace(text, found, location, scope_of, masked, report=lambda t: t not in up_types)

        return mask_upstream, mask_record

    def _replace(
        self,
        text: str,
        findings: list[Finding],
        location: str,
        scope_of: Callable[[str], str],
        masked: list[MaskedValue],
        report: Callable[[str], bool] | None = None,
    ) -> str:
        pieces: list[str] = []
        pos = 0
        for finding in findings:
            fp = self._fingerprints.get(finding.value)
            if fp is None:
                fp = self._fingerprints[finding.value] = self._masker.fingerprint(finding.value)
            placeholder = self._placeholders.get((finding.type, fp))
            if placeholder is None:
                n = self._counters.get(finding.type, 0) + 1
                self._counters[finding.type] = n
                placeholder = f"[{finding.type}_{n}]"
                self._placeholders[(finding.type, fp)] = placeholder
            pieces.append(text[pos : finding.start])
            pieces.append(placeholder)
            pos = finding.end
            if report is None or report(finding.type):
                masked.append(
                    MaskedValue(
                        type=finding.type,
                        placeholder=placeholder,
                        fingerprint=fp,
                        location=location,
                        start=finding.start,
                        end=finding.end,
                        scope=scope_of(finding.type),
                    )
                )
        pieces.append(text[pos:])
        return "".join(pieces)


# -- walking Messages API bodies (copy on write) ------------------------------------------------


def _walk_request(body: Mapping[str, Any], fn: _TextFn) -> dict[str, Any]:
    out = dict(body)
    if "system" in body:
        system = body["system"]
        if isinstance(system, str):
            out["system"] = fn(system, "system")
        elif isinstance(system, list):
            out["system"] = _blocks(system, "system", fn)
    messages = body.get("messages")
    if isinstance(messages, list):
        new_messages = _replace_items(messages, lambda i, m: _message(m, f"messages[{i}]", fn))
        if new_messages is not None:
            out["messages"] = new_messages
    return out


def _walk_response(body: Mapping[str, Any], fn: _TextFn) -> dict[str, Any]:
    out = dict(body)
    content = body.get("content")
    if isinstance(content, list):
        out["content"] = _blocks(content, "content", fn)
    elif isinstance(content, str):
        out["content"] = fn(content, "content")
    return out


def _message(message: Any, path: str, fn: _TextFn) -> Any:
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        new_content: Any = fn(content, f"{path}.content")
    elif isinstance(content, list):
        new_content = _blocks(content, f"{path}.content", fn)
    else:
        return message
    if new_content is content:
        return message
    new_message = dict(message)
    new_message["content"] = new_content
    return new_message


def _blocks(blocks: list[Any], path: str, fn: _TextFn) -> list[Any]:
    """Content blocks; returns ``blocks`` itself when nothing in them changed."""
    out = _replace_items(blocks, lambda i, block: _block(block, f"{path}[{i}]", fn))
    return blocks if out is None else out


def _signed(location: str) -> bool:
    """Whether ``location`` is a thinking block's text: the API signs it, and a changed thinking
    block sent back in a later turn is refused, so only the record layer masks it."""
    return location.endswith(".thinking")


def _block(block: Any, path: str, fn: _TextFn) -> Any:
    if not isinstance(block, dict):
        return block
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        new_text = fn(text, f"{path}.text") if isinstance(text, str) else text
        new_block = mask_citations(block, path, fn)  # after the text: placeholders in reading order
        if new_text is text:
            return new_block
        new_block = dict(new_block) if new_block is block else new_block
        new_block["text"] = new_text
        return new_block
    new_value: Any
    if kind == "thinking":
        key, value = "thinking", block.get("thinking")
        if not isinstance(value, str):
            return block
        new_value = fn(value, f"{path}.thinking")
    elif kind in _TOOL_INPUT_BLOCKS:
        key, value = "input", block.get("input")
        if value is None:
            return block
        new_value = _json(value, f"{path}.input", fn, 0)
    elif kind == "tool_result":
        key, value = "content", block.get("content")
        if isinstance(value, str):
            new_value = fn(value, f"{path}.content")
        elif isinstance(value, list):
            new_value = _blocks(value, f"{path}.content", fn)
        else:
            return block
    else:
        return block
    if new_value is value:
        return block
    new_block = dict(block)
    new_block[key] = new_value
    return new_block


def mask_citation(citation: Any, path: str, fn: _TextFn) -> Any:
    """One citation with :data:`CITATION_FIELDS` masked (``citation`` itself when unchanged).

    Shared by whole answers (a text block's ``citations``) and streams (a ``citations_delta``
    carries one citation whole), so both mask the same fields.
    """
    if not isinstance(citation, dict):
        return citation
    out: dict[str, Any] | None = None
    for field in CITATION_FIELDS:
        value = citation.get(field)
        if isinstance(value, str) and value:
            new_value = fn(value, f"{path}.{field}")
            if new_value is not value:
                if out is None:
                    out = dict(citation)
                out[field] = new_value
    return citation if out is None else out


def _replace_items(items: list[Any], update: Callable[[int, Any], Any]) -> list[Any] | None:
    """A copy of ``items`` with ``update(index, item)`` applied, or None when no item changed
    (the body is then reused as it is, not copied)."""
    out: list[Any] | None = None
    for i, item in enumerate(items):
        new = update(i, item)
        if new is not item:
            if out is None:
                out = list(items)
            out[i] = new
    return out


def mask_citations(block: dict[str, Any], path: str, fn: _TextFn) -> dict[str, Any]:
    """``block`` with its citations masked (``block`` itself when unchanged)."""
    citations = block.get("citations")
    if not isinstance(citations, list) or not citations:
        return block
    items = _replace_items(citations, lambda i, c: mask_citation(c, f"{path}.citations[{i}]", fn))
    if items is None:
        return block
    new_block = dict(block)
    new_block["citations"] = items
    return new_block


def _json(value: Any, path: str, fn: _TextFn, depth: int) -> Any:
    """Every string leaf of a JSON value (tool inputs); keys are left as they are."""
    if isinstance(value, str):
        return fn(value, path)
    if depth >= _MAX_DEPTH:
        raise MaskingError(f"tool input nested deeper than {_MAX_DEPTH} levels at {path}")
    if isinstance(value, dict):
        out: dict[str, Any] | None = None
        for k, v in value.items():
            new_v = _json(v, _child(path, k), fn, depth + 1)
            if new_v is not v:
                if out is None:
                    out = dict(value)
                out[k] = new_v
        return value if out is None else out
    if isinstance(value, list):
        items = _replace_items(value, lambda i, v: _json(v, f"{path}[{i}]", fn, depth + 1))
        return value if items is None else items
    return value


def _child(path: str, key: str) -> str:
    """``path.key`` for identifier keys, ``path["odd key"]`` otherwise (JSONPath bracket form);
    just ``key`` at the root."""
    if key and key.isidentifier() and key.isascii():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


#: How far past an excerpt's end secrets are still looked for, so that a value the cut falls
#: inside is found whole (the longest built-in, a PEM private key, is ~3.3 KB).
EXCERPT_MARGIN = 4096


@functools.cache
def _secret_detectors() -> DetectorSet:
    return DetectorSet(types=SECRET_TYPES)


def redact_excerpt(text: str, limit: int) -> str:
    """The first ``limit`` characters of ``text`` with every credential replaced by ``[TYPE]``.

    Approval excerpts travel further than any record (approval events, the approvals API,
    webhooks, chat notifications) and come from the body as recorded, which a bundle may mask
    only partly or not at all: credentials are therefore redacted here whatever the bundle says.
    Redacting happens before cutting, so a secret the cut falls inside is not half kept.
    """
    window = text[: limit + EXCERPT_MARGIN]
    out: list[str] = []
    pos = 0
    for finding in _secret_detectors().scan(window):
        out.append(window[pos : finding.start])
        out.append(f"[{finding.type}]")
        pos = finding.end
    out.append(window[pos:])
    return "".join(out)[:limit]
