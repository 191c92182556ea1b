"""Datasets for the experiments: a registry of sources, split train/validation/test and normalized in memory.

:func:`load_data` takes a source by name (:data:`SOURCES`; :func:`register_source` adds one) and
returns :class:`DataSplits`. One file per source family: ``digits.py``, ``synthetic.py``,
``torchvision_sets.py`` (mnist, fashion-mnist, cifar10, cifar100), ``folder.py``.
"""

from initscope.experiments.data.base import SOURCES, DataRef, DataSource, Images, parse_data, register_source, source_usages
from initscope.experiments.data.splits import (NORMALIZATIONS, OFFICIAL_VAL_FRACTION, DataSplits, min_per_class,
                                               stratified_split, stratified_subset)
from initscope.experiments.data import digits, synthetic, torchvision_sets, folder  # noqa: F401,E402  (register, in this order)
from initscope.experiments.data.load import clear_cache, load_data

__all__ = ["NORMALIZATIONS", "OFFICIAL_VAL_FRACTION", "SOURCES", "DataRef", "DataSource", "DataSplits", "Images",
           "clear_cache", "load_data", "min_per_class", "parse_data", "register_source", "source_usages",
           "stratified_split", "stratified_subset"]
