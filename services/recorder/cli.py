"""``skillgate sql``: run a read-only query through the recorder's read API and print it.

The CLI never opens the store itself: with chDB only the recorder process may, and with a
ClickHouse server the API applies the same guard and limits for everyone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

import httpx
import orjson

MAX_CELL_CHARS = 60
#: Generous next to the server-side execution limit: the answer also has to travel.
TIMEOUT_SECONDS = 120.0


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    if len(text) > MAX_CELL_CHARS:
        return text[: MAX_CELL_CHARS - 1] + "…"
    return text


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as an aligned text table (long cells cut, newlines shown as ``\\n``)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    header = " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    rule = "-+-".join("-" * w for w in widths)
    body = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([header, rule, *body])


def _error_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase


def _post(
    recorder_url: str, path: str, payload: dict[str, Any], token: str, err: TextIO
) -> httpx.Response | None:
    """POST to the recorder's read API; ``None`` (and a message on ``err``) when it did not answer.

    Only the exception's type is printed: a transport error's text could quote the request.
    """
    try:
        return httpx.post(
            recorder_url.rstrip("/") + path,
            json=payload,
            headers={"authorization": f"Bearer {token}"},
            timeout=TIMEOUT_SECONDS,
        )
    except httpx.ConnectError:
        print(
            f"error: the recorder is not reachable at {recorder_url}. Is it running? "
            "(`skillgate recorder`, or `skillgate stack` for everything; the address is "
            "SKILLGATE_RECORDER_URL)",
            file=err,
        )
    except httpx.HTTPError as exc:
        print(f"error: no answer from the recorder at {recorder_url}: {type(exc).__name__}", file=err)
    return None


def sql_command(
    query: str,
    fmt: str,
    recorder_url: str,
    token: str,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """POST ``query`` to ``<recorder_url>/v1/audit/sql`` and print the result.

    ``fmt`` is ``table`` (aligned text, the default) or ``json`` (one JSON object per row).
    Returns 0 on success, 1 when the recorder refused the query, 2 when it is unreachable.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    response = _post(recorder_url, "/v1/audit/sql", {"query": query, "format": "json"}, token, err)
    if response is None:
        return 2
    if response.status_code != 200:
        print(f"error ({response.status_code}): {_error_message(response)}", file=err)
        return 1
    doc = response.json()
    columns: list[str] = list(doc.get("columns") or [])
    rows: list[list[Any]] = list(doc.get("rows") or [])
    if fmt == "json":
        for row in rows:
            print(orjson.dumps(dict(zip(columns, row, strict=False))).decode(), file=out)
    else:
        print(render_table(columns, rows), file=out)
        plural = "" if len(rows) == 1 else "s"
        print(f"({len(rows)} row{plural}, {doc.get('elapsed_ms', 0)} ms)", file=out)
    if doc.get("truncated"):
        print(f"note: the result was cut at {len(rows)} rows (add a LIMIT)", file=err)
    return 0


def read_secret_value(arg: str, stdin: TextIO) -> str | None:
    """The value to search for: ``arg``, or stdin when ``arg`` is ``-`` (trailing newline cut).

    None when nothing was given. Reading from stdin keeps the value out of the process list
    and the shell history.
    """
    value = stdin.read().rstrip("\r\n") if arg == "-" else arg
    return value or None


FIND_SECRET_COLUMNS = ("call_id", "time", "subject", "direction", "type", "location", "scope")


def find_secret_command(
    value: str,
    fmt: str,
    recorder_url: str,
    token: str,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Ask the recorder whether ``value`` was masked in any recorded call, and print where.

    ``fmt`` is ``table`` or ``json`` (one JSON object per occurrence). Returns 0 when the value
    was found, 1 when it never passed through (masked), 2 when the recorder refused or is
    unreachable. The value is sent once over the API and printed nowhere.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    response = _post(recorder_url, "/v1/audit/find-secret", {"value": value}, token, err)
    if response is None:
        return 2
    if response.status_code != 200:
        print(f"error ({response.status_code}): {_error_message(response)}", file=err)
        return 2
    doc = response.json()
    matches: list[dict[str, Any]] = list(doc.get("matches") or [])
    fingerprint = str(doc.get("fingerprint", ""))[:16]
    if fmt == "json":
        for match in matches:
            print(orjson.dumps(match).decode(), file=out)
    elif not matches:
        print(f"not found: no recorded call carried this value (fingerprint {fingerprint}…)", file=out)
    else:
        rows = [[m.get(c) for c in FIND_SECRET_COLUMNS] for m in matches]
        print(render_table(FIND_SECRET_COLUMNS, rows), file=out)
        calls = doc.get("call_count", 0)
        print(
            f"({len(matches)} occurrence(s) in {calls} call(s); fingerprint {fingerprint}…)",
            file=out,
        )
    if doc.get("truncated"):
        print("note: only the oldest occurrences are listed; narrow down with `skillgate sql`", file=err)
    return 0 if matches else 1
