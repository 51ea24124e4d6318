"""The diffusion chapter: diffusers round trip, seeded sampling, kill + resume (a real SIGKILL of a subprocess), two-process
training (torchrun, Accelerate MULTI_CPU), user checkpoints, and the bad-input battery (missing files, channel/size mismatch,
NaN loss, GPU out of memory)."""
import json, os, re, shutil, signal, subprocess, sys, time, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mri_protodiff.core import RunDir, get_profile
from mri_protodiff.data import load_sliceset, phantom_sliceset
from mri_protodiff import diffusion as D
from mri_protodiff import pipeline as P
from mri_protodiff.pipeline import run_data

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny(**kw):
    "A profile small enough for tests: 32x32 phantom, a (8, 16) UNet."
    base = dict(n_subjects=4, slices_per_subject=3, image_size=32, unet_channels=(8, 16), attention_levels=(), batch_size=4,
                train_steps=4, warmup_steps=1, checkpoint_every=2, n_generated=3, sample_steps=3, sample_batch=3,
                trajectory_steps=10, trajectory_timesteps=(900, 500, 0))
    return get_profile("smoke", **{**base, **kw})


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    "A run directory with stage `data` done (tiny profile, 12 training steps, checkpoints every 4)."
    run = RunDir(tmp_path_factory.mktemp("d")/"run", tiny(train_steps=12, checkpoint_every=4))
    run_data(run)
    return run


def copy_run(src:RunDir, dst:Path) -> RunDir:
    "A copy of a run directory holding only its data stage."
    shutil.copytree(src.root, dst)
    return RunDir(dst)


@pytest.fixture(scope="module")
def ss():
    return phantom_sliceset(n_subjects=2, slices_per_subject=3, size=32, seed=0)


@pytest.fixture(scope="module")
def trained(ss):
    "A mask-conditioned tiny model after 3 steps (raw and EMA weights differ)."
    p = tiny(train_steps=3)
    torch.manual_seed(0)
    return D.train_diffusion(D.build_unet(p, ss.n_labels), D.make_scheduler(p), ss.images, D.mask_channel(ss.masks, ss.n_labels), p,
                             progress=False, device="cpu")


def cli(*argv, timeout=300):
    "Run `mri-protodiff ARGV` in a fresh process."
    code = "import sys; from mri_protodiff.cli import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=ENV, capture_output=True, text=True, timeout=timeout)


def cli_here(*argv):
    "Run `mri-protodiff ARGV` in this process: (exit code, stdout, stderr)."
    import contextlib, io
    from mri_protodiff.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main([str(a) for a in argv])
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


# --- save -> load by diffusers -> same outputs -------------------------------------------------------------------

def test_saved_model_loads_in_diffusers_with_same_outputs(tmp_path, trained, ss):
    from diffusers import UNet2DModel, DDPMScheduler, DDPMPipeline
    D.save_diffusion(tmp_path/"m", trained.ema_unet, D.make_scheduler(tiny()), raw_unet=trained.unet)
    unet = UNet2DModel.from_pretrained(tmp_path/"m", subfolder="unet")
    sched = DDPMScheduler.from_pretrained(tmp_path/"m", subfolder="scheduler")
    assert (sched.config.num_train_timesteps, sched.config.beta_schedule, sched.config.prediction_type) == (1000, "linear", "epsilon")
    x = torch.randn(2, 2, 32, 32); t = torch.tensor([10, 900])
    with torch.no_grad(): assert torch.equal(unet(x, t).sample, trained.ema_unet(x, t).sample)
    raw = UNet2DModel.from_pretrained(tmp_path/"m", subfolder="unet_raw")
    for a, b in zip(raw.parameters(), trained.unet.parameters()): assert torch.equal(a, b)
    cond = D.mask_channel(ss.masks[:2], ss.n_labels)
    np.testing.assert_array_equal(D.generate(unet, sched, cond, [1, 2], steps=3), D.generate(trained.ema_unet, D.make_scheduler(tiny()), cond, [1, 2], steps=3))
    with pytest.raises(ValueError, match="MaskConditionedPipeline"): DDPMPipeline.from_pretrained(tmp_path/"m")
    assert json.loads((tmp_path/"m"/"conditioning.json").read_text())["conditioning"] == "mask"


