"""The trajectory chapter: snapshot timesteps and shapes (the paper's ten of a 200-step DDIM), exact continuation with
`denoise_from`, UNet features through hooks that are always removed, bad input, and the stage."""
import numpy as np
import pytest
import torch

from mri_protodiff.core import PAPER_TIMESTEPS, RunDir, get_profile
from mri_protodiff.data import phantom_sliceset
from mri_protodiff import pipeline as P
from mri_protodiff.pipeline import run_data
from mri_protodiff import diffusion as D
from mri_protodiff import trajectory as T

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    "An untrained 16x16 mask-conditioned UNet (the mechanics do not depend on training), its scheduler and 3 mask channels."
    p = get_profile("smoke", image_size=16, unet_channels=(8, 16), attention_levels=())
    ss = phantom_sliceset(n_subjects=1, slices_per_subject=3, size=16, seed=0)
    return D.build_unet(p, ss.n_labels).eval(), D.make_scheduler(p), D.mask_channel(ss.masks, ss.n_labels), ss


@pytest.fixture(scope="module")
def trajs(model):
    unet, sched, cond, _ = model
    return T.record_trajectory(unet, sched, cond, seed=[5, 6, 7], steps=200)   # the paper's default timesteps


def test_paper_timesteps_shapes_and_maps(model, trajs):
    unet, sched, cond, _ = model
    assert len(trajs) == 3 and all(isinstance(t, T.Trajectory) for t in trajs)
    tr = trajs[0]
    assert tr.timesteps.tolist() == list(PAPER_TIMESTEPS) and tr.steps == 200 and tr.seed == 5
    assert tr.x_t.shape == (10, 1, 16, 16) and tr.x0_hat.shape == (10, 1, 16, 16) and tr.noise_map.shape == (10, 16, 16)
    assert tr.final.shape == (1, 16, 16)
    assert np.allclose(tr.noise_map.min((1, 2)), 0) and np.allclose(tr.noise_map.max((1, 2)), 1)
    # x_t at 995 is the starting noise (995 is the first step), and at 0 it is one step from the final image
    np.testing.assert_array_equal(tr.x_t[0], D.initial_noise([5], (1, 16, 16))[0].numpy())
    assert np.abs(tr.x0_hat).max() <= 1 + 1e-6
    # the noise map is the paper's: min-max scaled mean |eps_hat(x_t, t)| over channels
    eps = D.predict_noise(unet, torch.as_tensor(tr.x_t[3:4]), 665, cond[:1])
    m = eps.abs().mean(1)[0].numpy(); m = (m - m.min()) / (m.max() - m.min())
    np.testing.assert_allclose(tr.noise_map[3], m, atol=1e-5)
    # the trajectory ends on the image `generate` makes from the same seed
    np.testing.assert_allclose(np.stack([t.final for t in trajs]), D.generate(unet, sched, cond, [5, 6, 7], steps=200, batch_size=3), atol=1e-6)
    single = T.record_trajectory(unet, sched, cond[1], seed=6, steps=200, timesteps=(995, 0))
    assert single.timesteps.tolist() == [995, 0]
    np.testing.assert_array_equal(single.x_t[0], trajs[1].x_t[0])                 # the same starting noise, drawn per seed
    # in a batch of one, as `generate` in a batch of one: the same computation, so the same bytes
    np.testing.assert_array_equal(single.final, D.generate(unet, sched, cond[1:2], [6], steps=200, batch_size=1)[0])
    # batch of 1 vs 3: another batch size may sum in another order, and the first DDIM steps from t=995 amplify that
    # rounding (2e-4 at t=0 measured on an AVX2 CPU, 5e-4 for `generate` over the three seeds); 5e-3, 1/400 of the [-1, 1]
    # range, leaves room for other CPUs (AVX-512) and is far below a real change (noise added at t=775 moves it by ~1.9)
    np.testing.assert_allclose(single.x_t, trajs[1].x_t[[0, 9]], atol=5e-3)


def test_denoise_from_recorded_x_t_reproduces_the_final_image(model, trajs):
    unet, sched, cond, _ = model
    finals = np.stack([t.final for t in trajs])
    for k, t in enumerate(PAPER_TIMESTEPS):              # batched: the three trajectories' x_t at timestep t together
        if t > 335: continue                             # (the later ones; the 20-step run below checks every snapshot)
        x_t = np.stack([tr.x_t[k] for tr in trajs])
        out = T.denoise_from(unet, sched, x_t, t, cond, steps=200)
        np.testing.assert_allclose(out, finals, atol=1e-6, err_msg=f"t={t}")
    short = T.record_trajectory(unet, sched, cond, seed=[1, 2, 3], steps=20, timesteps=range(0, 1000, 50))
    for k, t in enumerate(short[0].timesteps):
        out = T.denoise_from(unet, sched, np.stack([tr.x_t[k] for tr in short]), int(t), cond, steps=20)
        np.testing.assert_allclose(out, np.stack([tr.final for tr in short]), atol=1e-6, err_msg=f"t={t}")
    # one image at a time, from a trajectory recorded one at a time: the same computation, so exactly its final image
    one = T.record_trajectory(unet, sched, cond[0], seed=5, steps=200, timesteps=(555,))
    out = T.denoise_from(unet, sched, torch.as_tensor(one.x_t), 555, cond[:1], steps=200, batch_size=1)
    assert isinstance(out, torch.Tensor) and torch.equal(out[0], torch.as_tensor(one.final))
    # one image at a time vs the batch of three it was recorded in: another batch size may sum in another order
    # (a CPU with AVX-512 failed this at atol 1e-6; 5.6e-6 measured on an AVX2 CPU), and 111 DDIM steps accumulate
    # float32 rounding -- 1e-4 is rounding's reach, far below any real difference (a perturbed x_t moves the output by > 1e-2, next test)
    out = T.denoise_from(unet, sched, torch.as_tensor(trajs[0].x_t[4:5]), 555, cond[:1], steps=200, batch_size=1)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, torch.as_tensor(finals[:1]), atol=1e-4)


