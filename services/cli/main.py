"""``skillgate``: one command for every service, the local stack and the operator tools.

skillgate stack                      # Kafka + dev issuer + stub (no key) + the four services
skillgate ingress|policy|forwarder|recorder|stub-upstream|dev-issuer
skillgate kafka start|stop           # the local broker alone
skillgate token --user alice --groups eng [--expires-in 3600]
skillgate sql "SELECT ..." [--format json]
skillgate policy check FILE          # validate a bundle (errors name file:line and field)
skillgate policy test FILE CASES.yaml
skillgate policy publish FILE [--as USER]
skillgate audit find-secret VALUE    # auditor: did this value pass through, when, by whom?
skillgate audit verify               # auditor: recompute the tamper-evidence chain
skillgate search [--user U] [-q WORDS] [--since T] ...   # auditor: search recorded calls
skillgate replay SESSION | --rerun CALL                   # auditor: transcript, or resend + diff
skillgate export --since T --format jsonl|parquet -o F    # auditor: export recorded calls
skillgate approvals list|show|approve|deny [ID] [--comment C] [--window-minutes N]  # approvers
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _run_service(name: str) -> int:
    if name == "ingress":
        from services.ingress.main import run as run_ingress

        run_ingress()
    elif name == "policy":
        from services.policy.main import run as run_policy

        run_policy()
    elif name == "forwarder":
        from services.forwarder.main import run as run_forwarder

        run_forwarder()
    elif name == "recorder":
        from services.recorder.main import run as run_recorder

        run_recorder()
    elif name == "stub-upstream":
        from services.stub_upstream.main import run as run_stub

        run_stub()
    elif name == "dev-issuer":
        from services.dev_issuer.main import run as run_issuer

        run_issuer()
    return 0


def _stack(args: argparse.Namespace) -> int:
    from services.cli.stack import Stack

    key = os.environ.get("ANTHROPIC_API_KEY")
    data_dir = Path(os.environ.get("SKILLGATE_DATA_DIR", "data")).resolve()
    stack = Stack(
        data_dir=data_dir,
        kafka_bootstrap=os.environ.get("SKILLGATE_KAFKA_BOOTSTRAP"),
        use_stub=not key,
    )
    if not key:
        print(
            "\n  !!! ANTHROPIC_API_KEY is not set: calls go to the local STUB upstream, not to Claude. !!!\n"
            "  !!! Set ANTHROPIC_API_KEY and restart to reach the real API.                         !!!\n",
            flush=True,
        )
    print("starting skillgate (first start fetches Kafka from Maven Central)...", flush=True)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start()
        token = stack.token("alice", ["eng"])
        url = stack.ingress_url
        print(
            f"""
skillgate is running.
  ingress (Anthropic API drop-in): {url}
  recorder read API:               {stack.recorder_url}
  dev OIDC issuer (dev only):      {stack.issuer_url}
  upstream:                        {"stub at " + stack.stub_url if not key else "https://api.anthropic.com"}
  logs:                            {data_dir / "logs"}

Try it (a dev token for alice, valid 1 h):
  export SKILLGATE_TOKEN=$(.venv/bin/skillgate token --user alice --groups eng)
  curl -s {url}/v1/messages -H "authorization: Bearer $SKILLGATE_TOKEN" \\
    -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \\
    -d '{{"model":"claude-sonnet-5-5","max_tokens":64,"messages":[{{"role":"user","content":"Hello"}}]}}'

  .venv/bin/python -c 'import anthropic, os; c = anthropic.Anthropic(base_url="{url}", \\
    api_key=os.environ["SKILLGATE_TOKEN"]); print(c.messages.create(model="claude-sonnet-5-5", \\
    max_tokens=64, messages=[{{"role": "user", "content": "Hello"}}]).content[0].text)'

  .venv/bin/skillgate sql "SELECT call_id, subject, state, status FROM calls ORDER BY submitted_at DESC LIMIT 5"

Prompts over ~500 tokens wait for an approver (policies/default.yaml); decide as bob:
  .venv/bin/skillgate approvals list --token $(.venv/bin/skillgate token --user bob --groups approvers)

