"""Run an exported ONNX model: an ONNX Runtime session that answers like the PyTorch model it came from.

`digitkit export` writes `RUN/export/model.onnx`: input `image` float32 (N, 1, 28, 28) in [0, 1] (white digit on
black, preprocessed as `digitkit.preprocess` does), output `probabilities` (N, K), softmax included. Its metadata
holds everything needed to answer without the run folder: class names, the preprocessing config, the inference
config (rejection threshold, noise defence) and the checkpoint's SHA-256. So `open_recognizer("model.onnx")` is a
complete `Recognizer`, and `digitkit predict --engine onnx` or `digitkit serve --engine onnx` run the same
preprocessing, rejection rules and (to within the parity `digitkit export` checks) the same answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitkit.errors import ConfigError, DataError

ENGINES = ("torch", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
EXPORT_DIR = "export"
DEFAULT_FILE = "model.onnx"
REQUIRED_METADATA = ("digitkit_format", "classes", "preprocess", "inference", "checkpoint_sha256", "model")
FORMAT = "digitkit-onnx/1"
SEQUENCE_FORMAT = "digitkit-onnx-rows/1"
SEQUENCE_INPUT = "rows"
SEQUENCE_OUTPUT = "log_probs"


CHUNK = 64
"""Images per ONNX Runtime call for convolutional models. Small chunks keep each layer's activations in cache:
for cnn3_tiny on 2 cores, 1,024 images as one call ran at 41,000 images/s, as chunks of 256 at 43,000, of 64 at
54,000 (one run, same session). A model without convolutions (the MLP) is all matrix products, which want the
largest batch: it runs DENSE_CHUNK images per call. benchmarks/inference.py measures batches the same way."""
DENSE_CHUNK = 1024


class OnnxModel:
    """An ONNX Runtime session over an exported file; `probs(x)` has the Recognizer's engine signature.

    threads: intra-op threads (0 lets ONNX Runtime choose one per physical core). A server answering one image per
    request wants 1: a thread hand-off costs more than it saves on a 2-megaflop model.
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such ONNX file; write one with `digitkit export RUN --format onnx`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  ORT raises its own exception types for a bad file; all mean the same
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise DataError(f"{self.path}: ONNX Runtime cannot load this file ({type(e).__name__}: {first}); "
                            "re-export it with `digitkit export RUN`") from None  # fmt: skip
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.chunk = CHUNK if _has_conv(self.path) else DENSE_CHUNK
        self.input_name = self.session.get_inputs()[0].name

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) float in [0, 1] -> probabilities (B, K), run in chunks of `self.chunk` images."""
        arr = x.detach().cpu().float().numpy()
        out = [self.session.run(None, {self.input_name: np.ascontiguousarray(arr[i : i + self.chunk])})[0]
               for i in range(0, len(arr), self.chunk)]  # fmt: skip
        return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, 0)

    def contract(self) -> dict[str, Any]:
        """classes, preprocess and inference as plain data, checked: a file without them is not a digitkit export."""
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing or self.metadata.get("digitkit_format") != FORMAT:
            raise DataError(
                f"{self.path}: not a digitkit ONNX export (metadata {', '.join(missing) or 'digitkit_format'} "
                f"missing or not {FORMAT!r}); export the run with `digitkit export RUN --format onnx`, or use "
                "--engine torch with the run folder"
            )
        try:
            return {k: json.loads(self.metadata[k]) for k in ("classes", "preprocess", "inference")}
        except ValueError as e:
            raise DataError(f"{self.path}: its digitkit metadata is not valid JSON ({e}); re-export the run") from None


def _has_conv(path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - ORT loaded it already; without the graph, assume the common case
        return True
    return any(node.op_type in ("Conv", "QLinearConv", "ConvInteger") for node in graph.node)


def onnx_path(path: str | Path) -> Path:
    """An .onnx file as given, or a run folder's `export/model.onnx` (through runs/latest)."""
    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise DataError(f"{path}: no such ONNX file; write one with `digitkit export RUN --format onnx`")
        return path
    folder = path if path.is_dir() else path.parent
    candidate = folder / EXPORT_DIR / DEFAULT_FILE
    if not candidate.is_file():
        raise DataError(f"{folder}: no {EXPORT_DIR}/{DEFAULT_FILE} for --engine onnx; write it first with "
                        f"`digitkit export {folder} --format onnx`, or use --engine torch")  # fmt: skip
    return candidate


