"""fedge: federated learning for medical imaging at the edge (the shared ground floor)."""

__version__ = "0.1.0"
