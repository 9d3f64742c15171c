"""Benchmarks for mixpanel_fake, as ratios against baselines run in the same process.

    python bench/bench.py            # full fixtures (1,000,000 events), prints a Markdown table
    python bench/bench.py --quick    # small fixtures, proves it still runs (CI)
    python bench/bench.py --check    # exit 1 when a goal is missed

Each figure is the median of several alternating rounds of the fake and its
baseline, so drift on a shared machine hits both alike.  Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mixpanel_fake  # noqa: E402  (after the path tweak)

TOKEN = "bench"
DAY = 86400
# The fixture's last day; the project clock is pinned to its end.
END = int(datetime.datetime(2026, 11, 30, tzinfo=datetime.timezone.utc).timestamp())
PLANS = ("free", "pro", "team", "enterprise")


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


FIGURES = [figure_export, figure_where, figure_segmentation]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small fixtures (CI: proves it runs)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--events", type=int, default=None, help="fixture size (default 1,000,000)")
    args = parser.parse_args(argv)
    events = args.events or (20000 if args.quick else 1_000_000)
    rounds = 3 if args.quick else 5
    started = time.perf_counter()
    fake, fixture = build(events)
    print(f"fixture: {events:,} typical events (10 properties, 50 names, 10,000 people, 30 days), "
          f"built in {time.perf_counter() - started:.1f} s; {rounds} alternating rounds per figure")
    print(f"machine: {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} cores, {platform.machine()}\n")
    print("| figure | this fake | baseline | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    missed = 0
    for measure in FIGURES:
        name, ours, theirs, ratio, goal, met = measure(fake, fixture, rounds)
        missed += not met
        print(f"| {name} | {ours:,.3g} | {theirs:,.3g} | {ratio:.2f} | {goal} | {'yes' if met else 'NO'} |")
    fake.stop()
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
