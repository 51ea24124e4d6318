import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Results must not depend on the machine's network: no test (nor a command it starts) downloads pretrained weights.
os.environ.setdefault("MRI_PROTODIFF_OFFLINE", "1")
# Sites built by tests show the library chapters as they are (executing all of them takes ~13 min); test_site executes its own.
os.environ.setdefault("MRI_PROTODIFF_SITE_EXECUTE", "0")

@pytest.fixture
def tmp_run(tmp_path):
    "A fresh run-directory path inside pytest's tmp_path."
    return tmp_path/"run"

def tiny_unet(in_channels=2, size=32, channels=(8, 16, 16), layers_per_block=1, attn_blocks=(), seed=None, **kw):
    """A tiny diffusers `UNet2DModel` for tests (`from conftest import tiny_unet`): one output channel, 4 norm groups,
    one `DownBlock2D`/`UpBlock2D` per entry of `channels`; `attn_blocks` lists the down-block indices that get attention
    (`AttnDownBlock2D`, mirrored by `AttnUpBlock2D` on the up path). `seed`: `torch.manual_seed(seed)` before building.
    Any other `UNet2DModel` argument goes through `kw`. Returned in training mode, like `UNet2DModel(...)`."""
    import torch
    from diffusers import UNet2DModel
    n = len(channels)
    down = tuple("AttnDownBlock2D" if i in attn_blocks else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if n - 1 - i in attn_blocks else "UpBlock2D" for i in range(n))
    if seed is not None: torch.manual_seed(seed)
    return UNet2DModel(**{**dict(sample_size=size, in_channels=in_channels, out_channels=1, layers_per_block=layers_per_block,
                                 block_out_channels=tuple(channels), down_block_types=down, up_block_types=up,
                                 norm_num_groups=4), **kw})


def cli_command() -> list:
    "How a user starts the command line: the installed `mri-protodiff` script (else the module through this Python)."
    exe = Path(sys.executable).parent/"mri-protodiff"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from mri_protodiff.cli import main; sys.exit(main())"]


def cli_env() -> dict:
    """The environment of a command started by a test: one torch thread (tiny models; two OpenMP threads per process on a
    shared 2-core machine were measured 10-40x slower), a fixed hash seed, the CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("MRI_PROTODIFF_DEVICE", None)
    return env
