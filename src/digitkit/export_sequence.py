"""Export a row reader (task: sequence) to ONNX: any number of rows of any width, checked against PyTorch first.

The file: input `rows` float32 (N, 1, H, W) in [0, 1] (white ink on black, each row brought to H px by
digitkit.rows.normalize_row; N and W dynamic, W a multiple of 4), output `log_probs` (N, W / 4, 11): per frame
the log-probabilities of the CTC blank (class 0) and the digits 0-9 (classes 1-10), log-softmax inside the graph.
Its metadata holds the rows geometry, the preprocessing and inference configs and the checkpoint's SHA-256, so
`digitkit.engine.open_reader` answers from the file alone, as `digitkit read` does from the run.

As for classifiers (digitkit.export), nothing is written unless it passes: the candidate is run through ONNX
Runtime on report rows composed from the MNIST test digits (never used to choose anything) and must read every
row as PyTorch does (greedy strings), with the log-probabilities within `MAX_ABS_DIFF`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digitkit import __version__
from digitkit.engine import SEQUENCE_FORMAT, SEQUENCE_INPUT, SEQUENCE_OUTPUT, OnnxSequenceModel
from digitkit.errors import ConfigError, DataError
from digitkit.models.crnn import FRAME_PX
from digitkit.realworld.ctc import ALPHABET, BLANK

PARITY_ROWS = 500
"""Report rows (1-8 MNIST test digits, a third touching) the export is checked on."""
MAX_ABS_DIFF = 1e-3
"""Largest accepted difference between PyTorch's and the file's log-probabilities on those rows."""


class _LogProbs(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).log_softmax(2)


def to_onnx_sequence(model: nn.Module, height: int, opset: int, metadata: dict[str, str]) -> bytes:
    """The serialized graph: rows (N, 1, height, W) -> log_probs (N, W / FRAME_PX, K), N and W dynamic."""
    import onnx

    from digitkit.export import export_graph

    example = torch.rand(2, 1, height, 32 * FRAME_PX)
    frames = torch.export.Dim("frames", min=2, max=4096)
    raw = export_graph(_LogProbs(model).eval(), example, opset, SEQUENCE_INPUT, SEQUENCE_OUTPUT,
                       {0: torch.export.Dim("batch", min=1), 3: FRAME_PX * frames}, metadata,
                       f"digitkit {__version__}: row reader {metadata.get('model', '')}; see metadata_props")
    # The exporter may declare the output's frame axis with the example's length (it does after an LSTM) although
    # the graph computes any length: declare both axes symbolic, so runtimes neither warn nor trust a wrong shape.
    proto = onnx.load_from_string(raw)
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for axis, name in ((0, "batch"), (1, "frames")):
        dims[axis].ClearField("dim_value")
        dims[axis].dim_param = name
    del proto.graph.value_info[:]  # the intermediate shapes carry the same stale length; runtimes infer their own
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def sequence_metadata(opened: Any, sha: str) -> dict[str, str]:
    cfg, ckpt = opened.cfg, opened.ckpt
    return {
        "digitkit_format": SEQUENCE_FORMAT,
        "digitkit_version": __version__,
        "task": "sequence",
        "model": ckpt["model"],
        "model_args": json.dumps(ckpt.get("model_args") or {}),
        "classes": json.dumps(list(ckpt["classes"])),
        "checkpoint": Path(opened.checkpoint_path).name,
        "checkpoint_sha256": sha,
        "precision": "fp32",
        "input": f"{SEQUENCE_INPUT}: float32 (N, 1, {cfg.rows.height}, W) in [0, 1], W a multiple of {FRAME_PX}: "
                 "white ink on black, each row cropped to its ink and scaled so the ink is "
                 f"{cfg.rows.ink_fraction:g} x {cfg.rows.height} px tall (digitkit.rows.normalize_row), zero-padded "
                 "on the right",
        "output": f"{SEQUENCE_OUTPUT}: float32 (N, W / {FRAME_PX}, {len(ALPHABET) + 1}) log-probabilities per frame "
                  f"of the CTC blank (class {BLANK}) and the digits {ALPHABET} (classes 1-{len(ALPHABET)})",
        "frame_px": str(FRAME_PX),
        "rows": json.dumps(cfg.rows.__dict__),
        "preprocess": json.dumps(cfg.preprocess.__dict__),
        "inference": json.dumps(cfg.inference.__dict__),
    }


def export_sequence_run(opened: Any, out: Path, options: Any, data_dir: str | Path | None = None) -> Any:
    """digitkit.export.export_run for a row reader (`opened` from runs.open_model): write `out` only once it reads
    the report rows as PyTorch does; returns the ExportReport (also written beside the file as JSON)."""
    import onnx
    import onnxruntime

    from digitkit import runs
    from digitkit.export import ExportReport, measure_speed
    from digitkit.idx import atomic_write_bytes
    from digitkit.rows import fixed_rows
    from digitkit.sequence import greedy_texts

    if options.int8:
        raise ConfigError("--int8: the row reader exports in fp32 only (int8 is measured for the digit classifiers); "
                          "drop --int8")  # fmt: skip
    started = time.perf_counter()
    sha = runs.checkpoint_sha256(opened.checkpoint_path)
    model = opened.model.eval()
    cfg = opened.cfg
    ds, _ = runs.evaluation_data(cfg, "test", data_dir)  # report only: nothing is chosen on it
    batches = fixed_rows(ds, PARITY_ROWS, cfg.seed + 2, cfg.rows)
    meta = sequence_metadata(opened, sha)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(
        out=str(out), model=opened.ckpt["model"], checkpoint=str(opened.checkpoint_path), checkpoint_sha256=sha,
        precision="fp32", opset=options.opset, size_bytes=0, parity={}, seconds=0.0,
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    )  # fmt: skip
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        candidate = Path(tmp) / "rows.onnx"
        candidate.write_bytes(to_onnx_sequence(model, cfg.rows.height, options.opset, meta))
        engine = OnnxSequenceModel(candidate, options.threads)
        rows = same = 0
        diff = 0.0
        for b in batches:
            with torch.inference_mode():
                ref = model(b.x).log_softmax(2)
            got = torch.as_tensor(engine.logits(b.x))
            frames = b.frames()
            mask = torch.arange(ref.shape[1]) < frames[:, None]
            diff = max(diff, float((ref - got).abs()[mask].max()))
            same += sum(a == c for a, c in zip(greedy_texts(ref, frames), greedy_texts(got, frames), strict=True))
            rows += len(b)
        report.parity = {"rows": rows, "same_text": same, "agreement": same / rows, "max_abs_log_prob_diff": diff,
                         "rows_source": "MNIST test digits, 1-8 a row, a third touching (report only)"}  # fmt: skip
        if same < rows or not diff <= MAX_ABS_DIFF:
            raise DataError(f"ONNX parity check failed, nothing written to {out}: the file reads {rows - same} of "
                            f"{rows} rows differently from PyTorch (max log-probability difference {diff:.3g}, "
                            f"allowed {MAX_ABS_DIFF:g}); check the torch/onnx/onnxruntime versions or try another "
                            "--opset")  # fmt: skip
        os.replace(candidate, out)
    if options.measure_speed:
        x1 = batches[0].x[:1, :, :, : int(batches[0].widths[0])]
        engine = OnnxSequenceModel(out, 1)
        report.speed["onnx_fp32_row"] = measure_speed(lambda x: engine.logits(x), x1, x1, calls=100)
        report.speed["settings"] = {"threads": 1, "row_width_px": int(x1.shape[-1])}
    report.size_bytes = out.stat().st_size
    report.metadata = meta
    report.seconds = round(time.perf_counter() - started, 1)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(report.to_json(), indent=2) + "\n").encode())
    return report
