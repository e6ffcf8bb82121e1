"""On-paper GPU memory budget of the gpu target: weights, activations and scratch per variant.

For each distinct architecture, builds the Paddle network with random weights, converts it to
ONNX the way ``hrnet_build.export`` does (``paddle.jit.save`` with a dynamic batch, then
paddle2onnx at opset 17), infers the shapes at batch 1 and runs a liveness analysis over the
graph's node order: the peak bytes of the activation tensors alive at once, in FP16. Then it
prices one Triton model instance (``tensorrt_backend`` r24.10: each instance deserializes its own
engine and creates its own execution context) and chooses, per variant, the instance count and
max batch that let all ten models fit a 16 GB card. No GPU is needed. docs/gpu-memory.md
explains the method and the assumptions.

    python benchmarks/gpu_memory_budget.py
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
FP16 = 2
BATCHES = (1, 8, 16, 32)
CHANNEL_ALIGN = 8  # TensorRT's FP16 tensor-core formats (kHWC8 / kCHW16 ...) pad channels to 8 or more

# ONNX ops whose output TensorRT fuses into the producer (Conv+BN+ReLU, shuffles, casts): their
# output is the producer's buffer, so they extend its lifetime instead of allocating.
ALIASING_OPS = {"BatchNormalization", "Relu", "Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast"}
NON_ACTIVATION_OPS = {"Constant", "Shape"}

# Assumptions (docs/gpu-memory.md gives their sources).
SCRATCH_TYPICAL_MIB = 256  # tactic scratch per execution context, typical for convnets of this size
SCRATCH_WORST_MIB = 2048  # the builder's workspace limit (hrnet_build.engine.WORKSPACE_MIB) bounds it
PROCESS_MIB = 1024  # CUDA context + TensorRT/CUDA kernel modules + Triton's 64 MiB CUDA memory pool
GRAPH_EXEC_MIB = 2  # one instantiated CUDA graph of ~300-600 kernel nodes
EVENT_SET_COUNT = 3  # tensorrt_backend captures one graph per event set and graph spec
CUDA_GRAPH_SIZES = (1, 8, 16, 32)
INPUT_BYTES = 3 * 224 * 224 * 4  # FP32 image: the plan's I/O stays FP32
OUTPUT_BYTES = 1000 * 4
HEADROOM = 0.10
CARDS_MIB = {"T4 16 GB": 15_360, "V100 16 GB": 16_160}
LADDER = ((2, 32), (2, 16), (1, 32), (1, 16), (1, 8))  # from most to least memory per model


@dataclass(frozen=True)
class Arch:
    name: str
    width: int
    has_se: bool
    params: int
    act_elems: int  # peak live activation elements at batch 1, channels padded to CHANNEL_ALIGN
    act_elems_unpadded: int

    def weights_mib(self, bytes_per_param: int = FP16) -> float:
        return self.params * bytes_per_param / MIB

    def act_mib(self, batch: int, padded: bool = True) -> float:
        return (self.act_elems if padded else self.act_elems_unpadded) * batch * FP16 / MIB

    def instance_mib(self, max_batch: int, scratch_mib: float = SCRATCH_TYPICAL_MIB) -> float:
        """One model instance: its own engine (weights), its context (activations at the
        profile max + scratch), its I/O buffers and its CUDA graphs."""
        graphs = sum(1 for s in CUDA_GRAPH_SIZES if s <= max_batch) * EVENT_SET_COUNT * GRAPH_EXEC_MIB
        io = max_batch * (INPUT_BYTES + OUTPUT_BYTES) / MIB
        return self.weights_mib() + self.act_mib(max_batch) + scratch_mib + io + graphs


def export_graph(width: int, has_se: bool, work: Path):
    """The ONNX graph of the network, with random weights, as the export stage would convert it."""
    import onnx
    import paddle

    from hrnet_build import export, weights
    from hrnet_build.network import build, parameter_count
    from hrnet_core.contract import CHANNELS, CROP_SIZE, INPUT_NAME

    net = build(width, has_se, with_softmax=True)
    net.eval()
    params = parameter_count(net)
    spec = paddle.static.InputSpec([None, CHANNELS, CROP_SIZE, CROP_SIZE], "float32", INPUT_NAME)
    paddle.jit.save(net, str(work / "inference"), input_spec=[spec])
    del net
    model = export._paddle2onnx(weights.find_inference_model(work), work / "raw.onnx")
    for tensor in model.graph.input:
        tensor.type.tensor_type.shape.dim[0].dim_value = 1  # fixed batch 1; activations scale linearly
    del model.graph.value_info[:]
    # data_prop: the flatten before the FC layers reshapes to Shape->Slice->Concat of the batch
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True), params


def _elements(shape: list[int], padded: bool) -> int:
    if not shape or min(shape) < 1:
        raise ValueError(f"shape inference left a dimension unknown: {shape}")
    if padded and len(shape) == 4:
        shape = [shape[0], -(-shape[1] // CHANNEL_ALIGN) * CHANNEL_ALIGN, *shape[2:]]
    n = 1
    for d in shape:
        n *= d
    return n


def _buffers(model) -> tuple[dict[str, int], dict[str, int]]:
    """Every activation buffer (named after the tensor that allocates it): the node indices of
    its first and last use. A fused (aliasing) op's output extends its input's buffer."""
    graph = model.graph
    external = {t.name for t in graph.initializer} | {t.name for t in graph.input} | {t.name for t in graph.output}
    owner: dict[str, str] = {}  # tensor -> buffer (the name of the tensor that allocated it)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name in owner:
                last[owner[name]] = max(last[owner[name]], i)
        if node.op_type in NON_ACTIVATION_OPS:
            continue
        for out in node.output:
            if out in external:
                continue
            if node.op_type in ALIASING_OPS and node.input[0] in owner:
                owner[out] = owner[node.input[0]]
            else:
                owner[out] = out
                first[out], last[out] = i, i
    return first, last


def peak_live_elements(model, padded: bool) -> int:
    """The peak, over the node order, of the elements of all buffers alive at once (batch 1)."""
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.value_info, *model.graph.output)
    }
    first, last = _buffers(model)
    buffers = list(first)
    size = {b: _elements(shapes[b], padded) for b in buffers}
    delta = [0] * (len(model.graph.node) + 1)
    for b in buffers:
        delta[first[b]] += size[b]
        delta[last[b] + 1] -= size[b]
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


def analyse(names: list[str]) -> list[Arch]:
    from hrnet_core import variants

    archs = {v.arch: (v.width, v.has_se) for v in variants.VARIANTS}
    out = []
    for name in names or archs:
        width, has_se = archs[name]
        with tempfile.TemporaryDirectory(prefix="hrnet-budget-") as tmp:
            model, params = export_graph(width, has_se, Path(tmp))
        out.append(Arch(name, width, has_se, params, peak_live_elements(model, True), peak_live_elements(model, False)))
        del model
    return out


def arch_table(archs: list[Arch]) -> str:
    head = ["variant", "params (M)", "weights FP16 / FP32 (MiB)"]
    head += [f"act. b{b} (MiB)" for b in BATCHES]
    head += ["act. b32 unpadded", "1 instance @32 (MiB)", "2 instances @32 (MiB)", "2 @32, 2 GiB scratch"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in archs:
        cells = [a.name, f"{a.params / 1e6:.3f}", f"{a.weights_mib():.0f} / {a.weights_mib(4):.0f}"]
        cells += [f"{a.act_mib(b):.0f}" for b in BATCHES]
        cells += [f"{a.act_mib(32, padded=False):.0f}", f"{a.instance_mib(32):.0f}", f"{2 * a.instance_mib(32):.0f}"]
        cells.append(f"{2 * a.instance_mib(32, SCRATCH_WORST_MIB):.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def model_mib(arch: Arch, setting: tuple[int, int], scratch_mib: float = SCRATCH_TYPICAL_MIB) -> float:
    instances, max_batch = setting
    return instances * arch.instance_mib(max_batch, scratch_mib)


def total_mib(models: dict[str, Arch], settings: dict[str, tuple[int, int]], scratch_mib: float) -> float:
    return PROCESS_MIB + sum(model_mib(models[n], settings[n], scratch_mib) for n in settings)


def choose(models: dict[str, Arch], budget_mib: float) -> dict[str, tuple[int, int]] | None:
    """Start every model at 2 instances x 32; while over budget, move the model that takes the
    most memory one rung down LADDER. None if even the bottom rung does not fit."""
    rung = {name: 0 for name in models}
    while True:
        settings = {n: LADDER[r] for n, r in rung.items()}
        if total_mib(models, settings, SCRATCH_TYPICAL_MIB) <= budget_mib:
            return settings
        movable = [n for n, r in rung.items() if r < len(LADDER) - 1]
        if not movable:
            return None
        rung[max(movable, key=lambda n: model_mib(models[n], settings[n]))] += 1


def fitting_subset(models: dict[str, Arch], setting: tuple[int, int], budget_mib: float, scratch: float) -> list[str]:
    """The models that fit at ``setting``, smallest first."""
    chosen, used = [], PROCESS_MIB
    for name in sorted(models, key=lambda n: model_mib(models[n], setting, scratch)):
        if used + model_mib(models[name], setting, scratch) <= budget_mib:
            used += model_mib(models[name], setting, scratch)
            chosen.append(name)
    return chosen


def settings_table(models: dict[str, Arch], settings: dict[str, tuple[int, int]]) -> str:
    rows = ["| model | instances | max batch | MiB (256 MiB scratch) | MiB (2 GiB scratch) |", "|---|---|---|---|---|"]
    for name, s in settings.items():
        typical, worst = model_mib(models[name], s), model_mib(models[name], s, SCRATCH_WORST_MIB)
        rows.append(f"| {name} | {s[0]} | {s[1]} | {typical:.0f} | {worst:.0f} |")
    return "\n".join(rows)


def report_fit(models: dict[str, Arch]) -> None:
    current = {n: (2, 32) for n in models}
    for scratch in (SCRATCH_TYPICAL_MIB, SCRATCH_WORST_MIB):
        total = total_mib(models, current, scratch)
        print(f"today's settings (2 x 32 each), {scratch} MiB scratch per context: total {total:,.0f} MiB")
    card = min(CARDS_MIB, key=CARDS_MIB.get)
    budget = CARDS_MIB[card] * (1 - HEADROOM)
    print(f"\nbudget: {card}, {CARDS_MIB[card]:,} MiB less {HEADROOM:.0%} headroom = {budget:,.0f} MiB")
    settings = choose(models, budget)
    if settings is None:
        subset = fitting_subset(models, (1, 32), budget, SCRATCH_TYPICAL_MIB)
        print(f"all ten do not fit even at 1 x 8; the subset that fits at 1 x 32: {subset}")
        return
    print("\n" + settings_table(models, settings) + "\n")
    for scratch in (SCRATCH_TYPICAL_MIB, SCRATCH_WORST_MIB):
        total = total_mib(models, settings, scratch)
        verdicts = (
            f"{name} {'fits' if total <= mib * (1 - HEADROOM) else 'does NOT fit'}" for name, mib in CARDS_MIB.items()
        )
        print(f"chosen settings, {scratch} MiB scratch per context: total {total:,.0f} MiB ({', '.join(verdicts)})")
    worst = fitting_subset(models, (1, 32), budget, SCRATCH_WORST_MIB)
    print(f"if every context took the full 2 GiB workspace, only these fit (1 x 32 each): {worst}")
    print("\nGPU_TARGET_SETTINGS = {")
    for name, s in settings.items():
        print(f"    {name!r}: {s},")
    print("}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", help="architectures to analyse (default: all eight)")
    args = ap.parse_args()

    from hrnet_core import variants

    archs = analyse(args.archs)
    print(arch_table(archs) + "\n")
    by_arch = {a.name: a for a in archs}
    models = {v.name: by_arch[v.arch] for v in variants.VARIANTS if v.arch in by_arch}
    report_fit(models)


if __name__ == "__main__":
    main()
