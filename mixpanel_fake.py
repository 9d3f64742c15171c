"""mixpanel_fake: a local, in-memory fake of the Mixpanel HTTP API for tests.

Point the official SDKs (or any HTTP client) at it and ask it what arrived:

    with MixpanelFake() as mp:              # binds 127.0.0.1 on a free port
        consumer = mixpanel.Consumer(**mp.urls)
        ...
        mp.wait_for_events(1, name="Signed Up")

or run it standalone: ``python mixpanel_fake.py --port 4808``.

Faked: ingestion (/track, /import, /engage, /groups) in every encoding the
SDKs send, profiles and group profiles with Mixpanel's operators, projects and
their credentials, and an inspection API under /__parlel/.  Everything lives in
memory; nothing leaves the machine.  Standard library only, Python 3.9+.
A test tool: it binds the loopback interface by default and is not hardened
for production traffic.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import binascii
import collections
import datetime
import difflib
import email.utils
import functools
import gc
import hashlib
import ipaddress
import io
import itertools
import random
import json
import logging
import math
import operator
import os
import re
import selectors
import shutil
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import unquote, urlencode

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_PORT",
    "ApiError",
    "ExpressionError",
    "MixpanelFake",
    "Project",
    "Store",
    "WaitTimeout",
    "main",
]

_log = logging.getLogger("mixpanel_fake")


# =============================================================================
# Constants
# =============================================================================

#: The port the CLI listens on (the seed's contract; the library uses port 0).
DEFAULT_PORT = 4808
_DEFAULT_HOST = "127.0.0.1"

# TLS for loopback tests (README "TLS"): a test CA and a leaf certificate for
# localhost, 127.0.0.1 and ::1, made once offline with openssl (EC P-256,
# valid to 2126; the CA is critical CA:TRUE with keyCertSign, the leaf has a
# SAN, serverAuth and key identifiers, as Python 3.13's strict checks ask).
# THE PRIVATE KEY IS PUBLIC: it ships in this file.  Never use it beyond loopback.
_TLS_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBzTCCAXOgAwIBAgIUeF+ItUhUPK0L7yumKIKPzGhvQDEwCgYIKoZIzj0EAwIw
QjFAMD4GA1UEAww3bWl4cGFuZWxfZmFrZSB0ZXN0IENBIChwdWJsaWMga2V5LCBs
b29wYmFjayB0ZXN0cyBvbmx5KTAgFw0yNjEyMDMyMDA1MjlaGA8yMTI2MTEwOTIw
MDUyOVowQjFAMD4GA1UEAww3bWl4cGFuZWxfZmFrZSB0ZXN0IENBIChwdWJsaWMg
a2V5LCBsb29wYmFjayB0ZXN0cyBvbmx5KTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABPHuonp7+p3CyDT4ZooEvC6EdyLA+L0dAWDPZYU8FnZpNkBEU4W+J7YUr/0Q
wf8Y+3S460BmQvtJzdZp5D/kakKjRTBDMBIGA1UdEwEB/wQIMAYBAf8CAQAwDgYD
VR0PAQH/BAQDAgEGMB0GA1UdDgQWBBS0cHYrp+4wy/I11k+Nr4Cvzm9/IzAKBggq
hkjOPQQDAgNIADBFAiBDp6NA6eNYB9HsAP5dZKLJouG6WYAHznlmCsT+igXZ6AIh
AM5EWDBC8hIAEep+TimyvRZtO79xNCakMC921f4QyeCt
-----END CERTIFICATE-----
"""
_TLS_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIICADCCAaWgAwIBAgIUIfqz+vnCFa+zRmy+lLRW1LvSzjIwCgYIKoZIzj0EAwIw
QjFAMD4GA1UEAww3bWl4cGFuZWxfZmFrZSB0ZXN0IENBIChwdWJsaWMga2V5LCBs
b29wYmFjayB0ZXN0cyBvbmx5KTAgFw0yNjEyMDMyMDA1MzFaGA8yMTI2MTEwOTIw
MDUzMVowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEPPY6ZMZNeWQj8bIDpVz3vX4nrPt678UMF0iGwFBqKLUoQ6tUY2oPLsLH
23boPvkLKfdCXhHc0DrHoq9JZ51F56OBpDCBoTAMBgNVHRMBAf8EAjAAMA4GA1Ud
DwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDATAsBgNVHREEJTAjgglsb2Nh
bGhvc3SHBH8AAAGHEAAAAAAAAAAAAAAAAAAAAAEwHQYDVR0OBBYEFE8Oz03CXfGw
dA6q2Po8Kks6JYePMB8GA1UdIwQYMBaAFLRwdiun7jDL8jXWT42vgK/Ob38jMAoG
CCqGSM49BAMCA0kAMEYCIQDT7dcBNgOxLhdm8Aa6dkGZfZPeDNtETkXzCxXXFgPW
PQIhAJ1t3fRzst0pSqgr4wagUfBNHj6ijES01W3mof8cPsBb
-----END CERTIFICATE-----
"""
_TLS_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgS3vjEPNI/8zSsE9w
56T3Nrr8hbCYUTIkCe57aD0eFYyhRANCAAQ89jpkxk15ZCPxsgOlXPe9fies+3rv
xQwXSIbAUGootShDq1Rjag8uwsfbdug++Qsp90JeEdzQOseir0lnnUXn
-----END PRIVATE KEY-----
"""

# The Node SDK sends every single call as a GET with the whole base64 payload
# in the query string; an event near Mixpanel's 1 MB limit is ~1.4 MB there.
_MAX_REQUEST_LINE = 4 * 1024 * 1024
# Mixpanel's /import takes 10 MB of uncompressed JSON per request (R-import;
# its 413 example still names 2097152 bytes, an older limit), before and after
# gzip inflation alike.
_MAX_BODY_BYTES = 10 * 1024 * 1024
# A body up to this size past the limit is read and dropped before the 413,
# so the client sees the answer; a bigger one is answered at once.
_DRAIN_LIMIT = 64 * 1024 * 1024
# The longest a wait_for_events() call waits (one year: "for ever" in a test).
_MAX_WAIT = 365 * 86400.0
# Clients send one gzip member; many tiny ones are an attack, not data.
_MAX_GZIP_MEMBERS = 64
# The stdlib's limits for a request's header block (http.client's
# _MAXLINE and _MAXHEADERS); past them: 431.
_MAX_HEADER_LINE = 65536
_MAX_HEADERS = 100
# Idle keep-alive connections are closed after this many seconds, so a stalled
# client cannot pin a server thread for ever; a request's head (request line
# and headers) must also arrive whole within it (`idle_timeout`).
_IDLE_TIMEOUT = 15.0
# Connections served at once (`max_connections`), each on its own thread. Far
# above what a test suite opens (a browser opens 6 per host, SDK pools about
# 10), well below a default `ulimit -n` of 1024; past it a new connection gets
# an immediate 503 from the accepting thread, with no handler thread for it.
_MAX_CONNECTIONS = 256
# The standalone server's garbage collector: a collection every 50,000 new
# containers instead of CPython's 700, and the start-up objects frozen out
# of it.  A fake that keeps every record it is sent would otherwise walk all
# of them again every few batches (bench/bench.py measures it); the store
# makes almost no reference cycles.  An in-process MixpanelFake leaves the
# test process's collector alone.
_SERVER_GC_THRESHOLDS = (50_000, 20, 10)
# A refused connection is read and dropped for up to this long before it is
# closed, so the client reads the 503 instead of a reset; at most this many.
_REFUSED_LINGER = 2.0
_MAX_LINGERING = 256
# stop() lets requests already being worked on finish for this long, then
# closes every connection.
_STOP_GRACE = 1.0

# Times beyond this many seconds (or ms) from 1970 are not times at all.
_MAX_TIME = 1e15
_MAX_DOUBLE = sys.float_info.max
# A `time` above this is milliseconds, below it seconds (1e11 s is year 5138,
# 1e11 ms is 1973): the SDKs send float seconds (Python, browser) or integer
# milliseconds (Node Dates, Go, Swift, Java, Ruby).
_MS_THRESHOLD = 1e11

# The operators each kind of profile accepts (ingestion-api.md §4.3, §5).
# Groups: Mixpanel's docs say $add and $append are not supported for group
# profiles (D-profiles), and no SDK sends them.
_PEOPLE_OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete")
_GROUP_OPS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
_PEOPLE_OP_SET = frozenset(_PEOPLE_OPS)
_OP_PREFIXES = {op: op + "." for op in _PEOPLE_OPS}  # field names in refusals: `$set.name`
_GROUP_OP_SET = frozenset(_GROUP_OPS)
# Operators that create the profile when it does not exist yet.
_CREATING_OPS = frozenset(("$set", "$set_once", "$add", "$append", "$union"))

# Mixpanel's ingestion limits (R-track, R-import, D-types, D-profiles; see
# ingestion-api.md §11 and the README's coverage table for the choices).
_MAX_BATCH = 2000                      # records per request
_MAX_EVENT_BYTES = 1024 * 1024         # one event's JSON ("smaller than 1MB")
_MAX_PROPERTIES = 255                  # "fewer than 255 properties"
_MAX_ITEMS = 255                       # keys of a nested object, items of an array
_MAX_DEPTH = 3                         # nesting depth of object properties
_MAX_COLLECTION_BYTES = 8 * 1024       # a list or object event property
_MAX_PROFILE_COLLECTION_BYTES = 256 * 1024
_MAX_PROFILE_PROPERTIES = 2000
_MAX_STRING = 255                      # longer strings and names are truncated
_TRACK_MAX_AGE = 5 * 86400             # /track: "last 5 days only"
_IMPORT_MIN_TIME = 31536000            # /import: not before 1971-01-01T00:00:00Z
_IMPORT_MAX_AHEAD = 3600               # /import: not more than 1 h in the future
_CLUSTER_CAP = 500                     # Original ID Merge: ids per identity cluster
# Placeholder ids Mixpanel refuses as distinct_id or $insert_id (R-import;
# compared case-insensitively, as AK's copy of the server list does).
_PLACEHOLDER_IDS = frozenset((
    "00000000-0000-0000-0000-000000000000", "anon", "anonymous", "nil", "none", "null",
    "n/a", "na", "undefined", "unknown", "<nil>", "0", "-1", "true", "false", "[]", "{}",
    "lmy47d"))
# Only a string of one of these lengths can be a placeholder (lowercasing
# keeps the length of every string that lowercases to ASCII).
_PLACEHOLDER_LENGTHS = frozenset(map(len, _PLACEHOLDER_IDS))
_INSERT_ID_RE = re.compile(r"[A-Za-z0-9-]{1,36}")  # used with fullmatch
_UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.I)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# JSON value types, for checks made in C (`map(type, ...)`): the scalars need
# no rule beyond a string's length; `$add` takes numbers (not booleans).
_SCALARS = frozenset((str, int, float, bool, type(None)))
_NON_STRINGS = _SCALARS - {str}
_STRINGS = frozenset((str,))
_NUMBERS = frozenset((int, float))
_IDENTITY_EVENTS = frozenset(("$identify", "$create_alias", "$merge"))
_SIMPLIFIED_IDENTITY_ERROR = ("identity events are not allowed when project is using "
                              "simplified identity management")

# The toolkit (README "Test toolkit").
_JOURNAL_SIZE = 1000                   # requests kept in the journal by default
_JOURNAL_BODY = 2000                   # characters of a response body kept per entry
_JOURNAL_VALUE = 2000                  # characters of a query string or a header value kept
_JOURNAL_RECORDS = 20000               # records kept across the journal's entries
_JOURNAL_TEXT = 64 * 1024 * 1024       # characters of the text they came in, across the entries
_SNAPSHOT_FORMAT = "mixpanel_fake/1"
_SECRET_PARAMS = frozenset(("api_key", "api_secret", "secret", "sig", "password"))
# Rate limits, off unless configured: name -> (what is counted, window in s).
_RATE_LIMITS = {"events_per_minute": ("events", 60), "queries_per_hour": ("queries", 3600),
                "exports_per_second": ("exports", 1), "exports_per_hour": ("exports_hour", 3600),
                "concurrent_queries": ("concurrent", None)}

# The 1x1 transparent GIF that `img=1` answers with (pixel tracking).
_PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
# A JSONP callback name: the browser SDK uses `mixpanel._jsc["..."]` or
# `(function(){})`; anything else is refused rather than reflected.
_CALLBACK_RE = re.compile(r"[\w$.\[\]\"'(){}]{1,256}")
# Standard or URL-safe base64 alphabet, padded.
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


# =============================================================================
# Errors
# =============================================================================


class ApiError(Exception):
    """An answer for the client, raised by a handler to end the request.

    ``body`` is a dict or list (sent as JSON), ``str`` or ``bytes``.
    """

    def __init__(self, status: int, body: Any, content_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


class WaitTimeout(AssertionError):
    """A wait for records ended before they arrived; the message says what did."""


class ExpressionError(ValueError):
    """A `where`/`on`/`selector` expression that cannot be parsed or run.

    ``message`` says what was wrong and what was expected; ``position`` is
    the 0-based offset in ``expression`` (None when it is not about one).
    """

    def __init__(self, message: str, expression: str = "", position: int | None = None):
        self.message = message
        self.expression = expression
        self.position = position
        if position is None:
            text = message
        elif position >= len(expression):
            text = f"{message} (at end of expression)"
        else:
            text = f"{message} (at column {position + 1})"
        super().__init__(text)


class _Reject(Exception):
    """One record refused: `field` names what was wrong, `message` says why."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class _PayloadError(Exception):
    """The request as a whole could not be decoded into records."""


# =============================================================================
# Store: projects, their state, and the one lock
# =============================================================================


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> datetime.tzinfo | None:
    """The project timezone (stdlib zoneinfo, which needs the system's tz
    database or the `tzdata` package); None for an unknown name."""
    if name in ("UTC", "Etc/UTC"):
        return datetime.timezone.utc
    try:
        import zoneinfo  # imported lazily: start-up does not need it
        return zoneinfo.ZoneInfo(name)
    except Exception:  # an unknown name, or no tz database
        return None


def _derive_project_id(token: str) -> int:
    """A stable 7-digit project id for a token (same token, same id, every run)."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    return 1000000 + int.from_bytes(digest[:4], "big") % 9000000


# --- tracking plans (a toolkit feature; Mixpanel's Lexicon is not emulated) ----

_PLAN_TYPES = {"string": (str,), "number": (int, float), "boolean": (bool,), "list": (list,),
               "object": (dict,), "any": (object,)}


def _check_plan(plan: Any) -> dict | None:
    """A tracking plan such as {"events": {"Signed Up": {"required": {"plan":
    "string"}, "optional": {...}, "additional_properties": true}},
    "additional_events": false}; ValueError names what is wrong."""
    if plan is None:
        return None
    if not isinstance(plan, dict) or not isinstance(plan.get("events"), dict):
        raise ValueError('a tracking plan is {"events": {name: {"required": {...}, "optional": {...}}}}')
    unknown = set(plan) - {"events", "additional_events"}
    if not isinstance(plan.get("additional_events", True), bool):
        raise ValueError("additional_events is true or false")
    if unknown:
        raise ValueError(f"unknown tracking plan keys: {', '.join(sorted(unknown))}")
    for name, spec in plan["events"].items():
        if not isinstance(spec, dict) or set(spec) - {"required", "optional", "additional_properties"}:
            raise ValueError(f"tracking plan event {name!r}: keys are required, optional, "
                             "additional_properties")
        if not isinstance(spec.get("additional_properties", True), bool):
            raise ValueError(f"tracking plan event {name!r}: additional_properties is true or false")
        for part in ("required", "optional"):
            types = spec.get(part, {})
            if not isinstance(types, dict) or any(not isinstance(t, str) or t not in _PLAN_TYPES
                                                  for t in types.values()):
                raise ValueError(f"tracking plan event {name!r}: {part} maps property names to one of "
                                 f"{', '.join(_PLAN_TYPES)}")
    return plan


def _plan_violations(plan: dict, name: str, props: dict) -> list[str]:
    """What an event does that its tracking plan does not allow."""
    spec = plan["events"].get(name)
    if spec is None:
        if plan.get("additional_events", True) is False:
            return [f"event {name!r} is not in the tracking plan"]
        return []
    problems = []
    required, optional = spec.get("required", {}), spec.get("optional", {})
    for prop, kind in list(required.items()) + list(optional.items()):
        if prop not in props:
            if prop in required:
                problems.append(f"missing required property {prop!r} ({kind})")
            continue
        value = props[prop]
        types = _PLAN_TYPES[kind]
        if not isinstance(value, types) or (kind == "number" and isinstance(value, bool)):
            problems.append(f"property {prop!r} should be {kind}, got {_kind(value)}")
    if spec.get("additional_properties", True) is False:
        for prop in props:
            if prop not in required and prop not in optional and not _is_default_property(prop):
                problems.append(f"property {prop!r} is not in the tracking plan")
    return problems


def _is_default_property(name: str) -> bool:
    """Mixpanel's and the SDKs' own properties, which plans do not list."""
    return name.startswith(("$", "mp_")) or name in ("token", "time", "distinct_id")


# --- feature flag definitions (ingestion-api.md §9; sdks.md §1.4) -----------------

def _depth(value: Any) -> int:
    """How deeply a JSON value nests (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _fraction(value: Any) -> bool:
    """A share of contexts: a finite number from 0 to 1 (not a boolean)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and 0 <= value <= 1)


def _check_flag(flag: Any, project_id: Any) -> dict:
    """A flag definition in the shape /flags/definitions serves, checked so
    that the SDKs can read back whatever the fake accepts."""
    if not isinstance(flag, dict) or not isinstance(flag.get("key"), str) or not flag["key"]:
        raise ValueError("a flag is a JSON object with a key")
    if _depth(flag) > _LOGIC_MAX_DEPTH:
        raise ValueError(f"flag {flag['key']!r}: nested more than {_LOGIC_MAX_DEPTH} levels deep")
    try:
        json.dumps(flag, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"flag {flag['key']!r} is not JSON the SDKs can read "
                         f"(NaN, infinity, a lone surrogate, a huge integer?): {exc}") from None
    ruleset = flag.get("ruleset")
    if not isinstance(ruleset, dict) or not isinstance(ruleset.get("variants"), list) or \
            not ruleset["variants"] or not isinstance(ruleset.get("rollout", []), list):
        raise ValueError(f"flag {flag['key']!r}: ruleset needs variants (a non-empty list) and rollout")
    for variant in ruleset["variants"]:
        if not isinstance(variant, dict) or not isinstance(variant.get("key"), str):
            raise ValueError(f"flag {flag['key']!r}: each variant needs a key")
    for variant in ruleset["variants"]:
        if not _fraction(variant.get("split", 0)):
            raise ValueError(f"flag {flag['key']!r}: a variant's split is a number from 0 to 1")
    for rollout in ruleset.get("rollout", []):
        percentage = rollout.get("rollout_percentage") if isinstance(rollout, dict) else None
        if not _fraction(percentage):
            raise ValueError(f"flag {flag['key']!r}: each rollout needs a rollout_percentage from 0 to 1")
        splits = rollout.get("variant_splits") or {}
        if not isinstance(splits, dict) or not all(_fraction(v) for v in splits.values()):
            raise ValueError(f"flag {flag['key']!r}: variant_splits maps variant keys to numbers from 0 to 1")
        override = rollout.get("variant_override")
        if override is not None and not (isinstance(override, dict) and isinstance(override.get("key"), str)):
            raise ValueError(f"flag {flag['key']!r}: variant_override is {{\"key\": variant key}} or null")
        legacy = rollout.get("runtime_evaluation_definition") or {}
        if not isinstance(legacy, dict) or not all(isinstance(v, str) for v in legacy.values()):
            raise ValueError(f"flag {flag['key']!r}: runtime_evaluation_definition maps names to strings")
    test = ruleset.get("test")
    if test is not None and not isinstance(test, dict) or test and (
            not isinstance(test.get("users"), dict)
            or not all(isinstance(v, str) for v in test["users"].values())):
        raise ValueError(f"flag {flag['key']!r}: ruleset.test is {{\"users\": {{distinct_id: variant key}}}}")
    if not isinstance(flag.get("context", "distinct_id"), str) or not flag.get("context", "distinct_id"):
        raise ValueError(f"flag {flag['key']!r}: context is the name of a context key")
    if flag.get("hash_salt") is not None and not isinstance(flag["hash_salt"], str):
        raise ValueError(f"flag {flag['key']!r}: hash_salt is a string")
    full = {"id": str(flag.get("id", flag["key"])), "name": flag.get("name", flag["key"]),
            "key": flag["key"], "status": flag.get("status", "enabled"), "project_id": project_id,
            "workspace_id": flag.get("workspace_id"), "context": flag.get("context", "distinct_id"),
            "experiment_id": flag.get("experiment_id"),
            "is_experiment_active": flag.get("is_experiment_active"),
            "ruleset": {"variants": [dict(variant, value=variant.get("value"),
                                          is_control=bool(variant.get("is_control", False)),
                                          split=variant.get("split", 0.0))
                                     for variant in ruleset["variants"]],
                        "rollout": ruleset.get("rollout", []),
                        "test": ruleset.get("test") or {"users": {}}}}
    if "hash_salt" in flag:
        full["hash_salt"] = flag["hash_salt"]
    return full




def _check_flags(flags: Any, project_id: Any) -> list[dict]:
    """A project's flag definitions, checked; keys must be unique."""
    if flags is None:
        return []
    if not isinstance(flags, list):
        raise ValueError("flags is a list of flag definitions")
    checked = [_check_flag(flag, project_id) for flag in flags]
    keys = [flag["key"] for flag in checked]
    if len(set(keys)) != len(keys):
        raise ValueError("two flags share a key")
    return checked


class Project:
    """A Mixpanel project: its token, id, secret and service accounts.

    ``service_accounts`` maps service-account username to secret (a dict, or a
    list of ``(username, secret)`` pairs).  ``id_merge`` is "simplified"
    (Mixpanel's default since 2024) or "original".
    """

    def __init__(self, token: str, project_id: int | str | None = None,
                 api_secret: str | None = None, service_accounts: Any = None,
                 timezone: str = "UTC", id_merge: str = "simplified",
                 tracking_plan: dict | None = None, plan_enforce: bool = False,
                 flags: list | None = None, sdk_config: dict | None = None):
        if not isinstance(token, str) or not token:
            raise ValueError("a project needs a non-empty string token")
        if id_merge not in ("simplified", "original"):
            raise ValueError("id_merge must be 'simplified' or 'original'")
        if _zone(timezone) is None:
            raise ValueError(f"unknown timezone {timezone!r} (an IANA name such as 'Europe/Paris')")
        self.token = token
        self.project_id = _derive_project_id(token) if project_id is None else project_id
        self.api_secret = token if api_secret is None else api_secret
        self.service_accounts = dict(service_accounts or {})
        self.timezone = timezone
        self.id_merge = id_merge
        self.tracking_plan = _check_plan(tracking_plan)
        self.plan_enforce = bool(plan_enforce)
        self.flags = _check_flags(flags, self.project_id)
        if sdk_config is not None and not isinstance(sdk_config, dict):
            raise ValueError("sdk_config is a JSON object of browser SDK settings")
        self.sdk_config = dict(sdk_config or {})  # what /settings serves (browser SDK)

    def __repr__(self) -> str:
        # Never show the secret or service-account secrets.
        return (f"Project(token={self.token!r}, project_id={self.project_id!r}, "
                f"timezone={self.timezone!r}, id_merge={self.id_merge!r})")

    def settings(self) -> dict[str, Any]:
        """Everything that makes this project, secrets included (snapshots)."""
        return {"token": self.token, "project_id": self.project_id, "api_secret": self.api_secret,
                "service_accounts": dict(self.service_accounts), "timezone": self.timezone,
                "id_merge": self.id_merge, "tracking_plan": self.tracking_plan,
                "plan_enforce": self.plan_enforce, "flags": self.flags,
                "sdk_config": self.sdk_config}

    def describe(self) -> dict[str, Any]:
        """What the inspection API shows of a project: no secrets."""
        return {"token": self.token, "project_id": self.project_id,
                "timezone": self.timezone, "id_merge": self.id_merge,
                "service_accounts": sorted(self.service_accounts)}


class _Identity:
    """One project's identity graph: which distinct_ids are one person.

    Each cluster of two or more ids has one canonical id (the README's
    "Identity" section says which); an id outside any cluster is its own.
    """

    __slots__ = ("canonical", "members", "device_owner", "identified", "aliases")

    def __init__(self) -> None:
        self.canonical: dict[str, str] = {}       # id -> canonical id (clusters only)
        self.members: dict[str, list[str]] = {}   # canonical id -> every id in it
        self.device_owner: dict[str, str] = {}    # Simplified: device id -> $user_id
        self.identified: dict[str, str] = {}      # Original: $anon_id -> $identified_id
        self.aliases: dict[str, str] = {}         # Original: alias -> distinct_id

    def resolve(self, distinct_id: str) -> str:
        return self.canonical.get(distinct_id, distinct_id)

    def merge(self, keep: str, other: str, cap: int | None) -> tuple[str, str] | int | None:
        """Join ``other``'s cluster into ``keep``'s, whose canonical id stays.

        Returns ``(kept, absorbed)`` canonical ids, None when both are already
        one cluster, or the would-be size when it exceeds ``cap`` (no change).
        """
        kept, absorbed = self.resolve(keep), self.resolve(other)
        if kept == absorbed:
            return None
        ids = self.members.get(kept, [kept])
        more = self.members.pop(absorbed, [absorbed])
        if cap is not None and len(ids) + len(more) > cap:
            if len(more) > 1:
                self.members[absorbed] = more
            return len(ids) + len(more)
        self.members[kept] = ids + more
        for member in self.members[kept]:
            self.canonical[member] = kept
        return kept, absorbed


class _ProjectState:
    """Everything one project holds; a reset swaps the whole object out.

    Events are kept once, as the dicts decoded from the request (never
    mutated after they are stored); ``event_ids`` runs beside them.  Profiles
    are replaced, never changed in place, so a reader holding one needs no lock.
    """

    __slots__ = ("events", "event_ids", "profiles", "groups", "rejected", "identity",
                 "sessions", "funnels", "cohorts", "annotations", "insights", "recordings")

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.event_ids: list[int] = []
        self.profiles: dict[str, dict] = {}
        self.groups: dict[tuple[str, str], dict] = {}
        self.rejected: list[dict] = []
        self.identity = _Identity()
        # What the query API reads besides events: frozen engage result sets,
        # and the saved funnels, cohorts, annotations and reports a test made.
        self.sessions: dict[str, list] = {}
        self.funnels: dict[int, dict] = {}
        self.cohorts: dict[str, dict] = {}
        self.annotations: dict[int, dict] = {}
        self.insights: dict[int, dict] = {}
        self.recordings: list[dict] = []  # session-replay batches (/record)


# One validated /engage or /groups update, waiting for the lock: a plain
# tuple (made by the thousand per batch, so no class):
# (token, key, ops, last_seen, ignore_alias, index, record).
_Update = tuple

# Read in C over a batch's records (`Store.add_events`, `_named_tokens`).
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_EVENT_NAME = operator.itemgetter("event")
_PROPERTIES_OF = operator.itemgetter("properties")


class Store:
    """All projects and their state behind one lock.

    Handlers decode and validate outside the lock and take it only to append
    or swap; readers copy references under it and encode outside it.
    """

    def __init__(self, projects: list[Project] | None = None,
                 clock: Callable[[], float] | None = None, strict_auth: bool = False,
                 journal_size: int = _JOURNAL_SIZE, max_events: int | None = None,
                 rate_limits: dict | None = None):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.projects: dict[str, Project] = {}
        self.states: dict[str, _ProjectState] = {}
        self.errors: list[BaseException] = []
        self._clock = clock or time.time
        self._pinned: float | None = None
        self._next_id = 1
        # Bumped on every change, so waiters can tell a change from a timeout.
        self.version = 0
        # Strict auth: only configured projects and credentials (README).
        self.strict_auth = strict_auth
        # The request journal: a bounded ring of what came in and went out.
        if isinstance(journal_size, bool) or not isinstance(journal_size, int) or journal_size < 1:
            raise ValueError("journal_size must be a whole number, 1 or more")
        self.journal: collections.deque = collections.deque(maxlen=journal_size)
        # Entries still holding records, oldest first, and how many records
        # and characters of text they hold: past _JOURNAL_RECORDS or
        # _JOURNAL_TEXT the oldest let theirs go, so the journal is bounded in
        # memory, not only in entries.
        self._journal_holding: collections.deque = collections.deque()
        self._journal_records = 0
        self._journal_text = 0
        self.journal_seq = 0
        self.reset_seq = 0  # the journal's seq at the last reset
        self.faults: list[dict] = []
        if max_events is not None and (isinstance(max_events, bool) or not isinstance(max_events, int)
                                       or max_events < 1):
            raise ValueError("max_events must be a whole number, 1 or more")
        self.max_events = max_events
        self.dropped = 0  # events dropped to honour max_events
        self.rate_limits = _check_rate_limits(rate_limits or {})
        self._rate_windows: dict[tuple, collections.deque] = {}
        self._running: dict[str, int] = {}
        self.seed: dict | None = None  # the state reset() returns to
        self.log_sink: Callable[[str], None] | None = None
        self.stopping = threading.Event()  # set by stop(): waits and fault delays end
        self.state_file: str | None = None
        for project in projects or ():
            self.add_project(project)

    # --- time ---------------------------------------------------------------

    def now(self) -> float:
        """The project clock: pinned by set_time(), else the clock callable."""
        pinned = self._pinned
        return self._clock() if pinned is None else pinned

    def set_time(self, ts: float | None) -> None:
        """Pin the clock at epoch seconds (or milliseconds, by magnitude)."""
        self._pinned = None if ts is None else float(_normalize_time(ts))

    # --- projects -----------------------------------------------------------

    def add_project(self, project: Project) -> Project:
        with self.lock:
            self.projects[project.token] = project
            self.states.setdefault(project.token, _ProjectState())
        return project

    def _project_locked(self, token: str) -> tuple[Project, _ProjectState]:
        """The project for a token, created on first use (lock held)."""
        project = self.projects.get(token)
        if project is None:
            project = self.projects[token] = Project(token)
        state = self.states.get(token)
        if state is None:
            state = self.states[token] = _ProjectState()
        return project, state

    def project_by_credentials(self, username: str, password: str,
                               project_id: str | None) -> str | None:
        """Resolve Basic credentials to a token (README: "Credentials").

        Order: a known token; a known api_secret; a service account together
        with ``project_id``; else an unknown username with an empty password
        is taken as a token (relaxed mode creates its project on first use).
        """
        with self.lock:
            if username in self.projects and (not self.strict_auth or not password):
                return username
            for project in self.projects.values():
                if project.api_secret == username and (not self.strict_auth or not password):
                    return project.token
            if project_id is not None:
                for project in self.projects.values():
                    if (str(project.project_id) == project_id
                            and project.service_accounts.get(username) == password):
                        return project.token
        if username and not password and not self.strict_auth:
            return username
        return None

    def project_by_id(self, project_id: str) -> str | None:
        with self.lock:
            for project in self.projects.values():
                if str(project.project_id) == project_id:
                    return project.token
        return None

    # --- writes -------------------------------------------------------------

    def add_events(self, accepted: list[tuple[str, dict]], rejected: list[dict]) -> None:
        """Store accepted events and refused records in one critical section.

        Identity events and `$user_id`+`$device_id` pairs update the project's
        identity graph here, in arrival order.
        """
        dropped: list = []  # trimmed-off events, freed after the lock is let go
        with self.lock:
            token = accepted[0][0] if accepted else None
            if (token is not None and self.max_events is None and len(set(map(_FIRST, accepted))) == 1
                    and _IDENTITY_EVENTS.isdisjoint(map(_EVENT_NAME, map(_SECOND, accepted)))
                    and not any(map(operator.contains, map(_PROPERTIES_OF, map(_SECOND, accepted)),
                                    itertools.repeat("$user_id")))):
                # The usual batch, stored in C: one project's events, none an
                # identity event or with a `$user_id` (so no identity pair).
                state = self._project_locked(token)[1]
                state.events.extend(map(_SECOND, accepted))
                state.event_ids.extend(range(self._next_id, self._next_id + len(accepted)))
                self._next_id += len(accepted)
                accepted_one_by_one = ()
            else:
                accepted_one_by_one = accepted
            for token, event in accepted_one_by_one:
                project, state = self._project_locked(token)
                props = event["properties"]
                if event["event"] in _IDENTITY_EVENTS or (
                        "$user_id" in props and "$device_id" in props):
                    try:
                        _apply_identity(project.id_merge, state, event)
                    except Exception as exc:  # a bug in the fake: store the event, report it
                        self.errors.append(exc)
                state.events.append(event)
                state.event_ids.append(self._next_id)
                self._next_id += 1
                if self.max_events is not None and len(state.events) > self.max_events:
                    dropped.append(self._trim_locked(state))
            self._reject_locked(rejected)
            self._changed_locked()
        del dropped
        if self.log_sink is not None:
            _log_records(self.log_sink, accepted, rejected)

    def _trim_locked(self, state: _ProjectState) -> tuple[list, list]:
        """Drop the oldest events, down to 90% of max_events, in new lists
        (readers iterating the old ones are not disturbed).  Returns the old
        lists, for the caller to let go once the lock is released."""
        keep = max(1, int(self.max_events * 0.9))  # the newest event always stays
        drop = len(state.events) - keep
        old = (state.events, state.event_ids)
        state.events = state.events[drop:]
        state.event_ids = state.event_ids[drop:]
        self.dropped += drop
        return old

    def _changed_locked(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def _reject_locked(self, rejected: list[dict]) -> None:
        for record in rejected:
            record["seq"] = self._next_id
            self._next_id += 1
            token = record["project"]
            if token is None or (self.strict_auth and token not in self.projects):
                # No project could be named: keep it where a global read sees it.
                self.states.setdefault("", _ProjectState()).rejected.append(record)
            else:
                self._project_locked(token)[1].rejected.append(record)

    def apply_profile_updates(self, kind: str, updates: list[_Update], rejected: list[dict],
                              endpoint: str, now: float) -> int:
        """Apply profile or group updates in batch order, then keep refusals.

        In Original ID Merge projects a profile update goes to the canonical
        id of its `$distinct_id`'s cluster, unless `$ignore_alias` is set.
        Returns how many updates were applied.
        """
        applied = 0
        token = table = identity = None
        with self.lock:
            for update_token, key, ops, last_seen, ignore_alias, index, record in updates:
                if update_token != token:  # a batch is mostly one project's
                    token = update_token
                    project, state = self._project_locked(token)
                    table = state.profiles if kind == "people" else state.groups
                    original = kind == "people" and project.id_merge == "original"
                    identity = state.identity if original else None
                if identity is not None and not ignore_alias:
                    key = identity.resolve(key)
                try:
                    error = _apply_ops(table, key, ops, last_seen)
                except Exception as exc:  # a bug in the fake: keep going, report it
                    self.errors.append(exc)
                    error = f"mixpanel_fake internal error: {type(exc).__name__}: {exc}"
                if error is None:
                    applied += 1
                else:
                    prefix = "Engage API error: " if kind == "people" else "Groups API error: "
                    rejected.append(_rejection(endpoint, token, index, record,
                                               _Reject(None, prefix + error), now))
            self._reject_locked(rejected)
            self._changed_locked()
        if self.log_sink is not None:
            refused = {id(r["record"]) for r in rejected}
            for update_token, *_, record in updates:
                if id(record) not in refused:
                    self.log_sink(_dumps({"accepted": True, "project": update_token,
                                          "update": record}).decode("utf-8", "replace"))
            _log_records(self.log_sink, [], rejected)
        return applied

    def reset(self, project: str | None = None, empty: bool = False) -> None:
        """Back to the seed state (the loaded state file), or to nothing with
        ``empty``; of one project or of all.  The projects stay known, the
        journal stays, faults go.  Old state is freed off the caller's path."""
        seed = None if empty or self.seed is None else _read_snapshot(self.seed)[1]
        with self.lock:
            old = self.states
            if project is None:
                fresh = {token: _ProjectState() for token in self.projects}
                if seed:
                    fresh.update(seed)
                self.states = fresh
                self.faults = []
            else:
                self.states = dict(old)
                self.states[project] = (seed or {}).get(project) or _ProjectState()
                self.faults = [f for f in self.faults if f["project"] != project]
            self._rate_windows = {key: value for key, value in self._rate_windows.items()
                                  if project is not None and key[0] != project}
            self.reset_seq = self.journal_seq
            self._changed_locked()
        _discard(old)

    # --- snapshots ------------------------------------------------------------

    def snapshot(self, project: str | None = None) -> dict:
        """The state of one project, or of all, as JSON-ready data."""
        with self.lock:
            tokens = [t for t in self.projects if project is None or t == project]
            projects = [self.projects[t] for t in tokens]
            states = {t: _state_refs(self.states.get(t) or _ProjectState()) for t in tokens}
        return {"format": _SNAPSHOT_FORMAT, "taken_at": self.now(),
                "projects": [p.settings() for p in projects],
                "states": {t: _state_to_data(refs) for t, refs in states.items()}}

    def restore(self, snapshot: dict) -> None:
        """Put a snapshot's projects and state back (others are untouched)."""
        projects, states = _read_snapshot(snapshot)
        with self.lock:
            old = self.states
            self.states = dict(old)
            for project in projects:
                self.projects[project.token] = project
                self.states[project.token] = states.get(project.token) or _ProjectState()
            # Ids go on from the highest restored one: arrival order stays true.
            for state in states.values():
                highest = max(state.event_ids[-1:] + [r.get("seq", 0) for r in state.rejected[-1:]],
                              default=0)
                self._next_id = max(self._next_id, highest + 1)
            self._changed_locked()
        _discard(old)

    # --- journal, faults and rate limits --------------------------------------

    def log_request(self, entry: dict) -> None:
        let_go: list = []  # entries and records leaving the journal, freed after the lock
        with self.lock:
            self.journal_seq += 1
            entry["seq"] = self.journal_seq
            if len(self.journal) == self.journal.maxlen:  # the oldest entry goes
                let_go.append(self.journal[0])
                holding = self._journal_holding
                if holding and holding[0] is self.journal[0]:
                    self._journal_let_go_locked(holding.popleft()["records"])
            self.journal.append(entry)
            records = entry.get("records")
            if records:
                self._journal_holding.append(entry)
                self._journal_records += len(records)
                self._journal_text += len(records.text) if isinstance(records, _SentRecords) else 0
                while ((self._journal_records > _JOURNAL_RECORDS or self._journal_text > _JOURNAL_TEXT)
                       and len(self._journal_holding) > 1):
                    oldest = self._journal_holding.popleft()
                    self._journal_let_go_locked(oldest["records"])
                    oldest["records_dropped"] = len(oldest["records"])
                    let_go.append(oldest["records"])
                    oldest["records"] = None
            self._changed_locked()
        del let_go

    def _journal_let_go_locked(self, records: list | _SentRecords) -> None:
        self._journal_records -= len(records)
        self._journal_text -= len(records.text) if isinstance(records, _SentRecords) else 0

    def add_fault(self, fault: dict) -> int:
        with self.lock:
            fault["id"] = self.new_id()
            self.faults.append(fault)
        return fault["id"]

    def take_fault(self, path: str, token: str | None) -> dict | None:
        """The first fault that fires for this request, consumed (lock held
        briefly; the fault's delay and effects happen after)."""
        if not self.faults:
            return None
        now = time.monotonic()
        with self.lock:
            for fault in list(self.faults):
                if fault["expires_at"] is not None and now >= fault["expires_at"]:
                    self.faults.remove(fault)
                    continue
                if fault["path"] != path and (fault["path"] != "*" or path == "/health"
                                              or path.startswith("/__parlel/")):
                    continue  # "*" never blocks the control API a test needs to recover
                if fault["project"] is not None and fault["project"] != token:
                    continue
                if fault["probability"] < 1 and fault["rng"].random() >= fault["probability"]:
                    continue
                fault["fired"] += 1
                if fault["times"] is not None:
                    fault["times"] -= 1
                    if fault["times"] <= 0:
                        self.faults.remove(fault)
                return dict(fault)
        return None

    def rate_check(self, token: str, kinds: tuple, cost: int = 1) -> tuple[int, int, float, str] | None:
        """Count ``cost`` against a project's limits of ``kinds``; when that
        would pass one, (used, limit, seconds until room, kind), none counted."""
        now = time.monotonic()
        with self.lock:
            windows = []
            for kind in kinds:
                limit_window = self.rate_limits.get(kind)
                if limit_window is None or limit_window[1] is None:
                    continue
                limit, window = limit_window
                stamps = self._rate_windows.setdefault((token, kind), collections.deque())
                while stamps and stamps[0][0] <= now - window:
                    stamps.popleft()
                used = sum(n for _, n in stamps)
                if used + cost > limit:
                    wait = stamps[0][0] + window - now if stamps else window
                    return used, limit, max(wait, 0.001), kind
                windows.append(stamps)
            for stamps in windows:
                stamps.append((now, cost))
        return None

    def running(self, token: str, change: int) -> int:
        """Queries now running for a project, after adding ``change``."""
        with self.lock:
            count = self._running.get(token, 0) + change
            self._running[token] = count
            return count

    def stats(self, project: str | None = None) -> dict:
        with self.lock:
            states = self._states(project)
            return {"projects": len(self.projects) if project is None else len(states),
                    "events": sum(len(s.events) for _, s in states),
                    "profiles": sum(len(s.profiles) for _, s in states),
                    "groups": sum(len(s.groups) for _, s in states),
                    "rejected": sum(len(s.rejected) for _, s in states),
                    "dropped_events": self.dropped, "max_events": self.max_events,
                    "requests_journaled": self.journal_seq, "journal_size": self.journal.maxlen,
                    "faults": len(self.faults), "strict_auth": self.strict_auth}

    def clear_events(self, project: str | None = None) -> None:
        dropped = []
        with self.lock:
            for token, state in self.states.items():
                if project is None or token == project:
                    dropped += [state.events, state.event_ids]
                    state.events = []
                    state.event_ids = []
            self._changed_locked()
        _discard(dropped)

    def new_id(self) -> int:
        """The next number of the fake's one sequence (lock held)."""
        self._next_id += 1
        return self._next_id

    def record_error(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)

    # --- reads (references copied under the lock, never encoded under it) ---

    def _states(self, project: str | None) -> list[tuple[str, _ProjectState]]:
        if project is None:
            return list(self.states.items())
        state = self.states.get(project)
        return [] if state is None else [(project, state)]

    def event_rows(self, project: str | None = None) -> list[tuple[int, str, dict]]:
        """``(id, token, event)`` in arrival order."""
        with self.lock:
            parts = [(list(s.event_ids), token, list(s.events)) for token, s in self._states(project)]
        rows = [(i, token, e) for ids, token, events in parts for i, e in zip(ids, events)]
        if len(parts) > 1:
            rows.sort(key=_first)
        return rows

    def profile_rows(self, kind: str, project: str | None = None) -> list[tuple[str, Any, dict]]:
        """``(token, key, properties)`` for people or groups."""
        with self.lock:
            parts = [(token, dict(s.profiles if kind == "people" else s.groups))
                     for token, s in self._states(project)]
        return [(token, key, props) for token, table in parts for key, props in table.items()]

    def canonical(self, distinct_id: str, project: str | None = None) -> str:
        with self.lock:
            for _, state in self._states(project):
                found = state.identity.canonical.get(distinct_id)
                if found is not None:
                    return found
        return distinct_id

    def recording_rows(self, project: str | None = None) -> list[dict]:
        """Session-replay batches in arrival order (each batch is never changed)."""
        with self.lock:
            parts = [list(s.recordings) for _, s in self._states(project)]
        rows = [r for part in parts for r in part]
        rows.sort(key=lambda row: row["time"])
        return rows

    def rejected_rows(self, project: str | None = None) -> list[dict]:
        with self.lock:
            parts = [list(s.rejected) for _, s in self._states(project)]
        rows = [r for part in parts for r in part]
        if len(parts) > 1:
            rows.sort(key=_by_seq)
        return rows


def _check_rate_limits(limits: dict) -> dict[str, tuple[int, float | None]]:
    """{"queries_per_hour": 60, ...} as {kind: (limit, window)}."""
    checked = {}
    for name, limit in limits.items():
        if name not in _RATE_LIMITS:
            raise ValueError(f"unknown rate limit {name!r}; known: {', '.join(_RATE_LIMITS)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"rate limit {name} must be a whole number, 1 or more")
        kind, window = _RATE_LIMITS[name]
        checked[kind] = (limit, window)
    return checked


def _state_refs(state: _ProjectState) -> dict:
    """What a snapshot needs, copied shallowly under the lock: events and
    profiles are never changed in place, so references are enough."""
    identity = state.identity
    return {"events": list(state.events), "event_ids": list(state.event_ids),
            "profiles": dict(state.profiles), "groups": dict(state.groups),
            "rejected": list(state.rejected),
            "identity": {"canonical": dict(identity.canonical),
                         "members": {k: list(v) for k, v in identity.members.items()},
                         "device_owner": dict(identity.device_owner),
                         "identified": dict(identity.identified), "aliases": dict(identity.aliases)},
            "funnels": dict(state.funnels), "cohorts": dict(state.cohorts),
            "annotations": dict(state.annotations), "insights": dict(state.insights)}


def _state_to_data(refs: dict) -> dict:
    """JSON-ready: group keys as lists, numeric ids as text."""
    data = dict(refs)
    data["groups"] = [[key[0], key[1], props] for key, props in refs["groups"].items()]
    for table in ("funnels", "annotations", "insights"):
        data[table] = {str(k): v for k, v in refs[table].items()}
    return data


def _read_snapshot(snapshot: Any) -> tuple[list[Project], dict[str, _ProjectState]]:
    """Projects and states from a snapshot, every part checked: anything
    malformed is a ValueError naming it, never a store that breaks later."""
    if not isinstance(snapshot, dict) or snapshot.get("format") != _SNAPSHOT_FORMAT:
        raise ValueError(f"not a mixpanel_fake snapshot (format {_SNAPSHOT_FORMAT!r})")
    settings = snapshot.get("projects")
    states = snapshot.get("states", {})
    if not isinstance(settings, list) or not all(isinstance(p, dict) for p in settings):
        raise ValueError("snapshot: projects must be a list of objects")
    if not isinstance(states, dict) or not all(isinstance(v, dict) for v in states.values()):
        raise ValueError("snapshot: states must map tokens to objects")
    try:
        projects = [Project(**p) for p in settings]
        for project in projects:
            if not all(isinstance(k, str) and isinstance(v, str)
                       for k, v in project.service_accounts.items()):
                raise ValueError("service accounts map names to secrets (text)")
        for token, data in states.items():
            _check_state_data(data)
        built = _states_from_snapshot(snapshot)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"snapshot: {exc}") from None
    return projects, built


def _check_state_data(data: dict) -> None:
    events = data.get("events", [])
    if not isinstance(events, list) or not all(
            isinstance(e, dict) and isinstance(e.get("event"), str) and isinstance(e.get("properties"), dict)
            and isinstance(e["properties"].get("time"), (int, float)) for e in events):
        raise ValueError("events must be {event, properties with a numeric time}")
    ids = data.get("event_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(events)
                            or not all(isinstance(i, int) for i in ids)):
        raise ValueError("event_ids must be one whole number per event")
    for table in ("profiles", "funnels", "cohorts", "annotations", "insights", "identity"):
        value = data.get(table, {})
        if not isinstance(value, dict) or (table != "identity" and not all(
                isinstance(v, dict) for v in value.values())):
            raise ValueError(f"{table} must be an object of objects")
    for key in ("funnels", "annotations", "insights"):
        if not all(str(k).lstrip("-").isdigit() for k in data.get(key, {})):
            raise ValueError(f"{key} ids must be whole numbers")
    groups = data.get("groups", [])
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) == 3 and isinstance(g[2], dict) for g in groups):
        raise ValueError("groups must be [group_key, group_id, properties] rows")
    if not isinstance(data.get("rejected", []), list):
        raise ValueError("rejected must be a list")
    identity = data.get("identity", {})
    for part in ("canonical", "members", "device_owner", "identified", "aliases"):
        if not isinstance(identity.get(part, {}), dict):
            raise ValueError(f"identity.{part} must be an object")


