"""verify from Python: the report of `prunekit verify`."""

import pathlib

import pytest

import prunekit

DATA = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"


def test_verify_passes_on_a_reference():
    report = prunekit.verify(DATA / "model-tiny-b1-odd.safetensors", device="cpu", precision="f32")
    assert report.ok and bool(report) and report.failed == []
    assert "model-tiny-b1-odd" in report.text and "cpu" in report.text


def test_verify_runs_the_bn_fusions_it_is_given():
    report = prunekit.verify(DATA / "model-tiny-b1-odd.safetensors", device="emu", precision="f32", bn_fusion="all")
    assert report.ok and "--bn-fusion all" in report.text
    report = prunekit.verify(DATA / "model-tiny-b1-odd.safetensors", device="cpu")
    assert "--bn-fusion none" in report.text


def test_verify_refuses_an_unknown_bn_fusion():
    with pytest.raises(ValueError, match="BN fusion"):
        prunekit.verify(DATA / "model-tiny-b1-odd.safetensors", device="cpu", bn_fusion="both")
