"""The server under each attack of the hardening issue, on 127.0.0.1: how /healthz and a normal user fare meanwhile.

A real `digitkit serve` (default limits unless --settings) is attacked from 127.0.0.2 while a prober asks /healthz
every 10 ms over a keep-alive connection from 127.0.0.1. Every attack is bounded in count and time:
  quiet        no attack: the reference for the ratios
  pattern      /v1/read with `((\\d+)+)+x` on a row of 20 digits, back to back, 1 client (--pattern-reads)
  flood        --flood connections that send half a request header and stop (slowloris), held until cut
  slow_body    --slow-bodies requests whose body drips at 1 byte / 0.5 s
  gif          3 clients sending a 7.9 MB GIF of 360,000 1x1 frames, while a normal user sends 28x28 PNGs
Per attack: /healthz p50/p99/max and failures, event-loop lag samples over 50 ms (digitkit_event_loop_lag_seconds),
connections refused, the server's open file descriptors at the peak, and for the GIF the normal user's p50 against
the quiet one in the same run. The machine is shared and noisy: compare within one run.

    python benchmarks/serve_attacks.py [--model runs/latest] [--settings serve.yaml] [--flood 2000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import Server, serve  # noqa: E402 - the same server harness as the tests
from tests.test_serve_robustness import (  # noqa: E402 - the same attacks as the tests
    Prober,
    attacker_socket,
    gif_of_frames,
    lag_over,
    metric,
    png_bytes,
    status_line,
)


def probe_summary(prober: Prober) -> dict[str, Any]:
    times = sorted(prober.times_ms)
    return {"probes": len(times), "failures": len(prober.failures), "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(prober.p99(), 2), "max_ms": round(times[-1], 2)}  # fmt: skip


def fds(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def attack(server: Server, name: str, run: Any) -> dict[str, Any]:
    lag0 = lag_over(server, 0.05)
    refused0 = metric(server, "digitkit_connections_refused_total")
    with Prober(server) as prober:
        extra = run() or {}
    out = {"healthz": probe_summary(prober), "loop_lag_over_50ms": lag_over(server, 0.05) - lag0,
           "connections_refused": metric(server, "digitkit_connections_refused_total") - refused0, **extra}  # fmt: skip
    print(f"{name:10s} healthz p50 {out['healthz']['p50_ms']:7.2f} ms  p99 {out['healthz']['p99_ms']:7.2f} ms  "
          f"max {out['healthz']['max_ms']:7.1f} ms  failures {out['healthz']['failures']}  loop lag >50 ms: "
          f"{out['loop_lag_over_50ms']:.0f}  " + "  ".join(f"{k} {v}" for k, v in extra.items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "latest"))
    p.add_argument("--settings", help="serve.yaml for the server (default: the default limits)")
    p.add_argument("--flood", type=int, default=2000, help="half-sent connections (default 2000)")
    p.add_argument("--slow-bodies", type=int, default=50)
    p.add_argument("--pattern-reads", type=int, default=40)
    p.add_argument("--hold-s", type=float, default=3.0, help="seconds the flood and slow bodies are held")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_attacks.json"))
    args = p.parse_args()

    from digitkit import data, synth

    ds = data.load_split(ROOT / "data" / "mnist", "test")
    row, _, _ = synth.strip([ds.images[i, 0].numpy() for i in range(20)], [int(v) for v in ds.labels[:20]], seed=3,
                            gap=(0.4, 0.6))  # fmt: skip
    read_body = {"image": base64.b64encode(png_bytes(row)).decode(), "pattern": r"((\d+)+)+x"}
    normal = [png_bytes(ds.images[i, 0].numpy()) for i in range(200)]
    bomb = gif_of_frames(360_000)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--settings", args.settings] if args.settings else []
        with serve(args.model, Path(tmp), "--cache-size", "0", *extra) as server:

            def user_p50(stop: threading.Event | None, n: int) -> float:
                times = []
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    for i in range(n):
                        if stop is not None and stop.is_set() and len(times) >= 20:
                            break
                        t0 = time.perf_counter()
                        c.post("/v1/predict", content=normal[i % len(normal)], headers={"Content-Type": "image/png"})
                        times.append((time.perf_counter() - t0) * 1000)
                return round(statistics.median(times), 2)

            quiet_user = user_p50(None, 200)
            results["quiet"] = attack(server, "quiet", lambda: time.sleep(2) or {"user_p50_ms": quiet_user})

            def pattern() -> dict[str, Any]:
                times = []
                with httpx.Client(base_url=server.url, timeout=60) as c:
                    for _ in range(args.pattern_reads):
                        t0 = time.perf_counter()
                        r = c.post("/v1/read", json=read_body)
                        assert r.status_code == 200, r.text
                        times.append((time.perf_counter() - t0) * 1000)
                return {"read_p50_ms": round(statistics.median(times), 1), "read_max_ms": round(max(times), 1)}

            results["pattern"] = attack(server, "pattern", pattern)

            def flood() -> dict[str, Any]:
                socks = []
                try:
                    for _ in range(args.flood):
                        s = attacker_socket(server)
                        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
                        socks.append(s)
                    peak = fds(server)
                    time.sleep(args.hold_s)
                    for s in socks:
                        s.settimeout(0.01)
                    lines = [status_line(s) for s in socks]
                finally:
                    for s in socks:
                        s.close()
                answered = {line.decode(errors="replace"): lines.count(line) for line in set(lines)}
                return {"connections": args.flood, "peak_fds": peak, "answers": answered}

            results["flood"] = attack(server, "flood", flood)

            def slow_body() -> dict[str, Any]:
                socks = [attacker_socket(server) for _ in range(args.slow_bodies)]
                try:
                    for s in socks:
                        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                  b"Content-Length: 100000\r\n\r\n")  # fmt: skip
                    end = time.monotonic() + args.hold_s
                    while time.monotonic() < end:
                        for s in socks:
                            try:
                                s.sendall(b"x")
                            except OSError:
                                pass
                        time.sleep(0.5)
                finally:
                    for s in socks:
                        s.close()
                return {"slow_bodies": args.slow_bodies}

            results["slow_body"] = attack(server, "slow_body", slow_body)

            def gif() -> dict[str, Any]:
                stop, bomb_ms = threading.Event(), []

                def send() -> None:
                    with httpx.Client(base_url=server.url, timeout=60) as c:
                        for _ in range(8):
                            t0 = time.perf_counter()
                            c.post("/v1/predict", content=bomb, headers={"Content-Type": "image/gif"})
                            bomb_ms.append((time.perf_counter() - t0) * 1000)

                senders = [threading.Thread(target=send) for _ in range(3)]
                for t in senders:
                    t.start()
                def until_senders_end() -> None:
                    for t in senders:
                        t.join()
                    stop.set()

                threading.Thread(target=until_senders_end, daemon=True).start()
                user = user_p50(stop, 2000)
                stop.wait(120)
                return {"user_p50_ms": user, "user_p50_vs_quiet": round(user / quiet_user, 2),
                        "gif_request_p50_ms": round(statistics.median(bomb_ms), 1)}  # fmt: skip

            results["gif"] = attack(server, "gif", gif)
            log = server.log()
            results["server_log"] = {"bytes": len(log), "tracebacks": log.count("Traceback"),
                                     "accept_errors": log.count("out of system resource")}  # fmt: skip
    results["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()}
    results["model"] = args.model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu() -> str:
    import machine  # benchmarks/machine.py, beside this script

    flags = machine.cpu_flags()
    return machine.cpu_name() + (f" ({flags.removesuffix(' with bfloat16')})" if flags else "")


if __name__ == "__main__":
    main()
