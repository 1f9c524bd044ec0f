"""`digitkit menu` driven through a pseudo-terminal, as a user at a plain terminal (or over SSH) would: pick actions
by arrow keys and by numbers, read the screen, answer badly and well, and check the files the commands made."""

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitkit import data
from digitkit.models import list_models

from .conftest import ROOT

pexpect = pytest.importorskip("pexpect")

DOWN, ENTER, CTRL_U = "\x1b[B", "\r", "\x15"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")


class Screen:
    """A `digitkit menu` process in a pseudo-terminal; `wait` reads its output with the escape codes removed."""

    def __init__(self, cwd: Path, state_dir: Path):
        env = {**os.environ, "DIGITKIT_STATE_DIR": str(state_dir), "TERM": "xterm", "OMP_NUM_THREADS": "1",
               "PROMPT_TOOLKIT_NO_CPR": "1"}  # fmt: skip
        self.child = pexpect.spawn(sys.executable, ["-m", "digitkit", "menu"], cwd=str(cwd), env=env,
                                   encoding="utf-8", dimensions=(50, 160), timeout=5)  # fmt: skip
        self.raw, self.seen = "", 0

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def wait(self, pattern: str, timeout: float = 60) -> str:
        """Wait until `pattern` (a regex) shows after what earlier waits consumed; returns the text up to it."""
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text[self.seen :])
            if m:
                shown = self.text[self.seen : self.seen + m.end()]
                self.seen += m.end()
                time.sleep(0.3)  # let the question finish drawing before keys arrive
                return shown
            if time.monotonic() > end or not self.child.isalive() and not self._read(0.1):
                raise AssertionError(f"{pattern!r} never showed; the screen ends with:\n{self.text[-3000:]}")
            self._read(0.2)

    def _read(self, timeout: float) -> bool:
        try:
            self.raw += self.child.read_nonblocking(1 << 16, timeout=timeout)
            return True
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False

    def keys(self, *keys: str) -> None:
        for k in keys:
            self.child.send(k)
            time.sleep(0.15)

    def answer(self, text: str) -> None:
        """Replace the suggested answer with `text` and press Enter."""
        self.keys(CTRL_U, text, ENTER)

    def quit(self) -> int:
        self.wait(r"What would you like to do\?")
        self.keys("8", ENTER)
        self.child.expect(pexpect.EOF, timeout=30)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A user's folder: the shipped configs, nothing else."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    return work


