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
import ipaddress
import json
import logging
import math
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
from urllib.parse import unquote, unquote_plus

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
# Idle keep-alive connections are closed after this many seconds, so a stalled
# client cannot pin a server thread for ever.
_IDLE_TIMEOUT = 15.0

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
_INSERT_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,36}$")
_UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_IDENTITY_EVENTS = frozenset(("$identify", "$create_alias", "$merge"))
_SIMPLIFIED_IDENTITY_ERROR = ("identity events are not allowed when project is using "
                              "simplified identity management")

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

    __slots__ = ("events", "event_ids", "profiles", "groups", "rejected", "identity")

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.event_ids: list[int] = []
        self.profiles: dict[str, dict] = {}
        self.groups: dict[tuple[str, str], dict] = {}
        self.rejected: list[dict] = []
        self.identity = _Identity()


class _Update:
    """One validated /engage or /groups update, waiting for the lock."""

    __slots__ = ("token", "key", "ops", "last_seen", "ignore_alias", "index", "record")

    def __init__(self, token: str, key: Any, ops: list, last_seen: str | None,
                 ignore_alias: bool, index: int, record: Any):
        self.token = token
        self.key = key
        self.ops = ops
        self.last_seen = last_seen
        self.ignore_alias = ignore_alias
        self.index = index
        self.record = record


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
        """Store accepted events and refused records in one critical section.

        Identity events and `$user_id`+`$device_id` pairs update the project's
        identity graph here, in arrival order.
        """
        with self.lock:
            for token, event in accepted:
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

    def apply_profile_updates(self, kind: str, updates: list[_Update], rejected: list[dict],
                              endpoint: str, now: float) -> int:
        """Apply profile or group updates in batch order, then keep refusals.

        In Original ID Merge projects a profile update goes to the canonical
        id of its `$distinct_id`'s cluster, unless `$ignore_alias` is set.
        Returns how many updates were applied.
        """
        applied = 0
        with self.lock:
            for update in updates:
                project, state = self._project_locked(update.token)
                key = update.key
                if kind == "people":
                    table = state.profiles
                    if project.id_merge == "original" and not update.ignore_alias:
                        key = state.identity.resolve(key)
                else:
                    table = state.groups
                try:
                    error = _apply_ops(table, key, update.ops, update.last_seen)
                except Exception as exc:  # a bug in the fake: keep going, report it
                    self.errors.append(exc)
                    error = f"mixpanel_fake internal error: {type(exc).__name__}: {exc}"
                if error is None:
                    applied += 1
                else:
                    prefix = "Engage API error: " if kind == "people" else "Groups API error: "
                    rejected.append(_rejection(endpoint, update.token, update.index, update.record,
                                               _Reject(None, prefix + error), now))
            self._reject_locked(rejected)
            self._changed_locked()
        return applied

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

    def canonical(self, distinct_id: str, project: str | None = None) -> str:
        with self.lock:
            for _, state in self._states(project):
                found = state.identity.canonical.get(distinct_id)
                if found is not None:
                    return found
        return distinct_id

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


def _json_key(value: Any) -> Any:
    """A hashable key with `_json_equal`'s equality (true apart from 1)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, str) or value is None:
        return value
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
        if isinstance(current, (int, float)) and not isinstance(current, bool):
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
        seen = {_json_key(item) for item in merged}
        for item in items:
            key = _json_key(item)
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
        return None
    if touched and last_seen is not None:
        props["$last_seen"] = last_seen
    if len(props) > _MAX_PROFILE_PROPERTIES and len(props) > len(old or ()):
        return (f"profile would have {len(props)} properties; "
                f"the limit is {_MAX_PROFILE_PROPERTIES}")
    table[key] = props
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
        known, anon = props["$identified_id"], props["$anon_id"]
        if known == anon:
            _identity_failure(props, "errSameIDs",
                              f"Identified and anon ID are same in the identify request {anon}")
        elif not _UUID4_RE.match(anon):
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
    """Compact JSON with Unicode kept raw.

    Never fails on what a client could have sent: lone surrogates fall back
    to escapes, and a refused record too deep or too big to write is clipped.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")
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