def _states_from_snapshot(snapshot: dict) -> dict[str, _ProjectState]:
    """Fresh project states from snapshot data (copies: the snapshot stays reusable)."""
    states = {}
    for token, data in snapshot.get("states", {}).items():
        state = _ProjectState()
        state.events = _copy(data.get("events", []))
        state.event_ids = list(data.get("event_ids") or range(len(state.events)))
        state.profiles = _copy(data.get("profiles", {}))
        state.groups = {(key, group_id): _copy(props) for key, group_id, props in data.get("groups", [])}
        state.rejected = _copy(data.get("rejected", []))
        identity = data.get("identity") or {}
        state.identity.canonical = dict(identity.get("canonical", {}))
        state.identity.members = {k: list(v) for k, v in identity.get("members", {}).items()}
        state.identity.device_owner = dict(identity.get("device_owner", {}))
        state.identity.identified = dict(identity.get("identified", {}))
        state.identity.aliases = dict(identity.get("aliases", {}))
        state.funnels = {int(k): _copy(v) for k, v in data.get("funnels", {}).items()}
        state.cohorts = {str(k): _copy(v) for k, v in data.get("cohorts", {}).items()}
        state.annotations = {int(k): _copy(v) for k, v in data.get("annotations", {}).items()}
        state.insights = {int(k): _copy(v) for k, v in data.get("insights", {}).items()}
        states[token] = state
    return states


class _Reaper:
    """Frees dropped state on one thread of its own, a slice at a time.

    Freeing 100,000 events is one long C call that holds the GIL; done by
    the caller it makes reset() slow, done in one piece on another thread it
    stalls the caller just the same.  The reaper empties containers nobody
    else can see in slices of a few hundred items, letting other threads run
    between them; a container a reader still holds is only let go (the reader
    frees it when done).  One thread for the process, made on first use.
    """

    SLICE = 256

    def __init__(self) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._queue: list = []
        self._busy = False
        self._thread: threading.Thread | None = None

    def put(self, old: Any) -> None:
        with self._ready:
            self._queue.append(old)
            self._busy = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mixpanel-fake:free",
                                                daemon=True)
                self._thread.start()
            self._ready.notify_all()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until everything put so far is freed."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._busy = False
                    self._ready.notify_all()
                    self._ready.wait()
                old = self._queue.pop()
            try:
                self._free(old)
            except Exception:  # freeing must never kill the reaper
                pass
            del old

    def _free(self, old: Any) -> None:
        time.sleep(0.001)  # the caller's passing references are gone by then
        containers = [old]
        del old
        while containers:
            item = containers.pop()
            # 2 = this frame's name for it + getrefcount's own argument.
            if sys.getrefcount(item) > 2:
                continue  # a reader still holds it: the reader frees it when done
            if isinstance(item, list):
                while item:
                    del item[-self.SLICE:]
                    time.sleep(0)  # let the other threads run between slices
            elif isinstance(item, dict):
                containers.append(list(item.values()))
                item.clear()
            elif isinstance(item, (_ProjectState, _Identity)):
                for name in item.__slots__:
                    containers.append(getattr(item, name, None))
                    setattr(item, name, None)
            del item


_REAPER = _Reaper()


def _discard(old: Any) -> None:
    """Free big state off the caller's path, so reset() returns at once."""
    _REAPER.put(old)


def _settle(timeout: float | None = 10) -> bool:
    """Wait until state dropped so far is freed (benchmarks, tests)."""
    return _REAPER.settle(timeout)


def _log_records(sink: Callable[[str], None], accepted: list, rejected: list) -> None:
    """--log-events: one JSON line per accepted or refused record."""
    for token, event in accepted:
        sink(_dumps({"accepted": True, "project": token, "event": event["event"],
                     "properties": event["properties"]}).decode("utf-8", "replace"))
    for record in rejected:
        sink(_dumps({"accepted": False, "stored": record["stored"], "project": record["project"],
                     "endpoint": record["endpoint"], "index": record["index"],
                     "reason": record["reason"], "record": record["record"]}).decode("utf-8", "replace"))


def _first(row: tuple) -> Any:
    return row[0]


def _by_seq(record: dict) -> Any:
    return record["seq"]


# --- profile operators (ingestion-api.md §4.3) ------------------------------


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: true is not 1, but 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _json_key(value: Any) -> Any:
    """A hashable key with `_json_equal`'s equality (true apart from 1)."""
    kind = type(value)
    if kind is str or value is None:
        return value  # a string is its own key: no other key is a string
    if kind is bool:
        return ("bool", value)
    if kind is int or kind is float:
        return ("number", value)
    return ("json", json.dumps(value, sort_keys=True))


def _op_set(props: dict, value: dict) -> None:
    props.update(value)


def _op_set_once(props: dict, value: dict) -> None:
    for name, item in value.items():
        props.setdefault(name, item)


def _op_add(props: dict, value: dict) -> None:
    # A missing property counts as 0; a non-numeric one is left alone, and
    # so is a sum no JSON reader could take (beyond a double's range).
    for name, amount in value.items():
        current = props.get(name, 0)
        kind = type(current)
        if kind is int or kind is float:  # not bool: true is not 1 here
            try:
                total = current + amount
            except OverflowError:
                continue
            if abs(total) <= _MAX_DOUBLE:
                props[name] = total


def _op_append(props: dict, value: dict) -> None:
    # Missing: a one-item list; a non-list value: ignored (Mixpanel docs).
    for name, item in value.items():
        current = props.get(name)
        if current is None and name not in props:
            props[name] = [item]
        elif isinstance(current, list):
            props[name] = current + [item]


def _op_union(props: dict, value: dict) -> None:
    for name, items in value.items():
        current = props.get(name)
        if name not in props:
            merged: list = []
        elif isinstance(current, list):
            merged = list(current)
        else:
            continue
        # Strings are their own keys (`_json_key`): the usual lists, keyed in C.
        seen = set(merged) if _STRINGS.issuperset(map(type, merged)) else set(map(_json_key, merged))
        for item in items:
            key = item if type(item) is str else _json_key(item)
            if key not in seen:
                seen.add(key)
                merged.append(item)
        props[name] = merged


def _op_remove(props: dict, value: dict) -> None:
    # Every occurrence goes (choice: the docs say "the value is removed").
    for name, item in value.items():
        current = props.get(name)
        if isinstance(current, list):
            key = _json_key(item)
            props[name] = [x for x in current if _json_key(x) != key]


def _op_unset(props: dict, value: list) -> None:
    for name in value:
        props.pop(name, None)


_PROFILE_OPS = {
    "$set": _op_set,
    "$set_once": _op_set_once,
    "$add": _op_add,
    "$append": _op_append,
    "$union": _op_union,
    "$remove": _op_remove,
    "$unset": _op_unset,
}


def _apply_ops(table: dict, key: Any, ops: list[tuple[str, Any]],
               last_seen: str | None) -> str | None:
    """Apply one update's operators to ``table[key]`` (lock held).

    The profile is rebuilt, not changed in place, so readers holding the old
    dict see a consistent snapshot.  Returns why the update was refused, if
    it was: a profile holds at most 2000 properties (D-profiles).
    """
    old = table.get(key)
    if len(ops) == 1 and ops[0][0] in (_PROFILE_OPS if old is not None else _CREATING_OPS):
        # The usual update: one operator, on a profile it keeps or makes.
        op, value = ops[0]
        if op == "$set":  # most updates: the profile rebuilt with the values, in one go
            props = {**old, **value} if old is not None else dict(value)
        else:
            props = {} if old is None else dict(old)
            _PROFILE_OPS[op](props, value)
        if last_seen is not None:
            props["$last_seen"] = last_seen
        if len(props) <= _MAX_PROFILE_PROPERTIES:
            error = _list_too_big(op, value, props) if op in _LIST_OPS else None
            if error is None:
                table[key] = props
            return error
    props = None if old is None else dict(old)
    touched = listy = False
    for op, value in ops:
        if op == "$delete":
            props = None
            touched = False
            continue
        if props is None:
            if op not in _CREATING_OPS:
                continue
            props = {}
        _PROFILE_OPS[op](props, value)
        if op in _LIST_OPS:
            listy = True
        touched = True
    if props is None:
        table.pop(key, None)
        return None
    if touched and last_seen is not None:
        props["$last_seen"] = last_seen
    if len(props) > _MAX_PROFILE_PROPERTIES:
        count = len(props) - ("$last_seen" in props)  # Mixpanel's own stamp is not counted
        if count > _MAX_PROFILE_PROPERTIES and len(props) > len(old or ()):
            return f"profile would have {count} properties; the limit is {_MAX_PROFILE_PROPERTIES}"
    for op, value in ops if listy else ():
        error = _list_too_big(op, value, props) if op in _LIST_OPS else None
        if error is not None:
            return error
    table[key] = props
    return None


_LIST_OPS = frozenset(("$append", "$union"))


def _list_too_big(op: str, value: dict, props: dict) -> str | None:
    """Why a list `$append` or `$union` grew is refused: past 256KB (D-types)."""
    for name in value:
        if isinstance(props.get(name), list) and not _fits(props[name], _MAX_PROFILE_COLLECTION_BYTES):
            return (f"'{op}.{name}' is invalid: the list would exceed "
                    f"{_MAX_PROFILE_COLLECTION_BYTES // 1024}KB")
    return None


# --- identity (ingestion-api.md §6; D-idm; failure reasons from Mixpanel's
# identity-merge FAQ) ----------------------------------------------------------


def _identity_failure(props: dict, reason: str, description: str) -> None:
    props["$failure_reason"] = reason
    props["$failure_description"] = description


def _apply_identity(mode: str, state: _ProjectState, event: dict) -> None:
    """Update the identity graph from one event (lock held, arrival order).

    Simplified: the first event carrying both `$device_id` and `$user_id`
    links the device to that user for good; a later pair naming another user
    is marked `$identity_failure_reason: errAnonDistinctIdAssignedAlready`.
    `$identify`, `$create_alias` and `$merge` mean nothing there.  Original:
    those three events join clusters, each under Mixpanel's rules.
    """
    identity = state.identity
    props = event["properties"]
    if mode == "simplified":
        user, device = _id_text(props.get("$user_id")), _id_text(props.get("$device_id"))
        if user is None or device is None:
            return
        owner = identity.device_owner.setdefault(device, user)
        if owner == user:
            identity.merge(user, "$device:" + device, None)
        else:
            props["$identity_failure_reason"] = "errAnonDistinctIdAssignedAlready"
        return
    name = event["event"]
    if name == "$identify":
        known, anon = _identify_ids(props)
        if known == anon:
            _identity_failure(props, "errSameIDs",
                              f"Identified and anon ID are same in the identify request {anon}")
        elif not _UUID4_RE.fullmatch(anon[len("$device:"):] if anon.startswith("$device:") else anon):
            _identity_failure(props, "errAnonDistinctIdNonGUIDForm",
                              f"$anon_distinct_id didn't match expected GUID pattern: {anon}")
        elif identity.identified.get(anon, known) != known:
            _identity_failure(props, "errAnonDistinctIdAssignedAlready",
                              f"$anon_distinct_id already identified: {anon}")
        elif _merge_clusters(state, known, anon, props):
            identity.identified[anon] = known
    elif name == "$create_alias":
        alias, target = props["alias"], props["distinct_id"]
        if identity.aliases.get(alias, target) != target:
            _identity_failure(props, "errAliasAlreadyExists", "alias already exists with the id")
        elif _merge_clusters(state, target, alias, props):
            identity.aliases[alias] = target
    elif name == "$merge":
        first, second = props["$distinct_ids"]
        _merge_clusters(state, first, second, props)


def _identify_ids(props: dict) -> tuple[str | None, str | None]:
    """`$identify`'s two ids, as the HTTP API names them (`$identified_id`,
    `$anon_id`) or as the client SDKs send them (`distinct_id`,
    `$anon_distinct_id`; sdks.md §3.5)."""
    known = _id_text(props.get("$identified_id")) or _id_text(props.get("distinct_id"))
    anon = _id_text(props.get("$anon_id")) or _id_text(props.get("$anon_distinct_id"))
    return known, anon


def _merge_clusters(state: _ProjectState, keep: str, other: str, props: dict) -> bool:
    """Join two Original ID Merge clusters, moving profiles as Mixpanel does.

    If both clusters have a profile, the canonical id's stays and the other
    is hidden; if only the absorbed one has a profile, it moves over.
    """
    outcome = state.identity.merge(keep, other, _CLUSTER_CAP)
    if isinstance(outcome, int):
        _identity_failure(props, "errManyIDs", "too many distinctIDs mapped together, "
                                               f"Cluster size: {outcome} Max limit: {_CLUSTER_CAP}")
        return False
    if outcome is not None:
        kept, absorbed = outcome
        moved = state.profiles.pop(absorbed, None)
        if moved is not None and kept not in state.profiles:
            state.profiles[kept] = moved
    return True


# =============================================================================
# Requests and responses
# =============================================================================


# What keeps `_unquote` from its fast path: a `%` not followed by two hex
# digits, and the characters quoted-printable reads otherwise.
_SLOW_ESCAPES_RE = re.compile(r"%(?![0-9A-Fa-f]{2})|[=\r\n]")


def _unquote(text: str, plus: bool = True, errors: str = "replace") -> str:
    """`urllib.parse.unquote_plus` (or `unquote`), the same answer, faster.

    The stdlib decodes ``%XX`` in a Python loop, the largest cost of a
    /track request; the usual case (ASCII, every ``%`` a valid escape, no
    ``=`` or line ends) is decoded in C by `binascii.a2b_qp` instead.
    """
    if plus and "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    if text.isascii() and not _SLOW_ESCAPES_RE.search(text):
        return binascii.a2b_qp(text.replace("%", "=").encode("ascii")).decode("utf-8", errors)
    return unquote(text, errors=errors)


def _parse_pairs(text: str) -> dict[str, str]:
    """``a=1&b=2`` into names and *still-encoded* values (first one wins).

    Values stay encoded because ``data`` needs two readings: Node batches and
    PHP post raw base64 whose ``+`` must survive, while the Python SDK and the
    browser send URL-encoded JSON where ``+`` is a space.
    """
    pairs: dict[str, str] = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.setdefault(_unquote(name), value)
    return pairs


def _looks_json(body: bytes, content_type: str) -> bool:
    """Raw JSON (or NDJSON) body rather than a form (sdks.md §5.3 step 3)."""
    if "json" in content_type:
        return True
    return body.lstrip()[:1] in (b"[", b"{")


class _Headers:
    """Request headers: case-insensitive names, arrival order, repeated
    names kept; the part of `email.message.Message`'s interface the server
    uses, at a fraction of the stdlib parser's cost per request."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: list[tuple[str, str]]):
        self._items = items
        self._index: dict[str, list[str]] = {}
        for name, value in items:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Any = None) -> Any:
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, failobj: Any = None) -> Any:
        values = self._index.get(name.lower())
        return list(values) if values else failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _HeaderError(Exception):
    """A request head the server refuses: (status, message)."""


# RFC 9110 §5.1: a field name is a token.
_FIELD_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


_KNOWN_NAMES: set = set()  # field names seen valid (a cache: bounded)


def _read_headers(rfile: Any) -> _Headers:
    """The header block of a request, as RFC 9112 §5 frames it, with the
    stdlib's limits (65536 bytes a line, 100 lines: 431 past them)."""
    # Usually the whole block is already buffered: split it in one go.
    buffered = rfile.peek(_MAX_HEADER_LINE) if hasattr(rfile, "peek") else b""
    if buffered.startswith(b"\r\n"):
        end = -2  # no headers at all: the block is the one empty line
    else:
        end = buffered.find(b"\r\n\r\n")
    if end != -1:
        block = buffered[:end + 2] if end >= 0 else b""
        lines = block.split(b"\r\n")[:-1] if block else []
        bare = block.replace(b"\r\n", b"")
        if (len(lines) <= _MAX_HEADERS and b"\n" not in bare and b"\r" not in bare
                and b"\0" not in bare and all(len(line) < _MAX_HEADER_LINE - 1 for line in lines)):
            items = []
            for line in lines:
                text = line.decode("iso-8859-1")
                name, colon, value = text.partition(":")
                if not colon or name not in _KNOWN_NAMES:
                    break  # an odd line: the line-by-line reader below says what
                items.append((name, value.strip(" \t")))
            else:
                rfile.read(end + 4 if end >= 0 else 2)
                return _Headers(items)
    parts: list[tuple[str, list[str]]] = []  # a name and its value's (folded) pieces
    for count in range(_MAX_HEADERS + 1):
        line = rfile.readline(_MAX_HEADER_LINE + 1)
        if len(line) > _MAX_HEADER_LINE:
            raise _HeaderError(431, f"a header line exceeds {_MAX_HEADER_LINE} bytes")
        if line in (b"\r\n", b"\n", b""):
            break
        if count == _MAX_HEADERS:  # folded lines count too, as for the stdlib
            raise _HeaderError(431, f"more than {_MAX_HEADERS} header lines")
        text = line.decode("iso-8859-1")
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        if "\r" in text or "\0" in text:
            # RFC 9112 §2.2, RFC 9110 §5.5: a bare CR (or a NUL) makes the
            # message invalid; read on, it could hide a header from us.
            raise _HeaderError(400, "a header line holds a bare CR or a NUL")
        if text[:1] in (" ", "\t"):
            # Obsolete line folding: RFC 9112 §5.2 lets a server replace it
            # with a space; the first line cannot be a continuation.
            if not parts:
                raise _HeaderError(400, "a header block cannot begin with a continuation line")
            parts[-1][1].append(text.strip(" \t"))
            continue
        name, colon, value = text.partition(":")
        if not colon or not _FIELD_NAME_RE.fullmatch(name):
            raise _HeaderError(400, f"malformed header line: {text[:60]!r}")
        if len(_KNOWN_NAMES) < 10000:
            _KNOWN_NAMES.add(name)
        parts.append((name, [value.strip(" \t")]))
    return _Headers([(name, " ".join(p for p in pieces if p)) for name, pieces in parts])


_UNKNOWN = object()  # not worked out yet


class _Request:
    """One decoded HTTP request, as handlers see it."""

    __slots__ = ("method", "path", "query", "headers", "body", "raw", "is_json", "client", "records",
                 "raw_path", "cleanup", "credentials", "plain_text", "record_kind", "sent")

    def __init__(self, method: str, path: str, query: str, headers: Any,
                 body: bytes, client: str = ""):
        self.method = method
        self.path = path
        self.query = query
        self.records: list | None = None  # what the handler decoded, for the journal
        self.record_kind: str | None = None  # "events", "people" or "groups": where records name a token
        self.raw_path = path  # as the client wrote it (plumbing sets it)
        self.cleanup: list[Callable[[], None]] = []  # run once the answer is sent
        self.credentials: Any = _UNKNOWN  # `_credential_token`'s answer, once asked
        self.plain_text = False  # `_read_records`: its JSON held only ASCII strings
        self.sent: _SentRecords | None = None  # `_read_records`: the text the records came in
        self.headers = headers
        self.body = body
        self.client = client
        content_type = (headers.get("Content-Type") or "").lower()
        self.is_json = bool(body) and _looks_json(body, content_type)
        self.raw = _parse_pairs(query)
        if body and not self.is_json:
            # Form fields override the query string (`verbose`, `ip`, `data`
            # may sit in either place); sendBeacon posts them as text/plain.
            self.raw.update(_parse_pairs(body.decode("utf-8", "surrogateescape")))

    def param(self, name: str, default: str | None = None) -> str | None:
        raw = self.raw.get(name)
        return default if raw is None else _unquote(raw)

    def basic_auth(self) -> tuple[str, str] | None:
        """Basic credentials, base64 or (as Mixpanel also takes) plain text."""
        header = self.headers.get("Authorization") or ""
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic" or not value.strip():
            return None
        value = value.strip()
        try:
            text = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            text = value
        username, _, password = text.partition(":")
        return username, password

    @property
    def host(self) -> str:
        """The host name the client addressed (for `$mp_api_endpoint`)."""
        host = (self.headers.get("Host") or "api.mixpanel.com").strip()
        if host.startswith("["):
            return host[1:].partition("]")[0]
        return host.rpartition(":")[0] if host.count(":") == 1 else host


class _Response:
    """Status, body bytes, content type and extra headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: Any, content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status = status
        self.body = body  # bytes, or an iterator of bytes (streamed)
        self.content_type = content_type
        self.headers = headers or {}


def _dumps(value: Any) -> bytes:
    """Compact JSON with Unicode kept raw.

    Never fails on what a client could have sent: lone surrogates fall back
    to escapes, and a refused record too deep or too big to write is clipped.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (RecursionError, ValueError):
        return json.dumps(_clip(value, 32), separators=(",", ":")).encode("ascii")


def _clip(value: Any, depth: int) -> Any:
    """A copy of a JSON value cut at ``depth`` levels, huge ints as text."""
    if isinstance(value, dict):
        if depth <= 0:
            return "<nested too deep to show>"
        return {k: _clip(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list):
        if depth <= 0:
            return "<nested too deep to show>"
        return [_clip(v, depth - 1) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10000:
        return "<integer too long to show>"
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no infinities
    return value


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts and lists), for the Python API."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, _dumps(value), "application/json", headers)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no number beyond a double's range;
    depth and digit bombs become errors.  (One decoder for all: json.loads
    with hooks builds a new one per call.)"""
    try:
        if not isinstance(text, str):
            return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        if text.startswith("\ufeff"):  # as json.loads words it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _data_text(raw: str) -> tuple[str, bool]:
    """The JSON text of a ``data=`` value (URL-encoded JSON, or URL-encoded
    base64 JSON), and whether it came as base64."""
    # Invalid UTF-8 survives as lone surrogates, refused per field later.
    text = _unquote(raw, errors="surrogateescape").strip()
    if text[:1] in ("{", "["):
        return text, False
    # Base64 has no spaces: a '+' left raw (Node batches, PHP) is a '+'.
    b64 = _unquote(raw, plus=False).strip().replace(" ", "+")
    b64 += "=" * (-len(b64) % 4)
    try:
        if not _BASE64_RE.match(b64):
            raise ValueError(b64)
        decoded = base64.b64decode(b64.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise _PayloadError("data, neither JSON nor base64-encoded JSON") from None
    return decoded.decode("utf-8", "surrogateescape"), True


def _loads_data(text: str, base64_encoded: bool) -> Any:
    """A ``data=`` value's records, or `_PayloadError` worded for its form."""
    try:
        return _loads(text)
    except ValueError as exc:
        where = " in base64 payload" if base64_encoded else ""
        raise _PayloadError(f"data, invalid JSON{where}: {exc}") from None


def _plain_text(text: str) -> bool:
    """Whether every string decoded from this JSON text is ASCII (no byte
    above 127 and no \\u escape), so no string needs the UTF-8 check."""
    return text.isascii() and ("\\" not in text or "\\u" not in text)  # memchr first


def _read_records(req: _Request, ndjson: bool) -> tuple[list, str]:
    """The request's records and its dialect: "json" (raw body) or "form";
    noted on the request: whether its text is plain, and the text itself
    for the journal (`_SentRecords`; none for no records)."""
    records, dialect, text = _decode_records(req, ndjson)
    req.plain_text = _plain_text(text)
    req.sent = _SentRecords(text, ndjson and req.is_json, len(records)) if records else None
    return records, dialect


def _decode_records(req: _Request, ndjson: bool) -> tuple[list, str, str]:
    """The request's records, its dialect and the JSON text they came in.

    A single object becomes a one-item list.  ``ndjson`` allows one JSON
    value per line (Mixpanel documents NDJSON for /import only).
    """
    if req.is_json:
        dialect = "json"
        text = req.body.decode("utf-8", "surrogateescape")
        records = _as_records(_loads_body(text, ndjson))
    else:
        dialect = "form"
        raw = req.raw.get("data")
        if not raw:
            raise _PayloadError("data, missing or empty")
        text, base64_encoded = _data_text(raw)
        records = _as_records(_loads_data(text, base64_encoded))
    return records, dialect, text


def _loads_body(text: str, ndjson: bool) -> Any:
    """A JSON body's value; with ``ndjson``, a body that is not one JSON
    value may be one per line (a list of them)."""
    try:
        return _loads(text)
    except ValueError as exc:
        if not ndjson:
            raise _PayloadError(f"invalid JSON body: {exc}") from None
    value = []
    # Split on newlines only: U+2028 may sit raw inside a JSON string.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                value.append(_loads(line))
            except ValueError as line_exc:
                raise _PayloadError(f"invalid JSON on line {number}: {line_exc}") from None
    return value


def _as_records(value: Any) -> list:
    """A decoded payload as a list of records: an object is a list of one."""
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise _PayloadError("data, must be a JSON object or an array of objects")
    return value


class _SentRecords:
    """A request's records as the journal keeps them: the JSON text they
    came in, decoded again when the journal is read.  One compact string
    instead of every decoded record, and the decoded records are then the
    handler's to store, change and free (the journal still shows them as
    sent)."""

    __slots__ = ("text", "ndjson", "count")

    def __init__(self, text: str, ndjson: bool, count: int):
        self.text = text
        self.ndjson = ndjson
        self.count = count

    def __len__(self) -> int:
        return self.count

    def decode(self) -> list:
        return _as_records(_loads_body(self.text, self.ndjson))


def _credential_token(store: Store, req: _Request) -> str | None:
    """The project that the request's credentials name, if any (worked out
    once a request: handlers and the journal both ask)."""
    if req.credentials is not _UNKNOWN:
        return req.credentials
    req.credentials = token = _resolve_credentials(store, req)
    return token


def _resolve_credentials(store: Store, req: _Request) -> str | None:
    project_id = req.param("project_id")
    auth = req.basic_auth()
    if auth is not None:
        return store.project_by_credentials(auth[0], auth[1], project_id)
    if project_id and not store.strict_auth:
        return store.project_by_id(project_id)
    return None


# =============================================================================
# Expression language: `where`, `on`, `selector` (query-api.md §7)
# =============================================================================

# Guards against expressions that could hang the server or exhaust its stack.
_EXPR_MAX_LENGTH = 20000
_EXPR_MAX_DEPTH = 64
_EXPR_MAX_LIST = 1000
_KEYWORDS = frozenset(("and", "or", "not", "in"))
_ACCESSORS = frozenset(("properties", "user", "event", "behaviors"))
# name -> (fewest, most) arguments; `any` binds its first argument.
_FUNCTIONS = {"defined": (1, 1), "string": (1, 2), "number": (1, 1), "boolean": (1, 1),
              "datetime": (1, 1), "floor": (1, 1), "round": (1, 1), "ceil": (1, 1),
              "any": (3, 3)}
_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|>=|<=|[<>=+\-*/%])
  | (?P<punct>[()\[\],])
  | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<invalid>.)
""", re.X | re.S)
_ESCAPE_RE = re.compile(r"\\(.)", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


class _Undefined:
    """Mixpanel's `undefined`: a missing property, or an operation on the
    wrong types.  Falsy in `where`, true under `not`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "undefined"


_UNDEF = _Undefined()


class _Moment:
    """A datetime value (`datetime(...)`, `$time`): epoch seconds, UTC."""

    __slots__ = ("ts",)

    def __init__(self, ts: float):
        self.ts = ts

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Moment) and other.ts == self.ts

    def __hash__(self) -> int:
        return hash(self.ts)

    def __repr__(self) -> str:
        return f"datetime({self.ts!r})"


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    """``(kind, value, position)`` tokens, ending with an "end" token."""
    tokens = []
    for match in _TOKEN_RE.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind == "ws":
            continue
        if kind == "invalid":
            what = "unterminated string" if value in "\"'" else f"unexpected character {value!r}"
            raise ExpressionError(what, text, match.start())
        if kind == "number":
            if len(value) > 1000:
                raise ExpressionError("number out of range", text, match.start())
            if value.isdigit():
                value = int(value)
            else:
                value = float(value)
                if not math.isfinite(value):
                    raise ExpressionError("number out of range", text, match.start())
        elif kind == "string":
            value = _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), value[1:-1])
        elif kind == "name" and value.lower() in _KEYWORDS:
            kind, value = "keyword", value.lower()
        tokens.append((kind, value, match.start()))
    tokens.append(("end", None, len(text)))
    return tokens


