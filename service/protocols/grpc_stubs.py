"""Writes grpc_predict_v2_pb2.py and grpc_predict_v2_pb2_grpc.py beside the .proto, with
grpcio-tools (a dev dependency; the server needs only grpcio and protobuf):

    python -m segserve.service.protocols.grpc_stubs [--out DIR]

protoc names imports by the .proto's path under its include root, so the file is laid out
under segserve/service/protocols/ in a scratch folder first: the generated modules then
import each other as segserve.service.protocols.grpc_predict_v2_pb2, wherever they live.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "segserve" / "service" / "protocols"
        package.mkdir(parents=True)
        shutil.copy(HERE / PROTO, package / PROTO)
        rel = f"segserve/service/protocols/{PROTO}"
        code = protoc.main(
            ["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", rel]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO} ({code})")
        written = []
        for name in GENERATED:
            target = Path(out) / name
            shutil.copy(package / name, target)
            written.append(target)
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
