"""apply_subnetwork, transplant, unfreeze and bake on real tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import make, run

import instill


def discovered(arch: str, seed: int = 0):
    """A trained-looking model and a random half-density subnetwork over its default targets."""
    model, batch = make(arch, seed)
    masked = instill.attach_masks(model)
    gen = torch.Generator().manual_seed(seed)
    for m in masked.masks.values():
        m.logits.data = torch.randn(m.logits.shape, generator=gen)
    sub = masked.subnetwork()
    return masked.detach_masks(), sub, batch


def test_apply_subnetwork_keeps_or_ablates_and_restores_exactly(arch):
    model, sub, _ = discovered(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with instill.apply_subnetwork(model, sub, "keep"):
        for name, mask in sub.masks.items():
            w = model.get_parameter(name)
            assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
            assert torch.equal(w[mask], before[name][mask])
    with pytest.raises(RuntimeError), instill.apply_subnetwork(model, sub, "ablate"):
        for name, mask in sub.masks.items():
            assert not model.get_parameter(name)[mask].any()
        raise RuntimeError("restored even on error")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch_name", ["gpt2", "resnet", "vit"])
def test_frozen_subnetwork_does_not_move_under_adamw_with_weight_decay(arch_name):
    trained, sub, batch = discovered(arch_name)
    new = instill.transplant(trained, sub, seed=1)
    new.train()
    opt = torch.optim.AdamW(new.parameters(), lr=1e-2, weight_decay=0.1)
    start = instill.bake(new)
    for _ in range(20):
        opt.zero_grad()
        run(new, batch).pow(2).mean().backward()
        opt.step()
    baked = instill.bake(new)
    for name, mask in sub.masks.items():
        w = baked.get_parameter(name)
        assert torch.equal(w[mask], trained.get_parameter(name)[mask])  # bit for bit
        assert not torch.equal(w[~mask], start.get_parameter(name)[~mask])  # the rest trains


def test_transplant_takes_fresh_weights_outside_the_mask_and_keeps_unmasked_params():
    trained, sub, _ = discovered("gpt2")
    fresh = instill.fresh_init(trained, seed=5)
    new = instill.bake(instill.transplant(trained, sub, fresh=fresh))
    for name, mask in sub.masks.items():
        expected = torch.where(mask, trained.get_parameter(name), fresh.get_parameter(name))
        assert torch.equal(new.get_parameter(name), expected)
    wte = "transformer.wte.weight"
    assert torch.equal(new.get_parameter(wte), trained.get_parameter(wte))
    reinit = instill.bake(instill.transplant(trained, sub, fresh=fresh, keep_unmasked=False))
    assert torch.equal(reinit.get_parameter(wte), fresh.get_parameter(wte))
    assert reinit.lm_head.weight is reinit.transformer.wte.weight  # ties survive


def test_transplant_is_called_like_the_original_and_bake_matches_it(arch):
    trained, sub, batch = discovered(arch)
    new = instill.transplant(trained, sub, seed=0).eval()
    baked = instill.bake(new).eval()
    assert type(baked) is type(trained)
    assert [n for n, _ in baked.named_parameters()] == [n for n, _ in trained.named_parameters()]
    with torch.no_grad():
        assert torch.allclose(run(new, batch), run(baked, batch), atol=1e-6)


def test_seeded_fresh_init_is_deterministic_and_differs_from_trained():
    trained, _, _ = discovered("resnet")
    a, b = instill.fresh_init(trained, seed=3), instill.fresh_init(trained, seed=3)
    name = "resnet.embedder.embedder.convolution.weight"
    assert torch.equal(a.get_parameter(name), b.get_parameter(name))
    assert not torch.equal(a.get_parameter(name), trained.get_parameter(name))


def test_unfreeze_lets_the_subnetwork_train():
    trained, sub, batch = discovered("mlp")
    new = instill.transplant(trained, sub, seed=0, freeze=False)
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in trained.named_parameters()]
    opt = torch.optim.SGD(new.parameters(), lr=0.5)
    run(new, batch).pow(2).mean().backward()
    opt.step()
    name, mask = next(iter(sub.masks.items()))
    assert not torch.equal(new.get_parameter(name)[mask], trained.get_parameter(name)[mask])


def test_bake_of_a_masked_model_is_the_pruned_model():
    trained, _, _ = discovered("mlp")
    masked = instill.attach_masks(trained, instill.MaskConfig(method="magnitude", keep=0.3))
    pruned = instill.bake(masked)
    assert type(pruned) is type(trained)
    for name, mask in masked.subnetwork().masks.items():
        w = pruned.get_parameter(name)
        assert torch.equal(w, masked.model.get_submodule(name.rsplit(".", 1)[0])
                           .parametrizations.weight.original * mask)


def _plain(model):
    return dict(instill.bake(model).named_parameters())


def test_conditions_keep_exactly_what_their_names_say(arch):
    from instill.experiments.common import CONDITIONS, starting_model

    trained, sub, _ = discovered(arch)
    old = dict(trained.named_parameters())
    fresh = dict(instill.fresh_init(trained, 7).named_parameters())
    untargeted = [n for n in old if n not in sub.masks]
    assert untargeted and {"embeddings_only", "subnet-fresh", "sampled-fresh"} <= set(CONDITIONS)

    emb = _plain(starting_model("embeddings_only", trained, sub, 7))
    assert all(torch.equal(emb[n], old[n]) for n in untargeted)  # trained, untargeted
    assert all(torch.equal(emb[n], fresh[n]) for n in sub.masks)  # every targeted weight fresh

    for name, keeps in (("subnet", True), ("subnet-fresh", False)):
        new = _plain(starting_model(name, trained, sub, 7))
        source = old if keeps else fresh
        assert all(torch.equal(new[n], source[n]) for n in untargeted), name
        for n, mask in sub.masks.items():  # the subnetwork trained, the rest fresh
            assert torch.equal(new[n][mask], old[n][mask])
            assert torch.equal(new[n][~mask], fresh[n][~mask])
    sampled = starting_model("sampled-fresh", trained, sub, 7)
    masks = {n.rsplit(".parametrizations", 1)[0]: m for n, m in sampled.named_buffers()
             if n.endswith(".mask")}
    assert sum(int(m.sum()) for m in masks.values()) == sub.kept()
    with pytest.raises(instill.errors.ConfigError, match="unknown condition 'magic'"):
        starting_model("magic", trained, sub, 7)


def test_a_model_with_masks_attached_is_a_clear_user_error():
    """Masks or a transplant still attached: the error names the fix and is an InstillError
    (the CLI prints it without a traceback)."""
    from instill.errors import InstillError, ModelStateError

    model, sub, _ = discovered("mlp")
    moved = instill.transplant(model, sub)
    with pytest.raises(ModelStateError, match=r"instill\.bake\(model\)") as err, \
            instill.apply_subnetwork(moved, sub):
        pass
    assert isinstance(err.value, InstillError)
    with pytest.raises(ModelStateError, match="already has parametrizations"):
        instill.attach_masks(moved)
    with pytest.raises(InstillError, match="mode must be 'keep' or 'ablate'"), \
            instill.apply_subnetwork(model, sub, "drop"):
        pass

