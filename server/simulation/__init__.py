"""In-process federations for the robustness and privacy benchmarks: production training, codec,
validation and strategies, without the broker."""

from server.simulation.attacks import ATTACKS, Attack, AttackContext, get_attack
from server.simulation.federation import (
    Adversary,
    InProcessFederation,
    SimulationSettings,
    finite_aggregate,
)

__all__ = ["ATTACKS", "Adversary", "Attack", "AttackContext", "InProcessFederation", "SimulationSettings", "finite_aggregate", "get_attack"]
