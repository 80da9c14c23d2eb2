"""How a job, its retained events, a log line and an artifact look as MongoDB documents.

A job is one bounded document:

    {_id, kind, state, lab, create_ns, seq, lease_expire_ns?,   # queryable copies
     stall_ns?,                                                # progress sweep due
     end_ns?,                                                  # ended: retention counts
     token_hash, job,                                           # snapshot (protobuf bytes)
     ring: {"<seq % retention>": {s, k, e, w}}}                 # retained events

`ring` is a fixed set of `retention` slots, each overwritten with `$set`, so the
document never grows with the job's event count and every change is a plain `$set`
(FerretDB ignores `$push` modifiers such as `$slice`). `w` is the token of the write
that stored the entry: it tells a writer, after an unordered bulk write, whether its
own conditional update is the one that landed.

The slots are bounded in bytes too: the event bodies (`e`) the ring keeps add up to at
most RING_BODY_BYTES, newest first; an older entry keeps its sequence number, key and
write token but loses its body (`trim_bodies`). One event may be 1 MiB, so 64 retained
large events would pass MongoDB's 16 MiB document limit, and from then on every
update of the job would be refused. Replays (`replayable`) start after the newest
entry without a body, so a reader sees a gap there; idempotency keys stay for every
retained entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from bson import Binary

from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, log_pb2

from ..domain.events import end_ns, stall_due_ns
from ..domain.records import JobRecord

Doc = dict[str, Any]
RingEntry = Mapping[str, Any]

# Event bodies one job document retains, at most (the newest one always). With the
# snapshot (a result or an error of 1 MiB at most; a video's texts of up to gRPC's
# 4 MiB request, as stored before CreateJob bounded them) and the ring's keys, a
# document stays under MongoDB's 16 MiB. 8 MiB keeps 64 of the longest ASCII progress
# messages (64 KiB each: 4.2 MiB), which clients read back by pages.
RING_BODY_BYTES = 8 * 1024 * 1024


def label_terms(labels: Mapping[str, str]) -> list[str]:
    """Labels as unambiguous strings (a label key may hold '.' or '$')."""
    return sorted(json.dumps([k, v], ensure_ascii=False) for k, v in labels.items())


def lease_ns(job: job_pb2.Job) -> int | None:
    if job.state == job_pb2.JOB_STATE_RUNNING and job.HasField("lease_expire_time"):
        return job.lease_expire_time.ToNanoseconds()
    return None


def snapshot_fields(job: job_pb2.Job) -> Doc:
    """The fields a change rewrites (kind, labels and create time never change); an
    ended job's end time, once (no state follows an ended one: never unset)."""
    fields: Doc = {"state": job.state, "seq": job.sequence, "job": Binary(job.SerializeToString())}
    ended = end_ns(job)
    if ended is not None:
        fields["end_ns"] = ended
    return fields


def job_document(record: JobRecord, ring: Mapping[str, RingEntry]) -> Doc:
    job = record.job
    doc: Doc = {
        "_id": job.id,
        "kind": job.kind,
        "lab": label_terms(job.labels),
        "create_ns": job.create_time.ToNanoseconds(),
        **snapshot_fields(job),
        "token_hash": Binary(record.token_hash),
        "ring": dict(ring),
    }
    lease = lease_ns(job)
    if lease is not None:
        doc["lease_expire_ns"] = lease
    stall = stall_due_ns(job)
    if stall is not None:
        doc["stall_ns"] = stall
    return doc


def ring_entry(event: event_pb2.JobEvent, token: int) -> Doc:
    return {
        "s": event.sequence,
        "k": event.idempotency_key,
        "e": Binary(event.SerializeToString()),
        "w": token,
    }


def ring_slot(sequence: int, retention: int) -> str:
    return str(sequence % max(retention, 1))


def retained(ring: Mapping[str, RingEntry] | None, retention: int) -> list[RingEntry]:
    """Ring entries oldest first: the newest run of consecutive sequence numbers,
    at most `retention` of them (stale slots left by a changed retention are skipped)."""
    if not ring:
        return []
    entries = sorted(
        (e for e in ring.values() if isinstance(e, Mapping) and "s" in e),
        key=lambda e: int(e["s"]),
    )
    tail: list[RingEntry] = []
    for entry in reversed(entries):
        if len(tail) >= retention:
            break
        if tail and int(entry["s"]) != int(tail[-1]["s"]) - 1:
            break
        tail.append(entry)
    tail.reverse()
    return tail


def replayable(ring: Mapping[str, RingEntry] | None, retention: int) -> list[RingEntry]:
    """The retained entries that still hold their event, oldest first: those after the
    newest entry whose body was dropped (`trim_bodies`)."""
    entries = retained(ring, retention)
    for i in range(len(entries) - 1, -1, -1):
        if "e" not in entries[i]:
            return entries[i + 1 :]
    return entries


