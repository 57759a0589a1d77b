"""Generate the Python stubs for protos/v1/*.proto, or check that the committed ones are current.

The .proto files import each other as ``loraplex/protos/v1/x.proto`` so that the generated modules
import ``loraplex.protos.v1`` without rewriting: we stage the sources under that path and compile there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent.parent / "protos" / "v1"
PACKAGE_PATH = Path("loraplex/protos/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto in PROTO_DIR into out_dir; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / "src" / PACKAGE_PATH
        staged.mkdir(parents=True)
        for proto in sorted(PROTO_DIR.glob("*.proto")):
            shutil.copy(proto, staged / proto.name)
        build = Path(staging) / "out"
        build.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{Path(staging) / 'src'}",
            f"-I{well_known}",
            f"--python_out={build}",
            f"--pyi_out={build}",
            f"--grpc_python_out={build}",
            *[str(PACKAGE_PATH / p.name) for p in sorted(staged.glob("*.proto"))],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for generated in sorted((build / PACKAGE_PATH).iterdir()):
            target = out_dir / generated.name
            shutil.copy(generated, target)
            written.append(target)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if not args.check:
        for path in generate(PROTO_DIR):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        stale = [
            p.name
            for p in generate(Path(fresh))
            if not (PROTO_DIR / p.name).exists() or (PROTO_DIR / p.name).read_bytes() != p.read_bytes()
        ]
    committed = {p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    expected = {p.stem for p in PROTO_DIR.glob("*.proto")}
    orphans = [n for n in committed if n.split("_pb2")[0] not in expected]
    if stale or orphans:
        print(f"generated stubs are stale: {stale + orphans}; run python -m loraplex.tools.gen_protos")
        return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
