"""``skillgate approvals list|show|approve|deny``: the approvers' inbox from a terminal.

Talks to the ingress's approvals API with an approver's OIDC token (``--token``, else
``$SKILLGATE_APPROVER_TOKEN``); the same checks apply as over HTTP (role, routing to your groups,
separation of duties, state).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import httpx
import orjson


def add_parser(sub: Any) -> None:
    """Register ``approvals`` and its actions on the top-level subparsers."""
    approvals = sub.add_parser("approvals", help="list, show, approve or deny held calls (approvers)")
    actions = approvals.add_subparsers(dest="approvals_action", required=True)
    listing = actions.add_parser("list", help="approvals routed to your groups")
    listing.add_argument(
        "--state", choices=["pending", "approved", "denied", "expired", "all"], default="pending"
    )
    listing.add_argument("--limit", type=int, default=100)
    show = actions.add_parser("show", help="one approval, with its decisions")
    show.add_argument("id")
    approve = actions.add_parser("approve", help="approve a held call")
    approve.add_argument("id")
    approve.add_argument("--comment", default=None)
    approve.add_argument(
        "--window-minutes",
        type=int,
        default=None,
        help="grant a time window: the requester's calls under the same rule pass for this long",
    )
    deny = actions.add_parser("deny", help="deny a held call")
    deny.add_argument("id")
    deny.add_argument("--comment", default=None)
    for p in (listing, show, approve, deny):
        p.add_argument("--format", choices=["table", "json"], default="table")
        p.add_argument("--token", default=None, help="approver token (default: $SKILLGATE_APPROVER_TOKEN)")
        p.add_argument(
            "--url",
            default=None,
            help="ingress URL (default: $SKILLGATE_URL, else http://127.0.0.1:$SKILLGATE_INGRESS_PORT)",
        )


def run(args: argparse.Namespace, mint: Callable[[], str], out: TextIO = sys.stdout) -> int:
    """Run one action; exit 0 on success, 1 when the gateway refused, 2 when it was unreachable."""
    token = args.token or os.environ.get("SKILLGATE_APPROVER_TOKEN") or mint()
    url = (
        args.url
        or os.environ.get("SKILLGATE_URL")
        or f"http://127.0.0.1:{os.environ.get('SKILLGATE_INGRESS_PORT', '8080')}"
    )
    headers = {"authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            if args.approvals_action == "list":
                resp = client.get("/v1/approvals", params={"state": args.state, "limit": args.limit})
            elif args.approvals_action == "show":
                resp = client.get(f"/v1/approvals/{args.id}")
            else:
                body: dict[str, Any] = {}
                if args.comment:
                    body["comment"] = args.comment
                if getattr(args, "window_minutes", None):
                    body.update(grant="time_window", window_minutes=args.window_minutes)
                resp = client.post(f"/v1/approvals/{args.id}/{args.approvals_action}", json=body)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach skillgate at {url}: {type(exc).__name__}", file=sys.stderr)
        return 2
    doc = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    if resp.status_code >= 400:
        message = (doc.get("error") or {}).get("message") if isinstance(doc, dict) else None
        print(f"error ({resp.status_code}): {message or resp.text}", file=sys.stderr)
        return 1
    if args.format == "json":
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.approvals_action == "list":
        rows = doc.get("data") or []
        if not rows:
            out.write(f"no {args.state} approvals routed to you\n")
        for a in rows:
            out.write(_line(a))
    else:
        out.write(_details(doc))
    return 0


def _line(a: dict[str, Any]) -> str:
    who = a["requester"]["username"] or a["requester"]["subject"]
    return f"{a['id']}  {a['state']:<8}  {who:<16}  expires {a['expires_at'][:19]}  {a['reason'][:60]}\n"


def _details(a: dict[str, Any]) -> str:
    lines = [
        f"approval  {a['id']}  ({a['state']})",
        f"summary   {a['summary']}",
        f"excerpt   {a['excerpt'][:300]}",
        f"quorum    {a['quorum']}{' + one per group' if a['each_group'] else ''} of {', '.join(a['approver_groups'])}",
        f"expires   {a['expires_at']}",
    ]
    for d in a.get("decisions") or []:
        comment = f" — {d['comment']}" if d.get("comment") else ""
        lines.append(f"decision  {d['decision']} by {d['by']} at {d['at']}{comment}")
    if a.get("outcome"):
        lines.append(f"outcome   {a['outcome']['reason']}")
    return "\n".join(lines) + "\n"