class _Parser:
    """Precedence climbing into a tuple AST, one method per level:
    or | and | not | == = != < <= > >= in | + - | * / % | unary - | postfix []."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0
        self.bound: list[str] = []  # names bound by any(V, ...)
        self.in_any = False

    @property
    def current(self) -> tuple[str, Any, int]:
        return self.tokens[self.index]

    def accept(self, kind: str, value: Any = None) -> bool:
        token = self.current
        if token[0] == kind and (value is None or token[1] == value):
            self.index += 1
            return True
        return False

    def expect(self, kind: str, value: Any, expected: str) -> None:
        if not self.accept(kind, value):
            self.fail(expected)

    def fail(self, expected: str) -> None:
        kind, value, position = self.current
        if kind == "end":
            raise ExpressionError(f"incomplete expression; expected {expected}", self.text, position)
        shown = json.dumps(value) if kind == "string" else f"'{value}'"
        raise ExpressionError(f"unexpected {shown}; expected {expected}", self.text, position)

    def parse(self) -> tuple:
        if not self.text.strip():
            raise ExpressionError("empty expression", self.text, 0)
        node = self.parse_or()
        if self.current[0] != "end":
            self.fail("an operator or the end of the expression")
        return node

    def nested(self, position: int) -> None:
        """Enter one more level (opened at ``position``), within the limit."""
        self.depth += 1
        if self.depth > _EXPR_MAX_DEPTH:
            raise ExpressionError(f"expression nested more than {_EXPR_MAX_DEPTH} deep",
                                  self.text, position)

    # Chains (a or b or c, a + b - c, x["a"]["b"]) are one node holding a
    # list, not a nest of nodes, so a long chain cannot deepen the stack.

    def parse_or(self) -> tuple:
        items = [self.parse_and()]
        while self.accept("keyword", "or"):
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else ("or", tuple(items))

    def parse_and(self) -> tuple:
        items = [self.parse_not()]
        while self.accept("keyword", "and"):
            items.append(self.parse_not())
        return items[0] if len(items) == 1 else ("and", tuple(items))

    def parse_not(self) -> tuple:
        # `not` binds looser than comparisons: not "a" in x == not ("a" in x).
        return self.parse_prefix("keyword", "not", "not", self.parse_compare)

    def parse_prefix(self, kind: str, value: str, tag: str, operand: Callable[[], tuple]) -> tuple:
        """A prefix operator (`not`, unary `-`), any number of times."""
        position = self.current[2]
        if not self.accept(kind, value):
            return operand()
        self.nested(position)
        node = (tag, self.parse_prefix(kind, value, tag, operand))
        self.depth -= 1
        return node

    def parse_compare(self) -> tuple:
        node = self.parse_sum()
        kind, value, _ = self.current
        if self.is_comparison():
            self.index += 1
            op = "==" if value == "=" else value
            node = ("cmp", op, node, self.parse_sum())
            if self.is_comparison():
                raise ExpressionError("comparisons cannot be chained; join them with 'and'",
                                      self.text, self.current[2])
        return node

    def is_comparison(self) -> bool:
        kind, value, _ = self.current
        return (kind == "op" and value in ("==", "=", "!=", "<", "<=", ">", ">=")) or (
            kind == "keyword" and value == "in")

    def parse_sum(self) -> tuple:
        return self.parse_chain(("+", "-"), self.parse_product)

    def parse_product(self) -> tuple:
        return self.parse_chain(("*", "/", "%"), self.parse_unary)

    def parse_chain(self, ops: tuple, operand: Callable[[], tuple]) -> tuple:
        """Left-associative arithmetic: ("math", first, ((op, operand), ...))."""
        first = operand()
        rest = []
        while self.current[0] == "op" and self.current[1] in ops:
            op = self.current[1]
            self.index += 1
            rest.append((op, operand()))
        return ("math", first, tuple(rest)) if rest else first

    def parse_unary(self) -> tuple:
        return self.parse_prefix("op", "-", "neg", self.parse_postfix)

    def parse_postfix(self) -> tuple:
        node = self.parse_primary()
        keys = []
        while self.current[1] == "[" and self.current[0] == "punct":
            keys.append(self.parse_nested_or(opening=True))
            self.expect("punct", "]", "']'")
        return ("index", node, tuple(keys)) if keys else node

    def parse_nested_or(self, opening: bool = False) -> tuple:
        """An expression one level down; ``opening`` consumes its bracket."""
        self.nested(self.current[2] if opening else self.tokens[self.index - 1][2])
        if opening:
            self.index += 1
        node = self.parse_or()
        self.depth -= 1
        return node

    def parse_primary(self) -> tuple:
        kind, value, position = self.current
        if kind in ("number", "string"):
            self.index += 1
            return ("lit", value)
        if kind == "punct" and value == "(":
            node = self.parse_nested_or(opening=True)
            self.expect("punct", ")", "')'")
            return node
        if kind == "punct" and value == "[":
            self.nested(position)
            self.index += 1
            items = []
            if not self.accept("punct", "]"):
                items.append(self.parse_nested_or())
                while self.accept("punct", ","):
                    items.append(self.parse_nested_or())
                    if len(items) > _EXPR_MAX_LIST:
                        raise ExpressionError(f"list longer than {_EXPR_MAX_LIST} items", self.text, position)
                self.expect("punct", "]", "',' or ']'")
            self.depth -= 1
            return ("list", tuple(items))
        if kind != "name":
            self.fail("a value")
        self.index += 1
        lowered = value.lower()
        if lowered in ("true", "false"):
            return ("lit", lowered == "true")
        if lowered == "null":
            return ("lit", None)
        if lowered == "undefined":
            return ("lit", _UNDEF)
        if value in _ACCESSORS and self.accept("punct", "["):
            name_kind, name, _ = self.current
            if name_kind != "string":
                self.fail(f'a property name in quotes after {value}[')
            self.index += 1
            self.expect("punct", "]", "']'")
            return ("prop", value, name)
        if self.current[0] == "punct" and self.current[1] == "(":
            return self.parse_call(value, position)
        if value in self.bound:
            return ("var", value)
        raise ExpressionError(f"unknown name {value!r}", self.text, position)

    def parse_call(self, name: str, position: int) -> tuple:
        function = name.lower()
        if function not in _FUNCTIONS:
            raise ExpressionError(f"unknown function {name!r}", self.text, position)
        self.expect("punct", "(", "'('")
        args = []
        if function == "any":
            if self.in_any:
                raise ExpressionError("any() cannot be nested", self.text, position)
            var_kind, var, _ = self.current
            if var_kind != "name":
                self.fail("a variable name as the first argument of any()")
            self.index += 1
            self.expect("punct", ",", "','")
            args.append(self.parse_nested_or())
            self.expect("punct", ",", "','")
            self.bound.append(var)
            self.in_any = True
            args.append(self.parse_nested_or())
            self.in_any = False
            self.bound.pop()
            self.expect("punct", ")", "')'")
            return ("any", var, args[0], args[1])
        if not self.accept("punct", ")"):
            args.append(self.parse_nested_or())
            while self.accept("punct", ","):
                args.append(self.parse_nested_or())
            self.expect("punct", ")", "',' or ')'")
        fewest, most = _FUNCTIONS[function]
        if not fewest <= len(args) <= most:
            count = str(fewest) if fewest == most else f"{fewest} or {most}"
            raise ExpressionError(f"{function}() takes {count} argument(s), got {len(args)}",
                              self.text, position)
        return ("call", function, tuple(args))


def _parse_expression(text: str) -> tuple:
    if len(text) > _EXPR_MAX_LENGTH:
        raise ExpressionError(f"expression longer than {_EXPR_MAX_LENGTH} characters", text, 0)
    return _Parser(text).parse()


# --- values and operators (Mixpanel's rules, query-api.md §7.3-7.5) ---------


def _kind(value: Any) -> str:
    """Mixpanel's type of a value: number, string, boolean, datetime, list,
    object, null or undefined."""
    if value is True or value is False:
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if value is _UNDEF:
        return "undefined"
    if isinstance(value, _Moment):
        return "datetime"
    return "list" if isinstance(value, list) else "object"


def _parse_datetime(text: str) -> _Moment | None:
    """`YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS` (UTC, as Mixpanel writes them)."""
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", "%Y-%m-%d %H:%M:%S"):
        try:
            moment = datetime.datetime.strptime(text[:19], layout)
        except ValueError:
            continue
        return _Moment(moment.replace(tzinfo=datetime.timezone.utc).timestamp())
    return None


def _equal(a: Any, b: Any) -> bool:
    """`==`: values of one type compare; different types are never equal."""
    kind = _kind(a)
    if kind != _kind(b):
        return False
    if kind == "number":
        return a == b
    return a == b if kind not in ("undefined",) else True


def _order(op: str, a: Any, b: Any) -> Any:
    """`< <= > >=` on numbers, strings and datetimes (an ISO string against
    a datetime is read as one); other pairs are undefined."""
    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a == "datetime" and kind_b == "string":
        b = _parse_datetime(b) or _UNDEF
        kind_b = _kind(b)
    elif kind_b == "datetime" and kind_a == "string":
        a = _parse_datetime(a) or _UNDEF
        kind_a = _kind(a)
    if kind_a != kind_b or kind_a not in ("number", "string", "datetime"):
        return _UNDEF
    if kind_a == "datetime":
        a, b = a.ts, b.ts
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


def _contains_value(needle: Any, haystack: Any) -> Any:
    """`in`: substring of a string, or member of a list (by `==`)."""
    if isinstance(haystack, list):
        return any(_equal(needle, item) for item in haystack)
    if isinstance(haystack, str) and isinstance(needle, str):
        return needle in haystack
    return _UNDEF


def _compare(op: str, a: Any, b: Any) -> Any:
    if op == "==":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if op == "in":
        return _contains_value(a, b)
    return _order(op, a, b)


def _arithmetic(op: str, a: Any, b: Any) -> Any:
    """Numbers only (`+` also joins strings); /0 and % 0 are undefined."""
    kind_a, kind_b = _kind(a), _kind(b)
    if op == "+" and kind_a == kind_b == "string":
        return a + b
    if kind_a != "number" or kind_b != "number":
        return _UNDEF
    try:
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            result = a * b
        elif b == 0:
            return _UNDEF
        else:
            result = a / b if op == "/" else math.fmod(a, b)  # % takes the dividend's sign
    except OverflowError:
        return _UNDEF
    return result if abs(result) <= _MAX_DOUBLE else _UNDEF  # no infinities


def _number_text(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _fn_string(value: Any, default: Any = _UNDEF) -> Any:
    kind = _kind(value)
    if kind == "string":
        return value
    if kind == "number":
        return _number_text(value)
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "datetime":
        return _iso_seconds(value.ts) or _UNDEF
    if kind in ("list", "object"):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return value if default is _UNDEF else default  # null and undefined


def _json_default(value: Any) -> Any:
    """JSON text for values only expressions make (undefined, datetimes)."""
    if isinstance(value, _Moment):
        return _iso_seconds(value.ts)
    return None


def _fn_number(value: Any) -> Any:
    kind = _kind(value)
    if kind == "number":
        return value
    if kind == "boolean":
        return 1.0 if value else 0.0
    if kind == "datetime":
        return value.ts
    if kind == "string":
        try:
            number = float(value)
        except ValueError:
            return _UNDEF
        return number if math.isfinite(number) else _UNDEF
    return _UNDEF


def _fn_boolean(value: Any) -> bool:
    """D-types: "false", 0, "", null and undefined are false; the rest true."""
    if value is _UNDEF or value is None or value is False:
        return False
    if isinstance(value, str):
        return value not in ("", "false")
    if isinstance(value, (int, float)):
        return value != 0
    return True


def _fn_datetime(value: Any) -> Any:
    kind = _kind(value)
    if kind == "number":
        try:
            return _Moment(float(_normalize_time(value)))
        except ValueError:
            return _UNDEF
    if kind == "string":
        return _parse_datetime(value) or _UNDEF
    return value if kind == "datetime" else _UNDEF


def _rounding(function: Callable[[float], float]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        if _kind(value) != "number":
            return _UNDEF
        try:
            return function(value)
        except (OverflowError, ValueError):
            return _UNDEF
    return apply


def _round_half_away(value: float) -> float:
    return math.floor(value + 0.5) if value >= 0 else -math.floor(-value + 0.5)


_CALLS: dict[str, Callable[..., Any]] = {
    "defined": lambda value: value is not _UNDEF,
    "string": _fn_string,
    "number": _fn_number,
    "boolean": _fn_boolean,
    "datetime": _fn_datetime,
    "floor": _rounding(math.floor),
    "round": _rounding(_round_half_away),
    "ceil": _rounding(math.ceil),
}


# --- compiling the AST into closures ------------------------------------------


class _Scope:
    """What an expression sees beside the properties it filters on."""

    __slots__ = ("event", "user", "behaviors", "vars")

    def __init__(self, event: str | None = None, user: dict | None = None,
                 behaviors: dict | None = None):
        self.event = event
        self.user = user
        self.behaviors = behaviors
        self.vars: dict[str, Any] = {}


_NO_SCOPE = _Scope()
_NUMBER_TYPES = (int, float)


def _read_property(props: dict, name: str) -> Any:
    """A property's value; `$time` is the event time as a datetime."""
    if name == "$time" and "$time" not in props:
        ts = props.get("time")
        return _Moment(ts) if isinstance(ts, _NUMBER_TYPES) and ts is not True and ts is not False \
            else _UNDEF
    return props.get(name, _UNDEF)


def _logic_error(op: str, value: Any) -> ExpressionError:
    return ExpressionError(f"'{op}' needs true, false or undefined on each side, "
                           f"got a {_kind(value)}", "", None)


def _compile(node: tuple) -> Callable[[dict, _Scope], Any]:
    """One closure per node; a property compared with a constant becomes a
    single fused closure (the hot path of every filter)."""
    tag = node[0]
    if tag == "lit":
        value = node[1]
        return lambda props, scope: value
    if tag == "prop":
        return _compile_prop(node[1], node[2])
    if tag == "var":
        name = node[1]
        return lambda props, scope: scope.vars.get(name, _UNDEF)
    if tag == "list":
        items = [_compile(item) for item in node[1]]
        return lambda props, scope: [item(props, scope) for item in items]
    if tag == "index":
        return _compile_index(_compile(node[1]), [_compile(key) for key in node[2]])
    if tag == "not":
        inner = _compile(node[1])

        def negate(props: dict, scope: _Scope) -> Any:
            value = inner(props, scope)
            if value is True or value is False:
                return not value
            return True if value is _UNDEF else _UNDEF
        return negate
    if tag == "neg":
        inner = _compile(node[1])

        def minus(props: dict, scope: _Scope) -> Any:
            value = inner(props, scope)
            return -value if _kind(value) == "number" else _UNDEF
        return minus
    if tag in ("and", "or"):
        return _compile_logic(tag, [_compile(item) for item in node[1]])
    if tag == "cmp":
        return _compile_compare(node[1], node[2], node[3])
    if tag == "math":
        first = _compile(node[1])
        rest = [(op, _compile(item)) for op, item in node[2]]

        def fold(props: dict, scope: _Scope) -> Any:
            value = first(props, scope)
            for op, item in rest:
                value = _arithmetic(op, value, item(props, scope))
            return value
        return fold
    if tag == "call":
        function = _CALLS[node[1]]
        args = [_compile(arg) for arg in node[2]]
        if len(args) == 1:
            only = args[0]
            return lambda props, scope: function(only(props, scope))
        return lambda props, scope: function(*[arg(props, scope) for arg in args])
    if tag == "any":
        return _compile_any(node[1], _compile(node[2]), _compile(node[3]))
    raise ExpressionError(f"cannot evaluate {tag!r}", "", None)  # deny by default


def _compile_prop(source: str, name: str) -> Callable[[dict, _Scope], Any]:
    if source == "properties":
        return lambda props, scope: _read_property(props, name)
    if source == "event":
        if name == "$event_name":
            return lambda props, scope: _UNDEF if scope.event is None else scope.event
        return lambda props, scope: _read_property(props, name)
    if source == "user":
        return lambda props, scope: _UNDEF if scope.user is None else scope.user.get(name, _UNDEF)
    return lambda props, scope: (_UNDEF if scope.behaviors is None
                                 else scope.behaviors.get(name, _UNDEF))


def _compile_index(base: Callable, keys: list[Callable]) -> Callable[[dict, _Scope], Any]:
    def index(props: dict, scope: _Scope) -> Any:
        container = base(props, scope)
        for key in keys:
            k = key(props, scope)
            if isinstance(container, dict) and isinstance(k, str):
                container = container.get(k, _UNDEF)
            elif (isinstance(container, list) and _kind(k) == "number" and abs(k) < 2 ** 53
                  and float(k).is_integer() and -len(container) <= int(k) < len(container)):
                container = container[int(k)]
            else:
                return _UNDEF
        return container
    return index


def _compile_logic(op: str, items: list[Callable]) -> Callable[[dict, _Scope], Any]:
    """`and`/`or` take booleans and undefined (as false); others are errors.
    Evaluation stops at the first operand that decides."""
    if op == "and":
        def every(props: dict, scope: _Scope) -> Any:
            for item in items:
                value = item(props, scope)
                if value is True:
                    continue
                if value is False or value is _UNDEF:
                    return False
                raise _logic_error("and", value)
            return True
        return every

    def some(props: dict, scope: _Scope) -> Any:
        for item in items:
            value = item(props, scope)
            if value is True:
                return True
            if value is not False and value is not _UNDEF:
                raise _logic_error("or", value)
        return False
    return some


def _compile_compare(op: str, left_node: tuple, right_node: tuple) -> Callable[[dict, _Scope], Any]:
    # Fuse `properties["name"] OP constant` (either way round) into one closure.
    if left_node[0] == "lit" and right_node[0] == "prop" and op in ("==", "!=", "<", "<=", ">", ">="):
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        return _compile_compare(flipped, right_node, left_node)
    if (left_node[0] == "prop" and left_node[1] == "properties" and left_node[2] != "$time"
            and right_node[0] == "lit"):
        fused = _fuse(op, left_node[2], right_node[1])
        if fused is not None:
            return fused
    left, right = _compile(left_node), _compile(right_node)
    return lambda props, scope: _compare(op, left(props, scope), right(props, scope))


def _fuse(op: str, name: str, constant: Any) -> Callable[[dict, _Scope], Any] | None:
    """A closure for `properties[name] OP constant` with Mixpanel's typing,
    or None when the general path is needed."""
    get = dict.get
    if op in ("==", "!=") and isinstance(constant, str):
        if op == "==":
            return lambda props, scope: get(props, name) == constant
        return lambda props, scope: get(props, name) != constant
    if op in ("==", "!=") and _kind(constant) == "number":
        if op == "==":
            return lambda props, scope: (type(get(props, name)) in _NUMBER_TYPES
                                         and get(props, name) == constant)
        return lambda props, scope: not (type(get(props, name)) in _NUMBER_TYPES
                                         and get(props, name) == constant)
    if op in ("<", "<=", ">", ">=") and _kind(constant) == "number":
        compare = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}[op]

        def ordered(props: dict, scope: _Scope) -> Any:
            value = get(props, name, _UNDEF)
            if type(value) in _NUMBER_TYPES:
                return compare(value, constant)  # exact, even for huge ints
            return _UNDEF
        return ordered
    return None


def _compile_any(var: str, items: Callable, predicate: Callable) -> Callable[[dict, _Scope], Any]:
    def any_of(props: dict, scope: _Scope) -> bool:
        values = items(props, scope)
        if not isinstance(values, list):
            return False
        # A scope of its own: the shared one may be in use on other threads.
        inner = _Scope(scope.event, scope.user, scope.behaviors)
        inner.vars = dict(scope.vars)
        for value in values:
            inner.vars[var] = value
            if predicate(props, inner) is True:
                return True
        return False
    return any_of


# --- `where`: the same AST compiled as a test ---------------------------------


def _is_boolean(node: tuple) -> bool:
    """Nodes whose value is always true, false or undefined."""
    tag = node[0]
    if tag in ("cmp", "not", "any"):
        return True
    if tag == "call":
        return node[1] in ("defined", "boolean")
    if tag in ("and", "or"):
        return all(_is_boolean(item) for item in node[1])
    return tag == "lit" and isinstance(node[1], bool)


def _compile_test(node: tuple) -> Callable[..., bool]:
    """A closure (props, scope=none) -> bool: does a `where` keep the row?

    Where the operands can only be true, false or undefined, `and`, `or` and
    `not` become Python's (undefined is false there, as in Mixpanel), and a
    first operand comparing a property with a string is inlined: a filter
    that fails on its first test costs one call, like a hand-written lambda.
    Anything else runs the value closure and keeps only `true`.
    """
    tag = node[0]
    if tag in ("and", "or") and _is_boolean(node):
        tests = [_compile_test(item) for item in node[1]]
        if tag == "or":
            return lambda props, scope=_NO_SCOPE: any(test(props, scope) for test in tests)
        first = node[1][0]
        if len(tests) == 2 and (
                first[0] == "cmp" and first[1] == "==" and first[2][0] == "prop"
                and first[2][1] == "properties" and first[2][2] != "$time"
                and first[3][0] == "lit" and isinstance(first[3][1], str)):
            name, constant, second = first[2][2], first[3][1], tests[1]
            return lambda props, scope=_NO_SCOPE: props.get(name) == constant and second(props, scope)
        if len(tests) == 2:
            left, right = tests
            return lambda props, scope=_NO_SCOPE: left(props, scope) and right(props, scope)
        return lambda props, scope=_NO_SCOPE: all(test(props, scope) for test in tests)
    if tag == "not" and _is_boolean(node[1]):
        inner = _compile_test(node[1])
        return lambda props, scope=_NO_SCOPE: not inner(props, scope)
    value = _compile(node)
    return lambda props, scope=_NO_SCOPE: value(props, scope) is True


class _Expression:
    """A compiled expression.

    ``value(props, scope)`` gives its value (for `on`); ``matches(props,
    scope)`` says whether a `where` keeps the row.  ``uses_user`` and
    ``uses_behaviors`` say which it reads, so callers fetch only those.
    Both raise `ExpressionError` for an `and`/`or` on a non-boolean.
    """

    __slots__ = ("text", "value", "matches", "uses_user", "uses_behaviors")

    def __init__(self, text: str, node: tuple):
        self.text = text
        self.value = _with_scope(_compile(node))
        self.matches = _compile_test(node)
        flat = repr(node)
        self.uses_user = "'prop', 'user'" in flat or "'prop', 'event', '$event_name'" in flat
        self.uses_behaviors = "'prop', 'behaviors'" in flat


def _with_scope(fn: Callable[[dict, _Scope], Any]) -> Callable[..., Any]:
    return lambda props, scope=_NO_SCOPE: fn(props, scope)


@functools.lru_cache(maxsize=256)
def _compile_expression(text: str) -> _Expression:
    """Parse and compile once per distinct text (cached)."""
    return _Expression(text, _parse_expression(text))


# =============================================================================
# Ingestion: /track, /import, /engage, /groups
# =============================================================================


def _normalize_time(value: Any) -> int | float:
    """Seconds since the epoch; milliseconds recognised by magnitude.

    Floats are kept (the Python and browser SDKs send float seconds); whole
    milliseconds become whole seconds.
    """
    if type(value) is int and 0 <= value < _MS_THRESHOLD:
        return value  # the usual case: whole seconds
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    if abs(value) > _MAX_TIME or value != value:  # int-safe: no float() of a huge int
        raise ValueError(value)
    if abs(value) > _MS_THRESHOLD:
        if isinstance(value, int) and value % 1000 == 0:
            return value // 1000
        return value / 1000
    return value


def _iso_seconds(ts: float) -> str | None:
    """``2026-12-03T18:28:25``: how Mixpanel writes `$last_seen` (UTC, no
    zone); None for a time no calendar can show."""
    try:
        return _iso_second(int(ts))
    except (OverflowError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=1024)
def _iso_second(second: int) -> str:
    # Cached: a batch's updates mostly share their second (the arrival time).
    moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class _Batch:
    """What every record of one ingestion request shares."""

    __slots__ = ("store", "endpoint", "now", "host", "fallback", "strict", "sized", "plain", "added",
                 "earliest", "latest")

    def __init__(self, store: Store, req: _Request, endpoint: str, strict: bool):
        self.store = store
        self.endpoint = endpoint
        self.now = now = store.now()
        self.host = req.host
        self.fallback = _credential_token(store, req)
        self.strict = strict
        # No event can reach the per-event size limit in a smaller body, so
        # only big bodies pay for measuring each event.
        self.sized = len(req.body) + len(req.raw.get("data") or "") >= _MAX_EVENT_BYTES
        self.plain = req.plain_text  # every string ASCII: no UTF-8 checks
        # Properties Mixpanel adds on ingestion (D-reserved, default properties).
        now_ms = round(now * 1000)
        self.added = {"$mp_api_endpoint": req.host, "$mp_api_timestamp_ms": now_ms,
                      "mp_processing_time_ms": now_ms}
        if endpoint == "/import":
            self.added["$import"] = True
        # Whole seconds in this range are kept as sent (`_normalize_event_time`).
        self.earliest, self.latest = (
            (math.ceil(now - _TRACK_MAX_AGE), math.floor(now)) if endpoint == "/track" else
            (_IMPORT_MIN_TIME, min(math.floor(now + _IMPORT_MAX_AHEAD), int(_MS_THRESHOLD) - 1)))


class _Ignored(Exception):
    """A record Mixpanel drops without an error (`$ignore`; an unknown token
    under strict auth); the message says why."""


def _invalid(field: str, problem: str) -> _Reject:
    """A refusal worded as Mixpanel's /import words them."""
    return _Reject(field, f"'{field}' is invalid: {problem}")


def _check_string(value: str, field: str) -> str:
    """Refuse invalid UTF-8 (R-import's wording); truncate past 255 characters."""
    if not value.isascii() and _SURROGATE_RE.search(value):
        raise _Reject(field, f"{field} is invalid: string should be valid utf8")
    return value[:_MAX_STRING] if len(value) > _MAX_STRING else value


class _Limits:
    """How deep, how long and how big list and object values may be."""

    __slots__ = ("depth", "items", "collection_bytes")

    def __init__(self, depth: int, items: int | None, collection_bytes: int):
        self.depth = depth
        self.items = items
        self.collection_bytes = collection_bytes


# Events: objects nest at most 3 deep, fewer than 255 keys or items, 8KB per
# list or object property (R-import, D-types).  Profiles: 256KB per list or
# object (D-types); no depth or length limit is documented, so the fake only
# guards its own stack with a depth of 20.
_EVENT_LIMITS = _Limits(_MAX_DEPTH, _MAX_ITEMS, _MAX_COLLECTION_BYTES)
_PROFILE_LIMITS = _Limits(20, None, _MAX_PROFILE_COLLECTION_BYTES)


def _plain(value: Any) -> bool:
    """A value no rule changes or refuses: a number, a boolean, null, or a
    short ASCII string (the common case, checked without a call per rule)."""
    kind = type(value)
    if kind is str:
        return len(value) <= _MAX_STRING and value.isascii()
    return kind is int or kind is float or kind is bool or value is None


def _json_size_bound(value: Any) -> int | None:
    """An upper bound on the length of ``_dumps(value)`` for a flat list or
    object of plain values, or None (then it is measured).  Each character
    of a string costs at most 6 bytes (a ``\\u00XX`` escape)."""
    if type(value) is list and _STRINGS.issuperset(map(type, value)):
        return 2 + 6 * sum(map(len, value)) + 3 * len(value)  # a list of strings, in C
    size = 2
    for item in (value if type(value) is list else itertools.chain.from_iterable(value.items())):
        kind = type(item)
        if kind is str:
            size += 6 * len(item) + 3
        elif kind is int:
            if not -10 ** 15 < item < 10 ** 15:
                return None
            size += 18
        elif kind is float or kind is bool or item is None:
            size += 26
        else:
            return None
    return size


def _fits(value: Any, limit: int) -> bool:
    """Whether the compact JSON of ``value`` is at most ``limit`` bytes,
    written out only when the cheap bound cannot tell."""
    bound = _json_size_bound(value)
    return (bound is not None and bound <= limit) or len(_dumps(value)) <= limit


def _check_value(value: Any, field: str, depth: int, limits: _Limits) -> Any:
    """Check one property value against the limits; return it, with long
    strings truncated (a new container only when something changed)."""
    kind = type(value)
    if kind is str:
        return _check_string(value, field)
    if kind is not list and kind is not dict:
        return value
    if depth > limits.depth:
        raise _invalid(field, f"objects and lists may nest at most {limits.depth} deep")
    if limits.items is not None and len(value) >= limits.items:
        raise _invalid(field, "arrays must have fewer than 255 elements" if kind is list
                       else "objects must have fewer than 255 keys")
    if kind is list:
        if all(map(_plain, value)):
            result: Any = value  # nothing to cut or refuse inside
        else:
            checked = [_check_value(item, field, depth + 1, limits) for item in value]
            changed = any(a is not b for a, b in zip(checked, value))
            result = checked if changed else value
    elif all(_plain(v) and _plain(k) for k, v in value.items()):
        result = value
    else:
        result = value
        pairs = [(_check_string(k, field), _check_value(v, f"{field}.{k}", depth + 1, limits))
                 for k, v in value.items()]
        if any(k is not k0 or v is not v0 for (k, v), (k0, v0) in zip(pairs, value.items())):
            result = dict(pairs)
            if len(result) < len(pairs):
                raise _collision(field, next(k for k, _ in pairs if len(k) == _MAX_STRING))
    if depth == 1 and not _fits(result, limits.collection_bytes):
        raise _invalid(field, f"list and object properties must be at most "
                              f"{limits.collection_bytes // 1024}KB")
    return result


# Property names seen to be short and ASCII: records reuse a few names, so
# one set lookup per record replaces a check per name.  Bounded.
_PLAIN_NAMES: set = set()
_PLAIN_NAMES_MAX = 100_000


def _plain_names(props: dict) -> bool:
    """Whether every name of ``props`` is a short ASCII string, learning the
    new ones (callers first try ``_PLAIN_NAMES.issuperset(props)``)."""
    for name in props:
        if name not in _PLAIN_NAMES:
            if type(name) is not str or len(name) > _MAX_STRING or not name.isascii():
                return False
            if len(_PLAIN_NAMES) < _PLAIN_NAMES_MAX:
                _PLAIN_NAMES.add(name)
    return True


def _check_properties(props: dict, prefix: str, limits: _Limits, ascii_only: bool = False) -> dict:
    """Truncate names and strings, refuse what breaks a limit (ingestion-api.md §11).
    ``ascii_only``: the batch's JSON was `_plain_text`, so every string is ASCII."""
    # The common case first, in one tight loop: names known plain, values
    # short ASCII strings, numbers, booleans, nulls, empty lists and objects:
    # nothing to cut or refuse.
    names = _PLAIN_NAMES.issuperset(props) or _plain_names(props)
    if names:
        for value in props.values():
            kind = type(value)
            if kind is str:
                if len(value) > _MAX_STRING or not (ascii_only or value.isascii()):
                    break
            elif kind not in _NON_STRINGS and ((kind is not list and kind is not dict) or value):
                break
        else:
            return props
    changes = None
    for name, value in props.items():
        if names and _plain(value):
            continue  # only lists, objects and odd strings need a closer look
        field = f"{prefix}{name}"
        new_name = _check_string(name, field)
        new_value = _check_value(value, field, 1, limits)
        if new_name is not name or new_value is not value:
            if changes is None:
                changes = []
            changes.append((name, new_name, new_value))
    if changes:
        replaced = {name: (new_name, new_value) for name, new_name, new_value in changes}
        rebuilt: dict = {}
        for name, value in props.items():
            new_name, new_value = replaced.get(name, (name, value))
            if new_name in rebuilt:
                raise _collision(prefix.rstrip("."), new_name)
            rebuilt[new_name] = new_value
        props = rebuilt
    return props


def _collision(field: str, name: str) -> _Reject:
    """Two names that are one after truncation: refused, not silently merged."""
    return _invalid(field, f"two property names are the same once cut to {_MAX_STRING} "
                           f"characters: {name[:40]}...")


def _check_id(props: dict, field: str) -> None:
    """A distinct_id is a string (or number), never a placeholder (R-import)."""
    value = props[field]
    if value == "":
        return  # allowed: "excluded from user analysis" (R-import)
    text = value if type(value) is str else _id_text(value)
    if text is None:
        raise _invalid(f"properties.{field}", "must be a string")
    if len(text) in _PLACEHOLDER_LENGTHS and text.lower() in _PLACEHOLDER_IDS:
        raise _invalid(f"properties.{field}", f"{text!r} is a placeholder, not an id")


def _normalize_event(record: Any, batch: _Batch) -> tuple[str, dict]:
    """One event as Mixpanel stores it, or `_Reject` saying why not.

    Rules apply on every endpoint; a strict /import also requires `time`,
    `distinct_id` and `$insert_id`, where /track and non-strict /import fill
    them in (arrival time, nothing, a server-generated id).
    """
    if not isinstance(record, dict):
        raise _Reject(None, "each record must be a JSON object with 'event' and 'properties'")
    name = record.get("event")
    if not isinstance(name, str) or not name.strip():
        raise _Reject("event", "'event' must not be missing or blank")
    if batch.strict and len(record) > 2:
        extra = sorted(k for k in record if k not in ("event", "properties"))
        if extra:
            raise _Reject(extra[0], f"'{extra[0]}' is not allowed: a record has only "
                                    "'event' and 'properties'")
    props = record.get("properties")
    if props is None:
        props = {}
    elif not isinstance(props, dict):
        raise _Reject("properties", "'properties' must be a JSON object")
    else:
        props = dict(props)  # the refused record stays as it was sent
    token = props.get("token") or batch.fallback
    if not isinstance(token, str) or not token:
        raise _Reject("properties.token", "token, missing or empty")
    if batch.store.strict_auth:
        _check_token(token, batch.store, batch.fallback if batch.endpoint == "/import" else None)
    if props.get("$ignore") not in (None, False):
        raise _Ignored("$ignore is set: Mixpanel drops the event")  # D-bot, D-reserved
    if batch.sized and len(_dumps(record)) >= _MAX_EVENT_BYTES:
        raise _Reject(None, "event is invalid: must be smaller than 1MB of uncompressed JSON")
    if len(props) >= _MAX_PROPERTIES:
        raise _invalid("properties", f"must have fewer than {_MAX_PROPERTIES} properties")
    props = _check_properties(props, "properties.", _EVENT_LIMITS, batch.plain)
    if not name.isascii() and _SURROGATE_RE.search(name):
        raise _Reject("event", "event is invalid: string should be valid utf8")
    project = batch.store.projects.get(token)  # a dict read; no lock needed
    original = project is not None and project.id_merge == "original"
    ts = props.get("time")
    if type(ts) is not int or not batch.earliest <= ts <= batch.latest:  # else kept as sent
        _normalize_event_time(props, batch)
    if original:
        _check_identity_event(name, props, batch)
    elif "$device_id" in props or "$user_id" in props:
        _derive_distinct_id(props)
    if "distinct_id" in props:
        _check_id(props, "distinct_id")
    elif batch.strict and name not in _IDENTITY_EVENTS:
        raise _invalid("properties.distinct_id", "must not be missing")
    insert_id = props.get("$insert_id")
    if insert_id is None:
        if batch.strict and name not in _IDENTITY_EVENTS:
            raise _invalid("properties.$insert_id", "must not be missing")
        # R-dedup: a generated id, so the event is never merged with another.
        props["$insert_id"] = os.urandom(16).hex()
    elif not isinstance(insert_id, str) or not (
            (len(insert_id) <= 36 and insert_id.isalnum() and insert_id.isascii())  # the usual id
            or _INSERT_ID_RE.fullmatch(insert_id)):
        raise _invalid("properties.$insert_id", "must be at most 36 bytes of letters, digits and '-'")
    elif len(insert_id) in _PLACEHOLDER_LENGTHS and insert_id.lower() in _PLACEHOLDER_IDS:
        raise _invalid("properties.$insert_id", f"{insert_id!r} is a placeholder, not an id")
    # `ip` is used for geolocation and then discarded (D-reserved); the fake
    # does no geolocation.
    props.pop("ip", None)
    props.update(batch.added)
    return token, {"event": name, "properties": props}


def _check_token(token: str, store: Store, authenticated: str | None) -> None:
    """Strict auth: a token that names no configured project is dropped, as
    Mixpanel drops it while answering `1` (mixpanel-node #59); on /import a
    record must belong to the project its credentials name."""
    if not store.strict_auth:
        return
    if authenticated is not None and token != authenticated:
        raise _Reject("properties.token", "token names another project than the request's credentials")
    if token not in store.projects:
        raise _Ignored("unknown project token: with strict auth it is dropped, and the client "
                       "is answered as Mixpanel answers it")


def _normalize_event_time(props: dict, batch: _Batch) -> None:
    """`time` in seconds, within the endpoint's window (ingestion-api.md §2, §3)."""
    now = batch.now
    if "time" in props:
        try:
            ts = _normalize_time(props["time"])
        except ValueError:
            raise _invalid("properties.time", "must be specified as seconds since epoch") from None
    elif batch.strict:
        raise _invalid("properties.time", "must not be missing")
    else:
        ts = round(now, 3)  # no time: the time of arrival (R-dedup, D-reserved)
    if batch.endpoint == "/track":
        if ts > now:
            ts = round(now, 3)  # OAS: future times are overwritten with the present
        elif ts < now - _TRACK_MAX_AGE:
            raise _invalid("properties.time", "/track only accepts events from the last 5 days; "
                                              "send older events to /import")
    elif ts < _IMPORT_MIN_TIME:
        raise _invalid("properties.time", "must not be before 1971-01-01")
    elif ts > now + _IMPORT_MAX_AHEAD:
        raise _invalid("properties.time", "must not be in the future")
    props["time"] = ts


def _derive_distinct_id(props: dict) -> None:
    """Simplified ID Merge: distinct_id is the `$user_id`, else `$device:<id>`.

    Mixpanel sets it whatever the client sent (D-idm FAQ), and strips one
    `$device:` prefix from `$device_id` (AK's probes).
    """
    device = props.get("$device_id")
    user = props.get("$user_id")
    if device is None and user is None:
        return  # most events: nothing to derive
    if isinstance(device, str) and device.startswith("$device:"):
        device = props["$device_id"] = device[len("$device:"):]
    user = _id_text(user)
    if user is not None:
        props["distinct_id"] = user
    elif _id_text(device) is not None:
        props["distinct_id"] = "$device:" + _id_text(device)


def _check_identity_event(name: str, props: dict, batch: _Batch) -> None:
    """Original ID Merge: the properties each identity event needs (R-ident)."""
    if name == "$identify":
        known, anon = _identify_ids(props)
        if known is None:
            raise _invalid("properties.$identified_id", "must not be missing")
        if anon is None:
            raise _invalid("properties.$anon_id", "must not be missing")
        props.setdefault("distinct_id", known)
    elif name == "$create_alias":
        for field in ("distinct_id", "alias"):
            if _id_text(props.get(field)) is None:
                raise _invalid(f"properties.{field}", "must not be missing")
            props[field] = _id_text(props[field])
    elif name == "$merge":
        if batch.endpoint != "/import":
            raise _Reject("event", "$merge is only accepted by /import")
        ids = props.get("$distinct_ids")
        if (not isinstance(ids, list) or len(ids) != 2
                or any(_id_text(i) is None for i in ids)):
            raise _invalid("properties.$distinct_ids", "must hold exactly 2 distinct_ids")
        props["$distinct_ids"] = [_id_text(i) for i in ids]


def _id_text(value: Any) -> str | None:
    """A distinct or group id as Mixpanel keys it: strings, numbers as text."""
    if isinstance(value, str):
        return value if value else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    return None


# The quick paths' shapes (`_normalize_events`, `_normalize_updates`): the
# names of a record, in order.  A batch reuses a few, so one dict lookup per
# record tells what the record holds.  The names are the sender's, so the
# tables are bounded by the names and characters they hold, together, for
# the life of the process (a shape past that is worked out each time).
_SHAPE_NAMES_MAX = 100_000
_SHAPE_CHARS_MAX = 2_000_000
_shape_room = [_SHAPE_NAMES_MAX, _SHAPE_CHARS_MAX]  # what is left, under _SHAPE_LOCK
_SHAPE_LOCK = threading.Lock()


def _remember_shape(table: dict, shape: tuple, known: Any) -> Any:
    """Keep what was learned of a shape in ``table`` while there is room."""
    chars = sum(map(len, shape))
    with _SHAPE_LOCK:
        if shape not in table and len(shape) <= _shape_room[0] and chars <= _shape_room[1]:
            table[shape] = known
            _shape_room[0] -= len(shape)
            _shape_room[1] -= chars
    return known


# The quick path for plain events (`_normalize_events`).  An event's
# property names are its shape.
_EVENT_SHAPES: dict = {}
_EVENT_NAMES: set = set()  # names seen to need no check (`_plain_event_name`)
_EVENT_NAMES_MAX = 10_000
_RECORD_SHAPE = ("event", "properties")  # a record as the SDKs write it, in this order
# Properties the full path acts on: a dropped event, a removed `ip`, an id
# derived from them (Simplified ID Merge).
_EVENT_SPECIAL = frozenset(("$ignore", "ip", "$device_id", "$user_id"))


