"""Benchmarks for mixpanel_fake, as ratios against baselines measured in the same run.

    python bench/bench.py            # the full run: prints a Markdown table
    python bench/bench.py --quick    # small fixtures, fewer rounds (CI: proves it still runs)
    python bench/bench.py --check    # exit 1 when a goal is missed

Servers and load-generating clients run in separate processes (this script
starts them: the fake through its CLI, the baseline as bench/bare_server.py,
the clients as ``bench.py --load``).  Each figure is the median of several
alternating rounds of the fake and its baseline, so drift on a shared
machine hits both alike.  Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gc
import gzip
import json
import os
import platform
import random
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from urllib.parse import quote_plus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import mixpanel_fake  # noqa: E402  (after the path tweak)

TOKEN = "bench"
SECRET = "bench-secret"
DAY = 86400
# The query fixture's last day; the project clock is pinned to its end.
END = int(datetime.datetime(2026, 11, 30, tzinfo=datetime.timezone.utc).timestamp())
PLANS = ("free", "pro", "team", "enterprise")
BATCH = 2000  # /import and /engage batches: Mixpanel's largest


# --- fixture -------------------------------------------------------------------


def typical_event(rng: random.Random, index: int, people: int, names: int, days: int) -> dict:
    """Ten properties of mixed types, as the SDKs send them."""
    return {"event": f"Event {index % names}", "properties": {
        "token": TOKEN,
        "distinct_id": f"user-{rng.randrange(people)}",
        "time": END - rng.randrange(days * DAY) - 1,
        "$insert_id": f"{index:032x}",
        "plan": PLANS[rng.randrange(len(PLANS))],
        "amount": round(rng.random() * 40, 2),
        "seats": rng.randrange(1, 50),
        "trial": rng.random() < 0.3,
        "$browser": ("Chrome", "Firefox", "Safari")[rng.randrange(3)],
        "tags": ["a", "b"] if index % 7 == 0 else [],
    }}


def build(events: int) -> tuple[mixpanel_fake.MixpanelFake, list[dict]]:
    rng = random.Random(42)
    fixture = [typical_event(rng, i, 10000, 50, 30) for i in range(events)]
    fake = mixpanel_fake.MixpanelFake(projects=[mixpanel_fake.Project(TOKEN)])
    fake.set_time(END - 1)
    fake.store.add_events([(TOKEN, event) for event in fixture], [])
    return fake, fixture


def track_event(rng: random.Random, index: int, now: int) -> dict:
    """A typical event as /track takes it: timed now (older than 5 days is refused)."""
    event = typical_event(rng, index, 10000, 50, 1)
    event["properties"]["time"] = now - rng.randrange(60)
    return event


def profile_update(rng: random.Random, index: int) -> dict:
    """One /engage operation, the mix the SDKs send ($set most of all)."""
    ops = ("$set", "$set", "$set", "$set_once", "$add", "$union", "$append", "$unset")
    op = ops[index % len(ops)]
    value: object
    if op in ("$set", "$set_once"):
        value = {"plan": PLANS[rng.randrange(len(PLANS))], "seats": rng.randrange(1, 50),
                 "$email": f"user-{index}@example.com", "trial": rng.random() < 0.3,
                 "amount": round(rng.random() * 40, 2)}
    elif op == "$add":
        value = {"logins": 1, "spent": round(rng.random() * 40, 2)}
    elif op in ("$union", "$append"):
        value = {"tags": ["a", "b"] if op == "$union" else "c"}
    else:
        value = ["coupon"]
    return {"$token": TOKEN, "$distinct_id": f"user-{rng.randrange(10000)}", op: value}


def import_bodies(batches: int) -> list[bytes]:
    """JSON bodies of 2,000 typical events each, as /import takes them."""
    rng = random.Random(7)
    return [json.dumps([typical_event(rng, b * BATCH + i, 10000, 50, 30) for i in range(BATCH)],
                       separators=(",", ":")).encode() for b in range(batches)]


def engage_bodies(batches: int) -> list[bytes]:
    """JSON bodies of 2,000 profile operations each."""
    rng = random.Random(11)
    return [json.dumps([profile_update(rng, b * BATCH + i) for i in range(BATCH)],
                       separators=(",", ":")).encode() for b in range(batches)]


def http_request(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """One HTTP/1.1 request with the headers Python's `requests` sends."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: python-requests/2.32.3",
             "Accept-Encoding: gzip, deflate", "Accept: */*", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def load_requests(kind: str, count: int) -> tuple[list[bytes], str]:
    """The requests a load client sends, and a regex each answer's body must match."""
    auth = {"Authorization": "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()}
    if kind == "track":
        # What the Python SDK's Consumer sends: one event, form-encoded, verbose.
        rng, now = random.Random(3), int(time.time())
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        requests = [http_request("POST", "/track", form, (
            "data=" + quote_plus(json.dumps(track_event(rng, i, now), separators=(",", ":")))
            + "&verbose=1&ip=0").encode()) for i in range(min(count, 500))]
        return requests, r'^(1|\{"status":1,"error":null\})$'
    if kind in ("import", "import-gzip"):
        headers = dict(auth, **{"Content-Type": "application/json"})
        bodies = import_bodies(count)
        if kind == "import-gzip":
            headers["Content-Encoding"] = "gzip"
            bodies = [gzip.compress(body, 6) for body in bodies]
        requests = [http_request("POST", "/import?strict=1", headers, body) for body in bodies]
        return requests, '"num_records_imported":%d' % BATCH
    if kind == "engage":
        headers = {"Content-Type": "application/json"}
        return ([http_request("POST", "/engage?verbose=1", headers, body)
                 for body in engage_bodies(count)], r'^\{"status":1,"error":null\}$')
    raise ValueError(kind)


# --- processes -----------------------------------------------------------------


class Server:
    """A server in a process of its own, its port read from its first stdout line."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        env=env, cwd=ROOT)
        line = self.process.stdout.readline().decode()
        found = re.search(r"https?://[^\s]+:(\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"{argv!r} did not say where it listens: {line!r}")
        self.port = int(found.group(1))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def fake_server() -> Server:
    return Server([sys.executable, os.path.join(ROOT, "mixpanel_fake.py"), "--port", "0",
                   "--token", TOKEN, "--api-secret", SECRET])


def bare_server() -> Server:
    return Server([sys.executable, os.path.join(HERE, "bare_server.py"), "--port", "0"])


def get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(http_request("GET", path, {"Connection": "close"}).replace(
            b"Connection: keep-alive\r\n", b""))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def run_load(port: int, kind: str, connections: int, count: int, paired: bool = False):
    """Seconds a load client (a process of its own) took for ``count`` requests;
    ``paired``: (those seconds, the seconds its baseline took, `paired_baseline`)."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--load", json.dumps(
        {"port": port, "kind": kind, "connections": connections, "count": count, "paired": paired})],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=True, cwd=ROOT)
    result = json.loads(done.stdout)
    if result["bad"]:
        raise RuntimeError(f"{kind}: {result['bad']} unexpected answers, e.g. {result['sample']!r}")
    return (result["seconds"], result["baseline_seconds"]) if paired else result["seconds"]


