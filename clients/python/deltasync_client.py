"""A small client for deltasync's HTTP APIs: write through a producer, read and follow a replica.

Standard library only (Python 3.9+), one file: copy it into a project or `pip install
clients/python`. The wire formats are in docs/openapi/producer.yaml and consumer.yaml.

Writing::

    p = Producer("http://localhost:8080")
    receipt = p.txn([put("order/1", "open"), delete("order/0")])
    receipt["seq"]          # the sequence a replica reaches with it

Reading your own write::

    r = Replica("http://localhost:8081")
    r.get("order/1", min_seq=receipt["seq"])         # b"open", once the replica applied it

Following (list, then watch; a reset re-lists)::

    for event in follow(r):
        if event.kind == "reset":
            mirror = dict(event.state)
        else:
            event.apply(mirror)

Values are bytes, exactly as stored. On the wire (the line format of `deltasync-producer
ingest` and the replica's `/v1/state`) a value is either `"value": <any JSON>`, stored as its
compact JSON text, or `"value_b64": <base64>`, stored as the decoded bytes. `put` sends bytes
or text (as UTF-8) as `value_b64`, so what is stored is exactly what was given; `put_json`
sends a JSON document as `value`. Reads return the exact stored bytes either way (the JSON
text of a `value` is taken from the line as the server wrote it, not re-serialized);
`json.loads` them for documents.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

__all__ = [
    "ApiError",
    "MustRefetch",
    "Position",
    "Producer",
    "Replica",
    "Batch",
    "Event",
    "put",
    "put_json",
    "delete",
    "follow",
]

Value = Union[bytes, str]


class ApiError(Exception):
    """An HTTP answer other than success: `status`, and the JSON body when there is one."""

    def __init__(self, method: str, url: str, status: int, body: bytes):
        self.method = method
        self.url = url
        self.status = status
        self.raw = body
        try:
            self.body = json.loads(body) if body else None
        except ValueError:
            self.body = None
        text = body.decode("utf-8", "replace").strip()
        super().__init__(f"{method} {url}: HTTP {status}: {text}")


class MustRefetch(Exception):
    """The replica cannot continue the caller's feed (it re-snapshotted, the lineage changed,
    or the position fell out of its feed window): re-read the state and continue after it."""

    def __init__(self, body: Mapping):
        self.seq = body.get("seq")
        self.lineage = body.get("lineage")
        super().__init__(f"must refetch (replica at seq {self.seq}, lineage {self.lineage})")


@dataclass(frozen=True)
class Position:
    """Where a read was taken: the envelope sequence, lineage and state digest."""

    seq: int
    lineage: str
    digest: Optional[str] = None

    @staticmethod
    def from_headers(headers) -> "Position":
        seq = headers.get("Deltasync-Seq")
        if seq is None:
            raise ValueError("the answer names no position (no Deltasync-Seq header)")
        return Position(int(seq), headers.get("Deltasync-Lineage", ""), headers.get("Deltasync-Digest"))


def _encode_value(value: Value) -> Dict[str, str]:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return {"value_b64": base64.b64encode(bytes(value)).decode("ascii")}


def _decode_value(entry: Mapping) -> bytes:
    """The stored bytes of a parsed entry or change (see `_parse_line` for `value`)."""
    if "value_b64" in entry:
        return base64.b64decode(entry["value_b64"], validate=True)
    raw = entry.get("value_raw")
    if raw is not None:
        return raw.encode("utf-8")
    # Built in Python rather than read from the wire: its compact JSON text.
    return json.dumps(entry["value"], separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def put(key: str, value: Value) -> Dict[str, str]:
    """A put of `value` (bytes, or text stored as its UTF-8) at `key`, stored exactly."""
    return {"op": "put", "key": key, **_encode_value(value)}


def put_json(key: str, document) -> Dict:
    """A put of a JSON document at `key`, stored as its compact JSON text."""
    return {"op": "put", "key": key, "value": document}


def delete(key: str) -> Dict[str, str]:
    """A delete of `key`, in the ingest line format."""
    return {"op": "del", "key": key}


_DECODER = json.JSONDecoder()
_WS = " \t\r\n"


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _parse_value(s: str, i: int):
    """Parses the JSON value at `s[i:]`: (value, end). Objects keep each field's raw text
    under `<name>_raw` for `value` fields, recursively (arrays of objects included)."""
    i = _skip(s, i)
    if s.startswith("{", i):
        return _parse_object(s, i)
    if s.startswith("[", i):
        items, i = [], _skip(s, i + 1)
        if s.startswith("]", i):
            return items, i + 1
        while True:
            v, i = _parse_value(s, i)
            items.append(v)
            i = _skip(s, i)
            if s.startswith(",", i):
                i += 1
            elif s.startswith("]", i):
                return items, i + 1
            else:
                raise ValueError(f"expected , or ] at {i}: {s[:80]!r}")
    return _DECODER.raw_decode(s, i)


def _parse_object(s: str, i: int):
    obj, i = {}, _skip(s, i + 1)
    if s.startswith("}", i):
        return obj, i + 1
    while True:
        name, i = _DECODER.raw_decode(s, _skip(s, i))
        i = _skip(s, i)
        if not s.startswith(":", i):
            raise ValueError(f"expected : at {i}: {s[:80]!r}")
        start = _skip(s, i + 1)
        if name == "value":
            # The stored bytes are the value's text as written: keep it.
            obj["value"], i = _DECODER.raw_decode(s, start)
            obj["value_raw"] = s[start:i]
        else:
            obj[name], i = _parse_value(s, start)
        i = _skip(s, i)
        if s.startswith(",", i):
            i += 1
        elif s.startswith("}", i):
            return obj, i + 1
        else:
            raise ValueError(f"expected , or }} at {i}: {s[:80]!r}")


def _parse_line(line) -> dict:
    """One NDJSON line from the server, with the raw text of every `value` kept."""
    text = line.decode("utf-8") if isinstance(line, (bytes, bytearray)) else line
    obj, end = _parse_value(text, 0)
    if _skip(text, end) != len(text):
        raise ValueError(f"trailing data after the JSON object: {text[:80]!r}")
    return obj


def _ndjson(lines: Iterable[Mapping]) -> bytes:
    return b"".join(
        json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n" for line in lines
    )


class _Http:
    def __init__(self, url: str, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Tuple[int, Mapping[str, str], bytes]:
        url = self.url + path
        req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            raise ApiError(method, url, e.code, e.read()) from None


def _query(**params) -> str:
    pairs = [(k, str(v)) for k, v in params.items() if v is not None]
    return ("?" + urllib.parse.urlencode(pairs)) if pairs else ""


class Producer:
    """A `deltasync-producer serve` endpoint. Every call returns once the change is durable
    in the stream, with its receipt: `seq`, `first_seq`, `lineage`, `digest`, `changes`…"""

    def __init__(self, url: str, timeout: float = 60.0):
        self._http = _Http(url, timeout)

    def _send(self, method: str, path: str, body: bytes, content_type: str, idempotency_key: Optional[str]) -> dict:
        headers = {"Content-Type": content_type}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        _, _, data = self._http.request(method, path, body, headers)
        return json.loads(data)

    def txn(self, ops: List[Mapping], if_seq: Optional[int] = None, idempotency_key: Optional[str] = None) -> dict:
        """Commits `ops` (from `put`/`delete`) as one atomic transaction. With `if_seq`, only if
        the producer's head is still that sequence (else ApiError 409). A retry with the same
        `idempotency_key` returns the first receipt and commits nothing new."""
        body: Dict = {"txn": list(ops)}
        if if_seq is not None:
            body["if_seq"] = if_seq
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return self._send("POST", "/v1/txn", data, "application/json", idempotency_key)

    def put(self, key: str, value: Value, **kw) -> dict:
        return self.txn([put(key, value)], **kw)

    def put_json(self, key: str, document, **kw) -> dict:
        return self.txn([put_json(key, document)], **kw)

    def delete(self, key: str, **kw) -> dict:
        return self.txn([delete(key)], **kw)

    def changes(self, lines: Iterable[Mapping], idempotency_key: Optional[str] = None) -> dict:
        """Publishes ingest lines (ops, or `{"txn": [...]}` groups), batched like `ingest`; one
        receipt for all of them."""
        return self._send("POST", "/v1/changes", _ndjson(lines), "application/x-ndjson", idempotency_key)

    def replace_state(self, state: Mapping[str, Value], idempotency_key: Optional[str] = None) -> dict:
        """Makes the state equal to `state`: the producer commits the difference as one
        transaction (nothing when equal: `parts` is 0)."""
        lines = ({"key": k, **_encode_value(v)} for k, v in sorted(state.items()))
        return self._send("PUT", "/v1/state", _ndjson(lines), "application/x-ndjson", idempotency_key)

    def status(self) -> dict:
        return json.loads(self._http.request("GET", "/v1/status")[2])


@dataclass
class Batch:
    """One committed transaction of the feed: the changes from `prev_seq` to `seq`."""

    seq: int
    prev_seq: int
    lineage: str
    changes: List[dict] = field(default_factory=list)

    @staticmethod
    def from_json(obj: Mapping) -> "Batch":
        return Batch(obj["seq"], obj["prev_seq"], obj["lineage"], list(obj.get("changes", [])))

    def apply(self, state: Dict[str, bytes]) -> None:
        """Applies the batch to a dict of key → bytes."""
        for c in self.changes:
            if c["op"] == "put":
                state[c["key"]] = _decode_value(c)
            elif c["op"] == "del":
                state.pop(c["key"], None)
            else:
                raise ValueError(f"batch {self.seq}: unknown op {c['op']!r}")


class Replica:
    """A `deltasync-consumer run --http` endpoint."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._http = _Http(url, timeout)

    def status(self) -> dict:
        return json.loads(self._http.request("GET", "/v1/status")[2])

    def checksum(self) -> dict:
        return json.loads(self._http.request("GET", "/v1/checksum")[2])

    def get(self, key: str, min_seq: Optional[int] = None, wait: Optional[str] = None) -> Optional[bytes]:
        """The value at `key`, or None. With `min_seq`, once the replica has applied that
        sequence (ApiError 504 when `wait` passes first)."""
        path = "/v1/keys/" + urllib.parse.quote(key, safe="") + _query(min_seq=min_seq, wait=wait)
        try:
            _, _, data = self._http.request("GET", path, headers={"Accept": "application/octet-stream"})
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return data

    def state(self, min_seq: Optional[int] = None, wait: Optional[str] = None) -> Tuple[Dict[str, bytes], Position]:
        """The whole replica at one position."""
        _, headers, data = self._http.request("GET", "/v1/state" + _query(min_seq=min_seq, wait=wait))
        return _entries(data), Position.from_headers(headers)

    def keys(
        self,
        prefix: Optional[str] = None,
        after: Optional[str] = None,
        limit: Optional[int] = None,
        min_seq: Optional[int] = None,
        wait: Optional[str] = None,
    ) -> Tuple[Dict[str, bytes], Position, Optional[str]]:
        """One page of the keys starting with `prefix`, after key `after`, in key order: the
        entries, their position, and the `after` of the next page (None on the last)."""
        q = _query(prefix=prefix, after=after, limit=limit, min_seq=min_seq, wait=wait)
        _, headers, data = self._http.request("GET", "/v1/keys" + q)
        next_after = headers.get("Deltasync-Next-After")
        # Percent-encoded by the server; `_query` encodes it again when passed back.
        return _entries(data), Position.from_headers(headers), (
            urllib.parse.unquote(next_after) if next_after is not None else None
        )

    def changes(self, after: int, lineage: Optional[str] = None, wait: str = "30s") -> List[Batch]:
        """Long-polls the batches committed after `after`: returns as soon as there are some,
        or an empty list when `wait` passes. Raises MustRefetch when the replica cannot
        continue from `after`."""
        q = _query(after=after, lineage=lineage, wait=wait)
        try:
            _, _, data = self._http.request("GET", "/v1/changes" + q, timeout=_seconds(wait) + 30)
        except ApiError as e:
            if e.status == 409 and isinstance(e.body, dict) and e.body.get("must_refetch"):
                raise MustRefetch(e.body) from None
            raise
        return [Batch.from_json(_parse_line(line)) for line in data.splitlines() if line.strip()]

    def watch(self, after: Optional[int] = None, lineage: Optional[str] = None, read_timeout: float = 60.0) -> Iterator[Batch]:
        """Follows the Server-Sent Events feed: yields batches after `after` as they commit.
        Raises MustRefetch on a `must-refetch` event; ends when the server closes."""
        parsed = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parsed.hostname, parsed.port, timeout=read_timeout)
        path = (parsed.path or "") + "/v1/watch" + _query(after=after, lineage=lineage)
        try:
            conn.request("GET", path, headers={"Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ApiError("GET", self.url + path, resp.status, resp.read())
            for name, data in _sse_events(resp):
                if name == "batch":
                    yield Batch.from_json(_parse_line(data))
                elif name == "must-refetch":
                    raise MustRefetch(json.loads(data))
        finally:
            conn.close()


def _entries(data: bytes) -> Dict[str, bytes]:
    out: Dict[str, bytes] = {}
    for line in data.splitlines():
        if line.strip():
            e = _parse_line(line)
            out[e["key"]] = _decode_value(e)
    return out


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    return float(duration)


def _sse_events(resp) -> Iterator[Tuple[str, str]]:
    """(event name, data) of each event in a text/event-stream; comments (heartbeats) skipped."""
    name, data = "message", []
    while True:
        raw = resp.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)


@dataclass
class Event:
    """What `follow` yields: a `reset` with the whole state at `position`, or a `batch`."""

    kind: str
    position: Position
    state: Optional[Dict[str, bytes]] = None
    batch: Optional[Batch] = None

    def apply(self, state: Dict[str, bytes]) -> None:
        if self.batch is not None:
            self.batch.apply(state)


def follow(replica: Replica, use_sse: bool = True, retry_delay: float = 0.5, stop=None) -> Iterator[Event]:
    """Keeps a copy of a replica: yields a `reset` (the whole state) first and whenever the
    replica cannot continue the feed, then a `batch` per committed transaction, gapless and
    in order. Connection errors are retried after `retry_delay` seconds, resuming from the
    last batch seen. `stop()`, when given, is checked between events."""
    position: Optional[Position] = None
    while stop is None or not stop():
        try:
            if position is None:
                state, position = replica.state()
                yield Event("reset", position, state=state)
                continue
            batches = (
                replica.watch(after=position.seq, lineage=position.lineage)
                if use_sse
                else replica.changes(after=position.seq, lineage=position.lineage, wait="5s")
            )
            for b in batches:
                if b.prev_seq != position.seq or b.lineage != position.lineage:
                    raise RuntimeError(
                        f"the feed skipped from {position.seq} to batch {b.prev_seq}->{b.seq}: a bug in the server"
                    )
                position = Position(b.seq, b.lineage)
                yield Event("batch", position, batch=b)
                if stop is not None and stop():
                    return
        except MustRefetch:
            position = None
        except ApiError as e:
            if e.status not in (502, 503, 504):
                raise
            time.sleep(retry_delay)  # a replica restarting or not bootstrapped yet
        except (OSError, http.client.HTTPException):
            time.sleep(retry_delay)  # the connection dropped: resume from the last batch
