"""From images to answers: preprocess, the model, and rejection. The one path that `digitkit predict`, `digitkit
read`, the server and the web page share, so the same image gets the same answer everywhere.

An answer is a digit with its confidence and all class probabilities, or `digit: None` with the reason:
  unreadable      the file is not an image we can decode (the message says why)
  empty           no contrast at all: a blank page or an untouched canvas
  no-ink          nothing left once specks and border shadows are dropped
  not-a-digit     the ink does not look like one handwritten digit (a filled blob, a texture), or the model's
                  digit score is below `inference.reject_below_digit_score` (see `digit_score`)
  low-confidence  the model's top probability is below `inference.reject_below_confidence`
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digitkit.calibration import check_temperature, temperature_of
from digitkit.config import Config, InferenceConfig
from digitkit.errors import DataError
from digitkit.evaluate import digit_scores, predict_probs
from digitkit.preprocess import PreprocessConfig, Preprocessed, preprocess_many

REASONS = ("unreadable", "empty", "no-ink", "not-a-digit", "low-confidence")

MAX_INK_COVERAGE = 0.45
"""A 28x28 result with more than this share of its pixels lit (> 0.5) is a texture, not a digit: MNIST test
digits light at most 33%."""
MAX_BOX_FILL = 0.85
"""Ink filling more than this share of its own bounding box (at least 10 px on each side) is a blob, not a stroke:
on the MNIST test digits the fill is at most 0.78 (99.9th percentile 0.67). Thin boxes (a '1') are exempt."""


@dataclass
class Answer:
    digit: str | None
    confidence: float
    probabilities: list[float]
    rejected: str | None = None
    """None, or one of REASONS."""
    top_k: list[tuple[str, float]] = field(default_factory=list)
    predicted: str | None = None
    """The model's top class even when rejected for low confidence (what it would have said)."""
    digit_score: float | None = None
    """How far the model's answer is from "no idea" (all classes alike): the mean over the classes of
    log(p_top / p_i), from the calibrated probabilities. A model trained with non-digits (outlier exposure) gives
    them a low score; None when the model did not run."""
    error: str | None = None
    """For `unreadable`: what was wrong with the input."""
    record: dict[str, Any] = field(default_factory=dict)
    """What preprocessing did (see digitkit.preprocess)."""
    x: torch.Tensor | None = field(default=None, repr=False)
    """The (1, 28, 28) image the model saw (None when unreadable); not part of the JSON."""

    def to_json(self, **extra: Any) -> dict[str, Any]:
        out = {**extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "x"}}
        out["top_k"] = [{"digit": d, "probability": p} for d, p in self.top_k]
        if "input_kind" in self.record:  # what preprocessing took the image for (clean, canvas, photo, scan)
            out["input_kind"] = self.record["input_kind"]
        return out


