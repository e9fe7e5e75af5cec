"""The audit schema for a ClickHouse cluster: Replicated tables per shard, Distributed in front.

    python -m services.recorder.cluster --cluster skillgate --database skillgate > schema.sql

Each migration statement becomes its cluster form (``ON CLUSTER``):

* ``CREATE TABLE t (...) ENGINE = X(...)`` → ``t_local`` with ``ReplicatedX`` (ZooKeeper path
  ``/clickhouse/tables/{shard}/<db>/t_local``, replica ``{replica}``: macros every node defines)
  and ``t`` as a ``Distributed`` table over it. Sharding keeps what must fold together on one
  shard: every row of a call (``call_id``) for events, call_parts and call_records, an approval's
  rows (``approval_id``), a bundle version, a checkpoint's partition.
* Materialized views run on each shard, from the local source to the local target, so each
  insert routed to a shard feeds that shard's aggregates.
* Plain views read the Distributed tables (a call lives on one shard, so ``GROUP BY call_id``
  over all shards is still one group per call).
* ``ALTER TABLE ... ADD COLUMN`` runs on both tables; index changes and TTLs on the local one.

The recorder applies this form itself when ``SKILLGATE_CLICKHOUSE_CLUSTER`` names the cluster
(and its TTLs on the ``_local`` tables); ``main`` prints it for review or for applying by hand.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable

from services.recorder.store import Migration, load_migrations

#: Sharding key of each table's Distributed front (default: rand()).
SHARDING_KEYS = {
    "events": "cityHash64(call_id)",
    "call_parts": "cityHash64(call_id)",
    "call_records": "cityHash64(call_id)",
    "approval_parts": "cityHash64(approval_id)",
    "policy_bundles": "cityHash64(name, version)",
    "audit_checkpoints": "cityHash64(topic, partition)",
}

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+)\.(\w+)\s*\(", re.S)
_ENGINE = re.compile(r"ENGINE\s*=\s*(\w*MergeTree)(\(([^)]*)\))?")
_CREATE_MV = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\.(\w+) TO (\w+)\.(\w+) AS", re.S)
_CREATE_VIEW = re.compile(r"^CREATE (OR REPLACE )?VIEW (IF NOT EXISTS )?(\w+)\.(\w+) AS", re.S)
_ALTER = re.compile(r"^ALTER TABLE (\w+)\.(\w+)\s+(.*)$", re.S)


def _on_cluster(cluster: str) -> str:
    return f"ON CLUSTER '{cluster}'"


def local_tables(statements: Iterable[str]) -> set[str]:
    """Names of the tables the statements create (each gets a ``_local`` twin on the shards)."""
    return {m.group(2) for s in statements if (m := _CREATE_TABLE.match(s))}


def cluster_statement(statement: str, database: str, cluster: str, tables: set[str]) -> list[str]:
    """The cluster form of one migration statement (with ``{db}`` already replaced)."""
    on = _on_cluster(cluster)
    if m := _CREATE_TABLE.match(statement):
        db, name = m.groups()
        local = f"{name}_local"
        engine = _ENGINE.search(statement)
        if engine is None:
            raise ValueError(f"no MergeTree engine in CREATE TABLE {name}")
        args = engine.group(3) or ""
        path = f"'/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}'"
        replicated = f"ENGINE = Replicated{engine.group(1)}({path}{', ' + args if args.strip() else ''})"
        body = statement[m.end() - 1 :]
        body = body[: engine.start() - (m.end() - 1)] + replicated + body[engine.end() - (m.end() - 1) :]
        key = SHARDING_KEYS.get(name, "rand()")
        return [
            f"CREATE TABLE IF NOT EXISTS {db}.{local} {on} {body}",
            f"CREATE TABLE IF NOT EXISTS {db}.{name} {on} AS {db}.{local} "
            f"ENGINE = Distributed('{cluster}', '{db}', '{local}', {key})",
        ]
    if m := _CREATE_MV.match(statement):
        db, name, tdb, target = m.groups()
        rest = statement[m.end() :]
        for table in tables:  # read and write the shard's own tables
            rest = re.sub(rf"\b{re.escape(database)}\.{table}\b", f"{database}.{table}_local", rest)
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name} {on} TO {tdb}.{target}_local AS{rest}"]
    if m := _CREATE_VIEW.match(statement):
        replace, if_not, db, name = m.groups()
        head = f"CREATE {replace or ''}VIEW {if_not or ''}{db}.{name} {on} AS"
        return [head + statement[m.end() :]]
    if m := _ALTER.match(statement):
        db, name, rest = m.groups()
        on_shards = [f"ALTER TABLE {db}.{name}_local {on} {rest}"]
        if rest.lstrip().upper().startswith("ADD COLUMN"):
            return [*on_shards, f"ALTER TABLE {db}.{name} {on} {rest}"]
        return on_shards
    if statement.upper().startswith("INSERT INTO"):
        return [statement]  # a backfill: through the Distributed tables, once, from any node
    raise ValueError(f"no cluster form for: {statement[:80]}")


def cluster_schema(
    cluster: str,
    database: str,
    migrations: Iterable[Migration] | None = None,
) -> list[str]:
    """Every statement, in order, that creates the audit schema on ``cluster``."""
    todo = list(migrations) if migrations is not None else load_migrations()
    all_statements = [s for m in todo for s in m.statements(database)]
    tables = local_tables(all_statements)
    out = [f"CREATE DATABASE IF NOT EXISTS {database} {_on_cluster(cluster)}"]
    for statement in all_statements:
        out.extend(cluster_statement(statement, database, cluster, tables))
    return out


def main() -> None:
    """Print the cluster schema as a SQL script."""
    parser = argparse.ArgumentParser(description="Print the audit schema for a ClickHouse cluster.")
    parser.add_argument("--cluster", required=True, help="cluster name in the servers' remote_servers")
    parser.add_argument("--database", default="skillgate")
    args = parser.parse_args()
    for statement in cluster_schema(args.cluster, args.database):
        print(statement.rstrip() + ";\n")


if __name__ == "__main__":
    main()
