"""Request and response bodies of the REST API (pydantic): what /openapi.json publishes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

Pixels = list[list[StrictFloat]]
"""Numbers only: true/false are not pixel values (a strict float takes ints and floats, not booleans)."""
METHODS = Literal["saliency", "smoothgrad", "integrated-gradients", "gradcam"]


class ImageIn(BaseModel):
    """One image: `image` (base64 of a PNG/JPEG/... file, optionally as a data: URL) or `pixels` (rows of numbers,
    0-255, or floats in 0-1; any polarity)."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64-encoded image file, or a data:image/...;base64, URL")
    pixels: Pixels | None = Field(None, description="rows of pixel values, e.g. 28 rows of 28 numbers")
    model_input: bool = Field(False, description="`pixels` are already the model's input (28x28, white digit on "
                              "black, centred like MNIST): skip preprocessing. For clients that prepare images "
                              "themselves; anything else should leave this false")  # fmt: skip


class PredictIn(ImageIn):
    top_k: int = Field(3, ge=1, le=100, description="how many most likely digits to list")
    return_input: bool = Field(False, description="include the 28x28 image the model saw, as base64 PNG")
    preview: bool = Field(False, description="a live preview of an unfinished drawing: answered and audited "
                          "(route `preview`) but kept out of the drift statistics")  # fmt: skip


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImageIn] = Field(..., description="up to the server's max_batch images (256 by default)")
    top_k: int = Field(3, ge=1, le=100)
    return_input: bool = False


class ReadIn(ImageIn):
    pattern: str | None = Field(None, max_length=200, description="regular expression the whole string must match")


class ExplainIn(ImageIn):
    methods: list[METHODS] = Field(default_factory=lambda: ["saliency", "gradcam"], min_length=1, max_length=4)


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=64)
    true_label: str = Field(..., min_length=1, max_length=16, description="the correct class, e.g. \"7\"")


class ReloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="run folder or checkpoint on the server; default: the current one")


class TopK(BaseModel):
    digit: str
    probability: float


class Prediction(BaseModel):
    request_id: str
    model_version: str
    digit: str | None = Field(..., description="null when rejected")
    confidence: float
    probabilities: list[float] = Field(..., description="one per class; empty when the image was rejected "
                                       "before the model ran (unreadable, empty, no-ink)")
    rejected: str | None = Field(..., description="null, or unreadable, empty, no-ink, not-a-digit, low-confidence")
    predicted: str | None = Field(None, description="the model's top class, even when rejected for low confidence")
    digit_score: float | None = Field(None, description="mean over the classes of log(p_top / p_i): low when the "
                                      "answer is close to 'no idea', which a model trained with non-digits gives "
                                      "them (null when the model did not run)")
    input_kind: str | None = Field(None, description="what preprocessing took the image for: clean, canvas, photo, "
                                   "scan, or mnist (already in MNIST's format: the fast path); null when it could not "
                                   "be read")
    top_k: list[TopK]
    error: str | None = None
    latency_ms: float
    cached: bool
    input_png: str | None = None


class BatchOut(BaseModel):
    results: list[Prediction]
    count: int
    latency_ms: float


class ReadDigit(BaseModel):
    model_config = ConfigDict(extra="allow")
    box: list[int] = Field(..., description="[x0, y0, x1, y1] in the input image's pixels (x1, y1 exclusive)")
    digit: str | None
    confidence: float = Field(..., description="row reader: the digit's highest probability over its frames; "
                              "segment reader: the classifier's confidence in the cut-out digit")  # fmt: skip
    rejected: str | None = Field(None, description="segment reader only: why this digit was not read")


class ReadOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    request_id: str
    model_version: str = Field(..., description="the row reader's version when it answered (GET /v1/model: reader)")
    reader: Literal["sequence", "segment"] = Field("segment", description="sequence: a row reader read the whole "
                                                  "row; segment: the model read the digits cut out of it")
    text: str = Field(..., description="the string read; the segment reader shows an unread digit as '?'")
    confidence: float | None = Field(None, description="row reader: the probability of the whole string")
    rejected: str | None = Field(None, description="row reader: null, or unreadable, empty, no-ink, too-wide, "
                                 "no-match, low-confidence")  # fmt: skip
    why: str | None = Field(None, description="row reader: why it was rejected, in words")
    digits: list[ReadDigit]
    complete: bool
    mean_confidence: float
    latency_ms: float
    pattern: str | None = None
    pattern_ok: bool | None = Field(None, description="whether `text` matches `pattern` (null without a pattern, or "
                                    "when there was nothing to read)")  # fmt: skip


class ExplainOut(Prediction):
    overlays: dict[str, str] = Field(..., description="method -> base64 PNG (28x28 heat map over the input)")
    overlay_errors: dict[str, str]


class FeedbackOut(BaseModel):
    request_id: str
    true_label: str
    predicted: str | None
    correct: bool


class ReaderOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: Literal["sequence", "segment"] = Field(..., description="sequence: a row reader answers /v1/read; "
                                                 "segment: the model reads the digits cut out of the row")
    name: str
    version: str = Field(..., description="the model_version of /v1/read answers")
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    model: str | None = None
    metrics: dict[str, Any] | None = None
    contract: dict[str, Any] | None = None


class ModelOut(BaseModel):
    name: str
    version: str
    checkpoint: str
    checkpoint_sha256: str
    classes: list[str]
    metrics: dict[str, Any]
    contract: dict[str, Any]
    drift_baseline: dict[str, Any]
    reader: ReaderOut = Field(..., description="what answers /v1/read")
    alerts: dict[str, Any] | None = Field(None, description="the alerts firing now and the reference accuracy; "
                                          "details at /v1/alerts")


class AlertStateOut(BaseModel):
    name: str
    firing: bool
    value: float | None = Field(..., description="accuracy_drop: percentage points below the reference; latency: "
                                "ratio to the startup baseline; class_error: the worst class's error rate; null "
                                "while there are too few samples")
    threshold: float = Field(..., description="fires above this value")
    count: int = Field(..., description="the samples the value rests on")
    minimum: int = Field(..., description="samples needed before a verdict")
    since: float = Field(..., description="when the alert last changed state (epoch seconds)")
    detail: dict[str, Any]


class AlertsOut(BaseModel):
    alerts: dict[str, AlertStateOut]
    firing: list[str]
    reference_accuracy: float | None
    reference_source: str
    baseline_latency_ms: float | None
    window: int
    labels_in_window: int
    latencies_in_window: int
    model_version: str
    webhook: dict[str, Any] | None = Field(None, description="null without alerts.webhook_url; else its outcome "
                                           "counts and the messages waiting")


class ErrorOut(BaseModel):
    error: str
    detail: Any
