"""The data: sources (``sources``, no torch), the token store (``store``), samples and their collate
(``dataset``), the generated sets (``synthetic``), and the sets of a run (``build``)."""

from launcher.data.build import Datasets, build_datasets
from launcher.data.dataset import TokenDataset

__all__ = ["Datasets", "TokenDataset", "build_datasets"]
