"""Export a run's model to ONNX (fp32, or int8 by static quantization), checked against PyTorch before it is kept.

The file is self-contained: input `image` float32 (N, 1, 28, 28) in [0, 1] with a dynamic batch axis,
normalization inside the graph, output `probabilities` (N, K) with the calibration (logits divided by the run's
temperature, see digitkit.calibration) and the softmax inside the graph (so a consumer needs no digitkit and
no knowledge of the training statistics or calibration), and metadata holding the class names, the preprocessing
contract, the inference config and the checkpoint's SHA-256 (see digitkit.engine).

Nothing is written unless it passes: the candidate is built in a temporary folder beside the target, run on the
whole test split through ONNX Runtime and compared with the PyTorch model (fp32: identical predictions on at least
99.99% of images; int8: accuracy within `max_int8_accuracy_drop` of the fp32 model, and a graph that other runtimes
read as ONNX Runtime does, see `check_int8`), and only then renamed into place. int8 calibration reads training
images only (the run's own training portion, never validation or test).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digitkit import __version__
from digitkit.calibration import temperature_of
from digitkit.config import Config
from digitkit.engine import DEFAULT_FILE, EXPORT_DIR, FORMAT, INPUT_NAME, OUTPUT_NAME, OnnxModel
from digitkit.errors import ConfigError, DataError

INT8_METHOD = "MinMax ranges, S8S8 QDQ, per-channel weights, explicit Relu, float Gemm bias"
"""How `quantize` builds the int8 graph, as the report's calibration.method states it."""
DEFAULT_OPSET = 18
"""The opset the torch.export-based exporter emits natively; older ones go through ONNX's version converter."""
INPUT_CONTRACT = ("float32 (N, 1, {size}, {size}) in [0, 1]: white digit on black, centred by mass in a {box}x{box} "
                  "box (what digitkit.preprocess makes of any image); normalization is inside the graph")  # fmt: skip


@dataclass
class ExportOptions:
    int8: bool = False
    """Static int8 quantization (QDQ, per-channel weights), calibrated on training images."""
    opset: int = DEFAULT_OPSET
    calibration_images: int = 1000
    """Training images (stratified, seeded) the int8 calibration runs; never validation or test images."""
    calibration_seed: int = 0
    min_agreement: float = 0.9999
    """fp32: share of test images that must get the same prediction from ONNX Runtime as from PyTorch."""
    max_int8_accuracy_drop: float = 0.005
    """int8: largest accepted test-accuracy drop against the fp32 model, as a fraction (0.005 = 0.5 points). The
    aim is 0.001; the bound is looser so a borderline model still exports, with the drop in the report."""
    measure_speed: bool = True
    threads: int = 2
    """Intra-op threads for the batched speed figure (batch 1 is timed with 1 thread, as a server runs it)."""

    def __post_init__(self) -> None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not 13 <= self.opset <= newest:
            raise ConfigError(f"--opset {self.opset}: expected 13 to {newest} (this onnx package's newest); the "
                              f"default {DEFAULT_OPSET} is what the exporter writes natively")  # fmt: skip
        if self.calibration_images < 10:
            raise ConfigError(f"--calibration-images {self.calibration_images}: expected at least 10 (default 1000)")
        if not 0 < self.min_agreement <= 1 or not 0 <= self.max_int8_accuracy_drop < 1:
            raise ConfigError("min_agreement must be in (0, 1] and max_int8_accuracy_drop in [0, 1)")
        if self.threads < 1:
            raise ConfigError(f"threads = {self.threads}: expected a positive integer")


