"""Avro single-object encoding of skillgate events (fastavro).

Why single-object encoding: every Kafka value starts with the 2-byte marker ``C3 01`` and the
8-byte CRC-64-AVRO fingerprint of the writer schema, so any reader (another service version, the
recorder, an analyst's script using the Apache ``avro`` library) knows which schema wrote a message
without a schema registry. Readers resolve the writer schema to their own (reader) schema, which is
how added fields with defaults stay compatible in both directions.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, cast

import fastavro
import fastavro.schema

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
NAMESPACE = "skillgate.events"


class CodecError(ValueError):
    """A value that is not a skillgate event this codec can read (poison message)."""


def schema_dir() -> Path:
    """Where the ``.avsc`` files are: the repo's ``schemas/`` or the copy packed into the wheel."""
    repo = Path(__file__).resolve().parent.parent / "schemas"
    if repo.is_dir():
        return repo
    return Path(str(resources.files("skillgate") / "_schemas"))


def fingerprint(parsed_schema: Mapping[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint (8 bytes, little-endian) of a schema's parsing canonical form."""
    canonical = fastavro.schema.to_parsing_canonical_form(dict(parsed_schema))
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


class AvroCodec:
    """Encodes and decodes skillgate events.

    ``writers`` maps fingerprints to every schema version this process can read: the current ones
    from ``schemas/`` plus historical versions under ``schemas/history/`` (kept when a schema
    evolves so that events already in Kafka stay readable).
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._dir = directory or schema_dir()
        self._current: dict[str, dict[str, Any]] = {}
        self._current_fp: dict[str, bytes] = {}
        self._writers: dict[bytes, tuple[str, dict[str, Any]]] = {}
        for path in sorted(self._dir.glob(f"{NAMESPACE}.*.avsc")):
            name = path.name.removeprefix(f"{NAMESPACE}.").removesuffix(".avsc")
            parsed = cast(dict[str, Any], fastavro.schema.load_schema(str(path)))
            self._current[name] = parsed
            fp = fingerprint(parsed)
            self._current_fp[name] = fp
            self._writers[fp] = (name, parsed)
        history = self._dir / "history"
        if history.is_dir():
            for path in sorted(history.glob("*.avsc")):
                self.register_writer(json.loads(path.read_text()))

    @property
    def names(self) -> list[str]:
        """Short names (``CallSubmitted``...) of the current schemas."""
        return sorted(self._current)

    def schema(self, name: str) -> dict[str, Any]:
        """The parsed current schema for an event name."""
        return self._current[name]

    def register_writer(self, schema: Mapping[str, Any]) -> bytes:
        """Make an older (or newer) version of a schema readable; returns its fingerprint.

        The schema may reference the shared named types (``skillgate.events.Identity``...); it is
        expanded before fingerprinting, because the fingerprint on the wire is that of the full
        schema with every named type written out.
        """
        named: dict[str, Any] = {}
        for current in self._current.values():
            fastavro.schema.parse_schema(current, named_schemas=named)
        with_refs = fastavro.schema.parse_schema(dict(schema), named_schemas=dict(named))
        expanded = fastavro.schema.expand_schema(with_refs)
        parsed = cast(dict[str, Any], fastavro.schema.parse_schema(expanded))
        fp = fingerprint(parsed)
        full = str(parsed["name"])
        self._writers[fp] = (full.rsplit(".", 1)[-1], parsed)
        return fp

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Single-object encode ``record`` with the current schema ``name``."""
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(self._current_fp[name])
        fastavro.schemaless_writer(out, self._current[name], record)
        return out.getvalue()

    def encode_with(self, schema: Mapping[str, Any], record: Mapping[str, Any]) -> bytes:
        """Encode with an explicit (already registered) writer schema; for tests of evolution."""
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(fingerprint(schema))
        fastavro.schemaless_writer(out, dict(schema), record)
        return out.getvalue()

    def decode(self, data: bytes, expected: str | None = None) -> tuple[str, dict[str, Any]]:
        """Decode a single-object encoded value into (event name, record in the current schema).

        Raises :class:`CodecError` for anything that is not a known skillgate event, so consumers
        can dead-letter it instead of crashing.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"not a message value ({type(data).__name__}, e.g. a tombstone)")
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise CodecError("not Avro single-object encoded (bad marker)")
        writer = self._writers.get(data[2:HEADER_LEN])
        if writer is None:
            raise CodecError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        name, writer_schema = writer
        if expected is not None and name != expected:
            raise CodecError(f"expected {expected}, got {name}")
        reader_schema = self._current.get(name, writer_schema)
        try:
            record = fastavro.schemaless_reader(
                io.BytesIO(data[HEADER_LEN:]),
                writer_schema,
                None if reader_schema is writer_schema else reader_schema,
            )
        except Exception as exc:  # fastavro raises several types on truncated/corrupt input
            raise CodecError(f"corrupt {name} payload: {type(exc).__name__}") from exc
        if not isinstance(record, dict):
            raise CodecError(f"{name} payload is not a record")
        return name, record


@cache
def default_codec() -> AvroCodec:
    """The process-wide codec over the shipped schemas (parsed once)."""
    return AvroCodec()
