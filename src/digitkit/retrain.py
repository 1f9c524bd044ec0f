"""Close the loop from serving feedback to the served model: export, retrain, compare, promote, reload.

`retrain(audit_db, base_run, out)` (the CLI's `digitkit retrain --from-audit DB --base RUN --out DIR`):

1. exports the labelled feedback of the audit log (AuditLog.export_idx: the 28x28 model inputs and their true
   labels). Rows the base already trained on (listed in the request_ids.txt of its data.extra_dirs, i.e. an earlier
   retrain's feedback) are left out: they are in the training data already and could not be a fair hold-out;
2. splits the rest, seeded and stratified by label, into a training part (DIR/feedback/train) and a held-out part
   (DIR/feedback/holdout, `holdout` of each label, 0.3 by default); too few of either is an error;
3. trains a candidate into DIR with the base's stored config plus the training part as extra data (`--set`
   overrides allowed, not ones that move the validation split), so the base's validation images stay out of
   training for both models;
4. measures base and candidate, top-1 accuracy on every image, on (a) the base's validation split and (b) the
   held-out feedback. The test set is never read for the decision;
5. decides by RULE (below), writes DIR/retrain.json, and when promoted and `promote_to` is given, points the link
   `promote_to` at DIR (a symbolic link replaced by an atomic rename); with `reload_url` it then asks a running
   server to load it (POST /v1/admin/reload) and checks that it serves the candidate's checkpoint.

RULE: promote only if the candidate is not worse than the base by more than `val_tolerance` points (default 0.1)
on the validation split AND by more than `feedback_tolerance` points (default 0) on the held-out feedback.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from digitkit import config, data, runs
from digitkit.errors import ConfigError, DataError
from digitkit.idx import atomic_write_bytes

DEFAULT_HOLDOUT = 0.3
DEFAULT_VAL_TOLERANCE = 0.1
"""Points of validation accuracy the candidate may lose: about one image in 1,000, the noise of one retraining."""
DEFAULT_FEEDBACK_TOLERANCE = 0.0
DEFAULT_MIN_HOLDOUT = 10
DEFAULT_MIN_TRAIN = 10
REQUEST_IDS = "request_ids.txt"
REPORT = "retrain.json"
RELOAD_TIMEOUT_S = 300.0
SPLIT_KEYS = "data.dir, data.val_fraction, data.split_seed and seed"


def rule_text(val_tolerance: float, feedback_tolerance: float) -> str:
    return (f"promote only if the candidate is not worse than the base by more than {val_tolerance:g} points on the "
            f"validation split AND by more than {feedback_tolerance:g} points on the held-out feedback (top-1 "
            "accuracy on every image; the test set plays no part)")  # fmt: skip


@dataclass
class Comparison:
    """Base and candidate on one set of images."""

    name: str
    """validation or feedback."""
    source: str
    images: int
    base_correct: int
    candidate_correct: int
    tolerance_points: float
    fixed: int
    """Images the base got wrong and the candidate right."""
    broken: int
    """Images the base got right and the candidate wrong."""

    @property
    def base_accuracy(self) -> float:
        return self.base_correct / self.images

    @property
    def candidate_accuracy(self) -> float:
        return self.candidate_correct / self.images

    @property
    def difference_points(self) -> float:
        """Candidate minus base, in percentage points."""
        return 100 * (self.candidate_correct - self.base_correct) / self.images

    @property
    def passed(self) -> bool:
        return self.difference_points >= -self.tolerance_points - 1e-9

    @property
    def mcnemar_p(self) -> float:
        """Exact two-sided McNemar p-value of the fixed/broken counts: is the difference more than chance? For
        information only; the rule does not use it."""
        n = self.fixed + self.broken
        if n == 0:
            return 1.0
        tail = sum(math.comb(n, k) for k in range(min(self.fixed, self.broken) + 1)) / 2**n
        return min(1.0, 2 * tail)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "base_accuracy": self.base_accuracy, "candidate_accuracy": self.candidate_accuracy,
                "difference_points": round(self.difference_points, 4), "passed": self.passed,
                "mcnemar_p": self.mcnemar_p}  # fmt: skip


@dataclass
class RetrainReport:
    """What `retrain` did and decided; DIR/retrain.json holds `to_json()`."""

    audit_db: str
    base: str
    candidate: str
    feedback: dict[str, Any]
    """Counts: labelled (exported), already_trained (in the base's extra data, left out), train, holdout; per-label
    counts; the folders; the hold-out fraction and seed."""
    overrides: list[str]
    rule: str
    comparisons: list[Comparison]
    promoted: bool
    reasons: list[str]
    """Why the candidate was refused (empty when promoted)."""
    promoted_to: str | None = None
    replaced: str | None = None
    """What `promoted_to` pointed at before (to roll back: point it there again and reload)."""
    reload: dict[str, Any] | None = None
    """The server's answer to the admin reload: url, version, checkpoint_sha256."""
    candidate_summary: dict[str, Any] = field(default_factory=dict)
    """The candidate's epochs, seconds and validation figures from its summary.json (no test figures)."""
    seconds: float = 0.0

    @property
    def decision(self) -> str:
        return "promoted" if self.promoted else "refused"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["comparisons"] = [c.to_json() for c in self.comparisons]
        out["decision"] = self.decision
        return out


def retrain(
    audit_db: str | Path,
    base_run: str | Path,
    out: str | Path,
    *,
    holdout: float = DEFAULT_HOLDOUT,
    overrides: list[str] | None = None,
    seed: int = 0,
    val_tolerance: float = DEFAULT_VAL_TOLERANCE,
    feedback_tolerance: float = DEFAULT_FEEDBACK_TOLERANCE,
    min_holdout: int = DEFAULT_MIN_HOLDOUT,
    min_train: int = DEFAULT_MIN_TRAIN,
    promote_to: str | Path | None = None,
    reload_url: str | None = None,
    admin_token: str | None = None,
    reporter: Any = None,
) -> RetrainReport:
    """Export the labelled feedback of `audit_db`, train a candidate from `base_run` with part of it into `out`,
    compare the two on the base's validation split and the held-out feedback, and promote by the rule (module
    docstring). Errors (ConfigError, DataError) come before anything is trained where they can."""
    started = time.perf_counter()
    overrides = list(overrides or [])
    _check_numbers(holdout, val_tolerance, feedback_tolerance, min_holdout, min_train)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not empty; give a new folder for the candidate run")
    if reload_url is not None:
        check_reload_url(reload_url)
        if not admin_token:
            raise ConfigError("--reload needs the server's admin token: --admin-token-file FILE (or "
                              "DIGITKIT_ADMIN_TOKEN), the one the server was started with")  # fmt: skip
    if promote_to is not None:
        _check_link(Path(promote_to))
    base = _open_base(base_run)
    cfg = candidate_config(base.cfg, overrides)
    log = open_audit(audit_db)

    # 1-2. Feedback: export, drop what the base trained on, split.
    feedback_dir = out / "feedback"
    try:
        feedback_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=feedback_dir, prefix=".export-") as tmp:
            try:
                log.export_idx(Path(tmp), labelled_only=True, classes=list(base.ckpt["classes"]))
            except DataError as e:
                raise DataError(f"retrain --from-audit: {e}") from None
            ds = data.load_extra(tmp, list(base.ckpt["classes"]), _image_shape(base.ckpt))
            ids = (Path(tmp) / REQUEST_IDS).read_text().split()
        feedback = split_feedback(ds, ids, feedback_dir, known_ids=trained_request_ids(base.cfg), holdout=holdout,
                                  seed=seed, min_holdout=min_holdout, min_train=min_train)  # fmt: skip
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing trained: leave no half-made candidate behind
        raise
    finally:
        log.close()

    # 3. The candidate: the base's recipe, the new feedback added to the training portion only.
    cfg.data.extra_dirs = [*cfg.data.extra_dirs, str(Path(feedback["train_dir"]).resolve())]
    summary = runs.train_run(cfg, out=out, reporter=reporter)
    candidate = runs.open_model(out)

    # 4. Both models on the base's validation split and on the held-out feedback.
    comparisons = [
        compare_on_validation(base, candidate, val_tolerance),
        compare_on_feedback(base, candidate, Path(feedback["holdout_dir"]), feedback_tolerance),
    ]
    reasons = [f"{c.name}: the candidate is {-c.difference_points:.2f} points worse than the base "
               f"({100 * c.candidate_accuracy:.2f}% against {100 * c.base_accuracy:.2f}% on {c.images:,} images; "
               f"the rule allows {c.tolerance_points:g})" for c in comparisons if not c.passed]  # fmt: skip
    report = RetrainReport(
        audit_db=log.display_url, base=str(base.run_dir or base.checkpoint_path), candidate=str(out.resolve()),
        feedback=feedback, overrides=overrides, rule=rule_text(val_tolerance, feedback_tolerance),
        comparisons=comparisons, promoted=not reasons, reasons=reasons,
        candidate_summary={k: summary.get(k) for k in ("epochs", "best_epoch", "train_seconds", "val_accuracy",
                                                        "val_log_loss", "extra_training_images", "checkpoint")},
    )  # fmt: skip

    # 5. Promotion: the link, then the running server.
    reload_error = None
    if report.promoted and promote_to is not None:
        report.replaced = promote(Path(promote_to), out)
        report.promoted_to = str(Path(promote_to).absolute())
    if report.promoted and reload_url is not None:
        target = Path(promote_to).absolute() if promote_to is not None else out.resolve()
        try:
            report.reload = reload_server(reload_url, admin_token or "", target,
                                          expect_sha256=runs.checkpoint_sha256(candidate.checkpoint_path))  # fmt: skip
        except DataError as e:
            reload_error = e
            report.reload = {"url": reload_url, "error": str(e)}
    report.seconds = round(time.perf_counter() - started, 2)
    atomic_write_bytes(out / REPORT, (json.dumps(report.to_json(), indent=2) + "\n").encode())
    if reload_error is not None:
        where = f"{promote_to} points at the candidate, but " if report.promoted_to else ""
        raise DataError(f"{where}the server did not switch to it: {reload_error}; the report is in {out / REPORT}")
    return report