def trim_bodies(ring: Doc, retention: int, budget: int = RING_BODY_BYTES) -> Doc:
    """Drops, in place, the bodies of the oldest retained entries once the newer ones
    add up to `budget` bytes (the newest is always kept), so that what stays is a run
    of the newest events; returns the slots it changed (to write)."""
    # Most rings hold small events: their bodies' sum, stale slots included, is a
    # cheap upper bound that spares the ordered pass below (about 30 µs per write).
    if sum(len(e.get("e") or b"") for e in ring.values() if isinstance(e, dict)) <= budget:
        return {}
    changed: Doc = {}
    total = 0
    kept = 0
    over = False
    for entry in reversed(retained(ring, retention)):
        body = entry.get("e")
        if not over:
            if body is not None and (not kept or total + len(body) <= budget):
                total += len(body)
                kept += 1
                continue
            over = True
        if body is None:
            continue
        slot = ring_slot(int(entry["s"]), retention)
        ring[slot] = changed[slot] = {k: v for k, v in entry.items() if k != "e"}
    return changed


def rehomed(ring: Mapping[str, RingEntry] | None, retention: int) -> Doc | None:
    """The retained entries in the slots of `retention`, when the ring was laid out for
    another retention (JOBWIRE_EVENT_RETENTION changed); None when it fits. Writing the
    next event to `seq % retention` of a ring laid out for another modulus would
    overwrite an entry still inside the window (and cut the retained run short)."""
    if not ring:
        return None
    modulus = max(retention, 1)
    if len(ring) <= modulus:
        try:  # the usual case, on every write: each entry in its slot
            if all(int(e["s"]) % modulus == int(slot) for slot, e in ring.items()):
                return None
        except (TypeError, KeyError, ValueError):
            pass  # a malformed entry: re-laid out without it
    return {ring_slot(int(e["s"]), retention): e for e in retained(ring, retention)}


def ring_for(doc: Mapping[str, Any] | None, retention: int) -> tuple[Doc, bool]:
    """A job document's ring laid out for `retention` (a copy to change), and whether it
    had to be re-laid out: then the next write sets the whole ring, not its slots."""
    ring: Doc = dict(doc.get("ring") or {}) if doc is not None else {}
    relaid = rehomed(ring, retention)
    return (ring, False) if relaid is None else (relaid, True)


def keys_of(entries: Iterable[RingEntry]) -> tuple[str, ...]:
    return tuple(str(e["k"]) for e in entries if e.get("k"))


def decode_job(doc: Mapping[str, Any]) -> job_pb2.Job:
    return job_pb2.Job.FromString(bytes(doc["job"]))


def decode_read(doc: Mapping[str, Any]) -> JobRecord:
    """The job for reading: no keys (Store.get)."""
    return JobRecord(job=decode_job(doc), token_hash=bytes(doc.get("token_hash") or b""))


def decode_record(doc: Mapping[str, Any], retention: int) -> JobRecord:
    return JobRecord(
        job=decode_job(doc),
        token_hash=bytes(doc.get("token_hash") or b""),
        recent_keys=keys_of(retained(doc.get("ring"), retention)),
    )


def decode_event(entry: RingEntry) -> event_pb2.JobEvent:
    return event_pb2.JobEvent.FromString(bytes(entry["e"]))


def log_key(job_id: str, key: str) -> str:
    """A log line's idempotency key, one field for a unique sparse index (lines without
    one are not in it): the job id's length first, so no two (job id, key) pairs meet."""
    return f"{len(job_id)}:{job_id}:{key}"


def log_document(entry: log_pb2.LogEntry, of_no_job: bool = False, key: str = "") -> Doc:
    doc: Doc = {
        "job_id": entry.job_id,
        "level": entry.level,
        "kind": entry.kind,
        "time_ns": entry.time.ToNanoseconds(),
        # When the service received it: which job of its id it was written for, when a
        # deletion cut short is finished beside a new job of that id (MongoStore._finish).
        "r": entry.record_time.ToNanoseconds(),
        "e": Binary(entry.SerializeToString()),
    }
    if of_no_job:  # a line no job deletion takes: aged out from its record time
        doc["nj"] = entry.record_time.ToNanoseconds()
    if key:
        doc["k"] = log_key(entry.job_id, key)
    return doc


def decode_log(doc: Mapping[str, Any]) -> log_pb2.LogEntry:
    return log_pb2.LogEntry.FromString(bytes(doc["e"]))


def artifact_filename(job_id: str, name: str) -> str:
    return f"{job_id}/{name}"


def artifact_metadata(artifact: artifact_pb2.Artifact) -> Doc:
    return {
        "job_id": artifact.job_id,
        "name": artifact.name,
        "content_type": artifact.content_type,
        "sha256": artifact.sha256,
        "create_ns": artifact.create_time.ToNanoseconds(),
    }


def decode_artifact(file_doc: Mapping[str, Any]) -> artifact_pb2.Artifact:
    meta = file_doc.get("metadata") or {}
    artifact = artifact_pb2.Artifact(
        job_id=str(meta.get("job_id", "")),
        name=str(meta.get("name", "")),
        content_type=str(meta.get("content_type", "")),
        size_bytes=int(file_doc.get("length", 0)),
        sha256=str(meta.get("sha256", "")),
    )
    artifact.create_time.FromNanoseconds(int(meta.get("create_ns", 0)))
    return artifact
