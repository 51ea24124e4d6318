"Prototype networks: backbones, distances, the log activation, the losses of PPNet / EPPNet / ProtoPool."
import math
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from mri_protodiff.protonets import (CompactCNN, adapt_first_conv, torchvision_backbone, torchvision_weights_file,
                                     UNetEncoder, build_backbone, receptive_field, l2_distances, log_activation,
                                     class_identity, PPNet, EPPNet, ProtoPool, cluster_cost, separation_cost,
                                     mean_cluster_cost, l1_wrong_class, combine_losses, topk_dist_cost,
                                     orthogonality_loss, ppnet_loss_terms, protopool_loss_terms, ExplainerConfig,
                                     build_explainer, activation_maps, _trunk)

from conftest import tiny_unet

torch.set_num_threads(1)

# ---------------------------------------------------------------- distances and activation
def test_l2_distances_match_brute_force_and_are_nonnegative():
    g = torch.Generator().manual_seed(0)
    z, p = torch.rand(3, 5, 4, 6, generator=g), torch.rand(7, 5, generator=g)
    brute = ((z[:, None] - p[None, :, :, None, None]) ** 2).sum(2)
    d = l2_distances(z, p)
    assert d.shape == (3, 7, 4, 6) and (d >= 0).all()
    assert torch.allclose(d, brute, atol=1e-5)
    p2 = p.clone(); p2[0] = z[1, :, 2, 3]                                 # a prototype equal to a patch: distance 0
    assert l2_distances(z, p2)[1, 0, 2, 3].abs() < 1e-5

def test_log_activation_formula():
    d = torch.tensor([0.0, 0.5, 1.0, 10.0])
    expect = torch.tensor([math.log(1 / 1e-4), math.log(1.5 / 0.5001), math.log(2 / 1.0001), math.log(11 / 10.0001)])
    assert torch.allclose(log_activation(d), expect, rtol=1e-6)
    assert torch.allclose(log_activation(d, eps=0.1), torch.log((d + 1) / (d + 0.1)))
    assert (log_activation(d)[:-1] > log_activation(d)[1:]).all()          # decreasing in the distance

# ---------------------------------------------------------------- losses on hand-made tensors
def test_ppnet_losses_on_hand_made_tensors():
    md = torch.tensor([[1., 3., 2., 5., 9., 8.],
                       [4., 6., 0.5, 7., 3., 2.],
                       [6., 1., 7., 7., 0.25, 4.]])
    y = torch.tensor([0, 1, 2]); ident = class_identity(3, 2)             # prototypes (0,1) class 0, (2,3) class 1, (4,5) class 2
    assert torch.isclose(cluster_cost(md, y, ident), torch.tensor((1 + 0.5 + 0.25) / 3))
    assert torch.isclose(separation_cost(md, y, ident), torch.tensor((2 + 2 + 1) / 3))
    assert torch.isclose(mean_cluster_cost(md, y, ident), torch.tensor((2 + 3.75 + 2.125) / 3))
    W = torch.tensor([[1., 1., -0.5, 0.2, 0., 0.], [0., 0., 1., 1., 0.3, -0.1], [0.4, 0., 0., 0., 1., 1.]])
    assert torch.isclose(l1_wrong_class(W, 1 - ident.t()), torch.tensor(0.5 + 0.2 + 0.3 + 0.1 + 0.4))
    terms = dict(ce=torch.tensor(0.7), cluster=torch.tensor(2.0), separation=torch.tensor(5.0), l1=torch.tensor(3.0))
    tot = combine_losses(terms, dict(ce=1.0, cluster=0.8, separation=-0.08, l1=1e-4))
    assert torch.isclose(tot, torch.tensor(0.7 + 1.6 - 0.4 + 3e-4))
    with pytest.raises(ValueError, match="unknown terms"): combine_losses(terms, dict(mean_cluster=1.0))

def test_ppnet_loss_terms_on_a_model_match_the_formulas():
    torch.manual_seed(0)
    net = PPNet(CompactCNN(), n_classes=2, protos_per_class=2, proto_dim=4, image_size=32)
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 1])
    out = net(x); t = ppnet_loss_terms(net, out, y)
    md = out.distances.flatten(2).min(-1).values
    assert torch.allclose(out.min_distances, md)
    assert torch.isclose(t["ce"], F.cross_entropy(out.logits, y))
    own = torch.stack([md[0, :2].min(), md[1, 2:].min(), md[2, 2:].min()]).mean()
    other = torch.stack([md[0, 2:].min(), md[1, :2].min(), md[2, :2].min()]).mean()
    mean_own = torch.stack([md[0, :2].mean(), md[1, 2:].mean(), md[2, 2:].mean()]).mean()
    assert torch.isclose(t["cluster"], own) and torch.isclose(t["separation"], other)
    assert torch.isclose(t["mean_cluster"], mean_own)
    assert torch.isclose(t["l1"], torch.tensor(4 * 0.5))                  # initial wrong-class weights are -0.5

