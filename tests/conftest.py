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


# Fixtures that embed thousands of questions with the real MiniLM encoder (about a minute on two
# cores with an empty embedding cache): every test that uses one loads real weights.
MODEL_FIXTURES = {"mmlu_split", "gsm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