# ---------------------------------------------------------------------------------------------- inputs
def _check_numbers(holdout: float, val_tol: float, fb_tol: float, min_holdout: int, min_train: int) -> None:
    if not 0 < holdout < 1:
        raise ConfigError(f"--holdout {holdout}: expected a fraction in (0, 1) of the new feedback to hold out for "
                          "the comparison, such as 0.3")  # fmt: skip
    for flag, value in (("--val-tolerance", val_tol), ("--feedback-tolerance", fb_tol)):
        if not (math.isfinite(value) and 0 <= value <= 100):
            raise ConfigError(f"{flag} {value}: expected points of accuracy in [0, 100] the candidate may lose, "
                              "such as 0.1")  # fmt: skip
    for flag, count in (("--min-holdout", min_holdout), ("--min-train", min_train)):
        if count < 1:
            raise ConfigError(f"{flag} {count}: expected a positive number of images")


def open_audit(url: str | Path) -> Any:
    """The audit log at `url`; a SQLite file must exist (opening a missing one would create an empty log)."""
    from digitkit.serve.audit import AuditLog, normalize_url

    parsed = normalize_url(str(url))
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise DataError(f"--from-audit {url}: no such audit database; expected the SQLite file (or URL) the server "
                        "writes, as given to `digitkit serve --audit-db` (default: serve/audit.db in the served run "
                        "folder)")  # fmt: skip
    return AuditLog(str(url))


