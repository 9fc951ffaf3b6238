"""The scale benchmark of `benchmarks/scale.py`: a swarm of simulated sites and a process meter."""
