"""backbones.model / heads / sampler: family names, pretrained loading, losses, P x K sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backbones.heads import MetricLoss, batch_hard_triplet_loss, make_head
from backbones.model import GeM, PretrainedMismatch, build_model, load_pretrained, resolve_arch
from backbones.sampler import PKSampler
from competition.console import console

TINY = "mobilenetv3_small_050"


def test_family_names_map_to_timm_models():
    assert resolve_arch("efficientnet") == "efficientnet_b0"
    assert resolve_arch("efficientnet_b3") == "efficientnet_b3"
    assert resolve_arch("resnet") == "resnet50"
    assert resolve_arch("resnet18") == "resnet18"
    assert resolve_arch("convnext") == "convnext_tiny"
    assert resolve_arch("mobilenetv2") == "mobilenetv2_100"
    assert resolve_arch("mobilenet") == "mobilenetv3_large_100"
    assert resolve_arch("regnet").startswith("regnet")


def test_unknown_arch_lists_close_timm_names():
    with pytest.raises(ValueError, match=r"unknown architecture 'efficientnet_b99'.*efficientnet_b0"):
        resolve_arch("efficientnet_b99")


def test_model_output_is_unit_norm(capsys):
    with console():   # build_model logs what it loaded; a command's console shows it on stdout
        model = build_model(TINY, embedding_dim=16).eval()
    said = capsys.readouterr().out
    assert "no --pretrained weights: training mobilenetv3_small_050 from random initialisation" in said
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_gem_p1_is_average_pooling():
    x = torch.rand(2, 4, 3, 3) + 0.1
    assert torch.allclose(GeM(1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)


def test_pretrained_roundtrip_and_mismatch(tmp_path):
    from safetensors.torch import save_file
    src = build_model(TINY, embedding_dim=8, announce=False)
    good = tmp_path / "good.safetensors"
    save_file({**src.body.state_dict(), "classifier.weight": torch.zeros(10, 4)}, str(good))
    dst = build_model(TINY, embedding_dim=8, announce=False)
    msg = load_pretrained(dst, good)
    assert "0 missing" in msg and "1 classifier keys dropped" in msg
    k = "conv_stem.weight"
    assert torch.equal(dst.body.state_dict()[k], src.body.state_dict()[k])
    other = tmp_path / "resnet.pth"
    torch.save(build_model("resnet10t", embedding_dim=8, announce=False).body.state_dict(), other)
    with pytest.raises(PretrainedMismatch, match=r"resnet\.pth does not fit mobilenetv3_small_050"):
        load_pretrained(dst, other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(PretrainedMismatch, match="junk.safetensors"):
        build_model(TINY, pretrained=junk, announce=False)


@pytest.mark.parametrize("kind", ["arcface", "cosface", "softmax"])
def test_heads_give_finite_loss_and_gradients(kind):
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = MetricLoss(make_head(kind, 16, 4, scale=16, margin=0.2), triplet_weight=1.0)(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0


def test_triplet_loss_zero_for_separated_classes():
    emb = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    assert batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=0.3).item() == 0.0


def test_pk_sampler_is_balanced_seeded_resumable_and_shards():
    labels = np.repeat(np.arange(10), 7)
    s = PKSampler(labels, p=4, k=3, seed=5)
    s.set_epoch(2)
    batches = list(s)
    assert len(batches) == len(s) == 70 // 12
    for b in batches:
        _, counts = np.unique(labels[b], return_counts=True)
        assert len(counts) == 4 and (counts == 3).all()
    t = PKSampler(labels, p=4, k=3, seed=5)
    t.load_state_dict(s.state_dict())
    assert list(t) == batches
    t.set_epoch(3)
    assert list(t) != batches
    s0 = PKSampler(labels, 4, 3, seed=5, rank=0, world_size=2)
    s1 = PKSampler(labels, 4, 3, seed=5, rank=1, world_size=2)
    s0.set_epoch(2), s1.set_epoch(2)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 2 and not any(x in b for x in a)
    assert sorted(map(tuple, a + b)) == sorted(map(tuple, batches[:4]))


def test_a_model_spec_from_a_stranger_cannot_reach_the_hub_or_another_folder():
    from backbones.model import ArchError, model_from_spec

    for arch in ("hf-hub:timm/resnet10t.c3_in1k", "local-dir:/etc", "not_a_model"):
        with pytest.raises(ArchError, match="not a timm model name"):
            model_from_spec({"arch": arch, "embedding_dim": 8})
