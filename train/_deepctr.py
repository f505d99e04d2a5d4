"""deepctr-torch, imported without its import-time version check.

``deepctr_torch/__init__.py`` starts a thread that asks PyPI for the latest release and prints a line
when the machine is offline; a training job should neither phone out nor print stray lines. The
check lives in ``deepctr_torch.utils``, so that module is loaded first with the check disabled.
"""
from __future__ import annotations

import importlib.util
import sys


def _load_utils_without_version_check() -> None:
    if "deepctr_torch" in sys.modules:
        return
    package = importlib.util.find_spec("deepctr_torch")
    if package is None or not package.submodule_search_locations:
        raise ImportError("deepctr-torch is not installed (pip install 'bidder[train]')")
    location = f"{list(package.submodule_search_locations)[0]}/utils.py"
    spec = importlib.util.spec_from_file_location("deepctr_torch.utils", location)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    utils.check_version = lambda version: None
    sys.modules["deepctr_torch.utils"] = utils


_load_utils_without_version_check()

import deepctr_torch  # noqa: E402
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat  # noqa: E402
from deepctr_torch.models import DCNMix, DeepFM, AutoInt  # noqa: E402
from deepctr_torch.models.basemodel import BaseModel  # noqa: E402

VERSION = deepctr_torch.__version__

__all__ = ["VERSION", "AutoInt", "BaseModel", "DCNMix", "DeepFM", "SparseFeat", "VarLenSparseFeat"]
