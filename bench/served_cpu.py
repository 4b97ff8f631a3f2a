"""Where a served workload's CPU goes: starts `kiln serve` (as bench/serving.py does), runs the
harness's concurrent workload against it (--concurrency in flight, twice as many requests,
prompts of 20-200 words, 64 greedy tokens each, EOS ignored), and prints output tokens/s with
the CPU seconds each of the server's threads and the load generator (this process) used
meanwhile. On a 2-core machine the engine's two threads share the cores with the HTTP event
loop and the client; set the figure against bench/engine_replay.py (the same work on the
engine alone).

    python bench/served_cpu.py --concurrency 64
    python bench/served_cpu.py --concurrency 32 --server-args "--max-num-batched-tokens 4096"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serving  # noqa: E402


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds (user + system) of each thread of `pid`, keyed by (tid, name)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--server-args", default="", help="more `kiln serve` arguments")
    ap.add_argument("--log", default="/tmp/kiln-served-cpu.log", help="the server's log")
    args = ap.parse_args()

    proc = serving.start_kiln(args.port, ["--dtype", args.dtype, "--num-threads", "2", "--kv-cache-bytes", "2G",
                                          "--max-num-seqs", str(max(64, args.concurrency)), "--max-model-len", "4096",
                                          "--log-level", "warning", *shlex.split(args.server_args)], log=Path(args.log))
    try:
        url = f"http://127.0.0.1:{args.port}"
        asyncio.run(serving.run_load(url, None, serving.make_prompts(8, 99, 20, 200), 8, 8, None, 0, None))  # warm-up
        prompts = serving.make_prompts(2 * args.concurrency, 7, 20, 200)
        before, usage0, start = thread_cpu(proc.pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        res = asyncio.run(serving.run_load(url, None, prompts, 64, args.concurrency, None, 0, None))
        wall = time.perf_counter() - start
        after, usage1 = thread_cpu(proc.pid), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        proc.terminate()
        proc.wait()
    client = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    print(f"c{args.concurrency}: {res['output_tokens']} tokens in {wall:.2f} s = {res['tokens_per_s']:.0f} tok/s "
          f"({res['errors']} errors); {2 * wall:.2f} CPU-s on 2 cores")
    print(f"  load generator (this process): {client:.2f} CPU-s")
    used = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)
    for seconds, (tid, name) in used:
        if seconds >= 0.01:
            print(f"  server thread {tid} ({name}): {seconds:.2f} CPU-s")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
