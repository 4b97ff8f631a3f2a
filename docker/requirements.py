"""Print kiln's pinned requirements from pyproject.toml, one per line, for the Dockerfiles.

The images install torch first (Dockerfile.gpu: PyPI's CUDA build; Dockerfile.neuron: the torch
that torch-neuronx pins) and then kiln with --no-deps plus this list, so pyproject.toml stays the
one place where kiln's pins live:

    python docker/requirements.py --extra gpu --exclude torch --exclude triton
    python docker/requirements.py --extra neuron --exclude torch --exclude triton --defer-to sdk.txt

--exclude NAME     leave NAME out (installed separately, with its own reasoning)
--defer-to FILE    `pip freeze` output of what is already installed (the Neuron SDK): a package
                   listed there is printed without kiln's version, so that installing this list
                   together with `-c FILE` keeps the SDK's version rather than fighting it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return canonical(match.group(1))


def unpinned(requirement: str) -> str:
    """`numpy==2.4.6; marker` -> `numpy; marker` (extras kept, the version left to pip)."""
    spec, sep, marker = requirement.partition(";")
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?)", spec)
    assert match is not None
    return match.group(1) + (f";{marker}" if sep else "")


def frozen_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            names.add(requirement_name(line.split("@")[0]))
    return names


def requirements(pyproject: dict, extras: list[str], exclude: set[str], defer_to: set[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r} (extras: {', '.join(sorted(optional))})")
        reqs += optional[extra]
    out: list[str] = []
    seen: set[str] = set()
    for req in reqs:
        name = requirement_name(req)
        if name in exclude:
            continue
        line = unpinned(req) if name in defer_to else req.strip()
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--defer-to", type=Path, default=None)
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(args.pyproject.read_text())
    defer = frozen_names(args.defer_to.read_text()) if args.defer_to else set()
    try:
        lines = requirements(pyproject, args.extra, {canonical(n) for n in args.exclude}, defer)
    except ValueError as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
