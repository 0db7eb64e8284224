"""The hash chains, without a database: how a record is hashed, and why a chain or an anchor does not hold.

Each record's ``record_hash`` is sha256(prev_hash + canonical JSON of every other column); the first
record's ``prev_hash`` is ``GENESIS_HASH``. ``head()`` text (an anchor) names the last record of each chain.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import AuditError
from .records import CHAINS

GENESIS_HASH = "0" * 64
ANCHOR_PREFIX = "cxr-triage-audit-head"


def normalize(kinds: dict[str, str], row: dict[str, Any]) -> dict[str, Any]:
    """Values as the database will store and return them, so the hash of a row read back matches."""
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        value = row.get(name)
        if kind == "text":
            out[name] = "" if value is None else str(value)
        elif kind == "bool":
            out[name] = int(bool(value))
        elif value is None:
            out[name] = None
        elif kind == "int":
            out[name] = int(value)
        else:
            out[name] = float(value)
            if math.isnan(out[name]):
                raise AuditError(f"audit record: {name} is NaN, which the audit store cannot hold. "
                                 "Fix: record None instead")
    return out


def canonical_json(row: dict[str, Any]) -> str:
    """Sorted keys, no spaces, floats as repr: the same row always gives the same text."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256 hex of ``prev_hash`` + canonical JSON of ``row`` without its ``record_hash``."""
    body = {k: v for k, v in row.items() if k != "record_hash"}
    return hashlib.sha256((prev_hash + canonical_json(body)).encode("utf-8")).hexdigest()


def chain_rows(kinds: dict[str, str], rows: Sequence[dict[str, Any]], head: dict[str, Any], clock: Callable[[], str],
               software_version: str) -> list[dict[str, Any]]:
    """``rows`` as the records that follow ``head`` ({"last_id", "hash", "count"}): id, ``clock()`` time, hashes."""
    prev_hash, out = head["hash"], []
    for next_id, row in enumerate(rows, start=head["last_id"] + 1):
        full = normalize(kinds, {**row, "id": next_id, "created_at": clock(), "software_version": software_version,
                                 "prev_hash": prev_hash})
        full["record_hash"] = prev_hash = record_hash(prev_hash, full)
        out.append(full)
    return out


def parse_anchor(text: str) -> dict[str, tuple[int, str]]:
    """``head()`` text -> {table: (last id, record_hash)}; ValueError naming the problem when malformed."""
    words = text.split()
    if not words or words[0] != ANCHOR_PREFIX:
        raise ValueError(f"anchor {text.strip()[:80]!r} does not start with {ANCHOR_PREFIX}. "
                         "Fix: pass a line printed by cxr-triage audit head")
    heads: dict[str, tuple[int, str]] = {}
    for word in words[1:]:
        name, _, value = word.partition("=")
        if name in CHAINS:
            last_id, _, digest = value.partition(":")
            if not last_id.isdigit() or len(digest) != 64:
                raise ValueError(f"anchor: {word!r} is not {name}=ID:SHA256. Fix: copy the whole line of audit head")
            heads[name] = (int(last_id), digest)
    if set(heads) != set(CHAINS):
        raise ValueError(f"anchor {text.strip()[:80]!r} lacks decisions= or reviews=. Fix: copy the whole line")
    return heads


def link_problem(prev_id: int, prev_hash: str, row: dict[str, Any]) -> tuple[int, str] | None:
    """Why ``row`` does not follow the record (prev_id, prev_hash), as (bad id, why); None when it does."""
    if row["id"] != prev_id + 1:
        missing = f"{prev_id + 1}" if row["id"] == prev_id + 2 else f"{prev_id + 1}..{row['id'] - 1}"
        return prev_id + 1, f"missing (deleted): record {row['id']} follows record {prev_id}; id(s) {missing} are gone"
    if row["prev_hash"] != prev_hash:
        return row["id"], ("its prev_hash does not match the previous record's hash "
                           "(the record before it was edited and rehashed, or this one was replaced or inserted)")
    if record_hash(row["prev_hash"], row) != row["record_hash"]:
        return row["id"], "its contents do not match its record_hash (the record was edited)"
    return None


def head_problem(head: dict[str, Any], last_id: int, last_hash: str, count: int) -> tuple[int, str] | None:
    """Why an intact chain ending at (last_id, last_hash) with ``count`` records disagrees with the head."""
    recorded = f"the chain head records {head['count']} records ending at id {head['last_id']}"
    if (head["last_id"], head["hash"], head["count"]) == (last_id, last_hash, count):
        return None
    if last_id < head["last_id"] or count < head["count"]:
        return last_id + 1, f"missing (truncated): {recorded}, the table ends at id {last_id}"
    if last_id > head["last_id"] or count > head["count"]:
        return head["last_id"] + 1, f"inserted after the chain head: {recorded}, the table ends at id {last_id}"
    return last_id, "its record_hash differs from the chain head's (the last record was edited and rehashed)"


def anchor_problem(last_id: int, digest: str, found: dict[str, Any] | None) -> tuple[int, str] | None:
    """Why a chain's anchored record (last_id, digest) is not on the chain, given the row now at that id (or None)."""
    if last_id == 0:
        return None
    if found is None:
        return last_id, "missing: an anchored head names this record, the table no longer has it"
    if found["record_hash"] != digest:
        return last_id, ("its record_hash differs from the anchored head's: the chain was rewritten at or before this "
                         "record since the head was anchored")
    return None
