"""Regenerate the Python stubs in kiln/proto/ from the .proto files in proto/.

    python -m kiln.proto.generate [--out DIR]      (`make proto` runs this)

protoc writes `proto/kiln/v1/inference.proto` as `kiln/v1/inference_pb2.py` whose gRPC stub
imports it as `from kiln.v1 import inference_pb2`, an absolute path that would resolve
against kiln itself. The stubs are therefore written under kiln/proto/ in the same layout
(`kiln.proto.kiln.v1.inference_pb2`, `kiln.proto.inference.grpc_predict_v2_pb2`) and their
imports of each other are rewritten to relative imports; the descriptors keep their
canonical file names (`kiln/v1/inference.proto`), which is what reflection clients see.

Needs grpcio-tools (the dev extra). tests/test_grpc.py regenerates into a temporary folder
and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PACKAGE = "kiln.proto"
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
STUBS_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generated_files(root: Path = STUBS_ROOT) -> list[Path]:
    """The generated files under `root` (stubs and the __init__.py of their folders)."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)]
    folders = {d for p in files for d in p.parents if d != root and root in d.parents}
    files += [d / "__init__.py" for d in folders if (d / "__init__.py").is_file()]
    return sorted(files)


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs of every .proto under `proto_root` into `out`; return their paths."""
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    sources = proto_files(proto_root)
    if not sources:
        raise SystemExit(f"no .proto files under {proto_root}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(p) for p in sources)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    local = {_module(p.relative_to(proto_root)) for p in sources}  # e.g. "kiln.v1.inference_pb2"
    written = []
    for source in sources:
        rel = source.relative_to(proto_root).with_suffix("")
        for suffix in GENERATED_SUFFIXES:
            path = out / rel.parent / (rel.name + suffix)
            if path.is_file():
                path.write_text(_fix_imports(path.read_text(), _module(rel.with_suffix(".proto")), local))
                written.append(path)
        folder = out / rel.parent
        while folder != out:  # package markers for every folder between out/ and the stubs
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            if init not in written:
                written.append(init)
            folder = folder.parent
    return sorted(written)


def _module(proto_rel: Path) -> str:
    """proto path relative to the proto root -> protoc's Python module name."""
    return ".".join(proto_rel.with_suffix("").parts) + "_pb2"


def _fix_imports(text: str, this: str, local: set[str]) -> str:
    """Turn protoc's absolute imports of sibling stubs into relative ones, and give the
    message classes their real module path (so they pickle and repr correctly)."""
    here = this.split(".")[:-1]

    def relative(match: re.Match) -> str:
        pkg, name = match.group(2), match.group(3)
        target = f"{pkg}.{name}"
        if target not in local:
            return match.group(0)
        there = pkg.split(".")
        common = 0
        while common < min(len(here), len(there)) and here[common] == there[common]:
            common += 1
        dots = "." * (len(here) - common + 1)
        rest = ".".join(there[common:])
        return f"{match.group(1)}from {dots}{rest} import {name}"

    text = re.sub(r"^(\s*)from ([\w.]+) import (\w+_pb2)\b", relative, text, flags=re.M)
    text = text.replace(f"(DESCRIPTOR, '{this}', _globals)", f"(DESCRIPTOR, '{PACKAGE}.{this}', _globals)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=STUBS_ROOT, help="output folder [default: kiln/proto]")
    args = parser.parse_args(argv)
    if args.out.resolve() == STUBS_ROOT:
        for stale in generated_files(STUBS_ROOT):  # drop stubs of deleted .proto files
            if stale.name != "__init__.py":
                stale.unlink()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
