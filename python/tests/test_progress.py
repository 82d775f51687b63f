"""How a run shows its progress: tqdm's bar when tqdm is installed and no callback is
given, the callback instead of the bar, and neither when tqdm is missing."""

import sys

import pytest
import tqdm  # noqa: F401  (the test venv installs it: the bar's path must be exercised)

import prunekit

STEPS = 3


def small_run(tiny_arrays, tmp_path, **kw):
    train, val = tiny_arrays
    return prunekit.train(train, val=val, layers=[1, 1, 1, 1], width=8, steps=STEPS, batch=8, size=32,
                          augment="none", out=tmp_path / "m.safetensors", **kw)


def test_tqdm_bar_counts_every_step(tiny_arrays, tmp_path, capsys):
    run = small_run(tiny_arrays, tmp_path)
    err = capsys.readouterr().err
    assert len(run.rows) == STEPS
    assert "prunekit train" in err, err
    assert f"{STEPS}/{STEPS}" in err, err
    assert "loss=" in err, err


def test_a_callback_replaces_the_bar(tiny_arrays, tmp_path, capsys):
    seen = []
    run = small_run(tiny_arrays, tmp_path, progress=seen.append)
    err = capsys.readouterr().err
    assert [r for r in seen if "step" in r] == run.rows
    assert "prunekit train" not in err, err


def test_without_tqdm_the_run_is_silent(tiny_arrays, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import tqdm` fails
    run = small_run(tiny_arrays, tmp_path)
    err = capsys.readouterr().err
    assert len(run.rows) == STEPS
    assert "prunekit train" not in err, err