@dataclass
class ExportReport:
    out: str
    model: str
    checkpoint: str
    checkpoint_sha256: str
    precision: str
    """fp32 or int8."""
    opset: int
    size_bytes: int
    parity: dict[str, Any]
    """The exported file against PyTorch on the whole test split (see `parity`)."""
    seconds: float
    int8: dict[str, Any] | None = None
    """Size, accuracy and agreement of the int8 file against the fp32 export."""
    calibration: dict[str, Any] | None = None
    speed: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per engine: batch-1 latency p50/p99 (ms) and batch-1024 throughput (images/s)."""
    metadata: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- graph
class _Probabilities(nn.Module):
    """The model with its calibration and softmax: the file answers in softmax(logits / temperature), like the
    Recognizer. T = 1 (an uncalibrated checkpoint) adds no node."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return (logits if self.temperature == 1.0 else logits / self.temperature).softmax(1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's deprecation warnings and its 'torchvision is not installed' log lines say nothing about this
    model; keep them off the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(model: nn.Module, in_chans: int, img_size: int, opset: int, metadata: dict[str, str],
            temperature: float = 1.0) -> bytes:  # fmt: skip
    """The serialized ONNX model: (N, C, H, W) in [0, 1] -> probabilities softmax(logits / temperature) (N, K),
    batch axis dynamic.

    torch.export-based exporter (`dynamo=True`): on torch 2.13 it is the supported path (the TorchScript exporter
    warns that it will be removed) and, with its optimizer on, gives the same clean graph: batch norm folded into
    the convolutions, one Conv/Relu/MaxPool chain, Gemm, Softmax. It costs about 2 s an export, against 0.1 s.
    """

    wrapped = _Probabilities(model, temperature).eval()
    example = torch.rand(2, in_chans, img_size, img_size)  # batch 2: a batch of 1 could be specialized away
    return export_graph(wrapped, example, opset, INPUT_NAME, OUTPUT_NAME,
                        {0: torch.export.Dim("batch", min=1)}, metadata,
                        f"digitkit {__version__}: {metadata.get('model', 'model')}; see metadata_props")  # fmt: skip


def export_graph(module: nn.Module, example: torch.Tensor, opset: int, input_name: str, output_name: str,
                 dynamic: dict[int, Any], metadata: dict[str, str], doc: str) -> bytes:  # fmt: skip
    """torch.onnx.export (dynamo) of module(example) with the input's `dynamic` axes, the metadata set and the
    graph checked; an exporter failure is a DataError that says which opset to try."""
    import onnx

    try:
        with _quiet():
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, opset_version=opset, input_names=[input_name],
                output_names=[output_name], dynamic_shapes={"x": dynamic}, optimize=True, verbose=False,
            )  # fmt: skip
    except Exception as e:  # noqa: BLE001  the exporter raises many types; all mean the graph could not be built
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise DataError(f"the ONNX exporter failed at opset {opset} ({type(e).__name__}: {first}); "
                        f"try the default --opset {DEFAULT_OPSET}") from None  # fmt: skip
    proto = program.model_proto
    proto.doc_string = doc
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)


def metadata(opened: Any, sha: str, precision: str) -> dict[str, str]:
    """What a consumer needs to use the file with no digitkit installed (all strings, JSON where structured)."""
    cfg: Config = opened.cfg
    ckpt = opened.ckpt
    pre = cfg.preprocess
    return {
        "digitkit_format": FORMAT,
        "digitkit_version": __version__,
        "model": ckpt["model"],
        "model_args": json.dumps(ckpt.get("model_args") or {}),
        "classes": json.dumps(list(ckpt["classes"])),
        "checkpoint": Path(opened.checkpoint_path).name,
        "checkpoint_sha256": sha,
        "precision": precision,
        "input": f"{INPUT_NAME}: " + INPUT_CONTRACT.format(size=pre.size, box=pre.box),
        "output": f"{OUTPUT_NAME}: float32 (N, K) softmax(logits / temperature) over the classes, in the order of "
                  "`classes`",
        "temperature": json.dumps(temperature_of(ckpt)),
        "polarity": "white digit (1.0) on black (0.0)",
        "normalization": json.dumps(ckpt.get("normalization") or {}),
        "preprocess": json.dumps(pre.__dict__),
        "inference": json.dumps(cfg.inference.__dict__),
    }


