"""Investigator commands: ``skillgate search``, ``replay``, ``export`` and ``audit verify``.

Like ``skillgate sql`` they go through the recorder's read API (with chDB only the recorder may
open the store) with an auditor token: ``--token``, else ``$SKILLGATE_AUDITOR_TOKEN``, else a
token from the local dev issuer. ``replay --rerun`` sends a recorded (masked) request again
through the gateway as the caller running the command (``$SKILLGATE_TOKEN``), so policy applies
to it like to any call, and prints a diff of the recorded and the new response.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson

from services.recorder.cli import TIMEOUT_SECONDS, render_table

#: Top-level commands this module adds (``audit verify`` is added under ``audit``).
COMMANDS = ("search", "replay", "export")
SEARCH_COLUMNS = ("time", "call_id", "username", "model", "decision", "state", "status", "session_id")
DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class _Failed(Exception):
    """The recorder or gateway did not answer as expected; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _request(method: str, url: str, token: str, **kwargs: Any) -> httpx.Response:
    try:
        response = httpx.request(
            method, url, headers={"authorization": f"Bearer {token}"}, timeout=TIMEOUT_SECONDS, **kwargs
        )
    except httpx.ConnectError:
        raise _Failed(f"{url.split('/v1/')[0]} is not reachable. Is skillgate running?") from None
    except httpx.HTTPError as exc:
        raise _Failed(f"no answer from {url.split('/v1/')[0]}: {type(exc).__name__}") from None
    if response.status_code >= 400:
        try:
            message = str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise _Failed(f"error ({response.status_code}): {message}", 1 if response.status_code < 500 else 2)
    return response


def _filters(args: argparse.Namespace) -> dict[str, str]:
    names = ("user", "group", "since", "until", "model", "skill", "decision", "state", "session", "q")
    return {n: getattr(args, n) for n in names if getattr(args, n, None)}


def search_command(
    filters: Mapping[str, str], limit: int, pages: int, fmt: str, recorder_url: str, token: str, out: TextIO
) -> int:
    """Print matching calls, newest first, following cursors for up to ``pages`` pages."""
    params: dict[str, Any] = {**filters, "limit": limit}
    shown: list[dict[str, Any]] = []
    cursor = None
    for _ in range(pages):
        if cursor:
            params["cursor"] = cursor
        doc = _request("GET", recorder_url.rstrip("/") + "/v1/audit/calls", token, params=params).json()
        rows: list[dict[str, Any]] = doc.get("data") or []
        if fmt == "json":
            for row in rows:
                print(orjson.dumps(row).decode(), file=out)
        shown.extend(rows)
        cursor = doc.get("next_cursor")
        if not cursor:
            break
    if fmt != "json":
        print(render_table(SEARCH_COLUMNS, [[r.get(c) for c in SEARCH_COLUMNS] for r in shown]), file=out)
        more = f"; more with --cursor {cursor}" if cursor else ""
        print(f"({len(shown)} call(s){more})", file=out)
    return 0


def _text_of(body: Any) -> str:
    """The readable text of a Messages request or response body."""
    if body is None:
        return ""
    if isinstance(body, str):
        return body
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        last = body["messages"][-1] if body["messages"] else {}
        return _content_text(last.get("content") if isinstance(last, dict) else last)
    if isinstance(body, dict) and "content" in body:
        return _content_text(body["content"])
    return orjson.dumps(body).decode()


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(str(block.get("text") or ""))
        elif block.get("type") in ("tool_use", "server_tool_use"):
            parts.append(f"[tool_use {block.get('name')}: {orjson.dumps(block.get('input')).decode()}]")
        elif block.get("type") == "tool_result":
            parts.append(f"[tool_result {block.get('tool_use_id')}]")
    return "\n".join(parts)


def _mark(text: str, masked: Sequence[Mapping[str, Any]]) -> str:
    """The text with each masked placeholder marked ⟦…⟧ so a reader sees what was masked."""
    for item in masked:
        placeholder = str(item.get("placeholder") or "")
        if placeholder and placeholder in text:
            text = text.replace(placeholder, f"⟦{placeholder}⟧")
    return text