def paired_baseline(kind: str, body: bytes) -> None:
    """What a batch figure holds the fake to: decoding the same body alone."""
    json.loads(gzip.decompress(body) if kind == "import-gzip" else body)


_LENGTH_RE = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def load_client(spec: dict) -> dict:
    """Send ``count`` requests over ``connections`` keep-alive connections,
    each connection with one request in flight; time them after a warm-up."""
    requests, expect = load_requests(spec["kind"], spec["count"])
    expected = re.compile(expect.encode())
    connections, count = spec["connections"], spec["count"]
    sockets = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", spec["port"]))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockets.append(sock)
    bad, sample = 0, None

    def exchange(sock: socket.socket, request: bytes) -> bytes:
        sock.sendall(request)
        return read_answer(sock, b"")

    def read_answer(sock: socket.socket, data: bytes) -> bytes:
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                found = _LENGTH_RE.search(head)
                length = int(found.group(1)) if found else 0
                if len(rest) >= length:
                    return data
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk

    for sock in sockets:  # warm-up: one untimed exchange per connection
        exchange(sock, requests[0])
    if spec.get("paired"):
        # Each request right after its baseline, the decoding of its body
        # alone, in this process: both are timed in the same moments, so a
        # slow spell of the machine slows both.
        seconds = baseline = 0.0
        for request in requests[:count]:
            started = time.perf_counter()
            paired_baseline(spec["kind"], request.partition(b"\r\n\r\n")[2])
            middle = time.perf_counter()
            data = exchange(sockets[0], request)
            seconds += time.perf_counter() - middle
            baseline += middle - started
            head, _, rest = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 ") or not expected.search(rest):
                bad += 1
                sample = sample or data[:300].decode("latin-1")
        sockets[0].close()
        return {"seconds": seconds, "baseline_seconds": baseline, "bad": bad, "sample": sample}
    selector = selectors.DefaultSelector()
    buffers = {}
    sent = done = 0
    started = time.perf_counter()
    for sock in sockets[:count]:
        sock.sendall(requests[sent % len(requests)])
        sent += 1
        buffers[sock] = b""
        selector.register(sock, selectors.EVENT_READ)
    while done < count:
        for key, _ in selector.select():
            sock = key.fileobj
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data = buffers[sock] + chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            found = _LENGTH_RE.search(head) if sep else None
            if not sep or len(rest) < (int(found.group(1)) if found else 0):
                buffers[sock] = data
                continue
            buffers[sock] = b""
            done += 1
            if not head.startswith(b"HTTP/1.1 200 ") or not expected.search(rest):
                bad += 1
                sample = sample or data[:300].decode("latin-1")
            if sent < count:
                sock.sendall(requests[sent % len(requests)])
                sent += 1
    seconds = time.perf_counter() - started
    for sock in sockets:
        sock.close()
    return {"seconds": seconds, "bad": bad, "sample": sample}