# --- the mask-conditioned model as a diffusers pipeline (issue 17) ---------------------------------------------------

@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory, trained, ss):
    "The tiny mask-conditioned model saved by save_diffusion (with its number of labels)."
    return D.save_diffusion(tmp_path_factory.mktemp("mp")/"m", trained.ema_unet, D.make_scheduler(tiny()), info=dict(n_labels=ss.n_labels))


def test_diffusion_pipeline_loads_mask_model_and_samples_like_generate(mask_folder, trained, ss):
    from diffusers import DiffusionPipeline
    index = json.loads((mask_folder/"model_index.json").read_text())
    assert index["_class_name"] == ["MaskConditionedPipeline", "MaskConditionedPipeline"] and index["n_labels"] == ss.n_labels
    assert (mask_folder/D.MASK_PIPELINE_FILE).exists()
    pipe = DiffusionPipeline.from_pretrained(mask_folder, trust_remote_code=True)
    assert type(pipe) is D.MaskConditionedPipeline
    pipe.set_progress_bar_config(disable=True)
    masks, seeds = ss.masks[:3], [21, 22, 23]
    cond = D.mask_channel(masks, ss.n_labels)
    outs = {}
    for sampler in ("ddim", "ddpm"):
        ours = D.generate(trained.ema_unet, D.make_scheduler(tiny()), cond, seeds, steps=3, sampler=sampler)     # the package's sampler
        outs[sampler] = out = pipe(masks, seeds=seeds, num_inference_steps=3, sampler=sampler, output_type="np").images
        assert out.shape == (3, 32, 32, 1) and out.dtype == np.float32
        np.testing.assert_array_equal(out[..., 0], ours[:, 0] * 0.5 + 0.5)       # the same computation, so equal
    assert np.abs(outs["ddim"] - outs["ddpm"]).max() > 1e-3
    pt = pipe(torch.as_tensor(masks[:2]), seeds=seeds[:2], num_inference_steps=3, output_type="pt", return_dict=False)[0]
    assert tuple(pt.shape) == (2, 1, 32, 32)
    np.testing.assert_array_equal(pt.numpy()[:, 0], outs["ddim"][:2, ..., 0])   # DDIM by default
    pil = pipe(masks[:1], seeds=seeds[:1], num_inference_steps=3).images
    assert len(pil) == 1 and pil[0].mode == "L" and pil[0].size == (32, 32)
    # diffusers' generator: one seed per mask drawn from it, so the same generator gives the same images
    a, b, c = (pipe(masks[:2], generator=torch.Generator().manual_seed(s), num_inference_steps=2, output_type="np").images for s in (4, 4, 5))
    np.testing.assert_array_equal(a, b); assert np.abs(a - c).max() > 1e-3
    gens = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)]
    both = pipe(masks[[0, 0]], generator=gens, num_inference_steps=2, output_type="np").images
    np.testing.assert_array_equal(both[0], both[1])                                # one generator per mask


def test_ddpm_pipeline_refuses_mask_model_naming_the_pipeline(mask_folder):
    from diffusers import DDPMPipeline
    with pytest.raises(ValueError, match=r"MaskConditionedPipeline\.py.*\n?.*trust_remote_code") as e:
        DDPMPipeline.from_pretrained(mask_folder)
    assert str(mask_folder) in str(e.value)
    pipe = DDPMPipeline.from_pretrained(mask_folder, trust_remote_code=True)     # allowed to run the shim: the right pipeline
    assert type(pipe) is D.MaskConditionedPipeline
    with pytest.raises(ValueError, match="MaskConditionedPipeline makes one image per label map: pass masks"):
        pipe(batch_size=1, num_inference_steps=2)                                     # called like a DDPMPipeline
    assert "MaskConditionedPipeline.from_pretrained" in (mask_folder/D.MASK_PIPELINE_FILE).read_text()   # what the error says to inspect


