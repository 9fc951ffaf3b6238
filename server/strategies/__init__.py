"""Aggregation strategies, one per file, registered by name (`get_strategy("median")`).

Importing the package registers every built-in rule; `STRATEGIES` maps names to classes.
"""

from server.strategies import (
    centered_clipping,
    clipping,
    dp_fedavg,
    fedadam,
    fedavg,
    fedbn,
    fedprox,
    fedyogi,
    median,
    multikrum,
    scaffold,
    trimmed_mean,
)
from server.strategies.base import (
    STRATEGIES,
    ClientUpdate,
    Strategy,
    announced_train,
    get_strategy,
    register_strategy,
    strategy_options,
)

__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "announced_train",
    "Strategy",
    "centered_clipping",
    "clipping",
    "dp_fedavg",
    "fedadam",
    "fedavg",
    "fedbn",
    "fedprox",
    "fedyogi",
    "get_strategy",
    "median",
    "multikrum",
    "register_strategy",
    "scaffold",
    "strategy_options",
    "trimmed_mean",
]