# --- measuring -----------------------------------------------------------------


def median_pair(fake_round, base_round, rounds: int) -> tuple[float, float]:
    """Median seconds of each, alternating fake and baseline rounds."""
    fake_times, base_times = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        fake_round()
        fake_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        base_round()
        base_times.append(time.perf_counter() - started)
    return statistics.median(fake_times), statistics.median(base_times)


def alternate(fake_round, base_round, rounds: int) -> tuple[float, float]:
    """Median of each, alternating rounds that report their own seconds."""
    fake_times, base_times = [], []
    for _ in range(rounds):
        fake_times.append(fake_round())
        base_times.append(base_round())
    return statistics.median(fake_times), statistics.median(base_times)


def timed(work):
    """A round that times ``work()`` itself."""
    def round_():
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    return round_


def row(name: str, ours: float, base: float | None, ratio: float | None, goal: str, met: bool) -> tuple:
    return (name, ours, base, ratio, goal, met)


def figure_track(ctx) -> list[tuple]:
    """/track single events over keep-alive connections, against a bare handler."""
    fake, bare = fake_server(), bare_server()
    rows = []
    try:
        for connections, goal in ((1, 0.8), (8, 0.7)):
            count = ctx.size(6000, 600) * (2 if connections > 1 else 1)
            fake_s, base_s = alternate(lambda: run_load(fake.port, "track", connections, count),
                                       lambda: run_load(bare.port, "track", connections, count),
                                       ctx.rounds)
            ratio = base_s / fake_s
            plural = "s" if connections > 1 else ""
            rows.append(row(f"`/track` single events, keep-alive, {connections} connection{plural}, "
                            "requests/s", count / fake_s, count / base_s, ratio, f">= {goal}",
                            ratio >= goal))
        stored = json.loads(get(fake.port, "/__parlel/stats")[1])
        assert stored["events"] >= count, f"the fake stored {stored['events']} events, not all it took"
    finally:
        fake.stop()
        bare.stop()
    return rows


def figure_batches(ctx) -> list[tuple]:
    """/import (JSON and gzip) and /engage 2,000-record batches, against json.loads alone.

    The load client times each batch's baseline (decoding its body) right
    before sending it, so the two alternate batch by batch; a round is one
    client's run, and each figure is the median of its rounds."""
    batches = ctx.size(10, 2)
    names = {
        "import": ("`/import` 2,000-event JSON batches, strict, events/s", "json.loads"),
        "import-gzip": ("`/import` 2,000-event gzip JSON batches, strict, events/s",
                        "gzip.decompress + json.loads"),
        "engage": ("`/engage` 2,000-operation batches, operations/s", "json.loads"),
    }
    fake = fake_server()
    rows = []
    try:
        for kind in ("import", "import-gzip", "engage"):
            fake_times, base_times = [], []
            for _ in range(max(ctx.rounds, 9)):
                seconds, baseline = run_load(fake.port, kind, 1, batches, paired=True)
                get(fake.port, "/__parlel/reset")  # untimed: every round starts empty
                fake_times.append(seconds)
                base_times.append(baseline)
            fake_s, base_s = statistics.median(fake_times), statistics.median(base_times)
            n = batches * BATCH
            ratio = base_s / fake_s
            name, base_name = names[kind]
            rows.append(row(f"{name} (baseline: {base_name} of the same bodies)", n / fake_s,
                            n / base_s, ratio, ">= 0.25", ratio >= 0.25))
    finally:
        fake.stop()
    return rows


