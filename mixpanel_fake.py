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
import base64
import binascii
import datetime
import hashlib
import json
import logging
import os
import re
import selectors
import socket
import socketserver
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import unquote, unquote_plus, urlsplit

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_PORT",
    "ApiError",
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

# The Node SDK sends every single call as a GET with the whole base64 payload
# in the query string; an event near Mixpanel's 1 MB limit is ~1.4 MB there.
_MAX_REQUEST_LINE = 4 * 1024 * 1024
# Mixpanel's /import takes 10 MB of uncompressed JSON per request (R-import);
# the fake reads a little more so that the size rule, not the socket, answers.
_MAX_BODY_BYTES = 16 * 1024 * 1024
# Idle keep-alive connections are closed after this many seconds, so a stalled
# client cannot pin a server thread for ever.
_IDLE_TIMEOUT = 15.0

# A `time` above this is milliseconds, below it seconds (1e11 s is year 5138,
# 1e11 ms is 1973): the SDKs send float seconds (Python, browser) or integer
# milliseconds (Node Dates, Go, Swift, Java, Ruby).
_MS_THRESHOLD = 1e11

# The operators each kind of profile accepts (ingestion-api.md §4.3, §5).
# Groups: Mixpanel's docs say $add and $append are not supported for group
# profiles (D-profiles), and no SDK sends them.
_PEOPLE_OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete")
_GROUP_OPS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
# Operators that create the profile when it does not exist yet.
_CREATING_OPS = frozenset(("$set", "$set_once", "$add", "$append", "$union"))

# The 1x1 transparent GIF that `img=1` answers with (pixel tracking).
_PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
# A JSONP callback name: the browser SDK uses `mixpanel._jsc["..."]` or
# `(function(){})`; anything else is refused rather than reflected.
_CALLBACK_RE = re.compile(r"^[\w$.\[\]\"'(){}]{1,256}$")
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


