"""Corrupt files (issue 18): every loader of a pipeline file, of a checkpoint and of a user's data names the file it could not
read -- a truncated safetensors, a truncated npz, a garbage .npy, a truncated PNG -- in one `CorruptFile` (a `ValueError`),
with what to do; through the command line that is one line on stderr and a nonzero exit, never a traceback."""
import os, shutil, subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import cli_command, cli_env
from mri_protodiff.core import CorruptFile, STAGE_ADVICE, get_profile
from mri_protodiff import data as DA, diffusion as D, groundtruth as G, influence as I, protonets as PN, quality as Q
from mri_protodiff import readers as R, trajectory as T

torch.set_num_threads(1)
GARBAGE = b"\x00\xff" * 50


def cut(path:Path, keep:float=0.5) -> Path:
    "Truncate `path` to `keep` of its size (what an interrupted copy or a full disk leaves)."
    data = path.read_bytes(); path.write_bytes(data[:int(len(data) * keep)]); return path


def named(e, path:Path, advice:str=STAGE_ADVICE):
    "The error is a `CorruptFile` that starts with the file's path and says what to do."
    assert isinstance(e.value, CorruptFile) and isinstance(e.value, ValueError), repr(e.value)
    assert str(e.value).startswith(f"{path}: cannot be read (") and e.value.path == path, str(e.value)
    assert str(e.value).endswith(advice), str(e.value)


def npz(path:Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True); np.savez(path, **arrays); return path


# --- pipeline files --------------------------------------------------------------------------------------------------

def test_data_cache(tmp_path):
    DA.build_phantom_cache(get_profile("smoke"), tmp_path/"data")
    good = (tmp_path/"data"/"images.npy").read_bytes()
    cut(tmp_path/"data"/"images.npy")                                   # memory-mapped: the data cut short
    with pytest.raises(CorruptFile) as e: DA.read_cache(tmp_path/"data")
    named(e, tmp_path/"data"/"images.npy")
    (tmp_path/"data"/"images.npy").write_bytes(good); (tmp_path/"data"/"subject.npy").write_bytes(GARBAGE)
    with pytest.raises(CorruptFile) as e: DA.read_cache(tmp_path/"data", mmap=False)
    named(e, tmp_path/"data"/"subject.npy")


def test_npz_outputs_of_trajectory_influence_quality_and_groundtruth(tmp_path):
    run = tmp_path/"run"
    files = {"samples/samples.npz": lambda: I.load_samples(run), "trajectory/trajectories.npz": lambda: I.load_trajectory_arrays(run),
             "explanations/full_nis.npz": lambda: I.read_full_nis(run)}
    for rel, load in files.items():
        cut(npz(run/rel, a=np.arange(1000)), 0.9)                          # the zip directory at its end is gone
        with pytest.raises(CorruptFile) as e: load()
        named(e, run/rel)
    with pytest.raises(CorruptFile) as e: T.load_trajectories(run)
    named(e, run/"trajectory"/"trajectories.npz")
    with pytest.raises(CorruptFile) as e: Q.image_quality_table(run)      # read before anything is computed
    named(e, run/"samples"/"samples.npz")
    npz(run/"samples"/"samples.npz", images=np.zeros((2, 1, 8, 8)))      # readable, but not what the stage writes
    with pytest.raises(CorruptFile, match=r"samples\.npz: needs arrays 'images' and 'real_index', has \['images'\]; delete it"):
        Q.image_quality_table(run)
    (run/"explanations"/"explanations.csv").write_text("")
    with pytest.raises(CorruptFile) as e: I.read_explanations(run)
    named(e, run/"explanations"/"explanations.csv")
    p = cut(npz(tmp_path/"gt"/"data.npz", unique=np.arange(100)), 0.9)
    with pytest.raises(CorruptFile) as e: G.load_gt_data(p)
    named(e, p)
    with pytest.raises(FileNotFoundError, match="missing"): G.load_gt_data(tmp_path/"gt"/"none.npz")   # missing is not corrupt


