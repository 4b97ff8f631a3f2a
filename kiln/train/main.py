"""`kiln train`: options from flags (and SageMaker hyperparameters), launch, train, report.

Exit status: 0 when training finished, 143 when stopped by SIGTERM (checkpoint and adapter
saved), 1 on error (and, under the SageMaker contract, the reason in SM_ROOT/output/failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from . import sagemaker as sm
from .data import DataError
from .options import DEFAULT_SM_ROOT, TrainOptions, add_arguments, from_hyperparameters, merge, options_from_args

EXIT_OK, EXIT_ERROR, EXIT_SIGTERM = 0, 1, 143

DESCRIPTION = """\
Fine-tune the base model with LoRA (or QLoRA) on JSON-lines data and write a PEFT adapter.
Each line is {"prompt": ..., "completion": ...} or {"messages": [...]}; the loss is taken on
the completion / assistant tokens only. A progress line per log step goes to stdout:
  step=3/10 loss=2.3456 lr=2.000e-04 tokens_per_s=812.3 epoch=0.30
With --sagemaker (automatic when SM_ROOT/input/config/hyperparameters.json exists) the
SageMaker training contract is followed: hyperparameters and data channels from SM_ROOT/input,
adapter to SM_ROOT/model, checkpoints to SM_ROOT/checkpoints, errors to SM_ROOT/output/failure.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser("train", help="fine-tune a LoRA adapter (SageMaker training contract)",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def to_argv(flags: dict[str, Any]) -> list[str]:
    """Rebuild `kiln train` arguments from explicit flags (to start the same run under torchrun)."""
    hints = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    argv: list[str] = []
    for name, value in flags.items():
        if value is None:
            continue
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            if value != hints[name]:
                argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def contract_paths(flags: dict[str, Any]) -> sm.SageMakerPaths | None:
    """The SageMaker tree when the contract applies: --sagemaker, or hyperparameters.json exists."""
    paths = sm.SageMakerPaths(Path(flags.get("sm_root") or DEFAULT_SM_ROOT))
    return paths if flags.get("sagemaker") or paths.hyperparameters.is_file() else None


def resolve(flags: dict[str, Any]) -> tuple[TrainOptions, sm.SageMakerPaths | None]:
    """Final options and, under the SageMaker contract, its paths."""
    paths = contract_paths(flags)
    if paths is None:
        return merge(flags), None
    opts = merge(flags, from_hyperparameters(sm.read_hyperparameters(paths)))
    opts.sagemaker = True
    opts.sm_root = str(paths.root)
    if not opts.data:
        opts.data = str(sm.channel_path(paths, opts.channel))
    opts.out = opts.out or str(paths.model)
    opts.checkpoint_dir = opts.checkpoint_dir or str(paths.checkpoints)
    return opts, paths


def run(args: argparse.Namespace) -> int:
    flags = options_from_args(args)
    paths = contract_paths(flags)  # known before anything can fail, for the failure file
    try:
        opts, paths = resolve(flags)
        opts.validate()
        if paths is not None and not sm.under_launcher():
            cmd = sm.torchrun_command(sm.read_resourceconfig(paths), sm.gpus_per_host(),
                                      to_argv({**flags, "sagemaker": True, "sm_root": str(paths.root)}))
            if cmd is not None:
                print("kiln train: launching " + " ".join(cmd), flush=True)
                os.execv(cmd[0], cmd)  # SIGTERM then reaches torchrun, which forwards it
        from .trainer import train

        result = train(opts)
        return EXIT_SIGTERM if result.interrupted else EXIT_OK
    except Exception as exc:  # every failure becomes a message, a failure file and exit 1
        reason = str(exc) if isinstance(exc, (DataError, ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {exc}"
        print(f"kiln train: error: {reason}", file=sys.stderr, flush=True)
        if not isinstance(exc, (DataError, ValueError, FileNotFoundError)):
            traceback.print_exc()
        if paths is not None:
            try:
                sm.write_failure(paths, reason + "\n\n" + traceback.format_exc())
            except OSError as write_exc:
                print(f"kiln train: could not write {paths.failure}: {write_exc}", file=sys.stderr)
        return EXIT_ERROR
