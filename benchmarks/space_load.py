"""The Space under load: many callers at once on `/generate`, through `gradio_client`, against the built Space.

    python -m benchmarks.space_load                 # build the Space, run its app.py, 20 callers at once
    python -m benchmarks.space_load --callers 40 --images-per-class 8
    python -m benchmarks.space_load --url http://127.0.0.1:7860/   # a Space already running

Every caller is its own client (its own session), as 20 people on one page would be; they send their request together
(a barrier). Each ends with images, with "busy" (the queue was full: gradio_client's `QueueError`, "Queue is full!
Please try again.") or with an error, which is a failure of the Space. Printed: one row per outcome with its count and
latency p50/p95/max (seconds from sending to the answer), the deepest queue seen (`/gradio_api/queue/status`, polled
every 0.1 s) and, for a Space started here, the app's peak resident memory (VmHWM).
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
BUSY = "busy"


@dataclass
class Outcome:
    kind: str  # "images", BUSY or "error"
    seconds: float  # from sending the request to its answer
    detail: str = ""  # the number of images, or the error's message


def call_together(url: str, callers: int, timeout: float = 600, **request) -> list[Outcome]:
    """`callers` clients, each sending `request` to `/generate` at the same moment; their outcomes, in caller order.
    A caller still waiting after `timeout` seconds counts as an error ("no answer")."""
    from gradio_client import Client
    from gradio_client.utils import QueueError

    clients = [Client(url, verbose=False) for _ in range(callers)]  # connecting is not part of the latency
    outcomes: list[Outcome | None] = [None] * callers
    start = threading.Barrier(callers)

    def call(index: int) -> None:
        start.wait()
        begin = time.perf_counter()
        try:
            gallery, _, _ = clients[index].submit(**request, api_name="/generate").result(timeout=timeout)
            outcomes[index] = Outcome("images", time.perf_counter() - begin, str(len(gallery)))
        except QueueError as error:
            outcomes[index] = Outcome(BUSY, time.perf_counter() - begin, str(error))
        except Exception as error:  # noqa: BLE001 - any other answer is a failure, reported as such
            outcomes[index] = Outcome("error", time.perf_counter() - begin, f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return [outcome or Outcome("error", timeout, "no answer") for outcome in outcomes]


class QueueWatcher:
    """Polls the Space's queue length every `interval` seconds in a thread; `deepest` is the longest seen."""

    def __init__(self, url: str, interval: float = 0.1):
        self.status_url = url.rstrip("/") + "/gradio_api/queue/status"
        self.interval = interval
        self.deepest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.status_url, timeout=5) as response:
                    self.deepest = max(self.deepest, json.load(response)["queue_size"])
            except OSError:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "QueueWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of a non-empty sorted list, linear between ranks (numpy's default)."""
    position = (len(values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def table(outcomes: list[Outcome]) -> str:
    rows = ["| outcome | callers | p50 s | p95 s | max s |", "|---|---:|---:|---:|---:|"]
    for kind in ("images", BUSY, "error"):
        seconds = sorted(o.seconds for o in outcomes if o.kind == kind)
        if seconds:
            p50, p95 = percentile(seconds, 50), percentile(seconds, 95)
            rows.append(f"| {kind} | {len(seconds)} | {p50:.2f} | {p95:.2f} | {seconds[-1]:.2f} |")
    return "\n".join(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_space(folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Build the Space into `folder`, run its `app.py` on a free local port; wait until it answers."""
    sys.path.insert(0, str(ROOT / "space_app"))
    from build_space import build_space

    build_space(folder)
    port = free_port()
    env = dict(
        os.environ,
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return process, url
        except OSError:
            time.sleep(1)
    process.terminate()
    raise RuntimeError(f"app.py did not answer at {url} within 300 s")


def peak_memory_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a running process, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--url", default=None, help="a running Space (default: build one and run its app.py here)")
    parser.add_argument("--model", default="digits", help="the Model picker entry every caller asks for")
    parser.add_argument("--classes", nargs="*", default=["3", "7"])
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a caller waits before giving up")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="space-load-") as tmp:
        process, url = (None, args.url) if args.url else start_space(Path(tmp) / "space", Path(tmp) / "app.log")
        try:
            request = dict(classes=args.classes, images_per_class=args.images_per_class, model=args.model)
            with QueueWatcher(url) as watcher:
                outcomes = call_together(url, args.callers, args.timeout, **request)
            memory = f", app peak RSS {peak_memory_mib(process.pid):.0f} MiB" if process else ""
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    print(f"{args.callers} callers at once on {url} ({request}); {os.cpu_count()} CPUs, load {load:.1f} before")
    print(table(outcomes))
    print(f"deepest queue seen: {watcher.deepest}{memory}")
    for outcome in outcomes:
        if outcome.kind == "error":
            print(f"error: {outcome.detail}")
    return 1 if any(o.kind == "error" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