def test_mask_pipeline_loads_without_running_folder_code(mask_folder, trained, ss):
    (mask_folder.parent/"copy").mkdir(exist_ok=True)
    cp = mask_folder.parent/"copy"/"m"
    shutil.copytree(mask_folder, cp, dirs_exist_ok=True)
    (cp/D.MASK_PIPELINE_FILE).write_text("raise SystemExit('the folder code ran')\n")
    pipe = D.MaskConditionedPipeline.from_pretrained(cp)
    assert pipe.config.n_labels == ss.n_labels
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), trained.ema_unet.parameters()))
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_mask_pipeline_bad_inputs(mask_folder, ss):
    pipe = D.MaskConditionedPipeline.from_pretrained(mask_folder)
    pipe.set_progress_bar_config(disable=True)
    m = ss.masks[:2]
    with pytest.raises(ValueError, match="2 seeds for 1 masks"): pipe(m[:1], seeds=[1, 2], num_inference_steps=2)
    with pytest.raises(ValueError, match="seeds or generator, not both"): pipe(m, seeds=[1, 2], generator=torch.Generator(), num_inference_steps=2)
    with pytest.raises(ValueError, match="3 generators for 2 masks"): pipe(m, generator=[torch.Generator()] * 3, num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"): pipe(m, seeds=[1, 2], output_type="latent")
    with pytest.raises(ValueError, match=r"mask values must be in 0\.\.1"): pipe(m, seeds=[1, 2], n_labels=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="cond is .* but the UNet makes"): pipe(np.zeros((1, 16, 16), np.int64), seeds=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="steps must be in 1..1000"): pipe(m, seeds=[1, 2], num_inference_steps=0)
    unknown = D.MaskConditionedPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="pass n_labels"): unknown(m, seeds=[1, 2], num_inference_steps=2)
    assert unknown(m, seeds=[1, 2], n_labels=ss.n_labels, num_inference_steps=2, output_type="np").images.shape == (2, 32, 32, 1)
    uncond = D.build_unet(tiny(conditioning="none"))
    with pytest.raises(ValueError, match="DDPMPipeline"): D.MaskConditionedPipeline(unet=uncond, scheduler=pipe.scheduler)


def test_folders_saved_before_the_mask_pipeline_still_load(tmp_path, trained, ss):
    "A run saved as a DDPMPipeline folder (before issue 17): load_diffusion and MaskConditionedPipeline read it; saving it again fixes it."
    from diffusers import DDPMPipeline
    old = tmp_path/"old"
    DDPMPipeline(unet=trained.ema_unet, scheduler=D.make_scheduler(tiny())).save_pretrained(old, safe_serialization=True)
    (old/"conditioning.json").write_text(json.dumps(dict(conditioning="mask", in_channels=2, n_labels=ss.n_labels)))
    u, s = D.load_diffusion(old)
    assert all(torch.equal(a, b) for a, b in zip(u.parameters(), trained.ema_unet.parameters()))
    pipe = D.MaskConditionedPipeline.from_pretrained(old)
    assert pipe.config.n_labels == ss.n_labels                                       # from conditioning.json
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(pipe(ss.masks[:1], seeds=[3], num_inference_steps=2, output_type="np").images[..., 0],
                                  D.generate(u, s, D.mask_channel(ss.masks[:1], ss.n_labels), [3], steps=2)[:, 0] * 0.5 + 0.5)
    D.save_diffusion(old, u, s, info=dict(n_labels=ss.n_labels))
    with pytest.raises(ValueError, match="MaskConditionedPipeline"): DDPMPipeline.from_pretrained(old)


