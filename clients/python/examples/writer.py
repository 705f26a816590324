"""An example application writer: keeps a small inventory in deltasync through the producer's
HTTP API, one transaction per tick, and reads each write back from a replica (read-your-writes
with the receipt's sequence).

    python3 writer.py --producer http://localhost:8090 --replica http://localhost:8091

In docker-compose.yml this is the `example-writer` service.
"""

import argparse
import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deltasync_client as ds  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--producer", default=os.environ.get("PRODUCER_URL", "http://localhost:8090"))
    ap.add_argument("--replica", default=os.environ.get("REPLICA_URL", "http://localhost:8091"))
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between transactions")
    ap.add_argument("--items", type=int, default=50, help="inventory items")
    ap.add_argument("--count", type=int, default=0, help="stop after this many transactions (0: run until stopped)")
    args = ap.parse_args(argv)
    if os.environ.get("DELTASYNC_EXAMPLE_CHECK_ARGS"):
        # For testkit's deploy test: the command line parsed; say what it would use.
        print(json.dumps(vars(args)))
        return

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    producer, replica = ds.Producer(args.producer), ds.Replica(args.replica)
    rng = random.Random()
    n = 0
    while not stopping and (args.count == 0 or n < args.count):
        item = f"inventory/item-{rng.randrange(args.items):03d}"
        ops = [ds.put(item, str(rng.randrange(1000))), ds.put("inventory/updated_at", str(time.time()))]
        if rng.random() < 0.1:
            ops.append(ds.delete(f"inventory/item-{rng.randrange(args.items):03d}"))
        try:
            receipt = producer.txn(ops, idempotency_key=f"{os.getpid()}-{n}")
            seen = replica.get(item, min_seq=receipt["seq"], wait="5s")
            print(f"seq {receipt['seq']}: {item} = {seen!r} (read back from the replica)", flush=True)
            n += 1
        except (ds.ApiError, OSError) as e:
            print(f"not yet: {e}", file=sys.stderr, flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