def _text(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> _Response:
    return _Response(status, text.encode("utf-8"), content_type)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no number beyond a double's range;
    depth and digit bombs become errors."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _decode_data(raw: str) -> Any:
    """Decode a ``data=`` value: URL-encoded JSON, or (URL-encoded) base64 JSON."""
    # Invalid UTF-8 survives as lone surrogates, refused per field later.
    text = unquote_plus(raw, errors="surrogateescape").strip()
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
        return _loads(decoded.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise _PayloadError(f"data, invalid JSON in base64 payload: {exc}") from None


def _read_records(req: _Request, ndjson: bool) -> tuple[list, str]:
    """The request's records and its dialect: "json" (raw body) or "form".

    A single object becomes a one-item list.  ``ndjson`` allows one JSON
    value per line (Mixpanel documents NDJSON for /import only).
    """
    if req.is_json:
        dialect = "json"
        text = req.body.decode("utf-8", "surrogateescape")
        try:
            value = _loads(text)
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
        moment = datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class _Batch:
    """What every record of one ingestion request shares."""

    __slots__ = ("store", "endpoint", "now", "host", "fallback", "strict", "sized")

    def __init__(self, store: Store, req: _Request, endpoint: str, strict: bool):
        self.store = store
        self.endpoint = endpoint
        self.now = store.now()
        self.host = req.host
        self.fallback = _credential_token(store, req)
        self.strict = strict
        # No event can reach the per-event size limit in a smaller body, so
        # only big bodies pay for measuring each event.
        self.sized = len(req.body) + len(req.raw.get("data") or "") >= _MAX_EVENT_BYTES


class _Ignored(Exception):
    """The event carries `$ignore`: Mixpanel drops it without an error."""


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
        checked = [_check_value(item, field, depth + 1, limits) for item in value]
        changed = any(a is not b for a, b in zip(checked, value))
        result: Any = checked if changed else value
    else:
        result = value
        pairs = [(_check_string(k, field), _check_value(v, f"{field}.{k}", depth + 1, limits))
                 for k, v in value.items()]
        if any(k is not k0 or v is not v0 for (k, v), (k0, v0) in zip(pairs, value.items())):
            result = dict(pairs)
    if depth == 1 and len(_dumps(result)) > limits.collection_bytes:
        raise _invalid(field, f"list and object properties must be at most "
                              f"{limits.collection_bytes // 1024}KB")
    return result


def _check_properties(props: dict, prefix: str, limits: _Limits) -> dict:
    """Truncate names and strings, refuse what breaks a limit (ingestion-api.md §11)."""
    changes = None
    for name, value in props.items():
        field = f"{prefix}{name}"
        new_name = _check_string(name, field)
        new_value = _check_value(value, field, 1, limits)
        if new_name is not name or new_value is not value:
            if changes is None:
                changes = []
            changes.append((name, new_name, new_value))
    if changes:
        props = dict(props)
        for name, new_name, new_value in changes:
            del props[name]
            props[new_name] = new_value
    return props


def _check_id(props: dict, field: str) -> None:
    """A distinct_id is a string (or number), never a placeholder (R-import)."""
    value = props[field]
    if value == "":
        return  # allowed: "excluded from user analysis" (R-import)
    text = _id_text(value)
    if text is None:
        raise _invalid(f"properties.{field}", "must be a string")
    if text.lower() in _PLACEHOLDER_IDS:
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
    if props.get("$ignore") not in (None, False):
        raise _Ignored()  # D-bot: events with $ignore are dropped at ingestion
    if batch.sized and len(_dumps(record)) >= _MAX_EVENT_BYTES:
        raise _Reject(None, "event is invalid: must be smaller than 1MB of uncompressed JSON")
    if len(props) >= _MAX_PROPERTIES:
        raise _invalid("properties", f"must have fewer than {_MAX_PROPERTIES} properties")
    props = _check_properties(props, "properties.", _EVENT_LIMITS)
    if not name.isascii() and _SURROGATE_RE.search(name):
        raise _Reject("event", "event is invalid: string should be valid utf8")
    project = batch.store.projects.get(token)  # a dict read; no lock needed
    original = project is not None and project.id_merge == "original"
    _normalize_event_time(props, batch)
    if original:
        _check_identity_event(name, props, batch)
    else:
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
    elif not isinstance(insert_id, str) or not _INSERT_ID_RE.match(insert_id):
        raise _invalid("properties.$insert_id", "must be at most 36 bytes of letters, digits and '-'")
    elif insert_id.lower() in _PLACEHOLDER_IDS:
        raise _invalid("properties.$insert_id", f"{insert_id!r} is a placeholder, not an id")
    # Properties Mixpanel adds on ingestion (D-reserved, default properties).
    now_ms = round(batch.now * 1000)
    props["$mp_api_endpoint"] = batch.host
    props["$mp_api_timestamp_ms"] = now_ms
    props["mp_processing_time_ms"] = now_ms
    if batch.endpoint == "/import":
        props["$import"] = True
    return token, {"event": name, "properties": props}


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
    if isinstance(device, str) and device.startswith("$device:"):
        device = props["$device_id"] = device[len("$device:"):]
    user = _id_text(props.get("$user_id"))
    if user is not None:
        props["distinct_id"] = user
    elif _id_text(device) is not None:
        props["distinct_id"] = "$device:" + _id_text(device)


def _check_identity_event(name: str, props: dict, batch: _Batch) -> None:
    """Original ID Merge: the properties each identity event needs (R-ident)."""
    if name == "$identify":
        for field in ("$identified_id", "$anon_id"):
            if _id_text(props.get(field)) is None:
                raise _invalid(f"properties.{field}", "must not be missing")
            props[field] = _id_text(props[field])
        props.setdefault("distinct_id", props["$identified_id"])
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


def _normalize_update(record: Any, kind: str, fallback_token: str | None,
                      now: float, index: int) -> _Update:
    """One /engage or /groups update, checked, or `_Reject` saying why not."""
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
    try:
        for op, value in record.items():
            if op in allowed:
                ops.append((op, _check_op(op, value, prefix)))
            elif op in _PEOPLE_OPS:
                raise _Reject(op, prefix + f"{op} is not supported for group profiles")
    except _Reject as reject:
        if reject.message.startswith(prefix):
            raise
        raise _Reject(reject.field, prefix + reject.message) from None
    if not ops:
        raise _Reject(None, prefix + "no operation: expected one of " + ", ".join(allowed))
    last_seen = None
    if kind == "people" and not _flag(record.get("$ignore_time")):
        # `$last_seen` is the time of the update: its `$time`, else arrival.
        try:
            last_seen = _iso_seconds(_normalize_time(record["$time"]))
        except (KeyError, ValueError):
            last_seen = None
        if last_seen is None:
            last_seen = _iso_seconds(now)
    return _Update(token, key, ops, last_seen, _flag(record.get("$ignore_alias")), index, record)


def _flag(value: Any) -> bool:
    """A modifier such as `$ignore_time` is on when true (or "true")."""
    return value is True or value == "true"


def _check_op(op: str, value: Any, prefix: str) -> Any:
    """Refuse an operator whose value has the wrong shape (OAS schemas);
    return the value with long strings truncated (D-profiles)."""
    if op == "$delete":
        return value
    if op == "$unset":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Reject(op, prefix + "$unset must be a list of property names")
        return value
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
    # Profile strings and names are cut at 255 like event ones; list and
    # object values may hold 256KB (D-types), nested without a depth limit.
    return _check_properties(value, op + ".", _PROFILE_LIMITS)


def _rejection(endpoint: str, token: str | None, index: int, record: Any,
               reject: _Reject, now: float, dropped: bool = False) -> dict:
    """A refused record with its reason; `seq` is given under the lock.

    ``dropped`` marks records Mixpanel drops without an error (`$ignore`).
    """
    insert_id = None
    if isinstance(record, dict) and isinstance(record.get("properties"), dict):
        insert_id = record["properties"].get("$insert_id")
    return {"seq": 0, "project": token, "endpoint": endpoint, "index": index,
            "field": reject.field, "reason": reject.message, "insert_id": insert_id,
            "dropped": dropped, "record": record, "time": now}


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


def _ingest_answer(req: _Request, ok: bool, error: str | None, status: int = 200) -> _Response:
    """The /track-style answer: `1`/`0`, verbose JSON, JSONP or a pixel.

    `verbose=1` gives {"status","error"} (what the Python SDK requires);
    `verbose=2` turns an error into HTTP 400 (ingestion-api.md §1.4).
    """
    verbose = req.param("verbose")
    if req.param("img") == "1":
        return _Response(status, _PIXEL_GIF, "image/gif")
    if verbose in ("1", "2"):
        body = _dumps({"status": 1 if ok else 0, "error": None if ok else error})
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


def _refuse_request(store: Store, req: _Request, endpoint: str, message: str) -> None:
    """Keep a whole refused request in the refusals, so a test can see it:
    index None, and the payload as text (cut at 2000 characters)."""
    data = req.param("data") if not req.is_json else None
    payload = data if data is not None else req.body.decode("utf-8", "replace")
    reject = _Reject("data", message)
    store.add_events([], [_rejection(endpoint, _credential_token(store, req), None,
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
    if len(records) > _MAX_BATCH:
        # R-track/R-import: 2000 events per request; the 413 page lists
        # "too many events per batch" among its causes.
        _refuse_request(store, req, endpoint, _too_many(len(records)))
        if endpoint == "/import" and dialect == "json":
            return _import_failure(413, _too_many(len(records)))
        return _ingest_answer(req, False, _too_many(len(records)), status=413)
    batch = _Batch(store, req, endpoint, strict)
    accepted: list[tuple[str, dict]] = []
    accepted_at: list[int] = []
    rejected: list[dict] = []
    ignored = 0
    for index, record in enumerate(records):
        try:
            accepted.append(_normalize_event(record, batch))
            accepted_at.append(index)
        except _Reject as reject:
            token = _record_token(record, "events") or batch.fallback
            rejected.append(_rejection(endpoint, token, index, record, reject, batch.now))
        except _Ignored:
            ignored += 1
            rejected.append(_rejection(endpoint, _record_token(record, "events") or batch.fallback,
                                       index, record, _Reject("properties.$ignore", "$ignore is set: "
                                                              "Mixpanel drops the event"),
                                       batch.now, dropped=True))
    if strict and _has_simplified_identity_event(store, accepted):
        # AK's probes: a strict /import holding $identify, $create_alias or
        # $merge for a Simplified project is refused whole, strings for records.
        refused = [_rejection(endpoint, token, index, records[index],
                              _Reject(None, _SIMPLIFIED_IDENTITY_ERROR), batch.now)
                   for index, (token, _) in zip(accepted_at, accepted)]
        store.add_events([], rejected + refused)
        return _json(400, {"code": 400, "error": "some data points in the request failed validation",
                           "failed_records": [_SIMPLIFIED_IDENTITY_ERROR], "num_records_imported": 0,
                           "status": "Bad Request"})
    store.add_events(accepted, rejected)
    landed = len(accepted) + ignored
    failed = [r for r in rejected if not r["dropped"]]
    if strict:
        return _import_answer(landed, failed)
    if endpoint == "/import" and dialect == "json":
        return _import_answer(landed, [])
    error = failed[0]["reason"] if failed else "no records in the request"
    return _ingest_answer(req, landed > 0, None if landed else error)


def _has_simplified_identity_event(store: Store, accepted: list[tuple[str, dict]]) -> bool:
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
        _refuse_request(store, req, endpoint, _too_many(len(records)))
        return _ingest_answer(req, False, _too_many(len(records)), status=413)
    fallback = _credential_token(store, req)
    updates = []
    rejected: list[dict] = []
    for index, record in enumerate(records):
        try:
            updates.append(_normalize_update(record, kind, fallback, now, index))
        except _Reject as reject:
            token = _record_token(record, kind) or fallback
            rejected.append(_rejection(endpoint, token, index, record, reject, now))
    applied = store.apply_profile_updates(kind, updates, rejected, endpoint, now)
    rejected.sort(key=_by_index)
    error = rejected[0]["reason"] if rejected else "no records in the request"
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
    """Stored events in arrival order; ?project=, ?event=, ?distinct_id=
    filter, ?dedup=1 shows what reports see."""
    name = req.param("event")
    distinct_id = req.param("distinct_id")
    rows = store.event_rows(_scope(req))
    if req.param("dedup") in ("1", "true"):
        rows = _dedup(rows)
    rows = [_event_view(seq, token, event) for seq, token, event in rows
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

_INGESTION = frozenset((_track, _import, _engage, _groups))
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
    """Collapse `//` and drop one trailing `/` (the browser SDK sends `track/`)."""
    path = _SLASHES_RE.sub("/", path or "/")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def _route(method: str, path: str) -> Callable[[Store, _Request], _Response]:
    """The handler for a request, or an ApiError: 404 naming the known paths,
    405 with `Allow`."""
    handler = _ROUTES.get(("GET" if method == "HEAD" else method, path))
    if handler is not None and not (method == "HEAD" and handler in _INGESTION):
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
            if line in (b"\r\n", b"\n"):
                # RFC 9112 §2.2: ignore an empty line before a request line
                # (a stray CRLF after a body, from some clients).
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
                handler = _route(self.command, path)
                client = self.client_address[0] if self.client_address else ""
                request = _Request(self.command, path, query, self.headers, body, client)
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
        codings = [c.strip().lower() for value in self.headers.get_all("Transfer-Encoding") or []
                   for c in value.split(",") if c.strip()]
        lengths = self.headers.get_all("Content-Length") or []
        if codings:
            # RFC 9112 §6.1: chunked must be the last coding; nothing else here.
            if codings[-1] != "chunked" or any(c not in ("chunked", "identity") for c in codings):
                self.close_connection = True
                raise _plain_error(501, "unsupported Transfer-Encoding: "
                                        + _header_safe(", ".join(codings)))
            if lengths:
                self.close_connection = True
                raise _plain_error(400, "both Content-Length and chunked Transfer-Encoding")
            body = self._read_chunked()
        elif lengths:
            if len({v.strip() for v in lengths}) > 1 or not _DIGITS_RE.match(lengths[0].strip()):
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
        coding = (self.headers.get("Content-Encoding") or "").strip().lower()
        if coding in ("gzip", "x-gzip") and body:
            body = _gunzip(body, _MAX_BODY_BYTES)
        elif coding not in ("", "identity", "gzip", "x-gzip"):
            raise _plain_error(415, f"unsupported Content-Encoding: {_header_safe(coding)}")
        return body

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _read_chunked(self) -> bytes:
        chunks = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not _HEX_RE.match(size_text):
                self.close_connection = True
                raise _plain_error(400, "malformed chunked body")
            size = int(size_text, 16)
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
        elif getattr(self, "request_version", "") == "HTTP/1.0":
            lines.append("Connection: keep-alive")
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
                with self._handlers_lock:
                    if self.closing:
                        return
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
        with self._handlers_lock:
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


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    """The URL a client on this machine uses (wildcard binds: loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
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
        if not _is_loopback(host):
            _log.warning("mixpanel_fake bound to %r: reachable beyond this machine", host)
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
        rows = self.store.event_rows(project)
        if dedup:
            rows = _dedup(rows)
        return [{"event": event["event"], "properties": _copy(event["properties"])}
                for _, _, event in rows if _event_matches(event, name, distinct_id, properties)]

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
        matches = [props for _, found, props in self.store.profile_rows("people", project)
                   if found == key]
        return _copy(matches[-1]) if matches else None  # the same one profiles() shows

    def groups(self, project: str | None = None) -> dict[tuple[str, str], dict]:
        """``{(group_key, group_id): properties}``."""
        return {key: _copy(props) for _, key, props in self.store.profile_rows("groups", project)}

    def rejected(self, project: str | None = None) -> list[dict]:
        """Every refused record: its reason, field, endpoint, project and index."""
        return [_copy(record) for record in self.store.rejected_rows(project)]

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
        if not isinstance(n, int) or n < 0:
            raise ValueError("n must be a whole number of events, 0 or more")
        if not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
            raise ValueError("timeout must be a number of seconds, 0 or more")
        store = self.store
        deadline = time.monotonic() + min(timeout, _MAX_WAIT)
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
                store.changed.wait_for(lambda: store.version != version, min(remaining, 3600))

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
    if not _is_loopback(args.host):
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