def test_perturbing_x_t_changes_the_output_and_off_grid_timesteps_work(model, trajs):
    unet, sched, cond, _ = model
    x = trajs[0].x_t[2:3]                                # t = 775
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    out = T.denoise_from(unet, sched, x + 0.5 * noise, 775, cond[:1], steps=200)
    assert np.abs(out - trajs[0].final[None]).max() > 1e-2
    coarse = T.denoise_from(unet, sched, x, 775, cond[:1], steps=50)   # 775 is not on the 50-step grid: steps of 20 from 775
    assert coarse.shape == (1, 1, 16, 16) and np.isfinite(coarse).all() and np.abs(coarse).max() <= 1


def test_unet_features_and_hook_removal(model, monkeypatch):
    unet, sched, cond, ss = model
    blk = T.get_block(unet, "up_blocks.-1")
    f = T.unet_features(unet, ss.images)
    assert f.shape == (3, 8) and f.dtype == np.float32 and len(blk._forward_hooks) == 0
    # batch of 1 vs 3: one forward pass, so rounding only (6e-8 measured on features up to 0.35; 1e-5 leaves 100x for other CPUs)
    np.testing.assert_allclose(T.unet_features(unet, ss.images, batch_size=1), f, atol=1e-5)
    assert np.abs(T.unet_features(unet, ss.images, cond=cond) - f).max() > 1e-6      # the mask channel matters; None means zeros
    np.testing.assert_allclose(T.unet_features(unet, ss.images, cond=torch.zeros(3, 1, 16, 16)), f, atol=1e-6)
    assert np.abs(T.unet_features(unet, ss.images, t=500) - f).max() > 1e-6
    assert T.unet_features(unet, ss.images, block="down_blocks.0").shape == (3, 8)   # a down block returns a tuple
    assert T.unet_features(unet, ss.images, block="mid_block").shape == (3, 16)
    # an error during the forward pass still removes the hook
    def boom(*a, **k): raise RuntimeError("boom")
    monkeypatch.setattr(unet.conv_out, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"): T.unet_features(unet, ss.images)
    assert len(blk._forward_hooks) == 0
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no block 'up_blocks.9'"): T.get_block(unet, "up_blocks.9")
    assert all(len(m._forward_hooks) == 0 for m in unet.modules())


def test_bad_input(model):
    unet, sched, cond, _ = model
    with pytest.raises(ValueError, match=r"not visited by a 200-step DDIM run.*nearest"):
        T.record_trajectory(unet, sched, cond[0], seed=1, steps=200, timesteps=(993, 0))
    with pytest.raises(ValueError, match="mask-conditioned"): T.record_trajectory(unet, sched, None, seed=1, steps=10, timesteps=(0,))
    with pytest.raises(ValueError, match="one conditioning mask per image"): T.record_trajectory(unet, sched, cond[:2], seed=[1, 2, 3], steps=10, timesteps=(0,))
    with pytest.raises(ValueError, match=r"x_t must be \(N, 1, H, W\)"): T.denoise_from(unet, sched, np.zeros((16, 16), np.float32), 5, cond[:1])
    with pytest.raises(ValueError, match="t must be in 0..999"): T.denoise_from(unet, sched, np.zeros((1, 1, 16, 16), np.float32), 1000, cond[:1])
    with pytest.raises(ValueError, match="mask-conditioned"): T.denoise_from(unet, sched, np.zeros((1, 1, 16, 16), np.float32), 5, None)


def test_run_trajectory_stage(tmp_path):
    run = RunDir(tmp_path/"run", get_profile("smoke", n_subjects=4, slices_per_subject=3, unet_channels=(8, 16), attention_levels=(),
                                             train_steps=2, n_generated=3, sample_steps=10, trajectory_steps=10,
                                             trajectory_timesteps=(900, 500, 0)))
    run_data(run)
    with pytest.raises(FileNotFoundError, match="needs stage 'train-diffusion', which is not done"): P.run_trajectory(run)
    P.run_train_diffusion(run, progress=False); P.run_sample(run, progress=False)
    assert P.run_trajectory(run) == "done" and P.run_trajectory(run) == "skipped"
    trs = T.load_trajectories(run)
    assert len(trs) == 3 and trs[0].timesteps.tolist() == [900, 500, 0] and trs[2].x_t.shape == (3, 1, 32, 32)
    z = np.load(run/"samples"/"samples.npz")
    np.testing.assert_array_equal([t.seed for t in trs], z["seeds"][:3])
    np.testing.assert_allclose(np.stack([t.final for t in trs]), z["images"][:3], atol=1e-5)   # same seeds, masks and DDIM steps as `sample`
    assert (run/"trajectory"/"noise_maps.png").exists()
    from mri_protodiff.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "trajectory" in sub and "--n" in sub["trajectory"].format_help()