def time_to_health(argv: list[str], env: dict) -> float:
    """Seconds from process start to the first 200 on GET /health."""
    started = time.perf_counter()
    server = Server(argv, env)
    try:
        while True:
            try:
                if get(server.port, "/health")[0] == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.001)
    finally:
        server.stop()


def figure_startup(ctx) -> list[tuple]:
    """Process start to the first 200 on /health, against a bare stdlib server script.

    Python caches bytecode only for imported modules, never for the script it
    runs, so ``python mixpanel_fake.py`` compiles all of the module each time;
    ``python -m mixpanel_fake`` loads it from the cache once it is written.
    Both run with a cache the run itself fills (a temporary pycache prefix),
    as on any machine that writes bytecode."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=tempfile.mkdtemp(prefix="mixpanel-fake-bench-"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    module = [sys.executable, "-m", "mixpanel_fake", "--port", "0"]
    script = [sys.executable, os.path.join(ROOT, "mixpanel_fake.py"), "--port", "0"]
    bare = [sys.executable, os.path.join(HERE, "bare_server.py"), "--port", "0"]
    try:
        for argv in (module, script, bare):  # warm-up: fills the bytecode cache
            time_to_health(argv, env)
        rounds = max(ctx.rounds, 7)
        module_s, bare_s = alternate(lambda: time_to_health(module, env),
                                     lambda: time_to_health(bare, env), rounds)
        script_s = statistics.median(time_to_health(script, env) for _ in range(rounds))
    finally:
        shutil.rmtree(env["PYTHONPYCACHEPREFIX"], ignore_errors=True)
    extra = (module_s - bare_s) * 1000
    return [row("start to first 200 on `/health`, `python -m mixpanel_fake`, ms",
                module_s * 1000, bare_s * 1000, module_s / bare_s, "<= bare + 40 ms (+%.0f ms)" % extra,
                extra <= 40),
            row("start to first 200 on `/health`, `python mixpanel_fake.py` (compiled each time), ms",
                script_s * 1000, bare_s * 1000, script_s / bare_s, "(no goal: a script is compiled on every start)", True)]


def figure_lifecycle(ctx) -> list[tuple]:
    """``MixpanelFake()`` and its enter, then its exit with an idle keep-alive client."""
    enters, exits = [], []
    for _ in range(max(ctx.rounds, 5) * 4):
        started = time.perf_counter()
        fake = mixpanel_fake.MixpanelFake()
        fake.__enter__()
        entered = time.perf_counter()
        client = socket.create_connection(("127.0.0.1", fake.port))
        client.sendall(http_request("GET", "/health", {}))
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
        started_exit = time.perf_counter()
        fake.__exit__(None, None, None)
        exits.append(time.perf_counter() - started_exit)
        enters.append(entered - started)
        client.close()
    enter, exit_ = statistics.median(enters) * 1000, statistics.median(exits) * 1000
    return [row("`MixpanelFake()` + enter (bound, serving), ms", enter, None, None, "<= 10 ms", enter <= 10),
            row("exit, one idle keep-alive client connected, ms", exit_, None, None, "<= 10 ms",
                exit_ <= 10)]


def figure_reset(ctx) -> list[tuple]:
    """``reset()`` with 100,000 events stored: returns at once, frees later."""
    rng = random.Random(5)
    events = [(TOKEN, typical_event(rng, i, 10000, 50, 30)) for i in range(ctx.size(100000, 20000))]
    fake = mixpanel_fake.MixpanelFake(projects=[mixpanel_fake.Project(TOKEN)])
    times = []
    try:
        for _ in range(max(ctx.rounds, 5)):
            fake.store.add_events([(token, dict(event, properties=dict(event["properties"])))
                                   for token, event in events], [])
            assert len(fake.store.states[TOKEN].events) == len(events)
            started = time.perf_counter()
            fake.reset()
            times.append(time.perf_counter() - started)
            assert not fake.store.states[TOKEN].events
            mixpanel_fake._settle()  # untimed: the old state is freed before the next round
    finally:
        fake.stop()
    ms = statistics.median(times) * 1000
    return [row(f"`reset()` with {len(events):,} events stored, ms", ms, None, None, "<= 1 ms", ms <= 1)]


def figure_memory(ctx) -> list[tuple]:
    """Memory held per stored event, ingested through /import's own code path,
    against the objects ``json.loads`` makes of the same events."""
    bodies = import_bodies(ctx.size(50, 5))
    auth = {"Authorization": "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode(),
            "Content-Type": "application/json"}
    n = len(bodies) * BATCH

    def traced(work) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            kept = work()
            gc.collect()
            size = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del kept
        return size / n

    def fake_round():
        store = mixpanel_fake.Store([mixpanel_fake.Project(TOKEN, api_secret=SECRET)])
        for body in bodies:
            answer = mixpanel_fake._import(store, mixpanel_fake._Request(
                "POST", "/import", "strict=1", auth, body))
            assert answer.status == 200, answer.body
        return store

    ours, base = alternate(lambda: traced(fake_round),
                           lambda: traced(lambda: [json.loads(body) for body in bodies]),
                           ctx.rounds)
    return [row(f"memory per stored event ({n:,} typical events via `/import`), bytes", ours, base,
                ours / base, "<= 1.5", ours / base <= 1.5)]


def figure_export(fake, fixture, rounds):
    """Export streams at >= 50% of the rate of json.dumps of the same events."""
    first = datetime.datetime.fromtimestamp(END - 30 * DAY, datetime.timezone.utc).date().isoformat()
    last = datetime.datetime.fromtimestamp(END - 1, datetime.timezone.utc).date().isoformat()
    request = mixpanel_fake._Request("GET", "/api/2.0/export", f"from_date={first}&to_date={last}",
                                     {}, b"")

    def fake_round():
        size = 0
        for chunk in mixpanel_fake._export(fake.store, request).body:
            size += len(chunk)
        assert size > 0

    def base_round():
        size = 0
        for event in fixture:
            size += len(json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()) + 1
        assert size > 0

    fake_s, base_s = median_pair(fake_round, base_round, rounds)
    # Constant memory: the stream's peak allocation, whatever the event count.
    tracemalloc.start()
    for _ in mixpanel_fake._export(fake.store, request).body:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = len(fixture)
    return ("export JSONL, events/s (peak %.1f MB while streaming)" % (peak / 1e6),
            n / fake_s, n / base_s, (n / fake_s) / (n / base_s), ">= 0.5", (n / fake_s) / (n / base_s) >= 0.5)


def figure_where(fake, fixture, rounds):
    """A compiled `where` runs at >= 50% of the hand-written lambda's speed."""
    props = [event["properties"] for event in fixture]
    matches = mixpanel_fake._compile_expression(
        'properties["plan"] == "pro" and properties["amount"] > 10').matches
    numbers = (int, float)

    def hand(p):
        amount = p.get("amount")
        return p.get("plan") == "pro" and type(amount) in numbers and amount > 10

    expected = sum(1 for p in props if hand(p))

    def fake_round():
        assert sum(1 for p in props if matches(p)) == expected

    def base_round():
        assert sum(1 for p in props if hand(p)) == expected

    fake_s, base_s = median_pair(fake_round, base_round, rounds)
    n = len(props)
    return ("`where` filter, events/s", n / fake_s, n / base_s, base_s / fake_s, ">= 0.5", base_s / fake_s >= 0.5)


