"""ONNX export on a small real MNIST model: parity on the whole test set, dynamic batch, metadata readable without
digitkit, a failed parity check leaves nothing behind, int8 calibrated on training images only, and the exported
file answering through `digitkit predict --engine onnx` and `digitkit serve --engine onnx` as PyTorch does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from digitkit import data, export, runs
from digitkit.calibration import temperature_of
from digitkit.classify import Recognizer
from digitkit.cli import main
from digitkit.engine import OnnxModel, open_recognizer
from digitkit.errors import ConfigError, DataError
from tests.conftest import MNIST_DIR
from tests.serving import serve


@pytest.fixture(scope="module")
def run_copy(mnist_small_run, tmp_path_factory) -> Path:
    """A private copy of the small run, so its export/ folder never shows up in other tests' run folder."""
    dst = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(mnist_small_run, dst)
    return dst


@pytest.fixture(scope="module")
def exported(run_copy) -> export.ExportReport:
    return export.export_run(run_copy, options=export.ExportOptions(measure_speed=False))


@pytest.fixture(scope="module")
def mnist_test() -> data.Dataset:
    return data.load_split(MNIST_DIR, "test")


def test_export_matches_pytorch_on_the_whole_test_set(exported, run_copy):
    out = run_copy / "export" / "model.onnx"
    assert Path(exported.out) == out and out.is_file() and exported.size_bytes == out.stat().st_size
    par = exported.parity
    assert par["images"] == 10_000 and par["finite"]
    assert par["agreement"] >= 0.9999 and par["max_abs_prob_diff"] < 1e-4
    assert par["accuracy"] == pytest.approx(par["accuracy_reference"], abs=1e-4) and par["accuracy"] > 0.95
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parity"] == par and report["checkpoint_sha256"] == exported.checkpoint_sha256
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_dynamic_batch_axis(exported, run_copy, mnist_test):
    engine = OnnxModel(exported.out, threads=1)
    graph_input = onnx.load(exported.out).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed number
    model = runs.open_model(run_copy).model
    x = mnist_test.images[:1024].float().div(255)
    for n in (1, 7, 1024):
        probs = engine.probs(x[:n])
        assert probs.shape == (n, 10)
        with torch.inference_mode():
            # The graph divides by the run's calibrated temperature before its softmax (digitkit.calibration).
            assert torch.allclose(probs, model(x[:n]).div(temperature_of(runs.open_model(run_copy).ckpt)).softmax(1),
                                  atol=1e-5)  # fmt: skip


