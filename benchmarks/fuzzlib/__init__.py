"""The fuzz campaign of `benchmarks/fuzz.py`: mutators, seed corpora, targets and the case runner."""
