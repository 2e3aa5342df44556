"""Regenerate the Python code for the hashmesh contract.

Run from anywhere: ``python protos/generate.py``. The output (``*_pb2.py``, ``*_pb2_grpc.py``
and their ``.pyi`` stubs) lands beside the ``.proto`` files in ``protos/hashmesh/v1`` and is
committed; CI runs this script and fails when it changes anything. Compiling with
``-I protos`` keeps generated imports as ``from hashmesh.v1 import ...`` with no rewriting.

Besides the code, it writes ``descriptors.binpb``: a FileDescriptorSet of the contract and its
imports *with source info* (the comments), which the servers answer reflection from, so a
reflecting client (grpcurl ``describe``) shows each method's documentation. Before compiling,
it rewrites each service's generated "Errors" comment block and ``docs/errors.md`` from the
error catalogue (``hashmesh.core.catalogue``), so the three never disagree.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
PACKAGE = PROTOS / "hashmesh" / "v1"
DESCRIPTORS = PACKAGE / "descriptors.binpb"
ERRORS_DOC = PROTOS.parent / "docs" / "errors.md"


def write_catalogue() -> None:
    """The catalogue's comment block into each service's comment, and docs/errors.md."""
    from hashmesh.core import catalogue

    for proto in sorted(PACKAGE.glob("*.proto")):
        text = proto.read_text()
        updated = catalogue.with_error_blocks(text)
        if updated != text:
            proto.write_text(updated)
    ERRORS_DOC.write_text(catalogue.markdown())


def main() -> int:
    plugin = shutil.which("protoc-gen-mypy") or str(Path(sys.executable).parent / "protoc-gen-mypy")
    grpc_plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    write_catalogue()
    for stale in PACKAGE.glob("*_pb2*.py*"):
        stale.unlink()
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}",
        f"--python_out={PROTOS}",
        f"--mypy_out={PROTOS}",
        f"--grpc_python_out={PROTOS}",
        f"--mypy_grpc_out={PROTOS}",
        f"--descriptor_set_out={DESCRIPTORS}",
        "--include_imports",
        "--include_source_info",
        *sorted(str(p.relative_to(PROTOS)) for p in PACKAGE.glob("*.proto")),
    ]
    code = protoc.main(args)
    if code != 0:
        print("protoc failed", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
