"""Unit tests of the client's parts that need no server: value encoding, the SSE parser,
batches applied to a dict. `python3 -m unittest discover -s clients/python/tests` (make test
runs it); the end-to-end check against real binaries is e2e.py."""

import io
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deltasync_client as ds  # noqa: E402


class Values(unittest.TestCase):
    def test_bytes_and_text_are_sent_exactly(self):
        for value in [b"", b"plain", "caf\u00e9".encode(), b"\xff\x00\xfe", bytes(range(256))]:
            op = ds.put("k", value)
            self.assertEqual(set(op), {"op", "key", "value_b64"})
            self.assertEqual(ds._decode_value(op), value)
        self.assertEqual(ds.put("k", "text"), {"op": "put", "key": "k", "value_b64": "dGV4dA=="})

    def test_a_json_value_is_its_text_as_the_server_wrote_it(self):
        line = '{"key":"k","value":{"n":1.0e5,"s":"\\u00e9","l":[1,{"value":2}]}}'
        e = ds._parse_line(line)
        self.assertEqual(ds._decode_value(e), b'{"n":1.0e5,"s":"\\u00e9","l":[1,{"value":2}]}')
        self.assertEqual(e["value"]["n"], 100000.0)
        # A document put from Python is stored as its compact text.
        self.assertEqual(ds._decode_value(ds.put_json("k", {"a": [1, "b"]})), b'{"a":[1,"b"]}')

    def test_a_batch_line_keeps_every_changes_raw_value(self):
        line = (
            '{"seq":3,"prev_seq":2,"lineage":"ab","changes":[{"op":"put","key":"a","value":"x"},'
            '{"op":"put","key":"b","value_b64":"/w=="},{"op":"del","key":"c"},'
            '{"op":"put","key":"d","value":[1, 2]}]}'
        )
        b = ds.Batch.from_json(ds._parse_line(line))
        state = {"c": b"old"}
        b.apply(state)
        self.assertEqual(state, {"a": b'"x"', "b": b"\xff", "d": b"[1, 2]"})

    def test_bad_lines_and_base64_are_refused(self):
        with self.assertRaises(ValueError):
            ds._decode_value({"value_b64": "not base64!"})
        for bad in ['{"key":"k","value":}', '{"key":"k"} x', '{"key" "k"}', "[1,2"]:
            with self.assertRaises(ValueError, msg=bad):
                ds._parse_line(bad)


class Sse(unittest.TestCase):
    def events(self, text):
        return list(ds._sse_events(io.BytesIO(text.encode())))

    def test_events_comments_and_multiline_data(self):
        text = (
            ": keep-alive\n\n"
            "event: batch\nid: 7\ndata: {\"seq\":7}\n\n"
            "event: must-refetch\ndata: {\"must_refetch\":true,\n"
            "data: \"seq\":9}\n\n"
            "data:x\n\n"
        )
        self.assertEqual(
            self.events(text),
            [
                ("batch", '{"seq":7}'),
                ("must-refetch", '{"must_refetch":true,\n"seq":9}'),
                ("message", "x"),
            ],
        )

    def test_an_unfinished_event_at_the_end_is_not_delivered(self):
        self.assertEqual(self.events("event: batch\ndata: {}\n"), [])


class Batches(unittest.TestCase):
    def test_apply_puts_and_deletes_in_order(self):
        b = ds.Batch.from_json(
            {
                "seq": 3,
                "prev_seq": 2,
                "lineage": "ab",
                "changes": [
                    {"op": "put", "key": "a", "value": 1},
                    {"op": "put", "key": "b", "value_b64": "/w=="},
                    {"op": "del", "key": "c"},
                    {"op": "del", "key": "a"},
                ],
            }
        )
        state = {"c": b"old"}
        b.apply(state)
        self.assertEqual(state, {"b": b"\xff"})

    def test_an_unknown_op_is_an_error(self):
        b = ds.Batch(1, 0, "ab", [{"op": "frob", "key": "a"}])
        with self.assertRaises(ValueError):
            b.apply({})


class Durations(unittest.TestCase):
    def test_units(self):
        self.assertEqual(ds._seconds("250ms"), 0.25)
        self.assertEqual(ds._seconds("30s"), 30.0)
        self.assertEqual(ds._seconds("2m"), 120.0)


if __name__ == "__main__":
    unittest.main()
