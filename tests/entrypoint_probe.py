"""Start a container entrypoint (`docker/entrypoint.sh serve ...`) as the container would, talk
to it as SageMaker does, stop it with SIGTERM, and print what happened as one JSON object.

    python tests/entrypoint_probe.py --port 8080 [--grpc-port N] [--log FILE] -- CMD...

It is a script rather than test code so that tests/test_containers.py can also run it inside a
fresh network namespace (`unshare`), where port 8080 is certainly free. The environment is
passed through unchanged. Output keys: ping (status of GET /ping), models (ids from
/v1/models), invocation (status and body of POST /invocations), grpc (SERVING or null),
adapter (statuses of POST /adapters and of an invocation with the adapter header, when
--adapter is given), returncode (after SIGTERM), error (why it gave up, or null).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 150


def grpc_health(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--adapter", default=None, metavar="NAME=PATH",
                        help="register this adapter with POST /adapters, then invoke it by header")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    base = f"http://127.0.0.1:{args.port}"
    result: dict = {"ping": None, "models": None, "invocation": None, "adapter": None, "grpc": None,
                    "returncode": None, "error": None}
    log = open(args.log, "wb") if args.log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                result["error"] = f"exited with {proc.returncode} while starting"
                break
            try:
                status = httpx.get(f"{base}/ping", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                result["ping"] = 200
                break
            if time.monotonic() > deadline:
                result["error"] = f"no 200 from /ping after {STARTUP_TIMEOUT_S} s (last: {status})"
                break
            time.sleep(0.3)
        if result["ping"] == 200:
            result["models"] = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]]
            r = httpx.post(f"{base}/invocations", timeout=120,
                           json={"inputs": "The capital of France is",
                                 "parameters": {"max_new_tokens": 4, "do_sample": False}})
            result["invocation"] = {"status": r.status_code, "body": r.json()}
            if args.adapter:
                name, _, src = args.adapter.partition("=")
                reg = httpx.post(f"{base}/adapters", json={"name": name, "src": src}, timeout=120)
                inv = httpx.post(f"{base}/invocations", timeout=120,
                                 headers={"X-Amzn-SageMaker-Adapter-Identifier": name},
                                 json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}})
                result["adapter"] = {"register": reg.status_code, "invocation": inv.status_code}
            if args.grpc_port:
                result["grpc"] = grpc_health(args.grpc_port)
    except Exception as exc:  # report, then still stop the server
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                result["error"] = result["error"] or "did not exit within 60 s of SIGTERM"
        result["returncode"] = proc.returncode
        if args.log:
            log.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
