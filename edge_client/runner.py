"""Builds an agent from its config: local data (a DICOM store or a MedMNIST npz) and its shard."""

from __future__ import annotations

import logging

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.data import ImageSplits, dirichlet_split, load_medmnist
from fedge.tasks import ClassificationTask


def load_site_data(config: AgentConfig) -> ImageSplits:
    from edge_client.ingest.store import DatasetStore, is_store

    if config.data_dir is not None and is_store(config.data_dir):
        return ImageSplits.from_arrays(DatasetStore.open(config.data_dir).as_arrays(), name=str(config.data_dir))
    return load_medmnist(config.dataset, config.data_dir)


def build_agent(config: AgentConfig) -> Agent:
    splits = load_site_data(config)
    indices = None
    if config.num_shards is not None:
        shard = config.shard or 0
        if shard >= config.num_shards:
            raise ValueError(f"--shard {shard} must be below --num-shards {config.num_shards}")
        indices = dirichlet_split(splits.labels["train"], config.num_shards, config.alpha, config.seed)[shard]
    return Agent(config, ClassificationTask(splits), indices)


def run_agent(config: AgentConfig, log_level: int = logging.WARNING) -> list[int]:
    """Process entry point (also used by `fedge demo`, which spawns one process per site)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s {config.site} %(levelname)s %(message)s")
    return build_agent(config).run()
