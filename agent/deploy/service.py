"""Deployments composed for the running agent: journal, trust, transfer, activator and state machine, wired to
the cloud link (subscriptions, chunk requests) and the outbox (``deploy`` records). :mod:`agent.app` builds one
:class:`Deployments` when ``[deploy] trusted_keys`` and ``[cloud]`` are set and ``models_dir`` is writable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.config import Settings
from agent.deploy.activation import ModelActivator
from agent.deploy.deployer import Deployer
from agent.deploy.documents import DeploymentDocument
from agent.deploy.journal import JOURNAL_FILE, Journal
from agent.deploy.transfer import Transfer, staging_dir
from agent.deploy.trust import Trust, load_public_key
from agent.deploy.window import ActivationPolicy, in_maintenance_window
from agent.errors import DeployError
from agent.models.manager import ModelManager
from agent.mqtt import topics
from agent.upstream.uplink import CloudMessage
from agent.upstream.upstream import Upstream

log = logging.getLogger(__name__)


def journal_path(settings: Settings) -> Path:
    return settings.data_dir / "deploy" / JOURNAL_FILE


def disabled_reason(settings: Settings) -> str | None:
    """Why deployments are off for ``settings`` (logged at start), or None when they are on."""
    if not settings.deploy.trusted_keys:
        return "no [deploy] trusted_keys: deployments are off"
    if settings.cloud is None:
        return "[deploy] needs a [cloud] link: deployments are off"
    if settings.models_dir is None:
        return "[deploy] needs a writable models_dir: deployments are off"
    return None


class Deployments:
    """Everything a device needs to take deployments; ``start`` after the upstream exists, ``stop`` before it."""

    def __init__(
        self, settings: Settings, upstream: Upstream, models: ModelManager, on_change: Callable[[], None]
    ) -> None:
        config = settings.deploy
        device_id = settings.device_id
        self.journal = Journal(journal_path(settings))
        try:
            trust = Trust(
                [load_public_key(key) for key in config.trusted_keys],
                load_public_key(config.root_key) if config.root_key else None,
                self.journal,
            )
        except DeployError:
            self.journal.close()
            raise
        self.models = models
        self.transfer = Transfer(
            self.journal,
            staging_dir(settings.data_dir),
            budget_bytes=config.staging_budget_bytes,
            request=lambda body: upstream.publish_transient(topics.file_request_topic(device_id), body),
            window=config.chunk_request_window,
            chunk_timeout_s=config.chunk_timeout_s,
        )
        window = config.maintenance_window

        def may_activate(document: DeploymentDocument) -> bool:
            return in_maintenance_window(ActivationPolicy(when=document.activation, window=window), datetime.now())

        self.deployer = Deployer(
            device_id=device_id,
            groups=config.groups,
            journal=self.journal,
            trust=trust,
            transfer=self.transfer,
            activation=ModelActivator(models),
            report=lambda record: (upstream.enqueue("deploy", record), on_change()),
            runtime=models.runtime.name,
            agent_version=__version__,
            may_activate=may_activate,
        )
        upstream.subscribe(topics.file_reply_topic(device_id), self.transfer.on_message)
        subscriptions = [("device", topics.device_deployment_topic(device_id)), ("keys", topics.key_list_topic())]
        subscriptions += [("group", topics.group_deployment_topic(group)) for group in config.groups]
        for kind, topic in subscriptions:
            upstream.subscribe(topic, partial(self._submit, kind))

    def _submit(self, kind: str, message: CloudMessage) -> None:
        self.deployer.submit(kind, message.topic, message.payload)

    def start(self) -> None:
        self.deployer.start()

    def stop(self) -> None:
        self.deployer.stop()
        self.journal.close()

    def status(self) -> dict[str, Any]:
        """For the retained status: the version serving per model and the deployment in progress, if any."""
        return {
            "versions": {model_id: entry.version for model_id, entry in self.models.catalog.models.items()},
            "in_progress": self.deployer.snapshot["in_progress"],
        }

    def collector(self) -> Collector:
        return _DeployCollector(self)


class _DeployCollector(Collector):
    """``/metrics``: the active version per model, the deployment in progress and the chunk transfer counts."""

    def __init__(self, deployments: Deployments) -> None:
        self._deployments = deployments

    def collect(self) -> Iterator[Any]:
        status = self._deployments.status()
        versions = GaugeMetricFamily(
            "edge_agent_model_version", "The version serving per model (always 1)", labels=["model", "version"]
        )
        for model_id, version in sorted(status["versions"].items()):
            versions.add_metric([model_id, version], 1)
        yield versions
        progress = GaugeMetricFamily(
            "edge_agent_deployment_in_progress", "The deployment in progress and its state (always 1; none: no series)",
            labels=["deployment_id", "model", "version", "state"],
        )  # fmt: skip
        current = status["in_progress"]
        if current is not None:
            progress.add_metric(
                [current["deployment_id"], current["model_id"] or "", current["version"] or "", current["state"]], 1
            )
        yield progress
        counts = self._deployments.transfer.counts
        for name, help_text in (("chunks", "Bundle chunks received and verified"),
                                ("bytes", "Bundle bytes received and verified"),
                                ("rejected", "Bundle chunks refused (hash, size or index)")):  # fmt: skip
            family = CounterMetricFamily(f"edge_agent_deploy_{name}", help_text)
            family.add_metric([], counts[name])
            yield family
