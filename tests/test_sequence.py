"""The row reader (issue 23): row geometry, rows composed from digits, the crnn model, CTC training with exact
resume, the SequenceReader (boxes, patterns, rejections), `digitkit read` and the ONNX export."""

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from digitkit import config, data, runs, synth, train
from digitkit.cli import main
from digitkit.errors import ConfigError, DataError
from digitkit.models import count_macs, create_model, list_models, model_task
from digitkit.models.crnn import FRAME_PX
from digitkit.realworld import ctc
from digitkit.realworld.pattern import PatternError
from digitkit.realworld.reader import SequenceReader, char_boxes
from digitkit.rows import RowsConfig, compose, fixed_rows, normalize_row, normalize_row_geometry

from .conftest import MNIST_DIR, ROOT


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_digits(mnist_train) -> data.Dataset:
    return mnist_train.subset(torch.arange(600))


# ---------------------------------------------------------------------------------------------- geometry
def test_normalize_row_scales_the_ink_to_the_band_with_frame_margins():
    ink = np.zeros((300, 900), np.float32)
    ink[50:250, 100:130] = 1.0  # a bar 200 px tall
    ink[50:250, 600:640] = 1.0
    row, geom = normalize_row_geometry(ink)
    cfg = RowsConfig()
    assert row.shape[0] == cfg.height and row.shape[1] % FRAME_PX == 0
    rows_lit = np.flatnonzero(row.max(1) > 0.5)
    assert rows_lit[-1] - rows_lit[0] + 1 == round(cfg.height * cfg.ink_fraction)
    cols = np.flatnonzero(row.max(0) > 0.5)
    assert cols[0] >= 2 * FRAME_PX and row.shape[1] - 1 - cols[-1] >= 2 * FRAME_PX - 1
    # the geometry maps the normalized columns back onto the input's
    assert abs(geom.to_input_x(cols[0]) - 100) <= 2 / geom.scale
    assert abs(geom.to_input_x(cols[-1] + 1) - 640) <= 2 / geom.scale


def test_normalize_row_thickens_a_hairline_from_a_big_photo():
    ink = np.zeros((400, 400), np.float32)
    ink[20:380, 200:202] = 1.0  # a 2 px pen on a 360 px tall digit: 0.13 px once shrunk
    row = normalize_row(ink)
    assert (row > 0.5).sum(1).max() >= 2, "the stroke must come out at least MNIST-thin, not a faint hairline"


def test_normalize_row_refuses_no_ink_and_rows_wider_than_max_width():
    with pytest.raises(DataError, match="no ink"):
        normalize_row(np.zeros((20, 20), np.float32))
    wide = np.zeros((10, 5000), np.float32)
    wide[2:8, :] = 1.0
    with pytest.raises(DataError, match="crop the image to the row"):
        normalize_row(wide)


