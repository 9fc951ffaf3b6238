"""Datasets the tasks train on: MedMNIST npz files and non-IID site splits."""

from fedge.data.medmnist import ImageSplits, data_root, find_medmnist, load_medmnist
from fedge.data.splits import dirichlet_split

__all__ = ["ImageSplits", "data_root", "dirichlet_split", "find_medmnist", "load_medmnist"]