def _learn_event_shape(shape: tuple) -> tuple | None:
    """What the quick path needs of a property shape: (whether it names a
    distinct_id, whether an $insert_id), or None when the full path must
    decide (a name to cut, a special property, no time, too many)."""
    if len(shape) >= _MAX_PROPERTIES:
        return None  # never quick: not worth its room
    if "time" not in shape or not _EVENT_SPECIAL.isdisjoint(shape) or not _plain_names(shape):
        return _remember_shape(_EVENT_SHAPES, shape, None)
    return _remember_shape(_EVENT_SHAPES, shape, ("distinct_id" in shape, "$insert_id" in shape))


def _plain_event_name(name: str) -> bool:
    """Whether an event name needs no check and no special handling: short
    ASCII, not blank, not an identity event (learned, for the quick path)."""
    if len(name) > _MAX_STRING or not name.isascii() or not name.strip() or name in _IDENTITY_EVENTS:
        return False
    if len(_EVENT_NAMES) < _EVENT_NAMES_MAX:
        _EVENT_NAMES.add(name)
    return True


def _normalize_events(records: list, batch: _Batch, plans: bool) -> tuple[list, list[int], list[dict], int]:
    """Check a batch of events in order: (the accepted (token, event) pairs,
    their indexes, the refusals, how many were dropped).

    A batch whose JSON is plain (`_plain_text`), not near the size limit,
    with strict auth off and no tracking plan anywhere, takes a quick path
    for the events the SDKs send: `event` and `properties` in that order,
    a known name, a time in the endpoint's window, usual ids, values no
    rule changes or refuses.  Such an event is stored as the decoded record
    itself, changed only once every check has passed (the journal keeps the
    text the records came in, `_SentRecords`).  Anything else goes through
    `_normalize_event`, which the quick path agrees with (a test holds them
    to it).
    """
    store, endpoint, strict, now = batch.store, batch.endpoint, batch.strict, batch.now
    accepted: list[tuple[str, dict]] = []
    accepted_at: list[int] = []
    rejected: list[dict] = []
    ignored = 0
    quick = batch.plain and not batch.sized and not store.strict_auth and not plans
    # Locals for the loop below, run once per record: names it reads often.
    shapes, names, kind_of, max_string, non_strings = (_EVENT_SHAPES, _EVENT_NAMES, type, _MAX_STRING,
                                                       _NON_STRINGS)
    placeholders, placeholder_lengths = _PLACEHOLDER_IDS, _PLACEHOLDER_LENGTHS
    earliest, latest, fallback, added = batch.earliest, batch.latest, batch.fallback, batch.added
    for index, record in enumerate(records):
        try:
            if quick and kind_of(record) is dict and tuple(record) == _RECORD_SHAPE:
                name, props = record["event"], record["properties"]
                known = shapes.get(tuple(props), _UNKNOWN) if kind_of(props) is dict else None
                if known is _UNKNOWN:
                    known = _learn_event_shape(tuple(props))
                if known is not None and kind_of(name) is str and (name in names or _plain_event_name(name)):
                    token = props.get("token") or fallback
                    ts = props["time"]
                    if (kind_of(token) is str and token and (kind_of(ts) is int or kind_of(ts) is float)
                            and earliest <= ts <= latest):
                        has_id, has_insert_id = known
                        plain = False
                        for value in props.values():
                            value_kind = kind_of(value)
                            if value_kind is str:
                                if len(value) > max_string:
                                    break
                            elif value_kind not in non_strings and (
                                    (value_kind is not list and value_kind is not dict) or value):
                                break
                        else:
                            plain = True
                        if not plain:
                            # A list, an object or a long string: the full check,
                            # which refuses as the full path would at this point.
                            plain = _check_properties(props, "properties.", _EVENT_LIMITS, True) is props
                        distinct_id = props["distinct_id"] if has_id else ""
                        insert_id = props["$insert_id"] if has_insert_id else ""
                        if (plain and (has_id or not strict) and (has_insert_id or not strict)
                                and kind_of(distinct_id) is str
                                and not (len(distinct_id) in placeholder_lengths
                                         and distinct_id.lower() in placeholders)
                                and (not has_insert_id or (
                                    kind_of(insert_id) is str and len(insert_id) <= 36
                                    and insert_id.isalnum() and insert_id.isascii()
                                    and not (len(insert_id) in placeholder_lengths
                                             and insert_id.lower() in placeholders)))):
                            # Every check passed: now the record may change.
                            if not has_insert_id:
                                # R-dedup: a generated id, so the event is never merged with another.
                                props["$insert_id"] = os.urandom(16).hex()
                            props.update(added)
                            accepted.append((token, record))
                            accepted_at.append(index)
                            continue
            token, event = _normalize_event(record, batch)
            if not plans or _plan_check(store, token, event, endpoint, index, record, now, rejected):
                accepted.append((token, event))
                accepted_at.append(index)
        except (_Reject, _Ignored) as refusal:
            ignored += isinstance(refusal, _Ignored)
            rejected.append(_refused(endpoint, "events", fallback, index, record, refusal, now))
    return accepted, accepted_at, rejected, ignored


def _refused(endpoint: str, kind: str, fallback: str | None, index: int, record: Any,
             refusal: _Reject | _Ignored, now: float) -> dict:
    """A record the normalizers refused (`_Reject`) or dropped (`_Ignored`),
    filed under the token it names, else the credentials' project."""
    token = _record_token(record, kind) or fallback
    if isinstance(refusal, _Ignored):
        return _rejection(endpoint, token, index, record, _Reject(None, str(refusal)), now, dropped=True)
    return _rejection(endpoint, token, index, record, refusal, now)


# The quick path for plain profile updates (`_normalize_updates`): a
# record's names are its shape, and tell its operators.
_SHAPES: dict = {}
_MODIFIERS = frozenset(("$time", "$ignore_time", "$ignore_alias"))
_SCALAR_OPS = frozenset(("$set", "$set_once", "$append", "$remove"))  # objects of _SCALARS


def _learn_shape(shape: tuple) -> tuple | None:
    """What the quick path needs of a record shape: (its operators, each
    with whether its value is an object of scalars, checked inline, rather
    than by `_quick_value`; whether it has modifiers), or None when the
    full path must decide."""
    if "$token" not in shape or "$distinct_id" not in shape or "$delete" in shape:
        return None
    ops = tuple((name, name in _SCALAR_OPS) for name in shape if name in _PEOPLE_OP_SET)
    return _remember_shape(_SHAPES, shape, (ops, not _MODIFIERS.isdisjoint(shape)) if ops else None)


def _quick_value(op: str, value: Any) -> bool:
    """Whether an operator's value needs no rule applied: what `_check_op`
    would return unchanged.  (`_normalize_updates` inlines the common case,
    an object of short scalars.)"""
    if op == "$unset":
        return type(value) is list and bool(value) and _quick_items(value, _STRINGS)
    if type(value) is not dict or not (_PLAIN_NAMES.issuperset(value) or _plain_names(value)):
        return False
    if op == "$union":
        for items in value.values():
            if type(items) is not list or not items or not _quick_items(items, _SCALARS) \
                    or not _fits(items, _MAX_PROFILE_COLLECTION_BYTES):
                return False
        return True
    return _quick_items(value.values(), _NUMBERS if op == "$add" else _SCALARS)


def _quick_items(items: Any, kinds: frozenset) -> bool:
    """Whether each item's type is one of ``kinds``, and each string short."""
    for item in items:
        kind = type(item)
        if kind not in kinds or (kind is str and len(item) > _MAX_STRING):
            return False
    return True


def _normalize_updates(records: list, kind: str, fallback: str | None, now: float, sized: bool,
                       store: Store, endpoint: str, plain: bool) -> tuple[list, list[dict], int]:
    """Check a batch of updates in order: (the updates, their refusals, how
    many were dropped).

    A batch whose JSON is plain (`_plain_text`), not near the size limit,
    with strict auth off, takes a quick path for the updates the SDKs send:
    a `$token`, a `$distinct_id` and operators whose values no rule changes
    or refuses.  Anything else goes through `_normalize_update`, which the
    quick path agrees with (a test holds them to it).
    """
    now_iso = _iso_seconds(now)  # the `$last_seen` of updates that give no `$time`
    updates: list = []
    rejected: list[dict] = []
    dropped = 0
    quick = plain and kind == "people" and not sized and not store.strict_auth
    # Locals for the loop below, run once per record: names it reads often.
    shapes, max_string, plain_names, scalars, kind_of = _SHAPES, _MAX_STRING, _PLAIN_NAMES, _SCALARS, type
    for index, record in enumerate(records):
        if quick and kind_of(record) is dict:
            shape = tuple(record)
            known = shapes.get(shape, _UNKNOWN)
            if known is _UNKNOWN:
                known = _learn_shape(shape)
            if known is not None:
                token = record["$token"]
                key = record["$distinct_id"]
                if kind_of(token) is str and token and kind_of(key) is str and 0 < len(key) <= max_string:
                    ops = []
                    for op, inline in known[0]:
                        value = record[op]
                        if not inline or kind_of(value) is not dict:
                            if not _quick_value(op, value):
                                break
                        elif plain_names.issuperset(value) or _plain_names(value):
                            # `_quick_value`, inlined for an object of short scalars
                            for item in value.values():
                                item_kind = kind_of(item)
                                if item_kind is str:
                                    if len(item) > max_string:
                                        break
                                elif item_kind not in scalars:
                                    break
                            else:
                                ops.append((op, value))
                                continue
                            break
                        else:
                            break
                        ops.append((op, value))
                    else:
                        if known[1]:
                            last_seen, ignore_alias = (_last_seen(record, now, now_iso),
                                                       _flag(record.get("$ignore_alias")))
                        else:
                            last_seen, ignore_alias = now_iso, False
                        updates.append((token, key, ops, last_seen, ignore_alias, index, record))
                        continue
        try:
            updates.append(_normalize_update(record, kind, fallback, now, index, sized, store, now_iso))
        except (_Reject, _Ignored) as refusal:
            dropped += isinstance(refusal, _Ignored)
            rejected.append(_refused(endpoint, kind, fallback, index, record, refusal, now))
    return updates, rejected, dropped


def _last_seen(record: dict, now: float, now_iso: str | None) -> str | None:
    """A profile update's `$last_seen`: its `$time`, else its arrival; none
    with `$ignore_time` (D-profiles)."""
    if _flag(record.get("$ignore_time")):
        return None
    if "$time" in record:
        try:
            last_seen = _iso_seconds(_normalize_time(record["$time"]))
        except ValueError:
            last_seen = None
        if last_seen is not None:
            return last_seen
    return now_iso or _iso_seconds(now)


def _normalize_update(record: Any, kind: str, fallback_token: str | None, now: float,
                      index: int, sized: bool, store: Store, now_iso: str | None = None) -> _Update:
    """One /engage or /groups update, checked, or `_Reject` saying why not.

    Ids follow the rules of event strings (UTF-8, cut at 255), so a profile
    and the events of its person share one id.
    """
    prefix = "Engage API error: " if kind == "people" else "Groups API error: "
    if not isinstance(record, dict):
        raise _Reject(None, prefix + "each update must be a JSON object")
    token = record.get("$token") or fallback_token
    if not isinstance(token, str) or not token:
        raise _Reject("$token", prefix + "$token, missing or empty")
    _check_token(token, store, None)
    ops = []
    try:
        if sized and len(_dumps(record)) >= _MAX_EVENT_BYTES:
            raise _Reject(None, "update is invalid: must be smaller than 1MB of uncompressed JSON")
        if kind == "people":
            key: Any = record.get("$distinct_id")
            if type(key) is not str or not key or len(key) > _MAX_STRING or not key.isascii():
                key = _id_text(key)  # not the usual short ASCII string: the full rules
                if key is None:
                    raise _Reject("$distinct_id", "$distinct_id, missing or empty")
                key = _check_string(key, "$distinct_id")
            allowed, known = _PEOPLE_OPS, _PEOPLE_OP_SET
        else:
            group_key = record.get("$group_key")
            if not isinstance(group_key, str) or not group_key:
                raise _Reject("$group_key", "$group_key, missing or empty")
            group_id = _id_text(record.get("$group_id"))
            if group_id is None:
                raise _Reject("$group_id", "$group_id, missing or empty")
            key = (_check_string(group_key, "$group_key"), _check_string(group_id, "$group_id"))
            allowed, known = _GROUP_OPS, _GROUP_OP_SET
        for op, value in record.items():
            if op in known:
                ops.append((op, _check_op(op, value, prefix)))
            elif op in _PEOPLE_OP_SET:
                raise _Reject(op, prefix + f"{op} is not supported for group profiles")
    except _Reject as reject:
        if reject.message.startswith(prefix):
            raise
        raise _Reject(reject.field, prefix + reject.message) from None
    if not ops:
        raise _Reject(None, prefix + "no operation: expected one of " + ", ".join(allowed))
    last_seen = _last_seen(record, now, now_iso) if kind == "people" else None
    return (token, key, ops, last_seen, _flag(record.get("$ignore_alias")), index, record)


def _flag(value: Any) -> bool:
    """A modifier such as `$ignore_time` is on when true (or "true")."""
    return value is True or value == "true"


def _check_op(op: str, value: Any, prefix: str) -> Any:
    """Refuse an operator whose value has the wrong shape (OAS schemas);
    return the value with long strings truncated (D-profiles)."""
    if (op == "$set" or op == "$set_once") and type(value) is dict:
        return _check_properties(value, _OP_PREFIXES[op], _PROFILE_LIMITS)  # the usual update
    if op == "$delete":
        return value
    if op == "$unset":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise _Reject(op, prefix + "$unset must be a non-empty list of property names")
        return [_check_string(name, "$unset") for name in value]
    if not isinstance(value, dict):
        raise _Reject(op, prefix + f"{op} must be an object of properties")
    if op == "$add":
        for name, amount in value.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                raise _Reject(f"$add.{name}", prefix + f"$add value for {name!r} must be a number")
    elif op == "$union":
        for name, items in value.items():
            if not isinstance(items, list) or not items:
                raise _Reject(f"$union.{name}", prefix + f"$union value for {name!r} must be a non-empty list")
    # Profile strings and names are cut at 255 like event ones; list and
    # object values may hold 256KB (D-types), nested without a depth limit.
    return _check_properties(value, _OP_PREFIXES.get(op) or op + ".", _PROFILE_LIMITS)


def _rejection(endpoint: str, token: str | None, index: int | None, record: Any,
               reject: _Reject, now: float, dropped: bool = False, stored: bool = False) -> dict:
    """A refused record with its reason; `seq` is given under the lock.

    ``dropped`` marks records Mixpanel drops without an error (`$ignore`);
    ``stored`` a tracking-plan violation whose event was stored all the same.
    """
    insert_id = None
    if isinstance(record, dict) and isinstance(record.get("properties"), dict):
        insert_id = record["properties"].get("$insert_id")
    return {"seq": 0, "project": token, "endpoint": endpoint, "index": index,
            "field": reject.field, "reason": reject.message, "insert_id": insert_id,
            "dropped": dropped, "stored": stored, "record": record, "time": now}


def _record_token(record: Any, kind: str) -> str | None:
    """The token a (possibly refused) record names, for filing its refusal:
    an event's `properties.token`, an update's `$token`."""
    if not isinstance(record, dict):
        return None
    if kind == "events":
        props = record.get("properties")
        token = props.get("token") if isinstance(props, dict) else None
    else:
        token = record.get("$token")
    return token if isinstance(token, str) and token else None


_VERBOSE_OK = b'{"status":1,"error":null}'


def _ingest_answer(req: _Request, ok: bool, error: str | None, status: int = 200) -> _Response:
    """The /track-style answer: `1`/`0`, verbose JSON, JSONP or a pixel.

    `verbose=1` gives {"status","error"} (what the Python SDK requires);
    `verbose=2` turns an error into HTTP 400 (ingestion-api.md §1.4).
    """
    verbose = req.param("verbose")
    if req.param("img") == "1":
        return _Response(status, _PIXEL_GIF, "image/gif")
    if verbose in ("1", "2"):
        body = _VERBOSE_OK if ok else _dumps({"status": 0, "error": error})
        content_type = "application/json"
        if verbose == "2" and not ok and status == 200:
            status = 400
    else:
        body = b"1" if ok else b"0"
        content_type = "text/plain"
    callback = req.param("callback")
    if callback:
        return _Response(status, callback.encode() + b"(" + body + b")", "text/javascript")
    return _Response(status, body, content_type)


def _check_callback(req: _Request) -> None:
    """Refuse a JSONP callback that is not a plain function name, before
    anything is stored (a retry must not duplicate records)."""
    callback = req.param("callback")
    if callback and not _CALLBACK_RE.fullmatch(callback):
        raise ApiError(400, {"status": 0, "error": "callback, invalid function name"})


def _refuse_request(store: Store, req: _Request, endpoint: str, message: str,
                    token: str | None = None) -> None:
    """Keep a whole refused request in the refusals, so a test can see it:
    index None, and the payload as text (cut at 2000 characters).  It is
    filed under ``token``, else the project the credentials name."""
    data = req.param("data") if not req.is_json else None
    if data is None:
        text = req.body.decode("utf-8", "replace")
        payload = text if req.is_json else _redacted_query(text)  # a form may hold secrets
    else:
        payload = data
    reject = _Reject("data", message)
    store.add_events([], [_rejection(endpoint, token or _credential_token(store, req), None,
                                     payload[:2000], reject, store.now())])


def _too_many(count: int) -> str:
    return f"request exceeds max limit of {_MAX_BATCH} records (it has {count})"


def _ingest_events(store: Store, req: _Request, endpoint: str) -> _Response:
    """Decode, check and store a batch of events; answer per dialect.

    Every refused record is kept, with its reason, for `mp.rejected()`.
    """
    _check_callback(req)
    try:
        records, dialect = _read_records(req, ndjson=endpoint == "/import")
    except _PayloadError as exc:
        _refuse_request(store, req, endpoint, str(exc))
        if endpoint == "/import" and req.is_json:
            return _import_failure(400, str(exc))
        return _ingest_answer(req, False, str(exc))
    strict = endpoint == "/import" and _import_is_strict(req, dialect)
    json_answer = endpoint == "/import" and (dialect == "json" or strict)
    if len(records) > _MAX_BATCH:
        # R-track/R-import: 2000 events per request; the 413 page lists
        # "too many events per batch" among its causes.
        _refuse_request(store, req, endpoint, _too_many(len(records)), _record_token(records[0], "events"))
        if json_answer:
            return _import_failure(413, _too_many(len(records)))
        return _ingest_answer(req, False, _too_many(len(records)), status=413)
    if strict and not records:
        _refuse_request(store, req, endpoint, "the request holds no records")
        return _import_failure(400, "the request holds no records")  # OAS: minItems 1
    batch = _Batch(store, req, endpoint, strict)
    if store.strict_auth and endpoint == "/import" and batch.fallback is None:
        # Strict auth: /import needs a configured project's credentials.
        _refuse_request(store, req, endpoint, "Invalid credentials")
        return _import_failure(401, "Invalid credentials")
    req.records, req.record_kind = records, "events"
    project = batch.fallback or _record_token(records[0] if records else None, "events")
    limited = _rate_limited(store, project, "events", len(records))
    if limited is not None:
        message = "Project exceeded rate limits. Please retry the request with exponential backoff."
        _refuse_request(store, req, endpoint, f"rate limit: {message}", project)
        answer = _import_failure(429, message) if json_answer else _ingest_answer(req, False, message, 429)
        answer.headers["Retry-After"] = limited
        return answer
    # No tracking plan anywhere: no event to hold to one (a list copy: no lock needed).
    plans = any(project.tracking_plan is not None for project in list(store.projects.values()))
    accepted, accepted_at, rejected, ignored = _normalize_events(records, batch, plans)
    if strict and _has_simplified_identity_event(store, accepted):
        # AK's probes: a strict /import holding $identify, $create_alias or
        # $merge for a Simplified project is refused whole, strings for records.
        # Each record as sent: the quick path has changed those it took.
        sent = req.sent.decode()
        refused = [_rejection(endpoint, token, index, sent[index],
                              _Reject(None, _SIMPLIFIED_IDENTITY_ERROR), batch.now)
                   for index, (token, _) in zip(accepted_at, accepted)]
        store.add_events([], rejected + refused)
        return _json(400, {"code": 400, "error": "some data points in the request failed validation",
                           "failed_records": [_SIMPLIFIED_IDENTITY_ERROR], "num_records_imported": 0,
                           "status": "Bad Request"})
    store.add_events(accepted, rejected)
    landed = len(accepted) + ignored
    failed = [r for r in rejected if not r["dropped"] and not r["stored"]]
    if strict:
        return _import_answer(landed, failed)
    if endpoint == "/import" and dialect == "json":
        return _import_answer(landed, [])
    error = failed[0]["reason"] if failed else "no records in the request"
    return _ingest_answer(req, landed > 0, None if landed else error)


def _rate_limited(store: Store, token: str | None, kind: str, cost: int) -> str | None:
    """The Retry-After (seconds, as text) when a rate limit refuses this."""
    if token is None or not store.rate_limits:
        return None
    over = store.rate_check(token, (kind,), cost)
    return None if over is None else str(max(1, math.ceil(over[2])))


def _plan_check(store: Store, token: str, event: dict, endpoint: str, index: int,
                record: Any, now: float, rejected: list[dict]) -> bool:
    """Hold an event against its project's tracking plan.  A violation is
    kept among the refusals; the event is stored anyway (the client is told
    nothing) unless the plan is enforced.  Returns whether to store it."""
    project = store.projects.get(token)
    plan = project.tracking_plan if project is not None else None
    if plan is None:
        return True
    enforce = project.plan_enforce  # read once: it may change meanwhile
    problems = _plan_violations(plan, event["event"], event["properties"])
    if not problems:
        return True
    reason = "tracking plan: " + "; ".join(problems)
    rejected.append(_rejection(endpoint, token, index, record, _Reject("tracking_plan", reason), now,
                               stored=not enforce))
    return not enforce


def _has_simplified_identity_event(store: Store, accepted: list[tuple[str, dict]]) -> bool:
    if _IDENTITY_EVENTS.isdisjoint(map(_EVENT_NAME, map(_SECOND, accepted))):
        return False  # the usual batch, read in C
    for token, event in accepted:
        if event["event"] in _IDENTITY_EVENTS:
            project = store.projects.get(token)
            if project is None or project.id_merge == "simplified":
                return True
    return False


def _import_is_strict(req: _Request, dialect: str) -> bool:
    """JSON/NDJSON /import is strict unless strict=0; the form dialect (what
    the Python and Node SDKs send) only with strict=1."""
    strict = req.param("strict")
    return strict != "0" if dialect == "json" else strict == "1"


def _import_answer(imported: int, failed: list[dict]) -> _Response:
    """/import's JSON answer: 200, or 400 listing the failed records while
    the valid ones are kept (R-import)."""
    if not failed:
        return _json(200, {"code": 200, "num_records_imported": imported, "status": "OK"})
    records = [{"index": r["index"], "insert_id": r["insert_id"], "field": r["field"],
                "message": r["reason"]} for r in failed]
    return _json(400, {"code": 400, "error": "some data points in the request failed validation",
                       "failed_records": records, "num_records_imported": imported,
                       "status": "Bad Request"})


def _import_failure(status: int, error: str) -> _Response:
    phrase = BaseHTTPRequestHandler.responses.get(status, ("Error",))[0]
    return _json(status, {"code": status, "error": error, "status": phrase})


def _ingest_profiles(store: Store, req: _Request, kind: str, endpoint: str) -> _Response:
    """Decode, check and apply a batch of profile (or group profile) updates."""
    _check_callback(req)
    now = store.now()
    try:
        records, _ = _read_records(req, ndjson=False)
    except _PayloadError as exc:
        _refuse_request(store, req, endpoint, str(exc))
        return _ingest_answer(req, False, str(exc))
    if len(records) > _MAX_BATCH:
        _refuse_request(store, req, endpoint, _too_many(len(records)), _record_token(records[0], kind))
        return _ingest_answer(req, False, _too_many(len(records)), status=413)
    fallback = _credential_token(store, req)
    sized = len(req.body) + len(req.raw.get("data") or "") >= _MAX_EVENT_BYTES
    req.records, req.record_kind = records, kind
    updates, rejected, dropped = _normalize_updates(records, kind, fallback, now, sized, store,
                                                    endpoint, req.plain_text)
    applied = store.apply_profile_updates(kind, updates, rejected, endpoint, now) + dropped
    failed = sorted((r for r in rejected if not r["dropped"]), key=_by_index)
    error = failed[0]["reason"] if failed else "no records in the request"
    return _ingest_answer(req, applied > 0, None if applied else error)


def _by_index(record: dict) -> Any:
    return record["index"]


def _track(store: Store, req: _Request) -> _Response:
    """Events from client SDKs.

    Mixpanel: GET/POST /track.  Any token is accepted (Mixpanel answers `1`
    for a token that names no project, too).
    """
    return _ingest_events(store, req, "/track")


def _import(store: Store, req: _Request) -> _Response:
    """Historical and server-side events.

    Mixpanel: POST /import (the Node SDK also GETs it).  Credentials are
    optional in relaxed mode; they only name the project.
    """
    return _ingest_events(store, req, "/import")


def _engage(store: Store, req: _Request) -> _Response:
    """User profile updates.  Mixpanel: GET/POST /engage."""
    return _ingest_profiles(store, req, "people", "/engage")


def _groups(store: Store, req: _Request) -> _Response:
    """Group profile updates.  Mixpanel: GET/POST /groups."""
    return _ingest_profiles(store, req, "groups", "/groups")


# --- feature flags (ingestion-api.md §9; sdks.md §1.4, §2.4) ---------------------
# Remote evaluation follows the SDKs' local evaluation step by step, so both
# agree for every context: test users, then the first rollout whose hash
# (FNV-1a 64 of the context value and a salt, mod 100) falls under its
# percentage and whose runtime rule holds, then a variant by its splits.


