"""``edge-agent models add | list | check`` with a real third-party model (microWakeWord "okay_nabu")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import BUNDLED_MODELS_DIR
from agent.models.devmodels import wakeword_model_path
from agent.models.manager import ModelManager
from agent.models.watcher import ModelWatcher
from tests.fixtures.generated_models import constant_classifier
from tests.fixtures.tflite_metadata import TensorMeta, metadata_flatbuffer, with_metadata


def _add_wakeword(models_dir: Path, *extra: str) -> int:
    return main(["models", "add", str(wakeword_model_path()), "--id", "okay-nabu", "--version", "2",
                 "--task", "wake-word", "--models-dir", str(models_dir), *extra])  # fmt: skip


def test_add_writes_the_entry_read_from_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _add_wakeword(tmp_path) == 0
    [entry] = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert entry["file"] == "okay-nabu-2.tflite" and (tmp_path / entry["file"]).read_bytes() == wakeword_model_path().read_bytes()
    assert [(spec["name"], spec["shape"], spec["dtype"]) for spec in entry["inputs"]] == [("input_audio", [1, 3, 40], "int8")]
    assert [(spec["name"], spec["dtype"]) for spec in entry["outputs"]] == [("dense_1", "uint8")]
    assert entry["inputs"][0]["quantization"]["zero_point"] == -128
    capsys.readouterr()

    assert main(["models", "check", "--models-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "okay-nabu 2 (wake-word, okay-nabu-2.tflite): serving" in listed
    assert "in  input_audio [1, 3, 40] int8 scale 0.101961 zero point -128" in listed
    assert "vibration-anomaly" in listed  # the bundled models are served too


def test_labels_come_from_the_metadata_or_the_labels_option(tmp_path: Path) -> None:
    metadata = metadata_flatbuffer("toy", "a toy", [TensorMeta("in")], [TensorMeta("out", label_file="labels.txt")])
    model = tmp_path / "toy.tflite"
    model.write_bytes(with_metadata(constant_classifier([0.5, 0.5]), metadata, {"labels.txt": b"cold\nhot\n"}))
    models_dir = tmp_path / "models"
    assert main(["models", "add", str(model), "--models-dir", str(models_dir)]) == 0
    [entry] = json.loads((models_dir / "manifest.json").read_text())["models"]
    assert (entry["id"], entry["labels"], entry["description"]) == ("toy", ["cold", "hot"], "a toy")

    (tmp_path / "labels.txt").write_text("low\n\nhigh\n")
    assert main(["models", "add", str(model), "--labels", str(tmp_path / "labels.txt"), "--models-dir", str(models_dir)]) == 0
    [entry] = json.loads((models_dir / "manifest.json").read_text())["models"]
    assert entry["labels"] == ["low", "high"]


def test_check_prints_every_mismatch_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _add_wakeword(tmp_path) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["models"][0]["inputs"][0]["shape"] = [1, 4, 40]
    manifest["models"][0]["outputs"][0]["dtype"] = "int8"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["models", "check", "--models-dir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "okay-nabu 2 (wake-word, okay-nabu-2.tflite): REFUSED" in out.out
    assert "shape [1, 4, 40], the file has [1, 3, 40]" in out.out
    assert "output 0 'dense_1' (tensor StatefulPartitionedCall:0): the manifest says dtype int8, the file has uint8" in out.out
    assert "vibration-anomaly 1.0.0 (vibration-anomaly, " in out.out and "1 of 3 models refused" in out.err
    assert main(["models", "list", "--models-dir", str(tmp_path)]) == 0


def test_a_running_agent_picks_up_an_added_model(tmp_path: Path) -> None:
    manager = ModelManager(tmp_path, defaults_dir=BUNDLED_MODELS_DIR)
    manager.verify_all()
    watcher = ModelWatcher(manager, interval_s=60)
    assert "okay-nabu" not in manager.servable_ids
    assert _add_wakeword(tmp_path) == 0
    assert watcher.poll()
    assert "okay-nabu" in manager.servable_ids
    with manager.lease("okay-nabu") as loaded:
        assert [info.name for info in loaded.inputs] == ["input_audio"]


def test_add_refuses_a_file_the_runtime_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.tflite"
    bogus.write_bytes(b"not a model at all")
    assert main(["models", "add", str(bogus), "--models-dir", str(tmp_path / "models")]) == 1
    assert "not a TFLite model" in capsys.readouterr().err
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_add_replaces_the_manifest_whole_and_a_refused_add_leaves_it_intact(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert _add_wakeword(models) == 0
    manifest = models / "manifest.json"
    before = manifest.read_bytes()
    bogus = tmp_path / "bogus.tflite"
    bogus.write_bytes(b"not a model at all")
    assert main(["models", "add", str(bogus), "--models-dir", str(models)]) == 1
    assert manifest.read_bytes() == before

    # A reader that opened the manifest before the update (a hot update mid-read) still reads the old one
    # whole: the new manifest is a new file renamed over it, never the old one rewritten in place.
    with manifest.open("rb") as reader:
        assert main(["models", "add", str(wakeword_model_path()), "--id", "okay-nabu", "--version", "3",
                     "--task", "wake-word", "--models-dir", str(models)]) == 0  # fmt: skip
        assert reader.read() == before
    [entry] = json.loads(manifest.read_text())["models"]
    assert entry["version"] == "3" and (models / "okay-nabu-2.tflite").exists()  # the old version's file intact
    assert sorted(path.name for path in models.iterdir()) == ["manifest.json", "okay-nabu-2.tflite", "okay-nabu-3.tflite"]