def _open_base(base_run: str | Path) -> runs.Opened:
    opened = runs.open_model(base_run)
    if opened.ckpt.get("task") == "sequence" or opened.cfg.task == "sequence":
        raise ConfigError(f"--base {base_run}: a row reader (task: sequence); retrain improves the single-digit "
                          "classifier that `digitkit serve --model` serves and feedback labels; pass that run")
    if not opened.cfg.has_validation:
        raise ConfigError(f"--base {base_run}: trained on every training image (data.val_fraction 0), so it has no "
                          "validation split to compare on; pass a run trained with a hold-out")  # fmt: skip
    return opened


def _image_shape(ckpt: dict[str, Any]) -> tuple[int, int]:
    return int(ckpt["img_size"]), int(ckpt["img_size"])


def candidate_config(base_cfg: config.Config, overrides: list[str]) -> config.Config:
    """The base's stored config with `overrides` (KEY=VALUE) applied; one that moves the validation split (another
    data folder, fraction or seed) is refused, since the comparison needs the same validation images."""
    raw = config.to_dict(copy.deepcopy(base_cfg))
    try:
        cfg = config.from_dict(config.apply_overrides(raw, overrides))
    except ConfigError as e:
        raise ConfigError(f"retrain --set: {e}; fix or drop that --set (the base run's config.yaml lists the keys)"
                          ) from None  # fmt: skip
    split = (str(base_cfg.data.dir), base_cfg.data.val_fraction, base_cfg.split_seed)
    if (str(cfg.data.dir), cfg.data.val_fraction, cfg.split_seed) != split:
        raise ConfigError(f"retrain --set {' '.join(overrides)}: moves the validation split ({SPLIT_KEYS} must stay "
                          "as the base's), so base and candidate could not be compared on the same images; drop "
                          "those --set (set data.split_seed to keep the split while changing seed)")  # fmt: skip
    return cfg


