"""Building the forwarder's events from an upstream result. Pure functions, unit-tested."""

from __future__ import annotations

from typing import Any

import orjson

from services.forwarder.guard import GuardedResponse
from services.forwarder.upstream import RETRYABLE_STATUS, UpstreamResult, UpstreamStream
from skillgate import events
from skillgate.errors import error_type_for
from skillgate.events import (
    CallCompleted,
    CallDecided,
    CallFailed,
    CallReply,
    Envelope,
    ForwarderClaim,
    UpstreamAttempt,
)


def _env(decided: CallDecided, kind: str) -> Envelope:
    return events.envelope(
        decided["call_id"],
        decided["session_id"],
        decided["identity"],
        decided["bundle_version"],
        event_id=events.derived_event_id(decided["call_id"], kind),
    )


def claim_event(decided: CallDecided, state: str, terminal_state: str | None = None) -> ForwarderClaim:
    """The claims-changelog entry for a call (``claimed`` before calling, ``done`` after)."""
    return ForwarderClaim(**_env(decided, f"claim-{state}"), state=state, terminal_state=terminal_state)


def _usage(doc: Any) -> tuple[str, str | None, int | None, int | None]:
    """Model, stop reason and token counts of a parsed Messages response (blanks if not one)."""
    if not isinstance(doc, dict):
        return "", None, None, None
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    assert isinstance(usage, dict)

    def num(key: str) -> int | None:
        v = usage.get(key)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    stop = doc.get("stop_reason")
    return (
        str(doc.get("model") or ""),
        stop if isinstance(stop, str) else None,
        num("input_tokens"),
        num("output_tokens"),
    )


def _parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def outcome_events(
    decided: CallDecided, result: UpstreamResult, caller_body: bytes, record_body: bytes
) -> tuple[CallCompleted | CallFailed, CallReply | None]:
    """:func:`guarded_events` for an answer relayed as it came (``caller_body`` to the caller,
    ``record_body`` to the record, nothing masked or blocked)."""
    guarded = GuardedResponse.passthrough(result.status, result.headers, caller_body, record_body)
    return guarded_events(decided, result, guarded)


def guarded_events(
    decided: CallDecided, result: UpstreamResult, guarded: GuardedResponse
) -> tuple[CallCompleted | CallFailed, CallReply | None]:
    """The terminal event for the record and the reply for a waiting caller.

    ``completed`` when the upstream gave a final answer (any status it chose, relayed as is, or
    the 403 of an answer the response guard refused); ``failed`` when there was no usable answer:
    unreachable, no response, or retries exhausted on a retryable status (that last upstream
    error is relayed to the caller). The caller gets ``guarded``'s caller body, the record its
    record body, masked values and blocked tool calls.
    """
    caller_body, record_body = guarded.caller_body, guarded.record_body
    if result.status == 0:
        # No answer at all: skillgate's own error for the caller, nothing upstream to record.
        message = f"skillgate could not get an answer from upstream `{decided['upstream']}`: {result.error}"
        return _failed(
            decided, 502, "api_error", message, retry=not result.maybe_processed, attempts=result.attempts
        )
    terminal: CallCompleted | CallFailed
    if result.status in RETRYABLE_STATUS:
        # Retries exhausted: the upstream's last error is relayed to the caller as it came.
        terminal = events.failed_event(
            decided,
            decided["bundle_version"],
            stage="forwarder",
            status=result.status,
            error_type=error_type_for(result.status),
            message=f"upstream answered {result.status} after {len(result.attempts)} attempt(s)",
            upstream=decided["upstream"],
            submitted_at=decided["submitted_at"],
            attempts=result.attempts,
            headers=guarded.headers,
            body=record_body,
        )
        state = "failed"
    else:
        terminal = _completed(
            decided,
            guarded,
            attempts=result.attempts,
            latency_ms=result.latency_ms,
            request_id=result.headers.get("request-id"),
        )
        state = "completed"
    reply: CallReply | None = None
    if decided["reply_to"] is not None:
        reply = CallReply(
            **_env(decided, "reply"),
            kind="response",
            seq=0,
            status=guarded.status,
            headers=guarded.headers,
            body=caller_body,
            terminal_state=state,
        )
    return terminal, reply


