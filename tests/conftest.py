import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rayeval.config import data_root  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    root = data_root()
    if not (root / "mmlu").is_dir():
        pytest.fail(f"shared data not found at {root}; set RAYEVAL_DATA")
    return root
