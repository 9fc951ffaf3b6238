"""Builds an agent from its config: local data (a DICOM store or a MedMNIST npz) and its shard."""

from __future__ import annotations

import logging

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.data import ImageSplits, dirichlet_split, load_medmnist
from fedge.tasks import ClassificationTask
from fedge.tasks.ldct import LdctTask


def load_site_data(config: AgentConfig) -> ImageSplits:
    from edge_client.ingest.store import DatasetStore, is_store

    if config.data_dir is not None and is_store(config.data_dir):
        return ImageSplits.from_arrays(DatasetStore.open(config.data_dir).as_arrays(), name=str(config.data_dir))
    return load_medmnist(config.dataset, config.data_dir)


def build_ldct_task(config: AgentConfig) -> LdctTask:
    """This site's share of the CT series in --ct-dir, simulated under its scan protocol (cached on disk)."""
    from edge_client.ingest.ct import read_ct_dir
    from fedge.data.ldct import ScanProtocol, SimulationConfig, resolve_ct_dir

    if config.protocol is None:
        raise ValueError("the ldct task needs the site's scan protocol: set protocol: I0:VIEWS[:NOISE] (e.g. 1e4:180) in the agent config")
    return LdctTask.for_site(
        read_ct_dir(resolve_ct_dir(config.ct_dir, config.data_dir)),
        ScanProtocol.parse(config.protocol),
        shard=config.shard or 0,
        num_shards=config.num_shards or 1,
        sim=SimulationConfig(image_size=config.image_size or SimulationConfig.image_size),
    )


def build_agent(config: AgentConfig) -> Agent:
    if config.task == "ldct":
        return Agent(config, build_ldct_task(config))
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
