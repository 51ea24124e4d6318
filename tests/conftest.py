import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

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