# ---------------------------------------------------------------------------------------------- composed rows
def test_compose_is_seeded_and_its_targets_match_its_texts(small_digits):
    cfg = RowsConfig(min_digits=2, max_digits=5)
    a = compose(small_digits, 16, torch.Generator().manual_seed(3), cfg)
    b = compose(small_digits, 16, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(a.x, b.x) and a.texts == b.texts
    assert a.x.shape[:3] == (16, 1, cfg.height) and int(a.widths.max()) == a.x.shape[-1]
    assert a.lengths.tolist() == [len(t) for t in a.texts] and all(2 <= len(t) <= 5 for t in a.texts)
    assert "".join(a.texts) == "".join(str(int(c) - 1) for c in a.targets)
    # padding past each row's width is black, and every row has ink inside its own width
    for i, w in enumerate(a.widths.tolist()):
        assert a.x[i, 0, :, w:].abs().sum() == 0 and a.x[i, 0, :, :w].max() > 0.5


def test_touching_rows_really_touch_and_separated_rows_do_not(small_digits):
    cfg = RowsConfig(gap_min=0.2, gap_max=0.4)
    g = torch.Generator().manual_seed(0)
    sep = compose(small_digits, 24, g, cfg, digits=(3, 3), touch=0.0)
    tight = compose(small_digits, 24, g, cfg, digits=(3, 3), touch=1.0)
    assert not sep.touching.any() and tight.touching.all()

    def gaps(batch):  # zero columns between the first and last lit column: none when every neighbour touches
        out = []
        for i, w in enumerate(batch.widths.tolist()):
            lit = batch.x[i, 0, :, :w].max(0).values > 0.05
            cols = torch.nonzero(lit).flatten()
            out.append(int((~lit[cols[0] : cols[-1] + 1]).sum()))
        return out

    assert min(gaps(sep)) > 0
    assert np.mean(gaps(tight)) < np.mean(gaps(sep)) / 3


def test_fixed_rows_give_a_third_touching_rows_and_are_the_same_every_time(small_digits):
    a = fixed_rows(small_digits, 600, seed=5, cfg=RowsConfig(), batch=300)
    b = fixed_rows(small_digits, 600, seed=5, cfg=RowsConfig(), batch=300)
    assert [x.texts for x in a] == [x.texts for x in b]
    share = float(torch.cat([x.touching for x in a]).float().mean())
    assert 0.22 < share < 0.42  # a third of the rows with 2+ digits (1-digit rows cannot touch)


def test_font_share_swaps_in_printed_digits_with_their_labels(small_digits):
    from digitkit.rows import HELD_OUT_FONTS, font_digits, training_fonts

    assert not set(HELD_OUT_FONTS) & set(training_fonts())
    fonts = font_digits(["sans", "serif"], slants=(0.0,))
    assert len(fonts) == 20 and fonts.labels.tolist() == list(range(10)) * 2
    only_3_and_7 = fonts.subset(torch.nonzero((fonts.labels == 3) | (fonts.labels == 7)).flatten())
    g = torch.Generator().manual_seed(0)
    swapped = compose(small_digits, 16, g, RowsConfig(font_share=1.0), digits=(4, 4), fonts=only_3_and_7)
    assert set("".join(swapped.texts)) <= {"3", "7"}  # every digit (image and label) came from the fonts
    assert "".join(swapped.texts) == "".join(str(int(c) - 1) for c in swapped.targets)
    some = compose(small_digits, 64, g, RowsConfig(font_share=0.2), digits=(4, 4), fonts=only_3_and_7)
    share = np.mean([c in "37" for c in "".join(some.texts)])
    assert 0.2 < share < 0.5  # 20% swapped in, plus the MNIST 3s and 7s (20%) among the rest


# ---------------------------------------------------------------------------------------------- model, config
def test_crnn_reads_any_width_and_is_kept_out_of_the_classifier_lists():
    model = create_model("crnn", num_classes=10, img_size=32, channels=(8, 16, 32), hidden=16).eval()
    for width in (32, 36, 200):
        assert model(torch.rand(2, 1, 32, width)).shape == (2, width // FRAME_PX, 11)
    assert "crnn" not in list_models() and "crnn" in list_models("sequence") and model_task("crnn") == "sequence"
    assert count_macs(model, 1, 32, 128) > count_macs(model, 1, 32, 64) > 0
    lstm = create_model("crnn", num_classes=10, img_size=32, channels=(8, 16, 32), hidden=16, lstm=8)
    assert lstm(torch.rand(1, 1, 32, 64)).shape == (1, 16, 11)
    with pytest.raises(ConfigError, match="multiple of 8"):
        create_model("crnn", num_classes=10, img_size=30)


def test_config_ties_the_task_to_the_model_and_checks_rows():
    with pytest.raises(ConfigError, match="set task: classify"):
        config.load(None, ["task=sequence"])
    with pytest.raises(ConfigError, match="set task: sequence"):
        config.load(None, ["model.name=crnn"])
    with pytest.raises(ConfigError, match="rows.height"):
        config.load(ROOT / "configs" / "read.yaml", ["rows.height=30"])
    with pytest.raises(ConfigError, match="non-digit training"):
        config.load(ROOT / "configs" / "read.yaml", ["train.outlier_weight=0.5", "data.negatives_dir=data/negatives"])
    cfg = config.load(ROOT / "configs" / "read.yaml")
    assert cfg.task == "sequence" and cfg.model.name == "crnn"


# ---------------------------------------------------------------------------------------------- training
def _tiny_reader_cfg(*extra):
    return config.load(ROOT / "configs" / "read.yaml", [
        f"data.dir={MNIST_DIR}", "model.args.channels=[8,16,32]", "model.args.hidden=16", "train.epochs=3",
        "train.batch_size=16", "rows.rows_per_epoch=96", "rows.val_rows=32", "rows.test_rows=32",
        "train.plots=false", "rows.max_digits=4", "train.cpu_bf16=false", "rows.font_share=0", *extra,
    ])  # fmt: skip


def test_ctc_training_resumes_exactly_and_reports_rows(tmp_path, small_digits):
    cfg = _tiny_reader_cfg()
    sets = (small_digits.subset(torch.arange(400)), small_digits.subset(torch.arange(400, 500)),
            small_digits.subset(torch.arange(500, 600)))  # fmt: skip
    full = runs.train_run(cfg, out=tmp_path / "full", datasets=sets)
    part = runs.train_run(cfg, out=tmp_path / "part", datasets=sets, stop_after_epochs=1)
    assert part["finished"] is False and part["epochs"] == 1
    resumed = runs.train_run(cfg, resume=tmp_path / "part", datasets=sets)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    history = train.read_metrics(tmp_path / "full" / "metrics.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"], "CTC training must lower the loss"
    assert full["task"] == "sequence" and full["test"]["rows"] == 32 and 0 <= full["test"]["char_accuracy"] <= 1
    assert set(full["test"]) >= {"exact", "touching_exact", "separated_exact", "loss"}
    ckpt = torch.load(next((tmp_path / "full").glob("best-*.pt")), weights_only=True)
    assert ckpt["task"] == "sequence" and ckpt["img_size"] == 32


def test_digitkit_train_prints_a_row_reader_summary(tmp_path, capsys):
    cfg_path = tmp_path / "r.yaml"
    config.save(_tiny_reader_cfg("train.epochs=1", "data.val_fraction=0.1"), cfg_path)
    code = main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "MACs/row of 128 px" in out and "test" in out


# ---------------------------------------------------------------------------------------------- the reader
class _ColumnEngine:
    """A stand-in row model with a known answer: every frame whose columns hold ink says digit 7, the others blank.
    It lets the geometry (frames -> boxes in the input image) be checked exactly."""

    def logits(self, x: torch.Tensor) -> np.ndarray:
        ink = x[:, 0].amax(1)  # (B, W)
        frames = ink.unfold(1, FRAME_PX, FRAME_PX).amax(2) > 0.3  # (B, T)
        out = torch.full((*frames.shape, 11), -20.0)
        out[..., 0] = torch.where(frames, -20.0, 0.0)
        out[..., 8] = torch.where(frames, 0.0, -20.0)
        return out.log_softmax(2).numpy()


def test_reader_maps_each_digit_back_to_a_box_around_its_ink_in_the_input():
    img = np.full((120, 600), 255, np.uint8)
    img[30:90, 100:112] = 0  # three dark bars far apart: three readings of "7"
    img[30:90, 300:312] = 0
    img[30:90, 480:492] = 0
    rdr = SequenceReader(None, engine=_ColumnEngine())
    r = rdr.read(_png(img))
    assert r.text == "777" and r.rejected is None
    for box, x0 in zip([d["box"] for d in r.digits], (100, 300, 480), strict=True):
        assert abs(box[0] - x0) <= 3 and abs(box[2] - (x0 + 12)) <= 3 and abs(box[1] - 30) <= 3
        assert abs(box[3] - 90) <= 3


def test_char_boxes_cover_a_character_of_a_single_frame():
    mask = np.zeros((50, 200), bool)
    mask[10:40, 60:64] = True
    _, geom = normalize_row_geometry(mask.astype(np.float32))
    frame = int((62 - geom.x0) * geom.scale + geom.left) // FRAME_PX
    (box,) = char_boxes(((frame, frame),), geom, mask, 1.0)
    assert box == [60, 10, 64, 40]


def test_reader_rejections_say_why(row_reader_run):
    rdr = SequenceReader.open(row_reader_run)
    assert rdr.read(b"not an image").rejected == "unreadable"
    assert rdr.read(_png(np.full((60, 200), 250, np.uint8))).rejected == "empty"
    line = np.full((100, 4000), 255, np.uint8)
    line[30:70, 10:3990] = 0  # a bar across a page: 100 heights wide
    wide = rdr.read(_png(line))
    assert wide.rejected == "too-wide" and "crop" in wide.why
    t0 = time.perf_counter()
    with pytest.raises(PatternError):
        rdr.read(_png(line), pattern="((\\d+)+)+(")
    assert time.perf_counter() - t0 < 1


def test_a_pattern_constrains_what_the_reader_answers(row_reader_run):
    rdr = SequenceReader.open(row_reader_run)
    ds = data.load_split(MNIST_DIR, "test")
    img, labels, _ = synth.strip([ds.images[i, 0].numpy() for i in range(4)], [int(v) for v in ds.labels[:4]],
                                 seed=1)  # fmt: skip
    free = rdr.read(_png(img))
    five = rdr.read(_png(img), pattern="\\d{5}")
    assert five.pattern_ok is (five.rejected != "no-match")
    if five.pattern_ok:
        assert len(five.text) == 5 and five.text.isdigit()
    never = rdr.read(_png(img), pattern="x")
    assert never.rejected == "no-match" and never.pattern_ok is False and never.text == free.text
    # the confidence is the string's probability: the exact CTC forward figure
    lp = rdr.log_probs([normalize_row_geometry(_ink(img, rdr), rdr.rows_cfg)[0]])[0]
    assert free.confidence == pytest.approx(np.exp(ctc.string_log_prob(lp, free.text)), rel=1e-6)


def _ink(img: np.ndarray, rdr: SequenceReader) -> np.ndarray:
    from digitkit.preprocess import ink_image

    return ink_image(img.astype(np.float32) / 255, rdr.preprocess_cfg)[0]


def test_the_reader_reads_unsure_rows_again_at_other_heights(row_reader_run, monkeypatch):
    import dataclasses

    rdr = SequenceReader.open(row_reader_run)
    ds = data.load_split(MNIST_DIR, "test")
    img, _, _ = synth.strip([ds.images[i, 0].numpy() for i in range(5)], [int(v) for v in ds.labels[:5]], seed=3)
    ink = _ink(img, rdr)
    assert rdr.inference.row_ink_fractions  # configs/read.yaml's, which the fixture trains from
    rdr.inference = dataclasses.replace(rdr.inference, row_ink_fractions=[])
    single = rdr.read(_png(img))

    def read(fractions: list[float], below: float) -> tuple[list[int], object]:
        rdr.inference = dataclasses.replace(rdr.inference, row_ink_fractions=fractions,
                                            reread_below_row_confidence=below)  # fmt: skip
        calls: list[int] = []
        hook = rdr.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        try:
            return calls, rdr.read(_png(img))
        finally:
            hook.remove()

    searches: list[int] = []
    beam = ctc.beam
    with monkeypatch.context() as m:  # the search that decides on reading again is the one the answer starts from
        m.setattr(ctc, "beam", lambda *args, **kw: searches.append(1) or beam(*args, **kw))
        calls, never = read([0.65, 0.75, 0.85], below=0.0)  # no row is less sure than 0: one height, as without them
    assert len(searches) == 1  # once for the row, not once to decide and once more to answer
    assert calls[:1] == [1] and never.text == single.text and never.confidence == single.confidence
    calls, many = read([0.65, 0.75, 0.85], below=1.0)
    assert calls == [1, 2]  # rows.ink_fraction (0.75) first, then the other two heights in one batch
    (lps, geom, first), = rdr.readings([ink])
    assert first == ctc.beam(lps[0])  # the search that decided on reading again, kept for decode
    assert len(lps) == 3 and lps[1].shape[0] < lps[0].shape[0] < lps[2].shape[0]  # 0.75, 0.65, 0.85
    assert np.array_equal(lps[0], rdr.log_probs([normalize_row(ink, rdr.rows_cfg)])[0])
    mean = sum(ctc.string_log_prob(lp, many.text) for lp in lps) / 3
    assert many.confidence == pytest.approx(np.exp(mean), rel=1e-5)
    for lp in lps:  # no reading's own best string is more probable over all three
        own = ctc.beam(lp).text
        assert mean >= sum(ctc.string_log_prob(other, own) for other in lps) / 3 - 1e-9
    assert len(many.digits) == len(many.text)
    # only the rows less sure than the threshold are read again: two rows, a threshold between their confidences
    other = _ink(synth.strip([ds.images[i, 0].numpy() for i in range(5, 8)], [int(v) for v in ds.labels[5:8]],
                             seed=4)[0], rdr)  # fmt: skip
    sure = [ctc.beam(rdr.log_probs([normalize_row(x, rdr.rows_cfg)])[0]).confidence for x in (ink, other)]
    assert sure[0] != sure[1]
    rdr.inference = dataclasses.replace(rdr.inference, reread_below_row_confidence=float(np.sqrt(sure[0] * sure[1])))
    calls = []
    hook = rdr.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        got = rdr.readings([ink, other])
    finally:
        hook.remove()
    assert calls == [2, 2] and sorted(len(g[0]) for g in got) == [1, 3]
    assert len(got[int(np.argmin(sure))][0]) == 3  # the less sure one
    assert isinstance(rdr.readings([np.zeros((10, 10), np.float32)])[0], DataError)  # no ink: said, not raised
    with pytest.raises(ConfigError, match="row_ink_fractions"):
        config.from_dict({"inference": {"row_ink_fractions": [0.75, 2.0]}})
    with pytest.raises(ConfigError, match="reread_below_row_confidence"):
        config.from_dict({"inference": {"reread_below_row_confidence": 1.5}})


def test_low_confidence_rows_are_rejected_with_the_threshold_in_the_reason(row_reader_run):
    import dataclasses

    rdr = SequenceReader.open(row_reader_run)
    rdr.inference = dataclasses.replace(rdr.inference, reject_below_row_confidence=0.999999)
    ds = data.load_split(MNIST_DIR, "test")
    img, _, _ = synth.strip([ds.images[i, 0].numpy() for i in range(6)], [int(v) for v in ds.labels[:6]], seed=2)
    r = rdr.read(_png(img))
    assert r.rejected == "low-confidence" and "reject_below_row_confidence" in r.why
    assert r.to_json()["complete"] is False


# ---------------------------------------------------------------------------------------------- CLI
def test_read_cli_takes_many_paths_and_picks_the_reader_from_the_model(tmp_path, capsys, row_reader_run,
                                                                        mnist_small_run):  # fmt: skip
    ds = data.load_split(MNIST_DIR, "test")
    paths = []
    for k in range(3):
        img, _, _ = synth.strip([ds.images[i, 0].numpy() for i in range(k, k + 3)],
                                [int(v) for v in ds.labels[k : k + 3]], seed=k)  # fmt: skip
        paths.append(tmp_path / f"row{k}.png")
        Image.fromarray(img).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"nope")
    code = main(["read", "--model", str(row_reader_run), str(tmp_path), "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 1 and len(lines) == 4  # the folder's four images; the bad one makes the exit code 1
    assert {x["reader"] for x in lines} == {"sequence"}
    assert [x["rejected"] for x in lines if x["path"].endswith("bad.png")] == ["unreadable"]
    good = [x for x in lines if not x["path"].endswith("bad.png")]
    assert all(len(x["digits"]) == len(x["text"]) and 0 <= x["confidence"] <= 1 for x in good)
    code = main(["read", "--model", str(mnist_small_run), str(paths[0]), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["reader"] == "segment"
    code = main(["read", "--model", str(row_reader_run), str(paths[0]), "--reader", "segment"])
    assert code != 0 and "is a row reader; --reader segment needs a single-digit classifier" in capsys.readouterr().err
    code = main(["read", "--model", str(row_reader_run), str(paths[0]), "--pattern", "x"])
    assert code == 1 and "no-match" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- export
def test_onnx_export_reads_as_pytorch_does_and_refuses_a_stale_file(tmp_path, row_reader_run):
    import shutil

    from digitkit.engine import open_reader
    from digitkit.export import ExportOptions, export_run

    run = tmp_path / "run"
    shutil.copytree(row_reader_run, run)
    report = export_run(run, options=ExportOptions(measure_speed=False))
    assert report.parity["rows"] == 500 and report.parity["agreement"] == 1.0
    with pytest.raises(ConfigError, match="fp32 only"):
        export_run(run, out=tmp_path / "x.onnx", options=ExportOptions(int8=True, measure_speed=False))
    ds = data.load_split(MNIST_DIR, "test")
    img, _, _ = synth.strip([ds.images[i, 0].numpy() for i in range(10, 16)], [int(v) for v in ds.labels[10:16]],
                            seed=4, touch=0.5)  # fmt: skip
    torch_reading = SequenceReader.open(run).read(_png(img))
    onnx_reading = open_reader(run).read(_png(img))
    assert onnx_reading.text == torch_reading.text
    assert onnx_reading.confidence == pytest.approx(torch_reading.confidence, abs=1e-4)
    ckpt = next(run.glob("best-*.pt"))
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # another checkpoint now: the export no longer belongs to it
    with pytest.raises(DataError, match="re-export"):
        open_reader(run)


# ---------------------------------------------------------------------------------------------- pages
def _form(seed: int, n_fields: int = 4, photo: bool = True):
    ds = data.load_split(MNIST_DIR, "test")
    rng = np.random.default_rng(seed)
    fields = []
    for _ in range(n_fields):
        idx = rng.integers(0, len(ds), int(rng.integers(3, 8)))
        fields.append(([ds.images[i, 0].numpy() for i in idx], [int(ds.labels[i]) for i in idx]))
    return synth.form_page(fields, seed=seed, photo=photo)


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("seed, photo", [(0, True), (1, False), (2, True)])
def test_every_handwritten_field_of_a_form_gets_its_own_box(seed, photo):
    from digitkit.preprocess import PreprocessConfig, ink_image, load_image_info
    from digitkit.realworld.page import field_boxes

    img, truths = _form(seed, 5, photo)
    gray, _ = load_image_info(img, 4096)
    _, mask, _ = ink_image(gray, PreprocessConfig())
    boxes, owner = field_boxes(mask)
    for t in truths:  # each written number is one field, not split and not merged with its printed label
        best = max(boxes, key=lambda b: _iou(b, t["box"]))
        assert _iou(best, t["box"]) > 0.8, (t, best)
    assert len(boxes) >= len(truths) + 1  # the printed labels and the title are fields of their own
    assert owner.max() == len(boxes)


def test_read_page_names_fields_by_pattern_and_reports_the_missing(row_reader_run, tmp_path, capsys):
    from digitkit.realworld.page import MAX_NAMED_FIELDS, read_page

    rdr = SequenceReader.open(row_reader_run)
    img, truths = _form(3, 3)
    page = read_page(rdr, _png(img), {"anything": "\\d+", "never": "x"})
    assert page.missing == ["never"] and page.rejected is None
    named = [f for f in page.fields if f.get("name") == "anything"]
    assert len(named) == 1 and named[0]["pattern_ok"] and named[0]["text"].isdigit()
    assert all(set(f) >= {"box", "text", "confidence", "digits", "rejected"} for f in page.fields)
    h, w = img.shape[:2]
    assert all(0 <= f["box"][0] < f["box"][2] <= w and 0 <= f["box"][1] < f["box"][3] <= h for f in page.fields)
    assert read_page(rdr, b"junk", {"a": "\\d"}).rejected == "unreadable"
    with pytest.raises(DataError, match="named fields"):
        read_page(rdr, _png(img), {f"f{i}": "\\d" for i in range(MAX_NAMED_FIELDS + 1)})
    with pytest.raises(PatternError):
        read_page(rdr, _png(img), {"bad": "(\\d"})
    path = tmp_path / "form.png"
    Image.fromarray(img).save(path)
    code = main(["read", "--model", str(row_reader_run), str(path), "--field", "n=\\d+", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["page"] and out["missing"] == [] and any(f.get("name") == "n" for f in out["fields"])
    code = main(["read", "--model", str(row_reader_run), str(path), "--field", "bad name=1"])
    assert code != 0 and "expected NAME=REGEX" in capsys.readouterr().err


def test_an_lstm_head_exports_with_a_dynamic_frame_axis():
    import onnxruntime as ort

    from digitkit.export_sequence import to_onnx_sequence

    model = create_model("crnn", num_classes=10, img_size=32, channels=(8, 16, 32), hidden=16, lstm=8).eval()
    raw = to_onnx_sequence(model, 32, 18, {"model": "crnn"})
    session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    out = session.get_outputs()[0]
    assert out.shape[1] == "frames", out.shape  # not the example's 32 frames
    x = torch.rand(2, 1, 32, 400)
    got = session.run(None, {"rows": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).log_softmax(2).numpy()
    assert got.shape == (2, 100, 11) and np.abs(got - ref).max() < 1e-4