def test_ppnet_structure_and_last_layer_init():
    torch.manual_seed(0)
    net = EPPNet(CompactCNN(), n_classes=3, protos_per_class=2, proto_dim=8, image_size=32)
    W = net.last_layer.weight
    assert W.shape == (3, 6) and net.prototype_class.shape == (6, 3)
    assert torch.equal(W, torch.tensor([[1., 1, -.5, -.5, -.5, -.5], [-.5, -.5, 1, 1, -.5, -.5], [-.5, -.5, -.5, -.5, 1, 1]]))
    out = net(torch.randn(2, 1, 32, 32))
    assert torch.allclose(out.similarity, log_activation(out.distances).flatten(2).max(-1).values, atol=1e-5)
    assert torch.allclose(out.logits, out.similarity @ W.t(), atol=1e-5)
    feats = net.features(torch.randn(2, 1, 32, 32))
    assert feats.min() >= 0 and feats.max() <= 1                           # Sigmoid add-on

def test_protopool_losses_on_hand_made_tensors():
    q = torch.zeros(2, 4, 2); q[0, 0, 0] = q[0, 0, 1] = 1.0; q[1, 1, 0] = q[1, 2, 1] = 1.0
    assert torch.isclose(orthogonality_loss(q), torch.tensor((2 * 1.0 + 0.0) / (2 * 2)))   # class 0 slots identical, class 1 orthogonal
    md = torch.tensor([[5., 1., 3., 0.5], [2., 4., 1., 0.1]])
    mass = torch.tensor([[2., 1., 0., 0.], [0., 0., 1., 1.]])
    assert torch.isclose(topk_dist_cost(md, mass, 2), torch.tensor((1 + 0.1) / 2))
    assert torch.isclose(topk_dist_cost(md, 2 - mass, 2), torch.tensor((0.5 + 2) / 2))

def test_protopool_focal_similarity_and_folded_layer():
    torch.manual_seed(0)
    pool = ProtoPool(CompactCNN(), n_classes=3, pool_size=6, slots=2, proto_dim=8, image_size=32).eval()
    x = torch.randn(4, 1, 32, 32)
    out = pool(x)
    d = out.distances
    focal = log_activation(d.amin((2, 3))) - log_activation(d.mean((2, 3)))
    assert torch.allclose(out.similarity, focal, atol=1e-5)
    assert torch.allclose(out.assignment.sum(1), torch.ones(3, 2), atol=1e-6)
    assert not pool.hardened
    pool.harden(); out = pool(x)
    A = out.assignment
    assert set(A.unique().tolist()) == {0.0, 1.0} and torch.equal(A.sum(1), torch.ones(3, 2))
    assert torch.equal(A.argmax(1), pool.assignment_logits.argmax(1))
    assert torch.allclose(out.logits, pool.last_layer(out.similarity), atol=1e-5)
    assert pool.last_layer.weight.shape == (3, 6) and pool.prototype_class.shape == (6, 3)
    t = protopool_loss_terms(pool, out, torch.tensor([0, 1, 2, 0]))
    assert set(t) == {"ce", "cluster", "separation", "l1", "orthogonality"} and torch.isfinite(torch.stack(list(t.values()))).all()

def test_protopool_gumbel_scale_sharpens_assignment():
    torch.manual_seed(0)
    pool = ProtoPool(CompactCNN(), n_classes=2, pool_size=5, slots=2, proto_dim=4, image_size=32)
    pool.eval(); soft = pool.assignment().amax(1).min()
    pool.gumbel_scale.fill_(1000.0); hard = pool.assignment().amax(1).min()
    assert soft < 0.6 and hard > 0.999
    pool.train(); torch.manual_seed(1); g = pool.assignment()          # Gumbel noise, still a distribution per slot
    assert torch.allclose(g.sum(1), torch.ones(2, 2), atol=1e-5)

# ---------------------------------------------------------------- backbones
def test_one_channel_adaptation_equals_rgb_on_grey_images():
    import torchvision
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None).eval()
    t3, _ = _trunk("resnet18", rgb)
    import copy
    t1 = adapt_first_conv(copy.deepcopy(t3), 1)
    assert t1[0].in_channels == 1 and t3[0].in_channels == 3
    assert torch.allclose(t1[0].weight, t3[0].weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(): assert torch.allclose(t1(x), t3(x.repeat(1, 3, 1, 1)), atol=1e-4)

def test_pretrained_weights_absent_is_an_error_and_random_is_labelled(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path/"hub"))
    assert not torchvision_weights_file("resnet18").exists()
    with pytest.raises(FileNotFoundError, match="not found"): torchvision_backbone("resnet18")
    with pytest.raises(FileNotFoundError): build_backbone("resnet18", weights=tmp_path/"nope.pth")
    bb = torchvision_backbone("resnet18", weights="random")
    assert bb.weights_label.startswith("random") and not bb.normalize
    assert bb(torch.randn(2, 1, 64, 64)).shape == (2, 512, 2, 2)