def test_metadata_and_inference_without_digitkit(exported, run_copy, mnist_test, tmp_path):
    """A fresh interpreter in isolated mode (no PYTHONPATH), with the editable install's src/ taken off sys.path and
    digitkit imports blocked, reads the contract and runs the file with plain onnx and onnxruntime."""
    np.save(tmp_path / "x.npy", mnist_test.images[:5].float().div(255).numpy())
    code = """
import importlib.abc, json, sys
sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('/src')]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'digitkit':
            raise ImportError('digitkit must not be needed')
sys.meta_path.insert(0, Block())
import numpy as np, onnx, onnxruntime as ort
path, xpath = sys.argv[1], sys.argv[2]
meta = {p.key: p.value for p in onnx.load(path).metadata_props}
sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
assert sess.get_modelmeta().custom_metadata_map == meta
probs = sess.run(['probabilities'], {'image': np.load(xpath)})[0]
print(json.dumps({'meta': meta, 'probs': probs.tolist(), 'digitkit': 'digitkit' in sys.modules,
                  'src_on_path': any(p.rstrip('/').endswith('src') for p in sys.path)}))
"""
    done = subprocess.run([sys.executable, "-I", "-c", code, exported.out, str(tmp_path / "x.npy")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert not out["digitkit"] and not out["src_on_path"]
    meta = out["meta"]
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert meta["checkpoint_sha256"] == exported.checkpoint_sha256 and meta["model"] == "cnn3_slim"
    assert "white digit" in meta["input"] and "(N, 1, 28, 28)" in meta["input"] and "[0, 1]" in meta["input"]
    pre, inf = json.loads(meta["preprocess"]), json.loads(meta["inference"])
    cfg = runs.open_model(run_copy).cfg
    assert pre == cfg.preprocess.__dict__ and inf["reject_below_confidence"] == cfg.inference.reject_below_confidence
    assert np.argmax(out["probs"], 1).tolist() == mnist_test.labels[:5].tolist()


def test_failed_parity_raises_and_leaves_no_file(run_copy, mnist_test, tmp_path):
    """A graph that disagrees with PyTorch (a real file whose output bias is patched) is refused and removed."""
    opened = runs.open_model(run_copy)
    meta = export.metadata(opened, "0" * 64, "fp32")
    proto = onnx.load_from_string(export.to_onnx(opened.model, 1, 28, export.DEFAULT_OPSET, meta))
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    bias = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
    patched = numpy_helper.to_array(bias).copy()
    patched[3] += 50.0  # every image now says 3
    bias.CopyFrom(numpy_helper.from_array(patched, bias.name))
    candidate, out = tmp_path / "candidate.onnx", tmp_path / "final" / "model.onnx"
    candidate.write_bytes(proto.SerializeToString())
    x = mnist_test.images[:500]
    reference = torch.softmax(opened.model(x.float().div(255)), 1).detach()
    with pytest.raises(DataError, match="parity check failed, nothing written"):
        export.write_checked(candidate, out, reference, x.float().div(255), mnist_test.labels[:500],
                             export.ExportOptions())  # fmt: skip
    assert not out.exists() and not candidate.exists()


def test_int8_calibrates_on_training_images_only(run_copy, tmp_path):
    """Calibration reads the training files only: a data folder whose test files are garbage still calibrates, and
    the picked images all lie in the run's training portion (none from its validation hold-out)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).symlink_to(MNIST_DIR / name)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not an IDX file")
    cfg = runs.open_model(run_copy).cfg
    with pytest.raises(DataError):
        data.load_split(folder, "test")
    images, idx = export.calibration_set(cfg, 300, seed=0, data_dir=folder)
    assert images.shape == (len(idx), 1, 28, 28) and abs(len(idx) - 300) <= 10
    labels = data.load_split(folder, "train").labels
    train_idx, val_idx = data.stratified_split(labels, cfg.data.val_fraction, cfg.seed)
    assert set(idx.tolist()) <= set(train_idx.tolist()) and not set(idx.tolist()) & set(val_idx.tolist())
    assert torch.bincount(labels[idx], minlength=10).min() >= 25  # stratified: every class is represented


@pytest.fixture(scope="module")
def exported_int8(run_copy) -> export.ExportReport:
    return export.export_run(run_copy, options=export.ExportOptions(int8=True, calibration_images=200,
                                                                    measure_speed=False))  # fmt: skip


def test_int8_export_reports_size_and_accuracy(exported_int8):
    report = exported_int8
    q = report.int8
    assert Path(report.out).name == "model.int8.onnx" and report.precision == "int8"
    assert q["size_ratio"] < 0.6 and report.size_bytes == Path(report.out).stat().st_size
    assert abs(q["accuracy_change_points"]) <= 0.5 and q["agreement_with_fp32"] > 0.99
    assert report.calibration["images"] <= 210 and "test excluded" in report.calibration["source"]
    ops = {n.op_type for n in onnx.load(report.out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "int8" in report.metadata["precision"]


def test_int8_graph_is_portable(exported_int8):
    """Every Relu of the fp32 graph is an explicit node of the int8 one, no Gemm bias comes from a
    DequantizeLinear, only standard ops, and the file read literally (no int8 kernel fusion) predicts as ONNX
    Runtime does; all of it in the report."""
    graph = exported_int8.int8["graph"]
    assert graph["portable"] and not graph["problems"] and graph["same_ops_as_fp32"]
    assert graph["activations_explicit"] == graph["activations_fp32"] == 3  # cnn3_slim: one Relu per conv
    assert graph["gemm_bias_from_dequantize"] == [] and graph["nonstandard_ops"] == []
    assert graph["literal_reading"]["images"] == 10_000 and graph["literal_reading"]["agreement"] >= 0.999
    proto = onnx.load(exported_int8.out)
    assert sum(n.op_type == "Relu" for n in proto.graph.node) == 3
    assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}
    assert json.loads(Path(exported_int8.out).with_suffix(".json").read_text())["int8"]["graph"] == graph


def opencv_agreement(path: str | Path, x: torch.Tensor) -> float:
    """Share of images on which OpenCV's DNN module and ONNX Runtime give the same prediction for the file."""
    try:
        import cv2
    except ImportError:
        pytest.fail("opencv-python-headless is not installed: install the dev extra (pip install -e '.[dev]')")
    try:
        net = cv2.dnn.readNetFromONNX(str(path))
    except cv2.error as e:
        pytest.fail(f"OpenCV {cv2.__version__} cannot load {path}: {str(e).strip().splitlines()[-1]}")
    arr = x.numpy()
    opencv = []
    for i in range(0, len(arr), 100):
        net.setInput(np.ascontiguousarray(arr[i : i + 100]))
        opencv.append(net.forward().reshape(len(arr[i : i + 100]), -1))
    ort = OnnxModel(path, threads=1).probs(x).numpy()
    return float((np.concatenate(opencv).argmax(1) == ort.argmax(1)).mean())


def test_opencv_reads_both_files_as_onnx_runtime_does(exported, exported_int8, mnist_test):
    """A second runtime, OpenCV's DNN module, loads the fp32 and the int8 file and predicts as ONNX Runtime does on
    1,000 test images. The int8 graph ONNX Runtime's quantizer writes by default fails this: OpenCV 5.1 refuses it,
    OpenCV 4.14 agreed on 64.6-93.6% in five runs."""
    x = mnist_test.images[:1000].float().div(255)
    for report in (exported, exported_int8):
        assert opencv_agreement(report.out, x) >= 0.999, report.out


def test_int8_graph_check_refuses_the_quantizer_default(exported, run_copy, mnist_test, tmp_path):
    """ONNX Runtime's quantizer with its default options (Relu folded into the next QuantizeLinear, Gemm bias as an
    int32 DequantizeLinear) writes a graph the exporter refuses, naming both problems, and writes nothing."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib, _ = export.calibration_set(runs.open_model(run_copy).cfg, 100)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calib.numpy()}])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    default = tmp_path / "default.int8.onnx"
    quantize_static(exported.out, default, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)  # fmt: skip
    out = tmp_path / "final" / "model.int8.onnx"
    with pytest.raises(DataError, match="int8 graph check failed, nothing written") as error:
        export.check_int8(Path(exported.out), default, out, mnist_test.images[:500].float().div(255), threads=1)
    message = str(error.value)
    assert "Relu x3 missing" in message and "takes its bias from a DequantizeLinear" in message
    assert "\n" not in message and not out.exists()


def test_predict_engine_onnx_answers_like_torch(exported, run_copy, mnist_test, tmp_path, capsys):
    files = []
    for i in range(12):
        img = 255 - mnist_test.images[i, 0].numpy()  # dark on light, as a scan would be
        files.append(tmp_path / f"d{i}.png")
        Image.fromarray(np.kron(img, np.ones((4, 4), np.uint8))).save(files[-1])
    answers = {}
    alone = tmp_path / "elsewhere" / "model.onnx"  # the file without its run folder
    alone.parent.mkdir()
    shutil.copy(exported.out, alone)
    for key, args in {"torch": ["--model", run_copy], "onnx": ["--model", run_copy, "--engine", "onnx"],
                      "file": ["--model", alone]}.items():  # fmt: skip
        assert main(["predict", *map(str, args), *map(str, files), "--json"]) == 0
        answers[key] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for t, o, f in zip(answers["torch"], answers["onnx"], answers["file"], strict=True):
        assert t["digit"] == o["digit"] == f["digit"] and t["rejected"] == o["rejected"]
        assert np.allclose(t["probabilities"], o["probabilities"], atol=1e-5)
        assert o["probabilities"] == f["probabilities"]
        assert abs(t["digit_score"] - o["digit_score"]) < 1e-3  # scored from the probabilities, in either engine
    assert sum(a["digit"] == str(int(y)) for a, y in zip(answers["onnx"], mnist_test.labels[:12], strict=True)) >= 11
    assert main(["predict", "--model", str(alone), "--engine", "torch", str(files[0])]) == 2  # one-line error
    assert "ONNX file" in capsys.readouterr().err


def test_predict_engine_onnx_refuses_an_export_made_before_calibrate(exported, run_copy, tmp_path, capsys):
    stale = tmp_path / "run"
    shutil.copytree(run_copy, stale)  # the export inside comes from the checkpoint as it was
    img = tmp_path / "d.png"
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(img)
    assert main(["predict", "--model", str(stale), "--engine", "onnx", str(img), "--json"]) in (0, 1)
    capsys.readouterr()
    assert main(["calibrate", str(stale), "--data-dir", str(MNIST_DIR)]) == 0  # rewrites the checkpoint
    capsys.readouterr()
    assert main(["predict", "--model", str(stale), "--engine", "onnx", str(img)]) == 2
    err = capsys.readouterr().err
    assert "exported from checkpoint" in err and "digitkit export" in err


def test_noise_defence_and_stale_exports(exported, run_copy, mnist_test):
    opened = runs.open_model(run_copy)
    onnx_rec = open_recognizer(exported.out)
    torch_rec = Recognizer(opened.model, opened.ckpt["classes"], opened.cfg.inference, opened.cfg.preprocess,
                           temperature=temperature_of(opened.ckpt))  # fmt: skip
    for rec in (onnx_rec, torch_rec):
        rec.inference.noise_defence_sigma = 0.2
    x = mnist_test.images[:64].float().div(255)
    assert torch.allclose(onnx_rec.probs(x), torch_rec.probs(x), atol=1e-5)
    with pytest.raises(DataError, match="exported from checkpoint"):
        open_recognizer(run_copy, expect_checkpoint_sha256="f" * 64)
    with pytest.raises(DataError, match="digitkit export"):
        open_recognizer(run_copy.parent)  # a folder without export/model.onnx
    with pytest.raises(ConfigError, match="opset"):
        export.ExportOptions(opset=5)


def test_server_engine_onnx(exported, run_copy, mnist_test, tmp_path):
    opened = runs.open_model(run_copy)
    torch_rec = Recognizer(opened.model, opened.ckpt["classes"], opened.cfg.inference, opened.cfg.preprocess,
                           temperature=temperature_of(opened.ckpt))  # fmt: skip
    images = [mnist_test.images[i, 0].numpy() for i in range(6)]
    expected = torch_rec.predict(images, top_k=10)
    with serve(run_copy, tmp_path, "--engine", "onnx", "--audit-db", f"sqlite:///{tmp_path / 'audit.db'}") as srv:
        with srv.client() as client:
            info = client.get("/v1/model").json()
            assert info["version"].endswith("-onnx") and info["contract"]["engine"] == "onnx"
            assert info["contract"]["onnx_file"].endswith("export/model.onnx")
            for image, want in zip(images, expected, strict=True):
                got = client.post("/v1/predict", json={"pixels": image.tolist()}).json()
                assert got["digit"] == want.digit and got["model_version"] == info["version"]
                assert np.allclose(got["probabilities"], want.probabilities, atol=1e-5)
            # Explanations still work: the server keeps the same checkpoint's PyTorch model for gradients.
            r = client.post("/v1/explain", json={"pixels": images[0].tolist(), "methods": ["saliency"]})
            assert r.status_code == 200 and r.json()["overlays"]["saliency"] and not r.json()["overlay_errors"]
