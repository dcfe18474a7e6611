"""Bounded load test of `pneumoscope serve` over loopback; prints a markdown table.

    .venv/bin/python benchmarks/load_test.py                          # 500 requests, 16 clients, shipped model
    .venv/bin/python benchmarks/load_test.py --requests 40 --model runs/x/model
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --pid 1234   # a running server

Starts the server as a child process on a free 127.0.0.1 port (unless --url), sends real X-rays from
examples/ plus a share of broken uploads (text, empty, truncated JPEG, which must get 422), and
counts as an error anything else: a transport failure, a 5xx, or a status other than the expected one.
RSS is the server process's resident memory (Linux /proc) after warm-up and at the end.
"""
from __future__ import annotations

import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import ROOT, add_model, cli_command, machine, parser


def payloads(bad_fraction: float, count: int, seed: int = 0) -> list[tuple[str, bytes, int]]:
    """(filename, bytes, expected status) for each request, good X-rays and broken files mixed."""
    good = [(p.name, p.read_bytes(), 200) for p in sorted((ROOT / "examples").rglob("*.jpeg"))]
    bad = [("notes.txt", b"not an image\n", 422), ("empty.jpeg", b"", 422),
           ("cut.jpeg", good[0][1][: len(good[0][1]) // 3], 422)]
    rng = random.Random(seed)
    return [rng.choice(bad) if rng.random() < bad_fraction else good[i % len(good)] for i in range(count)]


def rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError, ValueError):
        pass
    return None


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [*cli_command(), "serve", "--port", str(port), "--task", args.task]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited:\n{server.stderr.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    sys.exit("the server did not answer /healthz within 180 s")


def run(url: str, jobs: list[tuple[str, bytes, int]], concurrency: int, cam: bool):
    """Sends `jobs` from `concurrency` client threads; returns [(seconds, ok)] in completion order."""
    def client(share):
        results = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for name, data, expected in share:
                started = time.perf_counter()
                try:
                    status = http.post("/v1/predict", params={"cam": str(cam).lower()},
                                       files={"file": (name, data)}).status_code
                except httpx.HTTPError:
                    status = None
                results.append((time.perf_counter() - started, status == expected))
        return results

    shares = [jobs[k::concurrency] for k in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        return [result for share in pool.map(client, shares) for result in share]


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--requests", type=int, default=500)
    options.add_argument("--concurrency", type=int, default=16)
    options.add_argument("--warmup", type=int, default=16, help="requests before measuring (not counted)")
    options.add_argument("--bad-fraction", type=float, default=0.1, help="share of broken uploads (expect 422)")
    options.add_argument("--cam", action="store_true", help="ask for Grad-CAM on every request")
    options.add_argument("--task", choices=("three", "binary"), default="three")
    add_model(options, default="the shipped model for --task")
    options.add_argument("--url", default=None, help="test a running server instead of starting one")
    options.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    args = options.parse_args()

    server, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    pid = server.pid if server else args.pid
    try:
        run(url, payloads(0, args.warmup, seed=1), min(args.concurrency, args.warmup), args.cam)
        rss_warm = rss_mib(pid)
        started = time.perf_counter()
        results = run(url, payloads(args.bad_fraction, args.requests), args.concurrency, args.cam)
        wall = time.perf_counter() - started
        rss_end = rss_mib(pid)
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)

    latencies = sorted(seconds * 1000 for seconds, _ in results)
    errors = sum(not ok for _, ok in results)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    mib = lambda value: "n/a" if value is None else f"{value:.0f} MiB"  # noqa: E731
    print(f"| requests | clients | bad uploads | cam | errors | p50 ms | p95 ms | req/s | RSS warm | RSS end |\n"
          f"|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {len(results)} | {args.concurrency} | {args.bad_fraction:.0%} | {'yes' if args.cam else 'no'} "
          f"| {errors} | {statistics.median(latencies):.0f} | {p95:.0f} | {len(results) / wall:.1f} "
          f"| {mib(rss_warm)} | {mib(rss_end)} |")
    print(f"\n{machine('end')}; server {'pid ' + str(pid) if pid else 'unknown'}; {url}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
