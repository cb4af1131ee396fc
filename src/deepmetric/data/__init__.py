"""Datasets (IDX/MNIST family, image folders, ``.npz``), splits and metric-learning samplers.

Importing this package only imports code: nothing is read or downloaded until a loader
is called.
"""

from deepmetric.data.augment import DIHEDRAL, augment, dihedral
from deepmetric.data.datasets import (
    IDX_FILES,
    IMAGE_EXTENSIONS,
    MNIST_FAMILY,
    SPEC_FORMS,
    ArrayDataset,
    DatasetError,
    Inputs,
    class_split,
    data_home,
    download_file,
    fetch_mnist_family,
    load_idx,
    load_idx_dir,
    load_image_folder,
    load_mnist_family,
    load_npz,
    pixels_to_float,
    train_val_split,
)
from deepmetric.data.preprocess import Preprocessing
from deepmetric.data.samplers import PairSampler, PKSampler, balanced_pairs, random_triplets
from deepmetric.data.specs import load_dataset, load_tuples
from deepmetric.data.tuples import Tuples

__all__ = [
    "DIHEDRAL",
    "IDX_FILES",
    "IMAGE_EXTENSIONS",
    "MNIST_FAMILY",
    "SPEC_FORMS",
    "ArrayDataset",
    "DatasetError",
    "Inputs",
    "PKSampler",
    "PairSampler",
    "Preprocessing",
    "Tuples",
    "augment",
    "balanced_pairs",
    "class_split",
    "data_home",
    "dihedral",
    "download_file",
    "fetch_mnist_family",
    "load_dataset",
    "load_idx",
    "load_idx_dir",
    "load_image_folder",
    "load_mnist_family",
    "load_npz",
    "load_tuples",
    "pixels_to_float",
    "random_triplets",
    "train_val_split",
]
