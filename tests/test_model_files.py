"""A manifest entry's file must be a regular file named inside models_dir: a FIFO (which would block the
reader forever), a symlink to /dev/zero (which never ends) and a ``../`` or absolute path (another file of
the system) are refused with an error naming the entry, and the other models are still served."""

from __future__ import annotations

from pathlib import Path

from agent.models.manager import ModelManager
from tests.fixtures.generated_models import add_model, add_unsafe_file_entries, sized_model


def _models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    content = sized_model(1)
    add_model(models, "good", content, task="sized")
    add_unsafe_file_entries(models, content)
    return models


def test_fifos_devices_and_paths_outside_the_models_folder_are_refused(tmp_path: Path) -> None:
    manager = ModelManager(_models(tmp_path), memory_budget_mb=100)
    refused = manager.verify_all()
    assert sorted(refused) == ["absolute", "fifo", "outside", "zero"]
    assert "model 'fifo'" in refused["fifo"] and "is not a regular file" in refused["fifo"]
    assert "model 'zero'" in refused["zero"] and "is not a regular file" in refused["zero"]
    assert "'../secret.tflite' is not inside the models folder" in refused["outside"]
    assert "is not inside the models folder" in refused["absolute"]
    assert manager.servable_ids == ["good"]
    with manager.lease("good") as loaded:
        assert loaded.entry.id == "good"
