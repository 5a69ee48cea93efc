"""instill.analysis: overlap, chance levels, cross-ablation, frivolous weights, magnitude
baselines, compression curves and sparse weight files."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from instill.analysis import (
    chance_overlap,
    compression_curve,
    cross_ablation,
    file_sizes,
    frivolous,
    load_sparse,
    magnitude_mask,
    overlap_matrix,
    save_sparse,
    sparse_state_dict,
    torch_prune_reference,
)
from instill.analysis.compression import _META, INDICES, NEGZERO
from instill.core import MaskConfig, Subnetwork, apply_subnetwork, attach_masks
from instill.errors import ConfigError, FileFormatError, SubnetworkMismatchError
from instill.storage import save_tensors

torch.set_num_threads(1)


def sub_of(**masks: list) -> Subnetwork:
    tensors = {n.replace("_", "."): torch.tensor(m, dtype=torch.bool) for n, m in masks.items()}
    return Subnetwork(tensors, {n: tuple(t.shape) for n, t in tensors.items()})


def random_sub(shapes: dict, seed: int, p: float = 0.4) -> Subnetwork:
    gen = torch.Generator().manual_seed(seed)
    return Subnetwork({n: torch.rand(s, generator=gen) < p for n, s in shapes.items()},
                      dict(shapes))


def mlp(seed: int, sizes: tuple[int, ...] = (8, 16, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# --------------------------------------------------------------------------- overlap


def test_overlap_matrix_exact_numbers():
    x = sub_of(a_weight=[1, 1, 0, 0], b_weight=[1, 0])
    y = sub_of(a_weight=[0, 1, 1, 0], b_weight=[1, 1])
    out = overlap_matrix({"x": x, "y": y})
    assert out["names"] == ["x", "y"] and out["kept"] == {"x": 3, "y": 4}
    assert out["intersection"]["x"]["y"] == out["intersection"]["y"]["x"] == 2
    assert out["iou"]["x"]["y"] == out["iou"]["y"]["x"] == pytest.approx(2 / 5)
    assert out["iou"]["x"]["x"] == 1.0 and out["shared_fraction"]["y"]["y"] == 1.0
    assert out["shared_fraction"]["x"]["y"] == pytest.approx(2 / 3)
    assert out["shared_fraction"]["y"]["x"] == pytest.approx(2 / 4)
    a, b = out["per_layer"]["a.weight"], out["per_layer"]["b.weight"]
    assert a["iou"]["x"]["y"] == pytest.approx(1 / 3) and b["iou"]["x"]["y"] == pytest.approx(0.5)
    assert a["shared_fraction"]["x"]["y"] == pytest.approx(0.5)
    assert b["shared_fraction"]["x"]["y"] == 1.0 and b["shared_fraction"]["y"]["x"] == 0.5
    assert out["iou"]["x"]["y"] == pytest.approx(x.iou(y))


def test_overlap_of_empty_masks():
    empty = sub_of(a_weight=[0, 0])
    full = sub_of(a_weight=[1, 1])
    out = overlap_matrix({"e": empty, "f": full})
    assert out["iou"]["e"]["e"] == 1.0 and out["iou"]["e"]["f"] == 0.0
    assert math.isnan(out["shared_fraction"]["e"]["f"]) and out["shared_fraction"]["f"]["e"] == 0


def test_masks_of_different_models_name_the_parameter():
    small, big = mlp(0, (2, 3, 2)), mlp(0, (2, 3, 4))
    a, b = magnitude_mask(small, 0.5), magnitude_mask(big, 0.5)
    for call in (lambda: overlap_matrix({"a": a, "b": b}), lambda: chance_overlap(a, b),
                 lambda: frivolous([a, b])):
        with pytest.raises(SubnetworkMismatchError, match=r"'2\.weight'"):
            call()
    other_targets = magnitude_mask(small, 0.5, targets=["0"])
    with pytest.raises(SubnetworkMismatchError, match=r"'2\.weight'.*only one"):
        overlap_matrix({"a": a, "c": other_targets})
    with pytest.raises(ConfigError):
        overlap_matrix({})


def test_chance_overlap_exact_numbers():
    x = sub_of(a_weight=[1, 1, 0, 0], b_weight=[1, 0])
    y = sub_of(a_weight=[0, 1, 1, 0], b_weight=[1, 1])
    out = chance_overlap(x, y)
    assert out["per_layer"]["a.weight"]["intersection"] == pytest.approx(2 * 2 / 4)
    assert out["per_layer"]["b.weight"]["intersection"] == pytest.approx(1 * 2 / 2)
    assert out["intersection"] == pytest.approx(2.0) and out["union"] == pytest.approx(5.0)
    assert out["iou"] == pytest.approx(0.4)
    assert out["shared_a_in_b"] == pytest.approx(2 / 3) and out["shared_b_in_a"] == 0.5


def test_chance_overlap_matches_monte_carlo():
    shapes = {"a.weight": (10, 10), "b.weight": (40,)}
    a = random_sub(shapes, 1, 0.3)
    b = random_sub(shapes, 2, 0.6)
    expected = chance_overlap(a, b)
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    inter = dict.fromkeys(shapes, 0.0)
    iou = shared = 0.0
    for _ in range(draws):
        ra, rb = a.sample_like(gen), b.sample_like(gen)
        for n in shapes:
            inter[n] += int((ra.masks[n] & rb.masks[n]).sum()) / draws
        iou += ra.iou(rb) / draws
        shared += (ra & rb).kept() / ra.kept() / draws
    for n in shapes:
        assert inter[n] == pytest.approx(expected["per_layer"][n]["intersection"], abs=0.25)
    assert shared == pytest.approx(expected["shared_a_in_b"], abs=0.01)
    assert iou == pytest.approx(expected["iou"], abs=0.01)  # E|∩|/E|∪| approximates E[IoU]


# --------------------------------------------------------------------------- cross-ablation


def identity_model() -> nn.Linear:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    return model


def copies_input(i: int, x: torch.Tensor):
    def metric(model: nn.Module) -> float:
        with torch.no_grad():
            return ((model(x)[:, i] - x[:, i]).abs() < 1e-6).float().mean().item()
    return metric


def test_cross_ablation_is_diagonal_for_disjoint_subtasks():
    model = identity_model()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    subs = {"first": sub_of(weight=[[1, 0], [0, 0]]), "second": sub_of(weight=[[0, 0], [0, 1]]),
            "both": sub_of(weight=[[1, 0], [0, 1]])}
    metrics = {"first": copies_input(0, x), "second": copies_input(1, x)}
    out = cross_ablation(model, subs, metrics, seed=3)
    assert out["baseline"] == {"first": 1.0, "second": 1.0}
    assert out["drop"]["first"] == {"first": 1.0, "second": 0.0}
    assert out["drop"]["second"] == {"first": 0.0, "second": 1.0}
    assert out["drop"]["both"] == {"first": 1.0, "second": 1.0}
    assert out["specificity"] == {"first": 1.0, "second": 1.0}
    assert torch.equal(model.weight, torch.eye(2))  # restored
    for name, sub in subs.items():
        control = sub.sample_like(torch.Generator().manual_seed(3))
        with apply_subnetwork(model, control, "ablate"):
            assert out["random_ablated"][name] == {m: f(model) for m, f in metrics.items()}
    assert set(out["random_specificity"]) == {"first", "second"}
    with pytest.raises(ConfigError):
        cross_ablation(model, subs, {}, seed=0)


# --------------------------------------------------------------------------- frivolous


def test_frivolous_is_the_complement_of_the_union():
    shapes = {"a.weight": (4, 5), "b.weight": (7,)}
    a, b, c, base = (random_sub(shapes, s, 0.2) for s in range(4))
    unused = frivolous([a, b, c])
    assert unused == ~(a | b | c)
    assert (unused & a).kept() == 0 and (unused | a | b | c).density() == 1.0
    assert frivolous({"a": a, "b": b, "c": c}) == unused
    with_base = frivolous([a, b, c], base=base)
    assert with_base == ~(a | b | c | base)
    assert float(with_base.metadata["fraction"]) == pytest.approx(with_base.density())
    assert frivolous([], base=base) == ~base
    with pytest.raises(ConfigError):
        frivolous([])
    with pytest.raises(TypeError):
        frivolous(a)


# --------------------------------------------------------------------------- magnitude


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.9])
def test_magnitude_matches_torch_prune_and_the_mask_method(fraction):
    model = mlp(1)
    ours = magnitude_mask(model, fraction)
    assert list(ours.masks) == ["0.weight", "2.weight"]
    reference = torch_prune_reference(model, fraction, list(ours.masks))
    assert ours == reference and ours.kept() == round(fraction * ours.total())
    for scope in ("global", "layer"):
        attached = attach_masks(copy.deepcopy(model),
                                MaskConfig(method="magnitude", keep=fraction, scope=scope))
        assert magnitude_mask(model, fraction, scope=scope) == attached.subnetwork()
    layer = magnitude_mask(model, fraction, scope="layer")
    assert all(int(m.sum()) == round(fraction * m.numel()) for m in layer.masks.values())
    assert layer != ours or fraction == 0.9  # a global threshold differs from per-layer ones


def test_magnitude_and_torch_prune_differ_only_at_ties():
    model = mlp(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 4).round() / 4)  # few distinct magnitudes: many ties
    ours = magnitude_mask(model, 0.3)
    reference = torch_prune_reference(model, 0.3)
    assert ours != reference  # ties exist, so the test sees them
    assert reference.kept() == round(0.3 * reference.total()) <= ours.kept()
    params = dict(model.named_parameters())
    threshold = min(params[n].abs()[m].min() for n, m in reference.masks.items())
    for name, mask in (ours - reference).masks.items():
        assert torch.all(params[name].detach().abs()[mask] == threshold)
    assert (reference - ours).kept() == 0


def test_magnitude_rejects_bad_fractions():
    with pytest.raises(ConfigError):
        magnitude_mask(mlp(0), 0.0)
    with pytest.raises(ConfigError):
        torch_prune_reference(mlp(0), 1.5)


# --------------------------------------------------------------------------- curves


def one_feature_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor, list[int]]:
    """Each example has one active feature (±e_k, label its sign), feature k in counts[k]
    examples. A linear model learns w_k > 0 growing with counts[k]; with w_k pruned exactly the
    examples of feature k fail, so accuracy under nested magnitude masks cannot rise."""
    counts = [6, 5, 4, 3, 2, 1]
    rows, labels = [], []
    for k, c in enumerate(counts):
        for sign in (1.0, -1.0):
            rows += [sign * torch.eye(len(counts))[k]] * c
            labels += [sign] * c
    x, y = torch.stack(rows), torch.tensor(labels)
    model = nn.Linear(len(counts), 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.softplus(-y * model(x).squeeze(1)).mean().backward()
        opt.step()
    return model, x, y, counts


def test_compression_curve_is_monotone_on_a_trained_model():
    model, x, y, counts = one_feature_problem()
    w = model.weight.detach()[0]
    assert torch.all(w > 0) and torch.all(w[:-1] > w[1:])  # trained as the docstring says

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (y * m(x).squeeze(1) > 0).float().mean().item()

    fractions = [k / 6 for k in range(1, 7)]
    rows = compression_curve(model, lambda f: magnitude_mask(model, f), accuracy, fractions)
    assert [r["kept_fraction"] for r in rows] == sorted(fractions, reverse=True)
    accs = [r["accuracy"] for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(accs))
    expected = [sum(counts[: r["kept"]]) / sum(counts) for r in rows]
    assert accs == pytest.approx(expected) and accs[0] == 1.0 and accs[-1] < 0.5
    as_dict = compression_curve(model, {f: magnitude_mask(model, f) for f in fractions}, accuracy)
    assert as_dict == rows
    with pytest.raises(ConfigError):
        compression_curve(model, {1.0: magnitude_mask(model, 1.0)}, accuracy, [1.0])


# --------------------------------------------------------------------------- sparse files


class TiedNet(nn.Module):
    """Embedding tied to the head, a hidden layer and batch norm (int64 buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 64)
        self.out = nn.Linear(64, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.out(self.mid(self.emb(tokens)).relu())))


def bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return flat if flat.dtype == torch.bool else flat.view(torch.uint8)


def test_sparse_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = TiedNet()
    model(torch.randint(0, 10, (16,)))  # batch-norm statistics and counter move
    model.eval()
    with apply_subnetwork(model, magnitude_mask(model, 0.1), "keep"):
        sparse = copy.deepcopy(model)
    with torch.no_grad():
        sparse.mid.weight[0, 0] = -0.0
        sparse.mid.weight[1, 1] = float("nan")
    stored = sparse_state_dict(sparse)
    assert "mid.weight" + INDICES in stored and "emb.weight" in stored  # both layouts used
    assert "mid.weight" + NEGZERO in stored  # masking negative weights leaves -0.0
    assert "head.weight" not in stored  # tied: stored once
    save_sparse(tmp_path / "w.safetensors", sparse)
    torch.manual_seed(1)
    fresh = load_sparse(tmp_path / "w.safetensors", TiedNet())
    assert fresh.head.weight is fresh.emb.weight
    expected = sparse.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(bits(tensor), bits(expected[name])), name
    assert torch.signbit(fresh.mid.weight[0, 0]) and torch.isnan(fresh.mid.weight[1, 1])


def test_sparse_file_is_smaller_at_ten_percent(tmp_path):
    model = mlp(3, (64, 64, 64))
    with apply_subnetwork(model, magnitude_mask(model, 0.1), "keep"):
        sparse = copy.deepcopy(model)
    sizes = file_sizes(model, sparse)
    save_sparse(tmp_path / "s.safetensors", sparse)
    save_tensors(tmp_path / "d.safetensors", model.state_dict())
    assert sizes["sparse_bytes"] == (tmp_path / "s.safetensors").stat().st_size
    assert sizes["dense_bytes"] == (tmp_path / "d.safetensors").stat().st_size
    assert sizes["sparse_bytes"] < 0.4 * sizes["dense_bytes"]
    dense_only = file_sizes(model)  # nothing to leave out: the dense layout is kept
    assert dense_only["sparse_bytes"] <= dense_only["dense_bytes"] + 200


def test_load_sparse_refuses_other_files_and_models(tmp_path):
    model = mlp(0)
    save_sparse(tmp_path / "w.safetensors", model)
    with pytest.raises(SubnetworkMismatchError, match="another architecture"):
        load_sparse(tmp_path / "w.safetensors", mlp(0, (8, 16, 5)))
    magnitude_mask(model, 0.5).save(tmp_path / "sub.safetensors")
    with pytest.raises(FileFormatError, match="not an instill sparse"):
        load_sparse(tmp_path / "sub.safetensors", model)
    with apply_subnetwork(model, magnitude_mask(model, 0.1), "keep"):
        stored = sparse_state_dict(model)
    stored["0.weight" + INDICES][-1] = 10_000
    save_tensors(tmp_path / "bad.safetensors", stored, _META)
    with pytest.raises(FileFormatError, match="damaged indices"):
        load_sparse(tmp_path / "bad.safetensors", model)