def trained_request_ids(cfg: config.Config) -> set[str]:
    """Audit rows the model trained on: the request ids listed beside its extra training sets (audit exports)."""
    ids: set[str] = set()
    for folder in cfg.data.extra_dirs:
        path = Path(folder) / REQUEST_IDS
        if path.is_file():
            ids.update(path.read_text().split())
    return ids


def split_feedback(ds: data.Dataset, ids: list[str], folder: Path, known_ids: set[str], holdout: float = 0.3,
                   seed: int = 0, min_holdout: int = DEFAULT_MIN_HOLDOUT,
                   min_train: int = DEFAULT_MIN_TRAIN) -> dict[str, Any]:  # fmt: skip
    """Leave out the rows in `known_ids`, split the rest seeded and stratified by label (data.stratified_split: each
    label keeps `holdout` of its images, rounded), write folder/train and folder/holdout as IDX training sets (with
    request_ids.txt), and return the counts. Too few images on either side: DataError."""
    if len(ids) != len(ds):
        raise DataError(f"feedback export: {len(ds)} images but {len(ids)} request ids; export again")
    fresh = torch.tensor([i for i, rid in enumerate(ids) if rid not in known_ids], dtype=torch.long)
    already = len(ids) - len(fresh)
    new = ds.subset(fresh)
    train_idx, hold_idx = (data.stratified_split(new.labels, holdout, seed) if len(new)
                           else (torch.empty(0, dtype=torch.long),) * 2)  # fmt: skip
    if len(hold_idx) < min_holdout or len(train_idx) < min_train:
        skipped = f" ({already:,} more the base trained on already)" if already else ""
        raise DataError(
            f"too little new feedback: {len(new):,} labelled images{skipped}; --holdout {holdout:g} makes "
            f"{len(hold_idx):,} held out and {len(train_idx):,} to train on, and retrain needs at least {min_holdout} "
            f"held out and {min_train} to train on; collect more labels (POST /v1/feedback), or lower --min-holdout "
            "/ --min-train"
        )
    parts = {}
    for name, idx in (("train", train_idx), ("holdout", hold_idx)):
        part = new.subset(idx)
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        data.save_split(part, target, "train")
        (target / data.CLASSES_FILE).write_text("\n".join(part.classes) + "\n")
        (target / REQUEST_IDS).write_text("".join(f"{ids[int(fresh[i])]}\n" for i in idx))
        data.write_sums(target)
        parts[name] = {c: k for c, k in zip(part.classes, part.class_counts(), strict=True) if k}
    return {
        "labelled": len(ids), "already_trained": already, "train": len(train_idx), "holdout": len(hold_idx),
        "holdout_fraction": holdout, "seed": seed, "train_per_class": parts["train"],
        "holdout_per_class": parts["holdout"], "train_dir": str(folder / "train"),
        "holdout_dir": str(folder / "holdout"),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- measuring
def correct_mask(opened: runs.Opened, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which images the model gets right (top-1, no rejection)."""
    from digitkit.evaluate import predict_logits

    logits = predict_logits(opened.model, images, opened.cfg.train.eval_batch_size)
    return logits.argmax(1) == labels


def _compare(name: str, source: str, base_ok: torch.Tensor, cand_ok: torch.Tensor, tol: float) -> Comparison:
    return Comparison(name=name, source=source, images=len(base_ok), base_correct=int(base_ok.sum()),
                      candidate_correct=int(cand_ok.sum()), tolerance_points=tol,
                      fixed=int((~base_ok & cand_ok).sum()), broken=int((base_ok & ~cand_ok).sum()))  # fmt: skip


def compare_on_validation(base: runs.Opened, candidate: runs.Opened, tol: float) -> Comparison:
    """Both on the base's validation split (each model's images prepared by its own config: deskew)."""
    oks = []
    for opened in (base, candidate):
        ds, _ = runs.evaluation_data(opened.cfg, "val")
        oks.append(correct_mask(opened, ds.images, ds.labels))
    source = f"validation split of {base.cfg.data.dir} (val_fraction {base.cfg.data.val_fraction:g}, seed " \
             f"{base.cfg.split_seed})"
    return _compare("validation", source, oks[0], oks[1], tol)


def compare_on_feedback(base: runs.Opened, candidate: runs.Opened, folder: Path, tol: float) -> Comparison:
    """Both on the held-out feedback, prepared as training prepares extra data."""
    oks = []
    for opened in (base, candidate):
        ds = data.load_extra(folder, list(opened.ckpt["classes"]), _image_shape(opened.ckpt))
        ds = runs.prepared(ds, opened.cfg)
        oks.append(correct_mask(opened, ds.images, ds.labels))
    return _compare("feedback", f"held-out feedback {folder}", oks[0], oks[1], tol)


# ---------------------------------------------------------------------------------------------- promotion
def _check_link(link: Path) -> None:
    if (link.exists() or link.is_symlink()) and not link.is_symlink():
        raise ConfigError(f"--promote-to {link}: exists and is not a symbolic link; retrain points a link at the "
                          f"promoted run (atomically). Give a new path or a link (ln -sfn RUN {link}), and serve it: "
                          f"digitkit serve --model {link}")  # fmt: skip


def promote(link: Path, run_dir: Path) -> str | None:
    """Point the symbolic link `link` at `run_dir` (absolute) by an atomic rename; returns its previous target."""
    _check_link(link)
    previous = os.readlink(link) if link.is_symlink() else None
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.resolve(), target_is_directory=True)
    os.replace(tmp, link)  # a reader sees the old target or the new one, never no link
    return previous


def check_reload_url(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--reload {url!r}: expected the server's base URL, such as http://127.0.0.1:8000")


def read_admin_token(path: str | Path | None) -> str | None:
    """The admin token from a file (as `digitkit serve --admin-token-file`), else DIGITKIT_ADMIN_TOKEN, else None."""
    if path is None:
        return os.environ.get("DIGITKIT_ADMIN_TOKEN") or None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"--admin-token-file {path}: cannot read it ({e.strerror})") from None
    if not token:
        raise ConfigError(f"--admin-token-file {path}: the file is empty; it must hold the server's admin token")
    return token


def reload_server(url: str, admin_token: str, model: Path | None = None, expect_sha256: str | None = None,
                  timeout: float = RELOAD_TIMEOUT_S) -> dict[str, Any]:  # fmt: skip
    """POST /v1/admin/reload (with `model`, else the server's current path) and return what the server now serves
    (url, version, checkpoint, checkpoint_sha256) and the seconds the reload took. The old model answers until the
    new one is loaded. When `expect_sha256` is given and the server serves another checkpoint: DataError."""
    check_reload_url(url)
    body = json.dumps({"model": str(model)} if model is not None else {}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/v1/admin/reload", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Admin-Token": admin_token})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            info = json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail")
        except (ValueError, AttributeError):
            detail = e.reason
        raise DataError(f"--reload {url}: the server answered {e.code} ({detail})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"--reload {url}: cannot reach the server ({reason}); check it runs and the URL") from None
    if expect_sha256 is not None and info.get("checkpoint_sha256") != expect_sha256:
        raise DataError(f"--reload {url}: the server now serves {info.get('version')}, not the candidate; its "
                        f"model path must be the promoted link (digitkit serve --model {model})")  # fmt: skip
    return {"url": url, **{k: info.get(k) for k in ("version", "checkpoint", "checkpoint_sha256")},
            "seconds": round(time.perf_counter() - started, 3)}


# ---------------------------------------------------------------------------------------------- printing
def _limit(tolerance: float) -> str:
    return f"{-tolerance:+.2f}" if tolerance else "0.00"


def report_text(r: RetrainReport) -> str:
    """The figures, the rule and the decision, as `digitkit retrain` prints them."""
    f = r.feedback
    skipped = f", {f['already_trained']:,} already in the base's training data left out" if f["already_trained"] else ""
    lines = [
        f"base       {r.base}",
        f"candidate  {r.candidate}",
        f"feedback   {f['labelled']:,} labelled images from {r.audit_db}{skipped}: {f['train']:,} added to training, "
        f"{f['holdout']:,} held out (seed {f['seed']})",
        f"rule       {r.rule}",
        "",
        f"{'':<11}{'images':>8}{'base':>10}{'candidate':>11}{'change':>10}{'allowed':>9}{'fixed':>7}{'broken':>8}",
    ]
    for c in r.comparisons:
        lines.append(f"{c.name:<11}{c.images:>8,}{100 * c.base_accuracy:>9.2f}%{100 * c.candidate_accuracy:>10.2f}%"
                     f"{c.difference_points:>+10.2f}{_limit(c.tolerance_points):>9}{c.fixed:>7,}{c.broken:>8,}"
                     f"  {'ok' if c.passed else 'WORSE'}")  # fmt: skip
    lines.append("")
    if r.promoted:
        lines.append("decision   PROMOTED: the candidate is not worse on either set")
        if r.promoted_to:
            lines.append(f"           {r.promoted_to} -> {r.candidate}"
                         + (f" (was {r.replaced})" if r.replaced else ""))  # fmt: skip
        if r.reload:
            lines.append(f"           {r.reload['url']} now serves {r.reload.get('version')}")
        elif r.promoted_to:
            lines.append(f"           a server started with --model {r.promoted_to} serves it after an admin reload "
                         "(POST /v1/admin/reload) or a restart")  # fmt: skip
    else:
        lines.append("decision   REFUSED: " + "; ".join(r.reasons))
        lines.append("           nothing was promoted; the base keeps serving")
    return "\n".join(lines)