def test_unconditional_model_samples_like_diffusers_pipelines(tmp_path):
    "An unconditional model saved by us is a DDPMPipeline; our samplers give what DDPMPipeline / DDIMPipeline give for that seed."
    from diffusers import DDPMPipeline, DDIMPipeline, DDIMScheduler
    p = tiny(conditioning="none")
    torch.manual_seed(1); u = D.build_unet(p).eval()
    D.save_diffusion(tmp_path/"m", D.build_unet(tiny(), 4), D.make_scheduler(p))       # a mask model saved there first ...
    D.save_diffusion(tmp_path/"m", u, D.make_scheduler(p))                              # ... then replaced
    assert json.loads((tmp_path/"m"/"model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert not (tmp_path/"m"/D.MASK_PIPELINE_FILE).exists()
    pipe = DDPMPipeline.from_pretrained(tmp_path/"m")
    assert type(pipe) is DDPMPipeline
    theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(7), num_inference_steps=4, output_type="np").images
    ours = D.generate(u, D.make_scheduler(p), None, [7], steps=4, sampler="ddpm")
    np.testing.assert_allclose(ours[:, 0] * 0.5 + 0.5, theirs[..., 0], atol=1e-5)
    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    theirs = ddim(batch_size=1, generator=torch.Generator().manual_seed(7), num_inference_steps=5, eta=0.0, output_type="np").images
    np.testing.assert_allclose(D.generate(u, D.make_scheduler(p), None, [7], steps=5)[:, 0] * 0.5 + 0.5, theirs[..., 0], atol=1e-4)


def test_load_diffusion_accepts_every_layout(tmp_path, trained):
    D.save_diffusion(tmp_path/"m", trained.ema_unet, D.make_scheduler(tiny()))
    trained.ema_unet.save_pretrained(tmp_path/"bare", safe_serialization=True)       # config.json + safetensors
    (tmp_path/"file").mkdir()
    shutil.copy(tmp_path/"bare"/"config.json", tmp_path/"file"/"config.json")
    shutil.copy(tmp_path/"bare"/D.WEIGHTS_NAME, tmp_path/"file"/"my_unet.safetensors")
    ref = list(trained.ema_unet.parameters())
    for where in (tmp_path/"m", tmp_path/"bare", tmp_path/"file"/"my_unet.safetensors"):
        u, s = D.load_diffusion(where)
        assert all(torch.equal(a, b) for a, b in zip(u.parameters(), ref)), where
        assert s.config.num_train_timesteps == 1000


# --- sampling -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_seeded_sampling_does_not_depend_on_batch(trained, ss, sampler):
    u, s = trained.ema_unet, D.make_scheduler(tiny())
    cond = D.mask_channel(ss.masks[:3], ss.n_labels)
    runs = [D.generate(u, s, cond, [11, 12, 13], steps=4, sampler=sampler, batch_size=b) for b in (1, 2, 3)]
    for r in runs[1:]: np.testing.assert_allclose(r, runs[0], atol=1e-4)
    rev = D.generate(u, s, cond[[2, 1, 0]], [13, 12, 11], steps=4, sampler=sampler, batch_size=3)
    np.testing.assert_allclose(rev[::-1], runs[0], atol=1e-4)                      # order in the batch does not matter
    np.testing.assert_array_equal(D.generate(u, s, cond, [11, 12, 13], steps=4, sampler=sampler, batch_size=3), runs[2])
    other = D.generate(u, s, cond, [21, 12, 13], steps=4, sampler=sampler, batch_size=3)
    assert np.abs(other[0] - runs[0][0]).max() > 1e-2 and np.abs(other[1:] - runs[0][1:]).max() < 1e-4
    assert runs[0].shape == (3, 1, 32, 32) and runs[0].min() >= -1 and runs[0].max() <= 1


def test_run_sample_writes_images_with_their_masks(tmp_path, data_run):
    run = copy_run(data_run, tmp_path/"run")
    assert P.run_train_diffusion(run, progress=False) == "done"
    assert P.run_sample(run, progress=False) == "done" and P.run_sample(run, progress=False) == "skipped"
    z = np.load(run/"samples"/"samples.npz", allow_pickle=False)
    test = load_sliceset(run, "test")
    assert z["images"].shape == (3, 1, 32, 32) and z["images"].dtype == np.float32
    np.testing.assert_array_equal(z["masks"], test.masks[z["real_index"]])
    assert len(set(z["seeds"].tolist())) == 3 and (run/"samples"/"grid.png").exists()
    rc, out, err = cli_here("sample", "--out", run.root, "--sampler", "ddpm", "--steps", "2", "--n", "2", "--no-progress")
    assert rc == 0, err
    assert np.load(run/"samples"/"samples.npz")["images"].shape == (2, 1, 32, 32)
    assert run.stage("sample")["params"] == dict(n=2, steps=2, sampler="ddpm")


# --- kill + resume = uninterrupted ----------------------------------------------------------------------------------

SLOW_TRAIN = textwrap.dedent("""
    import sys, time
    import mri_protodiff.pipeline as P
    orig = P.train_diffusion             # the stage (chapter pipeline) calls the name it imported from chapter diffusion
    def slow(step, loss):
        if step >= 4: time.sleep(0.5)     # after the first checkpoint: slow enough to be killed mid-run
    P.train_diffusion = lambda *a, **k: orig(*a, **{**k, "callback": slow})
    P.run_train_diffusion(sys.argv[1], progress=False)
""")


def test_killed_then_resumed_run_ends_with_uninterrupted_weights(tmp_path, data_run):
    a, b = copy_run(data_run, tmp_path/"a"), copy_run(data_run, tmp_path/"b")
    ref = subprocess.Popen([sys.executable, "-c", "import sys, mri_protodiff.pipeline as P; P.run_train_diffusion(sys.argv[1], progress=False)",
                            str(a.root)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(b.root)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (b/"diffusion"/"checkpoints"/"step-000004"/"state.json").exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.time() - t0 < 240, "no checkpoint appeared"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL); victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (b/"diffusion"/"unet").exists() and b.stage("train-diffusion")["status"] == "running"
    r = cli("train-diffusion", "--out", b.root, "--no-progress")                  # resume through the command line
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and b.stage("train-diffusion")["summary"]["resumed_from"] in (4, 8)
    ref.communicate(timeout=300); assert ref.returncode == 0
    for sub in ("unet", "unet_raw"):
        wa, wb = load_file(a/"diffusion"/sub/D.WEIGHTS_NAME), load_file(b/"diffusion"/sub/D.WEIGHTS_NAME)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    la, lb = (json.loads((x/"diffusion"/"training.json").read_text())["losses"] for x in (a, b))
    assert la == lb and len(la) == 12


# --- several processes (Accelerate MULTI_CPU through torchrun) -------------------------------------------------------

def test_two_processes_train_like_one(tmp_path, data_run):
    one, two = copy_run(data_run, tmp_path/"one"), copy_run(data_run, tmp_path/"two")
    P.run_train_diffusion(one, progress=False)
    script = tmp_path/"mp.py"
    script.write_text("import sys\nfrom mri_protodiff.cli import main\nraise SystemExit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                        "train-diffusion", "--out", str(two.root), "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s1, s2 = one.stage("train-diffusion")["summary"], two.stage("train-diffusion")["summary"]
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    l1, l2 = (json.loads((x/"diffusion"/"training.json").read_text())["losses"] for x in (one, two))
    np.testing.assert_allclose(l2, l1, rtol=1e-4)     # the same global batches, split over two processes
    w1, w2 = load_file(one/"diffusion"/"unet_raw"/D.WEIGHTS_NAME), load_file(two/"diffusion"/"unet_raw"/D.WEIGHTS_NAME)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 0.02   # Adam turns rounding of near-zero gradients into <= lr-sized steps


def test_reported_final_loss_is_the_loss_the_bar_showed(tmp_path, data_run, capsys):
    "One window (diffusion.LOSS_WINDOW) for the progress bar's loss and the stage's final loss: the two numbers agree."
    run = copy_run(data_run, tmp_path/"run")
    P.run_train_diffusion(run, progress=True)
    shown = re.findall(rf"loss\(last {D.LOSS_WINDOW}\)=([0-9.]+)", capsys.readouterr().err)   # the bar names its window
    assert shown, "the progress bar showed no loss"
    s = run.stage("train-diffusion")["summary"]
    losses = json.loads((run/"diffusion"/"training.json").read_text())["losses"]
    assert s["final_loss"] == pytest.approx(np.mean(losses[-D.LOSS_WINDOW:])) == pytest.approx(D.final_loss(losses))
    assert shown[-1] == f"{s['final_loss']:.4f}"


# --- a user's checkpoint instead of training -----------------------------------------------------------------------

def test_user_checkpoint_replaces_training(tmp_path, data_run, trained):
    run = copy_run(data_run, tmp_path/"run")
    trained.ema_unet.save_pretrained(tmp_path/"user", safe_serialization=True)
    assert P.run_train_diffusion(run, checkpoint=tmp_path/"user") == "done"
    u, _ = D.load_diffusion(run)
    assert all(torch.equal(a, b) for a, b in zip(u.parameters(), trained.ema_unet.parameters()))
    assert run.stage("train-diffusion")["summary"]["conditioning"] == "mask" and not (run/"diffusion"/"checkpoints").exists()
    assert P.run_sample(run, n=2, steps=2, progress=False) == "done"
    from diffusers import DDPMPipeline
    with pytest.raises(ValueError, match="MaskConditionedPipeline"): DDPMPipeline.from_pretrained(run/"diffusion")
    pipe = D.MaskConditionedPipeline.from_pretrained(run)                                # a run directory, as load_diffusion takes
    assert pipe.config.n_labels == load_sliceset(run, "train").n_labels


# --- bad input ------------------------------------------------------------------------------------------------------

def test_incomplete_checkpoint_folders_are_named(tmp_path, trained):
    D.save_diffusion(tmp_path/"m", trained.ema_unet, D.make_scheduler(tiny()))
    def broken(name, edit):
        d = tmp_path/name; shutil.copytree(tmp_path/"m", d); edit(d); return d
    cases = {
        broken("no_weights", lambda d: (d/"unet"/D.WEIGHTS_NAME).unlink()): f"unet/{D.WEIGHTS_NAME}",
        broken("no_config", lambda d: (d/"unet"/"config.json").unlink()): "unet/config.json",
        broken("no_unet", lambda d: shutil.rmtree(d/"unet")): "unet/",
        broken("no_sched", lambda d: (d/"scheduler"/"scheduler_config.json").unlink()): "scheduler_config.json",
        broken("pickle", lambda d: (d/"unet"/D.WEIGHTS_NAME).rename(d/"unet"/"diffusion_pytorch_model.bin")): "only safetensors",
        tmp_path/"nowhere": "no such file",
    }
    for path, words in cases.items():
        with pytest.raises(FileNotFoundError) as e: D.load_diffusion(path)
        assert words in str(e.value) and str(path) in str(e.value), (path, str(e.value))
    (tmp_path/"lone").mkdir(); shutil.copy(tmp_path/"m"/"unet"/D.WEIGHTS_NAME, tmp_path/"lone"/"w.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"): D.load_diffusion(tmp_path/"lone"/"w.safetensors")
    (tmp_path/"empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers checkpoint"): D.load_diffusion(tmp_path/"empty")


@pytest.mark.parametrize("change,words", [(dict(in_channels=3), "takes 3 input channels"),
                                          (dict(out_channels=2), "outputs 2 channels"),
                                          (dict(sample_size=64), "built for 64x64 images, but the data is 32x32")])
def test_checkpoint_that_does_not_fit_the_data(tmp_path, data_run, change, words):
    run = copy_run(data_run, tmp_path/"run")
    from diffusers import UNet2DModel
    UNet2DModel(**{**D.unet_config(run.profile), **change}).save_pretrained(tmp_path/"user", safe_serialization=True)
    with pytest.raises(ValueError, match=words): P.run_train_diffusion(run, checkpoint=tmp_path/"user")
    assert run.stage("train-diffusion")["status"] == "failed" and not (run/"diffusion"/"unet").exists()
    rc, out, err = cli_here("train-diffusion", "--out", run.root, "--checkpoint", tmp_path/"user")
    assert rc == 2 and words in err and str(tmp_path/"user") in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, ss):
    p = tiny(train_steps=8, checkpoint_every=2)
    torch.manual_seed(0); u = D.build_unet(p, ss.n_labels)
    def poison(step, loss):                 # a weight turns NaN after step 5: step 6's loss is NaN
        if step == 5: next(u.parameters()).data.fill_(float("nan"))
    with pytest.raises(D.TrainingDiverged) as e:
        D.train_diffusion(u, D.make_scheduler(p), ss.images, D.mask_channel(ss.masks, ss.n_labels), p, checkpoint_dir=tmp_path/"ck",
                          progress=False, device="cpu", callback=poison)
    assert "nan at step 6" in str(e.value) and "step-000004, is kept" in str(e.value) and "learning_rate" in str(e.value)
    cks = D.list_checkpoints(tmp_path/"ck")
    assert [c.name for c in cks] == ["step-000002", "step-000004"]
    assert all(torch.isfinite(v).all() for v in load_file(cks[-1]/"unet.safetensors").values())
    # resuming from it works (and is not poisoned)
    torch.manual_seed(0)
    r = D.train_diffusion(D.build_unet(p, ss.n_labels), D.make_scheduler(p), ss.images, D.mask_channel(ss.masks, ss.n_labels), p,
                          checkpoint_dir=tmp_path/"ck", progress=False, device="cpu")
    assert r.resumed_from == 4 and np.isfinite(r.losses).all()


def test_nan_in_data_and_bad_shapes(ss):
    p = tiny(train_steps=1)
    u = D.build_unet(p, ss.n_labels)
    bad = np.array(ss.images); bad[0, 0, 0, 0] = np.nan
    cond = D.mask_channel(ss.masks, ss.n_labels)
    with pytest.raises(ValueError, match="NaN"): D.train_diffusion(u, D.make_scheduler(p), bad, cond, p, progress=False, device="cpu")
    with pytest.raises(ValueError, match="pass the mask channel"): D.train_diffusion(u, D.make_scheduler(p), ss.images, None, p, progress=False, device="cpu")
    with pytest.raises(ValueError, match="0..8"): D.mask_channel(np.full((1, 4, 4), 12), 9)
    with pytest.raises(ValueError, match="mask-conditioned"): D.generate(u, D.make_scheduler(p), None, [1], steps=2)
    with pytest.raises(ValueError, match="sampler"): D.generate(u, D.make_scheduler(p), cond[:1], [1], steps=2, sampler="euler")


def test_gpu_out_of_memory_suggests_a_smaller_batch(ss, monkeypatch):
    p = tiny(train_steps=2)
    u = D.build_unet(p, ss.n_labels)
    def oom(*a, **k): raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(u, "forward", oom)
    with pytest.raises(RuntimeError, match=r"out of memory while training with a batch of 4: .*--set batch_size=2"):
        D.train_diffusion(u, D.make_scheduler(p), ss.images, D.mask_channel(ss.masks, ss.n_labels), p, progress=False, device="cpu")
    with pytest.raises(RuntimeError, match=r"out of memory while sampling with a batch of 2: .*--set sample_batch=1"):
        D.generate(u, D.make_scheduler(p), D.mask_channel(ss.masks[:2], ss.n_labels), [1, 2], steps=2, batch_size=2)


def test_cli_help():
    for cmd, opts in [(("train-diffusion",), ["--checkpoint", "--out", "--profile", "--set", "--force"]),
                      (("sample",), ["--sampler", "--steps", "--n", "--out"]),
                      (("bench", "diffusion"), ["--train-steps", "--images", "--ddim-steps", "--repeats"])]:
        rc, out, err = cli_here(*cmd, "--help")
        assert rc == 0 and all(o in out for o in opts), (cmd, out)


def test_benchmark_reports_ratios():
    res = D.benchmark_diffusion(tiny(image_size=16, batch_size=2), train_steps=1, n_images=2, ddim_steps=2, repeats=1, device="cpu")
    for k in ("train_steps_per_s", "ddim_images_per_s"):
        d = res[k]; assert d["ours"] > 0 and d["stock"] > 0 and abs(d["ratio"] - d["ours"] / d["stock"]) < 1e-9
    assert "ratio" in D.format_benchmark(res)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_train_and_convert_to_epsilon(ss, pt):
    p = tiny(train_steps=2, prediction_type=pt)
    s = D.make_scheduler(p)
    w = D.min_snr_weights(s, 5.0); a = s.alphas_cumprod; snr = a / (1 - a)
    expect = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1), "sample": snr.clamp(max=5)}[pt]
    assert torch.allclose(w, expect) and torch.equal(D.min_snr_weights(s, None), torch.ones_like(snr))
    r = D.train_diffusion(D.build_unet(p, ss.n_labels), s, ss.images, D.mask_channel(ss.masks, ss.n_labels), p, progress=False, device="cpu")
    assert np.isfinite(r.losses).all()
    x0, eps, t = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4), 400
    x_t = s.add_noise(x0, eps, torch.tensor([t, t]))
    out = {"epsilon": eps, "v_prediction": s.get_velocity(x0, eps, torch.tensor([t, t])), "sample": x0}[pt]
    assert torch.allclose(D.to_epsilon(out, x_t, t, s), eps, atol=1e-4)
