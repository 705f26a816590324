#!/usr/bin/env python3
"""Generates digest_v1.json, the test vectors of the version-1 state digest.

An independent reference: it implements the construction documented in
core/src/digest.rs from that text alone, with Python's hashlib and integers,
sharing no code with the Rust implementation.

    entry_hash(k, v) = SHA-256("deltasync.entry.v1" || u32_be(len k) || k || u64_be(len v) || v)
    bucket(k)        = FNV-1a-64(k) >> 52
    bucket_digest(b) = sum of entry_hash over the entries of bucket b, mod 2^256
    state_digest     = sum of all bucket digests, mod 2^256
    (a hash is read as a little-endian 256-bit integer)

Run from anywhere: python3 core/tests/vectors/gen_digest_v1.py
It rewrites digest_v1.json next to itself; the output is deterministic.
"""

import hashlib
import json
import struct
from pathlib import Path

DOMAIN = b"deltasync.entry.v1"
MOD = 1 << 256
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def entry_hash(key: bytes, value: bytes) -> bytes:
    data = DOMAIN + struct.pack(">I", len(key)) + key + struct.pack(">Q", len(value)) + value
    return hashlib.sha256(data).digest()


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) % (1 << 64)
    return h


def bucket(key: bytes) -> int:
    return fnv1a64(key) >> 52


def as_int(h: bytes) -> int:
    return int.from_bytes(h, "little")


def to_hex(n: int) -> str:
    return n.to_bytes(32, "little").hex()


def limbs(n: int) -> list:
    return [(n >> (64 * i)) & ((1 << 64) - 1) for i in range(4)]


def carries_out_of_every_limb(a: int, b: int) -> bool:
    """Whether a + b, added limb by limb from the low end, carries out of all four limbs."""
    carry = 0
    for x, y in zip(limbs(a), limbs(b)):
        s = x + y + carry
        carry = s >> 64
        if not carry:
            return False
    return True


def case(name: str, entries: list) -> dict:
    """entries: list of (key: str, value: bytes)."""
    keys = [k for k, _ in entries]
    assert len(set(keys)) == len(keys), f"{name}: keys must be distinct"
    hashes = [entry_hash(k.encode("utf-8"), v) for k, v in entries]
    buckets = [bucket(k.encode("utf-8")) for k, _ in entries]
    sums = {}
    for b, h in zip(buckets, hashes):
        sums[b] = (sums.get(b, 0) + as_int(h)) % MOD
    total = sum(sums.values()) % MOD
    return {
        "name": name,
        "entries": [[k, v.hex()] for k, v in entries],
        "entry_hashes": [h.hex() for h in hashes],
        "buckets": buckets,
        "bucket_digests": {str(b): to_hex(d) for b, d in sorted(sums.items())},
        "state_digest": to_hex(total),
    }


def same_bucket_pair(prefix: str) -> tuple:
    """The first two keys `prefix{i}` that share a bucket."""
    seen = {}
    i = 0
    while True:
        k = f"{prefix}{i}"
        b = bucket(k.encode())
        if b in seen:
            return seen[b], k
        seen[b] = k
        i += 1


def carrying_pair() -> tuple:
    """Two keys in one bucket (empty values) whose hashes carry out of every 64-bit limb when
    added, so both the bucket sum and the state sum wrap around 2^256."""
    by_bucket = {}
    i = 0
    while True:
        k = f"carry-{i}"
        h = as_int(entry_hash(k.encode(), b""))
        b = bucket(k.encode())
        for other, oh in by_bucket.get(b, []):
            if carries_out_of_every_limb(oh, h):
                return other, k
        by_bucket.setdefault(b, []).append((k, h))
        i += 1


def main() -> None:
    a, b = same_bucket_pair("k")
    c1, c2 = carrying_pair()
    cases = [
        case("empty state", []),
        case("one entry with an empty key and an empty value", [("", b"")]),
        case("ascii entries", [("a", b"1"), ("b", b"2"), ("hello", b"world")]),
        case(
            "length prefixes keep (ab, c) and (a, bc) apart",
            [("ab", b"c"), ("a", b"bc")],
        ),
        case("utf-8 multibyte key", [("clé-ключ-鍵-🔑", b"value")]),
        case("binary value with every byte", [("bin", bytes(range(256)))]),
        case("two entries in the same bucket", [(a, b"first"), (b, b"second")]),
        case("sums carry across every 64-bit limb and wrap mod 2^256", [(c1, b""), (c2, b"")]),
        case(
            "sixty-four ascii entries",
            [(f"key-{i:04}", f"value-{i}".encode()) for i in range(64)],
        ),
    ]
    # The cases must show what their names claim.
    assert cases[0]["state_digest"] == "00" * 32
    assert len(set(cases[6]["buckets"])) == 1
    h1, h2 = (as_int(bytes.fromhex(h)) for h in cases[7]["entry_hashes"])
    assert len(set(cases[7]["buckets"])) == 1 and h1 + h2 >= MOD
    out = Path(__file__).with_name("digest_v1.json")
    out.write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
