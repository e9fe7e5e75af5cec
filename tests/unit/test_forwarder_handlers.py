"""The forwarder's pure parts: outcome events (``services/forwarder/handlers.py``) and in-order
offset commits (``OffsetTracker`` in ``skillgate/kafka.py``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition

from services.forwarder.handlers import (
    claim_event,
    interrupted_events,
    outcome_events,
    unusable_events,
)
from services.forwarder.upstream import UpstreamResult
from skillgate import events
from skillgate.codec import AvroCodec
from skillgate.events import (
    CallCompleted,
    CallDecided,
    CallFailed,
    CallReply,
    ReplyTo,
    UpstreamAttempt,
)
from skillgate.kafka import OffsetTracker
from tests import factories

CODEC = AvroCodec()
BUNDLE = "default@2026.11.21-1"
REPLY_TO = ReplyTo(topic="skillgate.calls.replies", partition=2, instance="ingress-1")
OK_BODY = factories.response_body(
    "hi",
    model="claude-sonnet-4-5-20250929",
    stop_reason="max_tokens",
    usage={"input_tokens": 31, "output_tokens": 16, "cache_read_input_tokens": 0},
)
RECORD_BODY = OK_BODY.replace(b'"hi"', b'"[MASKED]"')


def _decided(reply_to: ReplyTo | None = REPLY_TO, call_id: str | None = None) -> CallDecided:
    return factories.call_decided(
        call_id,
        identity=factories.identity(email=None, token_id=None),
        bundle_version=BUNDLE,
        reply_to=reply_to,
    )


def _attempt(number: int, status: int, error: str | None = None) -> UpstreamAttempt:
    return UpstreamAttempt(
        number=number,
        started_at=events.now_micros(),
        duration_ms=3.5,
        status=status,
        error=error,
        retry_after_ms=None,
        request_id=f"req_{number}" if status else None,
    )


def _result(status: int, body: bytes = OK_BODY, n_attempts: int = 1, **kw: Any) -> UpstreamResult:
    headers = {"content-type": "application/json", "request-id": "req_final"} if status else {}
    statuses = [status] * n_attempts
    return UpstreamResult(
        status=status,
        headers=kw.pop("headers", headers),
        body=body,
        attempts=[_attempt(i + 1, s, None if s else "ConnectError") for i, s in enumerate(statuses)],
        error=kw.pop("error", None),
        latency_ms=kw.pop("latency_ms", 12.25),
        maybe_processed=kw.pop("maybe_processed", False),
    )


def _encodes(name: str, event: Any) -> None:
    assert CODEC.decode(CODEC.encode(name, event)) == (name, dict(event))


def _as_completed(terminal: CallCompleted | CallFailed) -> CallCompleted:
    assert "latency_ms" in terminal and "stage" not in terminal, terminal
    return terminal


def _as_failed(terminal: CallCompleted | CallFailed) -> CallFailed:
    assert "stage" in terminal and "latency_ms" not in terminal, terminal
    return terminal


def _error_doc(body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    assert isinstance(doc, dict)
    assert doc["type"] == "error"
    assert set(doc["error"]) == {"type", "message"}
    return doc


# ---------------------------------------------------------------------- completed


def test_200_is_completed_with_usage_and_a_reply() -> None:
    decided = _decided()
    result = _result(200, latency_ms=88.5)
    outcome, reply = outcome_events(decided, result, OK_BODY, RECORD_BODY)
    terminal = _as_completed(outcome)
    assert terminal["status"] == 200
    assert terminal["body"] == RECORD_BODY  # the record gets the masked body
    assert terminal["model"] == "claude-sonnet-4-5-20250929"
    assert terminal["stop_reason"] == "max_tokens"
    assert terminal["input_tokens"] == 31
    assert terminal["output_tokens"] == 16
    assert terminal["latency_ms"] == 88.5
    assert terminal["request_id"] == "req_final"
    assert terminal["attempts"] == result.attempts
    assert terminal["upstream"] == "default"
    assert terminal["submitted_at"] == decided["submitted_at"]
    assert terminal["bundle_version"] == BUNDLE
    assert terminal["identity"] == decided["identity"]
    assert terminal["call_id"] == decided["call_id"]
    assert terminal["session_id"] == "sess-1"
    _encodes(events.CALL_COMPLETED, terminal)

    assert reply is not None
    assert reply["status"] == 200
    assert reply["body"] == OK_BODY  # the caller gets the caller body
    assert reply["headers"] == result.headers
    assert reply["terminal_state"] == "completed"
    assert reply["kind"] == "response"
    assert reply["seq"] == 0
    _encodes(events.CALL_REPLY, reply)


def test_400_is_completed_the_upstreams_final_answer() -> None:
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}'
    outcome, reply = outcome_events(_decided(), _result(400, body), body, body)
    terminal = _as_completed(outcome)
    assert terminal["status"] == 400
    assert terminal["model"] == "claude-sonnet-4-5"  # the upstream named none: the requested model
    assert terminal["stop_reason"] is None
    assert terminal["input_tokens"] is None and terminal["output_tokens"] is None
    assert reply is not None and reply["status"] == 400 and reply["body"] == body
    assert reply["terminal_state"] == "completed"
    _encodes(events.CALL_COMPLETED, terminal)


@pytest.mark.parametrize(
    "body",
    [
        b"event: message_start\ndata: {}\n\n",  # not JSON (a stream)
        b"[1, 2]",
        b'{"usage": "lots", "stop_reason": 5, "model": null}',
        b'{"usage": {"input_tokens": true, "output_tokens": "7"}}',
        b"",
    ],
)
def test_usage_extraction_tolerates_odd_bodies(body: bytes) -> None:
    outcome, _ = outcome_events(_decided(), _result(200, body), body, body)
    terminal = _as_completed(outcome)
    assert terminal["model"] == "claude-sonnet-4-5"
    assert terminal["stop_reason"] is None
    assert terminal["input_tokens"] is None
    assert terminal["output_tokens"] is None
    _encodes(events.CALL_COMPLETED, terminal)


def test_no_reply_when_nobody_waits() -> None:
    for result in (_result(200), _result(529, n_attempts=3), _result(0, b"", 3, error="unreachable")):
        terminal, reply = outcome_events(_decided(reply_to=None), result, result.body, result.body)
        assert reply is None
        assert terminal["call_id"]
    failed, reply2 = interrupted_events(_decided(reply_to=None))
    assert reply2 is None and failed["status"] == 502


# ------------------------------------------------------------------------- failed


def test_529_exhausted_is_failed_and_relays_the_upstream_error() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    result = _result(
        529, body, n_attempts=4, headers={"content-type": "application/json", "retry-after": "5"}
    )
    terminal, reply = outcome_events(_decided(), result, body, body)
    failed = _as_failed(terminal)
    assert failed["stage"] == "forwarder"
    assert failed["status"] == 529
    assert failed["error_type"] == "overloaded_error"
    assert "529" in failed["message"] and "4 attempt" in failed["message"]
    assert failed["attempts"] == result.attempts
    assert failed["body"] == body
    assert failed["upstream"] == "default"
    _encodes(events.CALL_FAILED, failed)
    assert reply is not None
    assert reply["status"] == 529
    assert reply["body"] == body
    assert reply["headers"]["retry-after"] == "5"
    assert reply["terminal_state"] == "failed"
    _encodes(events.CALL_REPLY, reply)


def test_status_0_is_failed_with_a_502_in_the_anthropic_shape() -> None:
    decided = _decided()
    result = _result(0, b"", n_attempts=3, error="upstream unreachable: ConnectError")
    terminal, reply = outcome_events(decided, result, b"", b"")
    failed = _as_failed(terminal)
    assert failed["status"] == 502
    assert failed["error_type"] == "api_error"
    assert "upstream unreachable: ConnectError" in failed["message"]
    assert "`default`" in failed["message"]
    assert failed["body"] is None
    assert len(failed["attempts"]) == 3
    _encodes(events.CALL_FAILED, failed)
    assert reply is not None
    assert reply["status"] == 502
    doc = _error_doc(reply["body"])
    assert doc["error"]["type"] == "api_error"
    assert doc["error"]["message"] == failed["message"]
    assert doc["request_id"] == reply["headers"]["request-id"]
    assert reply["headers"]["content-type"] == "application/json"
    assert reply["terminal_state"] == "failed"


def test_interrupted_and_unusable_events() -> None:
    decided = _decided()
    failed, reply = interrupted_events(decided)
    assert failed["stage"] == "forwarder"
    assert failed["status"] == 502
    assert failed["error_type"] == "api_error"
    assert "restarted" in failed["message"] and "not retried" in failed["message"]
    assert failed["attempts"] == [] and failed["body"] is None
    _encodes(events.CALL_FAILED, failed)
    assert reply is not None
    assert reply["status"] == 502 and reply["terminal_state"] == "failed"
    assert _error_doc(reply["body"])["error"]["message"] == failed["message"]
    _encodes(events.CALL_REPLY, reply)

    failed2, reply2 = unusable_events(decided, "no upstream connection named `eu`")
    assert failed2["status"] == 503
    assert failed2["message"] == "no upstream connection named `eu`"
    assert reply2 is not None and reply2["status"] == 503
    assert _error_doc(reply2["body"])["error"]["type"] == "api_error"


# ----------------------------------------------------------------------- event ids


def _ids(terminal: Any, reply: CallReply | None) -> tuple[str, str | None]:
    return terminal["event_id"], reply["event_id"] if reply else None


def test_event_ids_are_deterministic_per_call() -> None:
    call_id = events.new_call_id()
    first = _ids(*outcome_events(_decided(call_id=call_id), _result(200), OK_BODY, OK_BODY))
    again = _ids(*outcome_events(_decided(call_id=call_id), _result(200), OK_BODY, OK_BODY))
    assert first == again
    assert first[0] == events.derived_event_id(call_id, "completed")
    assert first[1] == events.derived_event_id(call_id, "reply")
    other = _ids(*outcome_events(_decided(), _result(200), OK_BODY, OK_BODY))
    assert other[0] != first[0] and other[1] != first[1]

    failed_ids = _ids(*outcome_events(_decided(call_id=call_id), _result(529), OK_BODY, OK_BODY))
    assert failed_ids[0] == events.derived_event_id(call_id, "failed") != first[0]
    assert _ids(*interrupted_events(_decided(call_id=call_id)))[0] == failed_ids[0]

    claimed = claim_event(_decided(call_id=call_id), "claimed")
    done = claim_event(_decided(call_id=call_id), "done", "completed")
    assert claimed["event_id"] == claim_event(_decided(call_id=call_id), "claimed")["event_id"]
    assert claimed["event_id"] != done["event_id"]
    assert done["state"] == "done" and done["terminal_state"] == "completed"
    assert claimed["terminal_state"] is None
    _encodes(events.FORWARDER_CLAIM, done)


# --------------------------------------------------------------------- OffsetTracker

TP = TopicPartition("skillgate.calls.decided", 0)
TP1 = TopicPartition("skillgate.calls.decided", 1)


def test_out_of_order_finishes_commit_only_up_to_the_oldest_in_flight() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.start(TP, offset)
    assert tracker.in_flight() == 4
    tracker.finish(TP, 12)
    tracker.finish(TP, 13)
    assert tracker.committable() == {TP: 10}
    tracker.committed({TP: 10})
    assert tracker.committable() == {}  # nothing moved
    tracker.finish(TP, 10)
    assert tracker.committable() == {TP: 11}
    tracker.committed({TP: 11})
    tracker.finish(TP, 11)
    assert tracker.in_flight() == 0
    assert tracker.committable() == {TP: 14}  # everything done: past the highest offset
    tracker.committed({TP: 14})
    assert tracker.committable() == {}
    tracker.start(TP, 14)
    assert tracker.committable() == {}  # 14 is in flight and 14 is already committed
    tracker.finish(TP, 14)
    assert tracker.committable() == {TP: 15}


def test_partitions_are_tracked_separately() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 5)
    tracker.start(TP, 6)
    tracker.start(TP1, 100)
    tracker.finish(TP1, 100)
    tracker.finish(TP, 6)
    assert tracker.committable() == {TP: 5, TP1: 101}
    assert tracker.in_flight([TP]) == 1
    assert tracker.in_flight([TP1]) == 0
    assert tracker.in_flight() == 1


def test_forget_drops_state() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 7)
    tracker.start(TP1, 3)
    tracker.committed({TP: 7})
    tracker.forget([TP])
    assert tracker.in_flight([TP]) == 0
    assert tracker.committable() == {TP1: 3}
    # a later reassignment starts clean: an older offset (redelivery) is committable again
    tracker.start(TP, 2)
    tracker.finish(TP, 2)
    assert tracker.committable()[TP] == 3
    tracker.forget([TP, TP1])
    assert tracker.committable() == {}
    assert tracker.in_flight() == 0


def test_finishing_an_unknown_offset_is_harmless() -> None:
    tracker = OffsetTracker()
    tracker.finish(TP, 1)
    assert tracker.committable() == {}
    tracker.start(TP, 1)
    tracker.finish(TP1, 1)
    assert tracker.committable() == {TP: 1}


@pytest.mark.parametrize(
    ("maybe_processed", "retry_header"),
    [(True, "false"), (False, None)],
    ids=["sent-no-answer", "never-reached"],
)
def test_sdk_told_not_to_retry_when_the_upstream_may_have_processed_the_call(
    maybe_processed: bool, retry_header: str | None
) -> None:
    result = _result(0, b"", error="upstream did not answer", maybe_processed=maybe_processed)
    _, reply = outcome_events(_decided(), result, b"", b"")
    assert reply is not None and reply["status"] == 502
    assert reply["headers"].get("x-should-retry") == retry_header


def test_interrupted_call_is_never_retried_by_the_sdk() -> None:
    _, reply = interrupted_events(_decided())
    assert reply is not None and reply["headers"]["x-should-retry"] == "false"
