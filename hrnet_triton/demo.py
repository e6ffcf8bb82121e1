"""The main job (``make demo``): export HRNet_W18_C, write the cpu repository, serve it on a local
Triton server, and classify the sample photographs over HTTP and over gRPC."""

from __future__ import annotations

import sys
from pathlib import Path

from hrnet_build.export import export_onnx
from hrnet_build.repository import Target, write_repository
from hrnet_build.weights import WeightsSpec
from hrnet_client.classify import format_predictions
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.samples import sample_images

from .server import LocalTritonServer, Ports, sigterm_as_interrupt


def run(
    variant_name: str,
    out: Path,
    *,
    ports: Ports,
    serve_env: Path,
    top_k: int = 3,
    keep_serving: bool = False,
    progress: bool = True,
) -> int:
    """Run the demo, printing as it goes; return the exit code."""
    variant = variants.get(variant_name)
    onnx = out / f"{variant.name}.onnx"
    if not onnx.is_file():
        m = export_onnx(variant, WeightsSpec.parse("offline"), onnx, progress=progress)
        print(f"exported {onnx} (offline weights): {m.parity.summary()}")
    repo = out / "repository-cpu"
    write_repository(Target.CPU, [variant], repo, onnx_dir=out)
    sigterm_as_interrupt()
    server = LocalTritonServer(repo, serve_env=serve_env, ports=ports, log_file=out / "triton.log")
    try:
        server.start()
        print(
            f"Triton {variant.name} (cpu target) at HTTP {server.http_url}, gRPC 127.0.0.1:{ports.grpc}; "
            f"log {out / 'triton.log'}"
        )
        for protocol, port in (("http", ports.http), ("grpc", ports.grpc)):
            with TritonClassifier(f"127.0.0.1:{port}", variant.name, protocol) as classifier:
                preds = classifier.classify_files(sample_images(), k=top_k)
            print(f"\n== over {protocol.upper()} ==\n{format_predictions(preds)}", flush=True)
        print("\nNOTE: offline weights: these labels are meaningless (export with --weights auto for real ones).")
        if keep_serving:
            print(f"still serving at {server.http_url}; Ctrl-C stops it", flush=True)
            server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        print("Triton stopped", file=sys.stderr)
