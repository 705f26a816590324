"""An example follower: keeps a copy of a replica's state in a dict by listing it, then
following its change feed (Server-Sent Events), re-listing whenever the replica says
must-refetch; prints each batch and, every so often, checks its copy against /v1/checksum's
key count.

    python3 follower.py --replica http://localhost:8091

In docker-compose.yml this is the `example-follower` service.
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deltasync_client as ds  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replica", default=os.environ.get("REPLICA_URL", "http://localhost:8091"))
    ap.add_argument("--poll", action="store_true", help="long-poll /v1/changes instead of /v1/watch")
    args = ap.parse_args(argv)
    if os.environ.get("DELTASYNC_EXAMPLE_CHECK_ARGS"):
        # For testkit's deploy test: the command line parsed; say what it would use.
        print(json.dumps(vars(args)))
        return

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    replica = ds.Replica(args.replica)
    copy = {}
    last_report = time.monotonic()
    for event in ds.follow(replica, use_sse=not args.poll, stop=lambda: bool(stopping)):
        if event.kind == "reset":
            copy = dict(event.state)
            print(f"listed {len(copy)} keys at seq {event.position.seq}", flush=True)
        else:
            event.apply(copy)
            keys = ", ".join(c["key"] for c in event.batch.changes)
            print(f"seq {event.batch.seq}: {len(event.batch.changes)} changes ({keys})", flush=True)
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            check = replica.checksum()
            if check["seq"] == event.position.seq and check["lineage"] == event.position.lineage:
                verdict = "same as the replica" if check["entries"] == len(copy) else "DIFFERS from the replica"
            else:
                verdict = f"replica at seq {check['seq']}"
            print(f"holding {len(copy)} keys at seq {event.position.seq} ({verdict})", flush=True)


if __name__ == "__main__":
    main()