Ctrl-C stops everything.
(token for the examples above: {token[:16]}... run `skillgate token` for a full one)
""",  # noqa: S608 - help text that shows a SQL example, not a query
            flush=True,
        )
        while not stopping:
            failed = stack.failed()
            if failed:
                print(f"service(s) exited: {', '.join(failed)}; see {data_dir / 'logs'}", file=sys.stderr)
                return 1
            time.sleep(0.5)  # supervising loop, not synchronisation
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping skillgate...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
    return 0


def _mint(user: str, groups: list[str], expires_in: int | None, issuer: str | None = None) -> str:
    from services.dev_issuer.config import DevIssuerSettings
    from services.dev_issuer.main import token_command

    settings = DevIssuerSettings(issuer=issuer) if issuer else DevIssuerSettings()
    return token_command(user, groups, expires_in, settings)


def _kafka(args: argparse.Namespace) -> int:
    from skillgate.localkafka import LocalKafka

    data_dir = Path(os.environ.get("SKILLGATE_DATA_DIR", "data")).resolve() / "kafka"
    broker = LocalKafka(data_dir, port=args.port)
    if args.action == "fetch":
        from skillgate.localkafka import ensure_jars

        print(ensure_jars())
        return 0
    broker.start()
    print(f"Kafka running on {broker.bootstrap} (data in {data_dir}); Ctrl-C stops it.", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        broker.stop()
    return 0


def _sql(args: argparse.Namespace) -> int:
    from services.recorder.cli import sql_command
    from skillgate.config import CommonSettings

    # Not $SKILLGATE_TOKEN: that is the caller token of the examples, and SQL needs an auditor.
    token = args.token or os.environ.get("SKILLGATE_AUDITOR_TOKEN") or _mint("cli", ["auditors"], 600)
    return sql_command(args.query, args.format, CommonSettings().recorder_url, token)


def _policy(args: argparse.Namespace) -> int:
    from services.cli import policy

    if args.policy_action == "check":
        return policy.check_command(Path(args.file))
    if args.policy_action == "test":
        return policy.run_cases_command(Path(args.file), Path(args.cases))
    if args.policy_action == "publish":
        return policy.publish_command(Path(args.file), args.publisher)
    return _run_service("policy")


def _audit(args: argparse.Namespace) -> int:
    from services.recorder.cli import find_secret_command, read_secret_value
    from skillgate.config import CommonSettings

    if args.audit_action == "verify":
        return _investigate(args)

    value = read_secret_value(args.value, sys.stdin)
    if value is None:
        print("error: no value given (pass it, or `-` to read it from stdin)", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("SKILLGATE_AUDITOR_TOKEN") or _mint("cli", ["auditors"], 600)
    return find_secret_command(value, args.format, CommonSettings().recorder_url, token)


def _investigate(args: argparse.Namespace) -> int:
    from services.cli import audit
    from skillgate.config import CommonSettings

    return audit.run(args, CommonSettings().recorder_url, lambda user, groups: _mint(user, groups, 600))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="skillgate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("ingress", "run the ingress (Anthropic API drop-in)"),
        ("forwarder", "run the forwarder"),
        ("recorder", "run the recorder (ClickHouse writer + read API)"),
        ("stub-upstream", "run the Messages-API stub upstream (tests, demos, benchmarks)"),
        ("dev-issuer", "run the local OIDC issuer (development only)"),
    ):
        sub.add_parser(name, help=help_)
    policy = sub.add_parser(
        "policy",
        help="run the policy service (faust); or check, test or publish a policy bundle",
        description="Without an action: run the policy service. With one: bundle tools.",
    )
    policy_sub = policy.add_subparsers(dest="policy_action", required=False)
    check = policy_sub.add_parser("check", help="validate a bundle (exit 1 naming file:line and field)")
    check.add_argument("file")
    ptest = policy_sub.add_parser("test", help="run example calls (a cases YAML) against a bundle")
    ptest.add_argument("file")
    ptest.add_argument("cases")
    publish = policy_sub.add_parser(
        "publish", help="validate and publish a bundle to Kafka (SKILLGATE_KAFKA_BOOTSTRAP)"
    )
    publish.add_argument("file")
    publish.add_argument(
        "--as", dest="publisher", default=None, help="publisher recorded in the event (default: your login)"
    )
    sub.add_parser("stack", help="run the whole local stack (what `make run` does)")
    kafka = sub.add_parser("kafka", help="run the local Kafka broker alone")
    kafka.add_argument("action", choices=["start", "fetch"])
    kafka.add_argument("--port", type=int, default=9092)
    token = sub.add_parser("token", help="print a token from the local dev issuer")
    token.add_argument("--user", required=True)
    token.add_argument("--groups", default="", help="comma-separated groups")
    token.add_argument("--expires-in", type=int, default=None, help="seconds")
    sql = sub.add_parser("sql", help="run a read-only SQL query against the audit store")
    sql.add_argument("query")
    sql.add_argument("--format", choices=["table", "json"], default="table")
    sql.add_argument(
        "--token",
        default=None,
        help="auditor token (default: $SKILLGATE_AUDITOR_TOKEN, else a token from the local dev issuer)",
    )
    audit = sub.add_parser("audit", help="auditor tools over the audit store")
    audit_sub = audit.add_subparsers(dest="audit_action", required=True)
    find = audit_sub.add_parser(
        "find-secret",
        help="whether and when a value was masked in any recorded call (auditors)",
        description="Exit 0 when the value was found, 1 when not, 2 on error. Only an HMAC "
        "fingerprint is compared; the value is neither stored nor logged. Pass `-` to read the "
        "value from stdin, which keeps it out of the process list and shell history.",
    )
    find.add_argument("value", help="the value, or `-` to read it from stdin")
    from services.cli import audit as audit_cli

    audit_cli.add_parsers(sub, audit_sub)
    from services.cli import approvals as approvals_cli

    approvals_cli.add_parser(sub)
    find.add_argument("--format", choices=["table", "json"], default="table")
    find.add_argument(
        "--token",
        default=None,
        help="auditor token (default: $SKILLGATE_AUDITOR_TOKEN, else a token from the local dev issuer)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``skillgate`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "stack":
        return _stack(args)
    if args.command == "kafka":
        return _kafka(args)
    if args.command == "token":
        groups = [g for g in args.groups.split(",") if g]
        print(_mint(args.user, groups, args.expires_in))
        return 0
    if args.command == "sql":
        return _sql(args)
    if args.command == "policy":
        return _policy(args)
    if args.command == "audit":
        return _audit(args)
    if args.command in ("search", "replay", "export"):
        return _investigate(args)
    if args.command == "approvals":
        from services.cli import approvals as approvals_cli

        return approvals_cli.run(args, lambda: _mint("cli-approver", ["approvers"], 600))
    return _run_service(args.command)


if __name__ == "__main__":
    sys.exit(main())
