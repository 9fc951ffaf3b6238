"""Aggregation strategies, one per file, registered by name (`get_strategy("median")`).

Importing the package registers every built-in rule; `STRATEGIES` maps names to classes.
"""

from server.strategies import (
    centered_clipping,
    clipping,
    dp_fedavg,
    fedavg,
    median,
    multikrum,
    trimmed_mean,
)
from server.strategies.base import (
    STRATEGIES,
    ClientUpdate,
    Strategy,
    get_strategy,
    register_strategy,
    strategy_options,
)

__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "Strategy",
    "centered_clipping",
    "clipping",
    "dp_fedavg",
    "fedavg",
    "get_strategy",
    "median",
    "multikrum",
    "register_strategy",
    "strategy_options",
    "trimmed_mean",
]
