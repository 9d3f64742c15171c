"""Tests for mixpanel_fake, over real HTTP.

Run: ``python test_mixpanel_fake.py`` (prints ``N passed, N failed`` last).
The SDK conformance tests drive the real, pinned SDKs when installed (see
conformance/ and .ci/run): Python ``mixpanel`` in this interpreter, Node
``mixpanel`` in conformance/node_modules.  Without them those tests skip,
or fail when MIXPANEL_FAKE_REQUIRE_SDKS=1.
"""

from __future__ import annotations

import base64
import collections
import datetime
import gc
import gzip
import http.client
import json
import logging
import os
import pathlib
import random
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
import urllib.error
import urllib.parse
import urllib.request
import unittest.mock
import zlib

import mixpanel_fake
from mixpanel_fake import MixpanelFake, Project, WaitTimeout

try:
    import mixpanel
except ImportError:  # the SDK tests skip (or fail when SDKs are required)
    mixpanel = None

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DRIVER = os.path.join(HERE, "conformance", "node_sdk.js")
NODE_SDK = os.path.join(HERE, "conformance", "node_modules", "mixpanel")
REQUIRE_SDKS = os.environ.get("MIXPANEL_FAKE_REQUIRE_SDKS") == "1"

# A fixed instant for tests that pin the clock: 2026-11-14T22:13:20Z.
T0 = 1794694400
TOKEN = "tok_test"

MP: MixpanelFake


def setUpModule() -> None:
    global MP
    MP = MixpanelFake().start()


def tearDownModule() -> None:
    MP.stop()


# --- helpers -----------------------------------------------------------------


def _http(method, path, body=None, headers=None, port=None, timeout=10):
    """One request on a fresh connection: (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port or MP.port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _raw_request(data, port=None, timeout=5, whole_answer=False):
    """Send raw bytes; read until the server closes (or, with ``whole_answer``,
    until one complete response has arrived)."""
    sock = socket.create_connection(("127.0.0.1", port or MP.port), timeout=timeout)
    try:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            received += chunk
            head, found, rest = received.partition(b"\r\n\r\n")
            if whole_answer and found:
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if not length or len(rest) >= length[0]:
                    break
        return received
    finally:
        sock.close()


def _json(method, path, body=None, headers=None):
    status, _, raw = _http(method, path, body, headers)
    return status, json.loads(raw)


def _b64(value) -> str:
    return base64.b64encode(json.dumps(value).encode("utf-8")).decode("ascii")


def _form(**fields) -> str:
    return urllib.parse.urlencode(fields)


def _basic(username, password="") -> dict:
    raw = f"{username}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def _event(name="Signed Up", token=TOKEN, **props):
    return {"event": name, "properties": dict({"token": token}, **props)}


_INSERT_IDS = iter(range(10 ** 9))


def _full(name="Imported", token=TOKEN, **props):
    """An event a strict /import accepts: time, distinct_id and $insert_id set."""
    base = {"time": T0 - 60, "distinct_id": "d", "$insert_id": f"iid-{next(_INSERT_IDS)}"}
    return _event(name, token, **dict(base, **props))


def _require(available: bool, reason: str, case: unittest.TestCase) -> None:
    if not available:
        if REQUIRE_SDKS:
            case.fail(reason + " (MIXPANEL_FAKE_REQUIRE_SDKS=1)")
        case.skipTest(reason)


class _ServerTestCase(unittest.TestCase):
    """Each test starts from an empty store, with the clock pinned at T0."""

    def setUp(self) -> None:
        MP.reset()
        MP.set_time(T0)
        self.addCleanup(MP.set_time, None)
        self.addCleanup(MP.check)

    def stored(self, **filters):
        return MP.events(**filters)

    def server_props(self, endpoint="/track"):
        """The properties Mixpanel adds on ingestion, at the pinned clock."""
        added = {"$mp_api_endpoint": "127.0.0.1", "$mp_api_timestamp_ms": T0 * 1000,
                 "mp_processing_time_ms": T0 * 1000}
        if endpoint == "/import":
            added["$import"] = True
        return added


# =============================================================================
# The seed's contract
# =============================================================================


class TestContract(_ServerTestCase):

    def test_root_names_the_protocol(self):
        status, body = _json("GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual((body["name"], body["protocol"], body["version"]),
                         ("mixpanel", "mixpanel", mixpanel_fake.__version__))

    def test_health(self):
        self.assertEqual(_json("GET", "/health"), (200, {"status": "ok"}))

    def test_events_listing_shape(self):
        _http("POST", "/track", json.dumps([_event(distinct_id="u1", time=T0 - 60)]))
        status, body = _json("GET", "/__parlel/events")
        self.assertEqual(status, 200)
        self.assertEqual(body["count"], 1)
        row = body["events"][0]
        self.assertEqual(set(row) >= {"id", "event", "properties", "distinct_id", "time"}, True)
        self.assertEqual((row["event"], row["distinct_id"], row["time"], row["project"]),
                         ("Signed Up", "u1", T0 - 60, TOKEN))
        self.assertIsInstance(row["id"], int)

    def test_people_listing_shape(self):
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u1",
                                             "$set": {"plan": "pro"}, "$ignore_time": True}))
        self.assertEqual(_json("GET", "/__parlel/people"), (200, {"count": 1, "people": [
            {"$distinct_id": "u1", "$properties": {"plan": "pro"}, "project": TOKEN}]}))

    def test_groups_listing_shape(self):
        _http("POST", "/groups", json.dumps({"$token": TOKEN, "$group_key": "company",
                                             "$group_id": "acme", "$set": {"size": 5}}))
        self.assertEqual(_json("GET", "/__parlel/groups"), (200, {"count": 1, "groups": [
            {"$group_key": "company", "$group_id": "acme", "$properties": {"size": 5},
             "project": TOKEN}]}))

    def test_delete_events_clears_events_only(self):
        _http("POST", "/track", json.dumps(_event()))
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}}))
        self.assertEqual(_json("DELETE", "/__parlel/events"), (200, {"ok": True, "count": 0}))
        self.assertEqual(MP.events(), [])
        self.assertEqual(list(MP.profiles()), ["u"])

    def test_reset_forgets_everything(self):
        _http("POST", "/track", json.dumps(_event()))
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}}))
        _http("POST", "/track", json.dumps({"event": "no token"}))
        self.assertEqual(_json("POST", "/__parlel/reset"), (200, {"ok": True}))
        self.assertEqual((MP.events(), MP.profiles(), MP.rejected()), ([], {}, []))

    def test_options_any_path_is_204(self):
        for path in ("*", "/track", "/anything/at/all"):
            with self.subTest(path=path):
                status, _, body = _http("OPTIONS", path)
                self.assertEqual((status, body), (204, b""))

    def test_project_param_scopes_every_listing(self):
        _http("POST", "/track", json.dumps([_event("A", token="p1"), _event("B", token="p2")]))
        _http("POST", "/engage", json.dumps([{"$token": "p1", "$distinct_id": "x", "$set": {"a": 1}},
                                             {"$token": "p2", "$distinct_id": "y", "$set": {"a": 2}}]))
        _http("POST", "/groups", json.dumps([{"$token": "p2", "$group_key": "k", "$group_id": "g",
                                              "$set": {"a": 1}}]))
        _, events = _json("GET", "/__parlel/events?project=p1")
        self.assertEqual([e["event"] for e in events["events"]], ["A"])
        _, people = _json("GET", "/__parlel/people?project=p2")
        self.assertEqual([p["$distinct_id"] for p in people["people"]], ["y"])
        _, groups = _json("GET", "/__parlel/groups?project=p1")
        self.assertEqual(groups["count"], 0)
        _json("POST", "/__parlel/reset?project=p1")
        self.assertEqual([e["event"] for e in MP.events()], ["B"])
        self.assertEqual(list(MP.profiles()), ["y"])


# =============================================================================
# Transport: every encoding the SDKs send (sdks.md §0 item 3, §5.3)
# =============================================================================

# "~~~>>>???" makes base64 with '+' and '/' in it (sdks.md §2.2).
_TRICKY = {"event": "Tricky", "properties": {"token": TOKEN, "s": "~~~>>>???", "u": "naïve ☃",
                                            "$insert_id": "tricky-1"}}
_TRICKY_B64 = _b64(_TRICKY)
assert "+" in _TRICKY_B64 and "/" in _TRICKY_B64


class TestEncodings(_ServerTestCase):

    CASES = [
        # (label, method, path, body, headers)
        ("form data= URL-encoded JSON (Python SDK)", "POST", "/track",
         _form(data=json.dumps([_TRICKY]), verbose=1, ip=0), {}),
        ("form data= URL-encoded base64 (browser, Ruby)", "POST", "/track/",
         _form(data=_TRICKY_B64), {}),
        ("form data= raw base64 with literal + (Node batch, PHP)", "POST", "/track",
         "data=" + _TRICKY_B64, {"Content-Type": "application/x-www-form-urlencoded"}),
        ("GET data= base64 in the query (Node single calls)", "GET",
         "/track?ip=0&verbose=0&data=" + urllib.parse.quote(_TRICKY_B64, safe=""), None, {}),
        ("GET data= JSON in the query", "GET",
         "/track?data=" + urllib.parse.quote(json.dumps(_TRICKY)), None, {}),
        ("raw JSON object body", "POST", "/track", json.dumps(_TRICKY),
         {"Content-Type": "application/json"}),
        ("raw JSON array body without content type", "POST", "/track", json.dumps([_TRICKY]), {}),
        ("gzip JSON body (Go, Swift)", "POST", "/track",
         gzip.compress(json.dumps([_TRICKY]).encode()),
         {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        ("sendBeacon text/plain form", "POST", "/track/?ip=1",
         "data=" + urllib.parse.quote(_TRICKY_B64, safe=""), {"Content-Type": "text/plain;charset=UTF-8"}),
        ("base64 without padding", "POST", "/track", _form(data=_TRICKY_B64.rstrip("=")), {}),
        ("chunked transfer encoding", "POST", "/track", iter([b"data=", _TRICKY_B64.encode()]), {}),
    ]

    def test_every_encoding_lands_the_same_event(self):
        for label, method, path, body, headers in self.CASES:
            with self.subTest(label):
                MP.reset()
                status, _, answer = _http(method, path, body, headers)
                self.assertEqual(status, 200)
                self.assertIn(answer, (b"1", b'{"status":1,"error":null}'))
                self.assertEqual(self.stored(), [{"event": "Tricky", "properties": dict(
                    _TRICKY["properties"], time=T0, **self.server_props())}])

    def test_ndjson_import(self):
        lines = "\n".join(json.dumps(_full(str(i), time=T0 - i)) for i in range(3))
        status, body = _json("POST", "/import", lines + "\n", {"Content-Type": "application/x-ndjson"})
        self.assertEqual((status, body), (200, {"code": 200, "num_records_imported": 3, "status": "OK"}))
        self.assertEqual([e["event"] for e in self.stored()], ["0", "1", "2"])

    def test_gzip_ndjson_import(self):
        lines = "\n".join(json.dumps(_full(str(i))) for i in range(2))
        status, body = _json("POST", "/import", gzip.compress(lines.encode()),
                             {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
        self.assertEqual(body["num_records_imported"], 2)

    def test_params_in_query_or_form(self):
        for label, path, body in [("verbose in query", "/track?verbose=1", _form(data=_TRICKY_B64)),
                                  ("verbose in form", "/track", _form(data=_TRICKY_B64, verbose=1))]:
            with self.subTest(label):
                status, _, answer = _http("POST", path, body)
                self.assertEqual(answer, b'{"status":1,"error":null}')

    def test_unicode_kept_raw(self):
        props = {"emoji": "😀", "cjk": "漢字", "rtl": "שלום"}
        _http("POST", "/track", _form(data=json.dumps(_event(**props))))
        stored = self.stored()[0]["properties"]
        self.assertEqual({k: stored[k] for k in props}, props)
        _, _, raw = _http("GET", "/__parlel/events")
        self.assertIn("😀".encode("utf-8"), raw)

    def test_json_types_kept_exactly(self):
        props = {"int": 3, "float": 2.5, "big": 2 ** 53 + 1, "bool": False, "none": None,
                 "list": [1, "a", None, {"x": [True]}], "obj": {"nested": {"deep": 1.0}},
                 "zero_float": 0.0, "neg": -7}
        _http("POST", "/track", json.dumps(_event(**props)))
        stored = self.stored()[0]["properties"]
        for key, value in props.items():
            self.assertEqual(stored[key], value)
            self.assertIs(type(stored[key]), type(value), key)
        self.assertIs(type(stored["obj"]["nested"]["deep"]), float)


# =============================================================================
# Answers, exactly as clients parse them (ingestion-api.md §1.5, sdks.md §5.4)
# =============================================================================


class TestAnswers(_ServerTestCase):

    def test_bare_1_is_plain_text_without_newline(self):
        status, headers, body = _http("POST", "/track", _form(data=json.dumps(_event())))
        self.assertEqual((status, body), (200, b"1"))
        self.assertEqual(headers["content-type"], "text/plain")
        self.assertEqual(headers["content-length"], "1")

    def test_verbose_success_and_failure(self):
        ok = _http("POST", "/track?verbose=1", _form(data=json.dumps(_event())))
        self.assertEqual((ok[0], ok[1]["content-type"], json.loads(ok[2])),
                         (200, "application/json", {"status": 1, "error": None}))
        # A record without a token: Mixpanel's "token, missing or empty" (agileseason #530).
        bad = _http("POST", "/track?verbose=1", _form(data=json.dumps({"event": "x"})))
        self.assertEqual((bad[0], json.loads(bad[2])),
                         (200, {"status": 0, "error": "token, missing or empty"}))

    def test_failure_without_verbose_is_bare_0(self):
        for label, body in [("no token", _form(data=json.dumps({"event": "x"}))),
                            ("no data", _form(verbose=0)),
                            ("not JSON", _form(data="{nope")),
                            ("not base64", _form(data="%%%"))]:
            with self.subTest(label):
                self.assertEqual(_http("POST", "/track", body)[::2], (200, b"0"))

    def test_payload_errors_explained_when_verbose(self):
        cases = [
            (_form(verbose=1), "data, missing or empty"),
            (_form(verbose=1, data="[1, 2"), "data, invalid JSON: Expecting ',' delimiter: "
                                              "line 1 column 6 (char 5)"),
            (_form(verbose=1, data="@@@@"), "data, neither JSON nor base64-encoded JSON"),
            (_form(verbose=1, data='"a string"'), "data, neither JSON nor base64-encoded JSON"),
            (_form(verbose=1, data=base64.b64encode(b"42").decode()),
             "data, must be a JSON object or an array of objects"),
            (_form(verbose=1, data="[NaN]"), "data, invalid JSON: NaN is not valid JSON"),
        ]
        for body, error in cases:
            with self.subTest(body):
                self.assertEqual(_json("POST", "/track", body), (200, {"status": 0, "error": error}))

    def test_any_record_landing_answers_1(self):
        # OAS `Received`: 1 = one or more objects valid (ingestion-api.md §1.5).
        body = json.dumps([_event("ok"), {"event": "no token"}])
        self.assertEqual(_http("POST", "/track", body)[2], b"1")
        self.assertEqual([e["event"] for e in self.stored()], ["ok"])
        self.assertEqual(MP.rejected()[0]["reason"], "token, missing or empty")

    def test_verbose_2_error_is_http_400(self):
        # D-profiles' own sample uses verbose=2; RUD #5060 saw the 400.
        status, body = _json("POST", "/engage?verbose=2", json.dumps({"$token": TOKEN, "$set": {"a": 1}}))
        self.assertEqual((status, body), (400, {"status": 0,
                                                "error": "Engage API error: $distinct_id, missing or empty"}))
        ok = _json("POST", "/engage?verbose=2", json.dumps(
            {"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}}))
        self.assertEqual(ok, (200, {"status": 1, "error": None}))

    def test_img_answers_a_gif_pixel(self):
        status, headers, body = _http("GET", "/track?img=1&data=" + _b64(_event()))
        self.assertEqual((status, headers["content-type"], body[:6]), (200, "image/gif", b"GIF89a"))
        self.assertEqual(len(self.stored()), 1)

    def test_jsonp_callback(self):
        path = "/track?callback=" + urllib.parse.quote('mixpanel._jsc["abc"]') + "&data=" + _b64(_event())
        status, headers, body = _http("GET", path)
        self.assertEqual((status, headers["content-type"], body),
                         (200, "text/javascript", b'mixpanel._jsc["abc"](1)'))
        status, _, body = _http("GET", "/track?verbose=1&callback=cb&data=" + _b64(_event()))
        self.assertEqual(body, b'cb({"status":1,"error":null})')
        status, _, body = _http("GET", "/track?callback=" + urllib.parse.quote("x</script>") + "&data=e30")
        self.assertEqual(status, 400)

    def test_import_json_dialect(self):
        batch = [_full(str(i), time=T0 - i) for i in range(3)]
        self.assertEqual(_json("POST", "/import", json.dumps(batch), {"Content-Type": "application/json"}),
                         (200, {"code": 200, "num_records_imported": 3, "status": "OK"}))

    def test_import_form_dialect_answers_like_track(self):
        # The Python and Node SDKs post form data= to /import and need status == 1 / "1".
        body = _form(data=json.dumps([_event(time=T0, distinct_id="d")]), verbose=1)
        self.assertEqual(_json("POST", "/import", body), (200, {"status": 1, "error": None}))
        self.assertEqual(_http("GET", "/import?verbose=0&data=" + _b64(_event(time=T0)))[2], b"1")

    def test_import_strict_failure_shape(self):
        batch = [_full("good"), {"event": "", "properties": {"token": TOKEN}},
                 _full("bad time", time="yesterday", **{"$insert_id": "abc"})]
        status, body = _json("POST", "/import?strict=1", json.dumps(batch))
        self.assertEqual(status, 400)
        self.assertEqual(body, {
            "code": 400, "error": "some data points in the request failed validation",
            "failed_records": [
                {"index": 1, "insert_id": None, "field": "event",
                 "message": "'event' must not be missing or blank"},
                {"index": 2, "insert_id": "abc", "field": "properties.time",
                 "message": "'properties.time' is invalid: must be specified as seconds since epoch"}],
            "num_records_imported": 1, "status": "Bad Request"})
        # The valid record was kept (R-import: valid rows are still ingested).
        self.assertEqual([e["event"] for e in self.stored()], ["good"])

    def test_import_json_payload_error_is_400(self):
        status, body = _json("POST", "/import", "[{", {"Content-Type": "application/json"})
        self.assertEqual((status, body["code"], body["status"]), (400, 400, "Bad Request"))


# =============================================================================
# Events as Mixpanel stores them
# =============================================================================


class TestEventStorage(_ServerTestCase):

    def test_time_normalisation(self):
        # ms by magnitude (sdks.md §5.3 step 6); JS/PY float seconds are kept.
        cases = [(1794690000, 1794690000), (1794690000.25, 1794690000.25),
                 (1794690000000, 1794690000), (1794690000250, 1794690000.25),
                 (1794690000250.0, 1794690000.25)]
        for sent, stored in cases:
            with self.subTest(sent=sent):
                MP.reset()
                _http("POST", "/track", json.dumps(_event(time=sent)))
                value = self.stored()[0]["properties"]["time"]
                self.assertEqual(value, stored)
                self.assertIs(type(value), type(stored))

    def test_missing_time_is_the_project_clock(self):
        MP.set_time(T0 + 0.5)
        _http("POST", "/track", json.dumps(_event()))
        self.assertEqual(self.stored()[0]["properties"]["time"], T0 + 0.5)

    def test_server_added_properties(self):
        sent = _full(distinct_id="u")
        _http("POST", "/track", json.dumps(sent))
        _http("POST", "/import", json.dumps(sent))
        track, imported = self.stored()
        self.assertEqual(track["properties"], dict(sent["properties"], **self.server_props("/track")))
        self.assertEqual(imported["properties"], dict(sent["properties"], **self.server_props("/import")))

    def test_invalid_time_is_refused_with_reason(self):
        for bad in ("2026-01-01", None, True, [1]):
            with self.subTest(bad=bad):
                MP.reset()
                self.assertEqual(_http("POST", "/track", json.dumps(_event(time=bad)))[2], b"0")
                self.assertEqual(self.stored(), [])
                (record,) = MP.rejected()
                self.assertEqual((record["field"], record["endpoint"], record["project"], record["index"]),
                                 ("properties.time", "/track", TOKEN, 0))

    def test_token_from_basic_username_when_payload_has_none(self):
        # The seed's clients send the token only as Basic username (README leniency).
        body = json.dumps({"event": "e", "properties": {"distinct_id": "u"}})
        self.assertEqual(_http("POST", "/track", body, _basic("tok_basic"))[2], b"1")
        self.assertEqual([e["event"] for e in MP.events(project="tok_basic")], ["e"])
        body = json.dumps({"$distinct_id": "u", "$set": {"a": 1}})
        self.assertEqual(_http("POST", "/engage", body, _basic("tok_basic"))[2], b"1")
        self.assertEqual(MP.profile("u", project="tok_basic")["a"], 1)

    def test_a_whole_refused_request_is_kept_too(self):
        _http("POST", "/track", _form(data="%%%garbage"))
        (record,) = MP.rejected()
        self.assertEqual({k: record[k] for k in ("endpoint", "index", "field", "reason", "record")},
                         {"endpoint": "/track", "index": None, "field": "data",
                          "reason": "data, neither JSON nor base64-encoded JSON", "record": "%%%garbage"})
        with self.assertRaises(WaitTimeout) as caught:
            MP.wait_for_events(1, timeout=0)
        self.assertIn("rejected on /track (whole request): data, neither JSON nor base64-encoded JSON",
                      str(caught.exception))

    def test_refused_record_is_kept_with_reason(self):
        _http("POST", "/track?verbose=1", json.dumps([_event("ok"), {"event": "x", "properties": {}}]))
        (record,) = MP.rejected()
        self.assertEqual({k: record[k] for k in ("project", "endpoint", "index", "field", "reason", "record",
                                                 "dropped")},
                         {"project": None, "endpoint": "/track", "index": 1, "field": "properties.token",
                          "reason": "token, missing or empty", "record": {"event": "x", "properties": {}},
                          "dropped": False})
        _, listing = _json("GET", "/__parlel/rejected")
        self.assertEqual(listing["count"], 1)
        self.assertEqual(listing["rejected"][0]["reason"], "token, missing or empty")

    def test_arrival_order_and_no_dedup(self):
        same = _event("dup", time=T0, distinct_id="u", **{"$insert_id": "same"})
        _http("POST", "/track", json.dumps([same, _event("other"), same]))
        self.assertEqual([e["event"] for e in self.stored()], ["dup", "other", "dup"])


# =============================================================================
# Profiles (ingestion-api.md §4.3) and groups (§5)
# =============================================================================


def _engage_as(distinct_id, update, token=TOKEN):
    return _http("POST", "/engage", json.dumps(dict({"$token": token, "$distinct_id": distinct_id}, **update)))


def _engage(*updates, token=TOKEN, path="/engage"):
    return _http("POST", path, json.dumps([dict({"$token": token, "$distinct_id": "u"}, **u)
                                           for u in updates]))


class TestProfiles(_ServerTestCase):

    # (label, existing properties or None, update, resulting properties or None)
    OPERATORS = [
        ("$set creates", None, {"$set": {"a": 1}}, {"a": 1}),
        ("$set overwrites", {"a": 1, "b": 2}, {"$set": {"a": "x"}}, {"a": "x", "b": 2}),
        ("$set_once keeps existing", {"a": 1}, {"$set_once": {"a": 2, "b": 3}}, {"a": 1, "b": 3}),
        ("$set_once creates", None, {"$set_once": {"a": 2}}, {"a": 2}),
        ("$add to missing counts from 0", None, {"$add": {"n": 5}}, {"n": 5}),
        ("$add adds and subtracts", {"n": 5, "m": 1.5}, {"$add": {"n": -2, "m": 1}}, {"n": 3, "m": 2.5}),
        ("$add to a non-number is ignored", {"n": "five"}, {"$add": {"n": 1}}, {"n": "five"}),
        ("$append to missing makes a list", None, {"$append": {"l": "a"}}, {"l": ["a"]}),
        ("$append keeps duplicates", {"l": ["a"]}, {"$append": {"l": "a"}}, {"l": ["a", "a"]}),
        ("$append to a non-list is ignored", {"l": "a"}, {"$append": {"l": "b"}}, {"l": "a"}),
        ("$append a list appends it as one item", {"l": [1]}, {"$append": {"l": [2, 3]}}, {"l": [1, [2, 3]]}),
        ("$union to missing", None, {"$union": {"l": ["a", "a", "b"]}}, {"l": ["a", "b"]}),
        ("$union merges without duplicates", {"l": ["a", 1]}, {"$union": {"l": ["b", "a", 1]}},
         {"l": ["a", 1, "b"]}),
        ("$union keeps true apart from 1", {"l": [1]}, {"$union": {"l": [True, 1.0]}}, {"l": [1, True]}),
        ("$union to a non-list is ignored", {"l": 3}, {"$union": {"l": ["a"]}}, {"l": 3}),
        ("$remove removes every occurrence", {"l": ["a", "b", "a"]}, {"$remove": {"l": "a"}}, {"l": ["b"]}),
        ("$remove of an absent value", {"l": ["a"]}, {"$remove": {"l": "z"}}, {"l": ["a"]}),
        ("$remove from a non-list is ignored", {"l": "a"}, {"$remove": {"l": "a"}}, {"l": "a"}),
        ("$remove does not create", None, {"$remove": {"l": "a"}}, None),
        ("$unset removes names", {"a": 1, "b": 2}, {"$unset": ["a", "zz"]}, {"b": 2}),
        ("$unset does not create", None, {"$unset": ["a"]}, None),
        ("$delete removes the profile", {"a": 1}, {"$delete": ""}, None),
        ("$delete with null", {"a": 1}, {"$delete": None}, None),
        ("$delete of a missing profile", None, {"$delete": ""}, None),
    ]

    def test_operators(self):
        for label, before, update, after in self.OPERATORS:
            with self.subTest(label):
                MP.reset()
                if before is not None:
                    _engage({"$set": before, "$ignore_time": True})
                status, _, body = _engage(dict(update, **{"$ignore_time": True}))
                self.assertEqual((status, body), (200, b"1"))
                self.assertEqual(MP.profile("u"), after)

    def test_operators_apply_in_batch_order(self):
        _engage({"$set": {"n": 1}}, {"$add": {"n": 2}}, {"$delete": ""}, {"$set_once": {"n": 10}},
                {"$add": {"n": 1}}, {"$ignore_time": True, "$unset": ["zz"]})
        self.assertEqual(MP.profile("u")["n"], 11)

    def test_several_operators_in_one_update_apply_in_key_order(self):
        _engage({"$set": {"a": 1}, "$add": {"a": 2}, "$ignore_time": True})
        self.assertEqual(MP.profile("u"), {"a": 3})

    def test_last_seen(self):
        # $last_seen is the update's $time (or arrival), ISO without zone (D-profiles).
        _engage({"$set": {"a": 1}})
        self.assertEqual(MP.profile("u")["$last_seen"], "2026-11-14T22:13:20")
        _engage({"$set": {"a": 2}, "$time": (T0 + 3600) * 1000})
        self.assertEqual(MP.profile("u")["$last_seen"], "2026-11-14T23:13:20")
        _engage({"$set": {"a": 3}, "$time": T0 + 7200.75})
        self.assertEqual(MP.profile("u")["$last_seen"], "2026-11-15T00:13:20")
        _engage({"$set": {"a": 4}, "$ignore_time": True, "$time": T0})
        self.assertEqual(MP.profile("u"), {"a": 4, "$last_seen": "2026-11-15T00:13:20"})

    def test_track_charge_and_clear_charges(self):
        charge = {"$amount": 9.99, "$time": "2026-11-14T22:13:20"}
        _engage({"$append": {"$transactions": charge}}, {"$append": {"$transactions": {"$amount": 1}}})
        self.assertEqual(MP.profile("u")["$transactions"], [charge, {"$amount": 1}])
        _engage({"$unset": ["$transactions"]})
        self.assertNotIn("$transactions", MP.profile("u"))

    def test_malformed_updates_are_refused_with_reasons(self):
        prefix = "Engage API error: "
        cases = [
            ({"$token": TOKEN, "$set": {"a": 1}}, "$distinct_id", "$distinct_id, missing or empty"),
            ({"$token": TOKEN, "$distinct_id": "", "$set": {"a": 1}}, "$distinct_id",
             "$distinct_id, missing or empty"),
            ({"$distinct_id": "u", "$set": {"a": 1}}, "$token", "$token, missing or empty"),
            ({"$token": TOKEN, "$distinct_id": "u"}, None,
             "no operation: expected one of $set, $set_once, $add, $append, $union, $remove, $unset, $delete"),
            ({"$token": TOKEN, "$distinct_id": "u", "$set": [1]}, "$set", "$set must be an object of properties"),
            ({"$token": TOKEN, "$distinct_id": "u", "$add": {"n": "1"}}, "$add.n",
             "$add value for 'n' must be a number"),
            ({"$token": TOKEN, "$distinct_id": "u", "$add": {"n": True}}, "$add.n",
             "$add value for 'n' must be a number"),
            ({"$token": TOKEN, "$distinct_id": "u", "$union": {"l": "a"}}, "$union.l",
             "$union value for 'l' must be a non-empty list"),
            ({"$token": TOKEN, "$distinct_id": "u", "$union": {"l": []}}, "$union.l",
             "$union value for 'l' must be a non-empty list"),
            ({"$token": TOKEN, "$distinct_id": "u", "$unset": "a"}, "$unset",
             "$unset must be a non-empty list of property names"),
            ({"$token": TOKEN, "$distinct_id": "u", "$unset": []}, "$unset",
             "$unset must be a non-empty list of property names"),
            ({"$token": TOKEN, "$distinct_id": "bad\udcff", "$set": {"a": 1}}, "$distinct_id",
             "$distinct_id is invalid: string should be valid utf8"),
            ({"$token": TOKEN, "$distinct_id": {"id": 1}, "$set": {"a": 1}}, "$distinct_id",
             "$distinct_id, missing or empty"),
        ]
        for update, field, message in cases:
            with self.subTest(update):
                MP.reset()
                self.assertEqual(_json("POST", "/engage?verbose=1", json.dumps(update)),
                                 (200, {"status": 0, "error": prefix + message}))
                (record,) = MP.rejected()
                self.assertEqual((record["field"], record["reason"], record["endpoint"]),
                                 (field, prefix + message, "/engage"))
                self.assertEqual(MP.profiles(), {})

    def test_numeric_distinct_id_is_keyed_as_text(self):
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": 42, "$set": {"a": 1},
                                             "$ignore_time": True}))
        self.assertEqual(MP.profiles(), {"42": {"a": 1}})
        self.assertEqual(MP.profile(42), {"a": 1})


class TestGroups(_ServerTestCase):

    def update(self, **ops):
        return _json("POST", "/groups?verbose=1", json.dumps(
            dict({"$token": TOKEN, "$group_key": "company", "$group_id": "acme"}, **ops)))

    def test_supported_operators(self):
        self.update(**{"$set": {"name": "Acme", "tags": ["a"]}})
        self.update(**{"$set_once": {"name": "Other", "founded": 1999}})
        self.update(**{"$union": {"tags": ["b", "a"]}})
        self.update(**{"$remove": {"tags": "a"}})
        self.update(**{"$unset": ["founded"]})
        self.assertEqual(MP.groups(), {("company", "acme"): {"name": "Acme", "tags": ["b"]}})
        self.update(**{"$delete": ""})
        self.assertEqual(MP.groups(), {})

    def test_add_and_append_are_refused(self):
        # D-profiles: $add and $append are not supported for group profiles.
        for op, value in (("$add", {"n": 1}), ("$append", {"l": 1})):
            with self.subTest(op):
                self.assertEqual(self.update(**{op: value}), (200, {
                    "status": 0, "error": f"Groups API error: {op} is not supported for group profiles"}))
        self.assertEqual(MP.groups(), {})

    def test_missing_keys(self):
        for body, message in [({"$token": TOKEN, "$group_id": "a", "$set": {}}, "$group_key, missing or empty"),
                              ({"$token": TOKEN, "$group_key": "k", "$set": {}}, "$group_id, missing or empty")]:
            with self.subTest(message):
                self.assertEqual(_json("POST", "/groups?verbose=1", json.dumps(body)),
                                 (200, {"status": 0, "error": "Groups API error: " + message}))

    def test_numeric_group_id(self):
        _http("POST", "/groups", json.dumps({"$token": TOKEN, "$group_key": "org", "$group_id": 7,
                                             "$set": {"a": 1}}))
        self.assertEqual(MP.groups(), {("org", "7"): {"a": 1}})


# =============================================================================
# Fidelity: Mixpanel's validation rules (ingestion-api.md §11), one row each
# =============================================================================

DAY = 86400
TIME_ERR = "'properties.time' is invalid: "
PLACEHOLDERS = ["00000000-0000-0000-0000-000000000000", "anon", "Anonymous", "nil", "None", "NULL",
                "n/a", "na", "undefined", "unknown", "<nil>", "0", "-1", "true", "false", "[]", "{}",
                "lmy47d"]


def _post(path, records, query=""):
    """POST records as a JSON body; returns (status, decoded answer)."""
    status, _, body = _http("POST", path + query, json.dumps(records),
                            {"Content-Type": "application/json"})
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


class TestQuickPaths(unittest.TestCase):
    """Issue 7: the quick paths taken for speed give exactly what the full
    paths give.  `_normalize_updates` checks plain batches (ASCII JSON) in
    one pass; every update it takes must equal `_normalize_update`'s, and
    every refusal the full path's."""

    TOKEN = "quick-tok"
    SCALARS = ("x", "", "y" * 255, "z" * 256, "w" * 300, 0, -7, 2 ** 53, 10 ** 400, 1.5, -0.25, True,
               False, None)
    CONTAINERS = ([], {}, ["a"], ["a", "a", 1], [1, True, 1.0], [None], [["n"]], [{"d": 1}],
                  {"k": "v"}, {"k": ["v"]}, ["y" * 300], list(range(300)))
    NAMES = ("plan", "$email", "n" * 255, "m" * 256, "", "tags")
    OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete")
    MODIFIERS = ({}, {"$time": 1764547200}, {"$time": 1764547200123}, {"$time": "soon"},
                 {"$ignore_time": True}, {"$ignore_time": "true"}, {"$ignore_alias": True},
                 {"$ip": "1.2.3.4"}, {"unknown": 1})

    def setUp(self):
        self.store = mixpanel_fake.Store([mixpanel_fake.Project(self.TOKEN)])
        self.now = 1764547200.5

    def both(self, records, kind="people", fallback=None):
        results = [mixpanel_fake._normalize_updates(records, kind, fallback, self.now, False, self.store,
                                                    "/engage", plain) for plain in (True, False)]
        self.assertEqual(results[0], results[1])
        self.assertEqual(repr(results[0]), repr(results[1]))  # true apart from 1, key order too
        return results[0]

    def random_value(self, rng):
        pick = rng.random()
        if pick < 0.55:
            return rng.choice(self.SCALARS)
        if pick < 0.8:
            return rng.choice(self.CONTAINERS)
        return {rng.choice(self.NAMES): rng.choice(self.SCALARS) for _ in range(rng.randrange(3))}

    def random_update(self, rng):
        if rng.random() < 0.5:  # the usual update, one thing in it perhaps odd
            op = rng.choice(self.OPS[:7])
            if op == "$unset":
                value = rng.choice((["a"], ["a", "b"], ["n" * 256]))
            elif op == "$union":
                value = {"tags": rng.choice((["a", "b"], ["a", "a"], [1, True], ["w" * 300], []))}
            elif op == "$add":
                value = {"n": rng.choice((1, -2.5, 10 ** 400, True, "1", None))}
            else:
                value = {"plan": "pro", "seats": rng.choice(self.SCALARS), "k": rng.choice(self.SCALARS)}
            return dict({"$token": self.TOKEN, "$distinct_id": rng.choice(("u1", "u2", "u3")), op: value},
                        **rng.choice(self.MODIFIERS))
        record = {}
        if rng.random() < 0.9:
            record["$token"] = rng.choice((self.TOKEN, self.TOKEN, "", None, 7, "other"))
        if rng.random() < 0.9:
            record["$distinct_id"] = rng.choice(("u1", "u2", "", None, 42, 1.5, True, "d" * 256, "d" * 255,
                                                 "null", "undefined"))
        for op in rng.sample(self.OPS, rng.randrange(1, 3)):
            if op == "$unset":
                record[op] = rng.choice((["a"], ["a", "b"], [], "a", [1], ["n" * 256], None))
            elif op == "$delete":
                record[op] = rng.choice(("", None, True))
            elif rng.random() < 0.85:
                record[op] = {rng.choice(self.NAMES): self.random_value(rng)
                              for _ in range(rng.randrange(1, 5))}
            else:
                record[op] = self.random_value(rng)
        record.update(rng.choice(self.MODIFIERS))
        return record

    def test_random_updates_take_the_same_path(self):
        rng = random.Random(7)
        records = [self.random_update(rng) for _ in range(3000)]
        records += [rng.choice(("a", 1, None, [], [{"$set": {}}])) for _ in range(20)]
        rng.shuffle(records)
        text = json.dumps(records)
        self.assertTrue(mixpanel_fake._plain_text(text))
        with unittest.mock.patch.object(mixpanel_fake, "_normalize_update",
                                        wraps=mixpanel_fake._normalize_update) as full:
            updates, rejected, dropped = self.both(json.loads(text))
        # The corpus reaches the quick path, the full one, and refusals:
        # counts of this seeded corpus.
        quick = len(records) - (full.call_count - len(records))  # the full run calls it for all
        self.assertEqual((len(updates), len(rejected), dropped, quick), (1575, 1445, 0, 1041))

    def test_the_usual_updates_are_taken_whole(self):
        records = [{"$token": self.TOKEN, "$distinct_id": "u1", "$set": {"plan": "pro", "seats": 3}},
                   {"$token": self.TOKEN, "$distinct_id": "u1", "$add": {"n": 1, "spent": 2.5}},
                   {"$token": self.TOKEN, "$distinct_id": "u1", "$union": {"tags": ["a", "b"]}},
                   {"$token": self.TOKEN, "$distinct_id": "u1", "$unset": ["coupon"],
                    "$time": 1764547200123}]
        updates, rejected, _ = self.both(records)
        self.assertEqual(rejected, [])
        now = "2025-12-01T00:00:00"
        self.assertEqual(updates, [
            (self.TOKEN, "u1", [("$set", {"plan": "pro", "seats": 3})], now, False, 0, records[0]),
            (self.TOKEN, "u1", [("$add", {"n": 1, "spent": 2.5})], now, False, 1, records[1]),
            (self.TOKEN, "u1", [("$union", {"tags": ["a", "b"]})], now, False, 2, records[2]),
            (self.TOKEN, "u1", [("$unset", ["coupon"])], "2025-12-01T00:00:00", False, 3, records[3])])

    def test_strict_auth_and_big_batches_take_the_full_path(self):
        records = [{"$token": "nobody", "$distinct_id": "u1", "$set": {"a": 1}}]
        self.store.strict_auth = True
        updates, rejected, dropped = self.both(records)
        self.assertEqual((updates, dropped), ([], 1))
        self.assertIn("unknown project token", rejected[0]["reason"])

    EVENT_NAMES = ("Signup", "Signup", "Page view", "", "   ", "$identify", "$create_alias", "$merge",
                   "n" * 255, "n" * 256, 7, None, ["Signup"])
    IDS = ("u1", "u2", "user-1234", "", "null", "UNDEFINED", "Anon", 42, 1.5, True, None, [], "d" * 256)
    INSERT_IDS = ("abc123", "0" * 32, "a-b-c", "", "x" * 36, "x" * 37, "null", "NONE", "a b", 5, None)
    PROPERTY_NAMES = ("plan", "$browser", "tags", "n" * 255, "m" * 256, "$ignore", "ip", "$device_id",
                      "$user_id", "$mp_api_endpoint")

    def random_event(self, rng, now):
        """A usual event, one thing in it perhaps odd; or an odd one."""
        times = (now - 60, now - 60, now - 0.5, float(now - 100), (now - 60) * 1000, now + 30,
                 now - 6 * 86400, now + 7200, 31535999, "soon", True, None)
        props = {"token": self.TOKEN, "distinct_id": "user-1234", "time": now - 60,
                 "$insert_id": "%032x" % rng.randrange(1 << 64), "plan": "pro", "seats": 3,
                 "amount": 1.25, "trial": False, "$browser": "Chrome", "tags": []}
        record = {"event": "Signup", "properties": props}
        if rng.random() < 0.3:
            return record
        for _ in range(rng.randrange(1, 3)):
            pick = rng.randrange(10)
            if pick == 0:
                record["event"] = rng.choice(self.EVENT_NAMES)
            elif pick == 1:
                props["token"] = rng.choice(("", None, 7, "other", self.TOKEN))
            elif pick == 2:
                props["distinct_id"] = rng.choice(self.IDS)
            elif pick == 3:
                props["time"] = rng.choice(times)
            elif pick == 4:
                props["$insert_id"] = rng.choice(self.INSERT_IDS)
            elif pick == 5:
                props.pop(rng.choice(("token", "distinct_id", "time", "$insert_id")), None)
            elif pick == 6:
                props[rng.choice(self.PROPERTY_NAMES)] = rng.choice(self.SCALARS + self.CONTAINERS)
            elif pick == 7:  # rarely: the whole batch must stay under the size for sizing events
                props.update({f"p{i}": i for i in range(rng.choice((240, 250)) if rng.random() < 0.2 else 3)})
            elif pick == 8:
                props["tags"] = rng.choice(self.CONTAINERS)
            else:
                return rng.choice(({"properties": props, "event": record["event"]},
                                   {"event": record["event"], "properties": props, "extra": 1},
                                   {"event": "Signup", "properties": rng.choice((None, [], "x"))},
                                   {"event": "Signup"}, "a", 1, None, []))
        return record

    def events_both(self, text, endpoint, strict, plans=False):
        """`_normalize_events` over fresh copies of the records, quick path
        allowed and not: the two must agree."""
        results = []
        for plain in (True, False):
            req = mixpanel_fake._Request("POST", endpoint, "", {"Content-Type": "application/json"},
                                         text.encode())
            records, _ = mixpanel_fake._read_records(req, ndjson=False)
            batch = mixpanel_fake._Batch(self.store, req, endpoint, strict)
            batch.plain = plain and batch.plain
            with unittest.mock.patch.object(mixpanel_fake.os, "urandom", lambda n: b"\x01" * n):
                results.append(mixpanel_fake._normalize_events(records, batch, plans))
        self.assertEqual(results[0], results[1])
        self.assertEqual(repr(results[0]), repr(results[1]))  # true apart from 1, key order too
        return results[0]

    def test_random_events_take_the_same_path(self):
        now = int(self.now)
        self.store.set_time(self.now)
        self.store.add_project(mixpanel_fake.Project("original-tok", id_merge="original"))
        rng = random.Random(7)
        records = [self.random_event(rng, now) for _ in range(2000)]
        for record in records[::10]:  # some for the project with Original ID Merge
            if isinstance(record, dict) and isinstance(record.get("properties"), dict):
                record["properties"]["token"] = "original-tok"
        text = json.dumps(records)
        self.assertTrue(mixpanel_fake._plain_text(text))
        counts = []
        for endpoint, strict in (("/track", False), ("/import", False), ("/import", True)):
            with unittest.mock.patch.object(mixpanel_fake, "_normalize_event",
                                            wraps=mixpanel_fake._normalize_event) as full:
                accepted, accepted_at, rejected, dropped = self.events_both(text, endpoint, strict)
            quick = len(records) - (full.call_count - len(records))  # the full run calls it for all
            counts.append((endpoint, strict, len(accepted), len(rejected), dropped, quick))
        # The corpus reaches the quick path, the full one, refusals and
        # drops on each endpoint: counts of this seeded corpus.
        self.assertEqual(counts, [("/track", False, 1358, 642, 12, 1083), ("/import", False, 1351, 649, 12, 1104),
                                  ("/import", True, 1204, 796, 12, 1038)])

    def test_the_usual_events_are_stored_as_decoded(self):
        now = int(self.now)
        self.store.set_time(self.now)
        props = {"token": self.TOKEN, "distinct_id": "u1", "time": now - 60, "$insert_id": "abc",
                 "tags": ["a", "b"]}
        text = json.dumps([{"event": "Signup", "properties": props},
                           {"event": "Signup", "properties": dict(props, time=now - 0.5)},
                           {"event": "Signup", "properties": {"token": self.TOKEN, "time": now - 60}}])
        accepted, accepted_at, rejected, dropped = self.events_both(text, "/track", False)
        self.assertEqual((rejected, dropped, accepted_at), ([], 0, [0, 1, 2]))
        added = {"$mp_api_endpoint": "api.mixpanel.com", "$mp_api_timestamp_ms": round(self.now * 1000),
                 "mp_processing_time_ms": round(self.now * 1000)}
        self.assertEqual(accepted, [
            (self.TOKEN, {"event": "Signup", "properties": dict(props, **added)}),
            (self.TOKEN, {"event": "Signup", "properties": dict(props, time=now - 0.5, **added)}),
            (self.TOKEN, {"event": "Signup", "properties": {"token": self.TOKEN, "time": now - 60,
                                                             "$insert_id": "01" * 16, **added}})])

    def test_tracking_plans_and_strict_auth_take_the_full_path(self):
        now = int(self.now)
        self.store.set_time(self.now)
        text = json.dumps([{"event": "Signup", "properties": {"token": "nobody", "time": now - 60}}])
        with unittest.mock.patch.object(mixpanel_fake, "_normalize_event",
                                        wraps=mixpanel_fake._normalize_event) as full:
            self.events_both(text, "/track", False, plans=True)
            self.assertEqual(full.call_count, 2)
            self.store.strict_auth = True
            accepted, _, rejected, dropped = self.events_both(text, "/track", False)
            self.assertEqual(full.call_count, 4)
        self.assertEqual((accepted, dropped), ([], 1))
        self.assertIn("unknown project token", rejected[0]["reason"])

    def test_shapes_are_kept_within_their_room(self):
        now = int(self.now)
        self.store.set_time(self.now)
        records = [{"event": "Signup", "properties": {"token": self.TOKEN, "time": now - 60, f"p{i}": i}}
                   for i in range(6)]
        shapes = mixpanel_fake._EVENT_SHAPES
        with unittest.mock.patch.object(mixpanel_fake, "_shape_room", [8, 10 ** 6]):
            accepted, _, rejected, _ = self.events_both(json.dumps(records), "/track", False)
            self.assertEqual((len(accepted), rejected), (6, []))
            # Three names a shape: two shapes fit in the room of eight names.
            kept = [("token", "time", f"p{i}") in shapes for i in range(6)]
            self.assertEqual(kept, [True, True, False, False, False, False])
            self.assertEqual(mixpanel_fake._shape_room, [2, 10 ** 6 - 2 * len("tokentimep0")])
        for i in range(2):
            del shapes[("token", "time", f"p{i}")]
        wide = {"token": self.TOKEN, "time": now - 60, **{f"q{i}": i for i in range(300)}}
        self.events_both(json.dumps([{"event": "Signup", "properties": wide}]), "/track", False)
        self.assertNotIn(tuple(wide), shapes)  # never quick: never kept

    def test_a_refused_strict_import_shows_its_records_as_sent(self):
        with MixpanelFake(projects=[Project(self.TOKEN)]) as fake:
            now = int(time.time())
            sent = [{"event": "Signup", "properties": {"token": self.TOKEN, "distinct_id": "u1",
                                                        "time": now - 60, "$insert_id": "a1"}},
                    {"event": "$identify", "properties": {"token": self.TOKEN, "distinct_id": "u1",
                                                           "time": now - 60, "$insert_id": "a2",
                                                           "$identified_id": "u1", "$anon_id": "x"}}]
            self.assertEqual(_post_to(fake, "/import", sent)[0], 400)
            self.assertEqual([r["record"] for r in fake.rejected()], sent)
            self.assertEqual(fake.events(), [])

    def test_the_journal_shows_events_as_sent(self):
        with MixpanelFake(projects=[Project(self.TOKEN)]) as fake:
            sent = [{"event": "Signup", "properties": {"token": self.TOKEN, "distinct_id": "u1",
                                                        "time": int(time.time()) - 60, "$insert_id": "a1"}}]
            status, _, _ = _post_to(fake, "/import?strict=1", sent)
            self.assertEqual(status, 200)
            self.assertEqual(fake.requests(path="/import")[-1]["records"], sent)
            stored = fake.events()[0]["properties"]
            self.assertEqual(stored["$mp_api_endpoint"], "127.0.0.1")
            self.assertEqual(stored["$import"], True)

    def test_an_in_process_fake_leaves_the_garbage_collector_alone(self):
        before = gc.get_threshold()
        with MixpanelFake():
            self.assertEqual(gc.get_threshold(), before)
        self.assertEqual(gc.get_threshold(), before)

    def test_plain_text(self):
        self.assertTrue(mixpanel_fake._plain_text('[{"a": "b\\n\\"c"}]'))
        self.assertFalse(mixpanel_fake._plain_text('[{"a": "caf\\u00e9"}]'))
        self.assertFalse(mixpanel_fake._plain_text('[{"a": "café"}]'))
        self.assertFalse(mixpanel_fake._plain_text('"\\ud800"'))

    def test_non_ascii_batches_are_checked_in_full_over_http(self):
        with MixpanelFake(projects=[Project(self.TOKEN)]) as fake:
            long = "é" * 300
            body = json.dumps([{"$token": self.TOKEN, "$distinct_id": "u1", "$set": {"name": long}},
                               {"$token": self.TOKEN, "$distinct_id": "u2", "$set": {"s": "\ud800"}}])
            status, _, answer = _http("POST", "/engage?verbose=1", body.encode(),
                                      {"Content-Type": "application/json"}, port=fake.port)
            self.assertEqual((status, json.loads(answer)["status"]), (200, 1))
            self.assertEqual(fake.profile("u1", project=self.TOKEN)["name"], "é" * 255)
            self.assertIsNone(fake.profile("u2", project=self.TOKEN))
            (refused,) = fake.rejected(project=self.TOKEN)
            self.assertEqual(refused["reason"], "Engage API error: $set.s is invalid: string should be valid utf8")

    def test_journal_projects_read_in_c_match_the_record_tokens(self):
        cases = [([{"$token": "a"}, {"$token": "b"}, {"$token": "a"}], "people", {"a", "b"}),
                 ([{"$token": "a"}, {"x": 1}, 5, {"$token": ""}, {"$token": ["l"]}], "people", {"a"}),
                 ([{"properties": {"token": "e"}}, {"properties": {"token": "f"}}], "events", {"e", "f"}),
                 ([{"properties": {"token": "e"}}, {"properties": []}, {"properties": "s"}, "r",
                   {"properties": {"token": {"d": 1}}}], "events", {"e"}),
                 ([{"$token": "a"}], None, set()), (None, "people", set()), ([], "events", set()),
                 # A token in the other kind's place still names its project.
                 ([{"event": "e", "$token": "t", "properties": {}}], "events", {"t"}),
                 ([{"$distinct_id": "u", "properties": {"token": "t"}}], "people", {"t"})]
        for records, kind, expected in cases:
            with self.subTest(records=records, kind=kind):
                self.assertEqual(mixpanel_fake._named_tokens(records, kind), expected)

    def test_size_bound_of_string_lists_is_the_general_one(self):
        for value in (["a", "bc", ""], [], ["é" * 10, "x"]):
            with self.subTest(value=value):
                general = 2 + sum(6 * len(item) + 3 for item in value)
                self.assertEqual(mixpanel_fake._json_size_bound(value), general)
                self.assertLessEqual(len(mixpanel_fake._dumps(value)), general)


class TestValidation(_ServerTestCase):
    """Each row: (rule and source, path, event, stored?, refusal field and reason)."""

    ROWS = [
        # R-track "Last 5 days only"; mixpanel-node #190 (a bare 0).
        ("track: older than 5 days", "/track", _event(time=T0 - 5 * DAY - 1), False,
         ("properties.time", TIME_ERR + "/track only accepts events from the last 5 days; "
                                        "send older events to /import")),
        ("track: exactly 5 days old", "/track", _event(time=T0 - 5 * DAY), True, None),
        # R-import: any time after 1971-01-01, at most 1 h ahead.
        ("import: before 1971", "/import", _full(time=31535999), False,
         ("properties.time", TIME_ERR + "must not be before 1971-01-01")),
        ("import: 1971-01-01 exactly", "/import", _full(time=31536000), True, None),
        ("import: more than 1 h ahead", "/import", _full(time=T0 + 3601), False,
         ("properties.time", TIME_ERR + "must not be in the future")),
        ("import: 1 h ahead exactly", "/import", _full(time=T0 + 3600), True, None),
        ("import: time in ms, 1 h ahead", "/import", _full(time=(T0 + 3600) * 1000), True, None),
        # AK's tests and the Go SDK's mocks: "'event' must not be missing or blank".
        ("blank event name", "/track", _event("  "), False,
         ("event", "'event' must not be missing or blank")),
        ("missing event name", "/import", {"properties": _full()["properties"]}, False,
         ("event", "'event' must not be missing or blank")),
        # R-import / OAS: strict /import requires time, distinct_id and $insert_id.
        ("strict import: no time", "/import", _full(time=None), False,
         ("properties.time", TIME_ERR + "must be specified as seconds since epoch")),
        ("strict import: time missing", "/import", {"event": "e", "properties": {
            "token": TOKEN, "distinct_id": "d", "$insert_id": "x1"}}, False,
         ("properties.time", TIME_ERR + "must not be missing")),
        ("strict import: distinct_id missing", "/import", {"event": "e", "properties": {
            "token": TOKEN, "time": T0, "$insert_id": "x1"}}, False,
         ("properties.distinct_id", "'properties.distinct_id' is invalid: must not be missing")),
        ("strict import: $insert_id missing", "/import", {"event": "e", "properties": {
            "token": TOKEN, "time": T0, "distinct_id": "d"}}, False,
         ("properties.$insert_id", "'properties.$insert_id' is invalid: must not be missing")),
        # AK's probes: in a Simplified project $device_id/$user_id stand in for distinct_id.
        ("strict import: $device_id instead of distinct_id", "/import", {"event": "e", "properties": {
            "token": TOKEN, "time": T0, "$insert_id": "x1", "$device_id": "dev"}}, True, None),
        # R-import: "" is allowed (excluded from user analysis).
        ("empty distinct_id", "/import", _full(distinct_id=""), True, None),
        ("distinct_id of the wrong type", "/track", _event(distinct_id={"id": 1}), False,
         ("properties.distinct_id", "'properties.distinct_id' is invalid: must be a string")),
        # R-import: $insert_id is at most 36 bytes of [A-Za-z0-9-].
        ("$insert_id of 36 characters", "/import", _full(**{"$insert_id": "a" * 36}), True, None),
        ("$insert_id of 37 characters", "/import", _full(**{"$insert_id": "a" * 37}), False,
         ("properties.$insert_id", "'properties.$insert_id' is invalid: "
                                   "must be at most 36 bytes of letters, digits and '-'")),
        ("$insert_id with a colon", "/track", _event(**{"$insert_id": "a:b"}), False,
         ("properties.$insert_id", "'properties.$insert_id' is invalid: "
                                   "must be at most 36 bytes of letters, digits and '-'")),
        ("$insert_id placeholder", "/import", _full(**{"$insert_id": "undefined"}), False,
         ("properties.$insert_id", "'properties.$insert_id' is invalid: 'undefined' is a placeholder, "
                                   "not an id")),
        # R-track limits: fewer than 255 properties (token counts), nested < 255 keys,
        # arrays < 255 elements; D-types: depth 3, 8KB per list or object.
        ("254 properties", "/track", _event(**{f"p{i}": i for i in range(253)}), True, None),
        ("255 properties", "/track", _event(**{f"p{i}": i for i in range(254)}), False,
         ("properties", "'properties' is invalid: must have fewer than 255 properties")),
        ("nested object of 255 keys", "/track", _event(obj={f"k{i}": 1 for i in range(255)}), False,
         ("properties.obj", "'properties.obj' is invalid: objects must have fewer than 255 keys")),
        ("array of 255 elements", "/track", _event(arr=list(range(255))), False,
         ("properties.arr", "'properties.arr' is invalid: arrays must have fewer than 255 elements")),
        ("array of 254 elements", "/track", _event(arr=list(range(254))), True, None),
        ("depth 3", "/track", _event(a={"b": {"c": [1]}}), True, None),
        ("depth 4", "/track", _event(a={"b": {"c": {"d": {"e": 1}}}}), False,
         ("properties.a.b.c.d", "'properties.a.b.c.d' is invalid: objects and lists may nest at most 3 deep")),
        ("list over 8KB", "/track", _event(big=["x" * 200] * 41), False,
         ("properties.big", "'properties.big' is invalid: list and object properties must be at most 8KB")),
        ("list under 8KB", "/track", _event(big=["x" * 200] * 39), True, None),
    ] + [
        # R-import's placeholder list, case-insensitive (AK's copy of it).
        (f"placeholder distinct_id {value!r}", path, _full(distinct_id=value), False,
         ("properties.distinct_id", f"'properties.distinct_id' is invalid: {value!r} is a placeholder, "
                                    "not an id"))
        for value in PLACEHOLDERS for path in ("/track", "/import")
    ]

    def test_rules(self):
        for label, path, record, stored, refusal in self.ROWS:
            with self.subTest(label):
                MP.reset()
                status, answer = _post(path, [record])
                if path == "/track":
                    self.assertEqual((status, answer), (200, 1 if stored else 0))
                elif stored:
                    self.assertEqual((status, answer), (200, {"code": 200, "num_records_imported": 1,
                                                              "status": "OK"}))
                else:
                    self.assertEqual((status, answer["num_records_imported"]), (400, 0))
                    (failed,) = answer["failed_records"]
                    self.assertEqual((failed["index"], failed["field"], failed["message"]), (0, *refusal))
                self.assertEqual(len(MP.events()), 1 if stored else 0)
                if refusal:
                    (record_kept,) = MP.rejected()
                    self.assertEqual((record_kept["field"], record_kept["reason"], record_kept["endpoint"],
                                      record_kept["record"]), (*refusal, path, record))

    def test_track_future_time_is_overwritten_with_now(self):
        _post("/track", [_event(time=T0 + 3600)])
        self.assertEqual(MP.events()[0]["properties"]["time"], T0)

    def test_non_strict_import_fills_what_strict_requires(self):
        # The Python SDK's merge sends no time, distinct_id or $insert_id (sdks.md §1.2).
        body = _form(data=json.dumps([{"event": "e", "properties": {"token": TOKEN}}]), verbose=1)
        self.assertEqual(_json("POST", "/import", body), (200, {"status": 1, "error": None}))
        props = MP.events()[0]["properties"]
        self.assertEqual(props["time"], T0)
        self.assertNotIn("distinct_id", props)
        self.assertRegex(props["$insert_id"], r"^[0-9a-f]{32}$")

    def test_strict_is_by_dialect_and_parameter(self):
        bare = [{"event": "e", "properties": {"token": TOKEN, "time": T0}}]  # no distinct_id, no $insert_id
        cases = [("/import", "json", "", 400), ("/import", "json", "?strict=0", 200),
                 ("/import", "form", "", 200), ("/import", "form", "?strict=1", 400)]
        for path, dialect, query, status in cases:
            with self.subTest(dialect=dialect, query=query):
                MP.reset()
                if dialect == "json":
                    got = _http("POST", path + query, json.dumps(bare))[0]
                else:
                    got = _http("POST", path + query, _form(data=json.dumps(bare)))[0]
                self.assertEqual(got, status)
                self.assertEqual(len(MP.events()), 1 if status == 200 else 0)

    def test_strict_partial_failure_keeps_the_valid_records(self):
        batch = [_full("ok1"), _full("bad", time=T0 + 7200), _full("ok2")]
        status, answer = _post("/import", batch)
        self.assertEqual((status, answer["num_records_imported"], answer["status"]), (400, 2, "Bad Request"))
        self.assertEqual(answer["failed_records"], [{
            "index": 1, "insert_id": batch[1]["properties"]["$insert_id"], "field": "properties.time",
            "message": TIME_ERR + "must not be in the future"}])
        self.assertEqual([e["event"] for e in MP.events()], ["ok1", "ok2"])

    def test_non_strict_answers_1_if_any_landed_else_0(self):
        self.assertEqual(_post("/track", [_event(time=T0 - 6 * DAY), _event()]), (200, 1))
        self.assertEqual(_post("/track?verbose=1", [_event(time=T0 - 6 * DAY)]), (200, {
            "status": 0, "error": TIME_ERR + "/track only accepts events from the last 5 days; "
                                             "send older events to /import"}))

    def test_invalid_utf8_is_refused_per_field(self):
        # R-import: "properties.utm_source is invalid: string should be valid utf8".
        good = json.dumps(_event("ok")).encode()
        bad = b'{"event":"bad","properties":{"token":"' + TOKEN.encode() + b'","utm_source":"a\xffb"}}'
        bad = bad.replace(b"\\xff", b"\xff")
        for label, body in [("raw bytes", b"[" + good + b"," + bad + b"]"),
                            ("lone surrogate", b"[" + good + b",{\"event\":\"bad\",\"properties\":"
                             b"{\"token\":\"" + TOKEN.encode() + b"\",\"utm_source\":\"\\ud800\"}}]")]:
            with self.subTest(label):
                MP.reset()
                status, _, answer = _http("POST", "/track?verbose=1", body)
                self.assertEqual(json.loads(answer), {"status": 1, "error": None})
                self.assertEqual([e["event"] for e in MP.events()], ["ok"])
                (record,) = MP.rejected()
                self.assertEqual((record["field"], record["reason"]),
                                 ("properties.utm_source", "properties.utm_source is invalid: "
                                                           "string should be valid utf8"))

    def test_strings_and_names_truncated_to_255_characters(self):
        # R-import "Common Issues": truncated to 255 characters (code points, not bytes).
        long_name = "n" * 300
        props = {"ascii": "a" * 300, "emoji": "😀" * 300, "cjk": "漢" * 256, "short": "é" * 255,
                 long_name: 1, "nested": ["b" * 256, {"deep": "c" * 400}]}
        _post("/track", [_event(**props)])
        stored = MP.events()[0]["properties"]
        self.assertEqual(stored["ascii"], "a" * 255)
        self.assertEqual(stored["emoji"], "😀" * 255)
        self.assertEqual(len(stored["emoji"].encode("utf-8")), 1020)
        self.assertEqual(stored["cjk"], "漢" * 255)
        self.assertEqual(stored["short"], "é" * 255)
        self.assertEqual(stored["n" * 255], 1)
        self.assertNotIn(long_name, stored)
        self.assertEqual(stored["nested"], ["b" * 255, {"deep": "c" * 255}])
        _engage({"$set": {"bio": "z" * 300, long_name: "v"}, "$ignore_time": True})
        self.assertEqual(MP.profile("u"), {"bio": "z" * 255, "n" * 255: "v"})

    def test_ignore_drops_the_event_without_an_error(self):
        # D-bot / D-reserved: $ignore makes ingestion drop the event silently.
        self.assertEqual(_post("/track", [_event(**{"$ignore": True})]), (200, 1))
        self.assertEqual(_post("/import", [_full(**{"$ignore": True}), _full("kept")]),
                         (200, {"code": 200, "num_records_imported": 2, "status": "OK"}))
        self.assertEqual([e["event"] for e in MP.events()], ["kept"])
        dropped = MP.rejected()
        self.assertEqual([(r["dropped"], r["reason"]) for r in dropped],
                         [(True, "$ignore is set: Mixpanel drops the event")] * 2)

    def test_batches_over_2000_records_are_413(self):
        batch = [_full(str(i)) for i in range(2001)]
        self.assertEqual(_post("/import", batch), (413, {
            "code": 413, "error": "request exceeds max limit of 2000 records (it has 2001)",
            "status": "Request Entity Too Large"}))
        self.assertEqual(_post("/track", batch), (413, 0))
        self.assertEqual(_post("/engage?verbose=1", [{"$token": TOKEN, "$distinct_id": "u", "$set": {}}] * 2001),
                         (413, {"status": 0, "error": "request exceeds max limit of 2000 records (it has 2001)"}))
        self.assertEqual(MP.events(), [])
        self.assertEqual(_post("/import", batch[:2000])[1]["num_records_imported"], 2000)

    def test_event_over_1mb_is_refused_in_failed_records(self):
        # The 413 page: an oversized event "may be reported in failed_records on a 400".
        big = _full("big", **{f"p{i}": ["x" * 250] * 30 for i in range(140)})
        status, answer = _post("/import", [big, _full("small")])
        self.assertEqual((status, answer["num_records_imported"]), (400, 1))
        self.assertEqual(answer["failed_records"][0]["message"],
                         "event is invalid: must be smaller than 1MB of uncompressed JSON")

    def test_body_over_10mb_is_413_with_mixpanels_body(self):
        body = b"[" + b" " * (10 * 1024 * 1024) + b"]"
        status, _, answer = _http("POST", "/import", body, {"Content-Type": "application/json"})
        self.assertEqual((status, json.loads(answer)), (413, {
            "code": 413, "error": "request exceeds max limit of 10485760 bytes",
            "status": "Request Entity Too Large"}))

    def test_sdk_identify_shape_merges_in_original_projects(self):
        # The client SDKs send {distinct_id: new, $anon_distinct_id: previous} (sdks.md §3.5).
        MP.add_project(Project("orig_sdk", id_merge="original"))
        self.addCleanup(MP.reset, "orig_sdk")
        anon = "$device:" + UUID_B
        _post("/track", [_event("$identify", token="orig_sdk", distinct_id="user-7",
                                **{"$anon_distinct_id": anon})])
        self.assertEqual(MP.canonical(anon, project="orig_sdk"), "user-7")
        self.assertNotIn("$failure_reason", MP.events(project="orig_sdk")[0]["properties"])

    def test_a_trailing_newline_is_not_a_valid_insert_id(self):
        self.assertEqual(_post("/import", [_full(**{"$insert_id": "a" * 35 + "\n"})])[0], 400)

    def test_profile_ids_follow_event_string_rules(self):
        long_id = "i" * 300
        _post("/track", [_event(distinct_id=long_id)])
        _engage_as(long_id, {"$set": {"a": 1}, "$ignore_time": True})
        self.assertEqual(MP.events()[0]["properties"]["distinct_id"], "i" * 255)
        self.assertEqual(MP.profiles(), {"i" * 255: {"a": 1}})
        _engage_as(long_id, {"$set": {"k" * 300: 1}, "$ignore_time": True})
        _engage_as(long_id, {"$unset": ["k" * 300], "$ignore_time": True})
        self.assertEqual(MP.profile(long_id), {"a": 1})

    def test_names_that_collide_once_cut_are_refused(self):
        self.assertEqual(_post("/track?verbose=1", [_event(**{"n" * 255: "exact", "n" * 256: "long"})]), (200, {
            "status": 0, "error": "'properties' is invalid: two property names are the same once cut to 255 "
                                  "characters: nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn..."}))

    def test_profile_lists_stop_at_256kb(self):
        # D-types: a profile list holds at most 256KB, however it grew.
        for first in range(0, 1200, 100):
            _http("POST", "/engage", json.dumps([{"$token": TOKEN, "$distinct_id": "u", "$ignore_time": True,
                                                  "$append": {"l": f"{i:04d}" + "x" * 250}}
                                                 for i in range(first, first + 100)]))
        stored = MP.profile("u")["l"]
        self.assertLessEqual(len(json.dumps(stored, separators=(",", ":"))), 256 * 1024)
        self.assertGreater(len(json.dumps(stored, separators=(",", ":"))), 256 * 1024 - 300)
        self.assertEqual(MP.rejected()[0]["reason"],
                         "Engage API error: '$append.l' is invalid: the list would exceed 256KB")

    def test_update_over_1mb_is_refused(self):
        big = {"$set": {f"p{i}": ["y" * 250] * 30 for i in range(140)}}
        self.assertEqual(_engage(big)[2], b"0")
        self.assertEqual(MP.rejected()[0]["reason"],
                         "Engage API error: update is invalid: must be smaller than 1MB of uncompressed JSON")

    def test_ip_property_is_not_stored(self):
        # D-reserved: ip is used for geolocation, then discarded.
        _post("/track", [_event(ip="203.0.113.9", kept=1)])
        self.assertNotIn("ip", MP.events()[0]["properties"])

    def test_strict_import_shape_rules(self):
        record = dict(_full(), extra=1)
        self.assertEqual(_post("/import", [record])[1]["failed_records"][0]["message"],
                         "'extra' is not allowed: a record has only 'event' and 'properties'")
        self.assertEqual(_post("/import", [record], "?strict=0")[1]["num_records_imported"], 1)
        self.assertEqual(_post("/import", []), (400, {"code": 400, "error": "the request holds no records",
                                                      "status": "Bad Request"}))
        status, _, body = _http("POST", "/import?strict=1", _form(data=json.dumps([_full()] * 2001)))
        self.assertEqual((status, json.loads(body)["code"]), (413, 413))

    def test_profile_of_more_than_2000_properties_is_refused(self):
        # $last_seen, Mixpanel's own stamp, does not count.
        _engage({"$set": {f"p{i}": i for i in range(1999)}})
        self.assertEqual(len(MP.profile("u")), 2000)
        self.assertEqual(_engage({"$set": {"a": 1}})[2], b"1")
        self.assertEqual(_engage({"$set": {"b": 1}})[2], b"0")
        self.assertEqual(len(MP.profile("u")), 2001)
        self.assertEqual(MP.rejected()[0]["reason"],
                         "Engage API error: profile would have 2001 properties; the limit is 2000")


class TestDedup(_ServerTestCase):
    """R-dedup: reports count one event per (event, distinct_id, time, $insert_id)."""

    def test_duplicates_collapse_in_reports_but_not_in_raw_storage(self):
        first = _full("Paid", amount=1, **{"$insert_id": "same"})
        again = _full("Paid", amount=2, **{"$insert_id": "same"})
        other_time = _full("Paid", amount=3, time=T0 - 30, **{"$insert_id": "same"})
        _post("/import", [first, _full("Other"), again, other_time])
        self.assertEqual([e["event"] for e in MP.events()], ["Paid", "Other", "Paid", "Paid"])
        deduped = MP.events(dedup=True)
        self.assertEqual([(e["event"], e["properties"].get("amount")) for e in deduped],
                         [("Other", None), ("Paid", 2), ("Paid", 3)])
        _, listing = _json("GET", "/__parlel/events?dedup=1")
        self.assertEqual(listing["count"], 3)

    def test_events_without_insert_id_are_never_merged(self):
        _post("/track", [_event("Tap", distinct_id="u", time=T0), _event("Tap", distinct_id="u", time=T0)])
        self.assertEqual(len(MP.events(dedup=True)), 2)

    def test_same_key_in_two_projects_is_two_events(self):
        _post("/import", [_full("E", token="p1", **{"$insert_id": "k"}),
                          _full("E", token="p2", **{"$insert_id": "k"})])
        self.assertEqual(len(MP.events(dedup=True)), 2)


class TestIdentitySimplified(_ServerTestCase):
    """D-idm (Simplified ID Merge, the default) and AK's probes."""

    def test_distinct_id_comes_from_user_id_or_device_id(self):
        _post("/track", [_event("a", **{"$device_id": "D1"}),
                         _event("b", distinct_id="ignored", **{"$user_id": "U1", "$device_id": "D1"}),
                         _event("c", **{"$device_id": "$device:D2"}),
                         _event("d", distinct_id="plain")])
        self.assertEqual([(e["properties"].get("distinct_id"), e["properties"].get("$device_id"))
                          for e in MP.events()],
                         [("$device:D1", "D1"), ("U1", "D1"), ("$device:D2", "D2"), ("plain", None)])

    def test_first_pair_links_the_device_for_good(self):
        _post("/track", [_event("anon", **{"$device_id": "D"}),
                         _event("login", **{"$device_id": "D", "$user_id": "U"}),
                         _event("other login", **{"$device_id": "D", "$user_id": "V"})])
        self.assertEqual(MP.canonical("$device:D"), "U")
        self.assertEqual(MP.canonical("U"), "U")
        self.assertEqual(MP.canonical("V"), "V")
        last = MP.events()[-1]["properties"]
        self.assertEqual((last["distinct_id"], last["$identity_failure_reason"]),
                         ("V", "errAnonDistinctIdAssignedAlready"))

    def test_many_devices_one_user_and_users_never_merge(self):
        _post("/track", [_event(**{"$device_id": f"D{i}", "$user_id": "U"}) for i in range(600)])
        self.assertEqual({MP.canonical(f"$device:D{i}") for i in range(600)}, {"U"})
        _post("/import", [_full("$merge", **{"$distinct_ids": ["U", "W"]})], "?strict=0")
        self.assertEqual(MP.canonical("W"), "W")

    def test_profiles_stay_on_the_id_they_were_set_on(self):
        # D-idm FAQ: device profiles are not carried over when the device is linked.
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "$device:D",
                                             "$set": {"anon": True}, "$ignore_time": True}))
        _post("/track", [_event(**{"$device_id": "D", "$user_id": "U"})])
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "$device:D",
                                             "$set": {"later": 1}, "$ignore_time": True}))
        self.assertEqual(MP.profiles(), {"$device:D": {"anon": True, "later": 1}})

    def test_identity_events_refuse_a_strict_import_whole(self):
        batch = [_full("fine"), _full("$identify", **{"$identified_id": "U", "$anon_id": "A"})]
        self.assertEqual(_post("/import", batch), (400, {
            "code": 400, "error": "some data points in the request failed validation",
            "failed_records": ["identity events are not allowed when project is using simplified "
                               "identity management"], "num_records_imported": 0, "status": "Bad Request"}))
        self.assertEqual(MP.events(), [])
        self.assertEqual([r["index"] for r in MP.rejected()], [0, 1])

    def test_identity_events_elsewhere_are_ordinary_events(self):
        _post("/track", [_event("$identify", distinct_id="U", **{"$identified_id": "U", "$anon_id": "A"}),
                         _event("$create_alias", distinct_id="U", alias="B")])
        self.assertEqual(len(MP.events()), 2)
        self.assertEqual((MP.canonical("A"), MP.canonical("B")), ("A", "B"))


ORIGINAL = "tok_original"
UUID_A = "3f2b9c1e-7d4a-4f6b-9a2c-1e5d7b8c9a01"
UUID_B = "8c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"


class TestIdentityOriginal(_ServerTestCase):
    """Original ID Merge: R-ident, D-idm, and the failure reasons of
    Mixpanel's identity-merge FAQ ($failure_reason / $failure_description)."""

    def setUp(self):
        super().setUp()
        MP.add_project(Project(ORIGINAL, id_merge="original"))
        self.addCleanup(MP.reset, ORIGINAL)

    def track(self, name, **props):
        return _post("/track", [_event(name, token=ORIGINAL, **props)])

    def props(self, index=-1):
        return MP.events(project=ORIGINAL)[index]["properties"]

    def test_identify_merges_a_uuid4_anon_id(self):
        self.assertEqual(self.track("$identify", **{"$identified_id": "user-1", "$anon_id": UUID_A}), (200, 1))
        self.assertEqual(MP.canonical(UUID_A, project=ORIGINAL), "user-1")
        self.assertEqual(self.props()["distinct_id"], "user-1")  # inferred from $identified_id
        self.assertNotIn("$failure_reason", self.props())

    def test_identify_failures_are_accepted_and_explained(self):
        cases = [
            ({"$identified_id": "u", "$anon_id": "not-a-uuid"}, "errAnonDistinctIdNonGUIDForm",
             "$anon_distinct_id didn't match expected GUID pattern: not-a-uuid"),
            ({"$identified_id": UUID_A, "$anon_id": UUID_A}, "errSameIDs",
             f"Identified and anon ID are same in the identify request {UUID_A}"),
        ]
        for props, reason, description in cases:
            with self.subTest(reason):
                MP.reset(ORIGINAL)
                self.assertEqual(self.track("$identify", **props), (200, 1))
                self.assertEqual((self.props()["$failure_reason"], self.props()["$failure_description"]),
                                 (reason, description))
                self.assertEqual(MP.canonical(props["$anon_id"], project=ORIGINAL), props["$anon_id"])

    def test_anon_id_identified_twice(self):
        self.track("$identify", **{"$identified_id": "u1", "$anon_id": UUID_A})
        self.track("$identify", **{"$identified_id": "u2", "$anon_id": UUID_A})
        self.assertEqual(self.props()["$failure_reason"], "errAnonDistinctIdAssignedAlready")
        self.assertEqual(self.props()["$failure_description"], f"$anon_distinct_id already identified: {UUID_A}")
        self.assertEqual(MP.canonical(UUID_A, project=ORIGINAL), "u1")
        self.track("$identify", **{"$identified_id": "u1", "$anon_id": UUID_A})
        self.assertNotIn("$failure_reason", self.props())

    def test_create_alias_maps_one_way_and_once(self):
        self.track("$create_alias", distinct_id="user-1", alias="a@example.com")
        self.assertEqual(MP.canonical("a@example.com", project=ORIGINAL), "user-1")
        self.track("$create_alias", distinct_id="user-2", alias="a@example.com")
        self.assertEqual((self.props()["$failure_reason"], self.props()["$failure_description"]),
                         ("errAliasAlreadyExists", "alias already exists with the id"))
        self.assertEqual(MP.canonical("a@example.com", project=ORIGINAL), "user-1")
        self.assertEqual(MP.canonical("user-2", project=ORIGINAL), "user-2")

    def test_merge_only_through_import(self):
        merge = _full("$merge", token=ORIGINAL, **{"$distinct_ids": ["a", "b"]})
        self.assertEqual(_post("/track?verbose=1", [merge]),
                         (200, {"status": 0, "error": "$merge is only accepted by /import"}))
        self.assertEqual(_post("/import", [merge])[0], 200)
        self.assertEqual(MP.canonical("b", project=ORIGINAL), "a")
        bad = _full("$merge", token=ORIGINAL, **{"$distinct_ids": ["a"]})
        self.assertEqual(_post("/import", [bad])[1]["failed_records"][0]["message"],
                         "'properties.$distinct_ids' is invalid: must hold exactly 2 distinct_ids")

    def test_clusters_cap_at_500_ids(self):
        merges = [_full("$merge", token=ORIGINAL, **{"$distinct_ids": ["hub", f"id{i}"]}) for i in range(498)]
        _post("/import", merges)
        _post("/import", [_full("$merge", token=ORIGINAL, **{"$distinct_ids": ["x", "y"]}),
                          _full("$merge", token=ORIGINAL, **{"$distinct_ids": ["hub", "x"]})])
        self.assertEqual((self.props()["$failure_reason"], self.props()["$failure_description"]),
                         ("errManyIDs", "too many distinctIDs mapped together, Cluster size: 501 Max limit: 500"))
        self.assertEqual(MP.canonical("x", project=ORIGINAL), "x")
        _post("/import", [_full("$merge", token=ORIGINAL, **{"$distinct_ids": ["hub", "z"]})])
        self.assertEqual(MP.canonical("z", project=ORIGINAL), "hub")  # 500 exactly is allowed

    def engage(self, distinct_id, **update):
        return _http("POST", "/engage", json.dumps(dict(
            {"$token": ORIGINAL, "$distinct_id": distinct_id, "$ignore_time": True}, **update)))

    def test_profiles_follow_the_cluster(self):
        self.engage(UUID_A, **{"$set": {"anon": 1}})
        self.track("$identify", **{"$identified_id": "u", "$anon_id": UUID_A})
        # Only the absorbed id had a profile: it moves to the canonical id.
        self.assertEqual(MP.profiles(project=ORIGINAL), {"u": {"anon": 1}})
        self.engage(UUID_A, **{"$set": {"via_anon": 2}})
        self.assertEqual(MP.profiles(project=ORIGINAL), {"u": {"anon": 1, "via_anon": 2}})
        # $ignore_alias applies to the literal id (OAS delete-profile).
        self.engage(UUID_A, **{"$set": {"literal": 3}, "$ignore_alias": True})
        self.assertEqual(MP.profile(UUID_A, project=ORIGINAL), {"literal": 3})
        # $delete follows the alias to the canonical profile.
        self.engage(UUID_A, **{"$delete": ""})
        self.assertEqual(MP.profiles(project=ORIGINAL), {UUID_A: {"literal": 3}})

    def test_merging_two_profiles_keeps_the_canonical_ones(self):
        self.engage("a", **{"$set": {"who": "a"}})
        self.engage("b", **{"$set": {"who": "b"}})
        _post("/import", [_full("$merge", token=ORIGINAL, **{"$distinct_ids": ["a", "b"]})])
        self.assertEqual(MP.profiles(project=ORIGINAL), {"a": {"who": "a"}})

    def test_identity_events_need_their_properties(self):
        self.assertEqual(_post("/track?verbose=1", [_event("$identify", token=ORIGINAL, **{"$anon_id": UUID_A})]),
                         (200, {"status": 0, "error": "'properties.$identified_id' is invalid: must not be missing"}))
        self.assertEqual(_post("/track?verbose=1", [_event("$create_alias", token=ORIGINAL, distinct_id="u")]),
                         (200, {"status": 0, "error": "'properties.alias' is invalid: must not be missing"}))

    def test_strict_import_without_distinct_id_is_refused(self):
        # AK: Original projects answer "'properties.distinct_id' is invalid: must not be missing".
        record = {"event": "e", "properties": {"token": ORIGINAL, "time": T0, "$insert_id": "i1",
                                               "$device_id": "D"}}
        self.assertEqual(_post("/import", [record])[1]["failed_records"][0]["message"],
                         "'properties.distinct_id' is invalid: must not be missing")


# =============================================================================
# The expression language (query-api.md §7): parser and evaluator directly
# =============================================================================


def _ev(text, props=None, **scope):
    expression = mixpanel_fake._compile_expression(text)
    return expression.value(props or {}, mixpanel_fake._Scope(**scope))


class TestExpressions(unittest.TestCase):
    UNDEF = mixpanel_fake._UNDEF

    # (expression, properties, value); sources in query-api.md §7.4-7.5, §7.8.
    VALUES = [
        # == is typed: different types are never equal (D-SE).
        ('properties["a"] == "5"', {"a": "5"}, True),
        ('properties["a"] == 5', {"a": "5"}, False),
        ('properties["a"] == 5', {"a": 5.0}, True),
        ('properties["a"] == 1', {"a": True}, False),
        ('properties["a"] == true', {"a": True}, True),
        ('properties["a"] = "x"', {"a": "x"}, True),
        ('properties["a"] != "x"', {}, True),                      # undefined != "x"
        ('properties["a"] == null', {"a": None}, True),
        ('properties["missing"] == undefined', {}, True),
        # Ordering: numbers, strings, datetimes; mixed types are undefined.
        ('properties["n"] > 10', {"n": 11}, True),
        ('properties["n"] > 10', {"n": "11"}, UNDEF),
        ('10 < properties["n"]', {"n": 11}, True),
        ('properties["s"] < "b"', {"s": "a"}, True),
        ('properties["$time"] >= datetime(1700000000)', {"time": 1700000001}, True),
        ('properties["$time"] < datetime("2023-11-14T22:13:21")', {"time": 1700000000}, True),
        ('properties["$last_seen"] >= "2021-01-01T00:00:00"', {"$last_seen": "2022-05-01T00:00:00"}, True),
        ('event["$time"] >= datetime("2023-11-14")', {"time": 1700000000}, True),
        # in: substring, or list membership (D-SE).
        ('"gmail" in properties["$email"]', {"$email": "x@gmail.com"}, True),
        ('properties["account_id"] in [1,2,3,4]', {"account_id": 3}, True),
        ('"v" in properties["tags"]', {"tags": ["u", "v"]}, True),
        ('5 in properties["s"]', {"s": "5"}, UNDEF),
        # not binds looser than in (HELP-SEG); undefined -> true.
        ('not "Facebook" in properties["ref"]', {"ref": "google.com"}, True),
        ('not properties["missing"]', {}, True),
        ('not properties["s"]', {"s": "x"}, UNDEF),
        ('not defined(properties["city"])', {}, True),
        # and / or treat undefined as false.
        ('properties["a"] == 1 or properties["b"] > 1', {"b": 2}, True),
        ('properties["n"] > 1 and true', {"n": "x"}, False),
        ('TRUE AND FALSE OR true', {}, True),
        # Arithmetic: numbers only; /0 undefined; % keeps the dividend's sign.
        ('properties["price"] - properties["overhead"]', {"price": 5, "overhead": 2}, 3),
        ('properties["a"] + properties["b"]', {"a": "x", "b": "y"}, "xy"),
        ('properties["a"] + 1', {"a": "1"}, UNDEF),
        ('1 / 0', {}, UNDEF),
        ('-7 % 3', {}, -1.0),
        ('2 + 3 * 4', {}, 14),
        ('(2 + 3) * 4', {}, 20),
        ('-properties["n"]', {"n": 4}, -4),
        # Functions (D-SE, D-HOT, D-types).
        ('defined(properties["a"])', {"a": None}, True),
        ('defined (properties["a"])', {}, False),
        ('string(properties["n"])', {"n": 3}, "3"),
        ('string(properties["n"])', {"n": 2.5}, "2.5"),
        ('string(properties["b"])', {"b": False}, "false"),
        ('string(properties["k"], "undefined")', {}, "undefined"),
        ('number(properties["s"])', {"s": "12.5"}, 12.5),
        ('number(properties["s"])', {"s": "abc"}, UNDEF),
        ('number(properties["b"])', {"b": True}, 1.0),
        ('boolean(properties["s"])', {"s": "false"}, False),
        ('boolean(properties["s"])', {"s": "no"}, True),
        ('boolean(properties["n"])', {"n": 0}, False),
        ('boolean(properties["x"]) == true', {}, False),
        ('floor(2.7)', {}, 2),
        ('ceil(2.1)', {}, 3),
        ('round(2.5)', {}, 3),
        ('round(-2.5)', {}, -3),
        ('round("2.5")', {}, UNDEF),
        ('any(X, properties["k"], X = "v")', {"k": ["a", "v"]}, True),
        ('any(X, properties["k"], X == "v")', {"k": "v"}, False),
        ('properties["a"]["b"] == 1', {"a": {"b": 1}}, True),
        ('properties["a"][1]', {"a": [5, 6]}, 6),
        ('properties["a"]["zz"]', {"a": {}}, UNDEF),
        ('properties["we\\"ird"] == 1', {'we"ird': 1}, True),
        ('properties["name with space"] == "x"', {"name with space": "x"}, True),
        # The official hot-shard script (D-HOT).
        ('((defined (properties["k"])) AND ((any(X, properties["k"], X="v")) OR (string(properties["k"], '
         '"undefined") == "v"))) AND (number(properties["mp_processing_time_ms"]) < 1690000000000)',
         {"k": "v", "mp_processing_time_ms": 5}, True),
    ]

    def test_values(self):
        for text, props, expected in self.VALUES:
            with self.subTest(text):
                got = _ev(text, props)
                self.assertEqual(got, expected)
                self.assertIs(type(got), type(expected))

    def test_user_event_and_behaviors_accessors(self):
        self.assertIs(_ev('user["age"] > 30', {}, user={"age": 31}), True)
        self.assertIs(_ev('user["age"] > 30', {}), self.UNDEF)
        self.assertIs(_ev('behaviors["b1"] > 0', {}, behaviors={"b1": 2}), True)

    # (expression, exact message); messages say what and where (style.md 2.6).
    ERRORS = [
        ('properties["a"] ==', "incomplete expression; expected a value (at end of expression)"),
        ('properties[a]', "unexpected 'a'; expected a property name in quotes after properties[ (at column 12)"),
        ('foo(1)', "unknown function 'foo' (at column 1)"),
        ('(1', "incomplete expression; expected ')' (at end of expression)"),
        ('"abc', "unterminated string (at column 1)"),
        ('x == 1', "unknown name 'x' (at column 1)"),
        ('1 2', "unexpected '2'; expected an operator or the end of the expression (at column 3)"),
        ('', "empty expression (at end of expression)"),
        ('defined(1, 2)', "defined() takes 1 argument(s), got 2 (at column 1)"),
        ('string()', "string() takes 1 or 2 argument(s), got 0 (at column 1)"),
        ('properties["a"] # 1', "unexpected character '#' (at column 17)"),
        ('[1, 2', "incomplete expression; expected ',' or ']' (at end of expression)"),
        ('any(1, [1], true)', "unexpected '1'; expected a variable name as the first argument of any() (at column 5)"),
        ('(' * 70 + '1' + ')' * 70, "expression nested more than 64 deep (at column 65)"),
        ('1 + ' * 6000 + '1', "expression longer than 20000 characters (at column 1)"),
    ]

    def test_error_messages(self):
        for text, message in self.ERRORS:
            with self.subTest(text[:40]):
                with self.assertRaises(mixpanel_fake.ExpressionError) as caught:
                    mixpanel_fake._compile_expression(text)
                self.assertEqual(str(caught.exception), message)

    def test_and_or_with_other_types_is_an_error(self):
        # D-SE: "Any other types will result in an error."
        expression = mixpanel_fake._compile_expression('properties["s"] and true')
        with self.assertRaises(mixpanel_fake.ExpressionError) as caught:
            expression.matches({"s": "x"})
        self.assertEqual(str(caught.exception), "'and' needs true, false or undefined on each side, got a string")

    def test_where_keeps_only_true(self):
        matches = mixpanel_fake._compile_expression('properties["n"] > 1').matches
        self.assertEqual([matches({"n": 2}), matches({"n": "2"}), matches({})], [True, False, False])

    def test_compiled_once_and_fused(self):
        first = mixpanel_fake._compile_expression('properties["plan"] == "pro" and properties["amount"] > 10')
        self.assertIs(first, mixpanel_fake._compile_expression(
            'properties["plan"] == "pro" and properties["amount"] > 10'))
        # A property compared with a constant is one closure (not three).
        fused = mixpanel_fake._compile(("cmp", ">", ("prop", "properties", "amount"), ("lit", 10)))
        self.assertEqual(fused.__qualname__, "_fuse.<locals>.ordered")

    def test_deep_nesting_cannot_exhaust_the_stack(self):
        for text in ("not " * 5000 + "true", "-" * 5000 + "1", "[" * 5000 + "]" * 5000):
            with self.subTest(text[:10]):
                with self.assertRaises(mixpanel_fake.ExpressionError):
                    mixpanel_fake._compile_expression(text[:19000])


# =============================================================================
# The query API over HTTP, against hand-computed answers
# =============================================================================

QT = "q_tok"          # UTC project
LA = "q_la"           # America/Los_Angeles project, same events


def _at(text):
    """Epoch seconds of a UTC time written YYYY-MM-DDTHH:MM."""
    return int(datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M").replace(
        tzinfo=datetime.timezone.utc).timestamp())


def _q(path, params=None, token=QT, method="GET", headers=None):
    """Call a query endpoint with the project's secret (secret = token here)."""
    query = urllib.parse.urlencode(params or {})
    auth = _basic(token) if token else {}
    status, head, body = _http(method, f"/api/2.0/{path}?{query}", headers=dict(auth, **(headers or {})))
    return status, head, body


def _qj(path, params=None, token=QT, **kw):
    status, _, body = _q(path, params, token, **kw)
    return status, json.loads(body)


DATASET = [
    # u1 signs up on 11-10, pays an hour later and again two days later.
    ("Signed Up", "u1", "2026-11-10T09:00", {"plan": "pro", "amount": 20}),
    ("Paid", "u1", "2026-11-10T10:00", {"amount": 9}),
    ("Paid", "u1", "2026-11-12T08:00", {"amount": 9}),
    # u2 signs up late on 11-10 (UTC) and never pays; the event arrives twice.
    ("Signed Up", "u2", "2026-11-10T23:30", {"plan": "free", "amount": 5, "$insert_id": "dup-1"}),
    ("Signed Up", "u2", "2026-11-10T23:30", {"plan": "free", "amount": 5, "$insert_id": "dup-1"}),
    # u3 signs up early on 11-11 (UTC) -- still 11-10 in Los Angeles -- and pays.
    ("Signed Up", "u3", "2026-11-11T01:00", {"plan": "pro", "amount": "12"}),
    ("Paid", "u3", "2026-11-11T02:00", {"amount": 9}),
]


class _QueryTestCase(_ServerTestCase):

    def setUp(self):
        super().setUp()
        MP.add_project(Project(QT))
        MP.add_project(Project(LA, timezone="America/Los_Angeles"))
        self.addCleanup(MP.reset)
        for token in (QT, LA):
            batch = []
            for index, (name, who, when, extra) in enumerate(DATASET):
                props = dict({"distinct_id": who, "time": _at(when), "$insert_id": f"e{index}"}, **extra)
                batch.append(_event(name, token=token, **props))
            self.assertEqual(_post("/import", batch)[0], 200)
        people = [{"$token": QT, "$distinct_id": "u1", "$set": {"plan": "pro", "age": 30}},
                  {"$token": QT, "$distinct_id": "u2", "$set": {"plan": "free", "age": 20}},
                  {"$token": QT, "$distinct_id": "u3", "$set": {"plan": "pro", "age": 40}}]
        _http("POST", "/engage", json.dumps([dict(p, **{"$ignore_time": True}) for p in people]))


class TestQueryRouting(_QueryTestCase):

    def test_both_prefixes_and_trailing_slash(self):
        params = {"event": "Signed Up", "from_date": "2026-11-10", "to_date": "2026-11-10"}
        answers = [_http("GET", f"{prefix}segmentation{slash}?{urllib.parse.urlencode(params)}", headers=_basic(QT))[2]
                   for prefix in ("/api/2.0/", "/api/query/") for slash in ("", "/")]
        self.assertEqual(len(set(answers)), 1)
        self.assertEqual(json.loads(answers[0])["data"]["values"], {"Signed Up": {"2026-11-10": 2}})

    def test_post_form_and_json_bodies(self):
        form = urllib.parse.urlencode({"event": "Paid", "from_date": "2026-11-12", "to_date": "2026-11-12"})
        status, _, body = _http("POST", "/api/query/segmentation", form, dict(_basic(QT), **{
            "Content-Type": "application/x-www-form-urlencoded"}))
        self.assertEqual(json.loads(body)["data"]["values"], {"Paid": {"2026-11-12": 1}})
        status, _, body = _http("POST", "/api/query/segmentation", json.dumps(
            {"event": "Paid", "from_date": "2026-11-12", "to_date": "2026-11-12"}),
            dict(_basic(QT), **{"Content-Type": "application/json"}))
        self.assertEqual(json.loads(body)["data"]["values"], {"Paid": {"2026-11-12": 1}})

    def test_unknown_endpoint_is_mixpanels_400(self):
        # LOG: {"request": "/api/2.0/webhooks?project_id=4025923", "error": "Invalid API endpoint"}
        self.assertEqual(_json("GET", "/api/2.0/webhooks?project_id=4025923"),
                         (400, {"request": "/api/2.0/webhooks?project_id=4025923", "error": "Invalid API endpoint"}))

    def test_jql_and_stream_are_not_emulated(self):
        for path in ("jql", "stream/query"):
            with self.subTest(path):
                status, body = _qj(path, method="POST")
                self.assertEqual(status, 400)
                self.assertIn("is not emulated by mixpanel_fake", body["error"])

    def test_auth(self):
        params = {"event": "Paid", "from_date": "2026-11-12", "to_date": "2026-11-12"}
        with MixpanelFake(projects=[Project("a1", project_id=101, api_secret="sec1",
                                           service_accounts={"sa.user": "sa-pass"}),
                                   Project("a2", project_id=102)]) as fake:
            def call(headers, query=""):
                qs = urllib.parse.urlencode(params) + query
                status, _, body = _http("GET", f"/api/2.0/segmentation?{qs}", headers=headers, port=fake.port)
                return status, json.loads(body)
            self.assertEqual(call(_basic("sa.user", "sa-pass"), "&project_id=101")[0], 200)
            self.assertEqual(call(_basic("sec1"))[0], 200)
            self.assertEqual(call({"Authorization": "Basic " + base64.b64encode(b"sec1").decode()})[0], 200)
            self.assertEqual(call(_basic("a2"))[0], 200)
            status, body = call({})
            self.assertEqual(status, 401)
            self.assertIn("exactly one project (it has 2)", body["error"])
            status, body = call(_basic("sa.user", "wrong"), "&project_id=101")
            self.assertEqual((status, body["error"][:41]), (401, "Unauthorized, invalid project secret. See"))

    def test_errors_echo_the_request(self):
        status, body = _qj("segmentation", {"event": "x", "from_date": "2026-11-10"})
        self.assertEqual((status, body), (400, {"request": "/api/2.0/segmentation?event=x&from_date=2026-11-10",
                                                "error": "to_date is a required parameter"}))
        status, body = _qj("segmentation", {"event": "x", "from_date": "1999-12-31", "to_date": "2026-11-10"})
        self.assertEqual(body["error"], "Error in from_date: invalid date, bad year")
        status, body = _qj("segmentation", {"event": "x", "from_date": "2026-11-10", "to_date": "2026-11-10",
                                            "where": 'properties["a" =='})
        self.assertEqual(body["error"], "invalid where: unexpected '=='; expected ']' (at column 16)")


class TestExport(_QueryTestCase):

    def export(self, token=QT, headers=None, **params):
        status, head, body = _q("export", params, token, headers=headers)
        return status, head, body

    def lines(self, **params):
        status, _, body = self.export(**params)
        self.assertEqual(status, 200, body)
        return [json.loads(line) for line in body.decode("utf-8").splitlines()]

    def test_every_copy_in_range_with_export_properties(self):
        rows = self.lines(from_date="2026-11-10", to_date="2026-11-11")
        self.assertEqual([(r["event"], r["properties"]["distinct_id"]) for r in rows],
                         [("Signed Up", "u1"), ("Paid", "u1"), ("Signed Up", "u2"), ("Signed Up", "u2"),
                          ("Signed Up", "u3"), ("Paid", "u3")])
        first = rows[0]["properties"]
        self.assertNotIn("token", first)
        self.assertEqual((first["time"], first["$insert_id"], first["$import"]), (_at("2026-11-10T09:00"), "e0", True))

    def test_dates_are_utc_days_and_inclusive(self):
        self.assertEqual(len(self.lines(from_date="2026-11-12", to_date="2026-11-12")), 1)
        self.assertEqual(len(self.lines(token=LA, from_date="2026-11-11", to_date="2026-11-11")), 2)

    def test_filters_limit_and_ms(self):
        self.assertEqual(len(self.lines(from_date="2026-11-10", to_date="2026-11-12", event='["Paid"]')), 3)
        rows = self.lines(from_date="2026-11-10", to_date="2026-11-12", where='properties["amount"] > 10')
        self.assertEqual([r["properties"]["distinct_id"] for r in rows], ["u1"])
        self.assertEqual(len(self.lines(from_date="2026-11-10", to_date="2026-11-12", limit=2)), 2)
        rows = self.lines(from_date="2026-11-12", to_date="2026-11-12", time_in_ms="true")
        self.assertEqual(rows[0]["properties"]["time"], _at("2026-11-12T08:00") * 1000)

    def test_errors_are_plain_text(self):
        for params, message in [
                ({"from_date": "2026-11-10", "to_date": "2026-11-15"}, b"to_date cannot be later than today"),
                ({"from_date": "2026-11-10", "to_date": "2026-11-11", "limit": 100001},
                 b"limit must be between 0 and 100000"),
                ({"to_date": "2026-11-11"}, b"from_date is a required parameter")]:
            with self.subTest(params):
                status, head, body = self.export(**params)
                self.assertEqual((status, head["content-type"], body), (400, "text/plain; charset=utf-8", message))

    def test_canonical_distinct_id_after_identity_merge(self):
        _post("/track", [_event("Viewed", token=QT, **{"$device_id": "d9", "time": T0 - 60}),
                         _event("Viewed", token=QT, **{"$device_id": "d9", "$user_id": "u1", "time": T0 - 30})])
        rows = self.lines(from_date="2026-11-14", to_date="2026-11-14")
        self.assertEqual([(r["properties"]["distinct_id"], r["properties"].get("$distinct_id_before_identity"))
                          for r in rows], [("u1", "$device:d9"), ("u1", None)])

    def test_streamed_and_gzipped_only_when_asked_and_large(self):
        status, head, body = self.export(from_date="2026-11-10", to_date="2026-11-12",
                                         headers={"Accept-Encoding": "gzip"})
        self.assertEqual((status, head.get("content-encoding")), (200, "gzip"))
        self.assertEqual(head.get("transfer-encoding"), "chunked")
        self.assertEqual(len(gzip.decompress(body).splitlines()), 7)
        status, head, body = self.export(from_date="2026-11-12", to_date="2026-11-12",
                                         headers={"Accept-Encoding": "gzip"})
        self.assertNotIn("content-encoding", head)  # 1 event: under 1400 bytes
        self.assertEqual(len(body.splitlines()), 1)
        status, head, body = self.export(from_date="2026-11-10", to_date="2026-11-12")
        self.assertNotIn("content-encoding", head)

    def test_non_ascii_written_raw(self):
        _post("/track", [_event("Café ☕", token=QT, time=T0 - 60)])
        status, _, body = self.export(from_date="2026-11-14", to_date="2026-11-14")
        self.assertIn("Café ☕".encode("utf-8"), body)

    def test_python_mirror(self):
        rows = MP.export(project=QT, from_date="2026-11-12", to_date="2026-11-12")
        self.assertEqual([r["event"] for r in rows], ["Paid"])


class TestSegmentation(_QueryTestCase):

    def seg(self, path="segmentation", token=QT, **params):
        params.setdefault("from_date", "2026-11-10")
        params.setdefault("to_date", "2026-11-12")
        status, body = _qj(path, params, token)
        self.assertEqual(status, 200, body)
        return body

    def test_counts_by_day_deduplicated_and_zero_filled(self):
        self.assertEqual(self.seg(event="Signed Up"), {
            "data": {"series": ["2026-11-10", "2026-11-11", "2026-11-12"],
                     "values": {"Signed Up": {"2026-11-10": 2, "2026-11-11": 1, "2026-11-12": 0}}},
            "legend_size": 1})

    def test_buckets_follow_the_project_timezone(self):
        body = self.seg(token=LA, event="Signed Up")
        self.assertEqual(body["data"]["values"], {"Signed Up": {"2026-11-10": 3, "2026-11-11": 0, "2026-11-12": 0}})

    def test_on_segments_with_top_limit(self):
        body = self.seg(event="Signed Up", on='properties["plan"]')
        self.assertEqual(body["data"]["values"], {"pro": {"2026-11-10": 1, "2026-11-11": 1, "2026-11-12": 0},
                                                  "free": {"2026-11-10": 1, "2026-11-11": 0, "2026-11-12": 0}})
        self.assertEqual(body["legend_size"], 2)
        self.assertEqual(list(self.seg(event="Signed Up", on='properties["plan"]', limit=1)["data"]["values"]), ["pro"])

    def test_units(self):
        week = self.seg(event="Paid", unit="week")["data"]
        self.assertEqual((week["series"], week["values"]), (["2026-11-09"], {"Paid": {"2026-11-09": 3}}))
        month = self.seg(event="Paid", unit="month")["data"]
        self.assertEqual(month["values"], {"Paid": {"2026-11-01": 3}})
        hour = self.seg(event="Paid", unit="hour", from_date="2026-11-11", to_date="2026-11-11")["data"]
        self.assertEqual(len(hour["series"]), 24)
        self.assertEqual(hour["values"]["Paid"]["2026-11-11 02:00:00"], 1)

    def test_unique_and_average_count_people(self):
        self.assertEqual(self.seg(event="Paid", type="unique", unit="week")["data"]["values"],
                         {"Paid": {"2026-11-09": 2}})
        self.assertEqual(self.seg(event="Paid", type="average", unit="week")["data"]["values"],
                         {"Paid": {"2026-11-09": 1.5}})

    def test_unique_counts_merged_identities_once(self):
        _post("/track", [_event("Viewed", token=QT, **{"$device_id": "d9", "time": T0 - 60}),
                         _event("Viewed", token=QT, **{"$device_id": "d9", "$user_id": "u1", "time": T0 - 30})])
        body = self.seg(event="Viewed", type="unique", from_date="2026-11-14", to_date="2026-11-14")
        self.assertEqual(body["data"]["values"], {"Viewed": {"2026-11-14": 1}})

    def test_where(self):
        body = self.seg(event="Signed Up", where='properties["plan"] == "pro" and properties["amount"] > 10')
        self.assertEqual(body["data"]["values"]["Signed Up"], {"2026-11-10": 1, "2026-11-11": 0, "2026-11-12": 0})

    def test_sum_and_average(self):
        # Non-numbers count as 0.0 (query-api.md §5.5): u3's amount is the string "12".
        self.assertEqual(self.seg("segmentation/sum", event="Signed Up", on='properties["amount"]')["results"],
                         {"2026-11-10": 25.0, "2026-11-11": 0.0, "2026-11-12": 0.0})
        body = self.seg("segmentation/average", event="Signed Up", on='properties["amount"]')
        self.assertEqual((body["status"], body["results"]),
                         ("ok", {"2026-11-10": 12.5, "2026-11-11": 0.0, "2026-11-12": 0.0}))

    def test_numeric_buckets(self):
        body = self.seg("segmentation/numeric", event="Signed Up", on='properties["amount"]', buckets=3)
        self.assertEqual(body["data"], {"series": ["2026-11-10"],
                                        "values": {"5 - 10": {"2026-11-10": 1}, "15 - 20": {"2026-11-10": 1}}})

    def test_runtime_expression_error_is_400(self):
        status, body = _qj("segmentation", {"event": "Signed Up", "from_date": "2026-11-10", "to_date": "2026-11-10",
                                            "where": 'properties["plan"] and true'})
        self.assertEqual((status, body["error"]), (400, "invalid expression: 'and' needs true, false or undefined "
                                                        "on each side, got a string"))

    def test_python_mirror(self):
        body = MP.segmentation(project=QT, event="Paid", from_date="2026-11-12", to_date="2026-11-12")
        self.assertEqual(body["data"]["values"], {"Paid": {"2026-11-12": 1}})


class TestEventsEndpoints(_QueryTestCase):

    def test_events_counts(self):
        status, body = _qj("events", {"event": '["Signed Up", "Paid"]', "type": "general", "unit": "day",
                                      "from_date": "2026-11-11", "to_date": "2026-11-12"})
        self.assertEqual(body, {"data": {"series": ["2026-11-11", "2026-11-12"], "values": {
            "Signed Up": {"2026-11-11": 1, "2026-11-12": 0}, "Paid": {"2026-11-11": 1, "2026-11-12": 1}}},
            "legend_size": 2})

    def test_seed_style_call_gets_defaults_and_the_events(self):
        status, body = _qj("events", {"event": '["Paid"]'})
        self.assertEqual(status, 200)
        self.assertEqual(len(body["data"]["series"]), 30)
        self.assertEqual(body["data"]["series"][-1], "2026-11-14")
        self.assertEqual(sum(body["data"]["values"]["Paid"].values()), 3)
        self.assertEqual([e["properties"]["distinct_id"] for e in body["events"]], ["u1", "u1", "u3"])

    def test_names_top_and_values(self):
        _post("/track", [_event("Opened", token=QT, time=T0 - 60), _event("Opened", token=QT, time=T0 - 30),
                         _event("Opened", token=QT, time=T0 - 86400)])
        # Most frequent first (MQP), ties by name: 3 of each here.
        self.assertEqual(_qj("events/names", {"type": "general"})[1], ["Opened", "Paid", "Signed Up"])
        self.assertEqual(_qj("events/top", {"type": "general"})[1],
                         {"events": [{"amount": 2, "event": "Opened", "percent_change": 1.0}], "type": "general"})
        self.assertEqual(_qj("events/properties/values", {"event": "Signed Up", "name": "plan"})[1], ["pro", "free"])
        top = _qj("events/properties/top", {"event": "Signed Up", "limit": 2})[1]
        self.assertEqual(list(top.values()), [{"count": 3}, {"count": 3}])

    def test_event_properties_by_value(self):
        status, body = _qj("events/properties", {"event": "Signed Up", "name": "plan", "type": "unique",
                                                 "unit": "day", "from_date": "2026-11-10", "to_date": "2026-11-11"})
        self.assertEqual(body["data"]["values"], {"pro": {"2026-11-10": 1, "2026-11-11": 1},
                                                  "free": {"2026-11-10": 1, "2026-11-11": 0}})


class TestFunnels(_QueryTestCase):

    def test_saved_funnel_listed_and_computed(self):
        funnel_id = MP.add_funnel("Signup to pay", ["Signed Up", "Paid"], window=1, project=QT)
        self.assertEqual(_qj("funnels/list")[1], [{"funnel_id": funnel_id, "name": "Signup to pay"}])
        status, body = _qj("funnels", {"funnel_id": funnel_id, "from_date": "2026-11-10", "to_date": "2026-11-12"})
        self.assertEqual(body["meta"], {"dates": ["2026-11-10", "2026-11-11", "2026-11-12"]})
        day10 = body["data"]["2026-11-10"]
        self.assertEqual([(s["count"], s["step_conv_ratio"], s["avg_time"]) for s in day10["steps"]],
                         [(2, 1, None), (1, 0.5, 3600)])
        self.assertEqual(day10["analysis"], {"completion": 1, "starting_amount": 2, "steps": 2, "worst": 1})
        self.assertEqual([s["count"] for s in body["data"]["2026-11-11"]["steps"]], [1, 1])
        self.assertEqual([s["count"] for s in body["data"]["2026-11-12"]["steps"]], [0, 0])

    def test_window_and_segments(self):
        status, body = _qj("funnels", {"events": '[{"event": "Signed Up"}, {"event": "Paid"}]', "length": 30,
                                       "length_unit": "minute", "from_date": "2026-11-10", "to_date": "2026-11-11",
                                       "unit": "week", "on": 'properties["plan"]'})
        week = body["data"]["2026-11-09"]
        self.assertEqual([s["count"] for s in week["$overall"]], [3, 0])  # paid after an hour: outside 30 min
        self.assertEqual([s["count"] for s in week["pro"]], [2, 0])

    def test_funnels_over_http_registration(self):
        status, _, body = _http("POST", "/__parlel/funnels", json.dumps(
            {"project": QT, "name": "F", "steps": ["Signed Up", "Paid"]}))
        funnel_id = json.loads(body)["funnel_id"]
        self.assertEqual(_json("GET", f"/__parlel/funnels?project={QT}")[1]["funnels"][0]["funnel_id"], funnel_id)
        status, body = _json("POST", "/__parlel/funnels", json.dumps({"project": QT, "name": "F", "steps": ["one"]}))
        self.assertEqual((status, body), (400, {"error": "a funnel needs at least 2 steps"}))

    def test_unknown_funnel(self):
        status, body = _qj("funnels", {"funnel_id": 999999, "from_date": "2026-11-10", "to_date": "2026-11-10"})
        self.assertEqual((status, body["error"]), (400, "funnel_id 999999 does not name a saved funnel"))


class TestRetention(_QueryTestCase):

    def test_birth_retention(self):
        status, body = _qj("retention", {"born_event": "Signed Up", "event": "Paid", "from_date": "2026-11-10",
                                         "to_date": "2026-11-11", "interval_count": 2})
        self.assertEqual(body, {"2026-11-10": {"counts": [1, 1, 0], "first": 2},
                                "2026-11-11": {"counts": [1, 0, 0], "first": 1}})

    def test_unbounded_accumulates_from_the_right(self):
        status, body = _qj("retention", {"born_event": "Signed Up", "event": "Paid", "from_date": "2026-11-10",
                                         "to_date": "2026-11-10", "interval_count": 2, "unbounded_retention": "true"})
        self.assertEqual(body["2026-11-10"]["counts"], [1, 1, 0])

    def test_addiction(self):
        status, body = _qj("retention/addiction", {"event": "Paid", "from_date": "2026-11-10", "to_date": "2026-11-12",
                                                   "unit": "week", "addiction_unit": "day"})
        self.assertEqual(body, {"data": {"2026-11-09": [2, 1, 0, 0, 0, 0, 0]}})


class TestEngageQuery(_QueryTestCase):

    def test_where_and_paging_with_a_frozen_session(self):
        status, page0 = _qj("engage", {"where": 'properties["age"] > 25', "page_size": 1}, method="POST")
        self.assertEqual((page0["total"], page0["page"], page0["status"]), (2, 0, "ok"))
        self.assertEqual(page0["results"], [{"$distinct_id": "u1", "$properties": {"plan": "pro", "age": 30}}])
        _http("POST", "/engage", json.dumps({"$token": QT, "$distinct_id": "u9", "$set": {"age": 99}}))
        session = {"session_id": page0["session_id"], "page_size": 1, "where": 'properties["age"] > 25'}
        self.assertEqual(_qj("engage", dict(session, page=1))[1]["results"][0]["$distinct_id"], "u3")
        self.assertEqual(_qj("engage", dict(session, page=2))[1]["results"], [])
        self.assertEqual(_qj("engage", {"page": 1})[1]["error"], "session_id is required for page > 0")

    def test_ids_outputs_cohorts_and_groups(self):
        body = _qj("engage", {"distinct_ids": '["u3", "u1", "nobody"]', "output_properties": '["age"]'})[1]
        self.assertEqual(body["results"], [{"$distinct_id": "u3", "$properties": {"age": 40}},
                                           {"$distinct_id": "u1", "$properties": {"age": 30}}])
        cohort = MP.add_cohort("Pros", where='properties["plan"] == "pro"', project=QT)
        body = _qj("engage", {"filter_by_cohort": json.dumps({"id": cohort}), "include_all_users": "false"})[1]
        self.assertEqual([r["$distinct_id"] for r in body["results"]], ["u1", "u3"])
        listing = _qj("cohorts/list", method="POST")[1]
        self.assertEqual([(c["id"], c["name"], c["count"], c["is_visible"]) for c in listing],
                         [(cohort, "Pros", 2, 1)])
        _http("POST", "/groups", json.dumps({"$token": QT, "$group_key": "company", "$group_id": "acme",
                                             "$set": {"size": 5}}))
        body = _qj("engage", {"data_group_id": "company"})[1]
        self.assertEqual(body["results"], [{"$distinct_id": "acme", "$properties": {"size": 5}}])

    def test_behaviors(self):
        behaviors = json.dumps([{"name": "payer", "window": "7d", "event_selectors": [{"event": "Paid"}]},
                                {"name": "big", "window": "1w", "event_selectors": [
                                    {"event": "Signed Up", "selector": 'properties["amount"] > 10'}]}])
        body = _qj("engage", {"behaviors": behaviors, "where": 'behaviors["payer"] > 1'})[1]
        self.assertEqual([r["$distinct_id"] for r in body["results"]], ["u1"])
        body = _qj("engage", {"behaviors": behaviors, "where": 'behaviors["big"] > 0 or behaviors["payer"] == 1'})[1]
        self.assertEqual([r["$distinct_id"] for r in body["results"]], ["u1", "u3"])
        status, body = _qj("engage", {"behaviors": behaviors, "filter_by_cohort": '{"id": 1}'})
        self.assertEqual((status, body["error"]), (400, "behaviors and filter_by_cohort cannot be used together"))

    def test_selector_is_where(self):
        body = _qj("engage", {"selector": '(("pro" == properties["plan"]) and (defined (properties["age"])))'})[1]
        self.assertEqual(body["total"], 2)


class TestAnnotationsAndInsights(_QueryTestCase):

    def test_annotations_lifecycle(self):
        created = _qj("annotations/create", {"date": "2026-11-11 12:00:00", "description": "launch"}, method="POST")[1]
        self.assertEqual(created["error"], False)
        listing = _qj("annotations", {"from_date": "2026-11-10", "to_date": "2026-11-12"})[1]
        self.assertEqual(listing, {"annotations": [{"date": "2026-11-11 12:00:00", "project_id": Project(QT).project_id,
                                                    "id": created["id"], "description": "launch"}], "error": False})
        _qj("annotations/update", {"id": created["id"], "date": "2026-11-12", "description": "moved"}, method="POST")
        self.assertEqual(_qj("annotations", {"from_date": "2026-11-12", "to_date": "2026-11-12"})[1]["annotations"][0]
                         ["description"], "moved")
        self.assertEqual(_qj("annotations/delete", {"id": created["id"]}, method="POST")[1], {"error": False})
        self.assertEqual(_qj("annotations/delete", {"id": created["id"]}, method="POST")[0], 400)

    def test_saved_insights_report(self):
        bookmark = MP.add_insight("Signups", "Signed Up", days=7, project=QT)
        status, body = _qj("insights", {"bookmark_id": bookmark})
        self.assertEqual(body["headers"], ["$event"])
        self.assertEqual(body["date_range"], {"from_date": "2026-11-08T00:00:00+00:00",
                                              "to_date": "2026-11-14T23:59:59.999000+00:00"})
        series = body["series"]["Signed Up"]
        self.assertEqual((series["2026-11-10T00:00:00+00:00"], series["2026-11-11T00:00:00+00:00"], len(series)),
                         (2, 1, 7))
        self.assertEqual(_qj("insights", {"bookmark_id": 424242})[0], 400)


class TestQueryFixes(_QueryTestCase):
    """Cases a review found; each answers as the README says."""

    def test_any_is_safe_under_concurrent_queries(self):
        _post("/import", [_full("L", token=QT, l=["a", "b", "c", "d"], time=T0 - 100 - i % 50,
                                **{"$insert_id": f"l{i}"}) for i in range(2000)])
        results = []

        def count(value):
            rows = MP.export(project=QT, from_date="2026-11-14", to_date="2026-11-14",
                             where=f'any(X, properties["l"], X == "{value}")')
            results.append(len(rows))
        threads = [threading.Thread(target=count, args=(v,)) for v in "adad"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(results, [2000] * 4)

    def test_user_properties_everywhere(self):
        seg = _qj("segmentation", {"event": "Signed Up", "from_date": "2026-11-10", "to_date": "2026-11-11",
                                   "on": 'user["age"]'})[1]
        self.assertEqual(seg["data"]["values"], {"30": {"2026-11-10": 1, "2026-11-11": 0},
                                                 "20": {"2026-11-10": 1, "2026-11-11": 0},
                                                 "40": {"2026-11-10": 0, "2026-11-11": 1}})
        rows = MP.export(project=QT, from_date="2026-11-10", to_date="2026-11-12", where='user["age"] > 25')
        self.assertEqual({r["properties"]["distinct_id"] for r in rows}, {"u1", "u3"})
        funnel = MP.add_funnel("old", ["Signed Up", "Paid"], where='user["age"] > 25', project=QT)
        body = _qj("funnels", {"funnel_id": funnel, "from_date": "2026-11-10", "to_date": "2026-11-11",
                               "unit": "week"})[1]
        self.assertEqual([s["count"] for s in body["data"]["2026-11-09"]["steps"]], [2, 2])

    def test_reports_see_the_canonical_distinct_id(self):
        _post("/track", [_event("Viewed", token=QT, **{"$device_id": "d9", "time": T0 - 60}),
                         _event("Viewed", token=QT, **{"$device_id": "d9", "$user_id": "u1", "time": T0 - 30})])
        rows = MP.export(project=QT, from_date="2026-11-14", to_date="2026-11-14",
                         where='properties["distinct_id"] == "u1"')
        self.assertEqual(len(rows), 2)
        seg = MP.segmentation(project=QT, event="Viewed", from_date="2026-11-14", to_date="2026-11-14",
                              on='properties["distinct_id"]')
        self.assertEqual(seg["data"]["values"], {"u1": {"2026-11-14": 2}})

    def test_long_chains_and_huge_numbers_are_not_errors(self):
        for text in ("1" + "+1" * 5000, " or ".join(["true"] * 2000), 'properties["a"]' + '["a"]' * 3000):
            with self.subTest(text[:12]):
                self.assertLess(len(text), 20000)
                status, body = _qj("segmentation", {"event": "Paid", "from_date": "2026-11-10",
                                                    "to_date": "2026-11-10", "on": text})
                self.assertEqual(status, 200, body)
        status, body = _qj("segmentation", {"event": "Paid", "from_date": "2026-11-10", "to_date": "2026-11-10",
                                            "where": 'properties["amount"] > 1' + "0" * 400})
        self.assertEqual(body["data"]["values"]["Paid"], {"2026-11-10": 0})
        status, body = _qj("segmentation/sum", {"event": "Paid", "from_date": "2026-11-10",
                                                "to_date": "2026-11-10", "on": 'properties["amount"] * 1e308'})
        self.assertEqual(body["results"], {"2026-11-10": 0.0})

    def test_chained_comparison_message(self):
        with self.assertRaises(mixpanel_fake.ExpressionError) as caught:
            mixpanel_fake._compile_expression("1 < 2 < 3")
        self.assertEqual(str(caught.exception), "comparisons cannot be chained; join them with 'and' (at column 7)")

    def test_python_query_errors_are_api_errors(self):
        with self.assertRaises(mixpanel_fake.ApiError) as caught:
            MP.segmentation(project=QT, event="Paid", from_date="2026-11-10", to_date="2026-11-10",
                            where='properties["amount"] and true')
        self.assertEqual(caught.exception.status, 400)

    def test_insights_breakdown_nests_under_the_event(self):
        bookmark = MP.add_insight("By plan", "Signed Up", days=7, on='properties["plan"]', project=QT)
        series = _qj("insights", {"bookmark_id": bookmark})[1]["series"]["Signed Up"]
        self.assertEqual(sorted(series), ["$overall", "free", "pro"])
        self.assertEqual(series["$overall"]["2026-11-10T00:00:00+00:00"], 2)

    def test_retention_is_zero_filled_and_unbounded_counts_later_returns(self):
        body = _qj("retention", {"born_event": "Signed Up", "event": "Paid", "from_date": "2026-11-09",
                                 "to_date": "2026-11-10", "interval_count": 1, "unbounded_retention": "true"})[1]
        self.assertEqual(body, {"2026-11-09": {"counts": [0, 0], "first": 0},
                                "2026-11-10": {"counts": [1, 1], "first": 2}})

    def test_hour_interval_counts_hours(self):
        body = _qj("events", {"event": '["Paid"]', "type": "general", "unit": "hour", "interval": 3})[1]
        self.assertEqual(body["data"]["series"], ["2026-11-14 20:00:00", "2026-11-14 21:00:00",
                                                  "2026-11-14 22:00:00"])

    def test_cohort_filters(self):
        cohort = MP.add_cohort("Some", distinct_ids=["u1", "zed"], project=QT)
        for flag in ("false", "False", "0"):
            body = _qj("engage", {"filter_by_cohort": json.dumps({"id": cohort}), "include_all_users": flag})[1]
            self.assertEqual([r["$distinct_id"] for r in body["results"]], ["u1"])
        body = _qj("engage", {"filter_by_cohort": json.dumps({"id": cohort})})[1]
        self.assertEqual([r["$distinct_id"] for r in body["results"]], ["u1", "zed"])
        body = _qj("engage", {"filter_by_cohort": json.dumps({"id": cohort}), "where": 'properties["age"] > 1'})[1]
        self.assertEqual([r["$distinct_id"] for r in body["results"]], ["u1"])

    def test_small_export_and_auth_details(self):
        self.assertEqual(MP.export(project=QT, from_date="2026-11-10", to_date="2026-11-12", limit=0), [])
        status, head, body = _q("export", {"from_date": "2026-11-10", "to_date": "2026-11-12"},
                                headers={"Accept-Encoding": "gzip;q=0, identity"})
        self.assertNotIn("content-encoding", head)
        status, _, body = _http("POST", "/api/query/segmentation", json.dumps(
            {"event": "Paid", "from_date": "2026-11-12", "to_date": "2026-11-12",
             "project_id": Project(QT).project_id}), {"Content-Type": "application/json"})
        # A numeric project_id in a JSON body names the project (credentials row 6).
        self.assertEqual((status, json.loads(body)["data"]["values"]), (200, {"Paid": {"2026-11-12": 1}}))
        self.assertEqual(_json("GET", "/api/query/webhooks")[1]["request"], "/api/query/webhooks")
        status, body = _qj("annotations/create", {"date": "2026-11-11 10:00:00junk", "description": "x"})
        self.assertEqual((status, body["error"]), (400, "date must be YYYY-MM-DD HH:MM:SS"))


class TestQueryEndToEnd(_ServerTestCase):
    """Events sent by the real Python SDK, read back through the query API."""

    def test_python_sdk_events_through_export_and_segmentation(self):
        _require(mixpanel is not None, "the Python mixpanel SDK is not installed "
                                       "(pip install -r conformance/requirements.txt)", self)
        MP.set_time(None)
        token = "e2e_tok"
        MP.add_project(Project(token))
        self.addCleanup(MP.reset, token)
        client = mixpanel.Mixpanel(token, consumer=mixpanel.Consumer(retry_limit=0, **MP.urls))
        for i in range(5):
            client.track(f"user{i % 2}", "Checkout", {"cart": i, "tier": "gold" if i < 3 else "basic"})
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        rows = MP.export(project=token, from_date=today, to_date=today)
        self.assertEqual(sorted(r["properties"]["cart"] for r in rows), [0, 1, 2, 3, 4])
        seg = MP.segmentation(project=token, event="Checkout", from_date=today, to_date=today,
                              on='properties["tier"]', type="unique")
        self.assertEqual(seg["data"]["values"], {"gold": {today: 2}, "basic": {today: 2}})


# =============================================================================
# Projects and credentials (README: "Credentials")
# =============================================================================


class TestProjects(_ServerTestCase):

    def test_each_record_token_picks_its_project(self):
        _http("POST", "/track", json.dumps([_event("a", token="t1"), _event("b", token="t2"),
                                            _event("c", token="t1")]))
        self.assertEqual([e["event"] for e in MP.events(project="t1")], ["a", "c"])
        self.assertEqual([e["event"] for e in MP.events(project="t2")], ["b"])
        self.assertEqual([e["event"] for e in MP.events()], ["a", "b", "c"])

    def test_record_token_wins_over_credentials(self):
        _http("POST", "/import", json.dumps([_full(token="t1")]), _basic("t2"))
        self.assertEqual(len(MP.events(project="t1")), 1)

    def test_unknown_token_creates_a_project_with_a_stable_id(self):
        _http("POST", "/track", json.dumps(_event(token="brand_new")))
        _, body = _json("GET", "/__parlel/projects")
        (project,) = [p for p in body["projects"] if p["token"] == "brand_new"]
        self.assertEqual(project["project_id"], Project("brand_new").project_id)
        self.assertEqual(Project("brand_new").project_id, mixpanel_fake._derive_project_id("brand_new"))
        self.assertNotIn("api_secret", project)

    def test_credentials_resolution_order(self):
        with MixpanelFake(projects=[Project("tA", project_id=11, api_secret="sA",
                                           service_accounts={"sa.user": "sa-secret"}),
                                   Project("tB", project_id=22, api_secret="sB")]) as mp:
            bare = json.dumps({"event": "e", "properties": {"time": T0, "distinct_id": "d",
                                                            "$insert_id": "bare-1"}})
            cases = [("Basic token:", "/import", _basic("tB"), "tB"),
                     ("Basic secret:", "/import", _basic("sA"), "tA"),
                     ("service account + project_id", "/import?project_id=11",
                      _basic("sa.user", "sa-secret"), "tA"),
                     ("plain-text Basic (Mixpanel takes it too)", "/import",
                      {"Authorization": "Basic sB:"}, "tB")]
            for label, path, headers, token in cases:
                with self.subTest(label):
                    mp.reset()
                    status, _, body = _http("POST", path, bare, headers, port=mp.port)
                    self.assertEqual(json.loads(body)["num_records_imported"], 1)
                    self.assertEqual(len(mp.events(project=token)), 1)
            # A wrong service-account secret names no project: nothing lands.
            mp.reset()
            status, _, body = _http("POST", "/import?project_id=11", bare,
                                    _basic("sa.user", "wrong"), port=mp.port)
            self.assertEqual(json.loads(body)["failed_records"][0]["message"], "token, missing or empty")
            self.assertEqual(mp.events(), [])

    def test_repr_hides_secrets(self):
        text = repr(Project("t", api_secret="very-secret", service_accounts={"u": "s3cr3t"}))
        self.assertNotIn("very-secret", text)
        self.assertNotIn("s3cr3t", text)


# =============================================================================
# Routing and HTTP
# =============================================================================


class TestRouting(_ServerTestCase):

    def test_trailing_slash_and_double_slash(self):
        for path in ("/track/", "//track", "/track//"):
            with self.subTest(path):
                self.assertEqual(_http("POST", path, json.dumps(_event()))[2], b"1")

    def test_unknown_path_is_json_404_naming_known_paths(self):
        status, body = _json("GET", "/nope?x=1")
        self.assertEqual(status, 404)
        self.assertEqual(body["error"], "no such endpoint: GET /nope")
        self.assertIn("/track", body["known_paths"])

    def test_wrong_method_is_405_with_allow(self):
        for method in ("PUT", "DELETE", "PATCH", "BREW"):
            with self.subTest(method):
                status, headers, body = _http(method, "/track")
                self.assertEqual(status, 405)
                self.assertEqual(headers["allow"], "GET, OPTIONS, POST")
                self.assertEqual(json.loads(body)["allowed"], ["GET", "OPTIONS", "POST"])

    def test_head_never_ingests(self):
        status, headers, _ = _http("HEAD", "/track?data=" + _b64(_event()))
        self.assertEqual((status, headers["allow"]), (405, "GET, OPTIONS, POST"))
        self.assertEqual(MP.events(), [])

    def test_head_has_length_but_no_body(self):
        status, headers, body = _http("HEAD", "/health")
        self.assertEqual((status, body, headers["content-length"]), (200, b"", "15"))

    def test_cors_on_every_response_with_origin(self):
        origin = {"Origin": "http://localhost:5173"}
        for method, path in (("POST", "/track"), ("GET", "/nope"), ("GET", "/health")):
            with self.subTest(path):
                _, headers, _ = _http(method, path, json.dumps(_event()) if method == "POST" else None, origin)
                self.assertEqual(headers["access-control-allow-origin"], "http://localhost:5173")
                self.assertEqual(headers["access-control-allow-credentials"], "true")
                self.assertEqual(headers["vary"], "Origin")
                self.assertEqual(headers["access-control-expose-headers"], "Retry-After")
        _, headers, _ = _http("GET", "/health")
        self.assertNotIn("access-control-allow-origin", headers)

    def test_preflight_echoes_method_and_headers(self):
        status, headers, body = _http("OPTIONS", "/flags/", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, traceparent",
            "Access-Control-Request-Private-Network": "true"})
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(headers["access-control-allow-origin"], "http://app.test")
        self.assertEqual(headers["access-control-allow-methods"], "GET")
        self.assertEqual(headers["access-control-allow-headers"], "authorization, traceparent")
        self.assertEqual(headers["access-control-allow-credentials"], "true")
        self.assertEqual(headers["access-control-allow-private-network"], "true")


class TestTransport(_ServerTestCase):

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", MP.port, timeout=5)
        self.addCleanup(conn.close)
        for i in range(20):
            conn.request("POST", "/track", body=json.dumps(_event(str(i))))
            resp = conn.getresponse()
            self.assertEqual((resp.status, resp.read(), resp.getheader("Content-Length")), (200, b"1", "1"))
        self.assertEqual(len(self.stored()), 20)

    def test_request_line_of_1_5_mb_is_accepted(self):
        # The Node SDK GETs /track?data=<base64 of the whole payload>.
        batch = [_event(f"E{i}", **{f"p{j}": "x" * 250 for j in range(3)}) for i in range(1400)]
        path = "/track?data=" + urllib.parse.quote(_b64(batch), safe="")
        self.assertGreater(len(path), 1_500_000)
        self.assertEqual(_http("GET", path)[::2], (200, b"1"))
        self.assertEqual(len(self.stored()), 1400)

    def test_request_line_over_the_cap_is_414(self):
        status, _, body = _http("GET", "/track?data=" + "a" * (mixpanel_fake._MAX_REQUEST_LINE + 10))
        self.assertEqual(status, 414)
        self.assertEqual(json.loads(body)["code"], 414)

    def test_body_over_the_cap_is_413_without_reading_it(self):
        reply = _raw_request(b"POST /import HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)
        self.assertIn(b'"error":"request exceeds max limit of', reply)

    def test_gzip_bomb_is_refused(self):
        bomb = gzip.compress(b"[" + b" " * (mixpanel_fake._MAX_BODY_BYTES + 1) + b"]")
        status, _, body = _http("POST", "/import", bomb, {"Content-Encoding": "gzip"})
        self.assertEqual(status, 413)

    def test_bad_gzip_is_400(self):
        status, _, body = _http("POST", "/track", b"not gzip", {"Content-Encoding": "gzip"})
        self.assertEqual((status, json.loads(body)["code"]), (400, 400))

    def test_malformed_request_line_gets_json(self):
        reply = _raw_request(b"GARBAGE\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
        self.assertIn(b"application/json", reply)

    def test_concurrent_posts_all_land_once(self):
        def post(worker):
            conn = http.client.HTTPConnection("127.0.0.1", MP.port, timeout=10)
            for i in range(25):
                conn.request("POST", "/track", body=json.dumps(_event(f"{worker}-{i}")))
                conn.getresponse().read()
            conn.close()
        threads = [threading.Thread(target=post, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        names = sorted(e["event"] for e in self.stored())
        self.assertEqual(names, sorted(f"{w}-{i}" for w in range(8) for i in range(25)))
        _, body = _json("GET", "/__parlel/events")
        ids = [row["id"] for row in body["events"]]
        self.assertEqual(len(set(ids)), 200)

    def test_unquote_agrees_with_the_stdlib(self):
        # `_unquote` decodes the usual case in C; every answer must be the
        # stdlib's, odd escapes, invalid UTF-8 and surrogates included.
        import random
        rng = random.Random(3)
        pieces = ["%", "+", "=", "a", "Z", "0", "f", "\r", "\n", " ", "%2", "%zz", "%e2%82%ac",
                  "%ff", "%C3%A9", "\u00e9", "\ud800", "%25", "%3d", "%0A", "%00", "\t"]
        for _ in range(20000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(10)))
            for errors in ("replace", "surrogateescape"):
                self.assertEqual(mixpanel_fake._unquote(text, True, errors),
                                 urllib.parse.unquote_plus(text, errors=errors), text)
                self.assertEqual(mixpanel_fake._unquote(text, False, errors),
                                 urllib.parse.unquote(text, errors=errors), text)

    def test_header_names_are_case_insensitive_and_repeatable(self):
        reply = _raw_request(b"POST /track?verbose=1 HTTP/1.1\r\nhost: x\r\ncontent-TYPE: application/json\r\n"
                             b"X-Twice: 1\r\nX-Twice: 2\r\nCONTENT-LENGTH: 2\r\nConnection: close\r\n\r\n{}",
                             whole_answer=True)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        entry = MP.requests(path="/track")[-1]
        self.assertEqual(entry["headers"]["content-TYPE"], "application/json")
        self.assertEqual(entry["body_size"], 2)

    def test_folded_header_is_joined_with_a_space(self):
        # RFC 9112 5.2: obsolete line folding may be replaced by a space.
        reply = _raw_request(b"POST /track HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n \t two\r\n"
                             b"Content-Length: 2\r\nConnection: close\r\n\r\n{}", whole_answer=True)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(MP.requests(path="/track")[-1]["headers"]["X-Folded"], "one two")

    def test_malformed_header_line_is_400_json(self):
        for line in (b"no colon here", b"Bad Name: x", b": empty name", b" continuation first"):
            reply = _raw_request(b"GET /health HTTP/1.1\r\n" + line + b"\r\n\r\n")
            head, _, body = reply.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), (line, reply))
            self.assertIn(b"Connection: close", head)
            self.assertEqual(json.loads(body)["code"], 400, line)

    def test_a_hundred_headers_are_still_fine(self):
        # The caps are the stdlib's: 100 header lines pass (TestLimits has the 431s).
        reply = _raw_request(b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(99))
                             + b"Connection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:80])

    def test_header_block_arriving_in_pieces(self):
        # The parser splits a fully buffered block at once and reads line by
        # line otherwise: both give the same request.
        sock = socket.create_connection(("127.0.0.1", MP.port), timeout=5)
        self.addCleanup(sock.close)
        body = json.dumps(_event("Pieces")).encode()
        head = (b"POST /track?verbose=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for piece in (head[:20], head[20:45], head[45:-3], head[-3:], body):
            sock.sendall(piece)
            time.sleep(0.02)
        reply, _ = _read_until_closed(sock)
        self.assertTrue(reply.endswith(b'\r\n\r\n{"status":1,"error":null}'), reply)
        self.assertEqual(MP.requests(path="/track")[-1]["headers"]["Content-Type"], "application/json")
        self.assertEqual([e["event"] for e in self.stored()], ["Pieces"])

    def test_framing_the_stdlib_would_read_differently_is_refused(self):
        # Each of these could make a server and a proxy see different
        # requests (RFC 9112 2.2, 6.1, 7.1; RFC 9110 5.5, 5.6.3): 400, closed,
        # and the body never runs as a request.
        inner = b"GET /track?data=e30 HTTP/1.1\r\n\r\n"
        chunk = b"2\r\n{}GARBAGE\r\n0\r\n\r\n"
        cases = {
            b"X-Note: a\rContent-Length: %d\r\n\r\n" % len(inner) + inner:
                "a header line holds a bare CR or a NUL",
            b"X-Note: a\0b\r\nContent-Length: 0\r\n\r\n": "a header line holds a bare CR or a NUL",
            b"Content-Length: \x1c2\r\n\r\n{}": "invalid Content-Length",
            b"Content-Length: 2\xa0\r\n\r\n{}": "invalid Content-Length",
            b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n": "unsupported Transfer-Encoding: \x0bchunked",
            b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n": "chunked applied more than once",
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk:
                "malformed chunked body: chunk data longer than its size",
            b"Transfer-Encoding: chunked\r\n\r\n2;" + b"x" * 70000 + b"\r\n{}\r\n0\r\n\r\n":
                "malformed chunked body: bad chunk size line",
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: 1\r\n" * 101 + b"\r\n":
                "more than 100 trailer lines",
        }
        for rest, message in cases.items():
            reply = _raw_request(b"POST /track HTTP/1.1\r\nHost: x\r\n" + rest)
            head, _, body = reply.partition(b"\r\n\r\n")
            self.assertIn(b"Connection: close", head, rest[:60])
            self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply)  # nothing after it ran
            self.assertEqual(json.loads(body)["error"], message, rest[:60])
        reply = _raw_request(b"POST /track HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual(json.loads(reply.partition(b"\r\n\r\n")[2])["error"],
                         "Transfer-Encoding in an HTTP/1.0 request")
        self.assertEqual(self.stored(), [])

    def test_folded_lines_count_toward_the_header_cap(self):
        reply = _raw_request(b"GET /health HTTP/1.1\r\nX-A: a\r\n" + b" x\r\n" * 100 + b"\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 431 "), reply[:80])
        self.assertEqual(json.loads(reply.partition(b"\r\n\r\n")[2])["error"], "more than 100 header lines")

    def test_expect_100_continue(self):
        sock = socket.create_connection(("127.0.0.1", MP.port), timeout=5)
        self.addCleanup(sock.close)
        body = json.dumps(_event("Continued")).encode()
        sock.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body))
        self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n"))
        sock.sendall(body)
        reply, _ = _read_until_closed(sock)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n1"), reply)
        self.assertEqual([e["event"] for e in self.stored()], ["Continued"])


class TestOddInputs(_ServerTestCase):
    """Inputs that once broke the fake: each answers cleanly, loses nothing."""

    def raw(self, data, timeout=5):
        return _raw_request(data, timeout=timeout, whole_answer=True)

    def test_numbers_beyond_a_double(self):
        self.assertEqual(_json("POST", "/track?verbose=1", b'[{"event":"e","properties":{"token":"t","x":1e400}}]'),
                         (200, {"status": 0, "error": "invalid JSON body: number 1e400 is out of range"}))
        huge = "9" * 4000
        _http("POST", "/engage", f'[{{"$token":"t","$distinct_id":"u","$add":{{"a":{huge}}}}},'
                                 f'{{"$token":"t","$distinct_id":"u","$add":{{"a":{huge}}}}},'
                                 f'{{"$token":"t","$distinct_id":"u","$add":{{"a":0.5,"b":1}}}}]')
        self.assertEqual(MP.profile("u")["b"], 1)
        self.assertEqual(_http("GET", "/__parlel/people")[0], 200)
        status, answer = _post("/track?verbose=1", [_event(time=10 ** 400 + 1)])
        self.assertEqual(answer["error"], TIME_ERR + "must be specified as seconds since epoch")
        MP.check()

    def test_absolute_form_target_with_a_bracket(self):
        inner = b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        reply = self.raw(b"POST http://[/track HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(inner)).encode() + b"\r\nConnection: close\r\n\r\n" + inner)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:80])
        self.assertEqual(reply.count(b"HTTP/1.1"), 1)  # the body was not run as a request

    def test_client_that_vanishes_mid_body_is_not_a_server_error(self):
        sock = socket.create_connection(("127.0.0.1", MP.port), timeout=5)
        sock.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ndata=")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # reset
        self.assertEqual(_http("GET", "/health")[0], 200)
        MP.check()

    def test_client_that_stalls_mid_body_gets_408(self):
        with MixpanelFake(idle_timeout=0.3) as fake:
            reply = _raw_request(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ndata=",
                                 port=fake.port, whole_answer=True)
            self.assertTrue(reply.startswith(b"HTTP/1.1 408 "), reply[:80])
            self.assertEqual(fake.events(), [])

    def test_deeply_nested_record_is_refused_and_still_listable(self):
        deep = b'{"event":"e","properties":{"token":"t","x":' + b"[" * 985 + b"]" * 985 + b"}}"
        self.assertEqual(_http("POST", "/track", deep)[2], b"0")
        self.assertEqual(_http("GET", "/__parlel/rejected")[0], 200)
        # Deeper than any encoder can write: clipped, never an error.
        value: list = []
        for _ in range(5000):
            value = [value]
        self.assertIn(b"nested too deep to show", mixpanel_fake._dumps({"record": value}))

    def test_union_of_many_items_is_linear(self):
        items = list(range(20000))
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u", "$union": {"a": items}}))
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u",
                                             "$union": {"a": [19999, 20000, True]}}))
        self.assertEqual(MP.profile("u")["a"], items + [20000, True])

    def test_gzip_of_many_members_is_refused(self):
        body = gzip.compress(b"", mtime=0) * 1000
        status, _, answer = _http("POST", "/import", body, {"Content-Encoding": "gzip"})
        self.assertEqual((status, json.loads(answer)["error"]),
                         (400, "body is not valid gzip: more than 64 members"))

    def test_ndjson_line_separator_inside_a_string(self):
        lines = json.dumps(_full("a\u2028b"), ensure_ascii=False) + "\n" + json.dumps(_full("c"))
        status, answer = _json("POST", "/import", lines, {"Content-Type": "application/x-ndjson"})
        self.assertEqual(answer["num_records_imported"], 2)
        self.assertEqual(MP.events()[0]["event"], "a\u2028b")

    def test_raw_utf8_in_the_query_string(self):
        data = json.dumps(_event("café"), ensure_ascii=False)
        reply = self.raw(b"GET /track?data=" + data.replace(" ", "%20").encode("utf-8")
                         + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(reply.endswith(b"\r\n\r\n1"), reply[-40:])
        self.assertEqual(MP.events()[0]["event"], "café")

    def test_python_api_returns_deep_copies(self):
        _post("/track", [_event(tags=["a"])])
        _engage({"$set": {"l": [1]}, "$ignore_time": True})
        MP.events()[0]["properties"]["tags"].append("X")
        MP.profile("u")["l"].append(2)
        self.assertEqual((MP.events()[0]["properties"]["tags"], MP.profile("u")["l"]), (["a"], [1]))

    def test_request_after_stop_began_is_refused(self):
        fake = MixpanelFake().start()
        sock = socket.create_connection(("127.0.0.1", fake.port), timeout=5)
        self.addCleanup(sock.close)
        body = _form(data=json.dumps(_event()))
        sock.sendall(f"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.05)  # let the server start reading this request (ordering, not timing)
        fake._server.closing = True
        sock.sendall(body.encode())
        reply = sock.recv(65536)
        fake.stop()
        self.assertTrue(reply.startswith(b"HTTP/1.1 503 "), reply[:80])
        self.assertEqual(fake.events(), [])

    def test_set_time_takes_milliseconds_and_refuses_nonsense(self):
        MP.set_time(T0 * 1000)
        self.assertEqual(MP.store.now(), T0)
        for bad in (float("nan"), float("inf"), "soon"):
            with self.assertRaises(ValueError):
                MP.set_time(bad)

    def test_http_distinct_id_filter_matches_numbers(self):
        _post("/track", [_event(distinct_id=42), _event(distinct_id="7")])
        self.assertEqual(_json("GET", "/__parlel/events?distinct_id=42")[1]["count"], 1)
        self.assertEqual(len(MP.events(distinct_id=7)), 1)

    def test_invalid_callback_is_refused_before_storing(self):
        for callback in ("x</script>", "cb\n", "a b"):
            with self.subTest(callback=callback):
                path = "/track?callback=" + urllib.parse.quote(callback) + "&data=" + _b64(_event())
                self.assertEqual(_http("GET", path)[0], 400)
        self.assertEqual(MP.events(), [])

    def test_empty_line_before_the_request_line(self):
        reply = self.raw(b"\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:80])

    def test_http_1_0_keep_alive_is_confirmed(self):
        reply = self.raw(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", timeout=2)
        self.assertIn(b"\r\nConnection: keep-alive\r\n", reply)

    def test_loose_framing_is_refused(self):
        cases = [(b"Content-Length: +5\r\n\r\ndata=", b"400"),
                 (b"Transfer-Encoding: chunked\r\n\r\n0x5\r\ndata=\r\n0\r\n\r\n", b"400"),
                 (b"Transfer-Encoding: xchunked\r\n\r\n", b"501"),
                 (b"Transfer-Encoding: chunked, identity\r\n\r\n", b"501")]
        for headers, status in cases:
            with self.subTest(headers=headers):
                reply = self.raw(b"POST /track HTTP/1.1\r\nHost: x\r\n" + headers)
                self.assertTrue(reply.startswith(b"HTTP/1.1 " + status), reply[:80])
        self.assertEqual(MP.events(), [])

    def test_python_api_argument_checks(self):
        with self.assertRaises(TypeError):
            MP.events(properties="x")
        with self.assertRaises(ValueError):
            MP.wait_for_events(1, timeout=float("nan"))
        _post("/track", [_event()])
        self.assertEqual(len(MP.wait_for_events(1, timeout=float("inf"))), 1)
        self.assertEqual(mixpanel_fake._url("", 80), "http://127.0.0.1:80")
        self.assertEqual([mixpanel_fake._is_loopback(h) for h in ("127.0.0.2", "::1", "localhost",
                                                                   "0.0.0.0", "", "10.0.0.1")],
                         [True, True, True, False, False, False])
        self.assertEqual(mixpanel_fake._url("::", 80), "http://[::1]:80")


# =============================================================================
# The test toolkit (issue #5)
# =============================================================================


def _fuzz_read_reply(reader, head):
    """One HTTP response from a buffered socket reader, framing checked:
    (status, {lower-case name: [values]}, body) or a ValueError saying what
    is malformed; None when the connection closed before any byte."""
    line = reader.readline(65537)
    if not line:
        return None
    while True:
        if not line.endswith(b"\r\n"):
            raise ValueError(f"status line not ended by CRLF: {line[:100]!r}")
        version, _, rest = line[:-2].partition(b" ")
        code, _, _phrase = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise ValueError(f"malformed status line {line[:100]!r}")
        status = int(code)
        headers: dict = {}
        for _ in range(200):
            header = reader.readline(65537)
            if header == b"\r\n":
                break
            name, colon, value = header.partition(b":")
            if not header.endswith(b"\r\n") or not colon or not name or name != name.strip():
                raise ValueError(f"malformed header line {header[:100]!r}")
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.strip().decode("latin-1"))
        else:
            raise ValueError("more than 200 header lines")
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            line = reader.readline(65537)
            continue
        break
    lengths = headers.get("content-length", [])
    chunked = "chunked" in ",".join(headers.get("transfer-encoding", [])).lower()
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()) or (lengths and chunked):
        raise ValueError(f"bad framing headers {headers}")
    if head or status in (204, 304):
        return status, headers, b""
    if chunked:
        parts = []
        while True:
            size_line = reader.readline(1024)
            if not size_line.endswith(b"\r\n"):
                raise ValueError(f"malformed chunk size line {size_line[:60]!r}")
            size = int(size_line[:-2].split(b";")[0], 16)
            if size == 0:
                if reader.readline(1024) != b"\r\n":
                    raise ValueError("chunked answer without its final CRLF")
                break
            data = reader.read(size)
            if len(data) != size or reader.read(2) != b"\r\n":
                raise ValueError("truncated chunk")
            parts.append(data)
        body = b"".join(parts)
    elif lengths:
        length = int(lengths[0])
        body = reader.read(length)
        if len(body) != length:
            raise ValueError(f"body of {len(body)} bytes for Content-Length {length}")
    elif "close" in ",".join(headers.get("connection", [])).lower():
        body = reader.read()  # delimited by the close (HTTP/1.0 streaming)
    else:
        raise ValueError("a body neither Content-Length nor chunked framed, on a kept connection")
    if "gzip" in ",".join(headers.get("content-encoding", [])):
        body = gzip.decompress(body)
    if (headers.get("content-type") or [""])[0].startswith("application/json") and body:
        json.loads(body)  # a JSON answer is JSON
    return status, headers, body


class TestFuzz(unittest.TestCase):
    """Issue 8, fuzzing: a seeded, bounded generator of mutated requests for
    every route in `_ROUTES`, sent over raw sockets.  After every case: a
    well-formed answer (framing read and checked), no 5xx, no internal error,
    no dropped connection unless nothing was asked, and exact event
    accounting; every few cases /health; at the end every record the fuzzer's
    own valid requests got accepted is stored once, exactly as sent.

    MIXPANEL_FAKE_FUZZ_CASES (default 10000, the quick set) and
    MIXPANEL_FAKE_FUZZ_SEED (default 8) choose the run; the long one is e.g.
    MIXPANEL_FAKE_FUZZ_CASES=50000 (about 90 s).  A failure names the seed and
    the case; the same seed replays the same cases.
    """

    TOKEN = "fuzz-tok"
    SECRET = "fuzz-secret"
    PROJECT_ID = 808
    HEALTH_EVERY = 100
    CHECKPOINT = 5000
    # State-wide writes (a reset, a restore, faults, a tracking plan) go to
    # a second fake, so the first one's records are only ever added to.
    ADMIN = frozenset((mixpanel_fake._parlel_reset, mixpanel_fake._parlel_clear_events,
                       mixpanel_fake._parlel_snapshot, mixpanel_fake._parlel_add_fault,
                       mixpanel_fake._parlel_clear_faults, mixpanel_fake._parlel_save,
                       mixpanel_fake._parlel_tracking_plan))
    GOOD_VALUES = ("x", "", "café ☃ 𝄞", "a\u2028b", 'q"\\/', "+/=&%?#;", 0, -7, 2 ** 53, 1.5, -0.25,
                   True, False, None, [1, "a", None], {"k": "v", "n": [1, 2]}, ["é", {"d": 2}])
    WEIRD_VALUES = (None, True, False, 0, -1, 1.5, 1e308, -1e308, 2 ** 64 + 1, "", " ", "x" * 300,
                    "y" * 3000, [], {}, [None], {"": ""}, [[[[[1]]]]], {"a": {"b": {"c": {"d": 1}}}},
                    "null", "undefined", "0", "-1", "\u0000", "\ufeff", "\ud800", "a\udfffb", "$device:",
                    list(range(300)), {str(i): i for i in range(300)}, "1e400", "true", "[]", "{}",
                    "00000000-0000-0000-0000-000000000000", "\x7f\x1b[31m", "../../etc/passwd",
                    "<script>", "%00", "\r\nX-Injected: 1")
    # JSON text spliced in where a value goes (what a JSON encoder never writes).
    RAW_JSON = ("1e400", "-1e400", "9" * 5000, "-" + "9" * 4400, "1e-400", "-0", "NaN", "Infinity",
                "-Infinity", '"\\ud800"', '"\\udfff\\ud800x"', '"\\u0000"', '"\\uZZZZ"', "[" * 3000 + "]" * 3000,
                '{"a":' * 1200 + "1" + "}" * 1200, "[" * 200, "tru", "nul", '"unterminated', "01", "+1",
                ".5", "0x10", "1_000", "'single'", '{"a":1,}', "[1,]", "[,1]", '{"a" 1}', "\x00", '"\t"',
                "18446744073709551617", "1" + "0" * 400, "1E+308", "4.9e-324", "[]" * 3)
    RAW_BYTES = (b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                 b"\x00", b"\xef\xbb\xbf", b"\x80\x80\x80")
    METHODS = ("PATCH", "PUT", "DELETE", "BREW", "get", "post", "HEAD", "OPTIONS", "TRACE", "CONNECT",
               "G ET", "", "X" * 300, "GET\x00", "PROPFIND", "M-SEARCH")

    def setUp(self):
        self.cases = int(os.environ.get("MIXPANEL_FAKE_FUZZ_CASES") or 10000)
        self.seed = int(os.environ.get("MIXPANEL_FAKE_FUZZ_SEED") or 8)
        self.fake = self._start()
        self.admin = self._start()
        self.fake.add_flag("fuzz-flag", {"a": "x", "b": 2}, project=self.TOKEN)
        self.flag_defs = self.fake.flags(project=self.TOKEN)
        self.admin_snapshot = json.dumps(self.admin.snapshot())

    def _start(self):
        fake = MixpanelFake(projects=[Project(self.TOKEN, project_id=self.PROJECT_ID, api_secret=self.SECRET)],
                            journal_size=100).start()  # a short journal: /__parlel/requests stays cheap
        self.addCleanup(fake.stop)
        fake.set_time(T0)
        return fake

    # --- building requests -----------------------------------------------------

    def rand_value(self, rng, weird):
        pool = self.WEIRD_VALUES if weird else self.GOOD_VALUES
        return rng.choice(pool)

    def event(self, rng, seq, part, imported):
        props = {"token": self.TOKEN, "fuzz_seq": seq, "fuzz_part": part, "time": T0 - rng.choice((60, 3600, 0)),
                 "distinct_id": f"fuzz-u-{rng.randrange(5)}"}
        if imported or rng.random() < 0.5:  # a strict /import needs one; /track makes one up
            props["$insert_id"] = f"fuzz-{seq}-{part}"
        for i in range(rng.randrange(4)):
            props[f"p{i}"] = self.rand_value(rng, False)
        return {"event": "Fuzzed", "properties": props}

    def profile_update(self, rng, seq, kind):
        props = {"fuzz_seq": seq}
        for i in range(rng.randrange(3)):
            props[f"p{i}"] = self.rand_value(rng, False)
        if kind == "people":
            return {"$token": self.TOKEN, "$distinct_id": f"fuzz-p-{seq}", "$set": props, "$ignore_time": True}
        return {"$token": self.TOKEN, "$group_key": "fuzz-co", "$group_id": f"fuzz-g-{seq}", "$set": props}

    def query_params(self, rng, path):
        params = {"from_date": rng.choice(("2026-11-10", "2026-11-14", "2026-11-01", "2026-11-10", "2000-01-01")),
                  "to_date": "2026-11-14"}
        pool = {
            "event": ('["Fuzzed"]', "Fuzzed", '["Fuzzed","Other"]'), "unit": ("day", "hour", "minute", "week", "month"),
            "type": ("general", "unique", "average"), "where": ('properties["fuzz_seq"] > 1',
                                                              'defined(properties["p0"])', 'properties["p1"] == "x"'),
            "on": ('properties["p0"]', 'string(properties["p1"])', 'properties["fuzz_seq"]'),
            "limit": ("10", "1", "100"), "interval": ("1", "7"), "name": ("fuzz_seq", "p0", "distinct_id"),
            "events": ('[{"event":"Fuzzed"},{"event":"Fuzzed"}]', json.dumps(["Fuzzed"] * 1000)),
            "funnel_id": ("1",), "bookmark_id": ("1",),
            "id": ("1",), "distinct_id": ("fuzz-p-1",), "distinct_ids": ('["fuzz-p-1","fuzz-p-2"]',),
            "output_properties": ('["p0"]',), "page": ("0", "1"), "page_size": ("1000",), "born_event": ("Fuzzed",),
            "retention_type": ("birth", "compounded"), "length": ("7",), "length_unit": ("day", "hour"),
            "values": ('["x"]',), "buckets": ("3",), "addiction_unit": ("hour", "day"),
            "date": ("2026-11-14 10:00:00",), "description": ("d",), "time_in_ms": ("1",),
            "project_id": (str(self.PROJECT_ID),), "format": ("json",),
        }
        for name in rng.sample(sorted(pool), rng.randrange(1, 5)):
            params[name] = rng.choice(pool[name])
        if rng.random() < 0.3:
            params[rng.choice(("where", "on", "selector", "born_where"))] = self.expression(rng)
        return params

    def expression(self, rng):
        """Token soup for the expression language (where=, on=): mostly well
        formed, with numbers at a double's edges and every function."""
        atoms = ('properties["p0"]', 'properties["fuzz_seq"]', 'properties["p1"]', "1e308", "-1e308", "0", "-0",
                 "0.5", "9" * 400, '"x"', "'y'", '"\\u"', "true", "false", "null", "undefined", 'user["a"]',
                 "event", 'properties["p2"]["k"]', 'properties["l"][0]', '"2026-11-14"', 'datetime(1e400)',
                 "datetime(-1e308)", 'datetime("x")', "number(\"9e999\")", "string(1e308 * 10)",
                 "floor(-1e308)", 'round(0.5)', "ceil(1e308)", 'defined(properties["zz"])', "boolean(0)")
        ops = (" + ", " - ", " * ", " / ", " % ", " == ", " != ", " < ", " >= ", " and ", " or ", " in ")
        parts = []
        for _ in range(rng.randrange(1, 6)):
            atom = rng.choice(atoms)
            if rng.random() < 0.2:
                atom = rng.choice(("not ", "-", "(", "string(", "number(", "any(x, ", "[")) + atom + rng.choice((
                    "", ")", "]", ", x > 1)", ", 1)"))
            parts.append(atom)
            parts.append(rng.choice(ops))
        return "".join(parts[:-1]) if rng.random() < 0.8 else "".join(parts)

    def inspection_params(self, rng, path):
        pool = {"project": (self.TOKEN, "nope"), "event": ("Fuzzed",), "distinct_id": ("fuzz-u-1", "7"),
                "dedup": ("1", "true"), "since": ("0", "5"), "path": ("/track", "/import"), "limit": ("1", "5"),
                "properties": ('{"p0":"x"}', "{}"), "count": ("0", "1", "2"), "replay_id": ("r1",)}
        params = {name: rng.choice(pool[name]) for name in rng.sample(sorted(pool), rng.randrange(0, 4))}
        if path == "/__parlel/wait":
            params.pop("timeout", None)
        return params

    def admin_body(self, rng, path):
        if path == "/__parlel/faults":
            return {"path": rng.choice(("/track", "*", "/import")), "status": rng.choice((503, 429, 500, None)),
                    "times": 1, "delay": 0}
        if path == "/__parlel/snapshot":
            return json.loads(self.admin_snapshot)
        if path == "/__parlel/tracking-plan":
            return {"plan": {"events": {"Fuzzed": {"required": {"fuzz_seq": "number"}}}},
                    "enforce": rng.random() < 0.5}
        if path == "/__parlel/reset":
            return {}
        return None

    def base(self, rng, method, path, seq):
        """A valid request for a route: (query dict, body bytes or None, headers
        list, good) where good is what a valid ingestion request stores."""
        headers = []
        query: dict = {}
        body = None
        good = None
        if path in ("/track", "/import"):
            events = [self.event(rng, seq, n, path == "/import") for n in range(1 + rng.randrange(3))]
            payload = events if len(events) > 1 or rng.random() < 0.5 else events[0]
            encoding = rng.choice(("form", "form64", "json", "ndjson", "query") if path == "/import"
                                  else ("form", "form64", "json", "query"))
            if method == "GET":
                encoding = "query"
            if encoding == "ndjson" and isinstance(payload, dict):
                payload = [payload]
            if path == "/import":
                auth = rng.choice(("secret", "token", "project_id", "none"))
                if auth == "secret":
                    headers.append(("Authorization", _basic(self.SECRET)["Authorization"]))
                elif auth == "token":
                    headers.append(("Authorization", _basic(self.TOKEN)["Authorization"]))
                elif auth == "project_id":
                    query["project_id"] = str(self.PROJECT_ID)
                if rng.random() < 0.3:
                    query["strict"] = rng.choice(("0", "1"))
            elif rng.random() < 0.5:
                query["verbose"] = rng.choice(("1", "2"))
            if rng.random() < 0.1:
                query["ip"] = "1"
            body, query = self.encode(rng, encoding, payload, query, headers)
            good = ("events", path, events, encoding, query.get("strict"))
        elif path in ("/engage", "/groups"):
            kind = "people" if path == "/engage" else "groups"
            updates = [self.profile_update(rng, f"{seq}.{n}", kind) for n in range(1 + rng.randrange(2))]
            payload = updates if len(updates) > 1 or rng.random() < 0.5 else updates[0]
            encoding = "query" if method == "GET" else rng.choice(("form", "form64", "json"))
            if rng.random() < 0.3:
                query["verbose"] = "1"
            body, query = self.encode(rng, encoding, payload, query, headers)
            good = (kind, path, updates, encoding, None)
        elif path in ("/flags", "/flags/definitions", "/settings") or path.endswith("/first-time-events"):
            context = {"distinct_id": f"fuzz-u-{rng.randrange(5)}", "device_id": "d1"}
            if rng.random() < 0.5:
                headers.append(("Authorization", _basic(self.TOKEN)["Authorization"]))
            else:
                query["token"] = self.TOKEN
            if path == "/settings":
                query["sdk_config"] = "1"
            elif method == "POST":
                body = json.dumps({"context": context}).encode()
                headers.append(("Content-Type", "application/json"))
            else:
                query["context"] = json.dumps(context)
        elif path == "/record":
            headers.append(("Authorization", _basic(self.TOKEN)["Authorization"]))
            query.update(replay_id=f"r{rng.randrange(3)}", seq=str(seq), format="gzip", distinct_id="fuzz-u-1")
            body = gzip.compress(json.dumps([{"type": 2, "data": {"n": seq}}]).encode(), mtime=0)
        elif path.startswith("/api/2.0/"):
            params = self.query_params(rng, path)
            auth = rng.choice(("secret", "secret", "none", "bad"))
            if auth == "secret":
                headers.append(("Authorization", _basic(self.SECRET)["Authorization"]))
            elif auth == "bad":
                headers.append(("Authorization", _basic("nobody", "pw")["Authorization"]))
            if method == "POST" and rng.random() < 0.5:
                if rng.random() < 0.5:
                    body = json.dumps(params).encode()
                    headers.append(("Content-Type", "application/json"))
                else:
                    body = urllib.parse.urlencode(params).encode()
                    headers.append(("Content-Type", "application/x-www-form-urlencoded"))
            else:
                query.update(params)
        elif path.startswith("/__parlel/") and method == "POST":
            value = self.admin_body(rng, path)
            if value is None:
                value = {"/__parlel/funnels": {"name": f"f{seq}", "steps": [{"event": "Fuzzed"}, {"event": "Other"}]},
                         "/__parlel/cohorts": {"name": f"c{seq}", "distinct_ids": ["fuzz-u-1"]},
                         "/__parlel/insights": {"name": f"i{seq}", "event": "Fuzzed", "unit": "day"},
                         "/__parlel/flags": {"project": self.TOKEN, "flags": self.flag_defs},
                         "/__parlel/sdk-config": {"project": self.TOKEN, "config": {"record_sessions_percent": 1}},
                         }.get(path, {})
            body = json.dumps(value).encode()
            headers.append(("Content-Type", "application/json"))
        elif path.startswith("/__parlel/"):
            query.update(self.inspection_params(rng, path))
        return query, body, headers, good

    def encode(self, rng, encoding, payload, query, headers):
        """A payload in one of the encodings the ingestion endpoints read."""
        text = json.dumps(payload, ensure_ascii=rng.random() < 0.5)
        body = None
        if encoding == "json":
            body = text.encode("utf-8")
            headers.append(("Content-Type", rng.choice(("application/json", "text/plain",
                                                        "application/json; charset=utf-8"))))
        elif encoding == "ndjson":
            body = "\n".join(json.dumps(p) for p in payload).encode("utf-8") + rng.choice((b"", b"\n"))
            headers.append(("Content-Type", "application/x-ndjson"))
        elif encoding in ("form", "form64"):
            value = base64.b64encode(text.encode("utf-8")).decode() if encoding == "form64" else text
            fields = dict(query, data=value)
            query = {}
            body = urllib.parse.urlencode(fields).encode()
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        else:  # query: base64 in ?data=
            query = dict(query, data=base64.b64encode(text.encode("utf-8")).decode())
        if body is not None and rng.random() < 0.2:
            body = gzip.compress(body, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        return body, query

    # --- mutating ------------------------------------------------------------------

    def mutate_payload(self, rng, payload):
        """The payload's JSON text (bytes), mutated one way."""
        import re
        how = rng.randrange(11)
        if how <= 3:  # a wrong type, a dropped field, or raw JSON text, somewhere in the tree
            payload = json.loads(json.dumps(payload))
            node = payload
            for _ in range(rng.randrange(4)):
                children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
                children = [c for c in children if isinstance(c, (dict, list)) and c]
                if not children:
                    break
                node = rng.choice(children)
            value = "\x01FUZZ\x01" if how == 3 else self.rand_value(rng, True)
            if isinstance(node, dict):
                key = rng.choice(list(node) + [rng.choice(("event", "properties", "token", "time", "$insert_id",
                                                             "distinct_id", "$set", "$unset", "$add", "$union",
                                                             "$delete", "$token", "$group_id", "\ud800", ""))])
                if rng.random() < 0.15 and how != 3:
                    node.pop(key, None)
                else:
                    node[key] = value
            elif isinstance(node, list) and node:
                node[rng.randrange(len(node))] = value
            elif how == 3 or not isinstance(node, list):
                payload = value
            if rng.random() < 0.1 and how != 3:
                payload = self.rand_value(rng, True)  # the wrong type at the top
            text = json.dumps(payload, ensure_ascii=how == 3 or rng.random() < 0.5)
            text = text.replace('"\\u0001FUZZ\\u0001"', rng.choice(self.RAW_JSON), 1)
            return text.encode("utf-8", "surrogatepass")
        text = json.dumps(payload)
        if how == 4:  # a duplicate key, with another value
            keys = [m.start() for m in re.finditer(r'"[^"\\]{1,30}": ', text)]
            if keys:
                at = rng.choice(keys)
                key = text[at:text.index(":", at)]
                text = (text[:at] + key + ": " + rng.choice(self.RAW_JSON[:12] + ('"dup"', "null", "{}", "[]"))
                        + ", " + text[at:])
            return text.encode("utf-8")
        raw = text.encode("utf-8")
        if how == 5:  # invalid UTF-8 inside a string
            quotes = [i for i in range(len(raw)) if raw[i:i + 1] == b'"']
            at = rng.choice(quotes) + 1 if quotes else 0
            return raw[:at] + rng.choice(self.RAW_BYTES) + raw[at:]
        if how == 6:
            return raw[:rng.randrange(len(raw) + 1)]  # truncated
        if how == 7:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))  # random bytes
        if how == 8:  # flipped and inserted bytes
            data = bytearray(raw)
            for _ in range(rng.randrange(1, 6)):
                at = rng.randrange(len(data) + 1)
                data[at:at + rng.randrange(2)] = bytes([rng.randrange(256)])
            return bytes(data)
        if how == 9:  # deep nesting, or a bare top-level value
            return rng.choice((b"[" * 20000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 5000 + b"]" * 5000,
                               b"1", b'"s"', b"null", b"[]", b"{}", b"[1,2]", b"[[]]", b"", b" ", b"\n\n",
                               b"[" + b"9" * 5000 + b"]", b'[{"event": "e"}]' * 2))
        # many records: past the 2000-a-request limit, or just under it
        one = json.dumps(payload[0] if isinstance(payload, list) else payload)
        return ("[" + ",".join([one] * rng.choice((2001, 1, 50))) + "]").encode("utf-8")

    def mutate_encoded(self, rng, query, body, headers):
        """A mutation of the encoded request (base64, form, gzip, query string)."""
        import zlib
        how = rng.randrange(8)
        if how == 0 and "data" in query:  # malformed base64
            data = query["data"]
            cut = rng.randrange(len(data) + 1)
            query["data"] = rng.choice((data[:cut], data[:cut] + "!" + data[cut:], data.rstrip("=") + "===",
                                        data.replace("+", "-").replace("/", "_"), data[:cut] + "%" + data[cut:],
                                        " " + data, data + "\x00", "=" + data, data[:cut] + "\u00e9" + data[cut:]))
        elif how == 1 and body is not None and not any(k == "Content-Encoding" for k, _ in headers):
            # malformed form encoding
            text = body.decode("latin-1")
            query_pieces = rng.choice(("%zz", "%", "%e9", "%ED%A0%80", "data", "data=", "&&&", "=x", "data=%7B",
                                       "data=x&data=y", "+" * 50, "data=" + "%5B" * 2000,
                                       "&".join(f"f{i}=1" for i in range(1000))))
            body = rng.choice((query_pieces + "&" + text, text + "&" + query_pieces, query_pieces))
            body = body.encode("latin-1", "replace")
        elif how == 2 and body is not None:  # broken gzip
            gz = gzip.compress(body, mtime=0)
            body = rng.choice((gz[:rng.randrange(len(gz))], gz[:-4] + b"\x00\x00\x00\x00", gz + b"junk",
                               gz * 2, body, zlib.compress(body), b"\x1f\x8b" + body, gz[10:]))
            headers[:] = [h for h in headers if h[0] != "Content-Encoding"]
            headers.append(("Content-Encoding", rng.choice(("gzip", "x-gzip", "GZIP", "deflate"))))
        elif how == 3:  # odd values for the other parameters
            name = rng.choice(("verbose", "ip", "img", "callback", "strict", "project_id", "token", "context",
                               "flag_key", "sdk_config", "replay_id", "seq", "format", "limit", "since",
                               "project", "where", "on", "unit", "from_date", "to_date", "event", "count",
                               "properties", "timeout", "empty", "dedup", "data", "path", "page", "interval"))
            query[name] = rng.choice(("", "1", "2", "0", "-1", "1e400", "9" * 5000, "x", "[", "{}", "null",
                                      "true", "\ud800", "\x00", "é", "1.5", "(" * 200, "properties[", '"',
                                      "f(x)", "cb</script>", "2026-13-45", "9999-12-31", "0000-01-01"))
        elif how == 4:  # odd content types
            headers[:] = [h for h in headers if h[0] != "Content-Type"]
            headers.append(("Content-Type", rng.choice(("application/json", "text/plain", "application/x-ndjson",
                                                        "multipart/form-data; boundary=x", "", "json", "x/y;;;",
                                                        "application/x-www-form-urlencoded; charset=latin-1"))))
        elif how == 5:  # credentials, right and wrong
            headers[:] = [h for h in headers if h[0] != "Authorization"]
            headers.append(("Authorization", rng.choice((
                "Basic !!!", "Basic", "Basic " + base64.b64encode(b"\xff\xfe:").decode(), "Bearer x",
                _basic(self.SECRET, "pw")["Authorization"], _basic("")["Authorization"],
                "Basic " + base64.b64encode(b"a").decode(), _basic(self.TOKEN)["Authorization"],
                "basic " + base64.b64encode((self.SECRET + ":").encode()).decode(), "Basic " + "A" * 5000))))
        elif how == 6 and body is not None:  # a body where none is expected, or the wrong one
            body = rng.choice((b"", b"{}", b"[]", b"data=", b"\x00" * 10, body + body))
        else:  # a query string with odd escapes appended
            name = rng.choice(("data", "x", "\u00e9", "%", ""))
            query[name] = rng.choice(("%", "%zz", "%ff", "+", "&", "=", "\u2028"))
        return query, body

    def transport(self, rng, method, target, headers, body):
        """A request mutated at the HTTP level, as bytes."""
        how = rng.randrange(16)
        version = b"HTTP/1.1"
        length = None if body is None else str(len(body)).encode()
        framing = None
        target = target.encode("utf-8", "surrogatepass")
        method = method.encode("latin-1", "replace")
        heads = [(k.encode("latin-1"), v.encode("latin-1", "replace") if isinstance(v, str) else v)
                 for k, v in headers]
        if how == 0:
            method = rng.choice(self.METHODS).encode("latin-1")
        elif how == 1:
            version = rng.choice((b"HTTP/1.0", b"HTTP/1.0", b"", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1",
                                  b"HTTP/9.9", b"HTTP/1", b"HTTP/1.1 extra", b"HTTP/01.1", b"HTTP/1.10"))
            if version == b"HTTP/1.0" and rng.random() < 0.5:
                heads.append((b"Connection", b"keep-alive"))
        elif how == 2:
            target = rng.choice((b"http://127.0.0.1:9/" + target.lstrip(b"/"), b"https://api.mixpanel.com" + target,
                                 b"//" + target.lstrip(b"/"), target.lstrip(b"/"), b"*", target + b"#frag",
                                 target.replace(b"/", b"\\"), b"http://[" + target, target + b"%", target + b"?" * 3,
                                 target[:1] + b"\xff\xfe" + target[1:], b"/" + b"a" * 100000, target + b"/",
                                 b"HTTP://x" + target, b"/api/query" + target, target.upper(), b"/%2e%2e" + target))
        elif how == 3:  # Host: missing, twice, odd
            heads = [h for h in heads if h[0] != b"Host"]
            heads += rng.choice(([], [(b"Host", b"a"), (b"Host", b"b")], [(b"Host", b"[::1]:80")], [(b"Host", b"")],
                                 [(b"Host", b"a:b:c")], [(b"Host", b"\xff\xfe")], [(b"Host", b"[")]))
        elif how == 4:  # huge or many headers
            heads += rng.choice(([(b"X-Big", b"x" * 70000)], [(b"X-H%d" % i, b"v") for i in range(120)],
                                 [(b"X-Big", b"x" * 60000)], [(b"Cookie", b"a=" + b"b" * 8000)]))
        elif how == 5:  # malformed header lines
            heads.append(rng.choice(((b"NoColon", None), (b" Leading", b"space"), (b"X-Nul", b"a\x00b"),
                                     (b"X-Fold", b"a\r\n folded"), (b"X-\xff", b"v"), (b"", b"empty-name"),
                                     (b"X-Bare-CR", b"a\rb"), (b"X-LF", b"a\nX-Injected: 1"))))
        elif how == 6:  # conflicting or odd content headers
            heads += rng.choice(([(b"Content-Type", b"application/json"), (b"Content-Type", b"text/plain")],
                                 [(b"Content-Encoding", rng.choice((b"br", b"gzip, identity", b"compress", b" GZIP ",
                                                                      b"gzip, gzip", b"\xff", b"identity")))],
                                 [(b"Expect", b"100-continue")], [(b"Connection", b"close")],
                                 [(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")],
                                 [(b"Origin", b"http://x"), (b"Access-Control-Request-Method", b"POST")],
                                 [(b"Accept-Encoding", b"gzip")], [(b"Accept-Encoding", b"gzip;q=0, br")]))
        elif how in (7, 8):  # Content-Length: missing, conflicting, negative, wrong
            payload_length = len(body or b"")
            length = rng.choice((None, b"-1", b"+%d" % payload_length, b" %d " % payload_length, b"0x10", b"1.0", b"",
                                 b"99999999999", b"%d" % (payload_length + 10), b"%d" % max(payload_length - 3, 0),
                                 b"%d, %d" % (payload_length, payload_length), b"9" * 30, b"\xff"))
            if rng.random() < 0.3:
                heads.append((b"Content-Length", rng.choice((b"0", b"%d" % payload_length, b"5"))))
            body = body if body is not None else rng.choice((b"", b"data=x", b"{}"))
        elif how in (9, 10):  # chunked bodies: valid, malformed, unterminated
            body = body if body is not None else b'{"a":1}'
            pieces = []
            at = 0
            while at < len(body):
                step = rng.randrange(1, max(2, len(body) // 2 + 1))
                pieces.append(b"%x%s\r\n%s\r\n" % (step if at + step <= len(body) else len(body) - at,
                                                   rng.choice((b"", b";ext=1", b" ; a")), body[at:at + step]))
                at += step
            end = rng.choice((b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"", b"0\r\n", b"zz\r\n",
                              b"-1\r\n\r\n", b"ffffffffffffffffff\r\n", b"0x5\r\n", b"5\r\nab", b"\r\n"))
            if rng.random() < 0.2 and pieces:
                pieces[0] = pieces[0].replace(b"\r\n", b"\n", 1)  # bare LF after the size
            framing = b"".join(pieces) + end
            heads.append((b"Transfer-Encoding", rng.choice((b"chunked", b"chunked", b"Chunked", b"chunked, chunked",
                                                            b"gzip, chunked", b"identity, chunked", b"chunked, gzip",
                                                            b"xchunked", b" chunked"))))
            if rng.random() < 0.15:
                heads.append((b"Content-Length", b"%d" % len(framing)))
            length = None
        elif how == 11:  # cut anywhere
            data = self.serialize(method, target, version, heads, length, body)
            return data[:rng.randrange(len(data))]
        elif how == 12:  # nothing, blank lines, garbage
            choice = rng.randrange(6)
            if choice == 0:
                return rng.choice((b"", b"\r\n", b"\r\n\r\n", b"\n", b"   \r\n"))
            if choice == 1:
                return b"\r\n" + self.serialize(method, target, version, heads, length, body)
            if choice == 2:
                return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            if choice == 3:
                return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40)  # a TLS hello
            if choice == 4:
                return b"GET /health\r\n"  # HTTP/0.9
            return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        elif how == 13 and rng.random() < 0.1:  # a request line beyond the 4 MB cap (rarely: 4 MB to send)
            target = b"/track?data=" + b"a" * (mixpanel_fake._MAX_REQUEST_LINE + 1)
        elif how == 14:  # pipelined: another request (or half of one) after this one
            data = self.serialize(method, target, version, heads, length, body)
            extra = rng.choice((b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /health HTTP/1.1\r\n",
                                b"junk\r\n\r\n", b"\r\n", b"POST /track HTTP/1.1\r\nContent-Length: 5\r\n\r\nda"))
            return data + extra
        else:  # no header lines at all, or all of them lower-case
            heads = [] if rng.random() < 0.5 else [(k.lower(), v) for k, v in heads]
        return self.serialize(method, target, version, heads, length, body, framing)

    @staticmethod
    def serialize(method, target, version, heads, length, body, framing=None):
        line = method + b" " + target + (b" " + version if version else b"")
        lines = [line] + [k if v is None else k + b": " + v for k, v in heads]
        if length is not None:
            lines.append(b"Content-Length: " + length)
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        return data + (framing if framing is not None else (body or b""))

    @staticmethod
    def target_of(path, query):
        if not query:
            return path
        return path + "?" + urllib.parse.urlencode(query, errors="surrogatepass")

    # --- one case ------------------------------------------------------------------

    def routes(self):
        rows = sorted(mixpanel_fake._ROUTES) + [("POST", "/flags/fuzz-flag/first-time-events")]
        return [(m, p) for m, p in rows]

    def make_case(self, rng, index, routes):
        """Case ``index``: (fake name, request bytes, dict of what it is)."""
        if rng.random() < 0.4:
            method, path = rng.choice([r for r in routes if r[1] in ("/track", "/import", "/engage", "/groups")])
        else:
            method, path = rng.choice(routes)
        seq = 1_000_000 + index
        query, body, headers, good = self.base(rng, method, path, seq)
        if path == "/__parlel/wait":
            body = None
        headers = [("Host", f"127.0.0.1:{self.fake.port}")] + headers
        level = rng.random()
        mutated = []
        if level >= 0.3 and good is not None and rng.random() < 0.5:
            mutated.append("payload")
            records = good[2] if len(good[2]) > 1 or rng.random() < 0.5 else good[2][0]
            text = self.mutate_payload(rng, records)
            if good[3] == "query":
                query["data"] = base64.b64encode(text).decode() if rng.random() < 0.7 else text.decode("latin-1")
            elif good[3] in ("form", "form64"):
                fields = urllib.parse.parse_qs(body.decode() if not any(h[0] == "Content-Encoding" for h in headers)
                                               else gzip.decompress(body).decode())
                value = base64.b64encode(text) if good[3] == "form64" else text
                fields = {k: v[0] for k, v in fields.items()}
                fields["data"] = value
                body = urllib.parse.urlencode(fields).encode()
                headers = [h for h in headers if h[0] != "Content-Encoding"]
            else:
                body = text
                headers = [h for h in headers if h[0] != "Content-Encoding"]
        elif level >= 0.3 and good is None and rng.random() < 0.6:
            # wrong types in the fields of the other routes' JSON bodies and parameters
            mutated.append("fields")
            if body is not None and ("Content-Type", "application/json") in headers:
                body = self.mutate_payload(rng, json.loads(body))
            elif query:
                name = rng.choice(sorted(query))
                value = query[name]
                try:
                    value = self.mutate_payload(rng, json.loads(value)).decode("latin-1")
                except ValueError:
                    value = rng.choice((rng.choice(self.RAW_JSON), json.dumps(self.rand_value(rng, True))))
                query[name] = value
        if level >= 0.3 and (not mutated or rng.random() < 0.3):
            mutated.append("encoded")
            query, body = self.mutate_encoded(rng, dict(query), body, headers)
        if path == "/__parlel/wait":  # first wins: a wait that never blocks
            timeout = rng.choice(("0", "-1", "nan", "NaN", "-inf", "1e-400", "-1e400", "x", "0x1"))
            query = dict({"timeout": timeout}, **{k: v for k, v in query.items() if k != "timeout"})
            body = None
        target = self.target_of(path, query)
        safe = True
        if level >= 0.65:
            mutated.append("http")
            data = self.transport(rng, method, target, headers, body)
            safe = False
        else:
            data = self.serialize(method.encode(), target.encode("utf-8", "surrogatepass"), b"HTTP/1.1",
                                  [(k.encode(), v.encode("latin-1", "replace")) for k, v in headers],
                                  None if body is None else str(len(body)).encode(), body)
        drop_ok = not data.strip()  # nothing asked: closing unanswered is right
        sent_method, sent_path = self.request_route(data)
        admin = self.is_admin(sent_method, sent_path) or self.is_admin(method, path)
        if admin and path == "/__parlel/wait":
            admin = False
        info = {"index": index, "route": (method, path), "mutated": mutated, "data": data, "safe": safe,
                "drop_ok": drop_ok, "head": sent_method == "HEAD", "good": good if not mutated else None,
                "sent": (sent_method, sent_path), "admin": admin}
        return info

    @staticmethod
    def request_route(data):
        """Method and normalized path of the request line the server will read."""
        data = data.lstrip(b"\r\n")
        end = data.find(b"\n")
        words = (data if end < 0 else data[:end]).split()
        if len(words) < 2:
            return None, None
        path, _ = mixpanel_fake._split_target(words[1].decode("latin-1"))
        return words[0].decode("latin-1"), path

    def is_admin(self, method, path):
        if method is None:
            return False
        handler = mixpanel_fake._ROUTES.get(("GET" if method == "HEAD" else method, path))
        return handler in self.ADMIN

    def exchange(self, port, cases, done):
        """Send cases on one connection (keep-alive between safe ones); after
        each, ``done(case, answers)``: a list of (status, headers, body), or a
        string saying what went wrong."""
        import zlib
        sock = None
        reader = None
        for position, case in enumerate(cases):
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = sock.makefile("rb")
            last = position == len(cases) - 1 or not case["safe"]
            answers = []
            problem = None
            try:
                try:
                    sock.sendall(case["data"])
                    if last:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # answered and closed before reading it all: the answer is still there
                while True:
                    answer = _fuzz_read_reply(reader, case["head"])
                    if answer is None:
                        break
                    answers.append(answer)
                    if not last:
                        break
            except socket.timeout:
                problem = "no answer within 10 s (a hang)"
            except ConnectionResetError:
                problem = "connection reset" if not answers else None
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                problem = f"malformed answer: {type(exc).__name__}: {exc}"
            if problem is None and not answers and not case["drop_ok"]:
                problem = "connection closed without an answer"
            closing = last or problem is not None or not answers or any(
                "close" in ",".join(h.get("connection", [])).lower() for _, h, _ in answers)
            if closing:
                reader.close()
                sock.close()
                sock = None
            done(case, problem if problem is not None else answers)

    # --- the invariants ----------------------------------------------------------

    def counts(self):
        """Stored events, and refusals marked dropped (`$ignore`: answered as
        accepted) since the last call, on the main fake."""
        store = self.fake.store
        dropped = refused = 0
        with store.lock:
            events = sum(len(state.events) for state in store.states.values())
            for token, state in store.states.items():
                seen = self.rejected_seen.get(token, 0)
                dropped += sum(1 for row in state.rejected[seen:] if row["dropped"])
                refused += len(state.rejected) - seen
                self.rejected_seen[token] = len(state.rejected)
            last = store.journal[-1] if store.journal_seq == self.journal_seen + 1 else None
            self.journal_seen = store.journal_seq
        return events, dropped, refused, last  # last: this case's journal entry, if it made one

    @staticmethod
    def accepted(status, headers, body):
        """What an answer says was stored: ("exact", n), ("some", 1) or
        ("unknown", 0) for a pixel (it answers either way), else ("none", 0)."""
        kind = (headers.get("content-type") or [""])[0]
        if kind == "image/gif":
            return "unknown", 0
        if kind == "text/javascript":  # JSONP: callback(answer), the callback may hold brackets
            if body.endswith((b"(0)", b"(1)")):
                body, kind = body[-2:-1], "text/plain"
            elif b'({"status":' in body:
                body, kind = body[body.rindex(b'({"status":') + 1:-1], "application/json"
        if body == b"1":
            return "some", 1
        if kind.startswith("application/json"):
            try:
                value = json.loads(body)
            except ValueError:
                return "none", 0
            if isinstance(value, dict) and value.get("status") == 1 and "error" in value:
                return "some", 1
            if isinstance(value, dict) and isinstance(value.get("num_records_imported"), int):
                return "exact", value["num_records_imported"]
        return "none", 0

    @staticmethod
    def prescribed(status, data):
        """501 for a transfer coding the server does not know, 505 for HTTP/2
        and later over HTTP/1: the 5xx RFC 9112 §6.1 and RFC 9110 §15.6.6 prescribe."""
        data = data.lstrip(b"\r\n")
        head = data[:data.find(b"\r\n\r\n")].split(b"\r\n")
        version = head[0].rsplit(b" ", 1)[-1]
        codings = b"".join(line.split(b":", 1)[1] for line in head[1:]
                           if line.lower().startswith(b"transfer-encoding:"))
        return (status == 501 and codings.strip().lower() not in (b"", b"chunked")) or (
            status == 505 and version[:5] == b"HTTP/" and version[5:6] not in (b"0", b"1"))

    def check_case(self, case, answers):
        """The invariants after one case; appends to self.failures."""
        fake = self.admin if case["admin"] else self.fake
        problems = []
        if isinstance(answers, str):
            problems.append(answers)
            answers = []
        for status, headers, body in answers:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status >= 500 and not self.prescribed(status, case["data"]):
                problems.append(f"status {status}")
        if len(fake.store.errors) != self.errors_seen[case["admin"]]:
            self.errors_seen[case["admin"]] = len(fake.store.errors)
            problems.append(f"internal error: {fake.store.errors[-1]!r}")
        if case["admin"]:
            self.admin.clear_faults()  # an injected fault must not hit the next case
        else:
            events, dropped, refused, last = self.counts()
            landed = events - self.events_seen + dropped
            added = events - self.events_seen
            self.events_seen = events
            verdicts = [self.accepted(*answer) for answer in answers[:1]]
            exact = sum(n for kind, n in verdicts if kind == "exact")
            some = sum(n for kind, n in verdicts if kind == "some")
            ingests = case["sent"][1] in ("/track", "/import") and case["sent"][0] in ("GET", "POST")
            if not ingests and added:
                problems.append(f"{added} events stored by a request to {case['sent']}")
            elif ingests and last is not None and isinstance(last["records"], list) and (
                    added + refused != len(last["records"])):
                # Every record decoded is either stored or kept among the refusals.
                problems.append(f"of {len(last['records'])} records decoded, {added} were stored and "
                                f"{refused} refused")
            elif ingests and not any(kind == "unknown" for kind, _ in verdicts):
                if some == 0 and landed != exact:
                    problems.append(f"the answer says {exact} records were accepted; {landed} landed")
                elif some and landed < exact + some:
                    problems.append(f"the answer says some records were accepted; {landed} landed")
            good = case["good"]
            if good is not None and not problems:
                verdict = verdicts[0] if verdicts else ("none", 0)
                if verdict[0] == "none" or (verdict[0] == "exact" and verdict[1] != len(good[2])):
                    problems.append("a valid request was refused")
                elif good[0] == "events":
                    if added != len(good[2]):
                        problems.append(f"a valid request of {len(good[2])} events stored {added}")
                    for event in good[2]:
                        self.remembered[(event["properties"]["fuzz_seq"], event["properties"]["fuzz_part"])] = (
                            good[1], event)
                else:
                    for update in good[2]:
                        self.remembered_profiles.append((good[0], update))
        if problems:
            shown = [(status, {k: v for k, v in headers.items() if k in ("content-type", "content-length",
                                                                          "connection", "transfer-encoding")},
                      body[:300]) for status, headers, body in answers]
            self.failures.append(
                f"seed {self.seed} case {case['index']} (replay: MIXPANEL_FAKE_FUZZ_SEED={self.seed} "
                f"MIXPANEL_FAKE_FUZZ_CASES={case['index'] + 1}; {'admin' if case['admin'] else 'main'} fake, route "
                f"{case['route']}, mutated {case['mutated']}): {'; '.join(problems)}\n"
                f"  sent {case['sent']}: {case['data'][:300]!r} ({len(case['data'])} bytes)\n  answers: {shown}")

    def check_health(self):
        self.journal_seen += 1  # the main fake journals its /health
        for fake, name in ((self.fake, "main"), (self.admin, "admin")):
            found = []
            case = {"data": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "safe": True, "drop_ok": False, "head": False}
            self.exchange(fake.port, [case], lambda _, answers: found.append(answers))
            answer = found[0]
            if isinstance(answer, str) or [(s, b) for s, _, b in answer] != [(200, b'{"status":"ok"}')]:
                self.failures.append(f"seed {self.seed}: /health on the {name} fake after case "
                                     f"{self.case_index}: {answer!r}")

    def check_records(self):
        """Every record a valid request got accepted: stored once, as sent
        plus what Mixpanel adds (README "Stored events"); returns the losses."""
        lost = []
        found: dict = {}
        for event in self.fake.events():
            props = event["properties"]
            key = (props.get("fuzz_seq"), props.get("fuzz_part"))
            if all(type(part) is int for part in key) and key in self.remembered:
                found.setdefault(key, []).append(event)
        for key, (endpoint, sent) in self.remembered.items():
            copies = found.get(key, [])
            expected = dict(sent["properties"], **{"$mp_api_endpoint": "127.0.0.1", "$mp_api_timestamp_ms": T0 * 1000,
                                                   "mp_processing_time_ms": T0 * 1000})
            if endpoint == "/import":
                expected["$import"] = True
            if len(copies) == 1 and "$insert_id" not in sent["properties"]:
                generated = copies[0]["properties"].get("$insert_id", "")
                if isinstance(generated, str) and len(generated) == 32 and set(generated) <= set("0123456789abcdef"):
                    expected["$insert_id"] = generated
            if len(copies) != 1 or copies[0] != {"event": sent["event"], "properties": expected}:
                lost.append(f"event {key} from {endpoint}: sent {sent}, stored {copies}")
        profiles = self.fake.profiles(project=self.TOKEN)
        groups = self.fake.groups(project=self.TOKEN)
        for kind, update in self.remembered_profiles:
            stored = (profiles.get(update["$distinct_id"]) if kind == "people"
                      else groups.get((update["$group_key"], update["$group_id"])))
            if stored != update["$set"]:
                lost.append(f"{kind} update {update}: stored {stored}")
        return lost

    def checkpoint(self, lost, totals):
        lost += self.check_records()
        totals[0] += len(self.remembered)
        totals[1] += len(self.remembered_profiles)
        totals[2] += self.fake.stats()["events"]
        self.remembered = {}
        self.remembered_profiles = []
        self.fake.reset()
        self.rejected_seen = {}
        self.events_seen = self.counts()[0]

    def test_regression_wait_timeout_nan_is_refused_not_endless(self):
        # float("nan") passed the 0..60 s clamp and the wait never ended.
        for timeout in ("nan", "NaN", "-nan"):
            with self.subTest(timeout=timeout):
                status, _, body = _http("GET", "/__parlel/wait?timeout=" + timeout, port=self.fake.port, timeout=5)
                self.assertEqual((status, json.loads(body)), (400, {"error": "timeout must be a number of seconds"}))
        status, _, body = _http("GET", "/__parlel/wait?timeout=-inf", port=self.fake.port, timeout=5)
        self.assertEqual((status, json.loads(body)["message"].split(":")[0]), (408, "waited 0.0s"))

    def test_regression_funnel_answer_is_bounded(self):
        # 1000 steps over 27 years answered 1.3 GB of JSON after a minute.
        query = urllib.parse.urlencode({"from_date": "2000-01-01", "to_date": "2026-11-14",
                                        "events": json.dumps(["Fuzzed"] * 11)})
        status, _, body = _http("GET", "/api/2.0/funnels?" + query, headers=_basic(self.SECRET),
                                port=self.fake.port)
        self.assertEqual((status, json.loads(body)["error"]),
                         (400, "the answer would hold more than 100000 funnel steps (dates x segments x steps): "
                               "shorten the range, or use fewer steps or a lower limit"))
        query = urllib.parse.urlencode({"from_date": "2000-01-01", "to_date": "2026-11-14",
                                        "events": json.dumps(["Fuzzed"] * 10)})  # 9815 days x 10: answered
        status, _, body = _http("GET", "/api/2.0/funnels?" + query, headers=_basic(self.SECRET),
                                port=self.fake.port)
        self.assertEqual((status, len(json.loads(body)["data"])), (200, 9815))

    def test_fuzz(self):
        import random
        rng = random.Random(self.seed)
        routes = self.routes()
        self.failures = []
        self.statuses = {}
        self.remembered = {}
        self.remembered_profiles = []
        self.rejected_seen = {}
        self.errors_seen = {False: 0, True: 0}
        self.journal_seen = 0
        self.events_seen = self.counts()[0]
        covered = set()
        lost: list = []
        totals = [0, 0, 0]  # events and profile updates checked, events stored
        started = time.monotonic()
        batch = []
        for self.case_index in range(self.cases):
            case = self.make_case(rng, self.case_index, routes)
            covered.add(case["route"])
            if batch and (not case["safe"] or case["admin"] or batch[0]["admin"] or len(batch) >= 16):
                self.exchange(self.fake.port, batch, self.check_case)
                batch = []
            if case["safe"] and not case["admin"]:
                batch.append(case)
            else:
                self.exchange((self.admin if case["admin"] else self.fake).port, [case], self.check_case)
            if self.case_index % self.HEALTH_EVERY == self.HEALTH_EVERY - 1:
                if batch:
                    self.exchange(self.fake.port, batch, self.check_case)
                    batch = []
                self.check_health()
            if len(self.failures) >= 10:
                break
            if self.case_index % self.CHECKPOINT == self.CHECKPOINT - 1:
                # Check the records so far, then start over empty: a long run
                # stays linear (listings and queries read every stored event).
                if batch:
                    self.exchange(self.fake.port, batch, self.check_case)
                    batch = []
                self.checkpoint(lost, totals)
        if batch:
            self.exchange(self.fake.port, batch, self.check_case)
        self.check_health()
        self.checkpoint(lost, totals)
        elapsed = time.monotonic() - started
        ran = self.case_index + 1
        print(f"fuzz: {ran} cases over {len(covered)} routes (seed {self.seed}): {len(self.failures)} failures, "
              f"{len(lost)} records lost of {totals[0] + totals[1]} accepted and checked ({totals[0]} events, "
              f"{totals[1]} profile updates), {totals[2]} events stored, "
              f"statuses {dict(sorted(self.statuses.items()))}, {elapsed:.1f} s", file=sys.stderr, flush=True)
        self.assertEqual(self.failures, [], "\n".join(self.failures[:5]))
        self.assertEqual(lost, [], "\n".join(lost[:5]))
        if ran >= 2000:
            self.assertEqual(covered, set(routes))  # every row of the table was fuzzed
        self.fake.check()
        self.admin.check()


class TestStrictAuth(unittest.TestCase):
    """Strict auth: configured credentials only; projects never see each other."""

    def setUp(self):
        self.fake = MixpanelFake(strict_auth=True, projects=[
            Project("tokA", project_id=1, api_secret="secA"),
            Project("tokB", project_id=2, api_secret="secB", service_accounts={"sa.b": "pw"})]).start()
        self.addCleanup(self.fake.stop)
        self.fake.set_time(T0)

    def http(self, method, path, body=None, headers=None):
        status, _, raw = _http(method, path, body, headers, port=self.fake.port)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def test_track_with_an_unknown_token_answers_1_and_stores_nothing(self):
        # mixpanel-node #59: a token naming no project still gets 1.
        self.assertEqual(self.http("POST", "/track", json.dumps(_event(token="nope"))), (200, 1))
        self.assertEqual(self.fake.events(), [])
        (record,) = self.fake.rejected()
        self.assertEqual((record["dropped"], record["reason"][:21]), (True, "unknown project token"))

    def test_import_needs_configured_credentials(self):
        body = json.dumps([_full(token="tokA")])
        self.assertEqual(self.http("POST", "/import", body), (401, {
            "code": 401, "error": "Invalid credentials", "status": "Unauthorized"}))
        self.assertEqual(self.http("POST", "/import", body, _basic("secX"))[0], 401)
        self.assertEqual(self.http("POST", "/import", body, _basic("secA"))[1]["num_records_imported"], 1)
        status, answer = self.http("POST", "/import", json.dumps([_full(token="tokB")]), _basic("secA"))
        self.assertEqual(answer["failed_records"][0]["message"],
                         "token names another project than the request's credentials")

    def test_queries_need_credentials(self):
        self.assertEqual(self.http("GET", "/api/2.0/events/names?type=general")[0], 401)
        self.assertEqual(self.http("GET", "/api/2.0/events/names?type=general&project_id=1")[0], 401)
        self.assertEqual(self.http("GET", "/api/2.0/events/names?type=general", headers=_basic("secA"))[0], 200)
        self.assertEqual(self.http("GET", "/api/2.0/events/names?type=general&project_id=2",
                                   headers=_basic("sa.b", "pw"))[0], 200)

    def test_two_projects_never_see_each_other(self):
        self.http("POST", "/track", json.dumps([_event("A only", token="tokA", distinct_id="a")]))
        self.http("POST", "/track", json.dumps([_event("B only", token="tokB", distinct_id="b")]))
        self.http("POST", "/engage", json.dumps([{"$token": "tokA", "$distinct_id": "a", "$set": {"x": 1}},
                                                 {"$token": "tokB", "$distinct_id": "b", "$set": {"x": 2}}]))
        as_a = _basic("secA")
        self.assertEqual(self.http("GET", "/__parlel/events", headers=_basic("tokA"))[0], 401)  # tokens are public
        for path in ("/__parlel/events", "/__parlel/people", "/__parlel/groups", "/__parlel/rejected",
                     "/__parlel/projects", "/__parlel/requests", "/__parlel/snapshot"):
            with self.subTest(path):
                status, body = self.http("GET", path, headers=as_a)
                self.assertEqual(status, 200)
                text = json.dumps(body)
                self.assertNotIn("B only", text)
                self.assertNotIn("tokB", text)
                self.assertEqual(self.http("GET", path)[0], 401)
                self.assertEqual(self.http("GET", path + "?project=tokB", headers=as_a)[0], 403)
        names = self.http("GET", "/api/2.0/events/names?type=general", headers=_basic("secA"))[1]
        self.assertEqual(names, ["A only"])
        rows = self.http("GET", "/api/2.0/export?from_date=2026-11-14&to_date=2026-11-14", headers=_basic("secA"))[1]
        self.assertNotIn(b"B only", rows)
        self.http("POST", "/__parlel/reset", headers=as_a)
        self.assertEqual([e["event"] for e in self.fake.events()], ["B only"])


class TestJournal(_ServerTestCase):

    def test_requests_are_journaled_with_secrets_redacted(self):
        since = (MP.requests() or [{"seq": 0}])[-1]["seq"]
        _http("POST", "/import?api_key=k3y&verbose=1", _form(data=json.dumps([_full()]), api_secret="s3cr3t"),
              _basic("very-secret-user", "pw"))
        (entry,) = MP.requests(since=since)
        self.assertEqual((entry["method"], entry["path"], entry["status"], entry["fault"]), ("POST", "/import", 200, None))
        self.assertEqual(entry["query"], "api_key=<redacted>&verbose=1")
        self.assertEqual(entry["headers"]["Authorization"], "<redacted>")
        self.assertEqual([r["event"] for r in entry["records"]], ["Imported"])
        self.assertEqual(entry["response"], '{"status":1,"error":null}')
        text = json.dumps(MP.requests()) + _http("GET", "/__parlel/requests")[2].decode()
        for secret in ("k3y", "s3cr3t", "very-secret-user"):
            self.assertNotIn(secret, text)

    def test_a_basic_username_naming_no_project_is_never_shown(self):
        # The Python SDK's import_data(api_secret=...) sends the secret as the
        # Basic username; unknown here, it is not a project to show.
        with MixpanelFake() as fake:
            _http("POST", "/import?verbose=1", _form(data=json.dumps([_full()])), _basic("s3cret-name", ""),
                  port=fake.port)
            (entry,) = fake.requests(path="/import")
            self.assertEqual((entry["project"], entry["projects"]), (TOKEN, [TOKEN]))
            self.assertNotIn("s3cret-name", json.dumps(fake.requests()))

    def test_a_faulted_request_keeps_the_project_its_fault_was_for(self):
        with MixpanelFake() as fake:
            fake.add_fault("/track", status=503, project=TOKEN)
            self.assertEqual(_http("POST", "/track", json.dumps(_event()), port=fake.port)[0], 503)
            (entry,) = fake.requests(path="/track", project=TOKEN)
            self.assertEqual((entry["project"], entry["status"], entry["fault"] is not None), (TOKEN, 503, True))

    def test_since_cursor_and_path_filter_over_http(self):
        _http("GET", "/health")
        cursor = MP.requests()[-1]["seq"]
        _http("POST", "/track", json.dumps(_event()))
        _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}}))
        status, body = _json("GET", f"/__parlel/requests?since={cursor}&path=/track")
        self.assertEqual([r["path"] for r in body["requests"]], ["/track"])
        self.assertEqual(_json("GET", f"/__parlel/requests?since={cursor}&limit=1")[1]["requests"][0]["path"],
                         "/engage")

    def test_the_journal_is_bounded_and_survives_reset(self):
        with MixpanelFake(journal_size=3) as fake:
            for _ in range(5):
                _http("GET", "/health", port=fake.port)
            fake.reset()
            self.assertEqual([r["seq"] for r in fake.requests()], [3, 4, 5])

    def test_the_journal_keeps_the_newest_20000_records(self):
        batch = json.dumps([_event(f"E{i}") for i in range(2000)])
        with MixpanelFake(journal_size=50) as fake:
            fake.set_time(T0)
            for _ in range(12):
                self.assertEqual(_http("POST", "/track", batch, port=fake.port)[::2], (200, b"1"))
            entries = fake.requests(path="/track")
            self.assertEqual([(len(e["records"] or ()), e["records_dropped"]) for e in entries],
                             [(0, 2000)] * 2 + [(2000, 0)] * 10)
            self.assertEqual(entries[-1]["records"][1999], _event("E1999"))
            self.assertEqual(len(fake.events()), 24000)  # only the journal lets go
        with MixpanelFake(journal_size=3) as fake:  # entries that leave the ring take theirs along
            fake.set_time(T0)
            for _ in range(5):
                _http("POST", "/track", batch, port=fake.port)
            self.assertEqual(fake.store._journal_records, 6000)
            self.assertEqual(fake.store._journal_text, 3 * len(batch))
            self.assertEqual([len(e["records"]) for e in fake.requests()], [2000] * 3)

    def test_the_journal_cuts_long_query_strings_and_header_values(self):
        with MixpanelFake() as fake:
            _http("GET", "/health?junk=" + "j" * 10_000, headers={"X-Long": "h" * 10_000}, port=fake.port)
            entry = fake.requests(path="/health")[-1]
            self.assertEqual(entry["query"], ("junk=" + "j" * 10_000)[:2000])
            self.assertEqual(entry["headers"]["X-Long"], "h" * 2000)

    def test_a_faulted_request_keeps_what_it_sent(self):
        with MixpanelFake() as fake:
            fake.add_fault("/import", status=503, times=1)
            fake.add_fault("/engage", drop_connection=True, times=1)
            sent = [_event("Retried")]
            self.assertEqual(_post_to(fake, "/import?strict=0", sent)[0], 503)
            self.assertEqual(_post_to(fake, "/import?strict=0", sent)[0], 200)
            with self.assertRaises((ConnectionError, http.client.HTTPException)):
                _post_to(fake, "/engage", [{"$token": "t", "$distinct_id": "u", "$set": {"a": 1}}])
            _http("POST", "/track", "data=%7Bbad", {"Content-Type": "application/x-www-form-urlencoded"},
                  port=fake.port)
            entries = fake.requests()
            self.assertEqual([(e["path"], e["status"], e["records"], e["projects"]) for e in entries], [
                ("/import", 503, sent, [sent[0]["properties"]["token"]]),
                ("/import", 200, sent, [sent[0]["properties"]["token"]]),
                ("/engage", None, [{"$token": "t", "$distinct_id": "u", "$set": {"a": 1}}], ["t"]),
                ("/track", 200, None, [])])

    def test_the_journal_keeps_no_text_for_no_records(self):
        with MixpanelFake(journal_size=50) as fake:
            body = "[" + " " * 100_000 + "]"
            self.assertEqual(_http("POST", "/track", body, {"Content-Type": "application/json"},
                                   port=fake.port)[0], 200)
            self.assertEqual(fake.requests(path="/track")[-1]["records"], [])
            self.assertEqual(fake.store.journal[-1]["records"], [])  # not the text, kept uncounted
            self.assertEqual(fake.store._journal_text, 0)

    def test_a_scoped_fault_leaves_a_replays_journal_entry_alone(self):
        with MixpanelFake(projects=[Project("tok")]) as fake:
            fake.add_fault("/track", project="other")  # scoped: the fake reads each request's project
            body = json.dumps([{"type": 3, "data": {}, "timestamp": 1}] * 2)
            status = _http("POST", "/record?replay_id=r1&seq=0&token=tok", body,
                           {"Content-Type": "application/json"}, port=fake.port)[0]
            self.assertEqual(status, 200)
            self.assertEqual(fake.requests(path="/record")[-1]["records"],
                             [{"replay_id": "r1", "seq": 0, "events": 2}])

    def test_the_journal_keeps_records_as_text_within_a_character_budget(self):
        batch = json.dumps([_event(f"E{i}") for i in range(10)])
        with unittest.mock.patch.object(mixpanel_fake, "_JOURNAL_TEXT", 3 * len(batch)), \
                MixpanelFake(journal_size=50) as fake:
            fake.set_time(T0)
            for _ in range(5):
                _http("POST", "/track", batch, port=fake.port)
            entries = fake.requests(path="/track")
            self.assertEqual([(len(e["records"] or ()), e["records_dropped"]) for e in entries],
                             [(0, 10)] * 2 + [(10, 0)] * 3)
            self.assertEqual(entries[-1]["records"], json.loads(batch))
            self.assertEqual(fake.store._journal_text, 3 * len(batch))
            self.assertIsInstance(fake.store.journal[-1]["records"], mixpanel_fake._SentRecords)


class TestFaults(_ServerTestCase):

    def test_status_fault_with_the_endpoint_error_shape(self):
        MP.add_fault("/track", status=503, times=2, retry_after=7)
        first = _http("POST", "/track?verbose=1", json.dumps(_event()))
        self.assertEqual((first[0], first[1]["retry-after"], json.loads(first[2])),
                         (503, "7", {"status": 0, "error": "a temporary failure occurred"}))
        self.assertEqual(_http("POST", "/track", json.dumps(_event()))[::2], (503, b"0"))
        self.assertEqual(_http("POST", "/track", json.dumps(_event()))[::2], (200, b"1"))
        self.assertEqual(len(MP.events()), 1)
        self.assertEqual(MP.faults(), [])
        fired = [r["fault"] for r in MP.requests(path="/track")[-3:]]
        self.assertEqual((fired[0] is not None, fired[1] == fired[0], fired[2]), (True, True, None))

    def test_import_and_query_shapes_and_custom_body(self):
        MP.add_fault("/import", status=429, times=1)
        self.assertEqual(_json("POST", "/import", json.dumps([_full()])), (429, {
            "code": 429, "error": "Project exceeded rate limits. Please retry the request with exponential backoff.",
            "status": "Too Many Requests"}))
        MP.add_fault("/api/2.0/segmentation", status=500, body={"oops": True})
        self.assertEqual(_json("GET", "/api/query/segmentation?event=x"), (500, {"oops": True}))

    def test_drop_truncate_delay_probability_and_project(self):
        MP.add_fault("/health", drop_connection=True)
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionError)):
            _http("GET", "/health")
        MP.add_fault("/track", status=503, truncate=True, body="0123456789")
        reply = _raw_request(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(reply.endswith(b"\r\n\r\n01234"), reply[-30:])
        MP.add_fault("/health", status=418, probability=0.5, seed=7, times=None)
        statuses = [_http("GET", "/health")[0] for _ in range(20)]
        self.assertEqual(set(statuses), {200, 418})
        MP.clear_faults()
        MP.add_fault("/track", status=503, project="other_tok", times=None)
        self.assertEqual(_http("POST", "/track", json.dumps(_event()))[0], 200)
        self.assertEqual(_http("POST", "/track", json.dumps(_event(token="other_tok")))[0], 503)

    def test_faults_over_http(self):
        status, body = _json("POST", "/__parlel/faults", json.dumps({"path": "/engage", "status": 502}))
        self.assertEqual(status, 200)
        self.assertEqual(_json("GET", "/__parlel/faults")[1]["faults"][0]["id"], body["id"])
        self.assertEqual(_json("POST", "/__parlel/faults", json.dumps({"path": "/x", "status": 9}))[1],
                         {"error": "status must be an HTTP status, 200 to 599 (None: answer normally, after delay)"})
        self.assertEqual(_json("DELETE", "/__parlel/faults"), (200, {"ok": True}))
        self.assertEqual(MP.faults(), [])

    def test_python_sdk_raises_twice_then_succeeds(self):
        _require(mixpanel is not None, "the Python mixpanel SDK is not installed "
                                       "(pip install -r conformance/requirements.txt)", self)
        MP.set_time(None)
        client = mixpanel.Mixpanel(TOKEN, consumer=mixpanel.Consumer(retry_limit=0, **MP.urls))
        MP.add_fault("/track", status=503, times=2)
        for _ in range(2):
            with self.assertRaises(mixpanel.MixpanelException) as caught:
                client.track("u", "Faulted")
            self.assertIn("a temporary failure occurred", str(caught.exception))
        client.track("u", "Faulted")
        self.assertEqual(len(MP.events(name="Faulted")), 1)

    def test_node_sdk_callback_sees_the_error(self):
        _require(_node_available(), "node or conformance/node_modules/mixpanel is missing", self)
        MP.add_fault("/track", status=503, times=1)
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
        request = {"url": MP.url, "token": TOKEN, "config": {},
                   "calls": [["track", "N", {"distinct_id": "u"}], ["track", "N", {"distinct_id": "u"}]]}
        proc = subprocess.run(["node", NODE_DRIVER], input=json.dumps(request), capture_output=True,
                              text=True, timeout=60, env=env)
        results = json.loads(proc.stdout)["results"]
        self.assertEqual([r["error"] for r in results], ["Mixpanel Server Error: 0", None])


class TestToolkitEdges(unittest.TestCase):
    """Cases reviews found in the toolkit; each behaves as the README says."""

    def test_strict_registration_and_control_api(self):
        with MixpanelFake(strict_auth=True, projects=[Project("tA", api_secret="sA"),
                                                       Project("tB", api_secret="sB")]) as fake:
            def call(method, path, body=None, user=None):
                headers = _basic(user) if user else {}
                return _http(method, path, json.dumps(body) if body is not None else None, headers,
                             port=fake.port)[0]
            funnel = {"name": "f", "steps": ["a", "b"], "project": "tB"}
            self.assertEqual(call("POST", "/__parlel/funnels", funnel), 401)
            self.assertEqual(call("POST", "/__parlel/funnels", funnel, "sA"), 403)
            self.assertEqual(call("POST", "/__parlel/funnels", dict(funnel, project="tA"), "sA"), 200)
            self.assertEqual(call("GET", "/__parlel/funnels", user="sA"), 200)  # no deadlock
            self.assertEqual(call("POST", "/__parlel/tracking-plan", {"project": "tB", "plan": None}, "sA"), 403)
            fake.add_fault("/track", project="tB")
            self.assertEqual(_json_at(fake, "/__parlel/faults", "sA")["faults"], [])
            snapshot = _json_at(fake, "/__parlel/snapshot", "sA")
            self.assertEqual([p["api_secret"] for p in snapshot["projects"]], [None])
            self.assertEqual(call("HEAD", "/__parlel/snapshot", user="sA"), 200)
            _http("POST", "/track", json.dumps([_event(token="newtok")] * 2), port=fake.port)
            self.assertNotIn("newtok", [p["token"] for p in json.loads(
                _http("GET", "/__parlel/projects", headers=_basic("sA"), port=fake.port)[2])["projects"]])
            self.assertEqual(_json_at(fake, "/__parlel/stats", "sA")["projects"], 1)

    def test_bad_snapshots_are_400_and_change_nothing(self):
        with MixpanelFake() as fake:
            for bad in ({"format": "mixpanel_fake/1", "projects": [], "states": []},
                        {"format": "mixpanel_fake/1", "projects": [{"token": "a"}],
                         "states": {"a": {"events": [1]}}},
                        {"format": "mixpanel_fake/1", "projects": [1], "states": {}},
                        {"format": "other"}):
                with self.subTest(bad):
                    status, _, body = _http("POST", "/__parlel/snapshot", json.dumps(bad), port=fake.port)
                    self.assertEqual(status, 400, body)
                    with self.assertRaises(ValueError):
                        fake.restore(bad)
            self.assertEqual(_http("GET", "/__parlel/events", port=fake.port)[0], 200)

    def test_ids_continue_after_loading_a_state_file(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "s.json")
        with MixpanelFake(state_file=path) as fake:
            fake.set_time(T0)
            _post_to(fake, "/track", [_event("old0"), _event("old1")])
        with MixpanelFake(state_file=path) as fake:
            fake.set_time(T0)
            _post_to(fake, "/track", [_event("new0")])
            rows = json.loads(_http("GET", "/__parlel/events", port=fake.port)[2])["events"]
            self.assertEqual([r["event"] for r in rows], ["old0", "old1", "new0"])
            self.assertEqual(len({r["id"] for r in rows}), 3)

    def test_concurrent_saves_never_corrupt_the_file(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "s.json")
        fake = MixpanelFake(state_file=path)
        self.addCleanup(fake.stop)
        fake.store.add_events([(TOKEN, {"event": "E", "properties": {"token": TOKEN, "time": T0}})], [])
        threads = [threading.Thread(target=fake.save) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(json.loads(pathlib.Path(path).read_text())["format"], "mixpanel_fake/1")
        self.assertEqual(os.listdir(directory), ["s.json"])

    def test_star_faults_spare_the_control_api_and_slow_faults_still_answer(self):
        with MixpanelFake() as fake:
            fake.add_fault("*", status=503, times=None)
            self.assertEqual(_http("GET", "/health", port=fake.port)[0], 200)
            self.assertEqual(_http("DELETE", "/__parlel/faults", port=fake.port)[0], 200)
            fake.add_fault("/track", delay=0.05, status=None)
            self.assertEqual(_http("POST", "/track", json.dumps(_event()), port=fake.port)[::2], (200, b"1"))
            self.assertEqual(len(fake.events()), 1)

    def test_wait_ends_when_the_server_stops(self):
        fake = MixpanelFake().start()
        errors = []

        def wait():
            try:
                fake.wait_for("never", timeout=float("inf"))
            except WaitTimeout as exc:
                errors.append(exc)
        waiter = threading.Thread(target=wait)
        waiter.start()
        fake.stop()
        waiter.join(10)
        self.assertFalse(waiter.is_alive())
        self.assertEqual(len(errors), 1)

    def test_argument_checks(self):
        with self.assertRaises(ValueError):
            MixpanelFake(max_events=0)
        with self.assertRaises(ValueError):
            MixpanelFake(journal_size=0)
        with MixpanelFake(max_events=1) as fake:
            fake.set_time(T0)
            _post_to(fake, "/track", [_event("a"), _event("b")])
            self.assertEqual([e["event"] for e in fake.events()], ["b"])
            for bad in ({"path": "track"}, {"path": "/track", "status": 100}, {"path": "/t", "drop_connection": "no"}):
                with self.assertRaises(ValueError):
                    fake.add_fault(**bad)
            with self.assertRaises(ValueError):
                fake.assert_tracked("a", count=-1)
            with self.assertRaises(ValueError):
                fake.requests(limit=0)
            self.assertEqual(_http("GET", "/__parlel/requests?limit=0", port=fake.port)[0], 400)


def _json_at(fake, path, user):
    return json.loads(_http("GET", path, headers=_basic(user), port=fake.port)[2])


class TestRateLimits(unittest.TestCase):

    def test_ingestion_and_query_limits_answer_429_with_retry_after(self):
        with MixpanelFake(projects=[Project("rl")], rate_limits={"events_per_minute": 3, "queries_per_hour": 2,
                                                                   "concurrent_queries": 5}) as fake:
            fake.set_time(T0)
            ok = _http("POST", "/track", json.dumps([_event(token="rl")] * 3), port=fake.port)
            self.assertEqual(ok[::2], (200, b"1"))
            status, headers, body = _http("POST", "/track?verbose=1", json.dumps(_event(token="rl")), port=fake.port)
            self.assertEqual((status, json.loads(body)["error"]), (429, "Project exceeded rate limits. Please retry "
                                                                        "the request with exponential backoff."))
            self.assertGreaterEqual(int(headers["retry-after"]), 1)
            # The refused request is filed under its project, as the limit was counted.
            refused = fake.rejected(project="rl")
            self.assertEqual([(r["index"], r["reason"]) for r in refused],
                             [(None, "rate limit: Project exceeded rate limits. Please retry the request "
                                     "with exponential backoff.")])
            query = "/api/2.0/events/names?type=general"
            for _ in range(2):
                self.assertEqual(_http("GET", query, headers=_basic("rl"), port=fake.port)[0], 200)
            status, headers, body = _http("GET", query, headers=_basic("rl"), port=fake.port)
            self.assertEqual(status, 429)
            self.assertEqual(json.loads(body)["error"],
                             f"Query rate limit exceeded for project_id: {Project('rl').project_id}. 0/5 queries "
                             "running concurrently and 3/2 queries running in the last hour. For more information, "
                             "please consult our documentation at https://help.mixpanel.com/hc/en-us/articles/"
                             "115004602563-Rate-Limits-for-Export-API-Endpoints")
            self.assertIn("retry-after", headers)

    def test_off_by_default_and_checked(self):
        with self.assertRaises(ValueError):
            MixpanelFake(rate_limits={"bogus": 1})


class TestAssertions(_ServerTestCase):

    def test_assert_tracked_passes_and_counts(self):
        _post("/track", [_event("Signed Up", plan="pro"), _event("Signed Up", plan="pro")])
        self.assertEqual(len(MP.assert_tracked("Signed Up", plan="pro")), 2)
        MP.assert_tracked("Signed Up", count=2, properties={"plan": "pro"})
        MP.assert_not_tracked("Signed Up", plan="free")

    def test_failure_lists_the_nearest_misses(self):
        _post("/track", [_event("Signed Up", distinct_id="u1", plan="free", seats=3),
                         _event("Signed up", distinct_id="u2", plan="pro"),
                         {"event": "Signed Up", "properties": {"plan": "pro"}}])  # no token: refused
        with self.assertRaises(AssertionError) as caught:
            MP.assert_tracked("Signed Up", plan="pro", seats=3)
        self.assertEqual(str(caught.exception), "\n".join([
            "expected at least 1 event(s) 'Signed Up' with {'plan': 'pro', 'seats': 3}; found 0",
            "  1 'Signed Up' event(s) arrived with other values:",
            "    distinct_id='u1': plan: 'free' (expected 'pro')",
            "  similar name: 'Signed up' (1 arrived)",
            "  refused on /track (index 2): token, missing or empty"]))

    def test_wrong_count_and_not_tracked(self):
        _post("/track", [_event("Paid")])
        with self.assertRaises(AssertionError) as caught:
            MP.assert_tracked("Paid", count=2)
        self.assertTrue(str(caught.exception).startswith("expected 2 event(s) 'Paid'; found 1"))
        with self.assertRaises(AssertionError) as caught:
            MP.assert_not_tracked("Paid")
        self.assertTrue(str(caught.exception).startswith("expected no event 'Paid'; 1 arrived"))

    def test_assert_profile(self):
        _engage_as("user-1", {"$set": {"plan": "pro"}, "$ignore_time": True})
        self.assertEqual(MP.assert_profile("user-1", plan="pro"), {"plan": "pro"})
        with self.assertRaises(AssertionError) as caught:
            MP.assert_profile("user-1", plan="free", seats=2)
        self.assertEqual(str(caught.exception), "profile 'user-1' differs from {'plan': 'free', 'seats': 2}:\n"
                                                "  plan: 'pro' (expected 'free')\n  seats: missing (expected 2)")
        with self.assertRaises(AssertionError) as caught:
            MP.assert_profile("user-l")
        self.assertEqual(str(caught.exception), "no profile for 'user-l'\n  similar id with a profile: 'user-1'")

    def test_wait_for_returns_or_explains(self):
        timer = threading.Timer(0.1, _post, ("/track", [_event("Late", step=2)]))
        timer.start()
        self.addCleanup(timer.cancel)
        self.assertEqual(len(MP.wait_for("Late", step=2, timeout=5)), 1)
        with self.assertRaises(WaitTimeout) as caught:
            MP.wait_for("Late", count=2, timeout=0.1)
        self.assertTrue(str(caught.exception).startswith("waited 0.1s: expected at least 2 event(s) 'Late'; found 1"))

    def test_exit_reraises_a_handler_error(self):
        with self.assertRaises(ZeroDivisionError):
            with MixpanelFake() as fake:
                fake.store.record_error(ZeroDivisionError("in a handler"))
        with self.assertRaises(KeyError):  # the block's own error wins
            with MixpanelFake() as fake:
                fake.store.record_error(ZeroDivisionError("in a handler"))
                raise KeyError("from the test")


class TestHttpAssertions(_ServerTestCase):
    """The assertions over HTTP, for tests written in other languages."""

    def test_assert_and_wait(self):
        _post("/track", [_event("Signed Up", plan="free")])
        query = urllib.parse.urlencode({"event": "Signed Up", "properties": json.dumps({"plan": "pro"})})
        status, body = _json("GET", "/__parlel/assert?" + query)
        self.assertEqual((status, body["ok"], body["count"]), (417, False, 0))
        self.assertIn("plan: 'free' (expected 'pro')", body["message"])
        self.assertEqual(_json("GET", "/__parlel/assert?event=Signed+Up&count=1"), (200, {"ok": True, "count": 1}))
        timer = threading.Timer(0.1, _post, ("/track", [_event("Later")]))
        timer.start()
        self.addCleanup(timer.cancel)
        status, body = _json("GET", "/__parlel/wait?event=Later&timeout=5")
        self.assertEqual((status, body["count"]), (200, 1))
        status, body = _json("GET", "/__parlel/wait?event=Never&timeout=0.1")
        self.assertEqual((status, body["message"][:50]), (408, "waited 0.1s: expected at least 1 event(s) 'Never';"))


class TestTrackingPlan(_ServerTestCase):
    PLAN = {"events": {"Signed Up": {"required": {"plan": "string", "seats": "number"},
                                     "optional": {"coupon": "string"}}}, "additional_events": False}

    def setUp(self):
        super().setUp()
        MP.add_project(Project("plan_tok"))
        self.addCleanup(MP.set_tracking_plan, None, "plan_tok")
        self.addCleanup(MP.reset, "plan_tok")

    def test_violations_are_reported_but_stored(self):
        MP.set_tracking_plan(self.PLAN, project="plan_tok")
        self.assertEqual(_post("/track", [_event("Signed Up", token="plan_tok", plan="pro", seats="3"),
                                          _event("Sined Up", token="plan_tok")]), (200, 1))
        self.assertEqual(len(MP.events(project="plan_tok")), 2)
        self.assertEqual([(r["stored"], r["reason"]) for r in MP.rejected("plan_tok")], [
            (True, "tracking plan: property 'seats' should be number, got string"),
            (True, "tracking plan: event 'Sined Up' is not in the tracking plan")])

    def test_enforced_plan_refuses(self):
        status, body = _json("POST", "/__parlel/tracking-plan", json.dumps(
            {"project": "plan_tok", "plan": self.PLAN, "enforce": True}))
        self.assertEqual(status, 200)
        self.assertEqual(_post("/track?verbose=1", [_event("Signed Up", token="plan_tok", plan="pro")]),
                         (200, {"status": 0, "error": "tracking plan: missing required property 'seats' (number)"}))
        self.assertEqual(MP.events(project="plan_tok"), [])


class TestState(unittest.TestCase):

    def test_snapshot_restore_and_reset_to_seed(self):
        with MixpanelFake() as fake:
            fake.set_time(T0)
            _post_to(fake, "/track", [_event("Kept", distinct_id="d")])
            _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "d", "$set": {"a": 1}}),
                  port=fake.port)
            snap = fake.snapshot()
            json.dumps(snap)  # JSON-ready
            fake.reset(empty=True)
            self.assertEqual(fake.events(), [])
            fake.restore(snap)
            self.assertEqual([e["event"] for e in fake.events()], ["Kept"])
            self.assertEqual(fake.profile("d")["a"], 1)

    def test_state_file_load_save_and_seed(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "state.json")
        with MixpanelFake(state_file=path) as fake:
            fake.set_time(T0)
            _post_to(fake, "/track", [_event("Seeded")])
        self.assertTrue(os.path.exists(path))  # saved on exit
        with MixpanelFake(state_file=path) as fake:
            self.assertEqual([e["event"] for e in fake.events()], ["Seeded"])
            fake.set_time(T0)
            _post_to(fake, "/track", [_event("Extra")])
            fake.reset()
            self.assertEqual([e["event"] for e in fake.events()], ["Seeded"])  # back to the seed
            fake.reset(empty=True)
            self.assertEqual(fake.events(), [])

    def test_a_killed_write_leaves_the_previous_file_intact(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "state.json")
        fake = MixpanelFake(state_file=path)
        fake.set_time(T0)
        fake.store.add_events([(TOKEN, _event("First")["properties"] and
                                {"event": "First", "properties": {"token": TOKEN, "time": T0}})], [])
        fake.save()
        before = pathlib.Path(path).read_bytes()
        fake.store.add_events([(TOKEN, {"event": "Second", "properties": {"token": TOKEN, "time": T0}})], [])
        original = os.fsync

        def crash(descriptor):
            raise OSError("killed mid-write")
        os.fsync = crash
        try:
            with self.assertRaises(OSError):
                fake.save()
        finally:
            os.fsync = original
        self.assertEqual(pathlib.Path(path).read_bytes(), before)
        self.assertEqual(os.listdir(directory), ["state.json"])
        with MixpanelFake(state_file=path) as again:
            self.assertEqual([e["event"] for e in again.events()], ["First"])
        fake.state_file = None
        fake.stop()

    def test_max_events_holds_memory_flat(self):
        import tracemalloc
        with MixpanelFake(max_events=500, journal_size=2) as fake:
            fake.set_time(T0)
            batch = json.dumps([_event("Loop", n=i, pad="x" * 200) for i in range(200)])
            conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
            self.addCleanup(conn.close)
            tracemalloc.start()
            self.addCleanup(tracemalloc.stop)

            def send(times):
                for _ in range(times):
                    conn.request("POST", "/track", body=batch)
                    conn.getresponse().read()
                return tracemalloc.get_traced_memory()[0]
            warm = send(20)
            later = send(60)
            self.assertLess(later, warm * 1.3 + 200_000)
            self.assertLessEqual(len(fake.events()), 500)
            self.assertEqual(fake.stats()["dropped_events"], 16000 - len(fake.events()))


def _post_to(fake, path, records):
    return _http("POST", path, json.dumps(records), {"Content-Type": "application/json"}, port=fake.port)


# =============================================================================
# Lifecycle and the Python API
# =============================================================================


class TestLifecycle(unittest.TestCase):

    def test_port_known_before_start_and_stop_idempotent(self):
        fake = MixpanelFake()
        self.assertGreater(fake.port, 0)
        self.assertEqual(fake.url, f"http://127.0.0.1:{fake.port}")
        fake.start()
        self.assertEqual(_http("GET", "/health", port=fake.port)[0], 200)
        with self.assertRaises(RuntimeError):
            fake.start()
        fake.stop()
        fake.stop()
        with self.assertRaises(OSError):
            _http("GET", "/health", port=fake.port, timeout=1)
        with self.assertRaises(RuntimeError):
            fake.start()

    def test_stop_closes_idle_keep_alive_connections_fast(self):
        fake = MixpanelFake().start()
        sock = socket.create_connection(("127.0.0.1", fake.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", sock.recv(4096))
        started = time.monotonic()
        fake.stop()
        # Closed by stop(), not by the 15 s idle timeout (speed itself is bench/'s).
        self.assertLess(time.monotonic() - started, mixpanel_fake._IDLE_TIMEOUT / 3)
        self.assertEqual(sock.recv(4096), b"")

    def test_bind_error_raises_in_the_caller(self):
        with MixpanelFake() as fake:
            with self.assertRaises(OSError):
                MixpanelFake(port=fake.port)

    def test_clock_callable_drives_time(self):
        now = [T0 + 100.0]
        with MixpanelFake(clock=lambda: now[0]) as fake:
            _http("POST", "/track", json.dumps(_event()), port=fake.port)
            now[0] += 10
            _http("POST", "/track", json.dumps(_event()), port=fake.port)
            fake.set_time(T0)
            _http("POST", "/track", json.dumps(_event()), port=fake.port)
            fake.set_time(None)
            _http("POST", "/track", json.dumps(_event()), port=fake.port)
            times = [e["properties"]["time"] for e in fake.events()]
        self.assertEqual(times, [T0 + 100, T0 + 110, T0, T0 + 110])

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            fake = MixpanelFake(host="::1")
        except OSError:
            self.skipTest("::1 not available")
        with fake:
            self.assertEqual(fake.url, f"http://[::1]:{fake.port}")
            conn = http.client.HTTPConnection("::1", fake.port, timeout=5)
            conn.request("GET", "/health")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()


class TestPythonApi(_ServerTestCase):

    def test_events_filters(self):
        _http("POST", "/track", json.dumps([
            _event("A", distinct_id="u1", plan="pro", **{"$browser": "Chrome"}),
            _event("B", distinct_id="u1"), _event("A", distinct_id="u2", plan="free"),
            _event("A", token="other", distinct_id="u1")]))
        self.assertEqual(len(MP.events()), 4)
        self.assertEqual(len(MP.events(name="A")), 3)
        self.assertEqual(len(MP.events(distinct_id="u1")), 3)
        self.assertEqual(len(MP.events(project="other")), 1)
        found = MP.events(properties={"$browser": "Chrome"})
        self.assertEqual([(e["event"], e["properties"]["distinct_id"]) for e in found], [("A", "u1")])
        self.assertEqual(MP.events(name="A", properties={"plan": "free"})[0]["properties"]["distinct_id"], "u2")

    def test_events_returns_copies(self):
        _http("POST", "/track", json.dumps(_event()))
        MP.events()[0]["properties"]["token"] = "mutated"
        self.assertEqual(MP.events()[0]["properties"]["token"], TOKEN)

    def test_urls(self):
        self.assertEqual(MP.urls, {"events_url": MP.url + "/track", "people_url": MP.url + "/engage",
                                   "groups_url": MP.url + "/groups", "import_url": MP.url + "/import"})

    def test_wait_for_events_returns_when_they_arrive(self):
        timer = threading.Timer(0.1, _http, ("POST", "/track", json.dumps([_event("late"), _event("late")])))
        timer.start()
        self.addCleanup(timer.cancel)
        found = MP.wait_for_events(2, timeout=5, name="late")
        self.assertEqual([e["event"] for e in found], ["late", "late"])

    def test_wait_for_events_timeout_says_what_arrived(self):
        _http("POST", "/track", json.dumps([_event("Signed Up", distinct_id="u9"), {"event": "Lost"}]))
        started = time.monotonic()
        with self.assertRaises(WaitTimeout) as caught:
            MP.wait_for_events(1, timeout=0.2, name="Signed In")
        self.assertLess(time.monotonic() - started, 2)
        self.assertIsInstance(caught.exception, AssertionError)
        message = str(caught.exception)
        self.assertIn("waited 0.2s for 1 event(s) matching {'name': 'Signed In'}; 0 matched, 1 arrived in all",
                      message)
        self.assertIn("arrived: 'Signed Up' distinct_id='u9'", message)
        self.assertIn("rejected on /track (index 1): token, missing or empty", message)

    def test_check_reraises_server_errors(self):
        MP.store.record_error(ValueError("boom"))
        with self.assertRaises(ValueError):
            MP.check()
        MP.check()  # cleared


class TestCli(unittest.TestCase):

    def run_cli(self, *args, env=None):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, **(env or {})))
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, 5)
        self.addCleanup(proc.kill)
        line = proc.stdout.readline()
        return proc, line

    def test_port_zero_prints_the_real_url_and_serves(self):
        proc, line = self.run_cli("--port", "0")
        self.assertRegex(line, r"^mixpanel_fake listening on http://127\.0\.0\.1:\d+\n$")
        port = int(line.rsplit(":", 1)[1])
        self.assertEqual(_http("GET", "/health", port=port)[::2], (200, b'{"status":"ok"}'))

    def test_env_token_and_secret_precreate_a_project(self):
        proc, line = self.run_cli("--port", "0", env={"MIXPANEL_TOKEN": "envtok",
                                                      "MIXPANEL_API_SECRET": "envsecret"})
        port = int(line.rsplit(":", 1)[1])
        status, _, body = _http("GET", "/__parlel/projects", port=port)
        projects = json.loads(body)["projects"]
        self.assertEqual([p["token"] for p in projects], ["envtok"])
        self.assertNotIn(b"envsecret", body)
        # The secret authenticates an import into that project.
        _http("POST", "/import", json.dumps({"event": "e", "properties": {
            "time": 1_700_000_000, "distinct_id": "d", "$insert_id": "env-1"}}), _basic("envsecret"), port=port)
        _, _, body = _http("GET", "/__parlel/events?project=envtok", port=port)
        self.assertEqual(json.loads(body)["count"], 1)

    def test_toolkit_options(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        state = os.path.join(directory, "state.json")
        fault = json.dumps({"path": "/engage", "status": 502, "times": 1})
        proc, line = self.run_cli("--port", "0", "--token", "cli_tok", "--strict-auth", "--log-events",
                                  "--state-file", state, "--max-events", "100", "--fault", fault,
                                  "--rate-limit", "queries_per_hour=50")
        port = int(line.rsplit(":", 1)[1])
        self.assertEqual(_http("POST", "/track", json.dumps(_event("Logged", token="cli_tok")), port=port)[2], b"1")
        self.assertEqual(_http("POST", "/track", json.dumps(_event("Other", token="nope")), port=port)[2], b"1")
        logged = [json.loads(proc.stdout.readline()) for _ in range(2)]
        self.assertEqual([(row["accepted"], row.get("event")) for row in logged],
                         [(True, "Logged"), (False, None)])
        self.assertEqual(_http("POST", "/engage", json.dumps({"$token": "cli_tok", "$distinct_id": "u",
                                                              "$set": {"a": 1}}), port=port)[0], 502)
        self.assertEqual(_http("GET", "/__parlel/events", port=port)[0], 401)  # strict
        status, _, body = _http("GET", "/__parlel/stats", headers=_basic("cli_tok"), port=port)
        self.assertEqual((json.loads(body)["max_events"], json.loads(body)["strict_auth"]), (100, True))
        proc.terminate()
        proc.wait(10)
        saved = json.loads(pathlib.Path(state).read_text())
        self.assertEqual([e["event"] for e in saved["states"]["cli_tok"]["events"]], ["Logged"])

    def test_bad_arguments(self):
        result = subprocess.run([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--api-secret", "s"],
                                capture_output=True, text=True, timeout=30,
                                env={k: v for k, v in os.environ.items() if k != "MIXPANEL_TOKEN"})
        self.assertEqual(result.returncode, 2)
        self.assertIn("--api-secret needs --token", result.stderr)

    def test_main_returns_1_when_the_port_is_taken(self):
        with MixpanelFake() as fake:
            self.assertEqual(mixpanel_fake.main(["--port", str(fake.port)]), 1)


class TestPublicApi(unittest.TestCase):

    def test_all(self):
        public = {name for name, value in vars(mixpanel_fake).items()
                  if not name.startswith("_") and getattr(value, "__module__", None) == "mixpanel_fake"}
        public.add("DEFAULT_PORT")
        self.assertEqual(sorted(mixpanel_fake.__all__), sorted(public))


# =============================================================================
# Hardening (issue #8): limits, load, shutdown, access
# =============================================================================


def _gzip_of_zeros(size_mb):
    """A valid gzip member of `size_mb` MB of zeros, about 1 KB per MB, built
    from one compressed MB: after a full flush each MB compresses to the same
    bytes, so the stream is that block repeated (cheap for any size)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH) == block
    crc = 0
    for _ in range(size_mb):
        crc = zlib.crc32(zeros, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + first + block * (size_mb - 1)
            + deflate.flush() + struct.pack("<II", crc, (size_mb << 20) & 0xFFFFFFFF))


def _read_until_closed(sock, timeout=10):
    """Everything the server sends until it closes: (bytes, seconds taken)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def _wait_until(condition, timeout=10):
    """Poll for a condition another thread makes true (ordering, not timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in %s s" % timeout)
        time.sleep(0.01)


def _split_answer(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return lines[0], headers, body


class TestLimits(_ServerTestCase):
    """Each resource limit answers in JSON with the status HTTP prescribes.

    Already tested elsewhere, not repeated here: the 413 for a Content-Length
    over 10 MB without reading it, a 10 MB gzip bomb, and more than 64 gzip
    members (TestTransport, TestOddInputs); a 1.5 MB request line accepted
    and one over 4 MB answered 414 (TestTransport); 2000 records (TestValidation);
    the body stalled mid-way (408, TestOddInputs); the journal's and
    max_events' bounds (TestJournal, TestState); expression caps in the parser
    (TestExpressions)."""

    def test_gzip_bomb_of_1_gb_is_413_without_inflating_it(self):
        bomb = _gzip_of_zeros(1024)
        self.assertLess(len(bomb), 1_100_000)
        self.assertEqual(zlib.decompressobj(31).decompress(bomb, 100), bytes(100))  # it is gzip
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        status, headers, body = _http("POST", "/import", bomb, {"Content-Encoding": "gzip",
                                                                 "Content-Type": "application/json"})
        peak = tracemalloc.get_traced_memory()[1]
        self.assertEqual((status, json.loads(body)), (413, {
            "code": 413, "error": "request exceeds max limit of 10485760 bytes",
            "status": "Request Entity Too Large"}))
        # The compressed body (1 MB) and at most the cap's 10 MB of output in
        # the server thread; inflating the gigabyte would show as ~1 GB here.
        self.assertLess(peak, 3 * mixpanel_fake._MAX_BODY_BYTES)
        self.assertEqual(MP.events(), [])

    def test_header_caps_are_431_json_and_the_connection_closes(self):
        cases = {"more than 100 header lines": b"".join(b"X-H%d: v\r\n" % i for i in range(101)),
                 "a header line exceeds 65536 bytes": b"X-Long: " + b"a" * 65536 + b"\r\n"}
        for message, headers in cases.items():
            with self.subTest(message):
                sock = socket.create_connection(("127.0.0.1", MP.port), timeout=10)
                self.addCleanup(sock.close)
                sock.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\n" + headers
                             + b"Content-Length: 2\r\n\r\n[]")
                raw, _ = _read_until_closed(sock)  # the server closes it
                status, head, body = _split_answer(raw)
                self.assertEqual(status, "HTTP/1.1 431 Request Header Fields Too Large")
                self.assertEqual((head["content-type"], head["connection"]), ("application/json", "close"))
                self.assertEqual(json.loads(body), {"code": 431, "error": message,
                                                    "status": "Request Header Fields Too Large"})
        self.assertEqual(_http("GET", "/health")[0], 200)
        MP.check()

    def test_where_length_and_depth_caps_are_400_query_errors(self):
        _post("/track", [_event("e")])
        cases = {'properties["a"] == 1 or ' * 1000 + "true":
                 "invalid where: expression longer than 20000 characters (at column 1)",
                 "(" * 65 + "true" + ")" * 65: "invalid where: expression nested more than 64 deep (at column 65)"}
        for where, message in cases.items():
            with self.subTest(message):
                query = urllib.parse.urlencode({"event": '["e"]', "from_date": "2026-11-14",
                                                "to_date": "2026-11-14", "where": where})
                status, _, body = _http("GET", "/api/2.0/segmentation?" + query, headers=_basic(TOKEN))
                self.assertEqual((status, json.loads(body)), (400, {
                    "request": "/api/2.0/segmentation?" + query, "error": message}))

    def test_idle_and_slow_clients_are_cut_off_while_others_are_served(self):
        idle = 0.5
        with MixpanelFake(idle_timeout=idle) as fake:
            # Connected, never sends a byte: closed after the idle timeout, no answer.
            silent = socket.create_connection(("127.0.0.1", fake.port))
            self.addCleanup(silent.close)
            # Slowloris: a byte of the head every 0.1 s, each well within the
            # idle timeout; the head's deadline still ends it.
            slow = socket.create_connection(("127.0.0.1", fake.port))
            self.addCleanup(slow.close)
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
            sent = 0
            served = 0
            started = time.monotonic()
            while sent < len(head) and not select.select([slow], [], [], 0.1)[0]:
                slow.sendall(head[sent:sent + 1])
                sent += 1
                if sent % 5 == 0:  # meanwhile, another client is served at once
                    self.assertEqual(_http("GET", "/health", port=fake.port)[::2], (200, b'{"status":"ok"}'))
                    served += 1
            raw, _ = _read_until_closed(slow)
            took = time.monotonic() - started
            status, headers, body = _split_answer(raw)
            self.assertEqual(status, "HTTP/1.1 408 Request Timeout")
            self.assertEqual(headers["connection"], "close")
            self.assertEqual(json.loads(body), {"code": 408, "status": "Request Timeout",
                                                "error": "the client did not send its request head in time"})
            self.assertLess(sent, len(head))  # cut off before the head was done
            self.assertGreaterEqual(took, idle)
            self.assertLess(took, idle + 2)  # generous; one byte per 0.1 s would take 22 s
            self.assertGreater(served, 0)
            self.assertEqual(_read_until_closed(silent)[0], b"")
            _wait_until(lambda: fake._server.connections == 0)

    def test_connections_past_the_cap_get_an_immediate_503(self):
        with MixpanelFake(max_connections=2) as fake:
            held = []
            for _ in range(2):
                conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
                self.addCleanup(conn.close)
                conn.request("GET", "/health")
                self.assertEqual(conn.getresponse().read(), b'{"status":"ok"}')  # kept alive
                held.append(conn)
            threads = threading.active_count()
            refused = socket.create_connection(("127.0.0.1", fake.port))
            self.addCleanup(refused.close)
            raw, _ = _read_until_closed(refused)  # without sending anything
            status, headers, body = _split_answer(raw)
            self.assertEqual(status, "HTTP/1.1 503 Service Unavailable")
            self.assertEqual((headers["connection"], headers["retry-after"], headers["content-type"],
                              headers["content-length"]), ("close", "1", "application/json", str(len(body))))
            expected = {"code": 503, "error": "too many connections: mixpanel_fake serves at most 2 at once",
                        "status": "Service Unavailable"}
            self.assertEqual(json.loads(body), expected)
            self.assertEqual(threading.active_count(), threads)  # no handler thread for it
            # A client that sends its request at once reads the 503 too.
            self.assertEqual(_http("POST", "/track", json.dumps(_event()), port=fake.port)[::2],
                             (503, mixpanel_fake._dumps(expected)))
            self.assertEqual((fake._server.refused, fake.events()), (2, []))
            held.pop().close()
            _wait_until(lambda: fake._server.connections == 1)
            self.assertEqual(_http("GET", "/health", port=fake.port)[0], 200)
            held[0].request("GET", "/health")
            self.assertEqual(held[0].getresponse().status, 200)

    def test_new_limits_are_checked(self):
        for bad in ({"idle_timeout": 0}, {"idle_timeout": float("inf")}, {"idle_timeout": "5"},
                    {"max_connections": 0}, {"max_connections": 2.5}, {"max_connections": True},
                    {"save_interval": 1}, {"save_interval": 0, "state_file": os.path.join(HERE, "unused.json")}):
            with self.subTest(bad), self.assertRaises(ValueError):
                MixpanelFake(**bad)
        result = subprocess.run([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--port", "0",
                                 "--save-interval", "1"], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--save-interval needs --state-file", result.stderr)
        result = subprocess.run([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--port", "0",
                                 "--max-connections", "0"], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--max-connections must be a whole number, 1 or more", result.stderr)


LOAD_REQUESTS = int(os.environ.get("MIXPANEL_FAKE_LOAD_REQUESTS") or 1000)


class TestLoad(unittest.TestCase):
    """32 keep-alive clients, mixed requests, one fake: nothing lost or doubled."""

    THREADS = 32
    DATA = ("load0", "load1", "load2", "load3")      # where the counted records go
    OTHERS = ("other0", "other1", "other2", "other3")  # written to, and reset, meanwhile
    DAY = "2026-11-14"

    def run_client(self, fake, t, requests, book):
        """`requests` requests from client `t`; each answer is checked at once."""
        token = self.DATA[t % 4]
        other = self.OTHERS[t % 4]
        auth = _basic(token)
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=120)
        sent = {"events": [], "profiles": 0, "groups": 0, "adds": 0, "load": 0, "last": None}
        errors = []

        def call(method, path, body=None, headers=None, expect=200, check=None):
            if isinstance(body, str):
                body = body.encode("utf-8")
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                ok = resp.status == expect and (check is None or check(raw))
            except ValueError:
                ok = False
            if not ok:
                errors.append((method, path[:60], resp.status, raw[:200]))

        for i in range(requests):
            kind = i % 20
            marker = f"{t}-{i}"
            if kind <= 5 or kind == 19:
                call("POST", "/track", json.dumps(_event("Load", token, m=marker, t=t, distinct_id=f"d{t}")),
                     check=lambda raw: raw == b"1")
                sent["events"].append(marker)
                sent["load"] += 1
                sent["last"] = marker
            elif kind == 6:
                batch = [_event("Load", token, m=f"{marker}{c}", t=t, distinct_id=f"d{t}") for c in "abc"]
                call("POST", "/track", _form(data=_b64(batch)),
                     {"Content-Type": "application/x-www-form-urlencoded"}, check=lambda raw: raw == b"1")
                sent["events"] += [f"{marker}{c}" for c in "abc"]
                sent["load"] += 3
            elif kind in (7, 8):
                rows = [_event("Imported", token, m=f"{marker}{c}", t=t, time=T0 - 60, distinct_id=f"d{t}",
                               **{"$insert_id": f"i-{marker}-{c}"}) for c in "xy"]
                call("POST", "/import", json.dumps(rows), {"Content-Type": "application/json"},
                     check=lambda raw: json.loads(raw) == {"code": 200, "num_records_imported": 2,
                                                           "status": "OK"})
                sent["events"] += [f"{marker}x", f"{marker}y"]
            elif kind in (9, 10):
                call("POST", "/engage", json.dumps([
                    {"$token": token, "$distinct_id": f"p-{marker}", "$set": {"t": t, "m": marker}},
                    {"$token": token, "$distinct_id": "shared", "$add": {"n": 1}}]), check=lambda raw: raw == b"1")
                sent["profiles"] += 1
                sent["adds"] += 1
            elif kind in (11, 12):
                call("POST", "/groups", json.dumps({"$token": token, "$group_key": "company",
                                                    "$group_id": f"g-{marker}", "$set": {"t": t}}),
                     check=lambda raw: raw == b"1")
                sent["groups"] += 1
            elif kind == 13:  # read what this client wrote: exactly one line
                last = sent["last"]
                query = urllib.parse.urlencode({"from_date": self.DAY, "to_date": self.DAY,
                                                "where": f'properties["m"] == "{last}"'})
                call("GET", "/api/2.0/export?" + query, headers=auth, check=lambda raw: [
                    json.loads(line)["properties"]["m"] for line in raw.splitlines()] == [last])
            elif kind == 14:
                count = sent["load"]
                query = urllib.parse.urlencode({"event": "Load", "from_date": self.DAY, "to_date": self.DAY,
                                                "where": f'properties["t"] == {t}'})
                call("GET", "/api/2.0/segmentation?" + query, headers=auth, check=lambda raw: json.loads(
                    raw)["data"]["values"] == {"Load": {self.DAY: count}})
            elif kind == 15:
                count = sent["profiles"]
                call("POST", "/api/2.0/engage", _form(where=f'properties["t"] == {t}'),
                     dict(auth, **{"Content-Type": "application/x-www-form-urlencoded"}),
                     check=lambda raw: json.loads(raw)["total"] == count)
            elif kind in (16, 17):  # another project gets data...
                call("POST", "/track", json.dumps(_event("Other", other, m=marker)), check=lambda raw: raw == b"1")
            else:  # ...and is reset, while this one's stays
                call("POST", "/__parlel/reset?project=" + other, check=lambda raw: json.loads(raw) == {"ok": True})
        conn.close()
        book[t] = (sent, errors)

    def run_load(self, fake, threads, requests):
        book = {}
        clients = [threading.Thread(target=self.run_client, args=(fake, t, requests, book))
                   for t in range(threads)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        return book

    def settled_blocks(self, fake):
        """After a reset: old state freed, the (bounded) expression cache emptied."""
        fake.reset(empty=True)
        mixpanel_fake._settle()
        mixpanel_fake._compile_expression.cache_clear()
        gc.collect()
        return sys.getallocatedblocks()

    def test_32_clients_mixed_requests_nothing_lost(self):
        threads, requests = self.THREADS, LOAD_REQUESTS
        fake = MixpanelFake(journal_size=32)
        fake.start()
        self.addCleanup(fake.stop)
        fake.set_time(T0)
        self.run_load(fake, 4, 100)  # warm-up: code paths, caches, a full journal
        blocks = self.settled_blocks(fake)

        started = time.monotonic()
        book = self.run_load(fake, threads, requests)
        took = time.monotonic() - started

        errors = [error for _, (_, errs) in sorted(book.items()) for error in errs]
        self.assertLess(took, 300)  # generous: about 40 s on a 2-core machine
        self.assertEqual(errors[:10], [])
        lost = doubled = 0
        for p, token in enumerate(self.DATA):
            mine = [sent for t, (sent, _) in book.items() if t % 4 == p]
            expected = collections.Counter(m for sent in mine for m in sent["events"])
            stored = collections.Counter(e["properties"]["m"] for e in fake.events(project=token))
            lost += sum((expected - stored).values())
            doubled += sum((stored - expected).values())
            self.assertEqual(stored, expected, token)
            self.assertEqual(sum(stored.values()), sum(len(sent["events"]) for sent in mine))
            profiles = fake.profiles(project=token)
            self.assertEqual(len(profiles), sum(sent["profiles"] for sent in mine) + 1)
            self.assertEqual(profiles["shared"]["n"], sum(sent["adds"] for sent in mine))
            self.assertEqual(len(fake.groups(project=token)), sum(sent["groups"] for sent in mine))
        self.assertEqual(fake.stats()["events"], sum(len(fake.events(project=p)) for p in self.DATA)
                         + sum(len(fake.events(project=p)) for p in self.OTHERS))
        del book, expected, stored, profiles, mine
        fake.check()
        # Python objects alive after reset, against before the load (cheap,
        # so it covers the whole load; a leak of one object a request shows).
        block_growth = self.settled_blocks(fake) - blocks

        # Bytes, with tracemalloc: tracing triples the cost of every request,
        # so it watches a further round of 32 x 100 rather than the big one.
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.settled_blocks(fake)
        baseline = tracemalloc.get_traced_memory()[0]
        self.run_load(fake, threads, 100)
        self.settled_blocks(fake)
        growth = tracemalloc.get_traced_memory()[0] - baseline
        tracemalloc.stop()
        total = threads * requests
        print(f"load: {threads} threads x {requests} requests = {total} in {took:.1f} s "
              f"({total / took:.0f} req/s): {len(errors)} errors, {lost} records lost, {doubled} duplicated; "
              f"tracemalloc after reset {growth / 1024:+.0f} KB of baseline "
              f"(32 x 100 traced); {block_growth:+d} allocated blocks after the big round",
              file=sys.stderr, flush=True)
        # Slack: the 32-entry journal now holds entries made in the round
        # (those they replaced are older than the baseline), and allocator noise.
        self.assertLess(growth, 512 * 1024)  # the journal: about 32 x 5 KB
        self.assertLess(block_growth, 5_000)


def _new_threads(before):
    """Threads alive now that were not before, but the process-wide reaper."""
    return [t for t in threading.enumerate() if t not in before and t.name != "mixpanel-fake:free"]


class TestShutdown(unittest.TestCase):
    """stop() and kills: prompt, nothing left running, nothing half-stored."""

    def test_stop_with_requests_in_flight_is_prompt_and_leaves_no_thread(self):
        before = set(threading.enumerate())
        fake = MixpanelFake().start()
        fake.set_time(T0)
        port = fake.port
        # A slow upload, mid-body.
        upload = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(upload.close)
        body = _form(data=json.dumps(_event("Half")))
        upload.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body[:10].encode()))
        # A half-sent head.
        head = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(head.close)
        head.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Le")
        # A request held by a delay fault.
        fake.add_fault("/engage", status=None, delay=60)
        held = []

        def delayed():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}}))
                held.append(conn.getresponse().status)
            except (OSError, http.client.HTTPException) as exc:
                held.append(type(exc).__name__)
            finally:
                conn.close()
        client = threading.Thread(target=delayed)
        client.start()
        _wait_until(lambda: fake.faults() == [])  # taken: the request is in its delay
        # Idle keep-alive connections.
        idle = []
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            self.addCleanup(conn.close)
            conn.request("GET", "/health")
            self.assertEqual(conn.getresponse().read(), b'{"status":"ok"}')
            idle.append(conn)
        _wait_until(lambda: fake._server.connections == 6)

        started = time.monotonic()
        fake.stop()
        took = time.monotonic() - started
        client.join(10)
        left = _new_threads(before)
        print(f"shutdown: stop() with a slow upload, a half-sent head, a delayed request and 3 idle "
              f"keep-alives in flight returned in {took * 1000:.0f} ms; {len(left)} threads left",
              file=sys.stderr, flush=True)
        self.assertLess(took, 2.0)
        self.assertEqual(left, [])
        for sock in (upload, head):
            self.assertEqual(_read_until_closed(sock)[0], b"")  # closed, nothing half-answered
        self.assertEqual(held, ["RemoteDisconnected"])
        self.assertEqual((fake.events(), fake.profiles()), ([], {}))  # nothing half-stored
        with self.assertRaises(OSError):
            _http("GET", "/health", port=port, timeout=1)

    def test_sigkill_mid_traffic_leaves_the_last_saved_state_loadable(self):
        rng = random.Random(8)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "state.json")
        kept = []   # the events the state file holds: markers 0..n-1 in order
        sent = 0    # events sent so far (the highest marker + 1)
        lost = 0    # sent after a round's last save, so killed with it

        def saved():
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except FileNotFoundError:
                return None
            return [e["properties"]["m"] for e in data["states"]["kt"]["events"]]

        rounds = 4
        for round_ in range(rounds + 1):
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--port", "0",
                                     "--token", "kt", "--state-file", path, "--save-interval", "0.05"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.addCleanup(proc.stderr.close)
            self.addCleanup(proc.stdout.close)
            self.addCleanup(proc.kill)
            port = int(proc.stdout.readline().rsplit(":", 1)[1])
            # The restart serves what the file held, and cleared a killed save's leftovers.
            status, _, body = _http("GET", "/__parlel/events?project=kt", port=port)
            self.assertEqual([e["properties"]["m"] for e in json.loads(body)["events"]], kept)
            self.assertEqual(sorted(os.listdir(directory)), ["state.json"] if kept else [])
            if round_ == rounds:
                proc.terminate()
                proc.wait(10)
                break
            stop = threading.Event()
            first = sent
            counter = [sent]

            def traffic():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    while not stop.is_set():
                        m = counter[0]
                        counter[0] += 1  # counted before it is sent: it may land unanswered
                        conn.request("POST", "/track", json.dumps(_event("K", "kt", m=m)))
                        conn.getresponse().read()
                except (OSError, http.client.HTTPException):
                    pass  # killed
                finally:
                    conn.close()
            client = threading.Thread(target=traffic)
            client.start()
            _wait_until(lambda: len(saved() or ()) > len(kept))  # a save during this round
            time.sleep(rng.uniform(0.0, 0.3))  # then a kill at a random moment, traffic flowing
            proc.kill()
            proc.wait(10)
            stop.set()
            client.join(10)
            sent = counter[0]
            mixpanel_fake._read_state(path)  # parses and checks as a load does
            now = saved()
            # What the file had, then a prefix of this round's events: no gap,
            # no copy; what came after the last save died with the process.
            self.assertEqual(now[:len(kept)], kept)
            self.assertEqual(now[len(kept):], list(range(first, first + len(now) - len(kept))))
            self.assertGreater(len(now), len(kept))
            self.assertLessEqual(now[-1], sent - 1)
            lost += sent - now[-1] - 1
            kept = now
        with MixpanelFake(state_file=path) as fake:  # and the Python API loads it too
            self.assertEqual([e["properties"]["m"] for e in fake.events(project="kt")], kept)
        print(f"state file: {rounds} SIGKILLs mid-traffic (seed 8, autosave every 0.05 s): the file loaded "
              f"after each and the restart served it; {len(kept)} of {sent} events kept, in order, "
              f"0 duplicated; {lost} sent after a round's last save died with it",
              file=sys.stderr, flush=True)


class TestAccess(unittest.TestCase):
    """Who can reach the fake, read it and write it; credentials never shown."""

    SECRETS = ("sekrit-api", "sekrit-sa", "sekrit-query", "sekrit-form")

    def test_binds_loopback_unless_told_and_warns_when_wider(self):
        with MixpanelFake() as fake:
            self.assertEqual(fake._server.server_address[0], "127.0.0.1")
        with self.assertLogs("mixpanel_fake", "WARNING") as logs:
            fake = MixpanelFake(host="0.0.0.0")
        with fake:
            self.assertEqual(_http("GET", "/health", port=fake.port)[0], 200)  # traffic to loopback only
        self.assertEqual([r.getMessage() for r in logs.records],
                         ["mixpanel_fake bound to '0.0.0.0': reachable beyond this machine"])
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--host", "0.0.0.0",
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.kill)
        line = proc.stdout.readline()
        self.assertRegex(line, r"^mixpanel_fake listening on http://127\.0\.0\.1:\d+\n$")  # a usable URL
        self.assertEqual(proc.stderr.readline(), "mixpanel_fake: warning: bound to 0.0.0.0, reachable beyond "
                                                 "this machine; it accepts any credentials\n")
        self.assertEqual(_http("GET", "/health", port=int(line.rsplit(":", 1)[1]))[0], 200)

    def test_strict_auth_wrong_or_missing_credentials_read_and_write_nothing(self):
        fake = MixpanelFake(strict_auth=True, projects=[
            Project("tokA", project_id=1, api_secret="secA"),
            Project("tokB", project_id=2, api_secret="secB", service_accounts={"sa.b": "pw"})]).start()
        self.addCleanup(fake.stop)
        fake.set_time(T0)
        _post_to(fake, "/track", [_event("A only", "tokA", distinct_id="a")])
        _http("POST", "/engage", json.dumps({"$token": "tokA", "$distinct_id": "a", "$set": {"x": 1}}), port=fake.port)
        fake.add_funnel("f", ["A only", "A only"], project="tokA")
        fake.add_flag("flag-a", project="tokA")

        def state():
            snap = fake.snapshot()
            for data in snap["states"].values():
                data.pop("rejected")  # refusals are listed, by design
            return snap, fake.faults()
        before = state()
        day = {"from_date": "2026-11-14", "to_date": "2026-11-14"}
        reads = [("GET", "/api/2.0/export?" + _form(**day)), ("GET", "/api/2.0/segmentation?" + _form(event="A only", **day)),
                 ("POST", "/api/2.0/engage"), ("GET", "/api/2.0/events/names?type=general"),
                 ("GET", "/api/2.0/funnels/list")]
        reads += [("GET", "/__parlel/" + name) for name in (
            "events", "people", "groups", "rejected", "projects", "requests", "faults", "stats", "snapshot",
            "flags", "recordings", "funnels", "cohorts", "insights", "assert?name=A%20only", "wait?timeout=0")]
        writes = [("POST", "/import", json.dumps([_full("Forged", "tokA")])),
                  ("POST", "/__parlel/reset", None), ("DELETE", "/__parlel/events", None),
                  ("POST", "/__parlel/snapshot", json.dumps({"format": "mixpanel_fake/1", "projects": [], "states": {}})),
                  ("POST", "/__parlel/faults", json.dumps({"path": "/track"})), ("DELETE", "/__parlel/faults", None),
                  ("POST", "/__parlel/tracking-plan", json.dumps({"project": "tokA", "plan": None})),
                  ("POST", "/__parlel/flags", json.dumps({"project": "tokA", "flags": []})),
                  ("POST", "/__parlel/sdk-config", json.dumps({"project": "tokA", "config": {"x": 1}})),
                  ("POST", "/__parlel/save", None),
                  ("POST", "/__parlel/funnels", json.dumps({"name": "g", "steps": ["a", "b"], "project": "tokA"})),
                  ("POST", "/__parlel/cohorts", json.dumps({"name": "c", "distinct_ids": ["a"], "project": "tokA"})),
                  ("POST", "/__parlel/insights", json.dumps({"name": "i", "event": "A only", "project": "tokA"}))]
        wrong = {"none": {}, "unknown secret": _basic("secX"), "token (public)": _basic("tokA"),
                 "service account, wrong password": _basic("sa.b", "nope"),
                 "another project's password form": _basic("secA", "x")}
        for label, headers in wrong.items():
            for method, path, *body in reads + writes:
                if label.startswith("token") and not path.startswith("/__parlel/"):
                    continue  # on ingestion and queries a token is a credential (README "Strict auth")
                if "service account" in label:
                    path += ("&" if "?" in path else "?") + "project_id=2"
                with self.subTest(label=label, request=f"{method} {path}"):
                    status, _, answer = _http(method, path, body[0] if body else None, headers, port=fake.port)
                    self.assertEqual(status, 401, answer[:200])
                    self.assertNotIn(b"A only", answer)
                    self.assertNotIn(b"secA", answer)
        # Records with tokens of no configured project: answered 1, stored nowhere.
        for path, record in (("/track", _event("Forged", "nope")),
                             ("/engage", {"$token": "nope", "$distinct_id": "z", "$set": {"x": 1}}),
                             ("/groups", {"$token": "nope", "$group_key": "k", "$group_id": "g", "$set": {"x": 1}})):
            for headers in wrong.values():
                self.assertEqual(_http("POST", path, json.dumps(record), headers, port=fake.port)[::2], (200, b"1"))
        self.assertEqual(state(), before)
        self.assertEqual([p.token for p in fake.store.projects.values()], ["tokA", "tokB"])

    def test_credentials_never_reach_the_journal_logs_or_pages(self):
        fake = MixpanelFake(projects=[Project("tokS", project_id=7, api_secret="sekrit-api",
                                              service_accounts={"sa.user": "sekrit-sa"})]).start()
        self.addCleanup(fake.stop)
        fake.set_time(T0)
        answers = []
        with self.assertLogs("mixpanel_fake", "DEBUG") as logs:
            for method, path, body, headers in (
                    ("POST", "/import?api_secret=sekrit-query", json.dumps([_full(token="tokS")]), _basic("sekrit-api")),
                    ("POST", "/import?project_id=7", _form(data=json.dumps([_full(token="tokS")]), api_secret="sekrit-form"),
                     _basic("sa.user", "sekrit-sa")),
                    ("GET", "/api/2.0/segmentation?api_secret=sekrit-query&event=E&from_date=2026-11-14"
                            "&to_date=2026-11-14&where=%28", None, _basic("sekrit-api")),  # an error echoes the request
                    ("GET", "/api/2.0/export?from_date=2026-11-14&to_date=2026-11-14&project_id=7", None,
                     _basic("sa.user", "sekrit-sa")),
                    ("GET", "/api/2.0/export?from_date=2026-11-14", None, _basic("sa.user", "sekrit-sa")),
                    ("POST", "/__parlel/faults?password=sekrit-query", json.dumps({"path": "/x"}), _basic("sekrit-api"))):
                status, _, answer = _http(method, path, body, headers, port=fake.port)
                answers.append(answer)
            self.assertEqual(json.loads(answers[2])["request"], "/api/2.0/segmentation?api_secret=<redacted>&"
                                                                "event=E&from_date=2026-11-14&to_date=2026-11-14&where=%28")
            self.assertEqual(len(fake.events()), 2)
            for path in ("/", "/__parlel/ui", "/__parlel/requests", "/__parlel/projects", "/__parlel/snapshot",
                         "/__parlel/events", "/__parlel/faults"):
                answers.append(_http("GET", path, port=fake.port)[2])
        shown = b"\n".join(answers).decode("utf-8") + json.dumps(fake.requests()) + "\n".join(
            record.getMessage() for record in logs.records)
        self.assertIn("POST /import -> 200", shown)  # the DEBUG log was on
        for secret in self.SECRETS + (base64.b64encode(b"sekrit-api:").decode(),
                                      base64.b64encode(b"sa.user:sekrit-sa").decode()):
            self.assertNotIn(secret, shown)

    def test_cli_logs_and_event_lines_hold_no_credentials(self):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--port", "0", "--verbose",
                                 "--log-events", "--token", "tokS", "--api-secret", "sekrit-api"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        self.assertEqual(_http("POST", "/import?api_secret=sekrit-query&verbose=1",
                               _form(data=json.dumps([_full(token="tokS")]), api_secret="sekrit-form"),
                               _basic("sekrit-api"), port=port)[0], 200)
        _http("GET", "/api/2.0/export?from_date=2026-11-14&api_secret=sekrit-query", headers=_basic("sekrit-api"),
              port=port)
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        self.assertEqual(json.loads(out.splitlines()[0])["accepted"], True)  # --log-events printed it
        self.assertIn("POST /import -> 200", err)  # --verbose logged it
        for secret in self.SECRETS + (base64.b64encode(b"sekrit-api:").decode(),):
            self.assertNotIn(secret, out + err)

    def test_the_page_shows_hostile_data_only_as_text(self):
        # In Chromium, TestInspectionPage proves the rows render as text and
        # nothing runs; here, what is served (without a browser).
        with MixpanelFake() as fake:
            fake.set_time(T0)
            attack = '"><img src=x onerror=alert(1)>'
            _post_to(fake, "/track", [_event("<script>alert(1)</script>", distinct_id=attack, **{attack: attack})])
            _http("POST", "/engage", json.dumps({"$token": TOKEN, "$distinct_id": attack, "$set": {attack: attack}}),
                  port=fake.port)
            status, headers, page = _http("GET", "/__parlel/ui", port=fake.port)
            self.assertEqual((status, headers["content-type"], headers["x-content-type-options"]),
                             (200, "text/html; charset=utf-8", "nosniff"))
            self.assertIn("default-src 'none'", headers["content-security-policy"])
            text = page.decode("utf-8")
            for bad in ("alert(", "onerror", "<img", "innerHTML", "outerHTML", "insertAdjacentHTML",
                        "document.write", "eval(", "new Function", "srcdoc"):
                self.assertNotIn(bad, text)
            self.assertIn("td.textContent = cells[index]", text)  # rows reach the DOM as text
            for path in ("/", "/__parlel/events", "/__parlel/people"):
                status, headers, body = _http("GET", path, port=fake.port)
                self.assertEqual((status, headers["content-type"]), (200, "application/json"))
            self.assertNotIn(b"onerror", _http("GET", "/", port=fake.port)[2])


# =============================================================================
# The real SDKs, pinned (conformance/), over real sockets
# =============================================================================


class TestPythonSdk(_ServerTestCase):
    """mixpanel==5.4.1, pointed at the fake with ``Consumer(**mp.urls)``."""

    def setUp(self):
        _require(mixpanel is not None, "the Python mixpanel SDK is not installed "
                                       "(pip install -r conformance/requirements.txt)", self)
        super().setUp()
        MP.set_time(None)  # the SDK stamps real times; /track keeps them
        self.client = mixpanel.Mixpanel(TOKEN, consumer=mixpanel.Consumer(retry_limit=0, **MP.urls))

    def assertRecent(self, ts):
        self.assertIsInstance(ts, float)
        self.assertLess(abs(ts - time.time()), 60)

    def test_track(self):
        self.client.track("u1", "Signed Up", {"plan": "pro", "seats": 3, "tags": ["a", "b"], "ok": True})
        (event,) = MP.events()
        props = event["properties"]
        self.assertEqual(event["event"], "Signed Up")
        self.assertRegex(props.pop("$insert_id"), r"^[0-9a-f]{32}$")
        self.assertRecent(props.pop("time"))
        self.assertRecent(props.pop("$mp_api_timestamp_ms") / 1000)
        props.pop("mp_processing_time_ms")
        self.assertEqual(props, {"token": TOKEN, "distinct_id": "u1", "mp_lib": "python",
                                 "$lib_version": "5.4.1", "plan": "pro", "seats": 3,
                                 "tags": ["a", "b"], "ok": True, "$mp_api_endpoint": "127.0.0.1"})

    def test_buffered_consumer_batches(self):
        consumer = mixpanel.BufferedConsumer(max_size=50, retry_limit=0, **MP.urls)
        client = mixpanel.Mixpanel(TOKEN, consumer=consumer)
        for i in range(3):
            client.track(f"u{i}", "Batched", {"i": i, "s": "~~~>>>???"})
        client.people_set("u0", {"a": 1})
        self.assertEqual(MP.events(), [])
        consumer.flush()
        self.assertEqual([e["properties"]["i"] for e in MP.events(name="Batched")], [0, 1, 2])
        self.assertEqual(MP.profile("u0")["a"], 1)

    def test_import_data_with_api_secret(self):
        self.client.import_data(None, "u1", "Old Event", 1_700_000_000, {"k": "v"}, api_secret="sec")
        (event,) = MP.events(project=TOKEN)
        self.assertEqual((event["event"], event["properties"]["time"], event["properties"]["k"],
                          event["properties"]["$import"]), ("Old Event", 1_700_000_000, "v", True))

    def test_import_with_service_account(self):
        project = Project("sa_tok", project_id=4242, service_accounts={"svc.user": "svc-secret"})
        with MixpanelFake(projects=[project]) as fake:
            creds = mixpanel.ServiceAccountCredentials("svc.user", "svc-secret", "4242")
            consumer = mixpanel.Consumer(retry_limit=0, credentials=creds, **fake.urls)
            client = mixpanel.Mixpanel("sa_tok", consumer=consumer)
            client.import_data(None, "u1", "Imported", 1_700_000_000, {})
            self.assertEqual([e["event"] for e in fake.events(project="sa_tok")], ["Imported"])

    def test_merge(self):
        self.client.merge(None, "anon-1", "user-1", api_secret="sec")
        (event,) = MP.events(name="$merge")
        self.assertEqual(event["properties"]["$distinct_ids"], ["anon-1", "user-1"])
        self.assertEqual(event["properties"]["token"], TOKEN)

    def test_merge_joins_clusters_in_an_original_project(self):
        MP.add_project(Project("py_original", id_merge="original"))
        self.addCleanup(MP.reset, "py_original")
        client = mixpanel.Mixpanel("py_original", consumer=mixpanel.Consumer(retry_limit=0, **MP.urls))
        client.merge(None, "device-1", "user-1", api_secret="sec")
        self.assertEqual(MP.canonical("user-1", project="py_original"), "device-1")
        self.assertNotIn("$failure_reason", MP.events(project="py_original")[0]["properties"])

    def test_every_people_operator(self):
        c = self.client
        c.people_set("u", {"name": "Ada", "plan": "free"})
        c.people_set_once("u", {"name": "Bob", "first_seen": "2026-01-01"})
        c.people_increment("u", {"logins": 2})
        c.people_increment("u", {"logins": 1})
        c.people_append("u", {"pages": "home"})
        c.people_union("u", {"tags": ["a", "b"]})
        c.people_union("u", {"tags": ["b", "c"]})
        c.people_remove("u", {"tags": "a"})
        c.people_unset("u", ["plan"])
        c.people_track_charge("u", 9.5, {"sku": "x"})
        profile = MP.profile("u")
        self.assertRegex(profile.pop("$last_seen"), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
        self.assertEqual(profile, {"name": "Ada", "first_seen": "2026-01-01", "logins": 3,
                                   "pages": ["home"], "tags": ["b", "c"],
                                   "$transactions": [{"sku": "x", "$amount": 9.5}]})
        c.people_clear_charges("u")
        self.assertNotIn("$transactions", MP.profile("u"))
        c.people_delete("u")
        self.assertIsNone(MP.profile("u"))

    def test_every_group_operator(self):
        c = self.client
        c.group_set("company", "acme", {"name": "Acme", "tier": 1})
        c.group_set_once("company", "acme", {"name": "Other", "since": 2020})
        c.group_union("company", "acme", {"tags": ["x", "y"]})
        c.group_remove("company", "acme", {"tags": "x"})
        c.group_unset("company", "acme", ["tier"])
        self.assertEqual(MP.groups(), {("company", "acme"): {"name": "Acme", "since": 2020, "tags": ["y"]}})
        c.group_delete("company", "acme")
        self.assertEqual(MP.groups(), {})

    def test_refusal_reaches_the_sdk_as_an_exception(self):
        with self.assertRaises(mixpanel.MixpanelException) as caught:
            self.client.people_set("", {"a": 1})
        self.assertIn("Engage API error: $distinct_id, missing or empty", str(caught.exception))


def _node_available() -> bool:
    return shutil.which("node") is not None and os.path.isdir(NODE_SDK)


class TestNodeSdk(_ServerTestCase):
    """mixpanel@0.24.0 through conformance/node_sdk.js; time pinned at T0."""

    def setUp(self):
        _require(_node_available(), "node or conformance/node_modules/mixpanel is missing "
                                    "(npm ci --prefix conformance)", self)
        super().setUp()

    def node(self, calls, config=None):
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
        request = {"url": MP.url, "token": TOKEN, "config": config or {}, "calls": calls}
        proc = subprocess.run(["node", NODE_DRIVER], input=json.dumps(request), capture_output=True,
                              text=True, timeout=60, env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        results = json.loads(proc.stdout)["results"]
        self.assertEqual([r["error"] for r in results], [None] * len(calls), results)
        return results

    def test_track_lands_as_sent(self):
        self.node([["track", "Clicked", {"distinct_id": "u1", "button": "buy", "n": 1.5}]])
        (event,) = MP.events()
        # Node sends no $insert_id; Mixpanel generates one (R-dedup).
        self.assertRegex(event["properties"].pop("$insert_id"), r"^[0-9a-f]{32}$")
        self.assertEqual([event], [{"event": "Clicked", "properties": dict(
            {"distinct_id": "u1", "button": "buy", "n": 1.5, "token": TOKEN, "mp_lib": "node",
             "$lib_version": "0.24.0", "time": T0}, **self.server_props())}])

    def test_track_verbose(self):
        self.node([["track", "Verbose", {"distinct_id": "u1"}]], config={"verbose": True})
        self.assertEqual(len(MP.events(name="Verbose")), 1)

    def test_track_batch_with_raw_base64(self):
        events = [{"event": f"B{i}", "properties": {"distinct_id": "u", "s": "~~~>>>???", "i": i,
                                                    "time": {"$date": (T0 - i) * 1000}}} for i in range(60)]
        self.node([["track_batch", events]])
        stored = MP.events()
        self.assertEqual(sorted(e["properties"]["i"] for e in stored), list(range(60)))
        self.assertEqual({e["properties"]["s"] for e in stored}, {"~~~>>>???"})
        self.assertEqual({e["properties"]["time"] for e in stored[:1]} <= {T0 - i for i in range(60)}, True)
        for e in stored:
            self.assertEqual(e["properties"]["time"], T0 - e["properties"]["i"])

    def test_import_and_import_batch_with_key(self):
        self.node([["import", "Old", {"$date": 1_700_000_000_000}, {"distinct_id": "u"}],
                   ["import_batch", [{"event": "OldB", "properties": {"distinct_id": "u",
                                                                      "time": 1_700_000_001}}]]],
                  config={"key": "legacy-key"})
        old, batch = MP.events()
        self.assertEqual((old["event"], old["properties"]["time"], old["properties"]["$import"]),
                         ("Old", 1_700_000_000, True))
        self.assertEqual((batch["event"], batch["properties"]["time"]), ("OldB", 1_700_000_001))

    def test_alias(self):
        self.node([["alias", "anon-1", "user@example.com"]])
        (event,) = MP.events()
        self.assertEqual((event["event"], event["properties"]["distinct_id"], event["properties"]["alias"]),
                         ("$create_alias", "anon-1", "user@example.com"))

    def test_every_people_operator(self):
        self.node([
            ["people.set", "u", {"name": "Ada", "plan": "free"}],
            ["people.set_once", "u", "name", "Bob"],
            ["people.set_once", "u", "first", "yes"],
            ["people.increment", "u", "logins", 2],
            ["people.increment", "u", {"logins": 3, "score": -1}],
            ["people.append", "u", "pages", "home"],
            ["people.union", "u", {"tags": ["a", "b"]}],
            ["people.union", "u", {"tags": "c"}],
            ["people.remove", "u", {"tags": "a"}],
            ["people.unset", "u", "plan"],
            ["people.track_charge", "u", 12.5, {"$time": {"$date": T0 * 1000}, "sku": "x"}],
        ])
        self.assertEqual(MP.profile("u"), {
            "name": "Ada", "first": "yes", "logins": 5, "score": -1, "pages": ["home"],
            "tags": ["b", "c"], "$last_seen": "2026-11-14T22:13:20",
            "$transactions": [{"$time": "2026-11-14T22:13:20.000Z", "sku": "x", "$amount": 12.5}]})
        self.node([["people.clear_charges", "u"]])
        self.assertEqual(MP.profile("u")["$transactions"], [])
        self.node([["people.delete_user", "u"]])
        self.assertIsNone(MP.profile("u"))

    def test_people_modifiers(self):
        self.node([["people.set", "u", {"a": 1}, {"$time": {"$date": (T0 - 86400) * 1000}}],
                   ["people.set", "v", {"a": 1}, {"$ignore_time": True}]])
        self.assertEqual(MP.profile("u")["$last_seen"], "2026-11-13T22:13:20")
        self.assertEqual(MP.profile("v"), {"a": 1})

    def test_every_group_operator(self):
        self.node([
            ["groups.set", "company", "acme", {"name": "Acme", "tier": 1}],
            ["groups.set_once", "company", "acme", {"name": "X", "since": 2020}],
            ["groups.union", "company", "acme", {"tags": ["x", "y"]}],
            ["groups.remove", "company", "acme", {"tags": "x"}],
            ["groups.unset", "company", "acme", "tier"],
        ])
        self.assertEqual(MP.groups(), {("company", "acme"): {"name": "Acme", "since": 2020, "tags": ["y"]}})
        self.node([["groups.delete_group", "company", "acme"]])
        self.assertEqual(MP.groups(), {})


# =============================================================================
# Feature flags: definitions, remote evaluation, agreement with the SDK
# =============================================================================

try:
    import httpx
    from mixpanel.flags.local_feature_flags import LocalFeatureFlagsProvider
    from mixpanel.flags.types import LocalFlagsConfig, SelectedVariant
except ImportError:  # the SDK tests skip (or fail when SDKs are required)
    LocalFeatureFlagsProvider = None

FLAG_TOKEN = "tok_flags"


def _flag_set():
    """Flags that exercise every step of evaluation."""
    return [
        {"key": "plain", "ruleset": {"variants": [{"key": "On", "value": True, "split": 1.0}],
                                     "rollout": [{"rollout_percentage": 0.3}]}},
        {"key": "ab", "hash_salt": "s4lt",
         "ruleset": {"variants": [{"key": "b", "value": "blue", "split": 0.25},
                                  {"key": "a", "value": "red", "split": 0.75},
                                  {"key": "c", "value": {"n": 1}, "split": 0.0}],
                     "rollout": [{"rollout_percentage": 0.2, "variant_override": {"key": "C"}},
                                 {"rollout_percentage": 0.9, "variant_splits": {"a": 0.5, "b": 0.5}}],
                     "test": {"users": {"qa-1": "B", "qa-2": "nope"}}}},
        {"key": "rules", "ruleset": {
            "variants": [{"key": "x", "value": 1, "split": 0.5}, {"key": "y", "value": 2, "split": 0.5}],
            "rollout": [{"rollout_percentage": 1.0, "runtime_evaluation_rule": {"and": [
                {"==": [{"var": "plan"}, "PRO"]}, {">=": [{"var": "seats"}, 3]}]}},
                        {"rollout_percentage": 0.5, "runtime_evaluation_definition": {"country": "FR"}},
                        {"rollout_percentage": 1.0, "runtime_evaluation_rule": {
                            "in": [{"var": "tier"}, ["gold", "silver"]]}}]}},
        {"key": "by-company", "context": "company_id",
         "ruleset": {"variants": [{"key": "on", "value": True, "split": 1.0}],
                     "rollout": [{"rollout_percentage": 0.5}]}},
    ]


def _contexts(count):
    plans = ["pro", "Pro", "free", None]
    for index in range(count):
        custom = {}
        if index % 3:
            custom["Plan"] = plans[index % 4]
            custom["seats"] = index % 6
        if index % 5 == 0:
            custom["country"] = "fr" if index % 10 else "DE"
        if index % 7 == 0:
            custom["tier"] = "Gold" if index % 2 else "bronze"
        context = {"distinct_id": f"user-{index}"}
        if custom:
            context["custom_properties"] = custom
        if index % 4 == 0:
            context["company_id"] = f"co-{index // 4}"
        yield context
    yield {"distinct_id": "qa-1"}
    yield {"distinct_id": "qa-2"}


def _http_json(method, path, body=None, headers=None, port=None):
    """(status, decoded JSON) of one request; a dict or list body is sent as JSON."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    status, _, raw = _http(method, path, body, headers, port=port)
    return status, json.loads(raw)


class TestFlags(unittest.TestCase):
    """/flags/definitions and /flags, set from Python and over HTTP."""

    @classmethod
    def setUpClass(cls):
        cls.fake = MixpanelFake(projects=[Project(FLAG_TOKEN, project_id=77)]).start()
        cls.addClassCleanup(cls.fake.stop)

    def setUp(self):
        self.fake.set_flags([])

    def get(self, path, headers=None):
        return _http_json("GET", path, headers=headers, port=self.fake.port)

    def evaluate(self, context, auth=FLAG_TOKEN, **params):
        query = urllib.parse.urlencode(dict(params, context=json.dumps(context)))
        return self.get("/flags?" + query, _basic(auth))

    def sdk_provider(self):
        """The SDK's local evaluator, fed the fake's /flags/definitions
        through its own response handling (parsing, variant sort)."""
        raw = _http("GET", "/flags/definitions", headers=_basic(FLAG_TOKEN), port=self.fake.port)[2]
        provider = LocalFeatureFlagsProvider(FLAG_TOKEN, LocalFlagsConfig(enable_polling=False), "test",
                                             tracker=lambda *args, **kwargs: None)
        request = httpx.Request("GET", "https://example.invalid/flags/definitions")
        provider._handle_response(httpx.Response(200, content=raw, request=request),
                                  datetime.datetime.now(), datetime.datetime.now())
        return provider

    def test_definitions_shape(self):
        flag = self.fake.add_flag("new-checkout", {"control": False, "treatment": True}, rollout=0.5,
                                  test_users={"qa": "treatment"}, experiment_id="exp-1")
        status, body = self.get("/flags/definitions", _basic(FLAG_TOKEN))
        self.assertEqual(status, 200)
        self.assertEqual(body, {"flags": [flag]})
        self.assertEqual(flag, {
            "id": "new-checkout", "name": "new-checkout", "key": "new-checkout", "status": "enabled",
            "project_id": 77, "workspace_id": None, "context": "distinct_id",
            "experiment_id": "exp-1", "is_experiment_active": None,
            "ruleset": {"variants": [{"key": "control", "value": False, "is_control": False, "split": 0.5},
                                     {"key": "treatment", "value": True, "is_control": False, "split": 0.5}],
                        "rollout": [{"rollout_percentage": 0.5}],
                        "test": {"users": {"qa": "treatment"}}}})
        # The token as ?token= works too (the browser SDK), and trailing slashes.
        self.assertEqual(self.get(f"/flags/definitions/?token={FLAG_TOKEN}")[1], body)

    def test_remote_evaluation(self):
        self.fake.set_flags(_flag_set())
        status, body = self.evaluate({"distinct_id": "qa-1"})
        self.assertEqual(status, 200)
        self.assertEqual(body["code"], 200)
        self.assertEqual(body["flags"]["ab"], {"variant_key": "b", "variant_value": "blue",
                                               "experiment_id": None, "is_experiment_active": None,
                                               "is_qa_tester": True})
        # Only one flag asked for: only it is evaluated.
        status, body = self.evaluate({"distinct_id": "qa-1"}, flag_key="plain")
        self.assertEqual(set(body["flags"]) - {"plain"}, set())
        self.assertNotIn("ab", body["flags"])
        # 100% rollout behind a rule: in only when the rule holds (case-insensitively).
        _, body = self.evaluate({"distinct_id": "u", "custom_properties": {"PLAN": "pro", "seats": 3}})
        self.assertIn("rules", body["flags"])
        _, body = self.evaluate({"distinct_id": "u", "custom_properties": {"plan": "pro", "seats": 2}})
        self.assertNotIn("rules", body["flags"])
        # A flag keyed on another context value is off without it.
        _, body = self.evaluate({"distinct_id": "u"})
        self.assertNotIn("by-company", body["flags"])

    def test_errors(self):
        status, body = self.evaluate({"user": "x"})
        self.assertEqual((status, body["error"]),
                         (400, "distinct_id must be provided in evalContext as a string"))
        status, _ = self.get("/flags?context=%7B")
        self.assertEqual(status, 401)
        with self.assertRaisesRegex(ValueError, "rollout_percentage"):
            self.fake.set_flags([{"key": "k", "ruleset": {"variants": [{"key": "a"}],
                                                            "rollout": [{"rollout_percentage": "1"}]}}])
        with self.assertRaisesRegex(ValueError, "share a key"):
            self.fake.set_flags([_flag_set()[0], _flag_set()[0]])
        status, body = _http_json("POST", "/__parlel/flags", {"flags": [{"key": ""}]}, port=self.fake.port)
        self.assertEqual((status, body["error"]), (400, "a flag is a JSON object with a key"))
        base = {"variants": [{"key": "a"}], "rollout": [{"rollout_percentage": 1}]}
        refused = {  # each would break the SDKs' reading of /flags/definitions
            "ruleset.test": dict(base, test="x"),
            "ruleset.test is": dict(base, test={"foo": 1}),
            "distinct_id: variant key": dict(base, test={"users": {"u1": 7}}),
            "from 0 to 1": dict(base, rollout=[{"rollout_percentage": 1.5}]),
            "not JSON the SDKs can read": dict(base, rollout=[{"rollout_percentage": float("nan")}]),
            "nested more than 32": dict(base, rollout=[{"rollout_percentage": 1,
                                                        "runtime_evaluation_rule": json.loads("[" * 40 + "]" * 40)}]),
        }
        for message, ruleset in refused.items():
            with self.subTest(message), self.assertRaisesRegex(ValueError, message):
                self.fake.set_flags([{"key": "k", "ruleset": ruleset}])
        with self.assertRaisesRegex(ValueError, "lone surrogate"):
            self.fake.set_flags([{"key": "\ud800", "ruleset": base}])
        status, body = self.evaluate({"distinct_id": "\ud800"})
        self.assertEqual((status, body["error"]), (400, "context is not valid JSON (an object with distinct_id)"))
        self.assertEqual(self.fake.flags(), [])

    def test_set_over_http_and_first_time_events(self):
        status, body = _http_json("POST", "/__parlel/flags", {"flags": _flag_set()}, port=self.fake.port)
        self.assertEqual((status, body), (200, {"ok": True, "project": FLAG_TOKEN, "flags": 4}))
        status, body = _http_json("GET", "/__parlel/flags", port=self.fake.port)
        self.assertEqual([flag["key"] for flag in body["flags"]], ["plain", "ab", "rules", "by-company"])
        status, _ = _http_json("POST", "/flags/ab/first-time-events", {"distinct_id": "u"},
                               headers=_basic(FLAG_TOKEN), port=self.fake.port)
        self.assertEqual(status, 200)
        status, body = _http_json("POST", "/__parlel/flags", _flag_set()[:1], port=self.fake.port)
        self.assertEqual((status, body["flags"]), (200, 1))  # a bare list, as --flags FILE takes

    def test_cli_flags_file(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "flags.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"flags": _flag_set()}, handle)
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--port", "0",
                                     "--token", FLAG_TOKEN, "--flags", path],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.addCleanup(proc.stdout.close)
            self.addCleanup(proc.wait, 5)
            self.addCleanup(proc.kill)
            port = int(proc.stdout.readline().rsplit(":", 1)[1])
            status, body = _http_json("GET", "/flags/definitions", headers=_basic(FLAG_TOKEN), port=port)
            self.assertEqual(status, 200)
            self.assertEqual([flag["key"] for flag in body["flags"]], ["plain", "ab", "rules", "by-company"])

    def test_agrees_with_the_python_sdks_local_evaluation(self):
        """The SDK fetches the fake's definitions (its own parsing and variant
        sort), evaluates locally; the fake's /flags must say the same."""
        _require(LocalFeatureFlagsProvider is not None, "the Python mixpanel SDK is not installed", self)
        self.fake.set_flags(_flag_set())
        sdk_log = logging.getLogger("mixpanel")  # it warns on every context without company_id
        self.addCleanup(sdk_log.setLevel, sdk_log.level)
        sdk_log.setLevel(logging.ERROR)
        provider = self.sdk_provider()
        self.assertEqual(len(provider._flag_definitions), 4)
        seen = {}
        for context in _contexts(3000):
            _, remote = self.evaluate(context)
            for key in ("plain", "ab", "rules", "by-company"):
                local = provider.get_variant(key, SelectedVariant(variant_key=None, variant_value=None),
                                             context, report_exposure=False)
                mine = remote["flags"].get(key)
                got = None if mine is None else (mine["variant_key"], mine["variant_value"],
                                                 mine["is_qa_tester"])
                want = None if local.variant_key is None else (local.variant_key, local.variant_value,
                                                               bool(local.is_qa_tester))
                self.assertEqual(got, want, f"flag {key}, context {context}")
                seen.setdefault(key, set()).add(None if got is None else got[0])
        # Every branch was taken: in and out of each flag, each variant chosen.
        self.assertEqual(seen, {"plain": {None, "On"}, "ab": {None, "a", "b", "c"},
                                "rules": {None, "x", "y"}, "by-company": {None, "on"}})

    def test_runtime_rules_agree_with_the_sdks_json_logic(self):
        """Random rules over every json-logic operator, Mixpanel's semver and
        datetime comparisons, and the evaluator's quirks: the fake's /flags and
        the SDK's local evaluation must agree on each."""
        _require(LocalFeatureFlagsProvider is not None, "the Python mixpanel SDK is not installed", self)
        import random as _random
        rng = _random.Random(6)
        leaves = [0, 1, 2.5, -3, "", "0", "1.5", "abc", "A", True, False, None, [1, 2], ["abc", "x"],
                  "1.2.3", "v2.0", "1.2.3-beta.2", "2026-12-01T10:00:00Z", 1796169600000,
                  {"var": "n"}, {"var": "s"}, {"var": "l"}, {"var": "l.1"}, {"var": "s.0"},
                  {"var": "l.-1"}, {"var": "l.9"}, {"var": ["missing", 7]}, {"var": "Plan"},
                  {"var": "version"}, {"var": "when"}, {"var": ""}]
        binary = ["==", "===", "!=", "!==", "<", "<=", ">", ">=", "in", "%", "-", "/"]
        variadic = ["and", "or", "if", "cat", "+", "*", "min", "max", "merge", "count", "<", "<="]

        def rule(depth):
            if depth > 3 or rng.random() < 0.25:
                return rng.choice(leaves)
            kind = rng.random()
            if kind < 0.45:
                return {rng.choice(binary): [rule(depth + 1), rule(depth + 1)]}
            if kind < 0.7:
                return {rng.choice(variadic): [rule(depth + 1) for _ in range(rng.randint(0, 3))]}
            if kind < 0.8:
                return {rng.choice(["!", "!!", "missing", "log"]): rule(depth + 1)}
            if kind < 0.9:
                return {rng.choice(["semver_compare", "datetime_compare"]):
                        [rule(depth + 1), rng.choice(["<", ">=", "===", "!==", "~"]), rule(depth + 1)]}
            return rng.choice([{"?:": [rule(depth + 1), 1, 0]}, {"missing_some": [1, ["n", "q"]]},
                               {"bogus": [1]}, {}, {"==": [1, 1], "junk": 0}])

        flags = [{"key": f"r{index}", "ruleset": {
            "variants": [{"key": "on", "value": True, "split": 1.0}],
            "rollout": [{"rollout_percentage": 1.0, "runtime_evaluation_rule": rule(0)}]}}
                 for index in range(300)]
        self.fake.set_flags(flags)
        sdk_log = logging.getLogger("mixpanel")  # it logs every failing rule
        self.addCleanup(sdk_log.setLevel, sdk_log.level)
        sdk_log.setLevel(logging.CRITICAL + 1)
        provider = self.sdk_provider()
        contexts = [{"distinct_id": f"u{i}", "custom_properties": custom} for i, custom in enumerate([
            {"n": 5, "s": "abc", "l": [1, 2, 3]}, {"n": "5", "s": "", "l": []}, {"n": 0, "plan": "PRO"},
            {"version": "V1.10.0", "when": "2026-12-02T00:00:00+01:00", "n": 2.5},
            {"version": "1.2.3-beta.10", "when": "2026-11-30T23:59:59.5Z", "s": "A", "l": ["abc"]},
            {"n": True, "s": None, "l": {"1": 2}}])]
        outcomes = set()
        for context in contexts:
            _, remote = self.evaluate(context)
            for flag in flags:
                local = provider.get_variant(flag["key"], SelectedVariant(variant_key=None, variant_value=None),
                                             context, report_exposure=False)
                self.assertEqual(flag["key"] in remote["flags"], local.variant_key == "on",
                                 f"rule {flag['ruleset']['rollout'][0]['runtime_evaluation_rule']}, "
                                 f"context {context}")
                outcomes.add(local.variant_key)
        self.assertEqual(outcomes, {None, "on"})  # both answers occur


class TestReplayAndSettings(_ServerTestCase):
    """/record (session replay) and /settings, as the browser SDK calls them."""

    def record(self, body, **query):
        params = dict({"replay_id": "r1", "seq": "0", "distinct_id": "$device:d1", "format": "body",
                       "mp_lib": "web"}, **query)
        headers = dict(_basic(TOKEN), **{"Content-Type": "application/octet-stream"})
        return _http("POST", "/record/?" + urllib.parse.urlencode(params), body, headers)

    def test_gzip_and_plain_batches_are_kept(self):
        snapshot = [{"type": 4, "data": {"href": "http://x/"}, "timestamp": 1}, {"type": 2, "data": {}}]
        status, _, raw = self.record(gzip.compress(json.dumps(snapshot).encode()), format="gzip")
        self.assertEqual((status, json.loads(raw)), (200, {"code": 200, "status": "OK"}))
        self.assertEqual(self.record(json.dumps([{"type": 3}]), seq="1")[0], 200)
        first, second = MP.recordings()
        self.assertEqual(first, {"replay_id": "r1", "seq": 0, "distinct_id": "$device:d1", "format": "gzip",
                                 "mp_lib": "web", "events": snapshot, "project": TOKEN, "time": T0})
        self.assertEqual((second["seq"], second["events"]), (1, [{"type": 3}]))
        self.assertEqual(MP.recordings(replay_id="other"), [])
        status, body = _json("GET", "/__parlel/recordings?replay_id=r1")
        self.assertEqual(body["count"], 2)
        MP.reset()
        self.assertEqual(MP.recordings(), [])

    def test_refusals(self):
        cases = [(self.record("[]", replay_id=""), 400, "replay_id, missing or empty"),
                 (self.record("[]", seq="x"), 400, "seq, missing or not an integer"),
                 (self.record("{nope"), 400, "the body is a JSON array of rrweb events (gzip when format=gzip)"),
                 (_http("POST", "/record/?replay_id=r&seq=0", "[]"), 401,
                  "session replay needs the token: Authorization: Basic <token>:")]
        for (status, _, raw), want_status, message in cases:
            self.assertEqual((status, json.loads(raw)["error"]), (want_status, message))
        self.assertEqual(MP.recordings(), [])

    def test_settings_over_http(self):
        self.assertEqual(_json("POST", "/track", _form(data=json.dumps(_event())))[1], 1)  # makes the project
        self.addCleanup(MP.set_sdk_config, {}, project=TOKEN)
        status, body = _json("POST", "/__parlel/sdk-config", json.dumps({"project": TOKEN, "config": {"a": 1}}))
        self.assertEqual((status, body), (200, {"ok": True, "project": TOKEN}))
        self.assertEqual(_json("GET", "/settings/", headers=_basic(TOKEN))[1], {"sdk_config": {"config": {"a": 1}}})
        status, body = _json("POST", "/__parlel/sdk-config", json.dumps({"config": []}))
        self.assertEqual((status, body["error"]), (400, 'the body is {"project"?, "config": {...}}'))

    def test_settings(self):
        status, body = _json("GET", "/settings/?sdk_config=1", headers=_basic(TOKEN))
        self.assertEqual((status, body), (200, {"sdk_config": {"config": {}}}))
        self.assertEqual(_json("POST", "/track", _form(data=json.dumps(_event())))[1], 1)  # makes the project
        MP.set_sdk_config({"record_sessions_percent": 100}, project=TOKEN)
        self.addCleanup(MP.set_sdk_config, {}, project=TOKEN)
        status, body = _json("GET", f"/settings/?token={TOKEN}")
        self.assertEqual(body, {"sdk_config": {"config": {"record_sessions_percent": 100}}})


class TestTls(unittest.TestCase):
    """MixpanelFake(tls=True): HTTPS from the same handler, embedded test CA."""

    @classmethod
    def setUpClass(cls):
        cls.fake = MixpanelFake(tls=True, projects=[Project(FLAG_TOKEN, project_id=78)]).start()
        cls.addClassCleanup(cls.fake.stop)

    def setUp(self):
        self.fake.reset()
        self.fake.set_flags([])

    def strict_context(self):
        context = ssl.create_default_context(cafile=self.fake.ca_file)
        context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)  # Python 3.13's default
        return context

    def test_https_verifies_for_every_loopback_name(self):
        self.assertTrue(self.fake.url.startswith("https://127.0.0.1:"))
        self.assertEqual(self.fake.api_host, f"127.0.0.1:{self.fake.port}")
        for host in ("localhost", "127.0.0.1"):
            with urllib.request.urlopen(f"https://{host}:{self.fake.port}/health",
                                        context=self.strict_context(), timeout=10) as answer:
                self.assertEqual(json.loads(answer.read()), {"status": "ok"})

    def test_an_untrusted_client_is_refused_and_plain_http_gets_no_hang(self):
        with self.assertRaises(urllib.error.URLError):
            urllib.request.urlopen(self.fake.url + "/health", context=ssl.create_default_context(),
                                   timeout=10)
        raw = _raw_request(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", port=self.fake.port)
        self.assertNotIn(b"200 OK", raw)  # a TLS alert or a closed socket, within the timeout
        self.assertEqual(urllib.request.urlopen(self.fake.url + "/health", context=self.strict_context(),
                                                timeout=10).status, 200)

    def test_python_sdk_tracks_and_gets_remote_flags_over_tls(self):
        _require(LocalFeatureFlagsProvider is not None, "the Python mixpanel SDK is not installed", self)
        from mixpanel.flags.types import RemoteFlagsConfig
        self.fake.add_flag("new-checkout", {"on": True}, test_users={"qa": "on"})
        trust = {"REQUESTS_CA_BUNDLE": self.fake.ca_file, "SSL_CERT_FILE": self.fake.ca_file}
        with unittest.mock.patch.dict(os.environ, trust):
            consumer = mixpanel.Consumer(api_host=self.fake.api_host, retry_limit=0)
            with mixpanel.Mixpanel(FLAG_TOKEN, consumer=consumer, remote_flags_config=RemoteFlagsConfig(
                    api_host=self.fake.api_host)) as client:
                client.track("u1", "Signed Up", {"plan": "pro"})
                variant = client.remote_flags.get_variant(
                    "new-checkout", SelectedVariant(variant_key=None, variant_value=None), {"distinct_id": "qa"})
        self.assertEqual((variant.variant_key, variant.variant_value, variant.is_qa_tester,
                          variant.variant_source), ("on", True, True, "remote"))
        (tracked,) = self.fake.events(name="Signed Up")
        self.assertEqual(tracked["properties"]["plan"], "pro")
        (exposure,) = self.fake.wait_for_events(1, name="$experiment_started")
        self.assertEqual({k: exposure["properties"][k] for k in ("distinct_id", "Experiment name", "Variant name",
                                                                "Flag evaluation mode")},
                         {"distinct_id": "qa", "Experiment name": "new-checkout", "Variant name": "on",
                          "Flag evaluation mode": "remote"})

    def test_python_sdk_local_flags_fetch_definitions_over_tls(self):
        _require(LocalFeatureFlagsProvider is not None, "the Python mixpanel SDK is not installed", self)
        self.fake.set_flags(_flag_set())
        with unittest.mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.fake.ca_file}):
            provider = LocalFeatureFlagsProvider(FLAG_TOKEN, LocalFlagsConfig(
                api_host=self.fake.api_host, enable_polling=False), "test", tracker=lambda *a, **k: None)
            provider.start_polling_for_definitions()
            self.addCleanup(provider.__exit__, None, None, None)
        self.assertTrue(provider.are_flags_ready())
        self.assertEqual(sorted(provider._flag_definitions), ["ab", "by-company", "plain", "rules"])
        variant = provider.get_variant("ab", SelectedVariant(variant_key=None, variant_value=None),
                                       {"distinct_id": "qa-1"}, report_exposure=False)
        self.assertEqual((variant.variant_key, variant.variant_value), ("b", "blue"))

    def test_node_sdk_remote_flags_on_port_443(self):
        node = shutil.which("node")
        _require(node is not None and os.path.isdir(NODE_SDK), "node and conformance/node_modules are needed", self)
        try:
            fake = MixpanelFake(port=443, tls=True, projects=[Project(FLAG_TOKEN)])
        except PermissionError:
            _require(False, "port 443 needs root (CI runs as root)", self)
        except OSError as exc:
            _require(False, f"port 443 is taken: {exc}", self)
        with fake:
            fake.add_flag("new-checkout", {"on": True}, test_users={"qa": "on"})
            proc = subprocess.run([node, os.path.join(HERE, "conformance", "node_flags.js")],
                                  input=json.dumps({"host": "localhost", "token": FLAG_TOKEN,
                                                    "flag": "new-checkout", "context": {"distinct_id": "qa"}}),
                                  capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, NODE_EXTRA_CA_CERTS=fake.ca_file))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            answer = json.loads(proc.stdout)
            self.assertEqual({k: answer["variant"][k] for k in ("variant_key", "variant_value", "is_qa_tester")},
                             {"variant_key": "on", "variant_value": True, "is_qa_tester": True})
            self.assertEqual(set(answer["all"]), {"new-checkout"})
            self.assertIs(answer["enabled"], True)
            exposures = fake.wait_for_events(2, name="$experiment_started")
            self.assertEqual({e["properties"]["Flag evaluation mode"] for e in exposures}, {"remote"})
            self.assertEqual(len(fake.requests(path="/flags")), 3)

    def test_keyfile_without_certfile_is_refused(self):
        with self.assertRaisesRegex(ValueError, "keyfile needs certfile"):
            MixpanelFake(keyfile=self.fake.ca_file)

    def test_cli_tls(self):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mixpanel_fake.py"), "--port", "0", "--tls"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, 5)
        self.addCleanup(proc.kill)
        url = proc.stdout.readline().split()[-1]
        self.assertRegex(url, r"^https://127\.0\.0\.1:\d+$")
        trust = proc.stdout.readline()
        self.assertRegex(trust, r"^mixpanel_fake: clients must trust \S+ca\.pem\n$")
        context = ssl.create_default_context(cafile=trust.split()[-1])
        with urllib.request.urlopen(url + "/health", context=context, timeout=10) as answer:
            self.assertEqual(answer.status, 200)


# =============================================================================
# The browser SDK in real headless Chromium (conformance/browser.js)
# =============================================================================

BROWSER_DRIVER = os.path.join(HERE, "conformance", "browser.js")
BROWSER_SDK = os.path.join(HERE, "conformance", "node_modules", "mixpanel-browser")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _browser(case, doc, timeout=90):
    """Run one document through the driver; its decoded answer."""
    node = shutil.which("node")
    _require(node is not None and os.path.isdir(BROWSER_SDK) and os.path.exists(CHROMIUM),
             "node, conformance/node_modules (npm ci --prefix conformance) and Chromium are needed", case)
    proc = subprocess.run([node, BROWSER_DRIVER], input=json.dumps(doc), capture_output=True, text=True,
                          timeout=timeout)
    case.assertEqual(proc.returncode, 0, proc.stderr)
    answer = json.loads(proc.stdout)
    case.assertFalse(answer["timed_out"], answer)
    case.assertIsNone(answer["steps_error"], answer)
    return answer


class TestBrowserSdk(_ServerTestCase):
    """mixpanel-browser 2.83.0 in Chromium, its page on another origin than the fake."""

    def setUp(self):
        super().setUp()
        MP.set_time(None)  # the SDK stamps real times
        self.since = MP.stats()["requests_journaled"]  # the journal outlives resets

    def journal(self, path):
        return MP.requests(path=path, since=self.since)

    def run_page(self, steps, **config):
        doc = {"mode": "sdk", "fake": MP.url, "token": TOKEN, "steps": steps,
               "config": dict({"batch_flush_interval_ms": 100}, **config)}
        answer = _browser(self, doc)
        self.assertNoCorsTrouble(answer)
        return answer

    def assertNoCorsTrouble(self, answer):
        texts = [entry["text"] for entry in answer["console"] if entry["type"] in ("error", "warning")]
        self.assertEqual([t for t in texts if "CORS" in t or "Access-Control" in t], [], answer["console"])
        self.assertEqual(answer["failed_requests"], [])
        self.assertEqual(answer["page_errors"], [])

    def test_track_batched_base64_with_register(self):
        answer = self.run_page("""
            let replied = "no callback";
            mixpanel.register({plan: "pro"});
            mixpanel.track("Hello", {a: 1, nested: {b: [1, 2]}, text: "<b>x</b>"}, (r) => { replied = r; });
            setTimeout(() => done(replied), 1500);""")
        self.assertEqual(answer["result"], 1)  # batched: the SDK calls back 1 on enqueueing
        (event,) = MP.events(name="Hello")
        props = event["properties"]
        self.assertEqual({k: props[k] for k in ("a", "nested", "text", "plan", "token", "mp_lib", "$lib_version")},
                         {"a": 1, "nested": {"b": [1, 2]}, "text": "<b>x</b>", "plan": "pro", "token": TOKEN,
                          "mp_lib": "web", "$lib_version": "2.83.0"})
        self.assertRegex(props["distinct_id"], r"^\$device:")
        sent = [r for r in self.journal("/track") if r["records"]]
        self.assertTrue(sent)
        for request in sent:  # the batcher's calls, base64 by default
            self.assertIn("verbose=1", request["query"])
            self.assertEqual(request["status"], 200)
            self.assertEqual(request["response"], '{"status":1,"error":null}')

    def test_immediate_json_sends_call_back_with_the_answer(self):
        answer = self.run_page("""
            mixpanel.track("Now", {n: 1}, (reply) => done(reply));""",
                               batch_requests=False, api_payload_format="json")
        self.assertEqual(answer["result"], 1)
        self.assertEqual(len(MP.events(name="Now")), 1)

    def test_identity_people_groups_and_pageview(self):
        answer = self.run_page("""
            const anonymous = mixpanel.get_distinct_id();
            mixpanel.people.set({name: "Ada"});          // queued until identify
            mixpanel.identify("u1");
            mixpanel.people.set_once({first: "x"});
            mixpanel.people.increment("n", 2);
            mixpanel.people.append("l", "a");
            mixpanel.people.union("u", ["a", "b"]);
            mixpanel.people.set({gone: 1});
            // Batches in flight at once may land in any order (so at Mixpanel
            // too): what must follow the updates above waits for them.
            await new Promise((resolve) => setTimeout(resolve, 1000));
            mixpanel.people.remove("u", "a");
            mixpanel.people.unset("gone");
            mixpanel.set_group("company", "acme");
            mixpanel.get_group("company", "acme").set({tier: "gold"});
            mixpanel.track_pageview();
            mixpanel.alias("alias-1");
            setTimeout(() => {
              mixpanel.reset();
              mixpanel.track("After reset");
              setTimeout(() => done({anonymous, after: mixpanel.get_distinct_id()}), 1500);
            }, 1500);""")
        anonymous = answer["result"]["anonymous"]
        self.assertEqual(MP.profile("u1"), {**MP.profile("u1"), "name": "Ada", "first": "x", "n": 2, "l": ["a"],
                                            "u": ["b"], "company": ["acme"]})
        self.assertNotIn("gone", MP.profile("u1"))
        self.assertEqual(MP.groups()[("company", "acme")]["tier"], "gold")
        # identify("u1"), then alias() identifies as the alias: two $identify.
        identify, _ = MP.events(name="$identify")
        self.assertEqual((identify["properties"]["distinct_id"], identify["properties"]["$anon_distinct_id"]),
                         ("u1", anonymous))
        (alias,) = MP.events(name="$create_alias")
        self.assertEqual(alias["properties"]["alias"], "alias-1")
        (view,) = MP.events(name="$mp_web_page_view")
        self.assertEqual(view["properties"]["distinct_id"], "u1")
        (after,) = MP.events(name="After reset")
        self.assertEqual(after["properties"]["distinct_id"], answer["result"]["after"])
        self.assertNotIn(after["properties"]["distinct_id"], (anonymous, "u1", "alias-1"))

    def test_charges_and_delete_user(self):
        """2.83.0's track_charge is a deprecated no-op; clear_charges sets
        $transactions to []; delete_user deletes (clear_charges calls back
        with the server's answer)."""
        answer = self.run_page("""
            const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
            mixpanel.identify("payer");
            mixpanel.people.track_charge(9.5, {sku: "a"});
            const replies = [];
            mixpanel.people.clear_charges((r) => replies.push(r));
            await wait(800);
            replies.push(await fetch(FAKE + "/__parlel/people").then((r) => r.json()));
            mixpanel.people.delete_user();  // 2.83.0 takes no callback here
            await wait(800);
            done(replies);""".replace("FAKE", json.dumps(MP.url)), batch_requests=False)
        cleared, listing = answer["result"]
        self.assertEqual(cleared, 1)
        (profile,) = [p for p in listing["people"] if p["$distinct_id"] == "payer"]
        self.assertEqual(profile["$properties"]["$transactions"], [])
        sent = [record for r in self.journal("/engage") for record in (r["records"] or [])]
        self.assertEqual([r for r in sent if "$append" in r], [])  # track_charge sent nothing
        self.assertEqual([list(r)[0] for r in sent if "$delete" in r], ["$delete"])
        self.assertIsNone(MP.profile("payer"))

    def test_batcher_retries_after_503_and_429_and_halves_after_413(self):
        MP.add_fault("/track", 503, times=1)
        MP.add_fault("/track", 429, retry_after=1, times=1)
        MP.add_fault("/track", 413, times=1)
        self.run_page("""
            for (let i = 0; i < 4; i++) mixpanel.track("Retried", {i});
            setTimeout(() => done(null), 6000);""")
        self.assertEqual(sorted(e["properties"]["i"] for e in MP.events(name="Retried")), [0, 1, 2, 3])
        statuses = [r["status"] for r in self.journal("/track") if r["method"] == "POST"]
        self.assertEqual(statuses[:3], [503, 429, 413])
        self.assertEqual(set(statuses[3:]), {200})

    def test_send_beacon_flushes_the_queue_when_the_page_hides(self):
        doc = {"mode": "sdk", "fake": MP.url, "token": TOKEN, "hide_page": True,
               "config": {"batch_flush_interval_ms": 600000},
               "steps": "setTimeout(() => { mixpanel.track('Bye', {k: 'v'}); done(null); }, 500);"}
        self.assertNoCorsTrouble(_browser(self, doc))
        (event,) = MP.wait_for_events(1, name="Bye")
        (request,) = [r for r in self.journal("/track") if r["records"]]
        self.assertTrue(request["headers"]["Content-Type"].startswith("text/plain"), request["headers"])

    def test_flags_fetch_and_exposure(self):
        MP.add_project(Project(TOKEN))
        MP.add_flag("new-checkout", {"on": "blue"}, project=TOKEN)
        self.addCleanup(MP.set_flags, [], project=TOKEN)
        answer = self.run_page("""
            const value = await mixpanel.flags.get_variant_value("new-checkout", "fallback");
            setTimeout(() => done(value), 1500);""", flags=True)
        self.assertEqual(answer["result"], "blue")
        (exposure,) = MP.wait_for_events(1, name="$experiment_started")
        self.assertEqual((exposure["properties"]["Experiment name"], exposure["properties"]["Variant name"]),
                         ("new-checkout", "on"))
        fetches = self.journal("/flags")
        self.assertIn("OPTIONS", [r["method"] for r in fetches])  # preflighted: it sends Authorization
        self.assertEqual({r["status"] for r in fetches if r["method"] == "GET"}, {200})

    def test_session_replay_batches_and_remote_settings(self):
        self.run_page("""
            document.body.appendChild(document.createElement("p")).textContent = "recorded";
            await new Promise((resolve) => setTimeout(resolve, 500));
            mixpanel.stop_session_recording();
            setTimeout(() => done(null), 2000);""", record_sessions_percent=100,
                      remote_settings_mode="fallback")
        batches = MP.recordings(project=TOKEN)
        self.assertGreaterEqual(len(batches), 1, self.journal("/record"))
        first = batches[0]
        self.assertEqual((first["seq"], first["format"]), (0, "gzip"))
        self.assertIn(2, [event.get("type") for event in first["events"]])  # a FullSnapshot
        settings = [r for r in self.journal("/settings") if r["method"] == "GET"]
        self.assertEqual([r["status"] for r in settings], [200])


class TestInspectionPage(_ServerTestCase):
    """/__parlel/ui in Chromium: live rows, values shown as text."""

    def test_page_shows_events_as_text_and_runs_nothing(self):
        hostile = {"xss": "<script>window.__pwned = 1</script>",
                   "img": '<img src=x onerror="window.__pwned = 2">'}
        self.assertEqual(_json("POST", "/track", _form(data=json.dumps(_event("Signed Up", distinct_id="u1",
                                                                               **hostile))))[1], 1)
        _json("POST", "/track", _form(data=json.dumps({"event": "No token", "properties": {}})))
        screenshot = os.environ.get("MIXPANEL_FAKE_SCREENSHOT") or os.path.join(tempfile.mkdtemp(), "ui.png")
        steps = """
            await page.waitForSelector("td:text('Signed Up')");
            const table = await page.locator("#grid").innerText();
            await page.fill("#filter", "nothing-matches-this");
            const filtered = await page.locator("#empty").innerText();
            await page.fill("#filter", "");
            await page.click("button[data-tab=rejected]");
            await page.waitForSelector("td:text('token, missing or empty')");
            const rejected = await page.locator("#grid").innerText();
            await page.click("button[data-tab=events]");
            await page.waitForSelector("td:text('Signed Up')");
            await page.waitForTimeout(1200);  // a poll with the cursor adds nothing twice
            const rows = await page.locator("#grid tbody tr").count();
            const pwned = await page.evaluate(() => window.__pwned === undefined ? null : window.__pwned);
            const images = await page.locator("#grid img, #grid script").count();
            return {table, filtered, rejected, rows, pwned, images};"""
        answer = _browser(self, {"mode": "page", "url": MP.url + "/__parlel/ui", "steps": steps,
                                 "screenshot": screenshot})
        result = answer["result"]
        # Shown as written, inside the JSON of the properties.
        self.assertIn(json.dumps(hostile["xss"]), result["table"])
        self.assertIn(json.dumps(hostile["img"]), result["table"])
        self.assertEqual((result["pwned"], result["images"], result["rows"]), (None, 0, 1))
        self.assertEqual(result["filtered"], "nothing matches the filter")
        self.assertIn("token, missing or empty", result["rejected"])
        self.assertEqual(answer["page_errors"], [])
        self.assertEqual([c for c in answer["console"] if c["type"] == "error"], [])
        self.assertGreater(os.path.getsize(screenshot), 1000)


# =============================================================================
# Runner: unittest, then the one line CI reads
# =============================================================================


def _run(argv: list[str] | None = None) -> int:
    program = unittest.main(module=__name__, argv=[sys.argv[0]] + (argv or []),
                            exit=False, verbosity=2)
    result = program.result
    # A failing subtest reports its own object: count the test it belongs to, once.
    broken = {id(getattr(test, "test_case", test)) for test, _ in result.failures + result.errors}
    failed = len(broken) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - len(broken) - len(result.unexpectedSuccesses) - skipped
    if result.testsRun == 0:
        failed = max(failed, 1)
    sys.stderr.flush()
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
