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

from .server import LocalTritonServer, Ports, admin_key_notice, sigterm_as_interrupt


def run(
    variant_name: str,
    out: Path,
    *,
    ports: Ports,
    serve_env: Path,
    host: str = "127.0.0.1",
    admin_key: str | None = None,
    top_k: int = 3,
    keep_serving: bool = False,
    progress: bool = True,
) -> int:
    """Run the demo, printing as it goes; return the exit code.

    Its classification uses no admin API, so the admin key (``admin_key``, else
    ``$HRNET_TRITON_ADMIN_KEY``, else a random one) is printed only with ``keep_serving``.
    """
    variant = variants.get(variant_name)
    onnx = out / f"{variant.name}.onnx"
    if not onnx.is_file() or not onnx.with_name(f"{variant.name}_uint8.onnx").is_file():
        m = export_onnx(variant, WeightsSpec.parse("offline"), onnx, progress=progress)
        print(f"exported {onnx} (offline weights): {m.parity.summary()}")
    repo = out / "repository-cpu"
    write_repository(Target.CPU, [variant], repo, onnx_dir=out)
    sigterm_as_interrupt()
    server = LocalTritonServer(
        repo, serve_env=serve_env, ports=ports, log_file=out / "triton.log", host=host, admin_key=admin_key
    )
    try:
        server.start()
        print(
            f"Triton {variant.name} (cpu target) listening on {host}: HTTP {server.http_url}, "
            f"gRPC {server.connect_host}:{ports.grpc}; log {out / 'triton.log'}"
        )
        # All three entry points (docs/inputs.md), over both protocols: the same answers.
        for protocol, port, kind in (
            ("http", ports.http, "image"),
            ("grpc", ports.grpc, "uint8"),
            ("http", ports.http, "tensor"),
        ):
            with TritonClassifier(f"{server.connect_host}:{port}", variant.name, protocol, input=kind) as classifier:
                preds = classifier.classify_files(sample_images(), k=top_k)
            sent = f"{classifier.model}, input {classifier.input.describe()}"
            print(f"\n== over {protocol.upper()}, {kind} input ==\n{sent}\n{format_predictions(preds)}", flush=True)
        print("\nNOTE: offline weights: these labels are meaningless (export with --weights auto for real ones).")
        if keep_serving:
            notice = admin_key_notice(server)
            if notice:
                print(notice, file=sys.stderr)
            print(f"still serving at {server.http_url}; Ctrl-C stops it", flush=True)
            server.wait()  # returns only by raising: tritonserver ended by itself
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        print("Triton stopped", file=sys.stderr)