def interrupted_events(decided: CallDecided) -> tuple[CallFailed, CallReply | None]:
    """Outcome of a call found claimed but unfinished after a restart.

    Its upstream outcome is unknown, and calling again could make a second upstream call, so it
    ends as ``failed`` with a clear explanation instead.
    """
    message = (
        "the forwarder restarted while this call was in flight; its upstream outcome is unknown "
        "and it was not retried (skillgate makes at most one upstream call per call)"
    )
    return _failed(decided, 502, "api_error", message, retry=False)


def unusable_events(decided: CallDecided, message: str) -> tuple[CallFailed, CallReply | None]:
    """Outcome of a call the forwarder refuses before any upstream call (e.g. unknown upstream)."""
    return _failed(decided, 503, "api_error", message)


def unchecked_events(
    decided: CallDecided, result: UpstreamResult, message: str
) -> tuple[CallFailed, CallReply | None]:
    """Outcome of a call whose answer the response guard could not check (fail closed).

    Neither the caller nor the record gets the answer (it may hold what policy says to mask);
    the record keeps the upstream attempts. The upstream did process the call, so the caller is
    told not to retry (a retry would be a second, billed upstream call).
    """
    return _failed(decided, 503, "api_error", message, retry=False, attempts=result.attempts)


def _failed(
    decided: CallDecided,
    status: int,
    etype: str,
    message: str,
    retry: bool = True,
    attempts: list[UpstreamAttempt] | None = None,
) -> tuple[CallFailed, CallReply | None]:
    return events.call_failure(
        decided,
        decided["bundle_version"],
        waiting=decided["reply_to"] is not None,
        stage="forwarder",
        status=status,
        error_type=etype,
        message=message,
        upstream=decided["upstream"],
        submitted_at=decided["submitted_at"],
        attempts=attempts,
        retry=retry,
    )


def streamed_terminal(
    decided: CallDecided,
    opened: UpstreamStream,
    record: GuardedResponse | None,
    failure: tuple[int, str, str] | None,
    *,
    latency_ms: float,
    first_token_ms: float | None,
    chunks: int,
) -> CallCompleted | CallFailed:
    """The terminal event of a streamed call, from its assembled answer.

    ``record`` is the assembled answer after the response guard (``None`` when it could not be
    checked: then no body is recorded). ``failure`` (status, error type, message) makes it a
    ``CallFailed`` that keeps what was assembled until then, masked for the record. Otherwise a
    ``CallCompleted`` like a non-streamed call's, with ``stream``, time to first token and the
    number of chunk messages.
    """
    body = record.record_body if record is not None else None
    if failure is not None:
        status, etype, message = failure
        return events.failed_event(
            decided,
            decided["bundle_version"],
            stage="forwarder",
            status=status,
            error_type=etype,
            message=message,
            upstream=decided["upstream"],
            submitted_at=decided["submitted_at"],
            attempts=opened.attempts,
            headers=record.headers if record is not None else dict(opened.headers),
            body=body,
        )
    assert record is not None
    return _completed(
        decided,
        record,
        attempts=opened.attempts,
        latency_ms=latency_ms,
        request_id=opened.headers.get("request-id"),
        stream=True,
        first_token_ms=first_token_ms,
        chunks=chunks,
    )


def _completed(
    decided: CallDecided,
    guarded: GuardedResponse,
    *,
    attempts: list[UpstreamAttempt],
    latency_ms: float,
    request_id: str | None,
    stream: bool = False,
    first_token_ms: float | None = None,
    chunks: int | None = None,
) -> CallCompleted:
    """The calls.completed record of a guarded answer (usage read from the answer as recorded)."""
    usage_doc = guarded.usage_doc if guarded.usage_doc is not None else _parsed(guarded.record_body)
    model, stop, tin, tout = _usage(usage_doc)
    return CallCompleted(
        **_env(decided, "completed"),
        upstream=decided["upstream"],
        status=guarded.status,
        headers=guarded.headers,
        body=guarded.record_body,
        attempts=attempts,
        latency_ms=latency_ms,
        request_id=request_id,
        model=model or decided["model"],
        stop_reason=stop,
        input_tokens=tin,
        output_tokens=tout,
        masked=guarded.masked,
        stream=stream,
        submitted_at=decided["submitted_at"],
        blocked_tools=guarded.blocked,
        first_token_ms=first_token_ms,
        chunks=chunks,
    )
