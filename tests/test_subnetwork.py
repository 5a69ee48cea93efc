"""Subnetwork value object: sizes, set laws, random controls, files, model checks."""

from __future__ import annotations

import pytest
import torch
from conftest import make
from hypothesis import given, settings
from hypothesis import strategies as st

import instill
from instill.errors import FileFormatError, InstillError, SubnetworkMismatchError

SHAPES = {"a.weight": (3, 4), "b.weight": (5,), "c.weight": (2, 2, 2)}


def random_sub(seed: int, p: float = 0.5) -> instill.Subnetwork:
    gen = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(s, generator=gen) < p for n, s in SHAPES.items()}
    return instill.Subnetwork(masks, dict(SHAPES))


subs = st.builds(random_sub, st.integers(0, 10_000), st.floats(0.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(subs, subs, subs)
def test_set_operation_laws(a, b, c):
    assert ~~a == a
    assert ~(a | b) == (~a & ~b)  # De Morgan
    assert ~(a & b) == (~a | ~b)
    assert (a | b) == (b | a) and (a & b) == (b & a)
    assert (a & (b | c)) == ((a & b) | (a & c))
    assert (a | a) == a and (a & a) == a
    assert (a - b) == (a & ~b)
    assert (a | ~a).density() == 1.0 and (a & ~a).kept() == 0
    assert a.iou(b) == b.iou(a) and 0.0 <= a.iou(b) <= 1.0
    assert a.iou(a) == 1.0
    assert (a | b).kept() == a.kept() + b.kept() - (a & b).kept()


def test_sizes_and_per_layer_density():
    masks = {"a.weight": torch.tensor([[True, False], [False, False]]),
             "b.weight": torch.tensor([True, True])}
    sub = instill.Subnetwork(masks, {"a.weight": (2, 2), "b.weight": (2,)})
    assert sub.kept() == 3 and sub.total() == 6 and sub.density() == 0.5
    assert sub.per_layer_density() == {"a.weight": 0.25, "b.weight": 1.0}


@settings(max_examples=30, deadline=None)
@given(subs, st.integers(0, 1000))
def test_sample_like_and_complement_keep_per_layer_counts(sub, seed):
    like = sub.sample_like(torch.Generator().manual_seed(seed))
    assert {n: int(m.sum()) for n, m in like.masks.items()} == {
        n: int(m.sum()) for n, m in sub.masks.items()}
    if all(int(m.sum()) * 2 <= m.numel() for m in sub.masks.values()):
        comp = sub.sample_complement(torch.Generator().manual_seed(seed))
        assert (comp & sub).kept() == 0
        assert {n: int(m.sum()) for n, m in comp.masks.items()} == {
            n: int(m.sum()) for n, m in sub.masks.items()}


def test_sampling_is_seeded_and_complement_too_small_is_an_error():
    sub = random_sub(0, 0.3)
    assert sub.sample_like(torch.Generator().manual_seed(3)) == sub.sample_like(
        torch.Generator().manual_seed(3))
    with pytest.raises(InstillError, match=r"only \d+ lie outside it"):
        random_sub(1, 0.9).sample_complement()


def test_set_operations_need_the_same_parameters():
    other = instill.Subnetwork({"a.weight": torch.ones(3, 4, dtype=torch.bool)}, dict(SHAPES))
    with pytest.raises(SubnetworkMismatchError, match=r"b\.weight"):
        random_sub(0) | other


def test_save_load_round_trip(tmp_path):
    model, _ = make("gpt2")
    masked = instill.attach_masks(model)
    for m in masked.masks.values():
        m.logits.data.normal_()
    sub = masked.subnetwork({"note": "test"})
    sub.save(tmp_path / "sub.safetensors")
    loaded = instill.Subnetwork.load(tmp_path / "sub.safetensors")
    assert loaded == sub and loaded.fingerprint == sub.fingerprint
    assert loaded.metadata == {"method": "continuous_sparsification", "granularity": "weight",
                               "note": "test"}


def test_loading_a_non_subnetwork_file_is_a_clear_error(tmp_path):
    from instill.storage import save_tensors

    save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)}, {})
    with pytest.raises(FileFormatError, match="not an instill subnetwork"):
        instill.Subnetwork.load(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(FileFormatError):
        instill.Subnetwork.load(tmp_path / "junk.safetensors")


def test_subnetwork_from_another_architecture_names_the_offender():
    small, _ = make("gpt2")
    sub = instill.attach_masks(small).subnetwork()
    other = instill.models.build_model("gpt2", vocab_size=20, n_positions=8, n_embd=32,
                                       n_layer=2, n_head=2)
    with pytest.raises(SubnetworkMismatchError, match=r"c_attn.weight.*shape \(16, 48\)"):
        instill.transplant(other, sub)
    mlp, _ = make("mlp")
    with pytest.raises(SubnetworkMismatchError, match="does not have"), \
            instill.apply_subnetwork(mlp, sub):
        pass


def test_random_controls_do_not_depend_on_the_order_of_names():
    sub = random_sub(4, 0.3)
    reordered = instill.Subnetwork(dict(reversed(sub.masks.items())), sub.fingerprint)
    for draw in ("sample_like", "sample_complement"):
        a = getattr(sub, draw)(torch.Generator().manual_seed(0))
        b = getattr(reordered, draw)(torch.Generator().manual_seed(0))
        assert a == b
