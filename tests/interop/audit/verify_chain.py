#!/usr/bin/env python3
"""Recompute audit-svc's hash chain from its SQLite database, independently of the Rust
code, following crates/audit-svc/docs/chain.md. Python standard library only.

    verify_chain.py <audit.db>

Prints one JSON object: {"ok", "records", "head_seq", "head_hash", "checkpoints",
"pruned_runs", "problem", "first_bad_seq"}; exits 0 when the chain verifies, 3 when it does not.
Checkpoint signatures are not checked here (no Ed25519 in the standard library); the
checkpoints' head hashes are. Gaps left by retention are accepted only where a prune
record (audit_prunes) starts, whose run carries a signature from this installation's
origin; the running hash then continues from the hash the record names, so a row deleted
or edited elsewhere is still caught. The prune runs' signatures are not checked here
either (VerifyChain checks them): a prune record forged by someone holding the database
is caught by VerifyChain, not by this script.
"""
import hashlib
import ipaddress
import json
import sqlite3
import struct
import sys
import uuid


def field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ip_text(s):
    if s is None:
        return ""
    ip = ipaddress.ip_address(s)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return "::ffff:" + str(ip.ipv4_mapped)
    return str(ip)


def canonical(seq, r) -> bytes:
    details = json.loads(r["details"])
    parts = [
        "sec-audit-chain-v1",
        str(seq),
        str(uuid.UUID(r["id"])),
        r["event_type"],
        str(r["ts_us"]),
        str(r["received_us"]),
        r["service"],
        r["actor_kind"],
        r["actor_id"],
        r["subject"],
        ip_text(r["ip_address"]),
        r["outcome"],
        r["severity"],
        str(len(details)),
    ]
    for k in sorted(details, key=lambda k: k.encode()):
        parts += [k, details[k]]
    parts.append(r["trace_id"])
    return b"".join(field(p.encode()) for p in parts)


def main(path):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    db.row_factory = sqlite3.Row
    # One read transaction: head, checkpoints and rows from the same snapshot, even while
    # audit-svc keeps storing events.
    db.execute("BEGIN")
    head_seq, head_hash = db.execute("SELECT seq, hash FROM audit_chain_head").fetchone()
    checkpoints = {
        s: h for s, h in db.execute("SELECT seq, head_hash FROM audit_checkpoints")
    }
    origin = None
    if head_seq:
        row = db.execute("SELECT origin FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        origin = row[0] if row else None
    prunes = {
        f: (l, bytes(h))
        for f, l, h in db.execute(
            "SELECT p.first_seq, p.last_seq, p.last_hash FROM audit_prunes p"
            " JOIN audit_prune_runs r ON r.id = p.run_id"
            " WHERE r.signature LIKE 'sec:v%' AND r.origin = ?", (origin,))
    }
    prev = bytes(32)
    expected = 1
    out = {"ok": True, "records": 0, "head_seq": head_seq, "head_hash": bytes(head_hash).hex(),
           "checkpoints": 0, "pruned_runs": 0, "problem": None, "first_bad_seq": None}

    def fail(problem, seq):
        out.update(ok=False, problem=problem, first_bad_seq=seq)
        print(json.dumps(out))
        sys.exit(3)

    for r in db.execute("SELECT * FROM security_events WHERE seq IS NOT NULL ORDER BY seq"):
        if r["seq"] > head_seq:
            fail("inserted", r["seq"])
        while r["seq"] > expected and expected in prunes:
            # A gap retention recorded: continue from the hash at its end.
            last, prev = prunes[expected]
            out["pruned_runs"] += 1
            expected = last + 1
        if r["seq"] < expected:
            fail("inserted", r["seq"])
        if r["seq"] != expected:
            fail("missing", expected)
        h = hashlib.sha256(prev + canonical(r["seq"], r)).digest()
        if h != bytes(r["hash"]):
            fail("modified", r["seq"])
        if r["seq"] in checkpoints:
            out["checkpoints"] += 1
            if bytes(checkpoints[r["seq"]]) != h:
                fail("checkpoint_mismatch", r["seq"])
        prev = h
        expected += 1
        out["records"] += 1
    while expected <= head_seq and expected in prunes:
        last, prev = prunes[expected]
        out["pruned_runs"] += 1
        expected = last + 1
    if expected - 1 != head_seq:
        fail("missing", expected)
    if head_seq and prev != bytes(head_hash):
        fail("checkpoint_mismatch", head_seq)
    if db.execute("SELECT 1 FROM security_events WHERE seq IS NULL").fetchone():
        fail("inserted", 0)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
