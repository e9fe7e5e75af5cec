"""Tamper evidence for the raw event log: per-partition hash chains and signed checkpoints.

What it proves: for every Kafka (topic, partition), the recorder hashes each ``events`` row it
stores (a SHA-256 over every column but ``inserted_at``) and folds the digests, in offset order,
into a chain ``h = sha256(h_prev || digest)``. After each batch it writes one checkpoint per
partition: the offsets, event ids and digests covered, the chain head before and after, signed
with HMAC-SHA256 under a key the store does not hold. :func:`verify` then tells apart

* a checkpoint that was forged or altered (bad signature, digests that do not fold into the
  signed head), or removed (the next checkpoint's ``prev_chain`` does not link);
* an ``events`` row deleted (a sealed offset without its row), altered (a row whose digest
  differs from the sealed one) or inserted out of band (a row at an offset no checkpoint seals,
  or a second row at a sealed offset).

What it cannot prove alone: that the newest checkpoints were not removed together with their
rows (truncating the tail). Each checkpoint's head is therefore also written to the recorder's
JSON log, an external anchor to compare with.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.recorder.config import RecorderSettings
from services.recorder.handlers import EVENT_COLUMNS

#: Label that derives the checkpoint key from the fingerprint key (domain separation: the same
#: secret never signs two kinds of things).
KEY_LABEL = b"skillgate audit checkpoint v1"
#: Columns whose values the row digest covers, in this order (``time`` as integer microseconds).
DIGEST_COLUMNS: tuple[str, ...] = EVENT_COLUMNS  # every column the recorder writes
#: SELECT list reading the digest columns back in :data:`DIGEST_COLUMNS` order.
DIGEST_SELECT = ", ".join("toUnixTimestamp64Micro(time)" if c == "time" else c for c in DIGEST_COLUMNS)


def derive_key(fingerprint_key: bytes) -> bytes:
    """The checkpoint key derived from the fingerprint key (used when none is configured)."""
    return hmac.new(fingerprint_key, KEY_LABEL, hashlib.sha256).digest()


def checkpoint_key(settings: RecorderSettings, fingerprint_key: bytes) -> bytes:
    """The key that signs checkpoints: ``SKILLGATE_RECORDER_CHECKPOINT_KEY``, else derived.

    Derived from the fingerprint key with a fixed label, so a default install needs no second
    secret and the two uses never share a key.
    """
    if settings.checkpoint_key is not None and settings.checkpoint_key.get_secret_value():
        return settings.checkpoint_key.get_secret_value().encode()
    return derive_key(fingerprint_key)


def key_id(key: bytes) -> str:
    """A short public name of a key, so a report says which key signed (never the key)."""
    return hashlib.sha256(b"key-id:" + key).hexdigest()[:16]


def row_digest(row: Sequence[Any]) -> str:
    """SHA-256 (hex) of one ``events`` row given in :data:`DIGEST_COLUMNS` order."""
    values = list(row)
    values[10] = [str(g) for g in values[10] or []]
    return hashlib.sha256(orjson.dumps(values)).hexdigest()


def fold(prev_chain: str, digests: Iterable[str]) -> str:
    """The chain head after folding ``digests`` into ``prev_chain``."""
    head = bytes.fromhex(prev_chain) if prev_chain else b""
    for digest in digests:
        head = hashlib.sha256(head + bytes.fromhex(digest)).digest()
    return head.hex()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signed checkpoint (a row of ``audit_checkpoints``)."""

    topic: str
    partition: int
    offsets: tuple[int, ...]
    event_ids: tuple[str, ...]
    digests: tuple[str, ...]
    prev_chain: str
    chain: str
    key_id: str = ""
    signature: str = ""

    @property
    def first_offset(self) -> int:
        """Lowest offset sealed."""
        return self.offsets[0]

    @property
    def last_offset(self) -> int:
        """Highest offset sealed."""
        return self.offsets[-1]

    def signed_bytes(self) -> bytes:
        """What the signature covers; the digests are bound through ``chain``."""
        return orjson.dumps(
            [self.topic, self.partition, self.first_offset, self.last_offset, len(self.offsets),
             self.prev_chain, self.chain]
        )  # fmt: skip

    def sign(self, key: bytes) -> Checkpoint:
        """This checkpoint with its key id and HMAC signature."""
        sig = hmac.new(key, self.signed_bytes(), hashlib.sha256).hexdigest()
        return Checkpoint(
            self.topic, self.partition, self.offsets, self.event_ids, self.digests,
            self.prev_chain, self.chain, key_id(key), sig,
        )  # fmt: skip

    def signature_ok(self, key: bytes) -> bool:
        """True when the signature is this key's over these fields."""
        expected = hmac.new(key, self.signed_bytes(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.signature)

    def row(self, created_us: int) -> list[Any]:
        """The ``audit_checkpoints`` row (columns of :data:`CHECKPOINT_COLUMNS`)."""
        return [
            self.topic, self.partition, self.first_offset, self.last_offset, len(self.offsets),
            list(self.offsets), list(self.event_ids), list(self.digests), self.prev_chain,
            self.chain, self.key_id, self.signature, created_us,
        ]  # fmt: skip


CHECKPOINT_COLUMNS: tuple[str, ...] = (
    "topic", "partition", "first_offset", "last_offset", "row_count", "offsets", "event_ids",
    "digests", "prev_chain", "chain", "key_id", "signature", "created_at",
)  # fmt: skip


def seal(
    rows: Sequence[Sequence[Any]],
    heads: Mapping[tuple[str, int], tuple[str, int]],
    key: bytes,
) -> list[Checkpoint]:
    """Signed checkpoints for stored ``events`` rows (in :data:`DIGEST_COLUMNS` order).

    ``heads`` maps (topic, partition) to the (chain, last offset) of its newest checkpoint.
    Rows at or below a partition's sealed offset are already covered (a redelivered batch)
    and are left out, so sealing the same batch twice adds nothing.
    """
    by_partition: dict[tuple[str, int], list[Sequence[Any]]] = {}
    for row in rows:
        by_partition.setdefault((str(row[1]), int(row[14])), []).append(row)
    out: list[Checkpoint] = []
    for (topic, partition), members in sorted(by_partition.items()):
        chain, sealed = heads.get((topic, partition), ("", -1))
        fresh = sorted((r for r in members if int(r[15]) > sealed), key=lambda r: int(r[15]))
        if not fresh:
            continue
        digests = tuple(row_digest(r) for r in fresh)
        out.append(
            Checkpoint(
                topic,
                partition,
                tuple(int(r[15]) for r in fresh),
                tuple(str(r[0]) for r in fresh),
                digests,
                chain,
                fold(chain, digests),
            ).sign(key)
        )
    return out


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` when nothing."""

    checkpoints: int = 0
    rows_checked: int = 0
    rows_sealed: int = 0
    deleted: list[dict[str, Any]] = field(default_factory=list)
    altered: list[dict[str, Any]] = field(default_factory=list)
    inserted: list[dict[str, Any]] = field(default_factory=list)
    broken_checkpoints: list[dict[str, Any]] = field(default_factory=list)
    unsealed: int = 0
    expired: int = 0
    legacy: int = 0

    @property
    def ok(self) -> bool:
        """True when no row or checkpoint was tampered with."""
        return not (self.deleted or self.altered or self.inserted or self.broken_checkpoints)

    def document(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "ok": self.ok,
            "checkpoints": self.checkpoints,
            "rows_checked": self.rows_checked,
            "rows_sealed": self.rows_sealed,
            "unsealed_recent_rows": self.unsealed,
            "expired_rows": self.expired,
            "rows_before_sealing": self.legacy,
            "deleted": self.deleted,
            "altered": self.altered,
            "inserted": self.inserted,
            "broken_checkpoints": self.broken_checkpoints,
        }


def verify(
    checkpoints: Sequence[Checkpoint],
    created_us: Sequence[int],
    rows: Iterable[tuple[Sequence[Any], int]],
    key: bytes,
    *,
    recent_before_us: int,
    expired_before_us: int,
) -> VerifyReport:
    """Compare stored rows with the signed checkpoints.

    ``checkpoints`` (with their ``created_us``) in any order; ``rows`` yields each ``events``
    row in :data:`DIGEST_COLUMNS` order with its ``inserted_at`` in microseconds. Rows inserted
    after ``recent_before_us`` beyond the last checkpoint of their partition are counted as
    ``unsealed`` (the recorder seals right after inserting, so only a batch in flight is
    there); a sealed row missing from a checkpoint created before ``expired_before_us`` was
    removed by retention, not by hand.
    """
    report = VerifyReport(checkpoints=len(checkpoints))
    expected: dict[tuple[str, int, int], tuple[str, str, int]] = {}
    heads: dict[tuple[str, int], int] = {}
    order = sorted(range(len(checkpoints)), key=lambda i: (checkpoints[i].topic, checkpoints[i].partition,
                                                            checkpoints[i].first_offset))  # fmt: skip
    previous: dict[tuple[str, int], Checkpoint] = {}
    for i in order:
        cp = checkpoints[i]
        where = {"topic": cp.topic, "partition": cp.partition, "first_offset": cp.first_offset,
                 "last_offset": cp.last_offset}  # fmt: skip
        part = (cp.topic, cp.partition)
        if not cp.signature_ok(key):
            report.broken_checkpoints.append(
                {**where, "problem": "signature does not match (forged or altered)"}
            )
            continue
        if fold(cp.prev_chain, cp.digests) != cp.chain:
            report.broken_checkpoints.append(
                {**where, "problem": "digests do not fold into the signed chain"}
            )
            continue
        before = previous.get(part)
        if before is None and cp.prev_chain:
            if created_us[i] >= expired_before_us:
                report.broken_checkpoints.append(
                    {**where, "problem": "links to a checkpoint that is missing (removed?)"}
                )
        elif before is not None and cp.prev_chain != before.chain:
            report.broken_checkpoints.append(
                {**where, "problem": "does not link to the previous checkpoint (one removed or replaced?)"}
            )
        previous[part] = cp
        heads[part] = max(heads.get(part, -1), cp.last_offset)
        for offset, event_id, digest in zip(cp.offsets, cp.event_ids, cp.digests, strict=True):
            expected[(cp.topic, cp.partition, offset)] = (event_id, digest, created_us[i])
    report.rows_sealed = len(expected)
    # Rows stored before the first checkpoint (a store upgraded to migration 0003) were never
    # sealed: counted apart. inserted_at is itself a column, so this trusts it for those rows.
    sealing_began = min(created_us, default=None)
    seen: set[tuple[str, int, int]] = set()
    for row, inserted_us in rows:
        report.rows_checked += 1
        where_key = (str(row[1]), int(row[14]), int(row[15]))
        info = {"event_id": row[0], "call_id": row[3], "topic": row[1], "partition": row[14],
                "offset": row[15], "event_type": row[2]}  # fmt: skip
        sealed = expected.get(where_key)
        if sealed is None:
            if sealing_began is None or inserted_us < sealing_began - 60_000_000:
                report.legacy += 1
            elif where_key[2] > heads.get(where_key[:2], -1) and inserted_us >= recent_before_us:
                report.unsealed += 1
            else:
                report.inserted.append({**info, "problem": "row no checkpoint seals (inserted out of band)"})
            continue
        if where_key in seen:
            report.inserted.append(
                {**info, "problem": "second row at a sealed offset (inserted out of band)"}
            )
            continue
        seen.add(where_key)
        if row_digest(row) != sealed[1] or str(row[0]) != sealed[0]:
            report.altered.append({**info, "problem": "row differs from the sealed digest (altered)"})
    for where_key, (event_id, _digest, created) in sorted(expected.items()):
        if where_key in seen:
            continue
        if created < expired_before_us:
            report.expired += 1
            continue
        report.deleted.append(
            {"event_id": event_id, "topic": where_key[0], "partition": where_key[1], "offset": where_key[2],
             "problem": "sealed row is missing (deleted)"}
        )  # fmt: skip
    return report
