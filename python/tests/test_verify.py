"""verify from Python: the report of `prunekit verify`."""

import pathlib

import prunekit

DATA = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"


def test_verify_passes_on_a_reference():
    report = prunekit.verify(DATA / "model-tiny-b1-odd.safetensors", device="cpu", precision="f32")
    assert report.ok and bool(report) and report.failed == []
    assert "model-tiny-b1-odd" in report.text and "cpu" in report.text