# ------------------------------------------------------------------------------------- int8
def calibration_set(cfg: Config, n: int, seed: int = 0, data_dir: str | Path | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(images (n, 1, H, W) float in [0, 1], their indices in the training files): a stratified, seeded sample of
    the run's own training portion (its validation hold-out excluded), prepared as the model was trained. Only the
    training files are read."""
    from digitkit import data, runs

    folder = Path(data_dir) if data_dir is not None else Path(cfg.data.dir)
    full = data.load_split(folder, "train", verify=cfg.data.verify)
    train_idx, _ = data.stratified_split(full.labels, cfg.data.val_fraction, cfg.split_seed)
    fraction = min(n / len(train_idx), 0.999)
    _, pick = data.stratified_split(full.labels[train_idx], fraction, seed)
    idx = train_idx[pick]
    return runs.prepared(full.subset(idx), cfg).images.float().div(255), idx


def quantize(fp32_path: Path, out_path: Path, calibration: torch.Tensor) -> None:
    """Static int8 quantization: S8S8 in QDQ format (ONNX Runtime's recommended default on x86-64), per-channel
    weights, MinMax ranges from the calibration images; the softmax stays float, so probabilities keep their
    resolution instead of 256 levels.

    The graph is written so that runtimes other than ONNX Runtime read it as ONNX Runtime does (see
    `int8_graph_facts`, which the exporter checks):
    - Every Relu stays an explicit node (`QDQKeepRemovableActivations`). By default the quantizer deletes a Relu
      after a Conv and lets the next QuantizeLinear (zero point -128) clip at zero, so the graph without its Q/DQ
      pairs is no longer the model. ONNX Runtime drops the Relu again when it builds its session: no cost.
    - A Gemm's bias is a float initializer, not an int32 DequantizeLinear. OpenCV's DNN module misreads a Gemm
      whose bias comes from a DequantizeLinear (4.14: the Gemm reads uninitialized memory and gives NaN, 64.6-93.6%
      of predictions agreeing with ONNX Runtime over five runs of one file; 5.1: refuses the file, `bufidx >= 0 in
      function 'argTensor'`); Conv biases it reads right. ONNX Runtime still fuses the Gemm into QGemm, so its
      probabilities and speed are unchanged.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [{INPUT_NAME: calibration[i : i + 100].numpy()} for i in range(0, len(calibration), 100)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    prepared = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        with _quiet():
            # ORT's recommended first step: shape inference and graph optimization, so the quantizer sees fused ops.
            quant_pre_process(str(fp32_path), str(prepared))
            keep_float = _softmax_and_temperature(onnx.load(str(prepared)))
            quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep_float,
                            extra_options={"QDQKeepRemovableActivations": True})  # fmt: skip
    finally:
        prepared.unlink(missing_ok=True)
    proto = onnx.load(str(out_path))
    _float_gemm_bias(proto)
    _prune_opset_imports(proto)
    onnx.checker.check_model(proto)
    out_path.write_bytes(proto.SerializeToString())


def _softmax_and_temperature(proto: Any) -> list[str]:
    """Names of the Softmax nodes and of the division by the temperature feeding one (a Div or Mul by a
    constant): both stay float, so the calibrated probabilities are not rounded to int8 steps."""
    producer = {out: n for n in proto.graph.node for out in n.output}
    names = []
    for node in proto.graph.node:
        if node.op_type == "Softmax":
            names.append(node.name)
            before = producer.get(node.input[0])
            if before is not None and before.op_type in ("Div", "Mul"):
                names.append(before.name)
    return names


def _float_gemm_bias(proto: Any) -> None:
    """Replace each Gemm bias computed by a DequantizeLinear of an int32 initializer with that float initializer
    ((q - zero_point) * scale, exactly what the DequantizeLinear computes)."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    init = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    orphans: set[str] = set()
    for gemm in [n for n in graph.node if n.op_type == "Gemm" and len(n.input) > 2]:
        dq = producer.get(gemm.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in init for i in dq.input[:3]):
            continue
        q, scale, zero = (numpy_helper.to_array(init[i]) for i in dq.input[:3])
        bias = ((q.astype(np.float64) - zero.astype(np.float64)) * scale.astype(np.float64)).astype(np.float32)
        name = f"{gemm.input[2]}_float"
        graph.initializer.append(numpy_helper.from_array(bias, name))
        gemm.input[2] = name
        users[dq.output[0]] -= 1
        if not users[dq.output[0]]:
            graph.node.remove(dq)
            orphans.update(dq.input)
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for t in [t for t in graph.initializer if t.name in orphans and t.name not in used]:
        graph.initializer.remove(t)


def _prune_opset_imports(proto: Any) -> None:
    """Keep only the operator domains the graph uses: the quantizer's pre-processing declares ONNX Runtime's
    private ones (com.microsoft, ...) although no node needs them."""
    used = {node.domain for node in proto.graph.node} | {""}
    keep = [op for op in proto.opset_import if op.domain in used or op.domain == "ai.onnx"]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


# ------------------------------------------------------------------------------------- checks
def parity(reference: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Agreement of `probs` with `reference` (both (N, K)) and both accuracies on `labels`."""
    from digitkit.evaluate import accuracy

    finite = bool(torch.isfinite(probs).all())
    same = reference.argmax(1) == probs.argmax(1)
    return {
        "images": len(labels),
        "agreement": float(same.float().mean()) if finite else 0.0,
        "disagreements": int((~same).sum()) if finite else len(labels),
        "max_abs_prob_diff": float((reference - probs).abs().max()) if finite else float("inf"),
        "accuracy_reference": accuracy(reference, labels),
        "accuracy": accuracy(probs, labels) if finite else 0.0,
        "finite": finite,
    }


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
ACTIVATION_OPS = ("Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                  "Gelu", "Softplus", "Mish")  # fmt: skip
MIN_LITERAL_AGREEMENT = 0.999
"""int8: share of test images on which the file read literally (every op as written) must give ONNX Runtime's
prediction."""


def int8_graph_facts(fp32: Any, int8: Any) -> dict[str, Any]:
    """Whether a runtime other than ONNX Runtime reads the int8 graph as ONNX Runtime does, judged from the graphs
    alone (ModelProtos: `int8` and the fp32 graph it was quantized from). `problems` lists what fails, one phrase
    each; empty means none of these holds:
    - Without its QuantizeLinear/DequantizeLinear nodes the int8 graph lacks an fp32 node, such as a Relu left to
      the next QuantizeLinear's saturation at its zero point (what ONNX Runtime's quantizer does by default).
    - A Gemm takes its bias from a DequantizeLinear: OpenCV's DNN module misreads (4.x) or refuses (5.x) it.
    - A node is outside the standard ONNX domain (an ONNX Runtime contrib op that other runtimes lack).
    """
    from collections import Counter

    ops32 = Counter(n.op_type for n in fp32.graph.node)
    ops8 = Counter(n.op_type for n in int8.graph.node if n.op_type not in QDQ_OPS)
    producer = {out: n for n in int8.graph.node for out in n.output}
    dq_bias = [n.name or n.output[0] for n in int8.graph.node
               if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in producer
               and producer[n.input[2]].op_type == "DequantizeLinear"]  # fmt: skip
    foreign = sorted({f"{n.domain}:{n.op_type}" for n in int8.graph.node if n.domain not in ("", "ai.onnx")})
    missing, added = ops32 - ops8, ops8 - ops32
    problems = []
    if missing or added:
        what = [f"{k} x{v} missing" for k, v in missing.items()] + [f"{k} x{v} added" for k, v in added.items()]
        problems.append(f"without its Q/DQ nodes it is not the fp32 graph ({', '.join(what)})")
    if dq_bias:
        problems.append(f"Gemm {', '.join(dq_bias)} takes its bias from a DequantizeLinear (want a float initializer)")
    if foreign:
        problems.append(f"non-standard ops {', '.join(foreign)}")
    return {
        "activations_fp32": sum(ops32[k] for k in ACTIVATION_OPS),
        "activations_explicit": sum(ops8[k] for k in ACTIVATION_OPS),
        "same_ops_as_fp32": not missing and not added,
        "gemm_bias_from_dequantize": dq_bias,
        "nonstandard_ops": foreign,
        "problems": problems,
    }


def literal_probs(path: Path, images: torch.Tensor, threads: int) -> torch.Tensor:
    """Probabilities from ONNX Runtime with its graph optimizations off: no int8 kernel fusion, every
    QuantizeLinear, DequantizeLinear and float op runs as written. This is how a runtime without fused int8
    kernels reads the file; OpenCV 4.14's DNN module, for one, runs Quantize/Dequantize layers around float ones."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arr = images.detach().cpu().float().numpy()
    out = [session.run(None, {INPUT_NAME: np.ascontiguousarray(arr[i : i + 1000])})[0]
           for i in range(0, len(arr), 1000)]  # fmt: skip
    return torch.from_numpy(np.concatenate(out))


def check_int8(fp32: Path, int8: Path, out: Path, images: torch.Tensor, threads: int
               ) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """The int8 candidate `int8` checked for portability (see `int8_graph_facts`, plus its literal reading against
    ONNX Runtime's int8 kernels on `images`); raises DataError naming every problem, so nothing reaches `out`.
    Returns the facts (for the report) and ONNX Runtime's probabilities on `images`."""
    import onnx
    import onnxruntime

    facts = int8_graph_facts(onnx.load(str(fp32)), onnx.load(str(int8)))
    probs = OnnxModel(int8, threads).probs(images)
    literal = literal_probs(int8, images, threads)
    same = probs.argmax(1) == literal.argmax(1)
    facts["literal_reading"] = {
        "images": len(images), "agreement": float(same.float().mean()), "disagreements": int((~same).sum()),
        "max_abs_prob_diff": float((probs - literal).abs().max()), "required": MIN_LITERAL_AGREEMENT,
        "how": "ONNX Runtime with graph optimizations off (every op as written) against its int8 kernels",
    }  # fmt: skip
    if facts["literal_reading"]["agreement"] < MIN_LITERAL_AGREEMENT:
        facts["problems"].append(
            f"read literally (every Q/DQ op as written) it gives ONNX Runtime's prediction on only "
            f"{100 * facts['literal_reading']['agreement']:.2f}% of {len(images):,} test images "
            f"(need {100 * MIN_LITERAL_AGREEMENT:g}%)"
        )
    facts["portable"] = not facts["problems"]
    if facts["problems"]:
        raise DataError(f"int8 graph check failed, nothing written to {out}: {'; '.join(facts['problems'])}. "
                        "Another runtime (OpenCV's DNN module, for one) would read this file differently from ONNX "
                        "Runtime; ship the fp32 file, or report the versions (onnxruntime "
                        f"{onnxruntime.__version__}) with the model name")  # fmt: skip
    return facts, probs


def write_checked(candidate: Path, out: Path, reference: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  options: ExportOptions, int8: bool = False, probs: torch.Tensor | None = None
                  ) -> dict[str, Any]:  # fmt: skip
    """Run `candidate` through ONNX Runtime on `images` (or take its probabilities `probs`, already computed),
    compare with `reference` probabilities, and move it to `out` only if it passes; otherwise delete it and raise
    DataError. Returns the parity figures.

    fp32 passes with identical predictions on `options.min_agreement` of the images; int8 (whose reference is the
    fp32 model) with an accuracy drop of at most `options.max_int8_accuracy_drop`.
    """
    try:
        if probs is None:
            probs = OnnxModel(candidate, options.threads).probs(images)
        result = parity(reference, probs, labels)
        drop = result["accuracy_reference"] - result["accuracy"]
        if not result["finite"]:
            problem = "its probabilities are not finite (NaN or inf)"
        elif not int8 and result["agreement"] < options.min_agreement:
            problem = (f"its predictions match PyTorch's on {100 * result['agreement']:.3f}% of {result['images']:,} "
                       f"test images ({result['disagreements']} differ; need {100 * options.min_agreement:g}%), "
                       f"max probability difference {result['max_abs_prob_diff']:.3g}")  # fmt: skip
        elif int8 and drop > options.max_int8_accuracy_drop:
            problem = (f"int8 accuracy {100 * result['accuracy']:.2f}% is {100 * drop:.2f} points below fp32's "
                       f"{100 * result['accuracy_reference']:.2f}% (allowed {100 * options.max_int8_accuracy_drop:g}); "
                       "try more --calibration-images, or ship the fp32 file")  # fmt: skip
        else:
            problem = ""
        if problem:
            raise DataError(f"ONNX parity check failed, nothing written to {out}: {problem}. The exported graph does "
                            "not compute what the PyTorch model does; check the torch/onnx/onnxruntime versions "
                            f"(report them with the model name) or try another --opset")  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(candidate, out)
        return result
    finally:
        candidate.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- speed
def measure_speed(fn: Callable[[Any], Any], x1: Any, xb: Any, calls: int = 300, repeats: int = 5) -> dict[str, float]:
    """Batch-1 latency p50/p99 (ms) over `calls` calls of fn(x1), and images/s of fn(xb) (median of `repeats`),
    after a warm-up. Inputs are whatever `fn` takes (tensors, numpy arrays)."""
    for _ in range(max(calls // 10, 5)):
        fn(x1)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x1)
        times.append(time.perf_counter() - t0)
    times.sort()
    fn(xb)
    batch_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(xb)
        batch_times.append(time.perf_counter() - t0)
    return {
        "batch1_p50_ms": round(1000 * times[len(times) // 2], 4),
        "batch1_p99_ms": round(1000 * times[min(len(times) - 1, int(0.99 * len(times)))], 4),
        "batch_images_per_s": round(len(xb) / statistics.median(batch_times), 1),
    }


def onnx_speed(path: Path, images: torch.Tensor, threads: int, batch: int = 1024) -> dict[str, float]:
    """ONNX Runtime figures: batch 1 on one thread (a server's setting), batch `batch` on `threads`."""
    one, many = OnnxModel(path, 1), OnnxModel(path, threads)
    x1, xb = images[:1].numpy(), _batch(images, batch).numpy()

    def run(x: Any) -> Any:
        return (one if len(x) == 1 else many).session.run(None, {INPUT_NAME: x})

    return measure_speed(run, x1, xb)


def torch_speed(model: nn.Module, images: torch.Tensor, threads: int, batch: int = 1024) -> dict[str, float]:
    """PyTorch eager in inference mode, with the same thread settings as onnx_speed."""
    before = torch.get_num_threads()
    x1, xb = images[:1].contiguous(), _batch(images, batch)

    def run(x: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(1 if len(x) == 1 else threads)
        with torch.inference_mode():
            return model(x).softmax(1)

    try:
        return measure_speed(run, x1, xb)
    finally:
        torch.set_num_threads(before)


def _batch(images: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(images))
    return images.repeat(reps, 1, 1, 1)[:n].contiguous()


# ------------------------------------------------------------------------------------- the run
def default_out(opened: Any, int8: bool) -> Path:
    folder = opened.run_dir or Path(opened.checkpoint_path).parent
    return folder / EXPORT_DIR / ("model.int8.onnx" if int8 else DEFAULT_FILE)


def export_run(run: str | Path, out: str | Path | None = None, options: ExportOptions | None = None,
               data_dir: str | Path | None = None) -> ExportReport:  # fmt: skip
    """Export a run folder or checkpoint to `out` (default RUN/export/model.onnx, or model.int8.onnx), checked on
    the whole test split of `data_dir` (default: the run's data.dir); the report is also written beside the file as
    `<out stem>.json`."""
    import onnx
    import onnxruntime

    from digitkit import runs
    from digitkit.evaluate import predict_probs
    from digitkit.idx import atomic_write_bytes

    options = options or ExportOptions()
    started = time.perf_counter()
    opened = runs.open_model(run)
    out = Path(out) if out is not None else default_out(opened, options.int8)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: expected a file name ending in .onnx")
    if opened.ckpt.get("task") == "sequence":  # a row reader: its own graph, contract and parity check
        from digitkit.export_sequence import export_sequence_run

        return export_sequence_run(opened, out, options, data_dir)
    sha = runs.checkpoint_sha256(opened.checkpoint_path)
    ckpt, model = opened.ckpt, opened.model.eval()
    ds, _ = runs.evaluation_data(opened.cfg, "test", data_dir)  # report only: nothing is chosen on it
    images = ds.images.float().div(255)
    temperature = temperature_of(ckpt)
    reference = predict_probs(model, ds.images, temperature=temperature)
    meta = metadata(opened, sha, "fp32")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(
        out=str(out), model=ckpt["model"], checkpoint=str(opened.checkpoint_path), checkpoint_sha256=sha,
        precision="int8" if options.int8 else "fp32", opset=options.opset, size_bytes=0, parity={}, seconds=0.0,
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    )  # fmt: skip
    # The candidate is built beside the target (same file system, so the final rename is atomic) and removed on any
    # failure: an interrupted or failed export never leaves a file that looks like a good one.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        fp32.write_bytes(to_onnx(model, ckpt["in_chans"], ckpt["img_size"], options.opset, meta, temperature))
        fp32_final = Path(tmp) / "fp32.checked.onnx" if options.int8 else out
        report.parity = write_checked(fp32, fp32_final, reference, images, ds.labels, options)
        if options.int8:
            calib, idx = calibration_set(opened.cfg, options.calibration_images, options.calibration_seed, data_dir)
            report.calibration = {"images": len(idx), "source": "training portion (validation and test excluded)",
                                  "seed": options.calibration_seed,
                                  "method": INT8_METHOD}  # fmt: skip
            int8_raw = Path(tmp) / "int8.onnx"
            quantize(fp32_final, int8_raw, calib)
            proto = onnx.load(str(int8_raw))
            meta = {**meta, "precision": f"int8 (static, calibrated on {len(idx)} training images)"}
            set_metadata(proto, meta)
            int8_path = Path(tmp) / "int8.meta.onnx"
            int8_path.write_bytes(proto.SerializeToString())
            fp32_probs = OnnxModel(fp32_final, options.threads).probs(images)
            graph, int8_probs = check_int8(fp32_final, int8_path, out, images, options.threads)
            checked = write_checked(int8_path, out, fp32_probs, images, ds.labels, options, int8=True,
                                    probs=int8_probs)  # fmt: skip
            fp32_size = fp32_final.stat().st_size
            report.int8 = {
                "size_bytes_fp32": fp32_size, "size_ratio": round(out.stat().st_size / fp32_size, 3),
                "accuracy_fp32": checked["accuracy_reference"], "accuracy_int8": checked["accuracy"],
                "accuracy_change_points": round(100 * (checked["accuracy"] - checked["accuracy_reference"]), 3),
                "agreement_with_fp32": checked["agreement"], "max_abs_prob_diff_vs_fp32": checked["max_abs_prob_diff"],
                "aim": "within 0.1 points of fp32", "bound_points": 100 * options.max_int8_accuracy_drop,
                "graph": graph,
            }  # fmt: skip
        if options.measure_speed:
            report.speed["torch_eager"] = torch_speed(model, images, options.threads)
            report.speed["onnx_fp32"] = onnx_speed(fp32_final, images, options.threads)
            if options.int8:
                report.speed["onnx_int8"] = onnx_speed(out, images, options.threads)
                f32, i8 = report.speed["onnx_fp32"], report.speed["onnx_int8"]
                report.int8["speedup_batch1"] = round(f32["batch1_p50_ms"] / i8["batch1_p50_ms"], 2)
                report.int8["speedup_batch"] = round(i8["batch_images_per_s"] / f32["batch_images_per_s"], 2)
            report.speed["settings"] = {"batch1_threads": 1, "batch": 1024, "batch_threads": options.threads}
    report.size_bytes = out.stat().st_size
    report.metadata = meta
    report.seconds = round(time.perf_counter() - started, 1)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(report.to_json(), indent=2) + "\n").encode())
    return report
