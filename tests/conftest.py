import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def tmp_run(tmp_path):
    "A fresh run-directory path inside pytest's tmp_path."
    return tmp_path/"run"
