"""`instill continual --task digits-split / digits-permuted`: real digits with held-out test
images, one fixed permutation per task, the field's metrics (ACC, BWT, FWT) on a matrix
computed by hand, SupSup's one-shot task inference on a case whose answer is known, an image
folder in place of scikit-learn's digits, and a tiny run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from instill.cli import main
from instill.core import Subnetwork
from instill.core.supermasks import infer_task, superpose
from instill.errors import ConfigError
from instill.experiments.continual import ContinualRun, load_config, run_continual
from instill.experiments.continual_report import transfer
from instill.experiments.continual_supsup import split_heads
from instill.tasks.digit_sequences import DigitSequence, DigitSequenceConfig

torch.set_num_threads(1)
TINY = {"replicates": 1, "gates": {"enforce": False}, "replay": 8,
        "digits": {"groups": [[0, 1], [2, 3]], "permutations": 2, "hidden": [16]},
        "methods": ["subnetwork", "packnet", "finetune", "joint", "independent", "supsup"],
        "fit": {"epochs": 2, "patience": None}, "retrain": {"epochs": 1},
        "supsup": {"fit": {"epochs": 2}, "infer_batch": 8},
        "discovery": {"epochs": 2, "batch_size": 64, "mask": {"init": 0.05, "l0_lambda": 1e-4}}}


@pytest.fixture(scope="module")
def split() -> DigitSequence:
    return DigitSequence(DigitSequenceConfig(hidden=[16]), "split")


@pytest.fixture(scope="module")
def permuted() -> DigitSequence:
    return DigitSequence(DigitSequenceConfig(hidden=[16]), "permuted")


def test_split_digits_are_five_pairs_of_classes_with_held_out_test_images(split):
    assert split.names == ["0+1", "2+3", "4+5", "6+7", "8+9"]
    index = split.index
    assert not set(index["test"].tolist()) & set(index["train"].tolist())
    assert not set(index["select"].tolist()) & set(index["train"].tolist())
    assert sum(len(v) for v in index.values()) == 1797  # every image in exactly one split
    assert 0.2 < len(index["test"]) / 1797 < 0.3
    for t in range(5):
        for data in (split.train(t), split.select(t), split.test(t)):
            images, labels, tasks = data
            assert images.shape[1] == 64 and images.min() >= 0 and images.max() <= 1
            assert set(labels.tolist()) == {0, 1} and (tasks == t).all()
    model = split.build()
    assert model(split.test(0)[0]).shape == (len(split.test(0)[0]), 10)  # 5 heads of 2


def test_each_permuted_task_has_its_own_fixed_permutation_of_all_ten_classes(permuted):
    again = DigitSequence(DigitSequenceConfig(hidden=[16]), "permuted")
    assert torch.equal(permuted.perms, again.perms)  # fixed: the same every construction
    assert len({tuple(p.tolist()) for p in permuted.perms}) == 5  # and different per task
    plain, *_ = permuted.test(0)
    for t in range(1, 5):
        images, labels, _ = permuted.test(t)
        assert torch.equal(labels, permuted.test(0)[1])  # the same images, all ten classes
        inverse = torch.empty_like(permuted.perms[t])
        inverse[permuted.perms[t]] = torch.arange(64)
        restored = images[:, inverse]
        first = torch.empty_like(permuted.perms[0])
        first[permuted.perms[0]] = torch.arange(64)
        assert torch.equal(restored, plain[:, first])
    assert set(permuted.test(0)[1].tolist()) == set(range(10))


def test_the_field_metrics_match_a_matrix_computed_by_hand():
    m = [[0.9, 0.2, 0.1],
         [0.7, 0.8, 0.3],
         [0.6, 0.5, 1.0]]
    b = [0.1, 0.25, 0.2]
    got = transfer(m, b)
    assert got["acc"] == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert got["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert got["fwt"] == pytest.approx(((0.2 - 0.25) + (0.3 - 0.2)) / 2)
    assert transfer(m, None)["fwt"] is None


def test_one_shot_inference_picks_the_mask_that_makes_the_output_confident():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, -4.0], [-4.0, 4.0]]))
    fingerprint = {"weight": (2, 2)}
    # mask 0 keeps the weights reading input 0, mask 1 those reading input 1
    masks = [Subnetwork({"weight": torch.tensor([[True, False], [True, False]])}, fingerprint),
             Subnetwork({"weight": torch.tensor([[False, True], [False, True]])}, fingerprint)]

    def entropy_on(x):
        def entropy(m, alpha):
            p = m(x).softmax(-1)
            return -(p * p.log()).sum(-1).mean()
        return entropy

    first, second = torch.tensor([[1.0, 0.0]] * 4), torch.tensor([[0.0, 1.0]] * 4)
    assert infer_task(model, masks, entropy_on(first)) == 0  # only mask 0 sees input 0
    assert infer_task(model, masks, entropy_on(second)) == 1
    assert infer_task(model, masks[::-1], entropy_on(first)) == 1  # the order does not matter
    with superpose(model, masks, torch.tensor([0.25, 0.75])) as mixed:
        assert torch.allclose(mixed.weight, model.parametrizations.weight.original
                              * torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    assert not hasattr(model, "parametrizations")  # plain again on exit


def test_an_image_folder_stands_in_for_the_digits(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / f"c{c}").mkdir()
        for k in range(8):
            pixels = (rng.random((10, 10, 3)) * 60 + 40 * c).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"c{c}" / f"{k}.png")
    cfg = DigitSequenceConfig(image_dir=str(tmp_path), image_size=6, groups=[[0, 1], [2, 3]],
                              hidden=[8])
    seq = DigitSequence(cfg, "split")
    assert seq.names == ["c0+c1", "c2+c3"] and seq.features == 3 * 6 * 6
    assert len(seq.test(0)[0]) == 4 and len(seq.train(1)[0]) == 10  # 2 and 5 per class
    with pytest.raises(ConfigError, match="names classes"):
        DigitSequence(DigitSequenceConfig(image_dir=str(tmp_path), groups=[[0, 1], [4, 5]]),
                      "split")


def test_bad_digit_settings_are_config_errors():
    with pytest.raises(ConfigError, match="same size"):
        DigitSequenceConfig(groups=[[0, 1], [2, 3, 4]])
    with pytest.raises(ConfigError, match="test_fraction"):
        DigitSequenceConfig(test_fraction=0.9)
    with pytest.raises(ConfigError, match=r"supsup\.keep"):
        load_config("quick", None, {"task": "digits-split", "supsup": {"keep": 1.0}})


@pytest.mark.parametrize("args, message", [
    (["--set", "digits.image_dir=/no/such/folder"], "image folder '/no/such/folder' does not"),
    (["--set", "digits.groups=[[0,1],[2,3,4]]"], "same size"),
    (["--methods", "supsup,supsup@0.5"], "only after packnet")])
def test_bad_digit_options_print_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["continual", "--task", "digits-split", "--out", str(out),
                                       "--workers", "1", *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual-digits")
    cfg = load_config("quick", None, {**TINY, "task": "digits-split"})
    summary = run_continual(cfg, out, log=lambda _: None)
    return out, summary, ContinualRun(cfg, out, log=lambda _: None)


def test_a_tiny_digits_run_reports_acc_bwt_fwt_and_supsups_inference(tiny_run):
    out, summary, run = tiny_run
    methods = summary["methods"]
    assert summary["sequence"] == ["0+1", "2+3"] and (out / "accuracy_matrix.png").exists()
    for meth in ("subnetwork", "packnet", "supsup"):  # isolation and fixed masks: BWT is 0
        assert methods[meth]["bwt"]["mean"] == 0.0 and methods[meth]["bit_exact_replicates"] == 1
    assert methods["finetune"]["fwt"] is not None and "bwt" not in methods["joint"]
    record = json.loads((out / "pipelines/r0-finetune/a0/task0.json").read_text())
    initial = run.initial(0, 0)
    assert record["initial"] == [run.accuracy(initial, i) for i in range(2)]
    sup = json.loads((out / "pipelines/r0-supsup/a0/task1.json").read_text())
    assert len(sup["inferred"]) == len(sup["task_inferred"]) == 2
    assert 0 <= methods["supsup"]["task_inference"]["mean"] <= 1
    assert "with the task inferred" in summary["headline"]
    report = (out / "report.md").read_text()
    assert "| BWT |" in report and "SupSup with the task inferred" in report


def test_supsup_never_moves_a_weight_and_its_masks_keep_the_chosen_fraction(tiny_run):
    _, _, run = tiny_run
    fixed = run.initial(0, 0).state_dict()
    where = "pipelines/r0-supsup/a0"
    for t in range(2):
        model = run.load(where, f"task{t}")
        assert all(torch.equal(v, fixed[k]) for k, v in model.state_dict().items())
        mask = run.mask(where, t)
        assert mask.density() == pytest.approx(0.5, abs=0.01)
        assert any(n.startswith("heads.") for n in mask.masks)  # the heads are masked too
    assert not torch.equal(run.mask(where, 0).masks["backbone.0.weight"],
                           run.mask(where, 1).masks["backbone.0.weight"])
    body, heads = split_heads([run.mask(where, 0), run.mask(where, 1)], run.seq)
    assert body[0].masks and not any(n.startswith("heads.") for n in body[0].masks)
    for t in range(2):  # in the superposition each head keeps its own task's mask
        assert torch.equal(heads.masks[f"heads.{t}.weight"],
                           run.mask(where, t).masks[f"heads.{t}.weight"])