def check_exported_from(engine: OnnxModel, path: str | Path, expect_sha256: str | None) -> None:
    """Refuse a stale export: one written from another checkpoint than `expect_sha256`, or, given a run folder or
    checkpoint rather than an .onnx file, than that checkpoint as it is now (`digitkit calibrate` rewrites it)."""
    if expect_sha256 is None and Path(path).suffix != ".onnx":
        from digitkit.checkpoint import resolve
        from digitkit.idx import sha256

        expect_sha256 = sha256(resolve(path).read_bytes())
    exported_from = engine.metadata.get("checkpoint_sha256", "")
    if expect_sha256 is not None and exported_from != expect_sha256:
        raise DataError(f"{engine.path} was exported from checkpoint {exported_from[:12]}, not from the one being "
                        f"served ({expect_sha256[:12]}); re-export with `digitkit export RUN --format onnx`")


def open_recognizer(path: str | Path, threads: int = 0, torch_model: torch.nn.Module | None = None,
                    expect_checkpoint_sha256: str | None = None) -> Any:  # fmt: skip
    """A Recognizer answering through ONNX Runtime, configured from the file's metadata alone.

    `torch_model` (the same checkpoint's PyTorch model) is kept for what ONNX cannot do: gradient explanations.
    `expect_checkpoint_sha256` refuses a stale export (written from another checkpoint than the one being served);
    given a run folder or checkpoint rather than an .onnx file, the export is always checked against that
    checkpoint as it is now (`digitkit calibrate` rewrites it, with a new temperature).
    """
    from digitkit.classify import Recognizer
    from digitkit.config import InferenceConfig
    from digitkit.preprocess import PreprocessConfig

    engine = OnnxModel(onnx_path(path), threads)
    contract = engine.contract()
    check_exported_from(engine, path, expect_checkpoint_sha256)
    try:
        pre, inf = PreprocessConfig(**contract["preprocess"]), InferenceConfig(**contract["inference"])
    except (TypeError, ConfigError) as e:
        raise DataError(f"{engine.path}: its stored preprocess/inference config does not fit this digitkit ({e}); "
                        "re-export the run with this version") from None  # fmt: skip
    return Recognizer(torch_model, contract["classes"], inf, pre, engine=engine)


class OnnxSequenceModel(OnnxModel):
    """An exported row reader (digitkit.export_sequence): `logits(x)` gives the frame log-probabilities, the
    engine signature digitkit.realworld.reader.SequenceReader takes."""

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """x (B, 1, H, W) -> (B, W / 4, K) log-probabilities (rows of one batch share W: pad on the right)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().float().numpy())})[0]

    def contract(self) -> dict[str, Any]:
        if self.metadata.get("digitkit_format") != SEQUENCE_FORMAT:
            raise DataError(f"{self.path}: not a digitkit row-reader export (digitkit_format is "
                            f"{self.metadata.get('digitkit_format')!r}, expected {SEQUENCE_FORMAT!r}); export a run "
                            "trained with configs/read.yaml")  # fmt: skip
        try:
            return {k: json.loads(self.metadata[k]) for k in ("classes", "rows", "preprocess", "inference")}
        except (KeyError, ValueError) as e:
            raise DataError(f"{self.path}: its digitkit metadata is missing or not valid JSON ({e}); re-export the "
                            "run") from None  # fmt: skip


def open_reader(path: str | Path, threads: int = 0, expect_checkpoint_sha256: str | None = None) -> Any:
    """A SequenceReader answering through ONNX Runtime from an exported row reader, configured from the file's
    metadata alone; a run folder's export is checked against its checkpoint as open_recognizer does."""
    from digitkit.config import InferenceConfig
    from digitkit.preprocess import PreprocessConfig
    from digitkit.realworld.reader import SequenceReader
    from digitkit.rows import RowsConfig

    engine = OnnxSequenceModel(onnx_path(path), threads)
    contract = engine.contract()
    check_exported_from(engine, path, expect_checkpoint_sha256)
    try:
        rows, pre = RowsConfig(**contract["rows"]), PreprocessConfig(**contract["preprocess"])
        inf = InferenceConfig(**contract["inference"])
    except (TypeError, ConfigError) as e:
        raise DataError(f"{engine.path}: its stored rows/preprocess/inference config does not fit this digitkit "
                        f"({e}); re-export the run with this version") from None  # fmt: skip
    return SequenceReader(None, rows, pre, inf, engine=engine)


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ConfigError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
    return name