def figure_segmentation(fake, fixture, rounds):
    """Segmentation by day on plan (dedup, timezone buckets) in < 2x one hand pass."""
    first = datetime.datetime.fromtimestamp(END - 30 * DAY, datetime.timezone.utc).date()
    last = datetime.datetime.fromtimestamp(END - 1, datetime.timezone.utc).date()
    query = (f"event=Event%203&from_date={first.isoformat()}&to_date={last.isoformat()}"
             "&on=properties%5B%22plan%22%5D")
    request = mixpanel_fake._Request("GET", "/api/2.0/segmentation", query,
                                     {"Authorization": "Basic YmVuY2g6"}, b"")
    start = datetime.datetime.combine(first, datetime.time(), datetime.timezone.utc).timestamp()
    end = datetime.datetime.combine(last + datetime.timedelta(days=1), datetime.time(),
                                    datetime.timezone.utc).timestamp()
    tz = mixpanel_fake._zone("UTC")
    result = {}

    def fake_round():
        result["fake"] = json.loads(mixpanel_fake._segmentation(fake.store, request).body)

    def base_round():
        # One hand-written pass doing the same: name and range filter, dedup
        # (latest copy wins), timezone day buckets, group by plan.
        latest = {}
        for event in fixture:
            if event["event"] != "Event 3":
                continue
            p = event["properties"]
            ts = p["time"]
            if start <= ts < end:
                latest[(event["event"], p["distinct_id"], ts, p["$insert_id"])] = p
        offsets, days, counts = {}, {}, {}
        for p in latest.values():
            ts = p["time"]
            hour = int(ts // 3600)
            offset = offsets.get(hour)
            if offset is None:
                offset = offsets[hour] = datetime.datetime.fromtimestamp(
                    hour * 3600, tz).utcoffset().total_seconds()
            slot = int((ts + offset) // DAY)
            label = days.get(slot)
            if label is None:
                label = days[slot] = (datetime.date(1970, 1, 1) + datetime.timedelta(days=slot)).isoformat()
            bucket = counts.setdefault(p["plan"], {})
            bucket[label] = bucket.get(label, 0) + 1
        result["base"] = counts

    fake_s, base_s = median_pair(fake_round, base_round, rounds)
    got = {k: {d: c for d, c in v.items() if c} for k, v in result["fake"]["data"]["values"].items()}
    assert got == result["base"], "segmentation disagrees with the hand-written pass"
    return ("segmentation by day on plan, seconds", fake_s, base_s, fake_s / base_s, "<= 2.0", fake_s / base_s <= 2.0)


def figure_queries(ctx) -> list[tuple]:
    """The query issue's three figures, over the big in-process fixture."""
    started = time.perf_counter()
    fake, fixture = build(ctx.size(1_000_000, 20000))
    ctx.notes.append(f"query fixture: {len(fixture):,} typical events (10 properties, 50 names, "
                     f"10,000 people, 30 days), built in {time.perf_counter() - started:.1f} s")
    try:
        return [measure(fake, fixture, ctx.rounds)
                for measure in (figure_export, figure_where, figure_segmentation)]
    finally:
        fake.stop()


FIGURES = [figure_track, figure_batches, figure_startup, figure_lifecycle, figure_reset,
           figure_memory, figure_queries]


class Context:
    """What every figure reads: the run's size and its rounds."""

    def __init__(self, quick: bool, events: int | None):
        self.quick = quick
        self.events = events
        self.rounds = 3 if quick else 5
        self.notes: list[str] = []

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small fixtures (CI: proves it runs)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--only", metavar="NAME", help="run the figures whose function name has NAME")
    parser.add_argument("--load", metavar="JSON", help=argparse.SUPPRESS)  # a load client process
    args = parser.parse_args(argv)
    if args.load:
        print(json.dumps(load_client(json.loads(args.load))))
        return 0
    if args.only and not any(args.only in figure.__name__ for figure in FIGURES):
        parser.error(f"--only {args.only}: no figure's name has it; the figures: "
                     + ", ".join(f.__name__[len("figure_"):] for f in FIGURES))
    ctx = Context(args.quick, None)
    print(f"machine: {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} cores, {platform.machine()}, {platform.system()}; "
          f"{'quick run, ' if args.quick else ''}median of >= {ctx.rounds} alternating rounds per figure\n")
    print("| figure | this fake | baseline | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    missed = 0
    for figure in FIGURES:
        if args.only and args.only not in figure.__name__:
            continue
        for name, ours, theirs, ratio, goal, met in figure(ctx):
            missed += not met
            print(f"| {name} | {ours:,.3g} | {'—' if theirs is None else format(theirs, ',.3g')} | "
                  f"{'—' if ratio is None else format(ratio, '.2f')} | {goal} | "
                  f"{'yes' if met else 'NO'} |", flush=True)
    for note in ctx.notes:
        print(f"\n{note}")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