def test_safetensors_outputs(tmp_path, monkeypatch):
    tens = {"w": torch.arange(1000, dtype=torch.float32)}
    p = tmp_path/"init.safetensors"; save_file(tens, str(p)); cut(p)
    with pytest.raises(CorruptFile) as e: G._init_state(SimpleNamespace(folder=tmp_path))
    named(e, p)
    p = tmp_path/"step-000002.safetensors"; D._write_st(p, tens, dict(tag="x")); cut(p)
    with pytest.raises(CorruptFile) as e: D._read_st(p)
    named(e, p)
    save_file(tens, str(p))                                              # intact, but without the state it needs
    with pytest.raises(CorruptFile, match=r"cannot be read \(TypeError"): D._read_st(p)
    Q.save_domain_encoder(Q.DomainEncoder(n_labels=4), tmp_path/"q", dict(digest="x"))
    assert Q.load_domain_encoder(tmp_path/"q")[1]["digest"] == "x"     # intact: loads as before
    cut(tmp_path/"q"/"domain_encoder.safetensors")
    with pytest.raises(CorruptFile) as e: Q.load_domain_encoder(tmp_path/"q")
    named(e, tmp_path/"q"/"domain_encoder.safetensors")


def tiny(**kw):
    return get_profile("smoke", **{**dict(n_subjects=4, slices_per_subject=3, image_size=32, unet_channels=(8, 16), attention_levels=(),
                                        batch_size=4, train_steps=4, warmup_steps=1, checkpoint_every=2), **kw})


def test_training_checkpoint_names_the_file_and_deleting_its_folder_resumes(tmp_path):
    ss = DA.phantom_sliceset(n_subjects=2, slices_per_subject=3, size=32, seed=0)
    p = tiny(train_steps=6)                                              # checkpoints after steps 2 and 4
    def train():
        torch.manual_seed(0)
        return D.train_diffusion(D.build_unet(p, ss.n_labels), D.make_scheduler(p), ss.images, D.mask_channel(ss.masks, ss.n_labels),
                                 p, checkpoint_dir=tmp_path/"ck", progress=False, device="cpu", tag="t")
    train()
    cks = D.list_checkpoints(tmp_path/"ck"); assert [c.name for c in cks] == ["step-000002", "step-000004"]
    for f in ("optimizer.safetensors", "ema.safetensors"):
        good = (cks[-1]/f).read_bytes(); cut(cks[-1]/f)
        with pytest.raises(CorruptFile) as e: train()
        named(e, cks[-1]/f, D.CHECKPOINT_ADVICE)
        (cks[-1]/f).write_bytes(good)
    cut(cks[-1]/"rng.safetensors")
    with pytest.raises(CorruptFile, match="delete its checkpoint folder"): train()
    shutil.rmtree(cks[-1])                                               # what the message says: its checkpoint folder goes ...
    assert train().resumed_from == 2                                     # ... and training resumes from the one before


