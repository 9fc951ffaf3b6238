"""Datasets the tasks train on: MedMNIST npz files and non-IID site splits."""

from fedge.data.medmnist import ImageSplits, load_medmnist, resolve_data_dir
from fedge.data.splits import dirichlet_split

__all__ = ["ImageSplits", "dirichlet_split", "load_medmnist", "resolve_data_dir"]
