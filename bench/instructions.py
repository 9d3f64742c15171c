"""Instruction counts of the fake's batch work against json.loads, under callgrind.

    python bench/instructions.py            # /engage and /import, one 2,000-record batch each
    python bench/instructions.py engage     # one of them

Wall-clock ratios on a shared 2-core machine move by a third from run to run;
valgrind's callgrind counts instructions, the same on every run (with the hash
seed fixed, as here), so a change
to the validation loops can be judged in one go.  Each kind runs three
processes under callgrind: the set-up alone, the set-up plus ``json.loads`` of
one batch, the set-up plus the fake's handler for that batch (in process, no
HTTP), and the differences are compared.  Needs ``valgrind`` on PATH; a
standard-library script otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KINDS = ("engage", "import")


def one(kind: str, what: str) -> None:
    """In a process of its own: warm up on one batch, then do ``what`` once."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import bench
    import mixpanel_fake as fake

    bodies = bench.engage_bodies(2) if kind == "engage" else bench.import_bodies(2)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{bench.SECRET}:".encode()).decode(),
            "Content-Type": "application/json"}
    store = fake.Store([fake.Project(bench.TOKEN, api_secret=bench.SECRET)])
    handler = fake._engage if kind == "engage" else fake._import
    path, query = ("/engage", "verbose=1") if kind == "engage" else ("/import", "strict=1")
    handler(store, fake._Request("POST", path, query, auth, bodies[0]))
    if what == "fake":
        handler(store, fake._Request("POST", path, query, auth, bodies[1]))
    elif what == "json":
        json.loads(bodies[1])


def count(kind: str, what: str, folder: str) -> int:
    """Instructions callgrind counted for one ``one()`` process."""
    python = os.path.realpath(sys.executable)  # not a shim: callgrind must see python itself
    out = os.path.join(folder, f"{kind}.{what}.out")
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python,
                           os.path.abspath(__file__), "--one", kind, what],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True,
                          env=dict(os.environ, PYTHONHASHSEED="0"))  # the same hashes, the same count
    found = re.search(r"Collected : (\d+)", done.stderr)
    if not found:
        raise RuntimeError(f"callgrind printed no count:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        one(argv[1], argv[2])
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    kinds = argv or list(KINDS)
    if any(kind not in KINDS for kind in kinds):
        print(f"kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mixpanel-fake-callgrind-") as folder:
        for kind in kinds:
            base, loads, ours = (count(kind, what, folder) for what in ("none", "json", "fake"))
            loads, ours = loads - base, ours - base
            print(f"{kind}: json.loads {loads / 1e6:.1f}M instructions, the fake {ours / 1e6:.1f}M "
                  f"({ours / 2000:,.0f} a record); ratio {loads / ours:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
