"""The export stage's edits of an ONNX graph, on the ``onnx`` protobuf alone (no runtime, no Paddle).

- :func:`standardise`: the single input and output get the contract's stable names
  (:mod:`hrnet_core.contract`) and a named dynamic batch dimension;
- :func:`io_specs`: the input and output as :class:`~hrnet_core.manifest.TensorSpec`, checked;
- :func:`prepend_normalisation`: the ``uint8`` entry point (docs/export.md, "The uint8 models"): the
  float model's input ``x`` becomes the 8-bit crop, UINT8 NHWC [batch, 224, 224, 3], and the first
  nodes compute PaddleClas's ``(x * float32(scale) - mean) / std`` in float32 and the transpose to
  NCHW (:func:`normalisation_nodes`), the very operations of :func:`hrnet_core.preprocess.normalize_chw`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from hrnet_core.contract import (
    CHANNELS,
    CROP_SIZE,
    DEFAULT_PREPROCESS,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    PreprocessConfig,
)
from hrnet_core.errors import ExportError
from hrnet_core.manifest import TensorSpec

BATCH_DIM = "batch"
TENSOR_INPUT = TensorSpec(INPUT_NAME, "float32", (-1, CHANNELS, CROP_SIZE, CROP_SIZE))
UINT8_INPUT = TensorSpec(INPUT_NAME, "uint8", (-1, CROP_SIZE, CROP_SIZE, CHANNELS))
OUTPUT = TensorSpec(OUTPUT_NAME, "float32", (-1, NUM_CLASSES))
NORMALISED = "uint8/normalised"  # the float32 NCHW tensor the first nodes of a uint8 model compute
INPUT_KIND_KEY = "input_kind"  # the metadata_props key a uint8 model carries ("uint8")


def rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new


def standardise(model, name: str, metadata: dict[str, str]):
    """Give the single input and output of ``name``'s model their stable names and a named dynamic
    batch dimension, and make ``metadata`` its ``metadata_props``."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"{name}: expected one image input and one output, found inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}"
        )
    taken = {n for node in graph.node for n in [*node.input, *node.output]} | initializers
    for tensor, stable in ((inputs[0], INPUT_NAME), (graph.output[0], OUTPUT_NAME)):
        if tensor.name != stable:
            if stable in taken:
                raise ExportError(f"{name}: cannot rename {tensor.name!r} to {stable!r}: the name is in use")
            rename(graph, tensor.name, stable)
        dim0 = tensor.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value") and dim0.dim_value > 0:
            raise ExportError(
                f"{name}: {stable} has a fixed batch size of {dim0.dim_value}; the inference model "
                "must be exported with a dynamic batch dimension (InputSpec shape [None, 3, 224, 224])"
            )
        dim0.dim_param = BATCH_DIM
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model


def io_specs(model, want_in: TensorSpec = TENSOR_INPUT) -> tuple[TensorSpec, TensorSpec]:
    """The model's input and output specs; :class:`ExportError` unless they are ``want_in`` and :data:`OUTPUT`."""
    import onnx

    def spec(vi) -> TensorSpec:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    in_spec = spec(next(i for i in graph.input if i.name not in initializers))
    out_spec = spec(graph.output[0])
    if (in_spec, out_spec) != (want_in, OUTPUT):
        raise ExportError(f"the ONNX model's tensors are {in_spec} -> {out_spec}; expected {want_in} -> {OUTPUT}")
    return in_spec, out_spec


def uint8_path(float_onnx: str | os.PathLike[str]) -> Path:
    """``HRNet_W18_C.onnx`` -> ``HRNet_W18_C_uint8.onnx``, beside it."""
    p = Path(float_onnx)
    return p.with_name(f"{p.stem}_uint8{p.suffix}")


def normalisation_nodes(cfg: PreprocessConfig = DEFAULT_PREPROCESS, output: str = NORMALISED) -> tuple[list, list]:
    """PaddleClas's NormalizeImage + ToCHWImage as ONNX nodes and initializers: UINT8 NHWC ``x`` ->
    Cast -> Mul(scale) -> Sub(mean) -> Div(std) -> Transpose -> float32 NCHW ``output``. The
    constants are float32 exactly as ``normalize_chw`` rounds them, and the operations are in its order."""
    from onnx import TensorProto, helper, numpy_helper

    consts = {
        "uint8/scale": np.array(np.float32(cfg.scale)),
        "uint8/mean": np.array(cfg.mean).reshape(1, 1, 1, CHANNELS).astype(np.float32),
        "uint8/std": np.array(cfg.std).reshape(1, 1, 1, CHANNELS).astype(np.float32),
    }
    chain = [("Cast", "uint8/float"), ("Mul", "uint8/scaled"), ("Sub", "uint8/centred"), ("Div", "uint8/nhwc")]
    nodes, prev = [], INPUT_NAME
    for (op, name), const in zip(chain, [None, *consts]):
        attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [prev, const] if const else [prev], [name], name=name, **attrs))
        prev = name
    nodes.append(helper.make_node("Transpose", [prev], [output], name="uint8/nchw", perm=[0, 3, 1, 2]))
    return nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()]


def prepend_normalisation(model, cfg: PreprocessConfig = DEFAULT_PREPROCESS):
    """Make a float model's input ``x`` the UINT8 NHWC crop, normalised by :func:`normalisation_nodes`
    (in place; returns ``model``). Its other names, its output and its metadata stay, and the
    metadata gains ``input_kind=uint8``."""
    from onnx import TensorProto

    io_specs(model)  # a float model with the contract's tensors, or ExportError
    graph = model.graph
    nodes, consts = normalisation_nodes(cfg)
    taken = {n for node in graph.node for n in [*node.input, *node.output]} | {i.name for i in graph.initializer}
    if clash := taken & ({n for node in nodes for n in node.output} | {c.name for c in consts}):
        raise ExportError(f"the float model already has tensors named {sorted(clash)}; rename them before this edit")
    original = [copy.deepcopy(n) for n in graph.node]
    for node in original:  # the network now reads the normalised tensor
        node.input[:] = [NORMALISED if n == INPUT_NAME else n for n in node.input]
    del graph.node[:]
    graph.node.extend([*nodes, *original])
    graph.initializer.extend(consts)
    tensor = next(i for i in graph.input if i.name == INPUT_NAME).type.tensor_type
    tensor.elem_type = TensorProto.UINT8
    for dim, size in zip(tensor.shape.dim[1:], UINT8_INPUT.dims[1:]):
        dim.dim_value = size
    model.metadata_props.add(key=INPUT_KIND_KEY, value="uint8")
    return model