def test_model_folders_and_user_checkpoints(tmp_path):
    torch.manual_seed(0)
    unet = D.build_unet(tiny(), 4)
    unet.save_pretrained(tmp_path/"user", safe_serialization=True)      # a user's UNet folder, outside any run
    w = tmp_path/"user"/D.WEIGHTS_NAME; good = w.read_bytes()
    for bad in (good[:len(good) // 2], GARBAGE):
        w.write_bytes(bad)
        with pytest.raises(CorruptFile) as e: D.load_diffusion(tmp_path/"user")
        named(e, w, D.CHECKPOINT_GIVEN_ADVICE)
    w.write_bytes(good)
    (tmp_path/"lone").mkdir(); shutil.copy(tmp_path/"user"/"config.json", tmp_path/"lone")
    cut(Path(shutil.copy(w, tmp_path/"lone"/"weights.safetensors")))    # a bare weights file beside its config.json
    with pytest.raises(CorruptFile) as e: D.load_diffusion(tmp_path/"lone"/"weights.safetensors")
    named(e, tmp_path/"lone"/"weights.safetensors", D.CHECKPOINT_GIVEN_ADVICE)
    D.save_diffusion(tmp_path/"run"/"diffusion", unet, D.make_scheduler(tiny()))    # a run's own model: its stage rewrites it
    (tmp_path/"run"/"manifest.json").write_text("{}")
    w = cut(tmp_path/"run"/"diffusion"/"unet"/D.WEIGHTS_NAME)
    with pytest.raises(CorruptFile) as e: D.load_diffusion(tmp_path/"run"/"diffusion")
    named(e, w, STAGE_ADVICE)


def test_pretrained_weights_files(tmp_path):
    import torchvision
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path/"r.pth"); save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path/"r.safetensors"))
    assert set(PN.load_state_file(tmp_path/"r.pth")) == set(sd)          # intact files load as before
    for f in (cut(tmp_path/"r.pth"), cut(tmp_path/"r.safetensors")):
        with pytest.raises(CorruptFile) as e: PN.torchvision_backbone("resnet18", weights=f)
        named(e, f, PN.WEIGHTS_ADVICE)
        with pytest.raises(CorruptFile) as e: Q._state_dict_file(f)
        named(e, f, "replace it with an intact copy of the weights file")


def test_user_images_and_arrays_name_the_file(tmp_path):
    from PIL import Image
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(tmp_path/"a.png")
    cut(tmp_path/"a.png")
    with pytest.raises(ValueError, match=f"^{tmp_path/'a.png'}: cannot read this image -- corrupt or truncated"):
        R.read_image(tmp_path/"a.png")
    np.save(tmp_path/"v.npy", np.zeros((4, 4, 3), np.float32)); (tmp_path/"g.npy").write_bytes(GARBAGE)
    cut(tmp_path/"v.npy", 0.8)
    for f in ("v.npy", "g.npy"):
        with pytest.raises(ValueError, match=f"^{tmp_path/f}: cannot read this array"): R.read_array(tmp_path/f)


# --- through the command line ----------------------------------------------------------------------------------------

def mp(*args):
    r = subprocess.run([*cli_command(), *map(str, args)], capture_output=True, text=True, env=cli_env(), timeout=600)
    return r.returncode, r.stdout, r.stderr


def one_line(rc, err, cmd):
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"mri-protodiff {cmd}: error: "), err
    return lines[0]


def test_corrupt_files_through_the_command_line(tmp_path):
    "A user's damaged --checkpoint, then a run's damaged samples.npz and model weights: one line each, naming the file."
    run = tmp_path/"run"
    rc, out, err = mp("data", "--out", run, "--profile", "smoke")
    assert rc == 0, err
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    UNet2DModel(**D.unet_config(get_profile("smoke"))).save_pretrained(tmp_path/"user", safe_serialization=True)
    w = tmp_path/"user"/D.WEIGHTS_NAME; good = w.read_bytes(); w.write_bytes(os.urandom(len(good)))   # random bytes, valid config.json
    line = one_line(*mp("train-diffusion", "--out", run, "--checkpoint", tmp_path/"user")[::2], "train-diffusion")
    assert f"{w}: cannot be read (" in line and line.endswith(D.CHECKPOINT_GIVEN_ADVICE), line
    w.write_bytes(good)
    rc, out, err = mp("train-diffusion", "--out", run, "--checkpoint", tmp_path/"user")
    assert rc == 0, err
    rc, out, err = mp("sample", "--out", run, "--n", "2", "--steps", "2")
    assert rc == 0, err
    # a run's own files: named by the check of recorded outputs (core) before they are read, else by the loader
    cut(run/"samples"/"samples.npz")
    line = one_line(*mp("image-quality", "--out", run)[::2], "image-quality")
    assert "samples/samples.npz" in line, line
    cut(run/"diffusion"/"unet"/D.WEIGHTS_NAME)
    line = one_line(*mp("sample", "--out", run, "--n", "2", "--steps", "2", "--force")[::2], "sample")
    assert f"diffusion/unet/{D.WEIGHTS_NAME}" in line, line
