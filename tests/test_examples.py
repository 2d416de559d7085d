"""The digits demo (snnkit.examples.digits) and the tutorial scripts the docs include."""
import json
import os
import math
import pathlib
import runpy

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs the examples extra (scikit-learn)")

from snnkit.examples import digits  # noqa: E402

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "scripts").glob("*.py"))
SMALL = ["--epochs", "2", "--T", "2", "--width", "8", "--batch-size", "64", "--lr", "0.02", "--quiet"]


def _run_json(capsys, argv):
    assert digits.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_json_last_line_and_loss_goes_down(tmp_path, capsys):
    result = _run_json(capsys, SMALL + ["--json", "--out", str(tmp_path)])
    assert {"test_accuracy", "seconds", "peak_bytes", "memopt", "train_loss"} <= result.keys()
    assert result["memopt"] == "off"
    assert len(result["train_loss"]) == 2
    assert result["train_loss"][1] < result["train_loss"][0] < 1.1 * math.log(10)
    assert result["test_accuracy"] > 0.5  # well above chance (0.1) after two tiny epochs
    assert result["peak_bytes"] > 0
    if result["plot"] is not None:
        assert (tmp_path / "digits_off.png").stat().st_size > 0


def test_demo_is_reproducible_with_a_seed(tmp_path, capsys):
    a = _run_json(capsys, SMALL + ["--epochs", "1", "--json", "--seed", "3", "--out", str(tmp_path)])
    b = _run_json(capsys, SMALL + ["--epochs", "1", "--json", "--seed", "3", "--out", str(tmp_path)])
    assert a["train_loss"] == b["train_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]


def test_demo_compare_runs_all_modes_with_the_same_losses(tmp_path, capsys):
    result = _run_json(capsys, SMALL + ["--epochs", "1", "--json", "--compare", "--out", str(tmp_path)])
    runs = {r["memopt"]: r for r in result["compare"]}
    assert list(runs) == ["off", "layer", "auto"]
    # checkpointing recomputes the same forward: the same losses up to float rounding
    for mode in ("layer", "auto"):
        assert runs[mode]["train_loss"] == pytest.approx(runs["off"]["train_loss"], rel=1e-3)
        assert runs[mode]["peak_bytes"] > 0
    assert result["memopt"] == "off" and result["test_accuracy"] == runs["off"]["test_accuracy"]


def test_demo_rejects_bad_arguments(capsys):
    for argv, text in [
        (["--memopt", "everything"], "invalid choice"),
        (["--epochs", "0"], "must be a positive integer"),
        (["--lr", "-1"], "must be a positive number"),
    ]:
        with pytest.raises(SystemExit) as info:
            digits.main(argv)
        assert info.value.code == 2
        assert text in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_demo_cupy_without_gpu_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        digits.main(["--backend", "cupy", "--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--backend cupy is not usable here" in err
    assert "CuPy" in err or "CUDA" in err


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_tutorial_script_runs(script, monkeypatch, tmp_path):
    """Every script that the docs include or plot runs and passes its own asserts."""
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")


@pytest.mark.slow
def test_demo_under_torchrun_with_two_gloo_ranks(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "snnkit.examples.digits", *SMALL, "--memopt", "layer", "--json",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    result = json.loads(lines[0])
    assert result["memopt"] == "layer" and result["test_accuracy"] > 0.5


def test_demo_times_a_run_of_one_step(tmp_path, capsys):
    result = _run_json(capsys, ["--epochs", "1", "--T", "2", "--width", "4", "--batch-size", "4000", "--quiet",
                                "--json", "--out", str(tmp_path)])
    assert result["step_seconds"] > 0  # the only step is the memory-measured one