def _derive_project_id(token: str) -> int:
    """A stable 7-digit project id for a token (same token, same id, every run)."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    return 1000000 + int.from_bytes(digest[:4], "big") % 9000000


class Project:
    """A Mixpanel project: its token, id, secret and service accounts.

    ``service_accounts`` maps service-account username to secret (a dict, or a
    list of ``(username, secret)`` pairs).  ``id_merge`` is "simplified"
    (Mixpanel's default since 2024) or "original".
    """

    def __init__(self, token: str, project_id: int | str | None = None,
                 api_secret: str | None = None, service_accounts: Any = None,
                 timezone: str = "UTC", id_merge: str = "simplified"):
        if not isinstance(token, str) or not token:
            raise ValueError("a project needs a non-empty string token")
        if id_merge not in ("simplified", "original"):
            raise ValueError("id_merge must be 'simplified' or 'original'")
        self.token = token
        self.project_id = _derive_project_id(token) if project_id is None else project_id
        self.api_secret = token if api_secret is None else api_secret
        self.service_accounts = dict(service_accounts or {})
        self.timezone = timezone
        self.id_merge = id_merge

    def __repr__(self) -> str:
        # Never show the secret or service-account secrets.
        return (f"Project(token={self.token!r}, project_id={self.project_id!r}, "
                f"timezone={self.timezone!r}, id_merge={self.id_merge!r})")

    def describe(self) -> dict[str, Any]:
        """What the inspection API shows of a project: no secrets."""
        return {"token": self.token, "project_id": self.project_id,
                "timezone": self.timezone, "id_merge": self.id_merge,
                "service_accounts": sorted(self.service_accounts)}


class _ProjectState:
    """Everything one project holds; a reset swaps the whole object out.

    Events are kept once, as the dicts decoded from the request (never
    mutated after they are stored); ``event_ids`` runs beside them.  Profiles
    are replaced, never changed in place, so a reader holding one needs no lock.
    """

    __slots__ = ("events", "event_ids", "profiles", "groups", "rejected")

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.event_ids: list[int] = []
        self.profiles: dict[str, dict] = {}
        self.groups: dict[tuple[str, str], dict] = {}
        self.rejected: list[dict] = []


class Store:
    """All projects and their state behind one lock.

    Handlers decode and validate outside the lock and take it only to append
    or swap; readers copy references under it and encode outside it.
    """

    def __init__(self, projects: list[Project] | None = None,
                 clock: Callable[[], float] | None = None):
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
        for project in projects or ():
            self.add_project(project)

    # --- time ---------------------------------------------------------------

    def now(self) -> float:
        """The project clock: pinned by set_time(), else the clock callable."""
        pinned = self._pinned
        return self._clock() if pinned is None else pinned

    def set_time(self, ts: float | None) -> None:
        self._pinned = None if ts is None else float(ts)

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
            if username in self.projects:
                return username
            for project in self.projects.values():
                if project.api_secret == username:
                    return project.token
            if project_id is not None:
                for project in self.projects.values():
                    if (str(project.project_id) == project_id
                            and project.service_accounts.get(username) == password):
                        return project.token
        if username and not password:
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
        """Store accepted events and refused records in one critical section."""
        with self.lock:
            for token, event in accepted:
                state = self._project_locked(token)[1]
                state.events.append(event)
                state.event_ids.append(self._next_id)
                self._next_id += 1
            self._reject_locked(rejected)
            self._changed_locked()

    def _changed_locked(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def _reject_locked(self, rejected: list[dict]) -> None:
        for record in rejected:
            record["seq"] = self._next_id
            self._next_id += 1
            token = record["project"]
            if token is None:
                # No project could be named: keep it where a global read sees it.
                self.states.setdefault("", _ProjectState()).rejected.append(record)
            else:
                self._project_locked(token)[1].rejected.append(record)

    def apply_profile_updates(self, kind: str, updates: list[tuple], rejected: list[dict]) -> None:
        """Apply profile or group updates in batch order, then keep refusals.

        Each update is ``(token, key, ops, last_seen)`` where ``ops`` is a list
        of ``(operator, value)`` and ``last_seen`` an ISO string or None.
        """
        with self.lock:
            for token, key, ops, last_seen in updates:
                state = self._project_locked(token)[1]
                table = state.profiles if kind == "people" else state.groups
                _apply_ops(table, key, ops, last_seen)
            self._reject_locked(rejected)
            self._changed_locked()

    def reset(self, project: str | None = None) -> None:
        """Drop the state of one project, or of all; the projects stay known."""
        with self.lock:
            if project is None:
                self.states = {token: _ProjectState() for token in self.projects}
            else:
                self.states[project] = _ProjectState()
            self._changed_locked()

    def clear_events(self, project: str | None = None) -> None:
        with self.lock:
            for token, state in self.states.items():
                if project is None or token == project:
                    state.events = []
                    state.event_ids = []
            self._changed_locked()

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

    def rejected_rows(self, project: str | None = None) -> list[dict]:
        with self.lock:
            parts = [list(s.rejected) for _, s in self._states(project)]
        rows = [r for part in parts for r in part]
        if len(parts) > 1:
            rows.sort(key=_by_seq)
        return rows


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


def _contains(items: list, value: Any) -> bool:
    return any(_json_equal(item, value) for item in items)


def _op_set(props: dict, value: dict) -> None:
    props.update(value)


def _op_set_once(props: dict, value: dict) -> None:
    for name, item in value.items():
        props.setdefault(name, item)


def _op_add(props: dict, value: dict) -> None:
    # A missing property counts as 0; a non-numeric one is left alone.
    for name, amount in value.items():
        current = props.get(name, 0)
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            props[name] = current + amount


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
        for item in items:
            if not _contains(merged, item):
                merged.append(item)
        props[name] = merged


def _op_remove(props: dict, value: dict) -> None:
    # Every occurrence goes (choice: the docs say "the value is removed").
    for name, item in value.items():
        current = props.get(name)
        if isinstance(current, list):
            props[name] = [x for x in current if not _json_equal(x, item)]


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


def _apply_ops(table: dict, key: Any, ops: list[tuple[str, Any]], last_seen: str | None) -> None:
    """Apply one update's operators to ``table[key]`` (lock held).

    The profile is rebuilt, not changed in place, so readers holding the old
    dict see a consistent snapshot.
    """
    old = table.get(key)
    props = None if old is None else dict(old)
    touched = False
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
        touched = True
    if props is None:
        table.pop(key, None)
        return
    if touched and last_seen is not None:
        props["$last_seen"] = last_seen
    table[key] = props


# =============================================================================
# Requests and responses
# =============================================================================


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
            pairs.setdefault(unquote_plus(name), value)
    return pairs


def _looks_json(body: bytes, content_type: str) -> bool:
    """Raw JSON (or NDJSON) body rather than a form (sdks.md §5.3 step 3)."""
    if "json" in content_type:
        return True
    return body.lstrip()[:1] in (b"[", b"{")


class _Request:
    """One decoded HTTP request, as handlers see it."""

    __slots__ = ("method", "path", "headers", "body", "raw", "is_json", "client")

    def __init__(self, method: str, path: str, query: str, headers: Any,
                 body: bytes, client: str = ""):
        self.method = method
        self.path = path
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
        return default if raw is None else unquote_plus(raw)

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

    def __init__(self, status: int, body: bytes, content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


def _dumps(value: Any) -> bytes:
    """Compact JSON with Unicode kept raw; lone surrogates fall back to escapes."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, _dumps(value), "application/json", headers)


def _text(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> _Response:
    return _Response(status, text.encode("utf-8"), content_type)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity; depth and digit bombs become errors."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _decode_data(raw: str) -> Any:
    """Decode a ``data=`` value: URL-encoded JSON, or (URL-encoded) base64 JSON."""
    try:
        text = unquote_plus(raw, errors="strict").strip()
    except UnicodeDecodeError:
        raise _PayloadError("data, not valid UTF-8") from None
    if text[:1] in ("{", "["):
        try:
            return _loads(text)
        except ValueError as exc:
            raise _PayloadError(f"data, invalid JSON: {exc}") from None
    # Base64 has no spaces: a '+' left raw (Node batches, PHP) is a '+'.
    b64 = unquote(raw).strip().replace(" ", "+")
    b64 += "=" * (-len(b64) % 4)
    try:
        if not _BASE64_RE.match(b64):
            raise ValueError(b64)
        decoded = base64.b64decode(b64.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise _PayloadError("data, neither JSON nor base64-encoded JSON") from None
    try:
        return _loads(decoded.decode("utf-8"))
    except UnicodeDecodeError:
        raise _PayloadError("data, base64 payload is not valid UTF-8") from None
    except ValueError as exc:
        raise _PayloadError(f"data, invalid JSON in base64 payload: {exc}") from None


def _read_records(req: _Request, ndjson: bool) -> tuple[list, str]:
    """The request's records and its dialect: "json" (raw body) or "form".

    A single object becomes a one-item list.  ``ndjson`` allows one JSON
    value per line (Mixpanel documents NDJSON for /import only).
    """
    if req.is_json:
        dialect = "json"
        try:
            text = req.body.decode("utf-8")
        except UnicodeDecodeError:
            raise _PayloadError("request body is not valid UTF-8") from None
        try:
            value = _loads(text)
        except ValueError as exc:
            if not ndjson:
                raise _PayloadError(f"invalid JSON body: {exc}") from None
            value = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        value.append(_loads(line))
                    except ValueError as line_exc:
                        raise _PayloadError(f"invalid JSON on line {number}: {line_exc}") from None
    else:
        dialect = "form"
        raw = req.raw.get("data")
        if not raw:
            raise _PayloadError("data, missing or empty")
        value = _decode_data(raw)
    if isinstance(value, dict):
        return [value], dialect
    if not isinstance(value, list):
        raise _PayloadError("data, must be a JSON object or an array of objects")
    return value, dialect


def _credential_token(store: Store, req: _Request) -> str | None:
    """The project that the request's credentials name, if any."""
    project_id = req.param("project_id")
    auth = req.basic_auth()
    if auth is not None:
        return store.project_by_credentials(auth[0], auth[1], project_id)
    if project_id:
        return store.project_by_id(project_id)
    return None


# =============================================================================
# Ingestion: /track, /import, /engage, /groups
# =============================================================================


def _normalize_time(value: Any) -> int | float:
    """Seconds since the epoch; milliseconds recognised by magnitude.

    Floats are kept (the Python and browser SDKs send float seconds); whole
    milliseconds become whole seconds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(value)
    if abs(value) > _MS_THRESHOLD:
        if isinstance(value, int) and value % 1000 == 0:
            return value // 1000
        return value / 1000
    return value


def _iso_seconds(ts: float) -> str:
    """``2026-12-03T18:28:25``: how Mixpanel writes `$last_seen` (UTC, no zone)."""
    moment = datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def _normalize_event(record: Any, fallback_token: str | None, endpoint: str,
                     now: float, host: str) -> tuple[str, dict]:
    """One event as Mixpanel stores it, or `_Reject` saying why not."""
    if not isinstance(record, dict):
        raise _Reject(None, "each record must be a JSON object")
    name = record.get("event")
    if not isinstance(name, str) or not name.strip():
        raise _Reject("event", "'event' must not be missing or blank")
    props = record.get("properties")
    if props is None:
        props = {}
    elif not isinstance(props, dict):
        raise _Reject("properties", "'properties' must be a JSON object")
    token = props.get("token") or fallback_token
    if not isinstance(token, str) or not token:
        raise _Reject("properties.token", "token, missing or empty")
    if "time" in props:
        try:
            props["time"] = _normalize_time(props["time"])
        except ValueError:
            raise _Reject("properties.time", "'properties.time' is invalid: "
                          "must be specified as seconds since epoch") from None
    else:
        # No time: Mixpanel uses the time of arrival (R-dedup, D-reserved).
        props["time"] = round(now, 3)
    # Properties Mixpanel adds on ingestion (D-reserved, default properties).
    now_ms = int(now * 1000)
    props["$mp_api_endpoint"] = host
    props["$mp_api_timestamp_ms"] = now_ms
    props["mp_processing_time_ms"] = now_ms
    if endpoint == "/import":
        props["$import"] = True
    return token, {"event": name, "properties": props}


def _id_text(value: Any) -> str | None:
    """A distinct or group id as Mixpanel keys it: strings, numbers as text."""
    if isinstance(value, str):
        return value if value else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    return None


def _normalize_update(record: Any, kind: str, fallback_token: str | None,
                      now: float) -> tuple[str, Any, list, str | None]:
    """One /engage or /groups update as ``(token, key, ops, last_seen)``."""
    prefix = "Engage API error: " if kind == "people" else "Groups API error: "
    if not isinstance(record, dict):
        raise _Reject(None, prefix + "each update must be a JSON object")
    token = record.get("$token") or fallback_token
    if not isinstance(token, str) or not token:
        raise _Reject("$token", prefix + "$token, missing or empty")
    if kind == "people":
        key: Any = _id_text(record.get("$distinct_id"))
        if key is None:
            raise _Reject("$distinct_id", prefix + "$distinct_id, missing or empty")
        allowed = _PEOPLE_OPS
    else:
        group_key = record.get("$group_key")
        if not isinstance(group_key, str) or not group_key:
            raise _Reject("$group_key", prefix + "$group_key, missing or empty")
        group_id = _id_text(record.get("$group_id"))
        if group_id is None:
            raise _Reject("$group_id", prefix + "$group_id, missing or empty")
        key = (group_key, group_id)
        allowed = _GROUP_OPS
    ops = []
    for op, value in record.items():
        if op in allowed:
            _check_op(op, value, prefix)
            ops.append((op, value))
        elif op in _PEOPLE_OPS:
            raise _Reject(op, prefix + f"{op} is not supported for group profiles")
    if not ops:
        raise _Reject(None, prefix + "no operation: expected one of " + ", ".join(allowed))
    last_seen = None
    if kind == "people" and not (record.get("$ignore_time") is True
                                 or record.get("$ignore_time") == "true"):
        # `$last_seen` is the time of the update: its `$time`, else arrival.
        try:
            last_seen = _iso_seconds(_normalize_time(record["$time"]))
        except (KeyError, ValueError, OverflowError, OSError):
            last_seen = _iso_seconds(now)
    return token, key, ops, last_seen


def _check_op(op: str, value: Any, prefix: str) -> None:
    """Refuse an operator whose value has the wrong shape (OAS schemas)."""
    if op == "$delete":
        return
    if op == "$unset":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Reject(op, prefix + "$unset must be a list of property names")
        return
    if not isinstance(value, dict):
        raise _Reject(op, prefix + f"{op} must be an object of properties")
    if op == "$add":
        for name, amount in value.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                raise _Reject(f"$add.{name}", prefix + f"$add value for {name!r} must be a number")
    elif op == "$union":
        for name, items in value.items():
            if not isinstance(items, list):
                raise _Reject(f"$union.{name}", prefix + f"$union value for {name!r} must be a list")


def _rejection(endpoint: str, token: str | None, index: int, record: Any,
               reject: _Reject, now: float) -> dict:
    """A refused record with its reason; `seq` is given under the lock."""
    insert_id = None
    if isinstance(record, dict) and isinstance(record.get("properties"), dict):
        insert_id = record["properties"].get("$insert_id")
    return {"seq": 0, "project": token, "endpoint": endpoint, "index": index,
            "field": reject.field, "reason": reject.message, "insert_id": insert_id,
            "record": record, "time": now}


def _record_token(record: Any, kind: str) -> str | None:
    """The token a (possibly refused) record names, for filing its refusal."""
    if not isinstance(record, dict):
        return None
    if kind == "events":
        props = record.get("properties")
        token = props.get("token") if isinstance(props, dict) else None
    else:
        token = record.get("$token")
    return token if isinstance(token, str) and token else None


def _ingest_answer(req: _Request, ok: bool, error: str | None) -> _Response:
    """The /track-style answer: `1`/`0`, verbose JSON, JSONP or a pixel.

    `verbose=1` gives {"status","error"} (what the Python SDK requires);
    `verbose=2` turns an error into HTTP 400 (ingestion-api.md §1.4).
    """
    verbose = req.param("verbose")
    if req.param("img") == "1":
        return _Response(200, _PIXEL_GIF, "image/gif")
    status = 200
    if verbose in ("1", "2"):
        body = _dumps({"status": 1 if ok else 0, "error": None if ok else error})
        content_type = "application/json"
        if verbose == "2" and not ok:
            status = 400
    else:
        body = b"1" if ok else b"0"
        content_type = "text/plain"
    callback = req.param("callback")
    if callback:
        if not _CALLBACK_RE.match(callback):
            return _json(400, {"status": 0, "error": "callback, invalid function name"})
        return _Response(status, callback.encode() + b"(" + body + b")", "text/javascript")
    return _Response(status, body, content_type)


def _ingest_events(store: Store, req: _Request, endpoint: str) -> _Response:
    """Decode, normalise and store a batch of events; answer per dialect."""
    now = store.now()
    try:
        records, dialect = _read_records(req, ndjson=endpoint == "/import")
    except _PayloadError as exc:
        return _import_failure(req, str(exc)) if (
            endpoint == "/import" and req.is_json) else _ingest_answer(req, False, str(exc))
    fallback = _credential_token(store, req)
    host = req.host
    accepted: list[tuple[str, dict]] = []
    rejected: list[dict] = []
    for index, record in enumerate(records):
        try:
            accepted.append(_normalize_event(record, fallback, endpoint, now, host))
        except _Reject as reject:
            token = _record_token(record, "events") or fallback
            rejected.append(_rejection(endpoint, token, index, record, reject, now))
    store.add_events(accepted, rejected)
    if endpoint == "/import" and _import_is_strict(req, dialect):
        return _import_answer(len(accepted), rejected)
    if endpoint == "/import" and dialect == "json":
        return _import_answer(len(accepted), [])
    error = rejected[0]["reason"] if rejected else "no records in the request"
    return _ingest_answer(req, bool(accepted), None if accepted else error)


def _import_is_strict(req: _Request, dialect: str) -> bool:
    """JSON/NDJSON /import is strict unless strict=0; the form dialect (what
    the Python and Node SDKs send) only with strict=1."""
    strict = req.param("strict")
    return strict != "0" if dialect == "json" else strict == "1"


def _import_answer(imported: int, rejected: list[dict]) -> _Response:
    if not rejected:
        return _json(200, {"code": 200, "num_records_imported": imported, "status": "OK"})
    failed = [{"index": r["index"], "insert_id": r["insert_id"], "field": r["field"],
               "message": r["reason"]} for r in rejected]
    return _json(400, {"code": 400, "error": "some data points in the request failed validation",
                       "failed_records": failed, "num_records_imported": imported,
                       "status": "Bad Request"})


def _import_failure(req: _Request, error: str) -> _Response:
    return _json(400, {"code": 400, "error": error, "status": "Bad Request"})


def _ingest_profiles(store: Store, req: _Request, kind: str, endpoint: str) -> _Response:
    """Decode and apply a batch of profile (or group profile) updates."""
    now = store.now()
    try:
        records, _ = _read_records(req, ndjson=False)
    except _PayloadError as exc:
        return _ingest_answer(req, False, str(exc))
    fallback = _credential_token(store, req)
    updates = []
    rejected: list[dict] = []
    for index, record in enumerate(records):
        try:
            updates.append(_normalize_update(record, kind, fallback, now))
        except _Reject as reject:
            token = _record_token(record, kind) or fallback
            rejected.append(_rejection(endpoint, token, index, record, reject, now))
    store.apply_profile_updates(kind, updates, rejected)
    error = rejected[0]["reason"] if rejected else "no records in the request"
    return _ingest_answer(req, bool(updates), None if updates else error)


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


# =============================================================================
# Inspection: /, /health and /__parlel/*
# =============================================================================


def _scope(req: _Request) -> str | None:
    """The `?project=TOKEN` that scopes an inspection call, if given."""
    return req.param("project") or None


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
    if distinct_id is not None and not _json_equal(props.get("distinct_id"), distinct_id):
        return False
    if properties:
        for key, value in properties.items():
            if key not in props or not _json_equal(props[key], value):
                return False
    return True


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
    """Forget what was ingested (one project with ?project=)."""
    store.reset(_scope(req))
    return _json(200, {"ok": True})


def _parlel_events(store: Store, req: _Request) -> _Response:
    """Stored events in arrival order; ?project=, ?event=, ?distinct_id= filter."""
    name = req.param("event")
    distinct_id = req.param("distinct_id")
    rows = [_event_view(seq, token, event)
            for seq, token, event in store.event_rows(_scope(req))
            if _event_matches(event, name, distinct_id, None)]
    return _json(200, {"count": len(rows), "events": rows})


def _parlel_clear_events(store: Store, req: _Request) -> _Response:
    store.clear_events(_scope(req))
    return _json(200, {"ok": True, "count": 0})


def _parlel_people(store: Store, req: _Request) -> _Response:
    rows = [{"$distinct_id": key, "$properties": props, "project": token}
            for token, key, props in store.profile_rows("people", _scope(req))]
    return _json(200, {"count": len(rows), "people": rows})


def _parlel_groups(store: Store, req: _Request) -> _Response:
    rows = [{"$group_key": key[0], "$group_id": key[1], "$properties": props, "project": token}
            for token, key, props in store.profile_rows("groups", _scope(req))]
    return _json(200, {"count": len(rows), "groups": rows})


def _parlel_rejected(store: Store, req: _Request) -> _Response:
    """Every refused record with its reason, endpoint, project and index."""
    rows = store.rejected_rows(_scope(req))
    return _json(200, {"count": len(rows), "rejected": rows})


def _parlel_projects(store: Store, req: _Request) -> _Response:
    with store.lock:
        projects = [p.describe() for p in store.projects.values()]
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
}

_METHODS_BY_PATH: dict[str, list[str]] = {}
for _method, _path in _ROUTES:
    _METHODS_BY_PATH.setdefault(_path, []).append(_method)
for _methods in _METHODS_BY_PATH.values():
    if "GET" in _methods:
        _methods.append("HEAD")
    _methods.append("OPTIONS")
    _methods.sort()
del _method, _path, _methods

_SLASHES_RE = re.compile(r"/{2,}")


def _normalize_path(path: str) -> str:
    """Collapse `//` and drop one trailing `/` (the browser SDK sends `track/`)."""
    path = _SLASHES_RE.sub("/", path or "/")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def _route(method: str, path: str) -> Callable[[Store, _Request], _Response]:
    """The handler for a request, or an ApiError: 404 naming the known paths,
    405 with `Allow`."""
    handler = _ROUTES.get(("GET" if method == "HEAD" else method, path))
    if handler is not None:
        return handler
    allowed = _METHODS_BY_PATH.get(path)
    if allowed:
        raise ApiError(405, {"error": f"method {method} not allowed on {path}",
                             "allowed": allowed}, headers={"Allow": ", ".join(allowed)})
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
    while data:
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


def _header_safe(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, finds its row in `_ROUTES`, writes one response."""

    protocol_version = "HTTP/1.1"
    server_version = "mixpanel_fake/" + __version__
    # Keep-alive clients stall ~40 ms a request on delayed ACKs unless Nagle
    # is off; the response also goes out in one write.
    disable_nagle_algorithm = True
    timeout = _IDLE_TIMEOUT
    busy = False

    def setup(self) -> None:
        super().setup()
        self.server.track_connection(self, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track_connection(self, False)

    def handle_one_request(self) -> None:
        """As the stdlib's, with a request line of up to 4 MB (the Node SDK
        puts whole payloads in GET query strings) and JSON errors."""
        try:
            line = self.rfile.readline(_MAX_REQUEST_LINE + 1)
        except (OSError, ValueError):
            self.close_connection = True
            return
        if not line:
            self.close_connection = True
            return
        self.busy = True
        try:
            self.raw_requestline = line
            if len(line) > _MAX_REQUEST_LINE:
                self.requestline = ""
                self.request_version = self.default_request_version
                self.command = None
                self.send_error(414, f"request line exceeds {_MAX_REQUEST_LINE} bytes")
                return
            if not self.parse_request():
                return
            getattr(self, "do_" + self.command)()
            if self.server.closing:
                self.close_connection = True
        finally:
            self.busy = False

    def _serve(self) -> None:
        store = self.server.store
        started = time.perf_counter()
        try:
            parts = urlsplit(self.path)
            path = _normalize_path(parts.path)
            body = self._read_body()
            if self.command == "OPTIONS":
                response = self._preflight(path)
            else:
                handler = _route(self.command, path)
                client = self.client_address[0] if self.client_address else ""
                request = _Request(self.command, path, parts.query, self.headers, body, client)
                response = handler(store, request)
        except ApiError as exc:
            response = _error_response(exc)
        except Exception as exc:  # a bug in the fake: answer, record, re-raise in check()
            store.record_error(exc)
            _log.exception("mixpanel_fake internal error on %s %s", self.command, self.path)
            response = _json(500, {"error": f"mixpanel_fake internal error: "
                                            f"{type(exc).__name__}: {exc}"})
        self._send(response)
        _log.debug("%s %s -> %s in %.1f ms", self.command, self.path.split("?")[0],
                   response.status, (time.perf_counter() - started) * 1000)

    def _read_body(self) -> bytes:
        """The body per Content-Length or chunked framing, inflated if gzip."""
        encoding = (self.headers.get("Transfer-Encoding") or "").lower()
        lengths = self.headers.get_all("Content-Length") or []
        if "chunked" in encoding:
            if lengths:
                self.close_connection = True
                raise _plain_error(400, "both Content-Length and chunked Transfer-Encoding")
            body = self._read_chunked()
        elif lengths:
            if len({v.strip() for v in lengths}) > 1:
                self.close_connection = True
                raise _plain_error(400, "conflicting Content-Length headers")
            try:
                length = int(lengths[0])
                if length < 0:
                    raise ValueError(length)
            except ValueError:
                self.close_connection = True
                raise _plain_error(400, "invalid Content-Length") from None
            if length > _MAX_BODY_BYTES:
                self.close_connection = True
                raise _plain_error(413, f"request exceeds max limit of {_MAX_BODY_BYTES} bytes")
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                self.close_connection = True
                raise _plain_error(400, "body shorter than Content-Length")
        else:
            body = b""
        coding = (self.headers.get("Content-Encoding") or "").strip().lower()
        if coding in ("gzip", "x-gzip") and body:
            body = _gunzip(body, _MAX_BODY_BYTES)
        elif coding not in ("", "identity", "gzip", "x-gzip"):
            raise _plain_error(415, f"unsupported Content-Encoding: {_header_safe(coding)}")
        return body

    def _read_chunked(self) -> bytes:
        chunks = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError(size)
            except ValueError:
                self.close_connection = True
                raise _plain_error(400, "malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY_BYTES:
                self.close_connection = True
                raise _plain_error(413, f"request exceeds max limit of {_MAX_BODY_BYTES} bytes")
            data = self.rfile.read(size)
            if len(data) < size:
                self.close_connection = True
                raise _plain_error(400, "truncated chunked body")
            chunks.append(data)
            self.rfile.readline(1024)

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

    def _send(self, response: _Response) -> None:
        """Write status, headers and body in one write (see Nagle above)."""
        status = response.status
        phrase = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {phrase}",
                 f"Server: {self.server_version}",
                 f"Date: {self.date_time_string()}"]
        if status != 204:
            if response.content_type:
                lines.append(f"Content-Type: {response.content_type}")
            lines.append(f"Content-Length: {len(response.body)}")
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
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        send_body = status not in (204, 304) and self.command != "HEAD"
        try:
            self.wfile.write(head + response.body if send_body else head)
        except OSError:
            self.close_connection = True

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

    def __init__(self, address: tuple[str, int], store: Store):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.store = store
        self.closing = False
        self._handlers: set = set()
        self._handlers_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopped = threading.Event()
        self._stopped.set()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can take
        # seconds on a machine without DNS; the fake needs only the port.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]

    def track_connection(self, handler: _Handler, opened: bool) -> None:
        with self._handlers_lock:
            if opened:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until stop(); a wake-up socket ends the wait at once."""
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self.closing:
                    for key, _ in selector.select():
                        if key.fileobj is self._wake_r:
                            return
                        self._handle_request_noblock()
        finally:
            self._stopped.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close idle connections, release the port."""
        if self.closing:
            return
        self.closing = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait(timeout)
        with self._handlers_lock:
            handlers = list(self._handlers)
        for handler in handlers:
            if not handler.busy:
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.server_close()
        self._wake_r.close()
        self._wake_w.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-request is not an error worth a traceback.
        _log.debug("connection error from %s", client_address, exc_info=True)


def _make_server(host: str, port: int, store: Store) -> _Server:
    """Bind in the caller's thread, so bind errors and the port are known now."""
    return _Server((host, port), store)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
                 clock: Callable[[], float] | None = None):
        self.store = Store(projects, clock)
        self._server = _make_server(host, port, self.store)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

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
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        self._server.stop()
        if self._thread is not None:
            self._thread.join(5)

    close = stop

    def __enter__(self) -> MixpanelFake:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # --- configuration ------------------------------------------------------

    def set_time(self, ts: float | None) -> None:
        """Pin the project clock at epoch seconds ``ts`` (None: follow the clock)."""
        self.store.set_time(ts)

    def add_project(self, project: Project) -> Project:
        return self.store.add_project(project)

    # --- reads --------------------------------------------------------------

    def events(self, name: str | None = None, distinct_id: Any = None,
               project: str | None = None, properties: dict | None = None) -> list[dict]:
        """Stored events as ``{"event", "properties"}``, in arrival order.

        ``properties={...}`` keeps events whose properties include those
        values (property names such as ``$browser`` cannot be keywords).
        """
        return [{"event": event["event"], "properties": dict(event["properties"])}
                for _, _, event in self.store.event_rows(project)
                if _event_matches(event, name, distinct_id, properties)]

    def profiles(self, project: str | None = None) -> dict[str, dict]:
        """``{distinct_id: properties}`` (pass ``project`` when several share ids)."""
        return {key: dict(props) for _, key, props in self.store.profile_rows("people", project)}

    def profile(self, distinct_id: Any, project: str | None = None) -> dict | None:
        key = _id_text(distinct_id)
        for _, found, props in self.store.profile_rows("people", project):
            if found == key:
                return dict(props)
        return None

    def groups(self, project: str | None = None) -> dict[tuple[str, str], dict]:
        """``{(group_key, group_id): properties}``."""
        return {key: dict(props) for _, key, props in self.store.profile_rows("groups", project)}

    def rejected(self, project: str | None = None) -> list[dict]:
        """Every refused record: its reason, field, endpoint, project and index."""
        return self.store.rejected_rows(project)

    def reset(self, project: str | None = None) -> None:
        """Forget ingested data, of one project or of all."""
        self.store.reset(project)

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
        store = self.store
        deadline = time.monotonic() + timeout
        while True:
            with store.lock:
                version = store.version
            found = self.events(**filters)
            if len(found) >= n:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(self._explain_wait(n, timeout, filters, found))
            with store.changed:
                store.changed.wait_for(lambda: store.version != version, remaining)

    def _explain_wait(self, n: int, timeout: float, filters: dict, found: list) -> str:
        everything = self.events(project=filters.get("project"))
        lines = [f"waited {timeout}s for {n} event(s) matching {filters or 'anything'}; "
                 f"{len(found)} matched, {len(everything)} arrived in all"]
        for event in everything[-10:]:
            props = event["properties"]
            lines.append(f"  arrived: {event['event']!r} distinct_id={props.get('distinct_id')!r}")
        for record in self.rejected(filters.get("project"))[-10:]:
            lines.append(f"  rejected on {record['endpoint']} (index {record['index']}): "
                         f"{record['reason']}")
        return "\n".join(lines)


# =============================================================================
# CLI
# =============================================================================

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    args = parser.parse_args(argv)
    if args.api_secret and not args.token:
        parser.error("--api-secret needs --token (or MIXPANEL_TOKEN)")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    projects = [Project(args.token, api_secret=args.api_secret)] if args.token else []
    try:
        server = _make_server(args.host, args.port, Store(projects))
    except OSError as exc:
        print(f"mixpanel_fake: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = server.server_address[1]
    print(f"mixpanel_fake listening on {_url(args.host, port)}", flush=True)
    if args.host not in _LOOPBACK:
        print(f"mixpanel_fake: warning: bound to {args.host}, reachable beyond this machine; "
              "it accepts any credentials", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
