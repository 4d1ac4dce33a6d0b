import os
import sys
from pathlib import Path

import pytest
import torch

# tests/tiny.py and tests/layer_methods.py hold shared checks; let pytest explain their failing asserts.
pytest.register_assert_rewrite("tiny", "layer_methods")

# tests/tiny.py is imported as `tiny` by every test module.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# model.dtype: auto picks bf16 on hardware with native bf16; the tests compute in fp32 on every machine
# (tests/models/test_precision.py sets this itself to test the detection).
os.environ.setdefault("PEFTCLI_BF16", "0")

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads fighting
# over cores made single forward passes ~50x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """{arch: dir} of tiny Llama, GPT-2 and BERT models saved once, for tests that train from a model name."""
    from tiny import save_bases

    return save_bases(tmp_path_factory.mktemp("bases"))
