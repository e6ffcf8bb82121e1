"""Measure the float32 noise floor that the export parity gate sits on.

For one variant with offline weights (optionally with another residual gamma or logit scale),
compare on the sample photographs: ONNX Runtime, Paddle Inference with its reference CPU
kernels, Paddle Inference with oneDNN, and a float64 run of the same Paddle network. Prints
max |Δprob| for each pair, and the logit-level figures.

    python benchmarks/float32_noise.py HRNet_W32_C --residual-gamma 0.1 --logit-std 2
"""

from __future__ import annotations

import argparse
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def onnx_with_contract_names(model, work: Path) -> Path:
    """paddle2onnx's model of ``model`` (logits, no softmax), its input and output given the names
    ``OnnxRuntimeRunner`` feeds and reads."""
    import onnx

    from hrnet_build import export
    from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME

    raw = export._paddle2onnx(model, work / "raw.onnx")
    graph = raw.graph
    initializers = {i.name for i in graph.initializer}
    (image,) = [i for i in graph.input if i.name not in initializers]
    for tensor, name in ((image, INPUT_NAME), (graph.output[0], OUTPUT_NAME)):
        if tensor.name != name:
            export._rename(graph, tensor.name, name)
    onnx.save(raw, work / "m.onnx")
    return work / "m.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant")
    ap.add_argument("--residual-gamma", type=float, help="override calibrate.RESIDUAL_GAMMA")
    ap.add_argument("--logit-std", type=float, help="override calibrate.LOGIT_STD")
    args = ap.parse_args()

    import paddle

    from hrnet_build import calibrate, export, weights
    from hrnet_core import variants
    from hrnet_core.contract import INPUT_NAME
    from hrnet_core.preprocess import preprocess_files
    from hrnet_core.runtime import OnnxRuntimeRunner
    from hrnet_core.samples import sample_images

    if args.residual_gamma is not None:
        calibrate.RESIDUAL_GAMMA = args.residual_gamma
    if args.logit_std is not None:
        calibrate.LOGIT_STD = args.logit_std
    x = preprocess_files(sample_images())
    net = calibrate.offline_model(variants.get(args.variant), with_softmax=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = paddle.static.InputSpec([None, 3, 224, 224], "float32", INPUT_NAME)
        paddle.jit.save(net, str(work / "inference"), input_spec=[spec])
        model = weights.find_inference_model(work)
        logits = {
            "onnxruntime": OnnxRuntimeRunner(onnx_with_contract_names(model, work)).run(x),
            "paddle (reference kernels)": export.PaddleInferenceRunner(model, onednn=False).run(x),
            "paddle (oneDNN)": export.PaddleInferenceRunner(model, onednn=True).run(x),
        }
    with paddle.no_grad():
        logits["float64"] = net.to(dtype="float64")(paddle.to_tensor(x.astype("float64"))).numpy()
    probs = {k: softmax(v.astype(np.float64)) for k, v in logits.items()}
    top1 = probs["float64"].max(axis=1)
    print(
        f"{args.variant}: residual gamma {calibrate.RESIDUAL_GAMMA}, logit std {calibrate.LOGIT_STD} "
        f"(measured {logits['float64'].std():.2f}); top-1 probability {top1.min():.3f}..{top1.max():.3f}"
    )
    print("| pair | max abs Δprob | max abs Δlogit |\n| --- | ---: | ---: |")
    for a, b in combinations(probs, 2):
        print(f"| {a} vs {b} | {np.abs(probs[a] - probs[b]).max():.1e} | {np.abs(logits[a] - logits[b]).max():.1e} |")


if __name__ == "__main__":
    main()