def transcript(doc: Mapping[str, Any]) -> str:
    """A session timeline as a readable transcript."""
    lines = [f"session {doc.get('id')} · {len(doc.get('calls') or [])} call(s)", ""]
    for entry in doc.get("timeline") or []:
        at = str(entry.get("at") or "")[:23]
        kind = entry.get("kind")
        who = entry.get("actor") or "?"
        head = f"{at}  {kind:<18} call {str(entry.get('call_id'))[:13]}…"
        masked = entry.get("masked") or []
        if kind == "request":
            lines.append(f"{head} {who} → {entry.get('model')}")
            if entry.get("skills") or entry.get("tools"):
                lines.append(f"    skills: {entry.get('skills') or []}  tools: {entry.get('tools') or []}")
            lines.extend("    > " + ln for ln in _mark(_text_of(entry.get("body")), masked).splitlines())
        elif kind == "decision":
            rules = ", ".join(entry.get("rule_ids") or []) or "-"
            lines.append(f"{head} {entry.get('decision')} ({entry.get('reason')}; rules: {rules}; "
                         f"bundle {entry.get('bundle_version')})")  # fmt: skip
        elif kind == "response":
            usage = entry.get("usage") or {}
            first = f", first token {entry['first_token_ms']:.0f} ms" if entry.get("first_token_ms") else ""
            lines.append(f"{head} status {entry.get('status')}, {usage.get('input_tokens')} in / "
                         f"{usage.get('output_tokens')} out, {entry.get('latency_ms')} ms{first}")  # fmt: skip
            lines.extend("    < " + ln for ln in _mark(_text_of(entry.get("body")), masked).splitlines())
        elif kind == "failure":
            lines.append(f"{head} {entry.get('status')} {entry.get('error_type')}: {entry.get('message')}")
        else:
            details = {
                k: v for k, v in entry.items() if k not in ("at", "kind", "call_id", "event_id", "actor")
            }
            lines.append(f"{head} by {who} {orjson.dumps(details).decode()}")
        if masked:
            kinds = ", ".join(sorted({f"{m.get('type')}@{m.get('location')}" for m in masked}))
            lines.append(f"    masked: {kinds}")
    return "\n".join(lines)


def replay_command(session_id: str, fmt: str, recorder_url: str, token: str, out: TextIO) -> int:
    """Print a session's timeline as a transcript (or its JSON)."""
    url = recorder_url.rstrip("/") + "/v1/audit/sessions/" + session_id
    doc = _request("GET", url, token).json()
    print(orjson.dumps(doc).decode() if fmt == "json" else transcript(doc), file=out)
    return 0


def rerun_command(
    call_id: str, recorder_url: str, auditor_token: str, gateway_url: str, caller_token: str, out: TextIO
) -> int:
    """Send a recorded request again through the gateway and print a diff of the responses.

    The recorded request is the masked one: values policy masked stay masked in the rerun.
    Returns 0 when the new call was answered (same or different), 1 when the gateway refused it.
    """
    record = _request("GET", f"{recorder_url.rstrip('/')}/v1/audit/calls/{call_id}", auditor_token).json()
    body = record.get("request_body") or ""
    if not body:
        raise _Failed(f"call {call_id} has no recorded request body (expired by retention?)", 1)
    path = record.get("path") or "/v1/messages"
    try:
        response = httpx.post(
            gateway_url.rstrip("/") + path,
            content=body.encode(),
            headers={"authorization": f"Bearer {caller_token}", "anthropic-version": "2023-06-01",
                     "content-type": "application/json", "x-skillgate-session": f"rerun-{call_id}"[:128]},
            timeout=TIMEOUT_SECONDS,
        )  # fmt: skip
    except httpx.HTTPError as exc:
        raise _Failed(f"the gateway at {gateway_url} did not answer: {type(exc).__name__}") from None
    new_call = response.headers.get("x-skillgate-call-id", "?")
    print(f"rerun of {call_id} → new call {new_call}: HTTP {response.status_code}", file=out)
    old = _pretty(record.get("response_body") or "")
    new = _pretty(response.text)
    diff = list(difflib.unified_diff(old, new, f"recorded {call_id}", f"rerun {new_call}", lineterm=""))
    print("\n".join(diff) if diff else "(responses are identical)", file=out)
    return 0 if response.status_code < 400 else 1


