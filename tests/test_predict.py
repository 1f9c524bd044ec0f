"""`digitkit predict` and `digitkit read` end to end, with a small real MNIST model and realistic inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digitkit import classify, data, preprocess, synth
from digitkit.classify import Recognizer
from digitkit.cli import main

from .conftest import MNIST_DIR


@pytest.fixture(scope="module")
def mnist_test():
    return data.load_split(MNIST_DIR, "test")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def save(path: Path, image) -> Path:
    arr = np.asarray(image)
    Image.fromarray(arr).save(path)
    return path


def test_predict_reports_every_file_and_goes_on(mnist_small_run, mnist_test, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    labels = {}
    for i in range(8):
        kind = ("pen_on_paper", "photo", "scan", "canvas_rgba")[i % 4]
        img = synth.KINDS[kind](mnist_test.images[i, 0].numpy(), np.random.default_rng(i))
        p = save(folder / ("sub" if i % 2 else "") / f"d{i}.png", img)
        labels[str(p)] = str(int(mnist_test.labels[i]))
    blank = save(folder / "blank.png", np.full((300, 200), 240, np.uint8))
    empty_canvas = save(folder / "canvas.png", np.zeros((280, 280, 4), np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    code, out, err = run_cli(capsys, "predict", "--model", mnist_small_run, folder, tmp_path / "missing.jpg", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    by_path = {r["path"]: r for r in lines}
    assert code == 1  # some files were unreadable; the others were still answered
    assert len(lines) == 8 + 3 + 1 and not any(p.endswith("notes.txt") for p in by_path)
    for r in lines:
        assert set(r) >= {"path", "digit", "confidence", "probabilities", "rejected"}
    right = sum(by_path[p]["digit"] == y for p, y in labels.items())
    assert right >= 7, {p: (by_path[p]["digit"], y) for p, y in labels.items()}
    for p in labels:
        assert len(by_path[p]["probabilities"]) == 10 and sum(by_path[p]["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert by_path[str(blank)]["digit"] is None and by_path[str(blank)]["rejected"] == "empty"
    assert by_path[str(empty_canvas)]["rejected"] in ("empty", "no-ink")
    broken = by_path[str(folder / "broken.png")]
    assert broken["rejected"] == "unreadable" and "not an image" in broken["error"]
    missing = by_path[str(tmp_path / "missing.jpg")]
    assert missing["rejected"] == "unreadable" and "no such image file" in missing["error"]


def test_predict_text_output_top_k_and_shown_inputs(mnist_small_run, mnist_test, tmp_path, capsys):
    p = save(tmp_path / "seven.png", synth.pen_on_paper(mnist_test.images[0, 0].numpy(), 3))
    shown = tmp_path / "shown"
    code, out, err = run_cli(capsys, "predict", "--model", mnist_small_run, p, "--top-k", "2",
                             "--show-preprocessed", shown)  # fmt: skip
    assert code == 0 and out.startswith(f"{p}: 7 (") and out.count(",") == 0  # one alternative listed
    (png,) = shown.glob("*.png")
    seen = np.asarray(Image.open(png))
    assert seen.shape == (28, 28)
    # What was shown is exactly what the model classified: the one shared preprocess.
    expected = preprocess.preprocess(p).tensor[0].mul(255).round().byte().numpy()
    assert np.array_equal(seen, expected)
    code, out, _ = run_cli(capsys, "predict", "--model", mnist_small_run, p, "--json", "--top-k", "4")
    assert len(json.loads(out)["top_k"]) == 4


def test_rejection_reasons(mnist_small_run, mnist_test, tmp_path, capsys):
    digit = save(tmp_path / "d.png", synth.pen_on_paper(mnist_test.images[1, 0].numpy(), 1))
    code, out, _ = run_cli(capsys, "predict", "--model", mnist_small_run, digit, "--json", "--reject-below", "0.999")
    r = json.loads(out)
    assert r["digit"] is None and r["rejected"] == "low-confidence" and r["predicted"] == "2"
    blob = np.full((300, 300), 235, np.uint8)
    blob[60:240, 80:220] = 25  # a filled rectangle: ink, but not a digit
    path = save(tmp_path / "blob.png", blob)
    code, out, _ = run_cli(capsys, "predict", "--model", mnist_small_run, path, "--json")
    assert json.loads(out)["rejected"] == "not-a-digit"
    code, _, err = run_cli(capsys, "predict", "--model", mnist_small_run, digit, "--reject-below", "1.5")
    assert code == 2 and "reject_below_confidence" in err
    code, _, err = run_cli(capsys, "predict", "--model", tmp_path, digit)
    assert code == 2 and "no best-*.pt or final-*.pt checkpoint" in err


def test_one_preprocess_is_shared():
    # The recognizer (behind predict, read, the server and the web page) calls the very same function, which
    # preprocess() itself goes through for one image.
    assert classify.preprocess_many is preprocess.preprocess_many


def test_noise_defence_answers_do_not_depend_on_the_batch(mnist_small_run, mnist_test):
    rec = Recognizer.open(mnist_small_run)
    rec.inference.noise_defence_sigma = 0.05
    x = mnist_test.images[:6].float().div(255)
    together = rec.probs(x)
    alone = torch.cat([rec.probs(x[i : i + 1]) for i in range(6)])
    reordered = rec.probs(x.flip(0)).flip(0)
    assert torch.allclose(together, alone) and torch.allclose(together, reordered)
    rec.inference.noise_defence_sigma = 0.0
    assert not torch.allclose(together, rec.probs(x))


def test_read_a_row_of_digits(mnist_small_run, mnist_test, tmp_path, capsys):
    idx = [3, 2, 1, 18]  # 0, 1, 2, 3 in the MNIST test set
    digits = [mnist_test.images[i, 0].numpy() for i in idx]
    labels = [int(mnist_test.labels[i]) for i in idx]
    img, labels, boxes = synth.strip(digits, labels, seed=4, gap=(0.3, 0.5))
    path = save(tmp_path / "row.png", img)
    # The small test model is less sure than a full one: read every digit (no low-confidence rejection) here.
    code, out, err = run_cli(capsys, "read", "--model", mnist_small_run, path, "--json", "--pattern", "[0-9]{4}",
                             "--reject-below", "0")  # fmt: skip
    assert code == 0, (out, err)
    r = json.loads(out)
    assert r["text"] == "".join(map(str, labels)) and r["pattern_ok"] is True and r["complete"]
    assert len(r["digits"]) == 4
    for d, (x0, y0, x1, y1) in zip(r["digits"], boxes, strict=True):
        bx0, by0, bx1, by1 = d["box"]
        assert bx0 <= x0 + 3 and bx1 >= x1 - 3 and by0 <= y0 + 3 and by1 >= y1 - 3  # the box holds the digit
    code, out, _ = run_cli(capsys, "read", "--model", mnist_small_run, path, "--pattern", "[0-9]{5}",
                           "--reject-below", "0")  # fmt: skip
    assert code == 1 and "DOES NOT MATCH" in out
    # A threshold above every confidence shown (calibrated confidences of clear digits pass 0.999) rejects them all.
    above = min(1.0, max(d["confidence"] for d in r["digits"]) + 1e-6)
    code, out, _ = run_cli(capsys, "read", "--model", mnist_small_run, path, "--json", "--reject-below", str(above))
    unsure = json.loads(out)
    assert above < 1.0 and unsure["text"] == "????" and not unsure["complete"]
    assert [d["predicted"] for d in unsure["digits"]] == [d["digit"] for d in r["digits"]]
    code, _, err = run_cli(capsys, "read", "--model", mnist_small_run, path, "--pattern", "[0-9")
    assert code == 2 and "not a valid regular expression" in err
    (tmp_path / "bad.png").write_bytes(b"nope")
    # read takes many paths, like predict: a bad file is reported on its own line, the others go on, exit code 1
    code, out, _ = run_cli(capsys, "read", "--model", mnist_small_run, tmp_path / "bad.png", path)
    assert code == 1 and "bad.png: unreadable" in out and "not an image" in out and "row.png: 0123" in out
    blank = save(tmp_path / "blank.png", np.full((100, 400), 250, np.uint8))
    code, out, _ = run_cli(capsys, "read", "--model", mnist_small_run, blank, "--json")
    assert code == 0 and json.loads(out)["text"] == "" and json.loads(out)["complete"] is False


def test_explain_an_image_file_goes_through_the_same_preprocess(mnist_small_run, mnist_test, tmp_path, capsys):
    p = save(tmp_path / "two.png", synth.photo(mnist_test.images[1, 0].numpy(), 2))
    code, out, err = run_cli(capsys, "explain", mnist_small_run, "--image", p, "--method", "gradcam", "--json",
                             "--out", tmp_path / "x.png")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["predicted"] == "2" and r["methods"] == ["gradcam"] and (tmp_path / "x.png").is_file()
    answer = Recognizer.open(mnist_small_run).predict([p])[0]
    assert r["confidence"] == pytest.approx(answer.confidence, abs=1e-5)  # same input, same model, same answer
    blank = save(tmp_path / "blank.png", np.full((200, 200), 250, np.uint8))
    code, _, err = run_cli(capsys, "explain", mnist_small_run, "--image", blank)
    assert code == 2 and "rejected as 'empty'" in err


def test_the_model_chooses_among_candidate_readings_in_one_batch(mnist_small_run, mnist_test):
    rec = Recognizer.open(mnist_small_run)
    digit = mnist_test.images[0].float() / 255
    wrong = 1.0 - digit  # the other polarity: a white page with a dark digit, nothing like MNIST
    calls = []
    probs = rec.probs
    rec.probs = lambda x: calls.append(len(x)) or probs(x)  # count forward passes and their batch sizes
    readings = [("first", wrong), ("other", digit)]  # the first is the tensor itself, as preprocess gives them
    pres = [preprocess.Preprocessed(wrong, None, {"input_kind": "scan"}, candidates=readings),
            preprocess.Preprocessed(digit, None, {"input_kind": "clean"})]
    first, second = rec.answers(pres)
    assert calls == [3]  # both images and the extra reading: one forward pass
    assert first.digit == str(int(mnist_test.labels[0])) and first.record["reading"]["chosen"] == "other"
    assert set(first.record["reading"]["confidence"]) == {"first", "other"}
    assert torch.equal(first.x, digit)  # the answer shows the reading that answered
    assert "reading" not in second.record and second.to_json()["input_kind"] == "clean"


def test_predict_json_says_what_kind_of_input_it_saw(mnist_small_run, mnist_test, tmp_path, capsys):
    canvas = np.zeros((280, 280, 4), np.uint8)
    big = np.asarray(Image.fromarray(mnist_test.images[1, 0].numpy()).resize((280, 280)))
    canvas[..., 3] = big
    photo = synth.photo(mnist_test.images[2, 0].numpy(), np.random.default_rng(2))
    paths = [save(tmp_path / "canvas.png", canvas), save(tmp_path / "photo.png", photo)]
    code, out, _ = run_cli(capsys, "predict", "--model", mnist_small_run, *paths, "--json")
    kinds = [json.loads(line)["input_kind"] for line in out.splitlines()]
    assert code == 0 and all(k in preprocess.INPUT_KINDS for k in kinds) and kinds[0] == "canvas", kinds