class Recognizer:
    """A trained model plus how it reads images (preprocess config) and answers (inference config).

    `engine`, when given, computes the probabilities instead of `model`: any object with `probs(x) -> (B, K)`, such
    as an exported ONNX file (digitkit.engine.OnnxModel). `model` may then be None, or the same checkpoint's PyTorch
    model, kept for what needs gradients (explanations).

    `temperature` (the checkpoint's calibration, digitkit.calibration) divides `model`'s logits before the
    softmax, so the confidence shown and the rejection threshold are on the calibrated scale. An engine's
    probabilities are used as they are: an ONNX export holds the division by T inside its graph.
    """

    def __init__(self, model: nn.Module | None, classes: list[str], inference: InferenceConfig | None = None,
                 preprocess_cfg: PreprocessConfig | None = None, device: str | torch.device = "cpu",
                 engine: Any = None, temperature: float = 1.0) -> None:  # fmt: skip
        if model is None and engine is None:
            raise ValueError("Recognizer needs a model or an engine")
        self.model = model.eval().to(device) if model is not None else None
        self.engine = engine
        self.temperature = check_temperature(temperature)
        self.classes = list(classes)
        self.inference = inference or InferenceConfig()
        self.preprocess_cfg = preprocess_cfg or PreprocessConfig()
        self.device = torch.device(device)

    @classmethod
    def open(cls, path: str | Path, cfg: Config | None = None) -> Recognizer:
        """From a run folder or checkpoint file; its stored config (or `cfg`) says how to preprocess and answer, and
        its temperature (1.0 for a checkpoint from before calibration) how to turn logits into confidence."""
        from digitkit import runs

        opened = runs.open_model(path)
        cfg = cfg or opened.cfg
        return cls(opened.model, opened.ckpt["classes"], cfg.inference, cfg.preprocess,
                   temperature=temperature_of(opened.ckpt))  # fmt: skip

    # ------------------------------------------------------------------------------------------ core
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28) float in [0, 1] -> calibrated probabilities (B, K): softmax(logits / temperature), with
        the noise defence when it is on (its noise is shared by every image, so an answer never depends on the rest
        of the batch)."""
        if len(x) == 0:
            return torch.zeros(0, len(self.classes))
        inf = self.inference
        if self.engine is not None:
            if inf.noise_defence_sigma <= 0:
                return self.engine.probs(x.float())
            # The same shared noise as evaluate.predict_probs (seed 0), so both engines answer alike.
            g = torch.Generator().manual_seed(0)
            noise = torch.randn((inf.noise_defence_samples, *x.shape[1:]), generator=g)
            x = x.float()
            return sum(self.engine.probs((x + inf.noise_defence_sigma * n).clamp(0, 1)) for n in noise) / len(noise)
        if inf.noise_defence_sigma > 0:
            return predict_probs(self.model, x, inf.noise_defence_sigma, inf.noise_defence_samples, device=self.device,
                                 temperature=self.temperature)  # fmt: skip
        # The plain path, without predict_probs' per-call train/eval bookkeeping: the model stays in eval mode
        # from __init__, and a server calls this once per image, where that bookkeeping would double the time.
        with torch.inference_mode():
            return torch.cat([self.model(chunk.to(self.device).float()).float().div(self.temperature).softmax(1).cpu()
                              for chunk in x.split(1000)])  # fmt: skip

    def answers(self, pres: list[Preprocessed], top_k: int = 3) -> list[Answer]:
        """One Answer per preprocessed image, rejections included.

        When preprocessing was unsure how to read an image it offers `candidates` (other normalizations, such as
        the other polarity): every reading of every image goes through the model in one batch, and the reading the
        model is most confident of answers (record["reading"] says which, and the confidence of each)."""
        rows: list[torch.Tensor] = []
        readings: dict[int, list[tuple[str, int]]] = {}  # image -> [(reading name, row in the batch)]
        for i, pre in enumerate(pres):
            if pre.rejected:
                continue
            options = pre.candidates or [("first", pre.tensor)]  # candidates[0] is pre.tensor (see Preprocessed)
            readings[i] = [(name, len(rows) + j) for j, (name, _) in enumerate(options)]
            rows.extend(tensor for _, tensor in options)
        x = torch.stack(rows) if rows else None
        probs = self.probs(x) if rows else None
        chosen: dict[int, int] = {}  # image -> its row
        records: dict[int, dict[str, Any]] = {}
        for i, options in readings.items():
            if len(options) == 1:
                chosen[i], records[i] = options[0][1], pres[i].record
                continue
            best_name, best_row = max(options, key=lambda o: float(probs[o[1]].max()))  # the first wins ties
            chosen[i], records[i] = best_row, pres[i].record
            if len(options) > 1:
                records[i] = {**pres[i].record, "reading": {
                    "chosen": best_name, "why": "the reading the model is surest of",
                    "confidence": {n: round(float(probs[r].max()), 6) for n, r in options}}}  # fmt: skip
        picked = [chosen[i] for i in chosen]  # images in order, rejected ones left out
        decided = iter(self._decide_batch(probs[picked], x[picked], list(records.values()), top_k) if picked else [])
        return [Answer(None, 0.0, [], pre.rejected, record=pre.record, x=pre.tensor) if pre.rejected else next(decided)
                for pre in pres]  # fmt: skip

    def _decide_batch(self, p: torch.Tensor, x: torch.Tensor, records: list[dict[str, Any]], top_k: int
                      ) -> list[Answer]:  # fmt: skip
        """Answers from probabilities p (B, K) and model inputs x (B, 1, H, W): the rules (ink shape, digit score,
        confidence) computed for the whole batch in a few tensor operations, then read out per image."""
        conf, idx = p.max(1)
        k = min(max(top_k, 1), len(self.classes))
        top = torch.topk(p, k, dim=1)
        scores = digit_scores(p).tolist()
        shapes = ink_shapes(x)
        probs_l, conf_l, idx_l = p.tolist(), conf.tolist(), idx.tolist()
        top_v, top_i = top.values.tolist(), top.indices.tolist()
        inf, classes = self.inference, self.classes
        out = []
        for b, record in enumerate(records):
            digit, score, c = classes[idx_l[b]], scores[b], conf_l[b]
            answer = Answer(
                digit=digit, confidence=round(c, 6), probabilities=[round(v, 6) for v in probs_l[b]],
                predicted=digit, top_k=[(classes[j], round(v, 6)) for v, j in zip(top_v[b], top_i[b], strict=True)],
                digit_score=round(score, 4), record=record, x=x[b],
            )  # fmt: skip
            shape = shapes[b]
            if shape["coverage"] > MAX_INK_COVERAGE or (shape["box_fill"] > MAX_BOX_FILL and
                                                        shape["box_min_side"] >= 10):  # fmt: skip
                answer.digit, answer.rejected = None, "not-a-digit"
                answer.record = {**record, "ink_shape": shape}
            elif score < inf.reject_below_digit_score:
                answer.digit, answer.rejected = None, "not-a-digit"
                answer.record = {**record, "why": f"digit score {score:.3f} below inference.reject_below_digit_score "
                                                  f"{inf.reject_below_digit_score:g}: the model was trained to answer "
                                                  "like this for what is not a digit"}  # fmt: skip
            elif c < inf.reject_below_confidence:
                answer.digit, answer.rejected = None, "low-confidence"
            out.append(answer)
        return out

    # ---------------------------------------------------------------------------------------- inputs
    def predict(self, sources: list[Any], top_k: int = 3, fast: bool = True) -> list[Answer]:
        """Any image sources (paths, bytes, arrays, PIL images); an unreadable one becomes an `unreadable` answer
        and the others go on. Every readable image goes through the model in one batch; images already in MNIST's
        format take preprocessing's fast path unless `fast` is False (see digitkit.preprocess.mnist_format)."""
        pres: list[Preprocessed | None] = []
        errors: dict[int, str] = {}
        for i, result in enumerate(preprocess_many(sources, self.preprocess_cfg, fast)):
            if isinstance(result, DataError):
                pres.append(None)
                errors[i] = str(result)
            else:
                pres.append(result)
        good = [p for p in pres if p is not None]
        answers = iter(self.answers(good, top_k))
        return [next(answers) if p is not None else Answer(None, 0.0, [], "unreadable", error=errors[i])
                for i, p in enumerate(pres)]  # fmt: skip

    def read(self, source: Any, pattern: str | None = None, top_k: int = 3) -> dict[str, Any]:
        """A row of handwritten digits -> the string, one answer and box per digit, and the pattern check.

        Unread positions (rejected digits) show as '?' in `text`. Raises DataError for an unreadable image.
        """
        from digitkit.preprocess import ink_image, load_image_info, normalize_digit
        from digitkit.realworld.pattern import compile_pattern
        from digitkit.segment import segment_digits

        compiled = compile_pattern(pattern) if pattern is not None else None  # a bad pattern fails before any work
        cfg = self.preprocess_cfg
        gray, info = load_image_info(source, cfg.max_side)
        scale = info["width"] / gray.shape[1] if "width" in info else 1.0
        ink, mask, record = ink_image(gray, cfg)
        pres = []
        for box, crop in segment_digits(ink, mask) if mask.any() else []:
            digit = torch.from_numpy(normalize_digit(crop, cfg)).float()[None]
            pres.append(Preprocessed(digit, None, {"box": [round(v * scale) for v in box]}))
        answers = self.answers(pres, top_k)
        text = "".join(a.digit if a.digit is not None else "?" for a in answers)
        result: dict[str, Any] = {
            "text": text,
            "digits": [{"box": p.record["box"], **a.to_json()} for p, a in zip(pres, answers, strict=True)],
            "complete": all(a.digit is not None for a in answers) and bool(answers),
            "mean_confidence": round(sum(a.confidence for a in answers) / len(answers), 6) if answers else 0.0,
            "record": record,
        }
        for d in result["digits"]:
            d.pop("record", None)
        if compiled is not None:  # linear time whatever the pattern (digitkit.realworld.pattern)
            result.update(pattern=pattern, pattern_ok=compiled.fullmatch(text))
        return result


def digit_score(p: torch.Tensor) -> float:
    """p (K,) probabilities -> the mean over the classes of log(p_top / p_i) (evaluate.digit_scores)."""
    return float(digit_scores(p[None])[0])


def ink_shape(x: torch.Tensor) -> dict[str, float]:
    """x (1, H, W) in [0, 1]: share of pixels lit (> 0.5), and how much of its bounding box the ink fills."""
    return ink_shapes(x[None])[0]


def ink_shapes(x: torch.Tensor) -> list[dict[str, float]]:
    """x (B, 1, H, W) -> `ink_shape` of each image, from a few batched reductions."""
    m = x[:, 0] > 0.5
    pixels = m.shape[1] * m.shape[2]
    lit = m.sum((1, 2)).tolist()
    rows, cols = m.any(2).sum(1).tolist(), m.any(1).sum(1).tolist()
    return [{"coverage": round(n / pixels, 4), "box_fill": round(n / (h * w), 4), "box_min_side": min(h, w)} if n
            else {"coverage": 0.0, "box_fill": 0.0, "box_min_side": 0} for n, h, w in zip(lit, rows, cols, strict=True)]