def _pretty(text: str) -> list[str]:
    """A response as lines to diff: its readable text and stop reason, else the raw text."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.splitlines()
    if isinstance(doc, dict) and doc.get("type") == "message":
        return [*_content_text(doc.get("content")).splitlines(), f"[stop_reason: {doc.get('stop_reason')}]"]
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode().splitlines()


def export_command(
    filters: Mapping[str, str],
    fmt: str,
    limit: int | None,
    output: str,
    recorder_url: str,
    token: str,
    err: TextIO,
) -> int:
    """Write matching calls (masked bodies included) to ``output`` (``-``: stdout) as jsonl or parquet."""
    payload: dict[str, Any] = {**filters, "format": fmt}
    if limit:
        payload["limit"] = limit
    data = _request("POST", recorder_url.rstrip("/") + "/v1/audit/export", token, json=payload).content
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        Path(output).write_bytes(data)
    rows = data.count(b"\n") if fmt == "jsonl" else None
    print(
        f"exported {len(data)} bytes{f', {rows} call(s)' if rows is not None else ''} to {output}", file=err
    )
    return 0


def verify_command(fmt: str, recorder_url: str, token: str, out: TextIO) -> int:
    """Ask the recorder to recompute the tamper-evidence chain; exit 0 if intact, 1 if not."""
    doc = _request("POST", recorder_url.rstrip("/") + "/v1/audit/verify", token).json()
    if fmt == "json":
        print(orjson.dumps(doc).decode(), file=out)
    else:
        state = "INTACT" if doc.get("ok") else "TAMPERED"
        print(f"audit store {state}: {doc.get('rows_checked')} rows checked against "
              f"{doc.get('checkpoints')} signed checkpoints ({doc.get('rows_sealed')} rows sealed; "
              f"{doc.get('unsealed_recent_rows')} recent rows not sealed yet; "
              f"{doc.get('expired_rows')} expired by retention; "
              f"{doc.get('rows_before_sealing')} stored before sealing began)", file=out)  # fmt: skip
        for kind in ("deleted", "altered", "inserted"):
            for item in doc.get(kind) or []:
                print(f"  {kind.upper():8} {item.get('topic')}[{item.get('partition')}]@{item.get('offset')} "
                      f"event {item.get('event_id')} call {item.get('call_id', '')}", file=out)  # fmt: skip
        for item in doc.get("broken_checkpoints") or []:
            print(f"  CHECKPOINT {item.get('topic')}[{item.get('partition')}] offsets "
                  f"{item.get('first_offset')}..{item.get('last_offset')}: {item.get('problem')}", file=out)  # fmt: skip
    return 0 if doc.get("ok") else 1


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="caller subject or username")
    parser.add_argument("--group", help="caller group")
    parser.add_argument("--since", help="ISO 8601 start, e.g. 2026-11-21T00:00:00Z")
    parser.add_argument("--until", help="ISO 8601 end (exclusive)")
    parser.add_argument("--model")
    parser.add_argument("--skill", help="Claude Skill id")
    parser.add_argument("--decision", help="allow, deny, require_approval, rate_limited")
    parser.add_argument("--state", help="completed, failed, denied, expired, ...")
    parser.add_argument("--session", help="session id")
    parser.add_argument(
        "-q", "--q", dest="q", help="keywords: every word must occur in the request or response"
    )


def _add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", default=None,
        help="auditor token (default: $SKILLGATE_AUDITOR_TOKEN, else a token from the local dev issuer)",
    )  # fmt: skip


def add_parsers(sub: Any, audit_sub: Any) -> None:
    """Add ``search``, ``replay``, ``export`` to ``sub`` and ``verify`` to ``audit_sub``."""
    search = sub.add_parser("search", help="search recorded calls (auditors)")
    _add_filters(search)
    search.add_argument("--limit", type=int, default=50, help="calls per page")
    search.add_argument("--pages", type=int, default=1, help="pages to follow")
    search.add_argument("--cursor", default=None, help="continue from a previous search's cursor")
    search.add_argument("--format", choices=["table", "json"], default="table")
    _add_token(search)
    replay = sub.add_parser("replay", help="print a session as a transcript, or rerun a call (auditors)")
    replay.add_argument("session", nargs="?", help="session id")
    replay.add_argument(
        "--rerun", metavar="CALL", help="send this recorded call again and diff the responses"
    )
    replay.add_argument("--gateway", default=os.environ.get("SKILLGATE_GATEWAY_URL", DEFAULT_GATEWAY),
                        help="ingress URL for --rerun (default: $SKILLGATE_GATEWAY_URL or %(default)s)")  # fmt: skip
    replay.add_argument("--format", choices=["text", "json"], default="text")
    _add_token(replay)
    export = sub.add_parser("export", help="export recorded calls as jsonl or parquet (auditors)")
    _add_filters(export)
    export.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    export.add_argument("--limit", type=int, default=None)
    export.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    _add_token(export)
    verify = audit_sub.add_parser(
        "verify",
        help="recompute the tamper-evidence chain (exit 1 if rows were deleted, altered or inserted)",
    )
    verify.add_argument("--format", choices=["text", "json"], default="text")
    _add_token(verify)


def run(args: argparse.Namespace, recorder_url: str, mint: Callable[[str, list[str]], str]) -> int:
    """Run one of this module's commands; ``mint(user, groups)`` makes a dev token."""
    token = args.token or os.environ.get("SKILLGATE_AUDITOR_TOKEN") or mint("cli", ["auditors"])
    out = sys.stdout
    try:
        if args.command == "search":
            filters = _filters(args)
            if args.cursor:
                filters["cursor"] = args.cursor
            return search_command(filters, args.limit, args.pages, args.format, recorder_url, token, out)
        if args.command == "replay":
            if args.rerun:
                caller = os.environ.get("SKILLGATE_TOKEN") or mint(os.environ.get("USER", "cli"), [])
                return rerun_command(args.rerun, recorder_url, token, args.gateway, caller, out)
            if not args.session:
                print("error: give a SESSION, or --rerun CALL", file=sys.stderr)
                return 2
            return replay_command(args.session, args.format, recorder_url, token, out)
        if args.command == "export":
            return export_command(
                _filters(args), args.format, args.limit, args.output, recorder_url, token, sys.stderr
            )
        return verify_command(args.format, recorder_url, token, out)
    except _Failed as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
