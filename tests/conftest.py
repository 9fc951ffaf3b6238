"""Fixtures for every test: real brokers (brokers.py) and real data (data_fixtures.py), shared models
(model_fixtures.py); the unit/integration tiers (markers.py)."""

pytest_plugins = ["brokers", "data_fixtures", "model_fixtures", "markers"]
