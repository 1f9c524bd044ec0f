"""Self-describing checkpoints that load with `torch.load(..., weights_only=True)`: data, never code.

A checkpoint holds the weights (normalization included, as buffers), the model's name and arguments, the class
names, the input shape, the resolved config, metrics and the package version, so `model_from_checkpoint` needs
nothing else. Resume checkpoints (`last.pt`) add the optimizer, schedule and history.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from digitkit import __version__
from digitkit.errors import DataError
from digitkit.models import DigitModel, create_model

FORMAT = "digitkit-checkpoint/1"


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a kill during the write leaves the previous file intact, never half a checkpoint."""
    payload = {"format": FORMAT, "digitkit_version": __version__, "saved_at": time.time(), **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def model_payload(model: DigitModel, meta: dict[str, Any]) -> dict[str, Any]:
    """Weights plus what is needed to rebuild the model: meta has model, model_args, classes, in_chans, img_size."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        **meta,
        "state_dict": state,
        "normalization": {"mean": float(model.mean), "std": float(model.std)},
    }


def load(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types for a bad file; all mean the same to a user
        raise DataError(
            f"{path}: not a loadable digitkit checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it may be truncated, from another program, or contain code (only plain data is accepted)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"{path}: not a digitkit checkpoint (expected format {FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> DigitModel:
    model = create_model(
        ckpt["model"],
        num_classes=len(ckpt["classes"]),
        in_chans=ckpt["in_chans"],
        img_size=ckpt["img_size"],
        **ckpt["model_args"],
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model


def resolve(path: str | Path) -> Path:
    """A .pt file, or a run folder (its kept checkpoint: best-*.pt, or final-*.pt for train.checkpoint_metric=last)."""
    path = Path(path)
    if path.is_dir():
        kept = sorted(path.glob("best-*.pt")) or sorted(path.glob("final-*.pt"))
        if not kept:
            raise DataError(f"{path}: no best-*.pt or final-*.pt checkpoint in this run folder; did the run finish "
                            "an epoch?")  # fmt: skip
        return kept[-1]
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint or run folder")
    return path
