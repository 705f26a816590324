"""End-to-end check of the Python client against real binaries (run by
testkit/tests/it/python_client.rs, which starts nats-server, `deltasync-producer serve` and
`deltasync-consumer run`).

Writes TXNS transactions through the producer's HTTP API from WRITERS threads (each over its
own keys, so the expected final state is known), follows the replica's feed with `follow`
meanwhile, and half-way has the harness stop the consumer (it prints `stop` and waits for
`stopped`), writes on until the stream's retention has pruned the consumer's position, then has
the harness start it again (`start`, answered by `started`): the consumer re-snapshots, the
follower is told to refetch, re-lists and continues. At the end the follower's copy must equal
the replica's /v1/state and the writers' model. Prints one JSON line of findings; exits
non-zero with the reason on any mismatch.
"""

import argparse
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deltasync_client as ds  # noqa: E402


def fail(msg):
    print(json.dumps({"ok": False, "error": msg}), flush=True)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--producer", required=True)
    ap.add_argument("--consumer", required=True)
    ap.add_argument("--txns", type=int, default=10_000)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--keys", type=int, default=400, help="keys per writer")
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument(
        "--while-down", type=int, default=1500, help="transactions written while the consumer is down"
    )
    args = ap.parse_args()
    deadline = time.monotonic() + args.deadline

    producer = ds.Producer(args.producer)
    replica = ds.Replica(args.consumer)

    # --- the follower
    mirror = {}
    seen = {"resets": 0, "batches": 0, "position": None}
    stop = threading.Event()
    follower_error = []

    def follower():
        try:
            for ev in ds.follow(replica, stop=stop.is_set):
                if ev.kind == "reset":
                    mirror.clear()
                    mirror.update(ev.state)
                    seen["resets"] += 1
                else:
                    ev.apply(mirror)
                    seen["batches"] += 1
                seen["position"] = ev.position
        except Exception as e:  # reported below: the follower must not die
            follower_error.append(repr(e))

    ft = threading.Thread(target=follower, daemon=True)
    ft.start()

    # --- the writers
    per_writer = args.txns // args.writers
    models = [dict() for _ in range(args.writers)]
    receipts = [[] for _ in range(args.writers)]
    errors = []
    progress = [0] * args.writers

    def writer(w):
        rng = random.Random(w)
        model = models[w]
        for i in range(per_writer):
            ops = []
            for _ in range(rng.randint(1, 3)):
                key = f"w{w}/k{rng.randrange(args.keys):04d}"
                if rng.random() < 0.2:
                    ops.append(ds.delete(key))
                else:
                    kind = rng.random()
                    if kind < 0.3:
                        ops.append(ds.put(key, os.urandom(rng.randint(0, 24))))
                    elif kind < 0.6:
                        ops.append(ds.put_json(key, {"w": w, "i": i, "s": "caf\u00e9"}))
                    else:
                        ops.append(ds.put(key, f"v{w}-{i}"))
            for attempt in range(50):
                try:
                    r = producer.txn(ops, idempotency_key=f"w{w}-t{i}")
                    break
                except ds.ApiError as e:
                    errors.append(f"writer {w}: txn {i}: {e}")
                    return
                except OSError:
                    time.sleep(0.1 * (attempt + 1))  # a retry is safe: same idempotency key
            else:
                errors.append(f"writer {w}: txn {i} never committed")
                return
            receipts[w].append(r)
            for op in ops:
                if op["op"] == "put":
                    model[op["key"]] = ds._decode_value(op)
                else:
                    model.pop(op["key"], None)
            progress[w] = i + 1

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(args.writers)]
    for t in threads:
        t.start()

    def written():
        return sum(progress)

    def wait_written(n, what):
        while written() < n:
            if errors:
                fail("; ".join(errors))
            if time.monotonic() > deadline:
                fail(f"the writers did not reach {n} transactions ({what}) in time: {progress}")
            time.sleep(0.01)

    def harness(say, expect):
        print(say, flush=True)
        if sys.stdin.readline().strip() != expect:
            fail(f"the harness did not answer {expect!r} to {say!r}")

    wait_written(args.txns // 2, "half-way")
    # Read-your-writes: a key only this thread writes, read at the receipt's sequence.
    token = f"written at {time.time()}"
    ryw = producer.put("ryw/check", token)
    got = replica.get("ryw/check", min_seq=ryw["seq"], wait="10s")
    if got != token.encode():
        fail(f"read-your-writes: ryw/check is {got!r} at seq >= {ryw['seq']}, wrote {token!r}")
    harness("stop", "stopped")
    wait_written(written() + args.while_down, "while the consumer is down")
    harness("start", "started")

    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            fail(f"a writer did not finish in time (progress {progress})")
    if errors:
        fail("; ".join(errors))

    last_seq = max(r["seq"] for rs in receipts for r in rs)
    lineage = receipts[0][-1]["lineage"]
    # The follower catches up with the last receipt.
    while True:
        pos = seen["position"]
        if follower_error:
            fail(f"the follower died: {follower_error[0]}")
        if pos is not None and pos.lineage == lineage and pos.seq >= last_seq:
            break
        if time.monotonic() > deadline:
            fail(f"the follower stopped at {pos} before seq {last_seq}")
        time.sleep(0.05)
    stop.set()

    expected = {"ryw/check": token.encode()}
    for m in models:
        expected.update(m)
    state, position = replica.state(min_seq=last_seq, wait="30s")
    snapshot_of_mirror = dict(mirror)
    if seen["position"].seq != position.seq:
        # The feed may be ahead of nothing: nothing is written after last_seq.
        fail(f"the follower is at {seen['position']}, the replica's state at {position}")
    if snapshot_of_mirror != state:
        diff = sorted(set(snapshot_of_mirror.items()) ^ set(state.items()))[:5]
        fail(f"the follower's copy differs from /v1/state at seq {position.seq}: {diff}")
    if state != expected:
        diff = sorted(set(expected.items()) ^ set(state.items()))[:5]
        fail(f"/v1/state differs from what the writers wrote: {diff}")
    check = replica.checksum()
    if check["seq"] != position.seq or check["digest"] != position.digest:
        fail(f"/v1/checksum {check} disagrees with /v1/state's position {position}")

    print(
        json.dumps(
            {
                "ok": True,
                "txns": sum(len(r) for r in receipts),
                "last_seq": last_seq,
                "keys": len(state),
                "resets": seen["resets"],
                "batches": seen["batches"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
