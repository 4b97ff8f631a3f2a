"""Settings precedence, and the server's behaviour at its edges: API key, body limit,
admission limit (429), request deadline, SIGTERM drain, and a schemathesis run against the
server's own OpenAPI schema."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kiln.config import SETTINGS, grpc_port_in_range, load_config
from kiln_process import KilnProcess

ROOT = Path(__file__).resolve().parents[1]


# -- settings -----------------------------------------------------------------------------


def test_precedence_cli_over_kiln_env_over_aliases_over_defaults():
    assert load_config(environ={}).engine.max_num_seqs == 64
    env = {"MAX_BATCH_SIZE": "8"}
    assert load_config(environ=env).engine.max_num_seqs == 8
    env["OPTION_MAX_ROLLING_BATCH_SIZE"] = "9"  # TGI's name is listed first, so it wins
    assert load_config(environ=env).engine.max_num_seqs == 8
    env["KILN_MAX_NUM_SEQS"] = "12"
    assert load_config(environ=env).engine.max_num_seqs == 12
    assert load_config({"engine.max_num_seqs": 3}, environ=env).engine.max_num_seqs == 3
    assert load_config({"engine.max_num_seqs": None}, environ=env).engine.max_num_seqs == 12


def test_sagemaker_and_tgi_aliases():
    cfg = load_config(environ={
        "SAGEMAKER_BIND_TO_PORT": "9000", "SAGEMAKER_SAFE_PORT_RANGE": "9000-9010",
        "HF_MODEL_ID": "/models/x", "MAX_INPUT_TOKENS": "100", "MAX_TOTAL_TOKENS": "200",
        "MAX_CONCURRENT_REQUESTS": "7", "OPTION_DTYPE": "bf16", "OPTION_ENABLE_PREFIX_CACHING": "false",
    })
    assert cfg.port == 9000 and cfg.grpc_port == 9001
    assert cfg.engine.model == "/models/x"
    assert cfg.engine.max_input_tokens == 100 and cfg.engine.max_model_len == 200
    assert cfg.max_concurrent_requests == 7
    assert cfg.engine.dtype == "bfloat16" and cfg.engine.enable_prefix_caching is False
    assert load_config(environ={"MAX_INPUT_LENGTH": "50"}).engine.max_input_tokens == 50
    assert load_config(environ={"KILN_KV_CACHE_BYTES": "1G"}).engine.kv_cache_bytes == 1 << 30


def test_bad_settings_name_the_variable():
    with pytest.raises(ValueError, match="KILN_MAX_NUM_SEQS='many'"):
        load_config(environ={"KILN_MAX_NUM_SEQS": "many"})
    with pytest.raises(ValueError, match="OPTION_DTYPE"):
        load_config(environ={"OPTION_DTYPE": "int3"}).engine.torch_dtype
    with pytest.raises(ValueError, match="SAGEMAKER_SAFE_PORT_RANGE"):
        grpc_port_in_range("oops", 8080)
    with pytest.raises(ValueError, match="ports must differ"):
        load_config({"server.port": 9000, "server.grpc_port": 9000}, environ={})


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for setting in SETTINGS:
        for name in (setting.kiln_env, *setting.aliases):
            assert f"`{name}`" in readme, f"README's settings table does not mention {name}"


def test_cli_help_explains_every_command():
    for command in ("serve", "generate", "convert"):
        out = subprocess.run([sys.executable, "-m", "kiln.cli", command, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "usage: kiln " + command in out and len(out) > 200
    bad = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "--kv-cache-bytes", "lots"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a size" in bad.stderr


# -- one server with a key, small limits and a deadline ----------------------------------

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    proc = KilnProcess(tmp_path_factory.mktemp("guarded"), "--max-concurrent-requests", "2",
                       "--request-timeout", "4", "--max-body-bytes", "64K", env={"KILN_API_KEY": KEY})
    yield proc
    proc.stop()


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _complete(base: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"prompt": "Tell me about rivers.", "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, headers=_auth(), timeout=60)


def test_api_key_is_required_except_for_health(guarded):
    base = guarded.base_url
    body = {"prompt": "hi", "max_tokens": 2}
    missing = httpx.post(f"{base}/v1/completions", json=body)
    wrong = httpx.post(f"{base}/v1/completions", json=body, headers=_auth("nope"))
    for r in (missing, wrong):
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.post(f"{base}/v1/completions", json=body, headers=_auth()).status_code == 200


def test_body_over_the_limit_is_413(guarded):
    r = httpx.post(f"{guarded.base_url}/v1/completions", headers=_auth(),
                   json={"prompt": "x" * 70_000, "max_tokens": 1})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert _complete(guarded.base_url).status_code == 200


def test_flood_gets_429_while_admitted_requests_finish(guarded):
    alone = _complete(guarded.base_url, max_tokens=24, ignore_eos=True).json()["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _complete(guarded.base_url, max_tokens=24, ignore_eos=True), range(8)))
    codes = [r.status_code for r in results]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    for r in results:
        if r.status_code == 429:
            assert r.headers.get("retry-after") and r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["text"] == alone


def test_request_deadline_ends_a_long_request(guarded):
    start = time.monotonic()
    r = _complete(guarded.base_url, max_tokens=4000, ignore_eos=True)
    elapsed = time.monotonic() - start
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
    assert elapsed < 20
    metrics = httpx.get(f"{guarded.base_url}/metrics", headers=_auth()).text
    assert re.search(r"^kiln_num_requests_running 0\.0$", metrics, re.M)


# -- SIGTERM: drain and exit 0 ----------------------------------------------------------


def test_sigterm_lets_a_long_generation_finish_and_exits_zero(tmp_path):
    proc = KilnProcess(tmp_path, "--shutdown-grace", "60")
    try:
        body = {"prompt": "Count to a thousand:", "max_tokens": 120, "ignore_eos": True,
                "temperature": 0, "stream": True}
        chunks: list[dict] = []
        with httpx.Client(timeout=120) as client, client.stream("POST", f"{proc.base_url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 3:
                        break
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            # draining: health says so, new work is refused, the stream goes on
            assert httpx.get(f"{proc.base_url}/health", timeout=10).status_code == 503
            refused = httpx.post(f"{proc.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            assert refused.status_code == 503
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.proc.wait(timeout=60) == 0, proc.log()
    finally:
        proc.stop()


# -- schemathesis against the server's own schema ---------------------------------------


def test_schemathesis_finds_no_server_errors(tmp_path):
    # `make test` runs the venv's python without activating the venv: look beside it first.
    bindir = Path(sys.executable).parent
    st = next((str(bindir / n) for n in ("st", "schemathesis") if (bindir / n).is_file()), None)
    st = st or shutil.which("st") or shutil.which("schemathesis")
    assert st, "schemathesis is a dev dependency"
    # a short context keeps every generated request quick
    proc = KilnProcess(tmp_path, "--max-model-len", "32")
    try:
        out = subprocess.run(
            [st, "run", f"{proc.base_url}/openapi.json", "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", "25", "--phases", "examples,fuzzing", "--workers", "1",
             "--generation-deterministic", "--request-timeout", "60"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:] + proc.log()
        assert httpx.get(f"{proc.base_url}/health").status_code == 200
    finally:
        proc.stop()


@pytest.mark.parametrize("setting", ["tcmalloc", "system"])
def test_serve_restarts_with_tcmalloc_when_installed(setting):
    """`kiln serve` re-executes itself with tcmalloc preloaded when the library is on the
    machine (and KILN_MALLOC does not say `system`); the restarted process runs the same
    command line and does not restart again."""
    from kiln.cli import _TCMALLOC_PATHS

    installed = any(Path(p).exists() for p in _TCMALLOC_PATHS)
    probe = ("import os, sys; from kiln.cli import _reexec_with_tcmalloc; _reexec_with_tcmalloc(); "
             "print(os.getpid(), 'tcmalloc' in open('/proc/self/maps').read(), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["KILN_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", probe, "x", "y"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split(maxsplit=1)
    assert out[1].strip() == f"{installed and setting == 'tcmalloc'} ['x', 'y']"
