"""Session fixtures for the eval tests: toy datasets in both formats and a terrafm_tiny checkpoint."""

from pathlib import Path

import pytest
import torch
from eval_toydata import GEOBENCH_S2, SIZE, make_splits, write_folder, write_hdf5

from terrafm.models import build_model, published_state_dict


@pytest.fixture(scope="session")
def tiny_pth(tmp_path_factory) -> Path:
    """A random-init terrafm_tiny (32 px) saved as a published-layout .pth state_dict."""
    torch.manual_seed(0)
    model = build_model("terrafm_tiny", img_size=SIZE)
    path = tmp_path_factory.mktemp("ckpt") / "terrafm_tiny.pth"
    torch.save(published_state_dict(model), path)
    return path


@pytest.fixture(scope="session")
def hdf5_data(tmp_path_factory) -> Path:
    return write_hdf5(tmp_path_factory.mktemp("geobench") / "m-toy", make_splits(13), GEOBENCH_S2)


@pytest.fixture(scope="session")
def folder_data(tmp_path_factory) -> Path:
    splits = make_splits(13, seed=1)
    del splits["valid"]
    return write_folder(tmp_path_factory.mktemp("eurosat") / "toy", splits)