def test_local_weights_file_is_loaded(tmp_path, monkeypatch):
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path/"r18.safetensors"))
    torch.save(ref.state_dict(), tmp_path/"r18.pth")
    for f in ("r18.safetensors", "r18.pth"):
        bb = torchvision_backbone("resnet18", weights=tmp_path/f)
        assert bb.normalize and "pretrained" in bb.weights_label
        assert torch.allclose(bb.trunk[0].weight, ref.conv1.weight.sum(1, keepdim=True))
        assert torch.equal(bb.trunk[4][0].conv1.weight, ref.layer1[0].conv1.weight)
    # the hub cache is where torchvision itself would look
    monkeypatch.setenv("TORCH_HOME", str(tmp_path/"hub"))
    f = torchvision_weights_file("resnet18"); f.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), f)
    assert torch.equal(torchvision_backbone("resnet18").trunk[4][0].conv1.weight, ref.layer1[0].conv1.weight)

def test_densenet_trunk_takes_one_channel():
    bb = torchvision_backbone("densenet121", weights="random")
    assert bb.out_channels == 1024 and bb(torch.randn(1, 1, 64, 64)).shape == (1, 1024, 2, 2)

def test_unet_encoder_is_the_frozen_down_path_at_t0():
    torch.manual_seed(0); un = tiny_unet(attn_blocks=(1,))
    feats = {}
    h = un.down_blocks[-1].register_forward_hook(lambda m, i, o: feats.update(h=o[0]))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad(): un(torch.cat([x, torch.zeros_like(x)], 1), 0)
    h.remove()
    enc = build_backbone("unet", unet=un)
    assert isinstance(enc, UNetEncoder) and enc.out_channels == 16
    with torch.no_grad(): assert torch.allclose(enc(x), feats["h"], atol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train(); assert not enc.training
    assert un.up_blocks is not None and len(un.up_blocks) == 3               # the caller's UNet is left whole
    enc1 = UNetEncoder(tiny_unet(in_channels=1, attn_blocks=(1,)))             # unconditional UNet: no mask channel
    assert enc1(x).shape == (2, 16, 8, 8)

def test_receptive_field_of_known_convolutions():
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1))
    rf = receptive_field(conv, 32)    # two 3x3 stride-2 convs: field 7, stride 4
    assert (rf.grid, rf.stride, rf.size) == ((8, 8), 4.0, 7)
    y0, x0, y1, x1 = rf.box(3, 4)
    assert (y1 - y0, x1 - x0) == (7, 7) and (y0 + y1 - 1) / 2 == rf.offset + 12
    torch.manual_seed(0)
    net = PPNet(CompactCNN(), n_classes=2, protos_per_class=1, proto_dim=4, image_size=64)
    assert net.receptive.grid == (8, 8) and net.receptive.stride == 8.0
    b = net.receptive_box(4, 4); assert 0 <= b[0] < b[2] <= 64 and b[3] - b[1] == b[2] - b[0]
    net.train(); net.receptive_box(0, 0); assert net.training                  # measuring does not change the mode

# ---------------------------------------------------------------- building
def test_build_explainer_is_deterministic_and_validates():
    cfg = ExplainerConfig(method="ppnet", n_classes=3, image_size=32, protos_per_class=2, proto_dim=8)
    torch.manual_seed(5); a = build_explainer(cfg); torch.manual_seed(5); b = build_explainer(cfg)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert ExplainerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown explainer method"): build_explainer(ExplainerConfig(method="protonet"))
    with pytest.raises(ValueError, match="unknown backbone"): build_backbone("alexnet")
    with pytest.raises(ValueError, match="unknown explainer config"): ExplainerConfig.from_dict(dict(method="ppnet", colour=1))
    with pytest.raises(ValueError, match="needs a UNet"): build_explainer(ExplainerConfig(backbone="unet"))

def test_unet_backbone_explainer_and_activation_maps():
    torch.manual_seed(0)
    cfg = ExplainerConfig(method="protopool", backbone="unet", n_classes=2, image_size=32, pool_size=4, pool_slots=2, proto_dim=8)
    m = build_explainer(cfg, unet=tiny_unet(attn_blocks=(1,)))
    assert cfg.unet_config is not None and cfg.unet_config["in_channels"] == 2
    out = m(torch.randn(2, 1, 32, 32))
    assert out.distances.shape == (2, 4, 8, 8) and out.logits.shape == (2, 2)
    maps = activation_maps(m, torch.randn(2, 1, 32, 32))
    assert maps.shape == (2, 4, 32, 32) and torch.isfinite(maps).all()

def test_protopool_harden_gives_each_class_distinct_prototypes():
    torch.manual_seed(0)
    pool = ProtoPool(CompactCNN(), n_classes=2, pool_size=5, slots=3, proto_dim=4, image_size=32)
    with torch.no_grad():
        pool.assignment_logits.zero_()
        pool.assignment_logits[0, 1, :] = torch.tensor([3.0, 2.0, 1.0])     # all three slots of class 0 prefer prototype 1
        pool.assignment_logits[0, 3, 1] = 0.5; pool.assignment_logits[0, 4, 2] = 0.4
    pool.harden()
    assert pool.hard_index[0].tolist() == [1, 3, 4]
    assert all(len(set(r)) == 3 for r in pool.hard_index.tolist())
    pool.harden(distinct=False); assert pool.hard_index[0].tolist() == [1, 1, 1]
