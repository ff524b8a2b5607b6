"""Regenerate the committed protobuf/gRPC code under edge_agent/contract/_proto from protos/.

    python scripts/gen_protos.py          # write the generated files
    python scripts/gen_protos.py --check  # fail (exit 1) if the committed files differ

The .proto files are mapped into the virtual path edge_agent/contract/_proto/ so that the generated gRPC module
imports its message module by an absolute path inside the agent package.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT_PACKAGE = "edge_agent/contract/_proto"


def _mypy_plugin(name: str) -> str:
    # The plugins come with mypy-protobuf, next to the interpreter, which need not be on PATH.
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]'")
    return found


def generate(out_root: Path) -> list[Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {PROTOS}")
    virtual = [f"{OUT_PACKAGE}/{p.relative_to(PROTOS).as_posix()}" for p in sources]
    args = [
        "grpc_tools.protoc",
        f"-I{OUT_PACKAGE}={PROTOS}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={_mypy_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_mypy_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *virtual,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in (out_root / OUT_PACKAGE).rglob("*") if p.suffix in {".py", ".pyi"})
    for directory in {p.parent for p in generated} | {out_root / OUT_PACKAGE}:
        current = directory
        while current != out_root and current != out_root / "edge_agent" / "contract":
            init = current / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated protobuf code; regenerate with scripts/gen_protos.py."""\n')
            current = current.parent
    return sorted(p for p in (out_root / OUT_PACKAGE).rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        rel = [f.relative_to(tmp) for f in files]
        if args.check:
            stale = [
                str(r)
                for r in rel
                if not (ROOT / r).exists() or not filecmp.cmp(Path(tmp) / r, ROOT / r, shallow=False)
            ]
            committed = {p.relative_to(ROOT) for p in (ROOT / OUT_PACKAGE).rglob("*") if p.suffix in {".py", ".pyi"}}
            stale += [str(r) for r in committed - set(rel)]
            if stale:
                print("generated protobuf code is stale; run python scripts/gen_protos.py:", *stale, sep="\n  ")
                return 1
            print(f"generated protobuf code is current ({len(rel)} files)")
            return 0
        shutil.rmtree(ROOT / OUT_PACKAGE, ignore_errors=True)
        for r in rel:
            (ROOT / r).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(tmp) / r, ROOT / r)
        print(f"wrote {len(rel)} files under {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