def test_menu_previews_the_data_by_numbers_and_arrows_and_re_asks_bad_answers(workdir, tiny_dir, tmp_path):
    screen = Screen(workdir, tmp_path / "state")
    screen.wait(r"What would you like to do\?")
    screen.keys("1", ENTER)  # by number: look at the data
    screen.wait(r"Look at what\?")
    screen.keys(ENTER)  # the first: a grid per class
    screen.wait("data folder:")
    screen.answer("no/such/folder")
    screen.wait("no/such/folder: data folder not found")
    screen.answer(str(tiny_dir))
    screen.wait("write the picture to:")
    screen.answer("grid.txt")
    screen.wait("expected a file name ending in .png")
    screen.answer("out/grid.png")
    shown = screen.wait(r"wrote out/grid\.png")
    assert f"equivalent command: digitkit data preview --out out/grid.png --data-dir {tiny_dir}" in shown
    # by arrows: the same action, then the second kind of picture, with the recipe list's default
    screen.wait(r"What would you like to do\?")
    screen.keys(ENTER)
    screen.wait(r"Look at what\?")
    screen.keys(DOWN, ENTER)
    screen.wait("data folder:")
    screen.keys(ENTER)  # remembered from the first answer
    screen.wait(r"Which augmentation recipe\?")
    screen.keys(ENTER)
    screen.wait("write the picture to:")
    screen.keys(ENTER)
    shown = screen.wait(r"wrote previews/augment-standard\.png")
    assert "equivalent command: digitkit augment preview --recipe standard --out previews/augment-standard.png " \
           f"--data-dir {tiny_dir}" in shown
    assert screen.quit() == 0
    for png in (workdir / "out" / "grid.png", workdir / "previews" / "augment-standard.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100
    assert json.loads((tmp_path / "state" / "menu.json").read_text())["data_dir"] == str(tiny_dir)


def write_pngs(tiny_dir: Path, folder: Path, n: int = 3) -> None:
    test = data.load_split(tiny_dir, "test")
    folder.mkdir()
    for i in range(n):
        img = np.kron(test.images[i, 0].numpy(), np.ones((4, 4), np.uint8))  # 112 x 112, as a photo might be
        Image.fromarray(img).save(folder / f"digit-{i}.png")


def test_menu_trains_remembers_the_run_evaluates_and_predicts(workdir, tiny_dir, tmp_path):
    write_pngs(tiny_dir, workdir / "photos")
    state = tmp_path / "state"
    screen = Screen(workdir, state)
    screen.wait(r"What would you like to do\?")
    screen.keys(DOWN, ENTER)  # train, by arrow
    screen.wait(r"Which recipe \(training config\)\?")
    screen.keys(ENTER)  # configs/compare-depth.yaml is a comparison file: not offered; default.yaml comes first
    screen.wait(r"Which model\?")
    mlp = list_models().index("mlp")  # by its number, or by arrows if the list outgrows 9
    screen.keys(*([str(mlp + 1)] if mlp < 9 else [DOWN] * mlp), ENTER)
    screen.wait("data folder:")
    screen.answer(str(tiny_dir))
    screen.wait("epochs:")
    screen.answer("many")
    screen.wait("expected a whole number from 1 to 10000")
    screen.answer("2")
    screen.wait(r"other settings as KEY=VALUE")
    screen.answer("train.batch_size=32 train.lrr=1")
    screen.wait("unknown config key 'train.lrr'")
    screen.answer("train.batch_size=32 augment.recipe=none")
    shown = screen.wait(r"checkpoint +best-", timeout=120)
    assert ("equivalent command: digitkit train --config configs/default.yaml --set model.name=mlp --set "
            f"train.epochs=2 --set train.batch_size=32 --set augment.recipe=none --data-dir {tiny_dir}") in shown
    assert re.search(r"epoch +2 +train loss", shown)
    runs = [p for p in (workdir / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    run = f"runs/{runs[0].name}"
    screen.wait(rf"last run: {re.escape(run)}")
    assert json.loads((state / "menu.json").read_text())["last_run"] == str(runs[0].resolve())

    screen.keys("5", ENTER)  # predict: the last run is offered first
    screen.wait(r"Which model to read the images with\?")
    screen.keys(ENTER)
    screen.wait("image files or folders")
    screen.answer("photos/none.png")
    screen.wait("photos/none.png: no such file or folder")
    screen.answer("photos")
    shown = screen.wait(r"photos/digit-2\.png: .*\n")
    assert f"equivalent command: digitkit predict --model {run} photos" in shown
    assert all(f"photos/digit-{i}.png: " in shown for i in range(3))
    assert screen.quit() == 0

    # A new session remembers the run; evaluate it quickly and leave the report closed.
    screen = Screen(workdir, state)
    screen.wait(rf"last run: {re.escape(run)}")
    screen.keys("4", ENTER)
    screen.wait(r"Which model to evaluate\?")
    screen.keys(ENTER)
    screen.wait(r"On which images\?")
    screen.keys(ENTER)
    screen.wait(r"How thorough\?")
    screen.keys(DOWN, ENTER)
    shown = screen.wait(r"Open the report", timeout=120)
    assert f"equivalent command: digitkit evaluate {run} --split test --quick" in shown
    assert (workdir / run / "eval" / "test" / "report.html").is_file()
    screen.keys("2", ENTER)
    assert screen.quit() == 0


def test_ctrl_c_in_a_question_goes_back_and_the_menu_refuses_a_pipe(workdir, tmp_path):
    import subprocess

    screen = Screen(workdir, tmp_path / "state")
    screen.wait(r"What would you like to do\?")
    screen.keys("7", ENTER)  # export, with no run anywhere: asks for a path
    screen.wait("No finished run found")
    screen.answer("runs/nothing")
    screen.wait("runs/nothing: no such checkpoint or run folder")
    screen.keys("\x03")  # Ctrl-C: back to the menu, not a traceback
    screen.wait(r"back to the menu")
    assert screen.quit() == 0
    assert "Traceback" not in screen.text
    done = subprocess.run([sys.executable, "-m", "digitkit", "menu"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, cwd=workdir, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "needs an interactive terminal" in done.stderr
