"""The SageMaker training contract: where inputs are, where outputs go, how hosts are wired.

SageMaker starts the container as `docker run IMAGE train` with this tree under /opt/ml:
  input/config/hyperparameters.json   {"name": "value"}, every value a string
  input/config/resourceconfig.json    {"current_host": "algo-1", "hosts": ["algo-1", ...]}
  input/data/<channel>/               one folder per data channel (also SM_CHANNEL_<NAME>)
  model/                              what is uploaded as model.tar.gz when the job succeeds
  checkpoints/                        synced to S3; restored there when a (spot) job restarts
  output/failure                      the reason shown as FailureReason when the job fails
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SageMakerPaths:
    root: Path

    @property
    def hyperparameters(self) -> Path:
        return self.root / "input" / "config" / "hyperparameters.json"

    @property
    def resourceconfig(self) -> Path:
        return self.root / "input" / "config" / "resourceconfig.json"

    @property
    def data(self) -> Path:
        return self.root / "input" / "data"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def failure(self) -> Path:
        return self.root / "output" / "failure"


def read_hyperparameters(paths: SageMakerPaths) -> dict[str, Any]:
    if not paths.hyperparameters.is_file():
        return {}
    try:
        raw = json.loads(paths.hyperparameters.read_text() or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{paths.hyperparameters}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{paths.hyperparameters}: must hold a JSON object")
    return raw


def channels(paths: SageMakerPaths, environ: dict[str, str] | None = None) -> dict[str, Path]:
    """Channel name → folder: folders under input/data, overridden by SM_CHANNEL_<NAME>."""
    env = os.environ if environ is None else environ
    found: dict[str, Path] = {}
    if paths.data.is_dir():
        found.update({p.name: p for p in sorted(paths.data.iterdir()) if p.is_dir()})
    for key, value in env.items():
        if key.startswith("SM_CHANNEL_") and value:
            found[key[len("SM_CHANNEL_"):].lower()] = Path(value)
    return found


def channel_path(paths: SageMakerPaths, name: str, environ: dict[str, str] | None = None) -> Path:
    available = channels(paths, environ)
    if name in available:
        return available[name]
    if len(available) == 1:  # a job with one channel, whatever it is called
        return next(iter(available.values()))
    listed = ", ".join(sorted(available)) or "none"
    raise ValueError(f"no data channel {name!r} under {paths.data} (channels: {listed}); "
                     "set the 'channel' hyperparameter")


def write_failure(paths: SageMakerPaths, reason: str) -> None:
    """SageMaker shows the start of this file as the job's FailureReason."""
    paths.failure.parent.mkdir(parents=True, exist_ok=True)
    paths.failure.write_text(reason if reason.endswith("\n") else reason + "\n")


@dataclass(frozen=True)
class ResourceConfig:
    current_host: str
    hosts: list[str]

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)


def read_resourceconfig(paths: SageMakerPaths) -> ResourceConfig | None:
    if not paths.resourceconfig.is_file():
        return None
    raw = json.loads(paths.resourceconfig.read_text())
    hosts = list(raw.get("hosts") or [])
    current = raw.get("current_host")
    if not hosts or current not in hosts:
        raise ValueError(f"{paths.resourceconfig}: current_host {current!r} is not among hosts {hosts}")
    return ResourceConfig(current_host=current, hosts=sorted(hosts))


def gpus_per_host() -> int:
    if os.environ.get("SM_NUM_GPUS"):
        return int(os.environ["SM_NUM_GPUS"])
    import torch

    return torch.cuda.device_count()


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(resources: ResourceConfig | None, nproc_per_node: int, train_args: list[str],
                     master_port: int = 29500, python: str = sys.executable) -> list[str] | None:
    """The torchrun command that starts this host's share of a multi-process job, or None when
    one process is enough (one host, at most one GPU). Every host runs the same command with its
    own --node-rank; the first host (sorted, as SageMaker names them algo-1..n) is the master."""
    nnodes = len(resources.hosts) if resources else 1
    nproc = max(1, nproc_per_node)
    if nnodes == 1 and nproc == 1:
        return None
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        assert resources is not None
        cmd += [f"--node-rank={resources.node_rank}", f"--master-addr={resources.hosts[0]}",
                f"--master-port={master_port}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "kiln.cli", "train", *train_args]
