"""digitkit.serve.cpu: each server process pinned to one core, the workers spread over the cores in turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from digitkit.errors import ConfigError
from digitkit.serve.settings import from_dict

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN = ("import json, os, sys; from digitkit.serve.cpu import pin_to_one_core; "
       "core = pin_to_one_core(sys.argv[1] if len(sys.argv) > 1 else None); "
       "print(json.dumps([core, sorted(os.sched_getaffinity(0))]))")  # fmt: skip


def pinned(*args: str) -> tuple[int | None, list[int]]:
    run = subprocess.run([sys.executable, "-c", PIN, *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    core, allowed = json.loads(run.stdout)
    return core, allowed


@pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 cores to pin to one of them")
def test_processes_sharing_a_folder_take_the_cores_in_turn(tmp_path: Path) -> None:
    got = [pinned(str(tmp_path)) for _ in range(len(CORES) + 1)]
    for core, allowed in got:
        assert allowed == [core], got  # the process runs on that core alone
    assert [core for core, _ in got] == [*CORES, CORES[0]]  # one each, in turn, then round again
    alone = pinned()
    assert alone == (CORES[0], [CORES[0]])


def test_a_single_core_or_unpinnable_process_is_left_as_it_is(tmp_path: Path) -> None:
    if not CORES:
        pytest.skip("no sched_setaffinity here")
    run = subprocess.run(["taskset", "-c", str(CORES[-1]), sys.executable, "-c", PIN], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    if run.returncode != 0 and "taskset" in run.stderr:
        pytest.skip("taskset is not available")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [None, [CORES[-1]]]


def test_the_pin_cpu_setting_is_checked() -> None:
    assert from_dict({}).pin_cpu is True
    assert from_dict({"pin_cpu": False}).pin_cpu is False
    with pytest.raises(ConfigError, match="pin_cpu"):
        from_dict({"pin_cpu": "yes"})


@pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 cores to pin to one of them")
def test_a_turn_counter_that_cannot_be_kept_means_the_first_core(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the counter's folder cannot be made
    assert pinned(str(blocked)) == (CORES[0], [CORES[0]])
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "digitkit-cpu-turns").write_text("x\n")  # an unreadable count restarts at 0
    assert [pinned(str(garbled))[0] for _ in range(2)] == CORES[:2]


def test_single_worker_servers_take_turns_machine_wide() -> None:
    from digitkit.serve.cpu import machine_turns

    folder = machine_turns()
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name == f"digitkit-serve-{os.getuid()}"