def _fnv1a_fraction(value: str, salt: str) -> float:
    """FNV-1a 64 of value+salt, mod 100, as a fraction (the SDKs' hash)."""
    digest = 0xCBF29CE484222325
    for byte in (value + salt).encode("utf-8"):
        digest = ((digest ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return (digest % 100) / 100.0


def _casefold_all(value: Any, keys: bool) -> Any:
    """Lower-case strings (and dict keys too, when ``keys``), as the SDKs do
    before a runtime rule runs."""
    if isinstance(value, str):
        return value.casefold()
    if isinstance(value, list):
        return [_casefold_all(item, keys) for item in value]
    if isinstance(value, dict):
        return {(k.casefold() if keys and isinstance(k, str) else k): _casefold_all(v, keys)
                for k, v in value.items()}
    return value


# The SDKs run runtime rules through json-logic (Python: json_logic 0.7.0a0,
# plus Mixpanel's semver_compare and datetime_compare).  Its semantics are
# imitated exactly, quirks included, because remote and local answers must
# agree: every argument is evaluated first (no short-circuit), a dict's first
# key is its operator, and any error makes the whole rule false.


def _logic_loose_equal(a: Any, b: Any) -> bool:
    """`==`: as text when either side is text, as truth values when either
    is a boolean, else plain equality."""
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) is bool(b)
    return a == b


def _logic_strict_equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _logic_less(a: Any, b: Any, *more: Any) -> bool:
    """`<`, chained for three arguments; numbers compare as floats when
    either side's exact type is int or float.  Other mixes may raise."""
    if {type(a), type(b)} & {int, float}:
        try:
            a, b = float(a), float(b)
        except TypeError:
            return False
    return a < b and (not more or _logic_less(b, *more))


def _logic_less_equal(a: Any, b: Any, *more: Any) -> bool:
    return ((_logic_less(a, b) or _logic_loose_equal(a, b))
            and (not more or _logic_less_equal(b, *more)))


def _logic_number(value: Any) -> Any:
    if isinstance(value, str):
        return float(value) if "." in value else int(value)
    return value


def _logic_minus(*args: Any) -> Any:
    if len(args) == 1:
        return -_logic_number(args[0])
    return _logic_number(args[0]) - _logic_number(args[1])


def _logic_merge(*args: Any) -> list:
    merged: list = []
    for arg in args:
        merged.extend(arg) if isinstance(arg, (list, tuple)) else merged.append(arg)
    return merged


def _logic_in(a: Any, b: Any) -> bool:
    return a in b if hasattr(b, "__contains__") else False


def _logic_product(*args: Any) -> float:
    total = 1.0
    for arg in args:
        total *= float(arg)
    return total


def _logic_divide(a: Any, b: Any = None) -> Any:
    return a if b is None else float(a) / float(b)


def _logic_if(*args: Any) -> Any:
    for index in range(0, len(args) - 1, 2):
        if args[index]:
            return args[index + 1]
    return args[-1] if len(args) % 2 else None


def _logic_all(*args: Any) -> Any:
    result: Any = True
    for arg in args:
        result = result and arg
    return result


def _logic_any(*args: Any) -> Any:
    result: Any = False
    for arg in args:
        result = result or arg
    return result


_LOGIC_MISSING = object()


def _logic_var(data: Any, name: Any = None, *default: Any) -> Any:
    """A dotted path into the data; a step that fails by key, type or
    number gives the default (an index past the end is an error)."""
    if len(default) > 1:
        raise TypeError("var takes a name and a default")
    try:
        for part in str(name).split("."):
            try:
                data = data[part]
            except TypeError:
                data = data[int(part)]
    except (KeyError, TypeError, ValueError):
        return default[0] if default else None
    return data


def _logic_missing(data: Any, *names: Any) -> list:
    if names and isinstance(names[0], list):
        names = tuple(names[0])
    return [name for name in names if _logic_var(data, name, _LOGIC_MISSING) is _LOGIC_MISSING]


def _logic_missing_some(data: Any, need: Any, names: Any) -> list:
    if need < 1:
        return []
    found, absent = 0, []
    for name in names:
        if _logic_var(data, name, _LOGIC_MISSING) is _LOGIC_MISSING:
            absent.append(name)
        else:
            found += 1
            if found >= need:
                return []
    return absent


_SEMVER_RE = re.compile(
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?$")
_RFC3339_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_EPOCH_UTC = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_LOGIC_MAX_DEPTH = 32  # definitions deeper than this are refused when set
_ORDER_TESTS: dict[str, Callable[[int], bool]] = {
    "===": lambda c: c == 0, "!==": lambda c: c != 0, "<": lambda c: c < 0,
    "<=": lambda c: c <= 0, ">": lambda c: c > 0, ">=": lambda c: c >= 0}


def _semver_key(text: str) -> tuple | None:
    """A SemVer 2.0.0 version (leading v dropped, missing minor or patch
    read as 0) as something that sorts by precedence, or None."""
    text = text.strip()
    if text[:1] in ("v", "V"):
        text = text[1:]
    cut = min([i for i in (text.find("-"), text.find("+")) if i >= 0] or [len(text)])
    core = text[:cut].split(".")
    text = ".".join(core + ["0"] * (3 - len(core))) + text[cut:]
    match = _SEMVER_RE.match(text)
    if match is None:
        return None
    numbers = tuple((len(part), part) for part in match.groups()[:3])
    pre = match.group(4)
    if pre is None:
        return numbers + ((1,),)  # a release ranks above its prereleases
    fields = tuple((0, len(f), f) if f.isdigit() else (1, 0, f) for f in pre.split("."))
    return numbers + ((0, fields),)


def _logic_semver(*args: Any) -> bool:
    """Mixpanel's semver_compare: [actual, comparator, target]."""
    if len(args) != 3 or not all(isinstance(arg, str) for arg in args):
        return False
    actual, symbol, target = args
    if len(actual) > 256 or len(target) > 256 or symbol not in _ORDER_TESTS:
        return False
    left, right = _semver_key(actual), _semver_key(target)
    if left is None or right is None:
        return False
    return _ORDER_TESTS[symbol]((left > right) - (left < right))


def _rfc3339_seconds(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    match = _RFC3339_RE.match(value.strip().upper())
    if match is None:
        return None
    offset = match.group(7)
    shift = 0
    if offset != "Z":
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            return None
        shift = (hours * 3600 + minutes * 60) * (-1 if offset[0] == "-" else 1)
    try:
        moment = datetime.datetime(*(int(match.group(i)) for i in range(1, 7)),
                                   tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return int((moment - _EPOCH_UTC).total_seconds()) - shift


def _logic_datetime(*args: Any) -> bool:
    """Mixpanel's datetime_compare: [RFC 3339 actual, comparator, epoch ms target]."""
    if len(args) != 3 or not isinstance(args[1], str) or args[1] not in _ORDER_TESTS:
        return False
    actual, symbol, target = args
    seconds = _rfc3339_seconds(actual)
    if seconds is None or isinstance(target, bool) or not isinstance(target, (int, float)):
        return False
    if isinstance(target, float) and not math.isfinite(target):
        return False
    if abs(int(target)) >= 2 ** 63:
        return False
    whole = abs(int(target)) // 1000
    return _ORDER_TESTS[symbol](seconds - (-whole if int(target) < 0 else whole))


_LOGIC_OPERATORS: dict[str, Callable[..., Any]] = {
    "==": _logic_loose_equal, "===": _logic_strict_equal,
    "!=": lambda a, b: not _logic_loose_equal(a, b),
    "!==": lambda a, b: not _logic_strict_equal(a, b),
    ">": lambda a, b: _logic_less(b, a),
    ">=": lambda a, b: _logic_less(b, a) or _logic_loose_equal(a, b),
    "<": _logic_less, "<=": _logic_less_equal,
    "!": lambda a: not a, "!!": bool, "%": lambda a, b: a % b,
    "and": _logic_all, "or": _logic_any, "?:": lambda a, b, c: b if a else c, "if": _logic_if,
    "log": lambda a: a, "in": _logic_in,
    "cat": lambda *args: "".join(str(arg) for arg in args),
    "+": lambda *args: sum(_logic_number(arg) for arg in args), "*": _logic_product,
    "-": _logic_minus, "/": _logic_divide,
    "min": lambda *args: min(args), "max": lambda *args: max(args),
    "merge": _logic_merge, "count": lambda *args: sum(1 for arg in args if arg),
    "semver_compare": _logic_semver, "datetime_compare": _logic_datetime,
}


def _json_logic(rule: Any, data: Any, depth: int = 0) -> Any:
    """Evaluate a rule the way the SDKs' json-logic does; raises on what
    makes the SDK's evaluation fail."""
    if depth > _LOGIC_MAX_DEPTH:
        raise ValueError("rule nested too deeply")
    if not isinstance(rule, dict):
        return rule
    data = data or {}
    operator = next(iter(rule))  # an empty rule raises, as in the SDK
    args = rule[operator]
    if not isinstance(args, (list, tuple)):
        args = [args]
    values = [_json_logic(arg, data, depth + 1) for arg in args]
    if operator == "var":
        return _logic_var(data, *values)
    if operator == "missing":
        return _logic_missing(data, *values)
    if operator == "missing_some":
        return _logic_missing_some(data, *values)
    function = _LOGIC_OPERATORS.get(operator)
    if function is None:
        raise ValueError(f"unknown JSONLogic operator {operator!r}")
    return function(*values)


def _rollout_applies(rollout: dict, context: dict) -> bool:
    """A rollout's runtime rule (or its legacy exact-match definition)
    against the context's lower-cased custom_properties."""
    rule = rollout.get("runtime_evaluation_rule")
    legacy = rollout.get("runtime_evaluation_definition")
    if not rule and not legacy:
        return True
    custom = context.get("custom_properties")
    if not isinstance(custom, dict) or not custom:
        return False
    try:
        data = _casefold_all(custom, keys=True)
        if rule:
            return bool(_json_logic(_casefold_all(rule, keys=False), data))
    except Exception:  # an unsupported or failing rule: not satisfied, as in the SDKs
        return False
    return all(key in data and isinstance(data[key], str) and isinstance(expected, str)
               and data[key].casefold() == expected.casefold() for key, expected in legacy.items())


def _evaluate_flag(flag: dict, context: dict) -> dict | None:
    """The variant a context gets, as /flags returns it, or None."""
    value = context.get(flag.get("context", "distinct_id"))
    if not value:
        return None
    ruleset = flag["ruleset"]
    # The SDKs sort variants by key once fetched; the order decides splits.
    variants = sorted(ruleset["variants"], key=lambda variant: variant["key"])

    def chosen(variant: dict, qa: bool = False) -> dict:
        return {"variant_key": variant["key"], "variant_value": variant.get("value"),
                "experiment_id": flag.get("experiment_id"),
                "is_experiment_active": flag.get("is_experiment_active"), "is_qa_tester": qa}

    def named(key: Any) -> dict | None:
        if not isinstance(key, str):
            return None
        return next((v for v in variants if v["key"].casefold() == key.casefold()), None)

    users = (ruleset.get("test") or {}).get("users") or {}
    # A falsy id or variant key is no test user (the SDK's walrus checks).
    wanted = users.get(context.get("distinct_id")) if context.get("distinct_id") else None
    tester = named(wanted) if wanted else None
    if tester is not None:
        return chosen(tester, qa=True)
    salt_base = flag.get("hash_salt")
    for index, rollout in enumerate(ruleset.get("rollout") or []):
        salt = flag["key"] + (salt_base + str(index) if salt_base is not None else "rollout")
        if _fnv1a_fraction(str(value), salt) >= rollout.get("rollout_percentage", 0):
            continue
        if not _rollout_applies(rollout, context):
            continue
        override = named((rollout.get("variant_override") or {}).get("key"))
        if override is not None:
            return dict(chosen(override), is_qa_tester=True)
        splits = rollout.get("variant_splits") or {}
        hashed = _fnv1a_fraction(str(value), flag["key"] + (salt_base or "") + "variant")
        picked, total = variants[0], 0.0
        for variant in variants:
            picked = variant
            total += splits.get(variant["key"], variant.get("split", 0))
            if hashed < total:
                break
        return chosen(picked)
    return None


def _flags_project(store: Store, req: _Request) -> Project:
    """The project a flags call is for: Basic token (or secret, service
    account) as the SDKs send it, or ?token=."""
    token = _credential_token(store, req)
    if token is None and not (store.strict_auth and req.basic_auth() is not None):
        token = req.param("token")  # strict: wrong credentials are not rescued by ?token=
    with store.lock:
        project = store.projects.get(token) if token else None
    if project is None:
        if token and not store.strict_auth:
            return Project(token)  # relaxed mode: an unknown project has no flags yet
        raise ApiError(401, {"error": "unknown project: send the token (Basic token:) or ?token=",
                             "status": "error"})
    return project


def _flags_definitions(store: Store, req: _Request) -> _Response:
    """Flag definitions for the SDKs' local evaluation.  GET /flags/definitions."""
    project = _flags_project(store, req)
    return _json(200, {"flags": list(project.flags)})


def _flags(store: Store, req: _Request) -> _Response:
    """Remote evaluation: the variants a context gets.  GET /flags.

    Status 200 (Node needs it) and a `code` key (Python needs it); only
    flags whose rollout the context is in are listed (OAS-flags)."""
    project = _flags_project(store, req)
    text = req.param("context")
    if text is None and req.is_json:  # a POST with {"context": {...}}
        try:
            body = _loads(req.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            body = None
        text = json.dumps(body.get("context")) if isinstance(body, dict) and "context" in body else None
    try:
        context = _loads(text or "")
        json.dumps(context, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError:
        raise ApiError(400, {"error": "context is not valid JSON (an object with distinct_id)",
                             "status": "error"}) from None
    if not isinstance(context, dict) or not isinstance(context.get("distinct_id"), str):
        raise ApiError(400, {"error": "distinct_id must be provided in evalContext as a string",
                             "status": "error"})
    only = req.param("flag_key")
    flags = {}
    for flag in project.flags:
        if only is not None and flag["key"] != only:
            continue
        variant = _evaluate_flag(flag, context)
        if variant is not None:
            flags[flag["key"]] = variant
    return _json(200, {"code": 200, "flags": flags, "pending_first_time_events": []})


def _flags_first_time_events(store: Store, req: _Request) -> _Response:
    """POST /flags/{id}/first-time-events: accepted, as Mixpanel does (JS, Swift)."""
    _flags_project(store, req)  # credentials are checked as for /flags
    return _json(200, {})


# --- session replay and remote settings (sdks.md §3.6, §3.8) -----------------------

_RECORD_FIELDS = ("replay_id", "seq", "distinct_id", "$device_id", "$user_id", "batch_start_time",
                  "replay_start_time", "replay_length_ms", "replay_start_url", "$current_url",
                  "format", "mp_lib", "$lib_version")


def _record(store: Store, req: _Request) -> _Response:
    """A session-replay batch: POST /record/?replay_id&seq&...&format=gzip|body.

    The browser SDK gzips without a Content-Encoding header (`format=gzip`)
    and needs 200 with a JSON body, or its recorder stops (sdks.md §3.6)."""
    query = {name: _unquote(value) for name, value in _parse_pairs(req.query).items()}
    token = _credential_token(store, req) or query.get("token")
    if not token:
        raise ApiError(401, {"error": "session replay needs the token: Authorization: Basic <token>:",
                             "status": "error"})
    if not query.get("replay_id"):
        raise ApiError(400, {"error": "replay_id, missing or empty", "status": "error"})
    try:
        seq = int(query.get("seq", ""))
    except ValueError:
        raise ApiError(400, {"error": "seq, missing or not an integer", "status": "error"}) from None
    body = req.body
    if body[:2] == b"\x1f\x8b":  # format=gzip, or a client that says so in Content-Encoding
        body = _gunzip(body, _MAX_BODY_BYTES)
    try:
        events = _loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        events = None
    if not isinstance(events, list) or not all(isinstance(event, dict) for event in events):
        raise ApiError(400, {"error": "the body is a JSON array of rrweb events (gzip when format=gzip)",
                             "status": "error"})
    batch = {name: query[name] for name in _RECORD_FIELDS if name in query}
    batch.update(seq=seq, events=events, project=token)
    with store.lock:
        _, state = store._project_locked(token)
        batch["time"] = store.now()
        state.recordings.append(batch)
        store.changed.notify_all()
    req.records = [{"replay_id": batch["replay_id"], "seq": seq, "events": len(events)}]
    return _json(200, {"code": 200, "status": "OK"})


def _settings(store: Store, req: _Request) -> _Response:
    """Remote settings for the browser SDK: GET /settings/?sdk_config=1.
    The SDK reads {"sdk_config": {"config": {...}}}; set it per project."""
    project = _flags_project(store, req)
    return _json(200, {"sdk_config": {"config": dict(project.sdk_config)}})


# =============================================================================
# Queries: export, engage, events, segmentation, funnels, retention, ...
# (query-api.md; choices in the README's "Query API" section)
# =============================================================================

_EXPORT_MAX_LIMIT = 100000
_ENGAGE_PAGE_SIZE = 1000
_ENGAGE_SESSIONS = 64          # frozen engage result sets kept per project
_UNITS = ("minute", "hour", "day", "week", "month")
# Guards against answers too big to be useful (a minute series over years).
_MAX_BUCKETS = 50000
_MAX_CELLS = 2_000_000  # segments x buckets
_MAX_FUNNEL_CELLS = 100_000  # funnel step objects (dates x segments x steps), ~150 bytes each
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class _Query:
    """One query request: its parameters (query string, form and JSON body
    merged), its project, and Mixpanel's error shapes."""

    __slots__ = ("store", "req", "params", "project", "state", "tz", "now")

    def __init__(self, store: Store, req: _Request):
        self.store = store
        self.req = req
        self.params: dict[str, Any] = {name: _unquote(raw) for name, raw in req.raw.items()}
        if req.is_json:
            try:
                body = _loads(req.body.decode("utf-8", "surrogateescape"))
            except ValueError as exc:
                raise self.error(400, f"invalid JSON body: {exc}") from None
            if isinstance(body, dict):
                self.params.update(body)
        self.project, self.state = self._resolve()
        self.tz = _zone(self.project.timezone)
        self.now = store.now()
        if store.rate_limits:
            self._rate_limit()

    def _rate_limit(self) -> None:
        """Mixpanel's query limits, when configured: per hour and concurrent
        (the 429 text is Mixpanel's, AB-429); export has its own."""
        token = self.project.token
        store = self.store
        export = self.req.path == "/api/2.0/export"
        concurrent = store.rate_limits.get("concurrent")
        counted = False
        if concurrent is not None and not export:
            if store.running(token, +1) > concurrent[0]:
                store.running(token, -1)
                raise self._too_many(None, None, 1)
            counted = True
        over = store.rate_check(token, ("exports", "exports_hour") if export else ("queries",))
        if over is not None:
            if counted:
                store.running(token, -1)
            if over[3] != "queries":
                error = self.error(429, f"Export rate limit exceeded for project_id: "
                                        f"{self.project.project_id}: {over[0] + 1}/{over[1]} exports "
                                        f"in the last {'second' if over[3] == 'exports' else 'hour'}")
                error.headers["Retry-After"] = str(max(1, math.ceil(over[2])))
                raise error
            raise self._too_many(over[0] + 1, over[1], over[2])
        if counted:
            self.req.cleanup.append(functools.partial(store.running, token, -1))

    def _too_many(self, used: int | None, limit: int | None, wait: float) -> ApiError:
        store = self.store
        concurrent = store.rate_limits.get("concurrent", (5, None))[0]
        hourly = store.rate_limits.get("queries", (60, None))[0]
        with store.lock:
            running = store._running.get(self.project.token, 0)
            window = store._rate_windows.get((self.project.token, "queries"), ())
            in_hour = sum(n for _, n in window)
        message = (f"Query rate limit exceeded for project_id: {self.project.project_id}. "
                   f"{running}/{concurrent} queries running concurrently and "
                   f"{used if used is not None else in_hour}/{limit if limit is not None else hourly} "
                   "queries running in the last hour. For more information, please consult our "
                   "documentation at https://help.mixpanel.com/hc/en-us/articles/"
                   "115004602563-Rate-Limits-for-Export-API-Endpoints")
        error = self.error(429, message)
        error.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return error

    def error(self, status: int, message: str) -> ApiError:
        """Mixpanel's query error: the request echoed, and the message."""
        query = _redacted_query(self.req.query)
        request = self.req.raw_path + ("?" + query if query else "")
        return ApiError(status, {"request": request, "error": message})

    def _resolve(self) -> tuple[Project, _ProjectState]:
        """The project the credentials name (README: "Credentials")."""
        store = self.store
        auth = self.req.basic_auth()
        project_id = self.params.get("project_id")
        project_id = None if project_id in (None, "") else str(project_id)
        token = None
        if auth is not None:
            token = store.project_by_credentials(auth[0], auth[1], project_id)
            if token is None or token not in store.projects:
                raise self.error(401, "Unauthorized, invalid project secret. See docs for more "
                                      "information: https://developer.mixpanel.com/reference/"
                                      "authentication#project-secret")
        elif store.strict_auth:
            raise self.error(401, "Unauthorized, invalid project secret. See docs for more "
                                  "information: https://developer.mixpanel.com/reference/"
                                  "authentication#project-secret")
        elif project_id:
            token = store.project_by_id(str(project_id))
            if token is None:
                raise self.error(401, f"Unauthorized, no project with project_id {project_id}")
        else:
            with store.lock:
                tokens = [t for t in store.projects]
            if len(tokens) != 1:
                raise self.error(401, "Unauthorized: send a service account (user:secret with "
                                      "?project_id=) or a project secret; with no credentials the "
                                      f"fake only answers when it has exactly one project "
                                      f"(it has {len(tokens)})")
            token = tokens[0]
        with store.lock:
            project, state = store._project_locked(token)
        return project, state

    # --- parameters ---------------------------------------------------------

    def text(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.params.get(name)
        if value is None or value == "":
            if required:
                raise self.error(400, f"{name} is a required parameter")
            return default
        return value if isinstance(value, str) else json.dumps(value)

    def integer(self, name: str, default: int, low: int = 0, high: int | None = None) -> int:
        value = self.params.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise self.error(400, f"{name} must be an integer") from None
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.error(400, f"{name} must be {bound}")
        return number

    def flag(self, name: str) -> bool:
        return str(self.params.get(name, "")).lower() in ("1", "true")

    def json_value(self, name: str, default: Any = None) -> Any:
        value = self.params.get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            return value
        try:
            return _loads(value)
        except ValueError:
            raise self.error(400, f"{name} must be JSON, got {value[:80]!r}") from None

    def names(self, name: str, required: bool = False) -> list[str] | None:
        """A JSON array of event names (`event=["a","b"]`); a bare name too."""
        value = self.params.get(name)
        if value is None or value == "":
            if required:
                raise self.error(400, f"{name} is a required parameter")
            return None
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = self.json_value(name)
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(400, f"{name} must be a JSON array of event names")
        return value

    def expression(self, name: str, *aliases: str) -> _Expression | None:
        text = None
        for key in (name,) + aliases:
            text = self.text(key)
            if text:
                break
        if not text:
            return None
        try:
            return _compile_expression(text)
        except ExpressionError as exc:
            raise self.error(400, f"invalid {name}: {exc}") from None

    def choice(self, name: str, options: tuple, default: str) -> str:
        value = self.text(name, default)
        if value not in options:
            raise self.error(400, f"{name} must be one of {', '.join(options)}")
        return value

    def date_range(self, utc: bool = False) -> tuple[datetime.date, datetime.date]:
        """`from_date`/`to_date` (inclusive), or the last `interval` units."""
        today = self.today(utc)
        if self.params.get("from_date") in (None, "") and self.params.get("interval") not in (None, ""):
            unit = self.text("unit", "day")
            count = self.integer("interval", 1, low=1, high=3650)
            start = _bucket_start(unit if unit in ("week", "month") else "day", today)
            for _ in range(count - 1):
                start = _bucket_start(unit if unit in ("week", "month") else "day",
                                      start - datetime.timedelta(days=1))
            return start, today
        first = self.date("from_date", required=True)
        last = self.date("to_date", required=True)
        if first > last:
            raise self.error(400, "from_date cannot be later than to_date")
        per_day = {"minute": 1440, "hour": 24}.get(str(self.params.get("unit")), 1)
        buckets = ((last - first).days + 1) * per_day
        if buckets > _MAX_BUCKETS:
            raise self.error(400, f"the range holds {buckets} time buckets; the fake answers at most "
                                  f"{_MAX_BUCKETS}: shorten it or use a larger unit")
        return first, last

    def date(self, name: str, required: bool = False) -> datetime.date:
        text = self.text(name, required=required)
        if text is None:
            return self.today()
        if not _DATE_RE.match(text):
            raise self.error(400, f"Error in {name}: invalid date, expected YYYY-MM-DD")
        try:
            value = datetime.date.fromisoformat(text)
        except ValueError:
            raise self.error(400, f"Error in {name}: invalid date") from None
        if not 2000 <= value.year <= 2100:
            raise self.error(400, f"Error in {name}: invalid date, bad year")
        return value

    def series(self, buckets: _Buckets, first: datetime.date, last: datetime.date) -> list[str]:
        """The bucket labels of the range; with `interval` and hour or minute
        units, the last `interval` of them up to now (query-api.md §6)."""
        labels = buckets.series(first, last)
        if (buckets.unit in ("minute", "hour") and self.params.get("from_date") in (None, "")
                and self.params.get("interval") not in (None, "")):
            now_label = buckets.label(self.now)
            labels = [label for label in labels if label <= now_label][-self.integer("interval", 1, low=1):]
        return labels

    def today(self, utc: bool = False) -> datetime.date:
        zone = datetime.timezone.utc if utc else self.tz
        return datetime.datetime.fromtimestamp(self.now, zone).date()

    def bounds(self, first: datetime.date, last: datetime.date, utc: bool = False) -> tuple[float, float]:
        """Epoch seconds from the start of ``first`` to the end of ``last``."""
        zone = datetime.timezone.utc if utc else self.tz
        start = datetime.datetime.combine(first, datetime.time(), zone).timestamp()
        end = datetime.datetime.combine(last + datetime.timedelta(days=1), datetime.time(), zone)
        return start, end.timestamp()

    # --- the events a report counts -----------------------------------------

    def events(self, start: float, end: float, names: list[str] | None,
               where: _Expression | None, ordered: bool = False) -> list[tuple[dict, Any]]:
        """``(event, canonical distinct_id)`` in [start, end), deduplicated as
        reports are (the latest copy wins), filtered by ``where``; in time
        order when ``ordered``.  The hot loop of every report."""
        with self.store.lock:
            events = self.state.events  # append-only: the first `count` stay put
            count = len(events)
        picked: dict[Any, dict] = {}
        if names is not None and len(names) == 1:
            only = names[0]
            for event in itertools.islice(events, count):
                if event["event"] != only:
                    continue
                props = event["properties"]
                ts = props["time"]
                if start <= ts < end:
                    picked[(props.get("distinct_id"), ts, props.get("$insert_id"))] = event
        else:
            wanted = None if names is None else frozenset(names)
            for event in itertools.islice(events, count):
                name = event["event"]
                if wanted is not None and name not in wanted:
                    continue
                props = event["properties"]
                ts = props["time"]
                if start <= ts < end:
                    picked[(name, props.get("distinct_id"), ts, props.get("$insert_id"))] = event
        canonical = self.state.identity.canonical.get
        scope = _Scope() if where is not None and (where.uses_user or where.uses_behaviors) else None
        profiles = self.state.profiles
        rows = []
        for event in picked.values():
            props = event["properties"]
            raw = props.get("distinct_id")
            person = raw
            if raw is not None:
                if type(raw) is not str:
                    person = _id_text(raw)
                person = canonical(person, person)
                if person != raw:
                    # Reports see the canonical id, as export shows it (D-EXP).
                    props = dict(props, distinct_id=person)
                    event = {"event": event["event"], "properties": props}
            if where is not None:
                if scope is not None:
                    scope.event = event["event"]
                    scope.user = profiles.get(person) if person is not None else None
                    if not where.matches(props, scope):
                        continue
                elif not where.matches(props):
                    continue
            rows.append((event, person))
        if ordered:
            rows.sort(key=_event_time)
        return rows


    def scope(self, expression: _Expression, event: dict, person: Any) -> _Scope:
        """What `user[...]` and `event[...]` read for one event's row."""
        if not expression.uses_user:
            return _NO_SCOPE
        user = self.state.profiles.get(person) if person is not None else None
        return _Scope(event["event"], user)


def _event_time(row: tuple[dict, Any]) -> Any:
    return row[0]["properties"]["time"]


class _Buckets:
    """Epoch seconds to the label of their time bucket, in the project
    timezone; offsets are cached per hour, so a million events stay cheap."""

    def __init__(self, unit: str, tz: datetime.tzinfo, first: datetime.date | None = None,
                 days: int = 0):
        self.unit = unit
        self.tz = tz
        self.first = first
        self.days = days  # `interval`: buckets of N days from `first`
        self.offsets: dict[int, float] = {}
        self.labels: dict[int, str] = {}

    def local(self, ts: float) -> float:
        # Offsets change on quarter hours at most (Lord Howe moves by 30 min).
        quarter = int(ts // 900)
        offset = self.offsets.get(quarter)
        if offset is None:
            moment = datetime.datetime.fromtimestamp(quarter * 900, self.tz)
            offset = self.offsets[quarter] = moment.utcoffset().total_seconds()
        return ts + offset

    def label(self, ts: float) -> str:
        local = self.local(ts)
        if self.unit == "minute":
            slot = int(local // 60)
        elif self.unit == "hour":
            slot = int(local // 3600)
        else:
            slot = int(local // 86400)
        found = self.labels.get(slot)
        if found is None:
            found = self.labels[slot] = self._name(slot)
        return found

    def _name(self, slot: int) -> str:
        if self.unit == "minute":
            moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(minutes=slot)
            return moment.strftime("%Y-%m-%d %H:%M:00")
        if self.unit == "hour":
            moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(hours=slot)
            return moment.strftime("%Y-%m-%d %H:00:00")
        day = datetime.date(1970, 1, 1) + datetime.timedelta(days=slot)
        if self.days and self.first is not None:
            day = self.first + datetime.timedelta(days=((day - self.first).days // self.days) * self.days)
            return day.isoformat()
        return _bucket_start(self.unit, day).isoformat()

    def series(self, first: datetime.date, last: datetime.date) -> list[str]:
        """Every label from ``first`` to ``last``, in order (zero-filled)."""
        labels = []
        if self.unit in ("minute", "hour"):
            step = 60 if self.unit == "minute" else 3600
            start = datetime.datetime.combine(first, datetime.time())
            end = datetime.datetime.combine(last + datetime.timedelta(days=1), datetime.time())
            moment = start
            while moment < end:
                labels.append(moment.strftime("%Y-%m-%d %H:%M:00" if step == 60 else "%Y-%m-%d %H:00:00"))
                moment += datetime.timedelta(seconds=step)
            return labels
        day = first
        while day <= last:
            if self.days:
                name = (first + datetime.timedelta(
                    days=((day - first).days // self.days) * self.days)).isoformat()
            else:
                name = _bucket_start(self.unit, day).isoformat()
            if not labels or labels[-1] != name:
                labels.append(name)
            day += datetime.timedelta(days=1)
        return labels


def _bucket_start(unit: str, day: datetime.date) -> datetime.date:
    """Weeks start on Monday (Mixpanel's examples), months on the 1st."""
    if unit == "week":
        return day - datetime.timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    return day


def _segment_keys(value: Any) -> list[str]:
    """The segment(s) an `on` value counts in: lists count once per item;
    undefined counts nowhere (README: a choice)."""
    if value is _UNDEF:
        return []
    if isinstance(value, list):
        keys: list[str] = []
        for item in value:
            for key in _segment_keys(item):
                if key not in keys:
                    keys.append(key)
        return keys
    if value is None:
        return ["null"]
    text = _fn_string(value)
    return [text] if isinstance(text, str) else []


def _computed_at(q: _Query) -> str:
    return datetime.datetime.fromtimestamp(q.now, datetime.timezone.utc).isoformat()


def _count_series(rows: list[tuple[dict, Any]], buckets: _Buckets, kind: str,
                  key_of: Callable[[dict], list[str]]) -> dict[str, dict[str, Any]]:
    """{segment: {bucket: value}} for general, unique or average counts."""
    totals: dict[str, dict[str, int]] = {}
    people: dict[str, dict[str, set]] = {}
    for event, person in rows:
        label = buckets.label(event["properties"]["time"])
        for key in key_of(event, person):
            totals.setdefault(key, {}).setdefault(label, 0)
            totals[key][label] += 1
            if kind != "general" and person is not None:
                people.setdefault(key, {}).setdefault(label, set()).add(person)
    if kind == "general":
        return totals
    if kind == "unique":
        return {key: {label: len(ids) for label, ids in labels.items()}
                for key, labels in people.items()}
    return {key: {label: round(count / len(people[key][label]), 6)
                  for label, count in labels.items() if people.get(key, {}).get(label)}
            for key, labels in totals.items()}


def _top(values: dict[str, dict[str, Any]], limit: int) -> dict[str, dict[str, Any]]:
    ranked = sorted(values.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    return dict(ranked[:limit])


def _fill(values: dict[str, dict[str, Any]], series: list[str]) -> dict[str, dict[str, Any]]:
    if len(values) * len(series) > _MAX_CELLS:
        raise ApiError(400, {"error": f"{len(values)} segments x {len(series)} buckets is more than the "
                                      f"fake answers ({_MAX_CELLS}): lower limit or shorten the range"})
    return {key: {label: counts.get(label, 0) for label in series} for key, counts in values.items()}


# --- raw export ----------------------------------------------------------------


def _export(store: Store, req: _Request) -> _Response:
    """Every stored copy as JSONL, streamed in constant memory.

    Mixpanel: GET /api/2.0/export (data.mixpanel.com).  Dates are UTC days
    (projects created since 2023); errors are plain text, as Mixpanel's are.
    """
    try:
        q = _Query(store, req)
        first, last = q.date_range(utc=True)
        if last > q.today():  # "today" in the project timezone (AB, TAP)
            raise q.error(400, "to_date cannot be later than today")
        names = q.names("event")
        where = q.expression("where")
        limit = q.integer("limit", 0, low=0, high=_EXPORT_MAX_LIMIT) if q.params.get("limit") else None
        in_ms = q.flag("time_in_ms")
    except ApiError as exc:
        message = exc.body.get("error", "") if isinstance(exc.body, dict) else str(exc.body)
        raise ApiError(exc.status, message, "text/plain; charset=utf-8", exc.headers) from None
    start, end = q.bounds(first, last, utc=True)
    with store.lock:
        events = q.state.events
        count = len(events)
    resolve = q.state.identity.resolve
    wanted = None if names is None else set(names)

    profiles = q.state.profiles

    def lines() -> Any:
        if limit == 0:
            return
        sent = 0
        for event in itertools.islice(events, count):
            if wanted is not None and event["event"] not in wanted:
                continue
            props = event["properties"]
            if not start <= props["time"] < end:
                continue
            if where is not None:
                # The filter sees what export shows: the canonical distinct_id.
                raw = _id_text(props.get("distinct_id"))
                person = resolve(raw) if raw is not None else None
                seen = props if person == raw else dict(props, distinct_id=person)
                scope = _Scope(event["event"], profiles.get(person)) if where.uses_user else _NO_SCOPE
                if not where.matches(seen, scope):
                    continue
            yield _dumps({"event": event["event"],
                          "properties": _export_properties(props, resolve, in_ms)}) + b"\n"
            sent += 1
            if limit is not None and sent >= limit:
                return

    return _Response(200, _batched(lines()), "text/plain; charset=utf-8")


def _export_properties(props: dict, resolve: Callable[[str], str], in_ms: bool) -> dict:
    """What export shows of a stored event: no token, the canonical
    distinct_id (the original kept as `$distinct_id_before_identity`), and
    `time` in whole seconds, or milliseconds with time_in_ms."""
    out = {k: v for k, v in props.items() if k != "token"}
    ts = props["time"]
    out["time"] = int(round(ts * 1000)) if in_ms else int(ts)
    distinct_id = _id_text(props.get("distinct_id"))
    if distinct_id is not None:
        canonical = resolve(distinct_id)
        if canonical != distinct_id:
            out["distinct_id"] = canonical
            out["$distinct_id_before_identity"] = props["distinct_id"]
    return out


def _batched(chunks: Any, size: int = 64 * 1024) -> Any:
    """Join small pieces into writes of about ``size`` bytes."""
    buffer: list[bytes] = []
    held = 0
    for chunk in chunks:
        buffer.append(chunk)
        held += len(chunk)
        if held >= size:
            yield b"".join(buffer)
            buffer, held = [], 0
    if buffer:
        yield b"".join(buffer)


# --- engage (profile query) ------------------------------------------------------


def _engage_query(store: Store, req: _Request) -> _Response:
    """Profiles matching `where`/`selector`, ids, a cohort, or a group key.

    Mixpanel: POST /api/query/engage.  The result set is frozen per
    `session_id`; pages past the end are empty; `total` counts every match.
    """
    q = _Query(store, req)
    page = q.integer("page", 0)
    page_size = q.integer("page_size", _ENGAGE_PAGE_SIZE, low=1, high=10000)
    session_id = q.text("session_id")
    if page > 0 and not session_id:
        raise q.error(400, "session_id is required for page > 0")
    if session_id:
        with store.lock:
            results = q.state.sessions.get(session_id)
        if results is None:
            raise q.error(400, f"unknown or expired session_id {session_id!r}")
    else:
        results = _engage_results(q)
        session_id = f"{int(q.now)}-{os.urandom(4).hex()}"
        with store.lock:
            sessions = q.state.sessions
            sessions[session_id] = results
            while len(sessions) > _ENGAGE_SESSIONS:
                sessions.pop(next(iter(sessions)))
    chunk = results[page * page_size:(page + 1) * page_size]
    return _json(200, {"page": page, "page_size": page_size, "session_id": session_id,
                       "status": "ok", "total": len(results), "results": chunk})


def _engage_results(q: _Query) -> list[dict]:
    where = q.expression("where", "selector")
    wanted = q.json_value("distinct_ids")
    one = q.text("distinct_id")
    if one is not None:
        wanted = [one]
    if wanted is not None and (not isinstance(wanted, list) or
                               any(_id_text(v) is None for v in wanted)):
        raise q.error(400, "distinct_ids must be a JSON array of ids")
    outputs = q.json_value("output_properties")
    if outputs is not None and (not isinstance(outputs, list) or
                                not all(isinstance(v, str) for v in outputs)):
        raise q.error(400, "output_properties must be a JSON array of property names")
    if q.params.get("behaviors") and q.params.get("filter_by_cohort"):
        raise q.error(400, "behaviors and filter_by_cohort cannot be used together")
    members = _cohort_members(q)
    behaviors = _engage_behaviors(q)
    group_key = q.text("data_group_id")
    with q.store.lock:
        if group_key is not None:
            table = {key[1]: props for key, props in q.state.groups.items()
                     if key[0] == group_key or str(_group_key_id(key[0])) == group_key}
        else:
            table = dict(q.state.profiles)
    if wanted is not None:
        order = [_id_text(v) for v in wanted]
        candidates = [(i, table[i]) for i in dict.fromkeys(order) if i in table]
    else:
        candidates = sorted(table.items(), key=lambda item: item[0])
    results = []
    for distinct_id, props in candidates:
        if members is not None and distinct_id not in members:
            continue
        if where is not None:
            if behaviors is None:
                if not where.matches(props):
                    continue
            else:
                person = q.state.identity.resolve(distinct_id)
                scope = _Scope(behaviors={name: counts.get(person, 0) for name, counts in behaviors.items()})
                if not where.matches(props, scope):
                    continue
        shown = props if outputs is None else {k: props[k] for k in outputs if k in props}
        results.append({"$distinct_id": distinct_id, "$properties": shown})
    include_all = str(q.params.get("include_all_users", "true")).lower() not in ("false", "0")
    if (members is not None and group_key is None and include_all and where is None
            and wanted is None):
        # Cohort members with no profile (include_all_users defaults to true).
        known = {r["$distinct_id"] for r in results}
        for distinct_id in sorted(members - known - set(table)):
            results.append({"$distinct_id": distinct_id, "$properties": {}})
    return results


_WINDOW_RE = re.compile(r"^(\d{1,4})([dw]?)$")


def _engage_behaviors(q: _Query) -> dict[str, dict[Any, int]] | None:
    """`behaviors=[{"name","window","event_selectors":[{"event","selector"?}]}]`:
    for each, how many matching events each person did in the window (days
    `"30d"` or weeks `"4w"`) before `as_of_timestamp` (default: now)."""
    spec = q.json_value("behaviors")
    if spec is None:
        return None
    if not isinstance(spec, list):
        raise q.error(400, "behaviors must be a JSON array")
    as_of = q.integer("as_of_timestamp", int(q.now), low=0)
    counts: dict[str, dict[Any, int]] = {}
    for behavior in spec:
        window = _WINDOW_RE.match(str(behavior.get("window", "")) if isinstance(behavior, dict) else "")
        selectors = behavior.get("event_selectors") if isinstance(behavior, dict) else None
        if (window is None or not isinstance(behavior.get("name"), str) or not isinstance(selectors, list)
                or not all(isinstance(s, dict) and isinstance(s.get("event"), str) for s in selectors)):
            raise q.error(400, 'each behavior needs {"name", "window": "30d", '
                               '"event_selectors": [{"event", "selector"?}]}')
        days = int(window.group(1)) * (7 if window.group(2) == "w" else 1)
        tests = []
        for selector in selectors:
            text = selector.get("selector")
            if text is not None and not isinstance(text, str):
                raise q.error(400, "a behavior's selector must be an expression (text)")
            try:
                tests.append((selector["event"], _compile_expression(text) if text else None))
            except ExpressionError as exc:
                raise q.error(400, f"invalid selector: {exc}") from None
        per_person = counts[behavior["name"]] = {}
        rows = q.events(as_of - days * 86400, as_of + 1, [name for name, _ in tests], None)
        for event, person in rows:
            if person is not None and any(event["event"] == name and (test is None or test.matches(
                    event["properties"])) for name, test in tests):
                per_person[person] = per_person.get(person, 0) + 1
    return counts


def _group_key_id(group_key: str) -> int:
    """A stable numeric id per group key, standing in for `data_group_id`."""
    return -_derive_project_id(group_key)


def _cohort_members(q: _Query) -> set | None:
    selection = q.json_value("filter_by_cohort")
    if selection is None:
        return None
    if not isinstance(selection, dict) or "id" not in selection:
        raise q.error(400, 'filter_by_cohort must be a JSON object such as {"id": 123}')
    with q.store.lock:
        cohort = q.state.cohorts.get(_id_text(selection["id"]))
        profiles = dict(q.state.profiles)
    if cohort is None:
        raise q.error(400, f"no cohort with id {selection['id']}")
    return _cohort_ids(cohort, profiles)


def _cohort_ids(cohort: dict, profiles: dict) -> set:
    if cohort.get("distinct_ids") is not None:
        return set(cohort["distinct_ids"])
    where = _compile_expression(cohort["where"]) if cohort.get("where") else None
    return {i for i, props in profiles.items() if where is None or where.matches(props)}


# --- events and their properties -------------------------------------------------


def _events_report(store: Store, req: _Request) -> _Response:
    """Counts per event and bucket.  Mixpanel: GET /api/2.0/events.

    The seed's clients call it with only `event=[...]`: defaults fill in
    (type general, unit day, the last 30 days) and an extra `events` key
    holds the matching stored events, as the seed returned them.
    """
    q = _Query(store, req)
    names = q.names("event", required=True)
    seed_style = all(q.params.get(k) in (None, "") for k in ("type", "unit", "from_date", "interval"))
    kind = q.choice("type", ("general", "unique", "average"), "general")
    unit = q.choice("unit", _UNITS, "day")
    if seed_style:
        q.params["interval"] = "30"
    first, last = q.date_range()
    start, end = q.bounds(first, last)
    buckets = _Buckets(unit, q.tz)
    rows = q.events(start, end, names, None)
    values = _count_series(rows, buckets, kind, lambda e, p: [e["event"]])
    series = q.series(buckets, first, last)
    values = _fill({name: values.get(name, {}) for name in names}, series)
    answer: dict[str, Any] = {"data": {"series": series, "values": values}, "legend_size": len(values)}
    if seed_style:
        with store.lock:
            stored = list(q.state.events)
        answer["events"] = [{"event": e["event"], "properties": e["properties"]}
                            for e in stored if e["event"] in names]
    return _json(200, answer)


def _events_top(store: Store, req: _Request) -> _Response:
    """Today's top events with the change from yesterday.  GET /events/top."""
    q = _Query(store, req)
    kind = q.choice("type", ("general", "unique", "average"), "general")
    limit = q.integer("limit", 100, low=1)
    today = q.today()
    start, end = q.bounds(today - datetime.timedelta(days=1), today)
    middle = q.bounds(today, today)[0]
    counts: dict[str, list] = {}
    for event, person in q.events(start, end, None, None):
        slot = 1 if event["properties"]["time"] >= middle else 0
        entry = counts.setdefault(event["event"], [0, 0, set(), set()])
        entry[slot] += 1
        if person is not None:
            entry[2 + slot].add(person)
    rows = []
    for name, (yesterday, now_count, old_people, new_people) in counts.items():
        amount, before = (len(new_people), len(old_people)) if kind == "unique" else (now_count, yesterday)
        if kind == "average":
            amount = now_count / len(new_people) if new_people else 0
            before = yesterday / len(old_people) if old_people else 0
        change = (amount - before) / before if before else (1.0 if amount else 0.0)
        if amount:
            rows.append({"amount": amount, "event": name, "percent_change": round(change, 6)})
    rows.sort(key=lambda r: (-r["amount"], r["event"]))
    return _json(200, {"events": rows[:limit], "type": kind})


def _events_names(store: Store, req: _Request) -> _Response:
    """Event names of the last 31 days, most frequent first.  GET /events/names."""
    q = _Query(store, req)
    q.choice("type", ("general", "unique", "average"), "general")
    limit = q.integer("limit", 255, low=1)
    today = q.today()
    start, end = q.bounds(today - datetime.timedelta(days=30), today)
    counts: dict[str, int] = {}
    for event, _ in q.events(start, end, None, None):
        counts[event["event"]] = counts.get(event["event"], 0) + 1
    ranked = sorted(counts, key=lambda name: (-counts[name], name))
    return _json(200, ranked[:min(limit, 5000)])


def _events_properties(store: Store, req: _Request) -> _Response:
    """One property's values per bucket.  GET /events/properties."""
    q = _Query(store, req)
    event_name = q.text("event", required=True)
    name = q.text("name", required=True)
    kind = q.choice("type", ("general", "unique", "average"), "general")
    unit = q.choice("unit", _UNITS, "day")
    limit = q.integer("limit", 255, low=1)
    only = q.json_value("values")
    if only is not None and (not isinstance(only, list) or not all(isinstance(v, str) for v in only)):
        raise q.error(400, "values must be a JSON array of strings")
    first, last = q.date_range()
    start, end = q.bounds(first, last)
    buckets = _Buckets(unit, q.tz)
    rows = q.events(start, end, [event_name], None)

    def keys(event: dict, person: Any) -> list[str]:
        found = _segment_keys(_read_property(event["properties"], name))
        return [k for k in found if only is None or k in only]
    values = _top(_count_series(rows, buckets, kind, keys), limit)
    series = q.series(buckets, first, last)
    return _json(200, {"data": {"series": series, "values": _fill(values, series)},
                       "legend_size": len(values)})


def _events_properties_top(store: Store, req: _Request) -> _Response:
    """The properties an event carries most often.  GET /events/properties/top."""
    q = _Query(store, req)
    event_name = q.text("event", required=True)
    limit = q.integer("limit", 10, low=1)
    today = q.today()
    start, end = q.bounds(today - datetime.timedelta(days=30), today)
    counts: dict[str, int] = {}
    for event, _ in q.events(start, end, [event_name], None):
        for key in event["properties"]:
            if key != "token":  # not an event property Mixpanel shows
                counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))[:limit]
    return _json(200, {key: {"count": counts[key]} for key in ranked})


def _events_properties_values(store: Store, req: _Request) -> _Response:
    """A property's most common values.  GET /events/properties/values."""
    q = _Query(store, req)
    event_name = q.text("event")
    name = q.text("name", required=True)
    limit = q.integer("limit", 255, low=1)
    today = q.today()
    start, end = q.bounds(today - datetime.timedelta(days=30), today)
    counts: dict[str, int] = {}
    for event, _ in q.events(start, end, None if event_name is None else [event_name], None):
        for key in _segment_keys(_read_property(event["properties"], name)):
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    return _json(200, ranked[:limit])


# --- segmentation -----------------------------------------------------------------


def _segmentation_rows(q: _Query) -> tuple[list, _Buckets, datetime.date, datetime.date]:
    event_name = q.text("event", required=True)
    unit = q.choice("unit", _UNITS, "day")
    first, last = q.date_range()
    days = q.integer("interval", 0, low=0) if q.params.get("from_date") else 0
    buckets = _Buckets(unit, q.tz, first, days)
    start, end = q.bounds(first, last)
    rows = q.events(start, end, [event_name], q.expression("where"))
    return rows, buckets, first, last


def _segmentation(store: Store, req: _Request) -> _Response:
    """Counts of one event per bucket, optionally segmented by `on`.

    Mixpanel: GET /api/query/segmentation.  Every bucket is listed (zero
    filled); segments are the top `limit` by total count.
    """
    q = _Query(store, req)
    kind = q.choice("type", ("general", "unique", "average"), "general")
    limit = q.integer("limit", 60, low=1, high=10000)
    on = q.expression("on")
    rows, buckets, first, last = _segmentation_rows(q)
    event_name = q.text("event")
    if on is None:
        values = _count_series(rows, buckets, kind, lambda e, p: [event_name])
        values = {event_name: values.get(event_name, {})}
    else:
        values = _top(_count_series(rows, buckets, kind, lambda e, p: _segment_keys(
            on.value(e["properties"], q.scope(on, e, p)))), limit)
    series = q.series(buckets, first, last)
    return _json(200, {"data": {"series": series, "values": _fill(values, series)},
                       "legend_size": len(values)})


def _segmentation_numeric(store: Store, req: _Request) -> _Response:
    """Counts per numeric range of `on`.  GET /segmentation/numeric.

    Ranges have equal, round widths (1, 2 or 5 times a power of ten) and are
    labelled like "2,000 - 2,100"; a range lists only the dates it has.
    """
    q = _Query(store, req)
    kind = q.choice("type", ("general", "unique", "average"), "general")
    on = q.expression("on")
    if on is None:
        raise q.error(400, "on is a required parameter")
    count = q.integer("buckets", 10, low=1, high=1000)
    rows, buckets, _, _ = _segmentation_rows(q)
    numbers = []
    for event, person in rows:
        value = on.value(event["properties"], q.scope(on, event, person))
        if _kind(value) == "number" and abs(value) <= 1e300:
            numbers.append((float(value), event, person))
    if not numbers:
        return _json(200, {"data": {"series": [], "values": {}}, "legend_size": 0})
    low = min(n for n, _, _ in numbers)
    high = max(n for n, _, _ in numbers)
    width = _nice_width((high - low) / count if high > low else 1)
    base = math.floor(low / width) * width

    last = max(0, math.ceil((high - base) / width - 1e-9) - 1)

    def label(value: float) -> str:
        slot = min(math.floor((value - base) / width + 1e-9), last)
        lo = round(base + slot * width, 10)
        return f"{_group_digits(lo)} - {_group_digits(round(lo + width, 10))}"
    ranges = {id(e): label(n) for n, e, _ in numbers}
    picked = [(e, p) for _, e, p in numbers]
    values = _count_series(picked, buckets, kind, lambda e, p: [ranges[id(e)]])
    values = dict(sorted(values.items(), key=lambda item: float(item[0].split(" - ")[0].replace(",", ""))))
    series = sorted({label for counts in values.values() for label in counts})
    return _json(200, {"data": {"series": series, "values": values}, "legend_size": len(values)})


def _nice_width(raw: float) -> float:
    exponent = math.floor(math.log10(raw)) if raw > 0 else 0
    for step in (1, 2, 5, 10):
        width = step * 10 ** exponent
        if width >= raw:
            return width
    return 10 ** (exponent + 1)


def _group_digits(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def _segmentation_sum(store: Store, req: _Request) -> _Response:
    """The sum of `on` per bucket; non-numbers count as 0.  GET /segmentation/sum."""
    return _segmentation_aggregate(store, req, average=False)


def _segmentation_average(store: Store, req: _Request) -> _Response:
    """The mean of `on` per bucket, over every matching event.  GET /segmentation/average."""
    return _segmentation_aggregate(store, req, average=True)


def _segmentation_aggregate(store: Store, req: _Request, average: bool) -> _Response:
    q = _Query(store, req)
    on = q.expression("on")
    if on is None:
        raise q.error(400, "on is a required parameter")
    if q.text("unit", "day") not in ("hour", "day"):
        raise q.error(400, "unit must be one of hour, day")
    rows, buckets, first, last = _segmentation_rows(q)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event, person in rows:
        value = on.value(event["properties"], q.scope(on, event, person))
        label = buckets.label(event["properties"]["time"])
        sums[label] = sums.get(label, 0.0) + (float(value) if _kind(value) == "number" else 0.0)
        counts[label] = counts.get(label, 0) + 1
    results = {label: (sums.get(label, 0.0) / counts[label] if average and counts.get(label)
                       else sums.get(label, 0.0)) for label in buckets.series(first, last)}
    results = {label: value if math.isfinite(value) else None for label, value in results.items()}
    return _json(200, {"status": "ok", "computed_at": _computed_at(q), "results": results})


# --- funnels ------------------------------------------------------------------------


_LENGTH_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _funnels_list(store: Store, req: _Request) -> _Response:
    """Saved funnels.  GET /api/query/funnels/list."""
    q = _Query(store, req)
    with store.lock:
        funnels = [{"funnel_id": fid, "name": f["name"]} for fid, f in q.state.funnels.items()]
    return _json(200, funnels)


def _funnels(store: Store, req: _Request) -> _Response:
    """A funnel computed from stored events.  GET /api/query/funnels.

    `funnel_id` names a funnel saved with `mp.add_funnel`; an inline
    `events=[{"event": ...}, ...]` is the fake's documented extension.
    """
    q = _Query(store, req)
    steps_param = q.json_value("events")
    if steps_param is not None:
        funnel = _funnel_definition("inline", steps_param, 30, None, q.error)
    else:
        funnel_id = q.integer("funnel_id", -1)
        with store.lock:
            funnel = q.state.funnels.get(funnel_id)
        if funnel is None:
            raise q.error(400, f"funnel_id {q.params.get('funnel_id')} does not name a saved funnel")
    length_unit = q.choice("length_unit", tuple(_LENGTH_UNITS), "day")
    length = q.integer("length", funnel["window"] if length_unit == "day" else 0, low=0)
    window = (length or funnel["window"]) * (_LENGTH_UNITS[length_unit] if length else 86400)
    window = min(window, 90 * 86400)
    unit = q.choice("unit", ("day", "week", "month"), "day")
    limit = q.integer("limit", 255, low=1, high=10000)
    first, last = q.date_range()
    days = q.integer("interval", 0, low=0)
    buckets = _Buckets(unit, q.tz, first, days if days > 1 else 0)
    dates = buckets.series(first, last)
    too_big = q.error(400, f"the answer would hold more than {_MAX_FUNNEL_CELLS} funnel steps (dates x segments "
                           "x steps): shorten the range, or use fewer steps or a lower limit")
    if len(dates) * len(funnel["steps"]) > _MAX_FUNNEL_CELLS:
        raise too_big
    start, end = q.bounds(first, last)
    where = q.expression("where")
    on = q.expression("on")
    names = [step["event"] for step in funnel["steps"]]
    step_filters = [_compile_expression(s["where"]) if s.get("where") else None for s in funnel["steps"]]
    funnel_where = _compile_expression(funnel["where"]) if funnel.get("where") else None
    rows = q.events(start, end + window, list(set(names)), where, ordered=True)
    by_person: dict[Any, list[dict]] = {}
    for event, person in rows:
        if person is None:
            continue
        if funnel_where is not None and not funnel_where.matches(
                event["properties"], q.scope(funnel_where, event, person)):
            continue
        by_person.setdefault(person, []).append(event)
    results: dict[str, dict[str, list]] = {}
    for person, events in by_person.items():
        scope = _Scope(user=q.state.profiles.get(person))
        _walk_funnel(events, names, step_filters, start, end, window, buckets, on, results, scope)
    cells = 0
    data = {}
    for label in dates:
        segments = results.get(label, {})
        overall = _funnel_steps(segments.get("$overall"), funnel["steps"])
        if on is None:
            data[label] = {"steps": overall, "analysis": _funnel_analysis(overall)}
        else:
            ranked = sorted((k for k in segments if k != "$overall"),
                            key=lambda k: (-len(segments[k][0]), k))[:limit]
            cells += (1 + len(ranked)) * len(funnel["steps"])
            if cells > _MAX_FUNNEL_CELLS:
                raise too_big
            entry = {"$overall": overall}
            for key in ranked:
                entry[key] = _funnel_steps(segments[key], funnel["steps"])
            data[label] = entry
    return _json(200, {"computed_at": _computed_at(q), "meta": {"dates": dates}, "data": data})


def _walk_funnel(events: list[dict], names: list[str], filters: list, start: float, end: float,
                 window: float, buckets: _Buckets, on: _Expression | None,
                 results: dict[str, dict[str, list]], scope: _Scope) -> None:
    """One person's way through the funnel, counted in the bucket of their
    first entry (step 1 inside the date range): each later step must come
    after the previous one and within the window of the entry."""
    for index, event in enumerate(events):
        props = event["properties"]
        if event["event"] != names[0] or not start <= props["time"] < end:
            continue
        if filters[0] is not None and not filters[0].matches(props, scope):
            continue
        label = buckets.label(props["time"])
        times = [props["time"]]
        step = 1
        for later in events[index + 1:]:
            if step == len(names):
                break
            later_props = later["properties"]
            if later_props["time"] > times[0] + window:
                break
            if later["event"] == names[step] and (
                    filters[step] is None or filters[step].matches(later_props, scope)):
                times.append(later_props["time"])
                step += 1
        keys = ["$overall"] + (_segment_keys(on.value(props, scope)) if on is not None else [])
        for key in keys:
            counts = results.setdefault(label, {}).setdefault(key, [[] for _ in names])
            for reached in range(len(times)):
                counts[reached].append((times[reached] - times[reached - 1] if reached else None,
                                        times[reached] - times[0]))
        return


def _funnel_steps(counts: list | None, steps: list[dict]) -> list[dict]:
    out = []
    first = len(counts[0]) if counts else 0
    previous = first
    for index, step in enumerate(steps):
        reached = counts[index] if counts else []
        count = len(reached)
        gaps = [g for g, _ in reached if g is not None]
        from_start = [t for _, t in reached]
        out.append({
            "count": count,
            "avg_time": round(sum(gaps) / len(gaps)) if gaps and index else None,
            "avg_time_from_start": round(sum(from_start) / len(from_start)) if from_start and index else None,
            "step_conv_ratio": 1 if index == 0 else (round(count / previous, 4) if previous else 0),
            "overall_conv_ratio": 1 if index == 0 else (round(count / first, 4) if first else 0),
            "goal": step["event"], "event": step["event"], "step_label": step["event"]})
        previous = count
    return out


def _funnel_analysis(steps: list[dict]) -> dict:
    ratios = [s["step_conv_ratio"] for s in steps[1:]]
    worst = 1 + ratios.index(min(ratios)) if ratios else 0
    return {"completion": steps[-1]["count"] if steps else 0,
            "starting_amount": steps[0]["count"] if steps else 0,
            "steps": len(steps), "worst": worst}


def _funnel_definition(name: Any, steps: Any, window: Any, where: Any,
                       error: Callable[[int, str], Exception]) -> dict:
    """Check a funnel: a name, 2+ steps (event names or {"event", "where"}),
    a window in days (1 to 90), an optional `where`."""
    if not isinstance(name, str) or not name:
        raise error(400, "a funnel needs a name")
    if not isinstance(steps, list) or len(steps) < 2:
        raise error(400, "a funnel needs at least 2 steps")
    checked = []
    for step in steps:
        if isinstance(step, str):
            step = {"event": step}
        if not isinstance(step, dict) or not isinstance(step.get("event"), str):
            raise error(400, 'each funnel step is an event name or {"event": name, "where": expr}')
        checked.append({"event": step["event"], "where": step.get("where")})
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 90:
        raise error(400, "window must be a whole number of days from 1 to 90")
    for text in [where] + [s["where"] for s in checked]:
        if text is not None:
            try:
                _compile_expression(text)
            except (ExpressionError, TypeError) as exc:
                raise error(400, f"invalid where: {exc}") from None
    return {"name": name, "steps": checked, "window": window, "where": where}


# --- retention -----------------------------------------------------------------------


def _retention(store: Store, req: _Request) -> _Response:
    """Cohorts by first `born_event` (or by `event`, compounded) and how many
    came back in each interval after.  GET /api/query/retention."""
    q = _Query(store, req)
    kind = q.choice("retention_type", ("birth", "compounded"), "birth")
    unit = q.choice("unit", ("day", "week", "month"), "day")
    born_name = q.text("born_event", required=kind == "birth")
    event_name = q.text("event")
    interval = q.integer("interval", 1, low=1, high=90 if unit == "day" else 1000)
    intervals = q.integer("interval_count", 1, low=1, high=1000)
    unbounded = q.flag("unbounded_retention")
    born_where = q.expression("born_where")
    where = q.expression("where")
    first, last = q.date_range()
    start, end = q.bounds(first, last)
    buckets = _Buckets(unit, q.tz)
    length = interval * {"day": 86400, "week": 7 * 86400, "month": 30 * 86400}[unit]
    horizon = end + length * (intervals + 1)
    returns: dict[Any, list[float]] = {}
    for event, person in q.events(start, horizon, None if event_name is None else [event_name], where,
                                  ordered=True):
        if person is not None:
            returns.setdefault(person, []).append(event["properties"]["time"])
    born: dict[Any, float] = {}
    if kind == "birth":
        # First time ever: the born event's earliest time, if in the range.
        for event, person in q.events(0, horizon, [born_name], born_where, ordered=True):
            if person is not None and person not in born:
                born[person] = event["properties"]["time"]
        born = {p: t for p, t in born.items() if start <= t < end}
    else:
        for person, times in returns.items():
            inside = [t for t in times if start <= t < end]
            if inside:
                born[person] = inside[0]
    table: dict[str, dict[str, Any]] = {}
    for person, born_at in born.items():
        label = buckets.label(born_at)
        row = table.setdefault(label, {"counts": [0] * (intervals + 1), "first": 0})
        row["first"] += 1
        hit = set()
        for ts in returns.get(person, ()):
            if ts <= born_at and not (kind == "compounded" and ts == born_at):
                continue
            slot = int((ts - born_at) // length)
            if slot <= intervals:
                hit.add(slot)
            elif unbounded:
                hit.add(intervals)  # "retained on N or later"
        for slot in hit:
            row["counts"][slot] += 1
    if unbounded:
        for row in table.values():
            for slot in range(intervals - 1, -1, -1):
                row["counts"][slot] = max(row["counts"][slot], row["counts"][slot + 1])
    empty = {"counts": [0] * (intervals + 1), "first": 0}
    return _json(200, {label: table.get(label, empty) for label in buckets.series(first, last)})


def _retention_addiction(store: Store, req: _Request) -> _Response:
    """How many people did the event in at least k+1 distinct hours (or
    days) of each period.  GET /api/query/retention/addiction."""
    q = _Query(store, req)
    unit = q.choice("unit", ("day", "week", "month"), "day")
    addiction_unit = q.choice("addiction_unit", ("hour", "day"), "hour")
    if unit == "day" and addiction_unit == "day":
        raise q.error(400, "addiction_unit must be smaller than unit")
    first, last = q.date_range()
    start, end = q.bounds(first, last)
    buckets = _Buckets(unit, q.tz)
    small = _Buckets(addiction_unit, q.tz)
    seen: dict[str, dict[Any, set]] = {}
    for event, person in q.events(start, end, q.names("event"), q.expression("where")):
        if person is None:
            continue
        ts = event["properties"]["time"]
        seen.setdefault(buckets.label(ts), {}).setdefault(person, set()).add(small.label(ts))
    size = 24 if addiction_unit == "hour" else (7 if unit == "week" else 31)
    data = {}
    for label in buckets.series(first, last):
        people = seen.get(label, {})
        data[label] = [sum(1 for slots in people.values() if len(slots) > k) for k in range(size)]
    return _json(200, {"data": data})


# --- cohorts, annotations, insights, and what is not emulated ----------------------


def _cohorts_list(store: Store, req: _Request) -> _Response:
    """Cohorts registered with `mp.add_cohort`.  POST /api/query/cohorts/list."""
    q = _Query(store, req)
    with store.lock:
        cohorts = list(q.state.cohorts.items())
        profiles = dict(q.state.profiles)
    listing = [{"count": len(_cohort_ids(c, profiles)), "is_visible": 1,
                "description": c.get("description", ""), "created": c.get("created", ""),
                "project_id": q.project.project_id, "id": int(cid), "name": c["name"]}
               for cid, c in cohorts]
    return _json(200, listing)


def _annotations(store: Store, req: _Request) -> _Response:
    """Annotations in a date range.  GET /api/2.0/annotations (legacy form)."""
    q = _Query(store, req)
    first, last = q.date_range()
    with store.lock:
        notes = [dict(a, id=aid) for aid, a in q.state.annotations.items()]
    picked = [{"date": a["date"], "project_id": q.project.project_id, "id": a["id"],
               "description": a["description"]}
              for a in notes if first.isoformat() <= a["date"][:10] <= last.isoformat()]
    picked.sort(key=lambda a: (a["date"], a["id"]))
    return _json(200, {"annotations": picked, "error": False})


def _annotation_fields(q: _Query) -> tuple[str, str]:
    date = q.text("date", required=True)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}( \d{2}:\d{2}:\d{2})?", date) or _parse_datetime(date) is None:
        raise q.error(400, "date must be YYYY-MM-DD HH:MM:SS")
    description = q.text("description", required=True)
    return date if len(date) > 10 else date + " 00:00:00", description


def _annotations_create(store: Store, req: _Request) -> _Response:
    """POST /api/2.0/annotations/create: `date`, `description`."""
    q = _Query(store, req)
    date, description = _annotation_fields(q)
    with store.lock:
        annotation_id = store.new_id()
        q.state.annotations[annotation_id] = {"date": date, "description": description}
    return _json(200, {"error": False, "id": annotation_id})


def _annotations_update(store: Store, req: _Request) -> _Response:
    """POST /api/2.0/annotations/update: `id`, `date`, `description`."""
    q = _Query(store, req)
    annotation_id = q.integer("id", -1)
    date, description = _annotation_fields(q)
    with store.lock:
        if annotation_id not in q.state.annotations:
            raise q.error(400, f"no annotation with id {annotation_id}")
        q.state.annotations[annotation_id] = {"date": date, "description": description}
    return _json(200, {"error": False})


def _annotations_delete(store: Store, req: _Request) -> _Response:
    """POST /api/2.0/annotations/delete: `id`."""
    q = _Query(store, req)
    annotation_id = q.integer("id", -1)
    with store.lock:
        if q.state.annotations.pop(annotation_id, None) is None:
            raise q.error(400, f"no annotation with id {annotation_id}")
    return _json(200, {"error": False})


def _insights(store: Store, req: _Request) -> _Response:
    """A saved Insights report registered with `mp.add_insight`, computed
    from stored events.  GET /api/query/insights?bookmark_id=."""
    q = _Query(store, req)
    bookmark_id = q.integer("bookmark_id", -1)
    with store.lock:
        report = q.state.insights.get(bookmark_id)
    if report is None:
        raise q.error(400, f"bookmark_id {q.params.get('bookmark_id')} does not name a saved report")
    today = q.today()
    first = today - datetime.timedelta(days=report["days"] - 1)
    start, end = q.bounds(first, today)
    buckets = _Buckets(report["unit"], q.tz)
    where = _compile_expression(report["where"]) if report.get("where") else None
    on = _compile_expression(report["on"]) if report.get("on") else None
    rows = q.events(start, end, [report["event"]], where)
    key_of = (lambda e, p: [report["event"]]) if on is None else (
        lambda e, p: _segment_keys(on.value(e["properties"], q.scope(on, e, p))))
    values = _count_series(rows, buckets, report["type"], key_of)
    series = buckets.series(first, today)
    iso = {label: _local_iso(label, q.tz) for label in series}

    def dated(counts: dict) -> dict:
        return {iso[label]: counts.get(label, 0) for label in series}
    if on is None:
        out = {report["event"]: dated(values.get(report["event"], {}))}
    else:
        # Breakdowns nest under the event, with "$overall" beside them (MD).
        overall = _count_series(rows, buckets, report["type"], lambda e, p: [report["event"]])
        nested = {"$overall": dated(overall.get(report["event"], {}))}
        nested.update({key: dated(counts) for key, counts in values.items()})
        out = {report["event"]: nested}
    return _json(200, {"computed_at": _computed_at(q),
                       "date_range": {"from_date": _local_iso(first.isoformat(), q.tz),
                                      "to_date": _local_iso(today.isoformat(), q.tz, end_of_day=True)},
                       "headers": ["$event"] if on is None else ["$event", report["on"]],
                       "series": out})


def _local_iso(label: str, tz: datetime.tzinfo, end_of_day: bool = False) -> str:
    """A bucket label as an ISO datetime with the project's UTC offset."""
    moment = datetime.datetime.fromisoformat(label[:19] if len(label) > 10 else label + "T00:00:00")
    if end_of_day:
        moment = moment.replace(hour=23, minute=59, second=59, microsecond=999000)
    return moment.replace(tzinfo=tz).isoformat()


def _not_emulated(store: Store, req: _Request) -> _Response:
    """JQL and the activity stream: a clear refusal, never a crash."""
    q = _Query(store, req)
    raise q.error(400, f"{req.path} is not emulated by mixpanel_fake (Mixpanel has it in "
                       "maintenance mode); query the events with /api/2.0/export or "
                       "/api/2.0/segmentation instead")


# --- what a test registers: funnels, cohorts, saved reports ---------------------


def _target_state(store: Store, token: str | None) -> tuple[Project, _ProjectState]:
    """The named project, or the only one there is."""
    with store.lock:
        if token is None:
            tokens = list(store.projects)
            if len(tokens) != 1:
                raise ValueError(f"pass project=TOKEN: the fake has {len(tokens)} projects")
            token = tokens[0]
        if token not in store.projects:
            raise ValueError(f"no project {token!r}: add it (Project(...)) or send it data first")
        return store._project_locked(token)


def _value_error(status: int, message: str) -> ValueError:
    return ValueError(message)


def _register_funnel(store: Store, token: str | None, name: str, steps: list,
                     window: int = 30, where: str | None = None) -> int:
    funnel = _funnel_definition(name, steps, window, where, _value_error)
    _, state = _target_state(store, token)
    with store.lock:
        funnel_id = store.new_id()
        state.funnels[funnel_id] = funnel
    return funnel_id


def _register_cohort(store: Store, token: str | None, name: str, where: str | None = None,
                     distinct_ids: list | None = None, description: str = "") -> int:
    if not isinstance(name, str) or not name:
        raise ValueError("a cohort needs a name")
    if (where is None) == (distinct_ids is None):
        raise ValueError("a cohort needs exactly one of where= and distinct_ids=")
    if where is not None:
        _compile_expression(where)
    elif not isinstance(distinct_ids, list) or any(_id_text(i) is None for i in distinct_ids):
        raise ValueError("distinct_ids must be a list of ids")
    project, state = _target_state(store, token)
    created = datetime.datetime.fromtimestamp(store.now(), datetime.timezone.utc)
    with store.lock:
        cohort_id = store.new_id()
        state.cohorts[str(cohort_id)] = {
            "name": name, "where": where, "description": description,
            "distinct_ids": None if distinct_ids is None else [_id_text(i) for i in distinct_ids],
            "created": created.strftime("%Y-%m-%d %H:%M:%S")}
    return cohort_id


def _register_insight(store: Store, token: str | None, name: str, event: str, unit: str = "day",
                      type: str = "general", on: str | None = None, where: str | None = None,
                      days: int = 30) -> int:
    if not isinstance(event, str) or not event:
        raise ValueError("a saved report needs an event")
    if unit not in ("hour", "day", "week", "month"):
        raise ValueError("unit must be one of hour, day, week, month")
    if type not in ("general", "unique", "average"):
        raise ValueError("type must be one of general, unique, average")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
        raise ValueError("days must be a whole number from 1 to 366")
    for text in (on, where):
        if text is not None:
            _compile_expression(text)
    _, state = _target_state(store, token)
    with store.lock:
        bookmark_id = store.new_id()
        state.insights[bookmark_id] = {"name": name, "event": event, "unit": unit, "type": type,
                                       "on": on, "where": where, "days": days}
    return bookmark_id


# --- faults, as data (README "Faults") ---------------------------------------------


def _make_fault(path: str, status: int = 503, body: Any = None, retry_after: int | None = None,
                delay: float = 0, drop_connection: bool = False, truncate: bool = False,
                times: int | None = 1, probability: float = 1.0, seed: int | None = None,
                project: str | None = None, expires_after: float | None = None) -> dict:
    """A checked fault: which requests it hits and what it does to them."""
    if not isinstance(path, str) or not (path == "*" or (path.startswith("/") and "?" not in path)):
        raise ValueError('path is an endpoint such as "/track", or "*" for every endpoint')
    if status is not None and (isinstance(status, bool) or not isinstance(status, int)
                               or not 200 <= status <= 599):
        raise ValueError("status must be an HTTP status, 200 to 599 (None: answer normally, after delay)")
    if not all(isinstance(flag, bool) for flag in (drop_connection, truncate)):
        raise ValueError("drop_connection and truncate are true or false")
    if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, int)
                                    or retry_after < 0):
        raise ValueError("retry_after must be whole seconds, 0 or more")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 60:
        raise ValueError("delay must be 0 to 60 seconds")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise ValueError("times must be a whole number, 1 or more (None: every time)")
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise ValueError("probability must be between 0 and 1")
    if expires_after is not None and (isinstance(expires_after, bool) or not isinstance(
            expires_after, (int, float)) or not 0 < expires_after < float("inf")):
        raise ValueError("expires_after must be a number of seconds above 0")
    if body is not None and not isinstance(body, (str, dict, list)):
        raise ValueError("body must be text or JSON (a dict or a list)")
    if isinstance(body, (dict, list)):
        try:
            json.dumps(body, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError("body must be JSON-encodable") from None
    return {"id": 0, "path": path if path == "*" else _normalize_path(path), "status": status,
            "body": body, "retry_after": retry_after, "delay": delay,
            "drop_connection": bool(drop_connection), "truncate": bool(truncate), "times": times,
            "probability": float(probability), "seed": seed, "rng": random.Random(seed),
            "project": project, "expires_after": expires_after,
            "expires_at": None if expires_after is None else time.monotonic() + expires_after,
            "fired": 0}


def _fault_view(fault: dict) -> dict:
    return {k: v for k, v in fault.items() if k not in ("rng", "expires_at")}


# =============================================================================
# Inspection: /, /health and /__parlel/*
# =============================================================================


def _scope(store: Store, req: _Request) -> str | None:
    """The project an inspection call is about: `?project=TOKEN`, if given.

    With strict auth the call must carry a configured project's credentials
    and sees only that project (one project never reads another's data).
    """
    asked = req.param("project") or None
    if not store.strict_auth:
        return asked
    auth = req.basic_auth()
    token = None
    if auth is not None:
        # A token is public (it ships in browsers): only a secret or a service
        # account opens the control API.  (A project's secret defaults to its token.)
        with store.lock:
            for project in store.projects.values():
                if project.api_secret == auth[0] and not auth[1]:
                    token = project.token
                elif (str(project.project_id) == (req.param("project_id") or "")
                      and project.service_accounts.get(auth[0]) == auth[1]):
                    token = project.token
    if token is None:
        raise ApiError(401, {"error": "strict auth: send a configured project's API secret "
                                      "(Basic secret:) or service account"})
    if asked is not None and asked != token:
        raise ApiError(403, {"error": "strict auth: these credentials are for another project"})
    return token


def _event_view(seq: int, token: str, event: dict) -> dict:
    props = event["properties"]
    return {"id": seq, "event": event["event"], "properties": props,
            "distinct_id": props.get("distinct_id"), "time": props.get("time"),
            "project": token}


def _event_matches(event: dict, name: str | None, distinct_id: Any,
                   properties: dict | None) -> bool:
    if name is not None and event["event"] != name:
        return False
    props = event["properties"]
    if distinct_id is not None and _id_text(props.get("distinct_id")) != _id_text(distinct_id):
        return False
    if properties:
        for key, value in properties.items():
            if key not in props or not _json_equal(props[key], value):
                return False
    return True


def _dedup(rows: list[tuple[int, str, dict]]) -> list[tuple[int, str, dict]]:
    """What reports see: one event per (event, distinct_id, time, $insert_id)
    in a project, the latest copy winning, at its own place (R-dedup)."""
    latest: dict[tuple, int] = {}
    for position, (_, token, event) in enumerate(rows):
        props = event["properties"]
        key = (token, event["event"], _id_text(props.get("distinct_id")),
               props.get("time"), props.get("$insert_id"))
        latest[key] = position
    keep = sorted(latest.values())
    return [rows[position] for position in keep]


def _stored_events(store: Store, name: str | None = None, distinct_id: Any = None,
                   project: str | None = None, properties: dict | None = None,
                   dedup: bool = False) -> list[dict]:
    """Stored events as ``{"event", "properties"}`` (copies), filtered."""
    rows = store.event_rows(project)
    if dedup:
        rows = _dedup(rows)
    return [{"event": event["event"], "properties": _copy(event["properties"])}
            for _, _, event in rows if _event_matches(event, name, distinct_id, properties)]


def _explain_missing(store: Store, name: str | None, wanted: dict, project: str | None,
                 count: int | None, found: list, at_least: bool = False) -> str:
    """What arrived instead: the nearest misses, for a failure message."""
    expected = "at least 1" if count is None else (f"at least {count}" if at_least else str(count))
    lines = [f"expected {expected} event(s) {name if name is not None else '(any name)'!r}"
             + (f" with {wanted}" if wanted else "") + f"; found {len(found)}"]
    everything = _stored_events(store, project=project)
    same = [e for e in everything if name is None or e["event"] == name]
    misses = [e for e in same if not _event_matches(e, name, None, wanted or None)]
    if wanted and misses:
        lines.append(f"  {len(misses)} {name!r} event(s) arrived with other values:")
        for event in misses[-5:]:
            got = event["properties"]
            differences = [_missing_key(k, v, got) if k not in got else
                           f"{k}: {got[k]!r} (expected {v!r})"
                           for k, v in wanted.items() if k not in got or not _json_equal(got[k], v)]
            lines.append(f"    distinct_id={got.get('distinct_id')!r}: " + "; ".join(differences))
    if count is not None and len(found) > count:
        lines.append(f"  {len(found)} matched, {len(found) - count} more than expected:")
        for event in found[:5]:
            lines.append(f"    distinct_id={event['properties'].get('distinct_id')!r} "
                         f"time={event['properties'].get('time')!r}")
    names = sorted({e["event"] for e in everything if e["event"] != name})
    for near in difflib.get_close_matches(name or "", names, n=3, cutoff=0.6):
        arrived = sum(1 for e in everything if e["event"] == near)
        lines.append(f"  similar name: {near!r} ({arrived} arrived)")
    for record in store.rejected_rows(project):
        sent = record["record"]
        if not isinstance(sent, dict) or (name is not None and sent.get("event") != name):
            continue
        sent_props = sent.get("properties") if isinstance(sent.get("properties"), dict) else {}
        if all(_json_equal(sent_props.get(k), v) for k, v in wanted.items() if k in sent_props):
            lines.append(f"  refused on {record['endpoint']} (index {record['index']}): {record['reason']}")
    if project is not None and not same:
        elsewhere = sorted({token for _, token, e in store.event_rows()
                            if token != project and (name is None or e["event"] == name)})
        if elsewhere:
            lines.append(f"  {name!r} arrived in other projects: {', '.join(elsewhere[:5])}")
    if not everything:
        lines.append("  no event arrived at all" + (f" for project {project!r}" if project else ""))
    with store.lock:
        recent = [e for e in store.journal if e["seq"] > store.reset_seq][-50:]
    for entry in recent:  # failed answers since the last reset, faults included
        if project is not None and entry["projects"] not in ([], [project]):
            continue
        if entry["path"] in ("/track", "/import", "/engage", "/groups") and (
                entry["status"] is None or entry["status"] >= 400 or entry["fault"] is not None):
            shown = "no answer (connection dropped)" if entry["status"] is None else f"answered {entry['status']}"
            lines.append(f"  {entry['method']} {entry['path']} {shown}"
                         + (f" (fault {entry['fault']})" if entry["fault"] is not None else ""))
    return "\n".join(lines)


def _missing_key(key: str, value: Any, got: dict) -> str:
    near = difflib.get_close_matches(key, [k for k in got if isinstance(k, str)], n=1, cutoff=0.6)
    hint = f"; it has {near[0]!r} = {got[near[0]]!r}" if near else ""
    return f"{key}: missing (expected {value!r}{hint})"


def _root(store: Store, req: _Request) -> _Response:
    """What this server is: the seed's contract plus the endpoint list."""
    return _json(200, {
        "name": "mixpanel", "version": __version__, "protocol": "mixpanel",
        "implementation": "mixpanel_fake",
        "host": os.environ.get("MIXPANEL_HOST") or req.headers.get("Host"),
        "endpoints": sorted({path for _, path in _ROUTES}),
    })


def _health(store: Store, req: _Request) -> _Response:
    return _json(200, {"status": "ok"})


def _parlel_reset(store: Store, req: _Request) -> _Response:
    """Back to the seed state (?empty=1: to nothing), of one project with ?project=."""
    store.reset(_scope(store, req), empty=req.param("empty") in ("1", "true"))
    return _json(200, {"ok": True})


def _parlel_events(store: Store, req: _Request) -> _Response:
    """Stored events in arrival order; ?project=, ?event=, ?distinct_id=
    filter, ?dedup=1 shows what reports see."""
    name = req.param("event")
    distinct_id = req.param("distinct_id")
    since = _since(req)
    rows = store.event_rows(_scope(store, req))
    if req.param("dedup") in ("1", "true"):
        rows = _dedup(rows)
    rows = [_event_view(seq, token, event) for seq, token, event in rows
            if seq > since and _event_matches(event, name, distinct_id, None)]
    return _json(200, {"count": len(rows), "events": rows})


def _parlel_clear_events(store: Store, req: _Request) -> _Response:
    store.clear_events(_scope(store, req))
    return _json(200, {"ok": True, "count": 0})


def _parlel_people(store: Store, req: _Request) -> _Response:
    rows = [{"$distinct_id": key, "$properties": props, "project": token}
            for token, key, props in store.profile_rows("people", _scope(store, req))]
    return _json(200, {"count": len(rows), "people": rows})


def _parlel_groups(store: Store, req: _Request) -> _Response:
    rows = [{"$group_key": key[0], "$group_id": key[1], "$properties": props, "project": token}
            for token, key, props in store.profile_rows("groups", _scope(store, req))]
    return _json(200, {"count": len(rows), "groups": rows})


def _parlel_recordings(store: Store, req: _Request) -> _Response:
    """Session-replay batches: ?project=, ?replay_id=."""
    rows = store.recording_rows(_scope(store, req))
    replay = req.param("replay_id")
    rows = [row for row in rows if replay is None or row.get("replay_id") == replay]
    return _json(200, {"count": len(rows), "recordings": rows})


def _parlel_rejected(store: Store, req: _Request) -> _Response:
    """Every refused record with its reason, endpoint, project and index."""
    since = _since(req)
    rows = [row for row in store.rejected_rows(_scope(store, req)) if row.get("seq", 0) > since]
    return _json(200, {"count": len(rows), "rejected": rows})


def _json_body(req: _Request) -> dict:
    try:
        body = _loads(req.body.decode("utf-8", "surrogateescape")) if req.body else {}
    except ValueError as exc:
        raise ApiError(400, {"error": f"invalid JSON body: {exc}"}) from None
    if not isinstance(body, dict):
        raise ApiError(400, {"error": "the body must be a JSON object"})
    return body


def _registered(store: Store, req: _Request, table: str, key: str) -> _Response:
    scope = _scope(store, req)  # before the lock: it may take the lock itself
    with store.lock:
        rows = [dict(entry, **{key: entry_id, "project": token})
                for token, state in store._states(scope)
                for entry_id, entry in getattr(state, table).items()]
    return _json(200, {"count": len(rows), table: rows})


def _registration_project(store: Store, req: _Request, body: dict) -> str | None:
    """The project a registration is for.  With strict auth it is always the
    credentials' own, and a body naming another is refused."""
    scope = _scope(store, req)
    asked = body.get("project")
    if asked is not None and not isinstance(asked, str):
        raise ApiError(400, {"error": "project is a token (text)"})
    if store.strict_auth:
        if asked is not None and asked != scope:
            raise ApiError(403, {"error": "strict auth: these credentials are for another project"})
        return scope
    return asked or scope


def _register_over_http(store: Store, req: _Request, register: Callable, key: str,
                        fields: tuple) -> _Response:
    body = _json_body(req)
    unknown = set(body) - set(fields) - {"project"}
    if unknown:
        raise ApiError(400, {"error": f"unknown fields: {', '.join(sorted(unknown))}",
                             "fields": list(fields) + ["project"]})
    project = _registration_project(store, req, body)
    try:
        new_id = register(store, project, **{k: v for k, v in body.items() if k != "project"})
    except (TypeError, ValueError) as exc:
        raise ApiError(400, {"error": str(exc)}) from None
    return _json(200, {key: new_id})


def _parlel_funnels(store: Store, req: _Request) -> _Response:
    return _registered(store, req, "funnels", "funnel_id")


def _parlel_add_funnel(store: Store, req: _Request) -> _Response:
    """Save a funnel: {"name", "steps", "window"?, "where"?, "project"?}."""
    return _register_over_http(store, req, _register_funnel, "funnel_id",
                               ("name", "steps", "window", "where"))


def _parlel_cohorts(store: Store, req: _Request) -> _Response:
    response = _registered(store, req, "cohorts", "id")
    listing = json.loads(response.body)
    for cohort in listing["cohorts"]:
        cohort["id"] = int(cohort["id"])
    return _json(200, listing)


def _parlel_add_cohort(store: Store, req: _Request) -> _Response:
    """Save a cohort: {"name", "where" or "distinct_ids", "description"?, "project"?}."""
    return _register_over_http(store, req, _register_cohort, "id",
                               ("name", "where", "distinct_ids", "description"))


def _parlel_insights(store: Store, req: _Request) -> _Response:
    return _registered(store, req, "insights", "bookmark_id")


def _parlel_add_insight(store: Store, req: _Request) -> _Response:
    """Save an Insights report: {"name", "event", "unit"?, "type"?, "on"?,
    "where"?, "days"?, "project"?}."""
    return _register_over_http(store, req, _register_insight, "bookmark_id",
                               ("name", "event", "unit", "type", "on", "where", "days"))


def _parlel_requests(store: Store, req: _Request) -> _Response:
    """The request journal: ?path=, ?since=SEQ (a cursor), ?limit=N (the last N)."""
    try:
        since = int(req.param("since") or 0)
        limit = int(req.param("limit")) if req.param("limit") else None
        if limit is not None and limit < 1:
            raise ValueError(limit)
    except ValueError:
        raise ApiError(400, {"error": "since is a whole number and limit one of 1 or more"}) from None
    rows = _journal_rows(store, req.param("path"), since, _scope(store, req), limit)
    return _json(200, {"count": len(rows), "requests": rows})


def _journal_rows(store: Store, path: str | None, since: int, project: str | None,
                  limit: int | None) -> list[dict]:
    with store.lock:
        entries = list(store.journal)
    wanted = None if path is None else _normalize_path(path)
    rows = [e for e in entries if e["seq"] > since and (wanted is None or e["path"] == wanted)
            and (project is None or e["projects"] == [project]
                 or (not e["projects"] and e["project"] == project))]
    return [_journal_row(entry) for entry in (rows[-limit:] if limit else rows)]


def _parlel_faults(store: Store, req: _Request) -> _Response:
    scope = _scope(store, req)
    with store.lock:
        faults = [_fault_view(f) for f in store.faults
                  if not store.strict_auth or f["project"] == scope]
    return _json(200, {"count": len(faults), "faults": faults})


def _parlel_add_fault(store: Store, req: _Request) -> _Response:
    """Add a fault: JSON with the arguments of `mp.add_fault` (README)."""
    body = _json_body(req)
    scope = _scope(store, req)
    if store.strict_auth:
        body["project"] = scope
    try:
        fault = _make_fault(**body)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, {"error": str(exc)}) from None
    return _json(200, {"id": store.add_fault(fault)})


def _parlel_clear_faults(store: Store, req: _Request) -> _Response:
    scope = _scope(store, req)
    with store.lock:
        store.faults = [f for f in store.faults if store.strict_auth and f["project"] != scope]
    return _json(200, {"ok": True})


def _parlel_stats(store: Store, req: _Request) -> _Response:
    return _json(200, store.stats(_scope(store, req)))


def _parlel_snapshot(store: Store, req: _Request) -> _Response:
    """GET: the state as JSON (?project= for one); POST: put one back."""
    scope = _scope(store, req)
    if req.method in ("GET", "HEAD"):
        snapshot = store.snapshot(scope)
        for settings in snapshot["projects"]:  # never over HTTP
            settings["api_secret"] = None
            settings["service_accounts"] = {}
        return _json(200, snapshot)
    snapshot = _json_body(req)
    try:
        projects, _ = _read_snapshot(snapshot)
        if store.strict_auth and (any(p.token != scope for p in projects)
                                  or any(t != scope for t in snapshot.get("states", {}))):
            raise ApiError(403, {"error": "strict auth: a snapshot may only restore your own project"})
        store.restore(snapshot)
    except ValueError as exc:
        raise ApiError(400, {"error": str(exc)}) from None
    return _json(200, {"ok": True})


def _parlel_save(store: Store, req: _Request) -> _Response:
    """Write the state file now (atomically), as `mp.save()` does."""
    _scope(store, req)
    if store.strict_auth:
        raise ApiError(403, {"error": "strict auth: the state file holds every project; save from Python"})
    if store.state_file is None:
        raise ApiError(400, {"error": "no state file: start with --state-file PATH"})
    _write_state(store.state_file, store.snapshot())
    return _json(200, {"ok": True, "path": store.state_file})


def _parlel_flags(store: Store, req: _Request) -> _Response:
    """GET: a project's flag definitions.  POST {"project"?, "flags": [...]}
    replaces them (the shape /flags/definitions serves)."""
    if req.method != "POST":
        try:
            project, _ = _target_state(store, _scope(store, req))
        except ValueError as exc:
            raise ApiError(404, {"error": str(exc)}) from None
        return _json(200, {"project": project.token, "flags": list(project.flags)})
    if req.body.lstrip()[:1] == b"[":  # a bare list, as --flags FILE takes
        req.body = b'{"flags":' + req.body + b"}"
    body = _json_body(req)
    if set(body) - {"project", "flags"} or "flags" not in body:
        raise ApiError(400, {"error": 'the body is {"project"?, "flags": [flag, ...]}'})
    scope = _registration_project(store, req, body)
    try:
        project, _ = _target_state(store, scope)
        flags = _check_flags(body["flags"], project.project_id)
    except ValueError as exc:
        raise ApiError(400, {"error": str(exc)}) from None
    project.flags = flags
    return _json(200, {"ok": True, "project": project.token, "flags": len(flags)})


def _parlel_sdk_config(store: Store, req: _Request) -> _Response:
    """Set what /settings serves a project: {"project"?, "config": {...}}."""
    body = _json_body(req)
    if set(body) - {"project", "config"} or not isinstance(body.get("config"), dict):
        raise ApiError(400, {"error": 'the body is {"project"?, "config": {...}}'})
    scope = _registration_project(store, req, body)
    try:
        project, _ = _target_state(store, scope)
    except ValueError as exc:
        raise ApiError(400, {"error": str(exc)}) from None
    project.sdk_config = dict(body["config"])
    return _json(200, {"ok": True, "project": project.token})


def _parlel_tracking_plan(store: Store, req: _Request) -> _Response:
    """Set a project's tracking plan: {"project"?, "plan", "enforce"?}."""
    body = _json_body(req)
    if set(body) - {"project", "plan", "enforce"} or "plan" not in body:
        raise ApiError(400, {"error": 'the body is {"project"?, "plan", "enforce"?}'})
    scope = _registration_project(store, req, body)
    enforce = body.get("enforce", False)
    if not isinstance(enforce, bool):
        raise ApiError(400, {"error": "enforce is true or false"})
    try:
        project, _ = _target_state(store, scope)
        project.tracking_plan = _check_plan(body.get("plan"))
    except ValueError as exc:
        raise ApiError(400, {"error": str(exc)}) from None
    project.plan_enforce = enforce
    return _json(200, {"ok": True, "project": project.token})


def _expectation(store: Store, req: _Request) -> tuple[str | None, dict, str | None, int | None]:
    """?event=, ?properties={json}, ?project=, ?count= of /__parlel/assert and /wait."""
    try:
        wanted = _loads(req.param("properties") or "{}")
        count = int(req.param("count")) if req.param("count") else None
    except ValueError:
        raise ApiError(400, {"error": "properties must be a JSON object and count a whole number"}) from None
    if not isinstance(wanted, dict) or (count is not None and count < 0):
        raise ApiError(400, {"error": "properties must be a JSON object and count a whole number"})
    return req.param("event"), wanted, _scope(store, req), count


def _wait_events(store: Store, count: int, timeout: float, matching: Callable[[], list]) -> list:
    """Wait on the store's Condition (never a sleep loop) until ``matching()``
    returns ``count`` events or ``timeout`` passes; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        with store.lock:
            version = store.version
        found = matching()
        remaining = deadline - time.monotonic()
        if len(found) >= count or remaining <= 0:
            return found
        if store.stopping.is_set():
            return found
        with store.changed:
            store.changed.wait_for(lambda: store.version != version or store.stopping.is_set(),
                                   min(remaining, 3600))


def _parlel_assert(store: Store, req: _Request) -> _Response:
    """`mp.assert_tracked` over HTTP: 200 when it holds, 417 with the
    explanation (the nearest misses) when it does not."""
    name, wanted, project, count = _expectation(store, req)
    found = _stored_events(store, name, None, project, wanted or None)
    if (count is None and found) or (count is not None and len(found) == count):
        return _json(200, {"ok": True, "count": len(found)})
    message = _explain_missing(store, name, wanted, project, count, found)
    return _json(417, {"ok": False, "count": len(found), "message": message})


def _parlel_wait(store: Store, req: _Request) -> _Response:
    """`mp.wait_for` over HTTP: waits (up to 60 s) for ?count= events (default
    1); 200 with them, or 408 with the explanation."""
    name, wanted, project, count = _expectation(store, req)
    count = 1 if count is None else count
    try:
        timeout = float(req.param("timeout") or 5)
        if math.isnan(timeout):  # NaN passes every clamp below: it would wait for ever
            raise ValueError(timeout)
    except ValueError:
        raise ApiError(400, {"error": "timeout must be a number of seconds"}) from None
    timeout = min(max(timeout, 0.0), 60.0)
    found = _wait_events(store, count, timeout,
                         lambda: _stored_events(store, name, None, project, wanted or None))
    if len(found) >= count:
        return _json(200, {"ok": True, "count": len(found), "events": found})
    message = _explain_missing(store, name, wanted, project, count, found, at_least=True)
    return _json(408, {"ok": False, "count": len(found), "message": f"waited {timeout}s: {message}"})


def _since(req: _Request) -> int:
    """?since=N: only rows numbered after N (the page polls with it)."""
    try:
        return int(req.param("since") or 0)
    except ValueError:
        raise ApiError(400, {"error": "since is a whole number"}) from None


# The live inspection page.  Self-contained (no CDN, no build step); every
# value reaches the DOM through textContent, never as markup, and the CSP
# forbids anything but this page's own script, style and same-origin fetches.
_UI_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")
_UI_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mixpanel_fake</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
header{display:flex;gap:12px;align-items:center;padding:10px 16px;background:#4f44e0;color:#fff}
header h1{font-size:16px;margin:0 12px 0 0}
header select,header input{font:inherit;padding:4px 6px;border-radius:4px;border:0}
header input{flex:1;max-width:420px}
#status{margin-left:auto;font-size:12px;opacity:.85}
nav{display:flex;gap:2px;padding:8px 16px 0;background:#e9e8f4;flex-wrap:wrap}
nav button{font:inherit;border:0;padding:6px 12px;border-radius:6px 6px 0 0;background:transparent;cursor:pointer}
nav button[aria-selected=true]{background:#fff;font-weight:600}
main{padding:12px 16px}
table{border-collapse:collapse;width:100%;background:#fff;table-layout:fixed}
th,td{border-bottom:1px solid #e4e4ea;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#fafafe;font-weight:600;position:sticky;top:0}
td.json{font:12px/1.35 ui-monospace,monospace;white-space:pre-wrap}
.empty{padding:24px;color:#777}
.bad{color:#b00020}
</style></head><body>
<header><h1>mixpanel_fake</h1>
<label>project <select id="project"><option value="">all projects</option></select></label>
<input id="filter" type="search" placeholder="filter: any text in a row">
<span id="status">connecting</span></header>
<nav id="tabs" role="tablist"></nav>
<main><table id="grid"><thead></thead><tbody></tbody></table><div id="empty" class="empty"></div></main>
<script>
"use strict";
// Each tab: the inspection endpoint, the list in its answer, whether rows
// carry a sequence number to poll with ?since=, and the columns shown.
const TABS = {
  events: {path: "events", key: "events", cursor: "id", cols: [["#", r => r.id], ["time", r => iso(r.time)],
    ["project", r => r.project], ["event", r => r.event], ["distinct_id", r => r.distinct_id],
    ["properties", r => r.properties, true]]},
  profiles: {path: "people", key: "people", cols: [["project", r => r.project],
    ["$distinct_id", r => r.$distinct_id], ["$properties", r => r.$properties, true]]},
  groups: {path: "groups", key: "groups", cols: [["project", r => r.project], ["$group_key", r => r.$group_key],
    ["$group_id", r => r.$group_id], ["$properties", r => r.$properties, true]]},
  rejected: {path: "rejected", key: "rejected", cursor: "seq", cols: [["#", r => r.seq],
    ["project", r => r.project], ["endpoint", r => r.endpoint], ["index", r => r.index],
    ["field", r => r.field], ["reason", r => r.reason, false, "bad"], ["record", r => r.record, true]]},
  requests: {path: "requests", key: "requests", cursor: "seq", cols: [["#", r => r.seq],
    ["time", r => iso(r.time)], ["request", r => r.method + " " + r.path + (r.query ? "?" + r.query : "")],
    ["status", r => r.status], ["records", r => r.records, true], ["response", r => r.response, true]]},
  recordings: {path: "recordings", key: "recordings", cols: [["replay_id", r => r.replay_id],
    ["seq", r => r.seq], ["distinct_id", r => r.distinct_id], ["events", r => r.events.length]]},
  faults: {path: "faults", key: "faults", cols: [["fault", r => r, true]]},
  flags: {path: "flags", key: "flags", cols: [["key", r => r.key], ["context", r => r.context],
    ["ruleset", r => r.ruleset, true]]},
};
const state = {tab: "events", rows: {}, cursors: {}, timer: null};
const $ = id => document.getElementById(id);
function iso(seconds) { return typeof seconds === "number" ? new Date(seconds * 1000).toISOString() : ""; }
function text(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "string" ? value : JSON.stringify(value, null, 1);
}
function query(extra) {
  const params = new URLSearchParams(extra);
  if ($("project").value) params.set("project", $("project").value);
  return params.toString();
}
async function getJson(path, extra) {
  const answer = await fetch("/__parlel/" + path + "?" + query(extra || {}), {cache: "no-store"});
  if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
  return answer.json();
}
async function poll() {
  const tab = TABS[state.tab];
  try {
    let rows;
    if (tab.cursor) {
      const since = state.cursors[state.tab] || 0;
      const answer = await getJson(tab.path, {since: String(since)});
      rows = (state.rows[state.tab] || []).concat(answer[tab.key]);
      if (answer[tab.key].length) state.cursors[state.tab] = answer[tab.key].at(-1)[tab.cursor];
      const stats = await getJson("stats");
      const total = {events: stats.events, rejected: stats.rejected}[state.tab];
      if (total !== undefined && total < rows.length) { resetTab(); return poll(); }  // a reset happened
    } else {
      const answer = await getJson(tab.path);
      rows = answer[tab.key];
    }
    state.rows[state.tab] = rows.slice(-2000);
    $("status").textContent = "live, " + new Date().toLocaleTimeString();
    render();
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  }
}
function resetTab() { state.rows[state.tab] = []; state.cursors[state.tab] = 0; }
function render() {
  const tab = TABS[state.tab];
  const needle = $("filter").value.toLowerCase();
  const head = document.createElement("tr");
  for (const [title, , json] of tab.cols) {
    const th = document.createElement("th");
    th.textContent = title;
    if (json) th.style.width = tab.cols.length > 2 ? "45%" : "auto";
    else if (title === "#") th.style.width = "4em";
    head.appendChild(th);
  }
  $("grid").tHead.replaceChildren(head);
  const body = document.createDocumentFragment();
  let shown = 0;
  for (const row of (state.rows[state.tab] || []).slice().reverse()) {
    const cells = tab.cols.map(([, pick]) => text(pick(row)));
    if (needle && !cells.some(cell => cell.toLowerCase().includes(needle))) continue;
    const tr = document.createElement("tr");
    tab.cols.forEach(([, , json, css], index) => {
      const td = document.createElement("td");
      td.textContent = cells[index];  // text, never markup
      if (json) td.className = "json";
      if (css) td.classList.add(css);
      tr.appendChild(td);
    });
    body.appendChild(tr);
    if (++shown >= 500) break;
  }
  $("grid").tBodies[0].replaceChildren(body);
  $("empty").textContent = shown ? "" : (needle ? "nothing matches the filter" : "nothing yet");
}
function select(name) {
  state.tab = name;
  for (const button of $("tabs").children) button.setAttribute("aria-selected", String(button.dataset.tab === name));
  render();
  poll();
}
async function loadProjects() {
  try {
    const answer = await getJson("projects");
    const chosen = $("project").value;
    const options = [new Option("all projects", "")];
    for (const project of answer.projects) options.push(new Option(project.token, project.token));
    $("project").replaceChildren(...options);
    $("project").value = chosen;
  } catch (error) { /* shown by poll() */ }
}
for (const name of Object.keys(TABS)) {
  const button = document.createElement("button");
  button.textContent = name;
  button.dataset.tab = name;
  button.setAttribute("role", "tab");
  button.addEventListener("click", () => select(name));
  $("tabs").appendChild(button);
}
$("filter").addEventListener("input", render);
$("project").addEventListener("change", () => { state.rows = {}; state.cursors = {}; select(state.tab); });
loadProjects();
select("events");
setInterval(() => { loadProjects(); poll(); }, 1000);
</script></body></html>
"""


def _parlel_ui(store: Store, req: _Request) -> _Response:
    """The live inspection page (README "Inspection page")."""
    return _Response(200, _UI_HTML.encode("utf-8"), "text/html; charset=utf-8",
                     {"Content-Security-Policy": _UI_CSP, "X-Content-Type-Options": "nosniff",
                      "Cache-Control": "no-store"})


def _parlel_projects(store: Store, req: _Request) -> _Response:
    scope = _scope(store, req)
    with store.lock:
        projects = [p.describe() for p in store.projects.values() if scope is None or p.token == scope]
    return _json(200, {"count": len(projects), "projects": projects})


# =============================================================================
# Route table: one row per (method, path)
# =============================================================================

_ROUTES: dict[tuple[str, str], Callable[[Store, _Request], _Response]] = {
    ("GET", "/"): _root,
    ("GET", "/health"): _health,
    ("GET", "/track"): _track,
    ("POST", "/track"): _track,
    ("GET", "/import"): _import,
    ("POST", "/import"): _import,
    ("GET", "/engage"): _engage,
    ("POST", "/engage"): _engage,
    ("GET", "/groups"): _groups,
    ("POST", "/groups"): _groups,
    ("POST", "/__parlel/reset"): _parlel_reset,
    ("GET", "/__parlel/events"): _parlel_events,
    ("DELETE", "/__parlel/events"): _parlel_clear_events,
    ("GET", "/__parlel/people"): _parlel_people,
    ("GET", "/__parlel/groups"): _parlel_groups,
    ("GET", "/__parlel/rejected"): _parlel_rejected,
    ("GET", "/__parlel/projects"): _parlel_projects,
    ("GET", "/__parlel/requests"): _parlel_requests,
    ("GET", "/__parlel/assert"): _parlel_assert,
    ("GET", "/__parlel/wait"): _parlel_wait,
    ("GET", "/__parlel/faults"): _parlel_faults,
    ("POST", "/__parlel/faults"): _parlel_add_fault,
    ("DELETE", "/__parlel/faults"): _parlel_clear_faults,
    ("GET", "/__parlel/stats"): _parlel_stats,
    ("GET", "/__parlel/snapshot"): _parlel_snapshot,
    ("POST", "/__parlel/snapshot"): _parlel_snapshot,
    ("POST", "/__parlel/tracking-plan"): _parlel_tracking_plan,
    ("GET", "/__parlel/flags"): _parlel_flags,
    ("GET", "/__parlel/recordings"): _parlel_recordings,
    ("POST", "/__parlel/sdk-config"): _parlel_sdk_config,
    ("GET", "/__parlel/ui"): _parlel_ui,
    ("POST", "/__parlel/flags"): _parlel_flags,
    # Feature flags (ingestion-api.md §9): the SDKs' remote and local evaluation.
    ("GET", "/flags"): _flags,
    ("POST", "/flags"): _flags,
    ("GET", "/flags/definitions"): _flags_definitions,
    ("POST", "/record"): _record,
    ("GET", "/settings"): _settings,
    ("POST", "/__parlel/save"): _parlel_save,
    ("GET", "/__parlel/funnels"): _parlel_funnels,
    ("POST", "/__parlel/funnels"): _parlel_add_funnel,
    ("GET", "/__parlel/cohorts"): _parlel_cohorts,
    ("POST", "/__parlel/cohorts"): _parlel_add_cohort,
    ("GET", "/__parlel/insights"): _parlel_insights,
    ("POST", "/__parlel/insights"): _parlel_add_insight,
    # The query API; /api/query/X is the same endpoint as /api/2.0/X.
    ("GET", "/api/2.0/export"): _export,
    ("POST", "/api/2.0/export"): _export,
    ("GET", "/api/2.0/engage"): _engage_query,
    ("POST", "/api/2.0/engage"): _engage_query,
    ("GET", "/api/2.0/events"): _events_report,
    ("POST", "/api/2.0/events"): _events_report,
    ("GET", "/api/2.0/events/top"): _events_top,
    ("POST", "/api/2.0/events/top"): _events_top,
    ("GET", "/api/2.0/events/names"): _events_names,
    ("POST", "/api/2.0/events/names"): _events_names,
    ("GET", "/api/2.0/events/properties"): _events_properties,
    ("POST", "/api/2.0/events/properties"): _events_properties,
    ("GET", "/api/2.0/events/properties/top"): _events_properties_top,
    ("POST", "/api/2.0/events/properties/top"): _events_properties_top,
    ("GET", "/api/2.0/events/properties/values"): _events_properties_values,
    ("POST", "/api/2.0/events/properties/values"): _events_properties_values,
    ("GET", "/api/2.0/segmentation"): _segmentation,
    ("POST", "/api/2.0/segmentation"): _segmentation,
    ("GET", "/api/2.0/segmentation/numeric"): _segmentation_numeric,
    ("POST", "/api/2.0/segmentation/numeric"): _segmentation_numeric,
    ("GET", "/api/2.0/segmentation/sum"): _segmentation_sum,
    ("POST", "/api/2.0/segmentation/sum"): _segmentation_sum,
    ("GET", "/api/2.0/segmentation/average"): _segmentation_average,
    ("POST", "/api/2.0/segmentation/average"): _segmentation_average,
    ("GET", "/api/2.0/funnels"): _funnels,
    ("POST", "/api/2.0/funnels"): _funnels,
    ("GET", "/api/2.0/funnels/list"): _funnels_list,
    ("POST", "/api/2.0/funnels/list"): _funnels_list,
    ("GET", "/api/2.0/retention"): _retention,
    ("POST", "/api/2.0/retention"): _retention,
    ("GET", "/api/2.0/retention/addiction"): _retention_addiction,
    ("POST", "/api/2.0/retention/addiction"): _retention_addiction,
    ("GET", "/api/2.0/cohorts/list"): _cohorts_list,
    ("POST", "/api/2.0/cohorts/list"): _cohorts_list,
    ("GET", "/api/2.0/annotations"): _annotations,
    ("POST", "/api/2.0/annotations"): _annotations,
    ("GET", "/api/2.0/annotations/create"): _annotations_create,
    ("POST", "/api/2.0/annotations/create"): _annotations_create,
    ("GET", "/api/2.0/annotations/update"): _annotations_update,
    ("POST", "/api/2.0/annotations/update"): _annotations_update,
    ("GET", "/api/2.0/annotations/delete"): _annotations_delete,
    ("POST", "/api/2.0/annotations/delete"): _annotations_delete,
    ("GET", "/api/2.0/insights"): _insights,
    ("POST", "/api/2.0/insights"): _insights,
    ("GET", "/api/2.0/jql"): _not_emulated,
    ("POST", "/api/2.0/jql"): _not_emulated,
    ("GET", "/api/2.0/stream/query"): _not_emulated,
    ("POST", "/api/2.0/stream/query"): _not_emulated,
}

# Handlers with side effects: no HEAD on them.
_INGESTION = frozenset((_track, _import, _engage, _groups, _annotations_create,
                        _annotations_update, _annotations_delete))
# The ingestion handlers whose requests hold records, and where records name their token.
_RECORD_KINDS = {_track: "events", _import: "events", _engage: "people", _groups: "groups"}
_METHODS_BY_PATH: dict[str, list[str]] = {}
for _method, _path in _ROUTES:
    _METHODS_BY_PATH.setdefault(_path, []).append(_method)
for _path, _methods in _METHODS_BY_PATH.items():
    if "GET" in _methods and _ROUTES[("GET", _path)] not in _INGESTION:
        _methods.append("HEAD")  # HEAD never stores anything
    _methods.append("OPTIONS")
    _methods.sort()
del _method, _path, _methods  # noqa: the loop names are not module API

_SLASHES_RE = re.compile(r"/{2,}")
_FIRST_TIME_RE = re.compile(r"^/flags/[^/]+/first-time-events$")  # the one route with an id in it
_DIGITS_RE = re.compile(r"^[0-9]{1,18}$")
_HEX_RE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")


def _split_target(target: str) -> tuple[str, str]:
    """Path and query of a request target (origin or absolute form).

    No urlsplit: it raises on a stray `[`, and this must never fail.
    Non-ASCII bytes arrive as latin-1 (http.server's reading); they are
    read back as the UTF-8 a client meant, invalid bytes kept as surrogates.
    """
    target = target.split("#", 1)[0]
    if "://" in target[:10]:
        target = target.split("://", 1)[1]
        slash = target.find("/")
        target = "/" if slash < 0 else target[slash:]
    path, _, query = target.partition("?")
    if not query.isascii():
        query = query.encode("latin-1", "replace").decode("utf-8", "surrogateescape")
    return _normalize_path(path), query


def _normalize_path(path: str) -> str:
    """Collapse `//`, drop one trailing `/` (the browser SDK sends `track/`),
    and read `/api/query/X` as `/api/2.0/X` (aliases, query-api.md §1)."""
    path = _SLASHES_RE.sub("/", path or "/")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    if path.startswith("/api/query/"):
        path = "/api/2.0/" + path[len("/api/query/"):]
    return path


def _route(method: str, path: str, query: str = "", shown: str | None = None
           ) -> Callable[[Store, _Request], _Response]:
    """The handler for a request, or an ApiError: 404 naming the known paths,
    405 with `Allow`, and Mixpanel's 400 for an unknown /api/ endpoint."""
    handler = _ROUTES.get(("GET" if method == "HEAD" else method, path))
    if handler is not None and not (method == "HEAD" and handler in _INGESTION):
        return handler
    if method == "POST" and _FIRST_TIME_RE.match(path):
        return _flags_first_time_events
    allowed = _METHODS_BY_PATH.get(path)
    if allowed:
        raise ApiError(405, {"error": f"method {method} not allowed on {path}",
                             "allowed": allowed}, headers={"Allow": ", ".join(allowed)})
    if path.startswith("/api/"):
        query = _redacted_query(query)
        request = (shown or path) + ("?" + query if query else "")
        raise ApiError(400, {"request": request, "error": "Invalid API endpoint"})
    raise ApiError(404, {"error": f"no such endpoint: {method} {path}",
                         "known_paths": sorted(_METHODS_BY_PATH)})


# =============================================================================
# HTTP plumbing
# =============================================================================


def _plain_error(status: int, message: str) -> ApiError:
    """A transport-level error in the shape Mixpanel's JSON errors take."""
    phrase = BaseHTTPRequestHandler.responses.get(status, ("Error",))[0]
    return ApiError(status, {"code": status, "error": message, "status": phrase})


def _gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body, refusing (not inflating) past `limit` bytes."""
    out = []
    size = 0
    data = body
    members = 0
    while data:
        members += 1
        if members > _MAX_GZIP_MEMBERS:
            raise _plain_error(400, f"body is not valid gzip: more than {_MAX_GZIP_MEMBERS} members")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise _plain_error(400, f"body is not valid gzip: {exc}") from None
        size += len(chunk)
        if size > limit or inflater.unconsumed_tail:
            raise _plain_error(413, f"request exceeds max limit of {limit} bytes")
        if not inflater.eof:
            raise _plain_error(400, "body is not valid gzip: truncated")
        out.append(chunk)
        data = inflater.unused_data
    return b"".join(out)


def _fault_token(store: Store, req: _Request) -> str | None:
    """The project a request is for, when a fault is scoped to one: its
    credentials, else its first record's token (decoded only then)."""
    if all(fault["project"] is None for fault in store.faults):
        return None
    token = _credential_token(store, req)
    if token is not None:
        return token
    try:
        records = _decode_records(req, ndjson=True)[0]  # the request itself left as it was
    except _PayloadError:
        return None
    first = records[0] if records else None
    return _record_token(first, "events") or _record_token(first, "people")


def _note_records(req: _Request, kind: str, ndjson: bool) -> None:
    """A faulted ingestion request's records, for the journal: what the
    client sent though no handler ran (a retry test compares the two)."""
    try:
        req.records, req.record_kind = _read_records(req, ndjson)[0], kind
    except _PayloadError:
        pass  # nothing decodable: the entry shows no records


def _fault_response(fault: dict, req: _Request) -> _Response:
    """A fault's answer: its body if given, else the endpoint's own error
    shape (the SDKs read the body, not the status: sdks.md §5.4)."""
    status = fault["status"]
    headers = {"Retry-After": str(fault["retry_after"])} if fault["retry_after"] is not None else {}
    message = {429: "Project exceeded rate limits. Please retry the request with exponential backoff."
               }.get(status, "a temporary failure occurred" if status >= 500 else
                     BaseHTTPRequestHandler.responses.get(status, ("error",))[0])
    body = fault["body"]
    if body is not None:
        response = _Response(status, body.encode("utf-8") if isinstance(body, str) else _dumps(body),
                             "application/json" if not isinstance(body, str) else "text/plain; charset=utf-8")
    elif req.path in ("/track", "/engage", "/groups") or (req.path == "/import" and not req.is_json
                                                          and req.param("strict") != "1"):
        response = _ingest_answer(req, False, message, status)
    elif req.path == "/import":
        response = _import_failure(status, message)
    elif req.path == "/api/2.0/export":
        response = _Response(status, message.encode(), "text/plain; charset=utf-8")
    elif req.path.startswith("/api/"):
        query = _redacted_query(req.query)
        request = req.raw_path + ("?" + query if query else "")
        response = _json(status, {"request": request, "error": message})
    else:
        response = _json(status, {"error": message})
    response.headers.update(headers)
    return response


def _redacted_query(query: str) -> str:
    """The query string with secret parameters' values replaced."""
    parts = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        parts.append(f"{name}=<redacted>" if _unquote(name).lower() in _SECRET_PARAMS else part)
    return "&".join(parts)


def _journal_entry(handler: Any, path: str, query: str, req: _Request | None,
                   response: _Response | None, fault: dict | None, elapsed: float) -> dict:
    """One request as the journal keeps it: credentials never, bodies cut."""
    headers = {}
    for name, value in (handler.headers.items() if getattr(handler, "headers", None) else ()):
        headers[name] = "<redacted>" if name.lower() in ("authorization", "cookie", "proxy-authorization") \
            else value[:_JOURNAL_VALUE]
    if response is None:
        shown = None
    elif isinstance(response.body, bytes):
        shown = response.body[:_JOURNAL_BODY].decode("utf-8", "replace")
    else:
        shown = "<streamed>"
    projects: set = set()
    project = None
    if req is not None:
        projects = _named_tokens(req.records, req.record_kind)
        store = handler.server.store
        named = _credential_token(store, req)
        if named not in store.projects:
            # A Basic username taken as a token that names no project may be
            # a secret sent where a token was expected: never shown.
            named = None if store.strict_auth else req.param("project")
        project = (named or (next(iter(projects)) if len(projects) == 1 else None)
                   or (fault["project"] if fault is not None else None))  # a fault fired for it
    return {"seq": 0, "time": time.time(), "method": handler.command, "path": path,
            "query": _redacted_query(query)[:_JOURNAL_VALUE], "headers": headers,
            "body_size": len(req.body) if req is not None else 0,
            "records": _journal_records(req), "records_dropped": 0,
            "status": response.status if response is not None else None, "response": shown,
            "duration_ms": round(elapsed, 3), "fault": fault["id"] if fault else None,
            "project": project, "projects": sorted(projects)}


def _journal_records(req: _Request | None) -> list | _SentRecords | None:
    """What an entry keeps of the records its handler decoded: the text they
    came in when they came in one (`_SentRecords`), else the list."""
    if req is None or req.records is None:
        return None
    return req.sent if req.sent is not None else req.records


def _journal_row(entry: dict) -> dict:
    """A journal entry as readers see it: kept text decoded to records."""
    records = entry["records"]  # read once: log_request may let it go meanwhile
    return dict(entry, records=records.decode()) if isinstance(records, _SentRecords) else entry


def _named_tokens(records: list | None, kind: str | None) -> set:
    """The tokens records name (`_record_token`), for the journal's
    `projects`: read in C when every record names one the usual way."""
    if not records or kind is None:
        return set()
    try:
        if kind == "events":
            tokens = set(map(_TOKEN_OF, map(_PROPERTIES_OF, records)))
        else:
            tokens = set(map(_DOLLAR_TOKEN_OF, records))
    except (KeyError, TypeError):
        # Record by record, the other kind's place too: a token put where
        # the other kind of record keeps it still names its project.
        other = "people" if kind == "events" else "events"
        tokens = {_record_token(record, kind) or _record_token(record, other) for record in records}
    return {token for token in tokens if isinstance(token, str) and token}


_TOKEN_OF = operator.itemgetter("token")
_DOLLAR_TOKEN_OF = operator.itemgetter("$token")


def _accepts_gzip(header: str) -> bool:
    """`gzip` listed in Accept-Encoding without q=0 (RFC 9110 §12.5.3)."""
    for item in header.lower().split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip() in ("gzip", "x-gzip"):
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


_DATES: dict[int, str] = {}


def _http_date() -> str:
    """The `Date` header's value, made once a second (as the stdlib makes it)."""
    second = int(time.time())
    date = _DATES.get(second)
    if date is None:
        _DATES.clear()
        date = _DATES[second] = email.utils.formatdate(second, usegmt=True)
    return date


def _header_safe(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


class _HeadReader(io.RawIOBase):
    """The connection's reads.  Between requests each read waits up to the
    idle timeout; from a request's first byte until its head is read, each
    read waits only for what is left of one idle timeout, so a client that
    dribbles its headers a byte at a time cannot hold the thread past it."""

    def __init__(self, sock: socket.socket, idle: float):
        super().__init__()
        self.sock = sock
        self.idle = idle
        self.deadline: float | None = None  # time.monotonic() the head must be in by
        self.arming = False                 # waiting for a request's first byte
        self.shortened = False              # the socket's timeout is below `idle`

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the request head took too long")
            self.sock.settimeout(min(left, self.idle))
            self.shortened = True
        count = self.sock.recv_into(buffer)
        if self.arming and count:
            self.arming = False
            self.deadline = time.monotonic() + self.idle
        return count

    def head_done(self) -> None:
        self.arming = False
        self.deadline = None
        if self.shortened:
            self.shortened = False
            self.sock.settimeout(self.idle)


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, finds its row in `_ROUTES`, writes one response."""

    protocol_version = "HTTP/1.1"
    server_version = "mixpanel_fake/" + __version__
    # Keep-alive clients stall ~40 ms a request on delayed ACKs unless Nagle
    # is off; the response also goes out in one write.
    disable_nagle_algorithm = True
    timeout = _IDLE_TIMEOUT
    busy = False     # between a request's first line and its answer
    working = False  # its head and body are read: it is being answered

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()
        self.rfile.close()  # read through the head's deadline instead
        self.reader = _HeadReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.server.track_connection(self, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track_connection(self, False)

    def handle_one_request(self) -> None:
        """As the stdlib's, with a request line of up to 4 MB (the Node SDK
        puts whole payloads in GET query strings) and JSON errors; the head
        must arrive within one idle timeout of its first byte (else 408)."""
        reader = self.reader
        reader.arming = True
        self.working = False
        try:
            line = self.rfile.readline(_MAX_REQUEST_LINE + 1)
            if line in (b"\r\n", b"\n"):
                # RFC 9112 §2.2: ignore an empty line before a request line
                # (a stray CRLF after a body, from some clients).
                line = self.rfile.readline(_MAX_REQUEST_LINE + 1)
        except socket.timeout:
            self.close_connection = True
            if reader.deadline is not None:  # a request had begun: say why it ends
                self._head_error(408, "the client did not send its request head in time")
            return
        except (OSError, ValueError):
            self.close_connection = True
            return
        if not line:
            self.close_connection = True
            return
        if reader.deadline is None:  # the line was already buffered
            reader.deadline = time.monotonic() + reader.idle
        self.busy = True
        try:
            self.raw_requestline = line
            if len(line) > _MAX_REQUEST_LINE:
                self._head_error(414, f"request line exceeds {_MAX_REQUEST_LINE} bytes")
                return
            try:
                parsed = self.parse_request()
            except socket.timeout:
                self.send_error(408, "the client did not send its request head in time")
                return
            except OSError:
                self.close_connection = True
                return
            if not parsed:
                return
            reader.head_done()
            getattr(self, "do_" + self.command)()
            if self.server.closing:
                self.close_connection = True
        finally:
            reader.head_done()
            self.busy = False
            self.working = False

    def _head_error(self, code: int, message: str) -> None:
        """An error before the request line was parsed."""
        self.requestline = ""
        self.request_version = self.default_request_version
        self.command = None
        self.send_error(code, message)

    def parse_request(self) -> bool:
        """As the stdlib's (same request-line rules and answers), with a
        header parser of the fake's own: `email.parser` costs more than the
        rest of a /track request.  Headers are read into `_Headers`."""
        self.command = None
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            numbers = version[5:].split(".") if version.startswith("HTTP/") else []
            if (len(numbers) != 2 or not all(n.isdigit() and n.isascii() and len(n) <= 10 for n in numbers)):
                self.send_error(400, f"Bad request version ({version!r})")
                return False
            number = (int(numbers[0]), int(numbers[1]))
            if number >= (2, 0):
                self.send_error(505, f"Invalid HTTP version ({version[5:]})")
                return False
            self.close_connection = number < (1, 1)
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(400, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")  # as the stdlib (gh-87389)
        try:
            self.headers = _read_headers(self.rfile)
        except _HeaderError as exc:
            status, message = exc.args
            self.send_error(status, message)
            return False
        connection = (self.headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if expect == "100-continue" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def _serve(self) -> None:
        store = self.server.store
        started = time.perf_counter()
        path, query = self.path, ""
        request = None
        fault = None
        try:
            try:
                body = self._read_body()
            except socket.timeout:
                self.close_connection = True
                raise _plain_error(408, "the client stopped sending its body") from None
            except OSError:
                self.close_connection = True  # the client went away: nobody to answer
                return
            path, query = _split_target(self.path)
            if self.server.closing:
                self.close_connection = True
                raise _plain_error(503, "mixpanel_fake is shutting down")
            if self.command == "OPTIONS":
                response = self._preflight(path)
            else:
                handler = _route(self.command, path, query, self.path.split("?", 1)[0])
                client = self.client_address[0] if self.client_address else ""
                request = _Request(self.command, path, query, self.headers, body, client)
                request.raw_path = self.path.split("?", 1)[0]
                fault = store.take_fault(path, _fault_token(store, request)) if store.faults else None
                response = self._fault(fault, request) if fault is not None else None
                if fault is None or (fault["status"] is None and not fault["drop_connection"]
                                     and not self.close_connection):
                    response = handler(store, request)  # no fault, or only a delay
                elif handler in _RECORD_KINDS:
                    _note_records(request, _RECORD_KINDS[handler], handler is _import)
        except ApiError as exc:
            response = _error_response(exc)
        except ExpressionError as exc:  # found while running a query's expression
            echoed = path + ("?" + _redacted_query(query) if query else "")
            response = _json(400, {"request": echoed, "error": f"invalid expression: {exc}"})
        except Exception as exc:  # a bug in the fake: answer, record, re-raise in check()
            self.close_connection = True  # where the next request starts is not known
            store.record_error(exc)
            _log.exception("mixpanel_fake internal error on %s %s", self.command, path)
            response = _json(500, {"error": f"mixpanel_fake internal error: "
                                            f"{type(exc).__name__}: {exc}"})
        elapsed = (time.perf_counter() - started) * 1000
        # Journaled before the answer goes out, so a client that has its
        # answer can already read the entry.
        if not (path.startswith("/__parlel/") and self.command == "GET"):
            store.log_request(_journal_entry(self, path, query, request, response, fault, elapsed))
        for done in (request.cleanup if request is not None else ()):
            done()  # before sending: the client's next query must find the room free
        if response is not None:  # None: a fault dropped the connection
            self._send(response, truncate=fault is not None and fault["truncate"])
        elif fault is not None:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        _log.debug("%s %s -> %s in %.1f ms", self.command, self.path.split("?")[0],
                   response.status if response is not None else "dropped", elapsed)

    def _fault(self, fault: dict, request: _Request) -> _Response | None:
        """Act out an injected fault (after the store's lock is released)."""
        if fault["delay"] and self.server.store.stopping.wait(fault["delay"]):
            self.close_connection = True  # stopped while delaying: nobody waits for it
            return None
        if fault["drop_connection"]:
            self.close_connection = True  # the socket closes once the journal has the entry
            return None
        if fault["status"] is None:
            return None  # only a delay: the request is handled normally
        response = _fault_response(fault, request)
        if fault["truncate"]:
            self.close_connection = True
        return response

    def _read_body(self) -> bytes:
        """The body per Content-Length or chunked framing, inflated if gzip."""
        # RFC 9110 §5.6.3: the optional whitespace around values is SP and HTAB only.
        codings = [c.strip(" \t").lower() for value in self.headers.get_all("Transfer-Encoding") or []
                   for c in value.split(",") if c.strip(" \t")]
        lengths = [v.strip(" \t") for v in self.headers.get_all("Content-Length") or []]
        if codings:
            if self.request_version == "HTTP/1.0":
                # RFC 9112 §6.1: Transfer-Encoding in a 1.0 message is faulty framing.
                self.close_connection = True
                raise _plain_error(400, "Transfer-Encoding in an HTTP/1.0 request")
            # RFC 9112 §6.1: chunked must be the last coding, and only once;
            # nothing else is served here.
            if codings[-1] != "chunked" or any(c not in ("chunked", "identity") for c in codings):
                self.close_connection = True
                raise _plain_error(501, "unsupported Transfer-Encoding: "
                                        + _header_safe(", ".join(codings)))
            if codings.count("chunked") > 1:
                self.close_connection = True
                raise _plain_error(400, "chunked applied more than once")
            if lengths:
                self.close_connection = True
                raise _plain_error(400, "both Content-Length and chunked Transfer-Encoding")
            body = self._read_chunked()
        elif lengths:
            if len(set(lengths)) > 1 or not _DIGITS_RE.fullmatch(lengths[0]):
                self.close_connection = True
                raise _plain_error(400, "invalid Content-Length")
            length = int(lengths[0])
            if length > _MAX_BODY_BYTES:
                self.close_connection = True
                if length <= _DRAIN_LIMIT:
                    # Read it anyway: a client still sending would otherwise
                    # see a reset connection instead of the 413.
                    self._discard(length)
                raise _plain_error(413, f"request exceeds max limit of {_MAX_BODY_BYTES} bytes")
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                self.close_connection = True
                raise _plain_error(400, "body shorter than Content-Length")
        else:
            body = b""
        coding = (self.headers.get("Content-Encoding") or "").strip(" \t").lower()
        if coding in ("gzip", "x-gzip") and body:
            body = _gunzip(body, _MAX_BODY_BYTES)
        elif coding not in ("", "identity", "gzip", "x-gzip"):
            raise _plain_error(415, f"unsupported Content-Encoding: {_header_safe(coding)}")
        self.working = True  # from here stop() lets it finish (see _Server.stop)
        return body

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _read_chunked(self) -> bytes:
        """RFC 9112 §7.1, strictly: a size line (extensions allowed) ending
        in a line end, the data, a line end; trailers within the header caps."""
        chunks = []
        total = 0
        while True:
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            size_text = line.split(b";", 1)[0].strip(b" \t\r\n")
            if not line.endswith(b"\n") or not _HEX_RE.match(size_text):
                self.close_connection = True
                raise _plain_error(400, "malformed chunked body: bad chunk size line")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(_MAX_HEADERS + 1):
                    trailer = self.rfile.readline(_MAX_HEADER_LINE + 1)
                    if trailer in (b"\r\n", b"\n"):
                        return b"".join(chunks)
                    if not trailer.endswith(b"\n"):
                        self.close_connection = True
                        raise _plain_error(400, "malformed chunked body: unterminated trailer")
                self.close_connection = True
                raise _plain_error(431, f"more than {_MAX_HEADERS} trailer lines")
            total += size
            if total > _MAX_BODY_BYTES:
                self.close_connection = True
                raise _plain_error(413, f"request exceeds max limit of {_MAX_BODY_BYTES} bytes")
            data = self.rfile.read(size)
            if len(data) < size:
                self.close_connection = True
                raise _plain_error(400, "truncated chunked body")
            chunks.append(data)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise _plain_error(400, "malformed chunked body: chunk data longer than its size")

    def _preflight(self, path: str) -> _Response:
        """CORS preflight: 204, echoing what the browser asks to send."""
        headers = {"Allow": ", ".join(_METHODS_BY_PATH.get(path, ("GET", "POST", "OPTIONS")))}
        if self.headers.get("Origin"):
            asked = self.headers.get("Access-Control-Request-Method")
            headers["Access-Control-Allow-Methods"] = _header_safe(asked or "GET, POST, OPTIONS")
            asked_headers = self.headers.get("Access-Control-Request-Headers")
            if asked_headers:
                headers["Access-Control-Allow-Headers"] = _header_safe(asked_headers)
            headers["Access-Control-Max-Age"] = "600"
            if (self.headers.get("Access-Control-Request-Private-Network") or "").lower() == "true":
                headers["Access-Control-Allow-Private-Network"] = "true"
        return _Response(204, b"", "", headers)

    def _send(self, response: _Response, truncate: bool = False) -> None:
        """Write status, headers and body in one write (see Nagle above);
        ``truncate`` (a fault) sends half the body, then closes."""
        if not isinstance(response.body, bytes):
            self._send_stream(response)
            return
        extra = {"Content-Length": str(len(response.body))} if response.status != 204 else {}
        head = self._head(response, extra)
        send_body = response.status not in (204, 304) and self.command != "HEAD"
        body = response.body[:len(response.body) // 2] if truncate else response.body
        try:
            self.wfile.write(head + body if send_body else head)
        except OSError:
            self.close_connection = True

    def _send_stream(self, response: _Response) -> None:
        """Stream an iterator body: chunked (or to the close on HTTP/1.0),
        gzipped when the client accepts it and it is over 1400 bytes (as
        Mixpanel's export does); a short body goes out as a plain one."""
        chunks = iter(response.body)
        start: list[bytes] = []
        size = 0
        try:
            while size <= 1400:
                piece = next(chunks)
                start.append(piece)
                size += len(piece)
        except StopIteration:
            self._send(_Response(response.status, b"".join(start), response.content_type,
                                 response.headers))
            return
        except Exception as exc:  # before any byte went out: a proper error answer
            self._send(self._stream_error(exc))
            return
        gzip_it = _accepts_gzip(self.headers.get("Accept-Encoding") or "")
        chunked = self.request_version != "HTTP/1.0"
        extra = {}
        if chunked:
            extra["Transfer-Encoding"] = "chunked"
        else:
            self.close_connection = True
        if gzip_it:
            extra["Content-Encoding"] = "gzip"
            extra["Vary"] = "Accept-Encoding"
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip_it else None
        try:
            self.wfile.write(self._head(response, extra))
            if self.command == "HEAD":
                return
            try:
                for piece in itertools.chain(start, chunks):
                    self._write_piece(compressor.compress(piece) if compressor else piece, chunked)
            except OSError:
                raise
            except Exception as exc:
                # Mixpanel's export ends a stream it cannot finish with this line.
                self._stream_error(exc)
                ending = b"terminated early\n"
                self._write_piece(compressor.compress(ending) if compressor else ending, chunked)
            if compressor:
                self._write_piece(compressor.flush(), chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # the client went away mid-stream

    def _stream_error(self, exc: Exception) -> _Response:
        if isinstance(exc, ExpressionError):
            return _Response(400, str(exc).encode("utf-8"), "text/plain; charset=utf-8")
        self.server.store.record_error(exc)
        _log.error("mixpanel_fake internal error while streaming", exc_info=exc)
        return _json(500, {"error": f"mixpanel_fake internal error: {type(exc).__name__}: {exc}"})

    def _write_piece(self, data: bytes, chunked: bool) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def _head(self, response: _Response, extra: dict[str, str]) -> bytes:
        """The status line and headers, CORS included."""
        status = response.status
        phrase = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {phrase}",
                 f"Server: {self.server_version}",
                 f"Date: {_http_date()}"]
        if status != 204 and response.content_type:
            lines.append(f"Content-Type: {response.content_type}")
        lines.extend(f"{k}: {v}" for k, v in extra.items())
        lines.extend(f"{k}: {v}" for k, v in response.headers.items())
        request_headers = getattr(self, "headers", None)
        origin = request_headers.get("Origin") if request_headers is not None else None
        if origin:
            # The browser SDK's XHRs are credentialed: echo the origin, never `*`.
            lines.append(f"Access-Control-Allow-Origin: {_header_safe(origin)}")
            lines.append("Access-Control-Allow-Credentials: true")
            lines.append("Access-Control-Expose-Headers: Retry-After")
            lines.append("Vary: Origin")
        if self.close_connection:
            lines.append("Connection: close")
        elif getattr(self, "request_version", "") == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the stdlib parser, as JSON (never HTML)."""
        self.close_connection = True
        phrase = self.responses.get(code, ("Error",))[0]
        self._send(_error_response(_plain_error(code, message or phrase)))

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def __getattr__(self, name: str) -> Any:
        # Any other method reaches the router too, which answers 405 or 404.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)


def _error_response(exc: ApiError) -> _Response:
    body = exc.body
    if isinstance(body, bytes):
        return _Response(exc.status, body, exc.content_type or "text/plain", exc.headers)
    if isinstance(body, str):
        return _Response(exc.status, body.encode("utf-8"),
                         exc.content_type or "text/plain; charset=utf-8", exc.headers)
    return _json(exc.status, body, exc.headers)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that stops at once and closes idle keep-alives."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], store: Store,
                 tls: ssl.SSLContext | None = None, idle_timeout: float = _IDLE_TIMEOUT,
                 max_connections: int = _MAX_CONNECTIONS):
        idle_timeout = _check_idle_timeout(idle_timeout)
        max_connections = _check_max_connections(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._handlers_lock = threading.Lock()
        self._threads_alive: set = set()  # handler threads (daemons: the stdlib keeps no list)
        super().__init__(address, _Handler)
        self.store = store
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections = 0  # accepted, each with its handler thread, not yet closed
        self.refused = 0      # connections refused past max_connections
        self._lingering: dict = {}  # refused socket -> when it is closed
        self._selector: selectors.BaseSelector | None = None
        self.closing = False
        self._handlers: set = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopped = threading.Event()
        self._stopped.set()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can take
        # seconds on a machine without DNS; the fake needs only the port.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; with TLS, wrap the connection but leave the handshake to
        the handler's thread (its first read), so a slow or plain-HTTP client
        never blocks accepting others."""
        connection, address = super().get_request()
        if self.tls is not None:
            connection = self.tls.wrap_socket(connection, server_side=True,
                                              do_handshake_on_connect=False)
        return connection, address

    def track_connection(self, handler: _Handler, opened: bool) -> None:
        with self._handlers_lock:
            if opened:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to max_connections; past it, a 503."""
        with self._handlers_lock:
            full = self.connections >= self.max_connections
            if not full:
                self.connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._handlers_lock:
            self._threads_alive.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self._handlers_lock:
            self.connections -= 1
            self._threads_alive.discard(threading.current_thread())

    def _refuse(self, connection: socket.socket) -> None:
        """Answer 503 from the accepting thread, without reading the request
        (over TLS, just close: a plain answer would be noise to the client).
        The connection is then read and dropped by serve_forever's selector
        for a moment, so the client reads the 503 rather than a reset."""
        self.refused += 1
        try:
            connection.setblocking(False)
            if self.tls is None:
                body = _dumps({"code": 503, "error": f"too many connections: mixpanel_fake serves at "
                                                     f"most {self.max_connections} at once",
                               "status": "Service Unavailable"})
                connection.send(b"HTTP/1.1 503 Service Unavailable\r\nServer: mixpanel_fake/"
                                + __version__.encode() + b"\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                                % len(body) + body)
                connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._selector is None or self.tls is not None or len(self._lingering) >= _MAX_LINGERING:
            connection.close()
            return
        self._lingering[connection] = time.monotonic() + _REFUSED_LINGER
        self._selector.register(connection, selectors.EVENT_READ, "refused")

    def _drain_refused(self, connection: socket.socket) -> None:
        try:
            data = connection.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_refused(connection)

    def _drop_refused(self, connection: socket.socket) -> None:
        self._lingering.pop(connection, None)
        if self._selector is not None:
            try:
                self._selector.unregister(connection)
            except (KeyError, ValueError):
                pass
        connection.close()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until stop(); a wake-up socket ends the wait at once."""
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                with self._handlers_lock:
                    if self.closing:
                        return
                    selector.register(self, selectors.EVENT_READ)
                    selector.register(self._wake_r, selectors.EVENT_READ)
                self._selector = selector
                while not self.closing:
                    wait = None
                    if self._lingering:
                        wait = max(0.0, min(self._lingering.values()) - time.monotonic())
                    for key, _ in selector.select(wait):
                        if key.fileobj is self._wake_r:
                            return
                        if key.data == "refused":
                            self._drain_refused(key.fileobj)
                        else:
                            self._handle_request_noblock()
                    now = time.monotonic()
                    for connection, until in list(self._lingering.items()):
                        if until <= now:
                            self._drop_refused(connection)
        finally:
            for connection in list(self._lingering):
                self._drop_refused(connection)
            self._selector = None
            self._stopped.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, release the port, and end every connection: idle
        ones and ones still sending a request at once (a request read from
        now on is answered 503 and stores nothing), ones being answered after
        at most _STOP_GRACE; then wait for their threads (bounded)."""
        with self._handlers_lock:
            if self.closing:
                return
            self.closing = True
        self.store.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait(timeout)
        grace = time.monotonic() + _STOP_GRACE
        while True:
            with self._handlers_lock:
                handlers = list(self._handlers)
            last = time.monotonic() >= grace
            working = False
            for handler in handlers:
                if handler.working and not last:
                    working = True
                elif not getattr(handler, "shut", False):
                    handler.shut = True
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            if not working:
                break
            time.sleep(0.01)
        self.server_close(max(0.5, timeout - _STOP_GRACE))
        self._wake_r.close()
        self._wake_w.close()

    def server_close(self, timeout: float = 5.0) -> None:
        """Release the port; wait for the handler threads, but not for ever."""
        socketserver.TCPServer.server_close(self)
        deadline = time.monotonic() + timeout
        with self._handlers_lock:
            threads = list(self._threads_alive)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-request is not an error worth a traceback.
        _log.debug("connection error from %s", client_address, exc_info=True)


def _make_server(host: str, port: int, store: Store,
                 tls: ssl.SSLContext | None = None, idle_timeout: float = _IDLE_TIMEOUT,
                 max_connections: int = _MAX_CONNECTIONS) -> _Server:
    """Bind in the caller's thread, so bind errors and the port are known now."""
    return _Server((host, port), store, tls, idle_timeout, max_connections)


def _check_idle_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError("idle_timeout must be a number of seconds above 0")
    return float(value)


def _check_max_connections(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("max_connections must be a whole number, 1 or more")
    return value


_TLS_DIR: list[str] = []  # where the embedded certificate files were written, once


def _embedded_tls_files() -> tuple[str, str, str]:
    """(certfile, keyfile, ca_file) of the embedded test certificate, written
    once per process to a private temporary folder (ssl loads only files)."""
    if not _TLS_DIR:
        folder = tempfile.mkdtemp(prefix="mixpanel_fake_tls_")
        atexit.register(shutil.rmtree, folder, True)  # leave no key files behind
        for name, text in (("cert.pem", _TLS_CERT_PEM), ("key.pem", _TLS_KEY_PEM),
                           ("ca.pem", _TLS_CA_PEM)):
            with open(os.path.join(folder, name), "w", encoding="ascii") as handle:
                handle.write(text)
        _TLS_DIR.append(folder)
    folder = _TLS_DIR[0]
    return (os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem"),
            os.path.join(folder, "ca.pem"))


def _tls_context(certfile: str | None, keyfile: str | None) -> tuple[ssl.SSLContext, str]:
    """A server context and the file clients must trust: the embedded test
    certificate, or the caller's own (then the certfile is what to trust)."""
    if certfile is None:
        if keyfile is not None:
            raise ValueError("keyfile needs certfile")
        certfile, keyfile, ca_file = _embedded_tls_files()
    else:
        ca_file = certfile
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context, ca_file


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int, scheme: str = "http") -> str:
    """The URL a client on this machine uses (wildcard binds: loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _check_expectation(name: Any, count: Any) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError("name must be an event name (text) or None")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError("count must be a whole number, 0 or more")


def _load_state(store: Store, path: str, configured: list[Project]) -> None:
    """Load a state file as the seed; the projects configured now (their
    secrets, plans) win over the file's copies of them."""
    _check_state_path(path)
    store.state_file = path
    if os.path.exists(path):
        store.seed = _read_state(path)
        store.restore(store.seed)
        for project in configured:
            store.add_project(project)


def _read_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            snapshot = json.load(handle)
    except ValueError as exc:
        raise ValueError(f"state file {path!r} is not JSON: {exc}") from None
    _read_snapshot(snapshot)  # checked now, not when it breaks a query
    return snapshot


_SAVE_LOCK = threading.Lock()


def _check_state_path(path: str) -> None:
    """A state file's folder must exist now, not only at exit; temporary
    files a killed save left behind are removed."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or os.path.isdir(path):
        raise ValueError(f"state file {path!r}: its folder must exist and it must not be a folder")
    prefix = f".{os.path.basename(path)}."
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def _write_state(path: str, snapshot: dict) -> None:
    """Atomic: write a temporary file beside it, fsync, rename over it (one
    save at a time; a crash leaves the last good file)."""
    directory = os.path.dirname(os.path.abspath(path))
    data = _dumps(snapshot)
    with _SAVE_LOCK:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                                 dir=directory)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    try:  # make the rename itself durable
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check_save_interval(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError("save_interval must be a number of seconds above 0, or None")
    return float(value)


def _autosave(store: Store, path: str, interval: float) -> threading.Thread:
    """Save the state file every `interval` seconds while it changes (each
    save atomic), until the store stops; a SIGKILL then loses at most the
    last interval."""
    def run() -> None:
        saved = store.version  # as loaded: the file has it already
        while not store.stopping.wait(interval):
            version = store.version
            if version == saved:
                continue
            try:
                _write_state(path, store.snapshot())
            except (OSError, ValueError) as exc:
                _log.warning("mixpanel_fake: saving the state file %s failed: %s", path, exc)
                continue
            saved = version
    thread = threading.Thread(target=run, name="mixpanel-fake:autosave", daemon=True)
    thread.start()
    return thread


# =============================================================================
# MixpanelFake: the server on a background thread, and the Python API
# =============================================================================


class MixpanelFake:
    """A running fake: ``with MixpanelFake() as mp:`` or ``start()``/``stop()``.

    The socket is bound when the object is made, so ``mp.port`` and
    ``mp.url`` are known before the server thread starts.
    """

    def __init__(self, host: str = _DEFAULT_HOST, port: int = 0,
                 projects: list[Project] | None = None,
                 clock: Callable[[], float] | None = None, strict_auth: bool = False,
                 journal_size: int = _JOURNAL_SIZE, max_events: int | None = None,
                 rate_limits: dict | None = None, state_file: str | None = None,
                 tls: bool = False, certfile: str | None = None, keyfile: str | None = None,
                 idle_timeout: float = _IDLE_TIMEOUT, max_connections: int = _MAX_CONNECTIONS,
                 save_interval: float | None = None):
        self.save_interval = _check_save_interval(save_interval)  # the server checks the other two
        if save_interval is not None and state_file is None:
            raise ValueError("save_interval needs a state_file")
        self._autosaver: threading.Thread | None = None
        self.store = Store(projects, clock, strict_auth, journal_size, max_events, rate_limits)
        self.state_file = state_file
        if state_file is not None:
            _load_state(self.store, state_file, projects or [])
        context = None
        #: The file a client must trust to verify the fake (tls only), else None.
        self.ca_file: str | None = None
        if tls or certfile is not None or keyfile is not None:
            context, self.ca_file = _tls_context(certfile, keyfile)
        self.tls = context is not None
        self._server = _make_server(host, port, self.store, context, idle_timeout, max_connections)
        self.host = host
        self.port: int = self._server.server_address[1]
        if not _is_loopback(host):
            _log.warning("mixpanel_fake bound to %r: reachable beyond this machine", host)
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------

    @property
    def url(self) -> str:
        return _url(self.host, self.port, "https" if self.tls else "http")

    @property
    def api_host(self) -> str:
        """``host:port``, for clients that take a host and add https:// themselves
        (the Python SDK's ``api_host``, its flags configs)."""
        return self.url.split("://", 1)[1]

    @property
    def urls(self) -> dict[str, str]:
        """The Python SDK's four URL arguments: ``mixpanel.Consumer(**mp.urls)``."""
        base = self.url
        return {"events_url": base + "/track", "people_url": base + "/engage",
                "groups_url": base + "/groups", "import_url": base + "/import"}

    def start(self) -> MixpanelFake:
        if self._server.closing:
            raise RuntimeError("this MixpanelFake was stopped; make a new one")
        if self._thread is not None:
            raise RuntimeError("this MixpanelFake is already running")
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"mixpanel-fake:{self.port}", daemon=True)
        self._thread.start()
        if self.save_interval is not None:
            self._autosaver = _autosave(self.store, self.state_file, self.save_interval)
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call more than once.
        With a state file, the state is saved on the first stop."""
        first = not self._server.closing
        self._server.stop()
        if self._thread is not None:
            self._thread.join(5)
        if self._autosaver is not None:
            self._autosaver.join(10)  # a save under way finishes first
        if first and self.state_file is not None:
            self.save()

    close = stop

    def __enter__(self) -> MixpanelFake:
        return self.start()

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self.stop()
        if exc_type is None:
            self.check()  # a handler's error fails the test that caused it

    # --- configuration ------------------------------------------------------

    def set_time(self, ts: float | None) -> None:
        """Pin the project clock at epoch seconds ``ts`` (None: follow the clock)."""
        self.store.set_time(ts)

    def add_project(self, project: Project) -> Project:
        return self.store.add_project(project)

    # --- reads --------------------------------------------------------------

    def events(self, name: str | None = None, distinct_id: Any = None,
               project: str | None = None, properties: dict | None = None,
               dedup: bool = False) -> list[dict]:
        """Stored events as ``{"event", "properties"}``, in arrival order.

        ``properties={...}`` keeps events whose properties include those
        values (property names such as ``$browser`` cannot be keywords).
        ``dedup=True`` shows what Mixpanel's reports count: one event per
        (event, distinct_id, time, $insert_id), the latest copy winning.
        """
        if properties is not None and not isinstance(properties, dict):
            raise TypeError("properties must be a dict of property values")
        return _stored_events(self.store, name, distinct_id, project, properties, dedup)

    def canonical(self, distinct_id: Any, project: str | None = None) -> str | None:
        """The canonical id of ``distinct_id``'s identity cluster (itself when
        it is in none); with no ``project``, the first project that knows it."""
        key = _id_text(distinct_id)
        if key is None:
            return None
        return self.store.canonical(key, project)

    def profiles(self, project: str | None = None) -> dict[str, dict]:
        """``{distinct_id: properties}`` (pass ``project`` when several share ids)."""
        return {key: _copy(props) for _, key, props in self.store.profile_rows("people", project)}

    def profile(self, distinct_id: Any, project: str | None = None) -> dict | None:
        key = _id_text(distinct_id)
        key = key[:_MAX_STRING] if key is not None else None  # stored ids are cut at 255
        matches = [props for _, found, props in self.store.profile_rows("people", project)
                   if found == key]
        return _copy(matches[-1]) if matches else None  # the same one profiles() shows

    def groups(self, project: str | None = None) -> dict[tuple[str, str], dict]:
        """``{(group_key, group_id): properties}``."""
        return {key: _copy(props) for _, key, props in self.store.profile_rows("groups", project)}

    def rejected(self, project: str | None = None) -> list[dict]:
        """Every refused record: its reason, field, endpoint, project and index."""
        return [_copy(record) for record in self.store.rejected_rows(project)]

    def reset(self, project: str | None = None, empty: bool = False) -> None:
        """Back to the seed state (a loaded state file) or, with ``empty``,
        to nothing; of one project or of all.  The journal stays; faults go."""
        self.store.reset(project, empty)

    # --- state ------------------------------------------------------------------

    def snapshot(self, project: str | None = None) -> dict:
        """The state (of one project, or all) as JSON-ready data."""
        return self.store.snapshot(project)

    def restore(self, snapshot: dict) -> None:
        """Put a snapshot back; projects it does not name are untouched."""
        self.store.restore(snapshot)

    def save(self, path: str | None = None) -> str:
        """Write the state to ``path`` (default: the state file) atomically:
        a temporary file, fsync, rename; the last good file survives a crash."""
        target = path or self.state_file
        if target is None:
            raise ValueError("no state file: pass a path, or MixpanelFake(state_file=...)")
        _write_state(target, self.store.snapshot())
        return target

    def stats(self) -> dict:
        return self.store.stats()

    # --- the journal and faults ------------------------------------------------

    def requests(self, path: str | None = None, since: int | None = None,
                 project: str | None = None, limit: int | None = None) -> list[dict]:
        """Journaled requests (newest last): method, path, query, headers and
        credentials redacted, body size, decoded records, status, response,
        duration, fault.  ``since`` is a `seq` cursor: only later ones."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError("limit must be a whole number, 1 or more")
        return _copy(_journal_rows(self.store, path, since or 0, project, limit))

    def add_fault(self, path: str, status: int = 503, body: Any = None,
                  retry_after: int | None = None, delay: float = 0, drop_connection: bool = False,
                  truncate: bool = False, times: int | None = 1, probability: float = 1.0,
                  seed: int | None = None, project: str | None = None,
                  expires_after: float | None = None) -> int:
        """Make the next ``times`` requests to ``path`` ("*": any) fail; returns its id.

        The default body is the endpoint's own error shape (the SDKs read
        the body, not the status).  ``delay`` sleeps first; ``drop_connection``
        closes the socket unanswered; ``truncate`` cuts the body in half.
        """
        return self.store.add_fault(_make_fault(path, status, body, retry_after, delay, drop_connection,
                                                truncate, times, probability, seed, project,
                                                expires_after))

    def faults(self) -> list[dict]:
        with self.store.lock:
            return [_fault_view(f) for f in self.store.faults]

    def clear_faults(self) -> None:
        with self.store.lock:
            self.store.faults = []

    def set_tracking_plan(self, plan: dict | None, project: str | None = None,
                          enforce: bool = False) -> None:
        """Hold a project's events to a tracking plan (None removes it).

        Violations are kept among `rejected()` (with ``stored: True``); the
        client is told nothing unless ``enforce``, which refuses the event.
        """
        target, _ = _target_state(self.store, project)
        target.tracking_plan = _check_plan(plan)
        target.plan_enforce = bool(enforce)

    # --- feature flags ---------------------------------------------------------

    def set_flags(self, flags: list, project: str | None = None) -> None:
        """Replace a project's feature flags: definitions in the shape
        /flags/definitions serves ({"key", "ruleset": {"variants", "rollout",
        "test"}, "context"?, "hash_salt"?, ...}); ValueError says what is wrong."""
        target, _ = _target_state(self.store, project)
        target.flags = _check_flags(flags, target.project_id)

    def add_flag(self, key: str, variants: Any = None, rollout: Any = 1.0,
                 project: str | None = None, **fields: Any) -> dict:
        """Add (or replace) one flag.  ``variants`` maps variant key to value
        (default {"On": True}, a boolean flag); ``rollout``
        is a fraction of contexts or a list of rollout objects.  Other fields
        (test_users, hash_salt, context, experiment_id, ...) go in as given."""
        target, _ = _target_state(self.store, project)
        if variants is None:
            variants = {"On": True}
        if isinstance(variants, dict):
            share = 1.0 / len(variants) if variants else 0.0
            variants = [{"key": k, "value": v, "is_control": False, "split": share}
                        for k, v in variants.items()]
        if isinstance(rollout, (int, float)) and not isinstance(rollout, bool):
            rollout = [{"rollout_percentage": rollout}]
        test_users = fields.pop("test_users", None)
        flag = dict(fields, key=key, ruleset={"variants": variants, "rollout": rollout,
                                              "test": {"users": dict(test_users or {})}})
        checked = _check_flag(flag, target.project_id)
        target.flags = [f for f in target.flags if f["key"] != key] + [checked]
        return checked

    def set_sdk_config(self, config: dict, project: str | None = None) -> None:
        """What /settings answers the browser SDK: {"sdk_config": {"config": config}}."""
        if not isinstance(config, dict):
            raise ValueError("config is a dict of browser SDK settings")
        target, _ = _target_state(self.store, project)
        target.sdk_config = dict(config)

    def recordings(self, project: str | None = None, replay_id: str | None = None) -> list[dict]:
        """Session-replay batches /record received: the query's fields
        (replay_id, seq as an int, distinct_id, ...) and ``events`` (rrweb)."""
        return [_copy(row) for row in self.store.recording_rows(project)
                if replay_id is None or row.get("replay_id") == replay_id]

    def flags(self, project: str | None = None) -> list[dict]:
        """A project's flag definitions, as /flags/definitions serves them."""
        target, _ = _target_state(self.store, project)
        return list(target.flags)

    # --- assertions that explain ---------------------------------------------

    def assert_tracked(self, name: str, count: int | None = None, properties: dict | None = None,
                       project: str | None = None, **props: Any) -> list[dict]:
        """Assert that ``name`` was tracked (``count`` times exactly, if given)
        with these properties; returns the matches.  A failure lists the
        nearest misses: the same event with other values, similar names, and
        refused records that would have matched, with why."""
        _check_expectation(name, count)
        wanted = dict(properties or {}, **props)
        found = self.events(name=name, project=project, properties=wanted or None)
        if (count is None and found) or (count is not None and len(found) == count):
            return found
        raise AssertionError(self._explain(name, wanted, project, count, found))

    def assert_not_tracked(self, name: str, properties: dict | None = None,
                           project: str | None = None, **props: Any) -> None:
        wanted = dict(properties or {}, **props)
        found = self.events(name=name, project=project, properties=wanted or None)
        if found:
            shown = "\n".join(f"  tracked: {_dumps(e['properties']).decode()[:300]}" for e in found[:5])
            raise AssertionError(f"expected no event {name!r}" + (f" with {wanted}" if wanted else "")
                                 + f"; {len(found)} arrived\n{shown}")

    def assert_profile(self, distinct_id: Any, properties: dict | None = None,
                       project: str | None = None, **props: Any) -> dict:
        """Assert that the profile exists with these values; returns it."""
        wanted = dict(properties or {}, **props)
        profile = self.profile(distinct_id, project=project)
        if profile is not None and all(k in profile and _json_equal(profile[k], v)
                                       for k, v in wanted.items()):
            return profile
        lines = []
        if profile is None:
            lines.append(f"no profile for {distinct_id!r}")
            ids = [str(key) for key in self.profiles(project=project)]
            for near in difflib.get_close_matches(str(distinct_id), ids, n=3, cutoff=0.6):
                lines.append(f"  similar id with a profile: {near!r}")
        else:
            lines.append(f"profile {distinct_id!r} differs from {wanted}:")
            for key, value in wanted.items():
                if key not in profile:
                    lines.append(f"  {key}: missing (expected {value!r})")
                elif not _json_equal(profile[key], value):
                    lines.append(f"  {key}: {profile[key]!r} (expected {value!r})")
        for record in self.rejected(project):
            if isinstance(record["record"], dict) and record["record"].get("$distinct_id") == distinct_id:
                lines.append(f"  refused on {record['endpoint']}: {record['reason']}")
        raise AssertionError("\n".join(lines))

    def wait_for(self, name: str | None = None, count: int = 1, timeout: float = 5,
                 project: str | None = None, properties: dict | None = None, **props: Any) -> list[dict]:
        """Wait until ``count`` events match; return them.  On timeout,
        raise `WaitTimeout` with the same explanation as `assert_tracked`."""
        _check_expectation(name, count)
        wanted = dict(properties or {}, **props)
        try:
            return self.wait_for_events(count, timeout, name=name, project=project,
                                        properties=wanted or None)
        except WaitTimeout:
            found = self.events(name=name, project=project, properties=wanted or None)
            raise WaitTimeout(f"waited {timeout}s: " + self._explain(name, wanted, project, count, found,
                                                                     at_least=True)) from None

    def _explain(self, name: str | None, wanted: dict, project: str | None, count: int | None,
                 found: list, at_least: bool = False) -> str:
        return _explain_missing(self.store, name, wanted, project, count, found, at_least)

    # --- the query API, from Python ------------------------------------------

    def add_funnel(self, name: str, steps: list, window: int = 30, where: str | None = None,
                   project: str | None = None) -> int:
        """Save a funnel (steps: event names or {"event", "where"}); returns
        its funnel_id for /api/query/funnels."""
        return _register_funnel(self.store, project, name, steps, window, where)

    def add_cohort(self, name: str, where: str | None = None, distinct_ids: list | None = None,
                   description: str = "", project: str | None = None) -> int:
        """Save a cohort, by a `where` over profiles or a list of ids; returns
        its id for /cohorts/list and `filter_by_cohort`."""
        return _register_cohort(self.store, project, name, where, distinct_ids, description)

    def add_insight(self, name: str, event: str, unit: str = "day", type: str = "general",
                    on: str | None = None, where: str | None = None, days: int = 30,
                    project: str | None = None) -> int:
        """Save an Insights report over the last ``days`` days; returns its
        bookmark_id for /api/query/insights."""
        return _register_insight(self.store, project, name, event, unit, type, on, where, days)

    def query(self, path: str, project: str | None = None, **params: Any) -> Any:
        """Call a query endpoint in-process: ``mp.query("segmentation",
        event="Signed Up", from_date=..., to_date=...)``.  Lists and dicts
        are sent as JSON; the answer comes back decoded (export: a list of
        events); an error raises `ApiError` with Mixpanel's status and body."""
        path = _normalize_path("/api/2.0/" + path.lstrip("/"))
        pairs = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        headers = {}
        if project is not None:
            credentials = base64.b64encode(f"{project}:".encode()).decode()
            headers["Authorization"] = "Basic " + credentials
        query = urlencode(pairs)
        handler = _route("GET", path, query)
        request = path + ("?" + query if query else "")
        call = _Request("GET", path, query, headers, b"")
        try:
            response = handler(self.store, call)
            body = response.body if isinstance(response.body, bytes) else b"".join(response.body)
        except ExpressionError as exc:
            raise ApiError(400, {"request": request, "error": f"invalid expression: {exc}"}) from None
        finally:
            for done in call.cleanup:
                done()
        if response.status != 200:
            raise ApiError(response.status, body.decode("utf-8", "replace"))
        if path == "/api/2.0/export":
            return [json.loads(line) for line in body.splitlines() if line.strip()]
        return json.loads(body)

    def export(self, project: str | None = None, **params: Any) -> list[dict]:
        """`/api/2.0/export` as a list of events (see `query`)."""
        return self.query("export", project=project, **params)

    def segmentation(self, project: str | None = None, **params: Any) -> dict:
        """`/api/query/segmentation` (see `query`)."""
        return self.query("segmentation", project=project, **params)

    def check(self) -> None:
        """Re-raise, in the test's thread, the first error a handler hit."""
        with self.store.lock:
            errors, self.store.errors = self.store.errors, []
        if errors:
            raise errors[0]

    def wait_for_events(self, n: int, timeout: float = 5, **filters: Any) -> list[dict]:
        """Wait until ``n`` events match ``filters`` (those of ``events()``).

        Returns the matching events; on timeout raises `WaitTimeout` saying
        what did arrive.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError("n must be a whole number of events, 0 or more")
        if not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
            raise ValueError("timeout must be a number of seconds, 0 or more")
        found = _wait_events(self.store, n, min(timeout, _MAX_WAIT), lambda: self.events(**filters))
        if len(found) >= n:
            return found
        raise WaitTimeout(self._explain_wait(n, timeout, filters, found))

    def _explain_wait(self, n: int, timeout: float, filters: dict, found: list) -> str:
        everything = self.events(project=filters.get("project"))
        lines = [f"waited {timeout}s for {n} event(s) matching {filters or 'anything'}; "
                 f"{len(found)} matched, {len(everything)} arrived in all"]
        for event in everything[-10:]:
            props = event["properties"]
            lines.append(f"  arrived: {event['event']!r} distinct_id={props.get('distinct_id')!r}")
        for record in self.rejected(filters.get("project"))[-10:]:
            where = "whole request" if record["index"] is None else f"index {record['index']}"
            lines.append(f"  rejected on {record['endpoint']} ({where}): {record['reason']}")
        return "\n".join(lines)


# =============================================================================
# CLI
# =============================================================================

def main(argv: list[str] | None = None) -> int:
    """Run the fake in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="mixpanel_fake.py",
        description="A local, in-memory fake of the Mixpanel HTTP API, for tests.")
    parser.add_argument("--host", default=_DEFAULT_HOST,
                        help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on (default: %(default)s; 0 = any free port)")
    parser.add_argument("--token", default=os.environ.get("MIXPANEL_TOKEN"),
                        help="pre-create a project with this token (env MIXPANEL_TOKEN)")
    parser.add_argument("--api-secret", default=os.environ.get("MIXPANEL_API_SECRET"),
                        help="that project's API secret (env MIXPANEL_API_SECRET)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--strict-auth", action="store_true",
                        help="accept only the configured project's credentials")
    parser.add_argument("--state-file", metavar="PATH",
                        help="load state from PATH at start, save it there on exit (atomically)")
    parser.add_argument("--max-events", type=int, metavar="N",
                        help="keep at most N events per project (the oldest are dropped)")
    parser.add_argument("--journal-size", type=int, default=_JOURNAL_SIZE, metavar="N",
                        help="requests kept in the journal (default: %(default)s)")
    parser.add_argument("--log-events", action="store_true",
                        help="print one JSON line per accepted or refused record to stdout")
    parser.add_argument("--fault", action="append", default=[], metavar="JSON",
                        help='add a fault, e.g. \'{"path": "/track", "status": 503, "times": 2}\'')
    parser.add_argument("--rate-limit", action="append", default=[], metavar="NAME=N",
                        help="turn on a rate limit: " + ", ".join(_RATE_LIMITS))
    parser.add_argument("--tracking-plan", metavar="FILE",
                        help="a JSON tracking plan for the --token project")
    parser.add_argument("--tls", action="store_true",
                        help="serve HTTPS with the embedded test certificate (loopback only)")
    parser.add_argument("--certfile", metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--keyfile", metavar="PEM", help="the --certfile's private key")
    parser.add_argument("--flags", metavar="FILE",
                        help='feature flags for the --token project: a JSON list, or {"flags": [...]}')
    parser.add_argument("--plan-enforce", action="store_true",
                        help="refuse events that break the tracking plan")
    parser.add_argument("--save-interval", type=float, metavar="SECONDS",
                        help="with --state-file, also save every SECONDS while the state changes, "
                             "so a kill loses at most that much (default: only on exit)")
    parser.add_argument("--idle-timeout", type=float, default=_IDLE_TIMEOUT, metavar="SECONDS",
                        help="close idle connections, and requests whose head has not arrived, "
                             "after this long (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=_MAX_CONNECTIONS, metavar="N",
                        help="serve at most N connections at once; more get a 503 "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.api_secret and not args.token:
        parser.error("--api-secret needs --token (or MIXPANEL_TOKEN)")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.strict_auth and not args.token and not args.state_file:
        parser.error("--strict-auth needs a project: --token (or MIXPANEL_TOKEN) or --state-file")
    if args.tracking_plan and not args.token:
        parser.error("--tracking-plan needs --token")
    if args.flags and not args.token:
        parser.error("--flags needs --token")
    if args.save_interval is not None and not args.state_file:
        parser.error("--save-interval needs --state-file")
    try:
        _check_idle_timeout(args.idle_timeout)
        _check_max_connections(args.max_connections)
        _check_save_interval(args.save_interval)
    except ValueError as exc:
        parser.error("--" + str(exc).replace("_", "-"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        plan = None
        if args.tracking_plan:
            with open(args.tracking_plan, encoding="utf-8") as handle:
                plan = json.load(handle)
        flags = None
        if args.flags:
            with open(args.flags, encoding="utf-8") as handle:
                flags = json.load(handle)
            if isinstance(flags, dict):
                if set(flags) != {"flags"}:
                    raise ValueError(f'{args.flags}: a list of flags, or {{"flags": [...]}}')
                flags = flags["flags"]
        projects = [Project(args.token, api_secret=args.api_secret, tracking_plan=plan,
                            plan_enforce=args.plan_enforce, flags=flags)] if args.token else []
        limits = {}
        for item in args.rate_limit:
            name, _, value = item.partition("=")
            limits[name] = int(value)
        store = Store(projects, strict_auth=args.strict_auth, journal_size=args.journal_size,
                      max_events=args.max_events, rate_limits=limits)
        for text in args.fault:
            store.add_fault(_make_fault(**json.loads(text)))
        if args.state_file:
            _load_state(store, args.state_file, projects)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        parser.error(str(exc))
    if args.log_events:
        store.log_sink = functools.partial(print, flush=True)
    context, ca_file = None, None
    try:
        if args.tls or args.certfile or args.keyfile:
            context, ca_file = _tls_context(args.certfile, args.keyfile)
    except (OSError, ValueError, ssl.SSLError) as exc:
        parser.error(f"TLS: {exc}")
    try:
        server = _make_server(args.host, args.port, store, context, args.idle_timeout,
                              args.max_connections)
    except OSError as exc:
        print(f"mixpanel_fake: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = server.server_address[1]
    print(f"mixpanel_fake listening on {_url(args.host, port, 'https' if context else 'http')}",
          flush=True)
    if ca_file:
        print(f"mixpanel_fake: clients must trust {ca_file}", flush=True)
        if not args.certfile and not _is_loopback(args.host):
            print("mixpanel_fake: warning: --tls uses a test key that is public (it ships in this "
                  "file); off loopback, use --certfile/--keyfile", file=sys.stderr, flush=True)
    if not _is_loopback(args.host):
        print(f"mixpanel_fake: warning: bound to {args.host}, reachable beyond this machine; "
              "it accepts any credentials", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _stop_on_signal)  # a clean exit saves the state file
    gc.freeze()
    gc.set_threshold(*_SERVER_GC_THRESHOLDS)
    autosaver = _autosave(store, args.state_file, args.save_interval) if args.save_interval else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if autosaver is not None:
            autosaver.join(10)
        if args.state_file:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the save
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _write_state(args.state_file, store.snapshot())
    return 0


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
