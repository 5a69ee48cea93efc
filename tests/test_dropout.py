"""Counter-based dropout: masks from (seed, step, site, element), the model restored after."""

from __future__ import annotations

import torch
from torch import nn

from instill.models import build_model
from instill.models.dropout import counter_dropout, set_step, sites, step_key, uniform


def gpt2(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return build_model("gpt2", vocab_size=20, n_positions=4, n_embd=16, n_layer=2, n_head=2,
                       dropout=dropout)


def test_masks_are_a_function_of_key_site_and_element():
    shape, cpu = torch.Size([400, 50]), torch.device("cpu")
    u = uniform(torch.tensor(step_key(7, 3)), 1, shape, cpu)
    assert u.shape == shape and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float((u < 0.1).float().mean()) - 0.1) < 0.01  # the dropout rate holds
    assert torch.equal(u, uniform(torch.tensor(step_key(7, 3)), 1, shape, cpu))
    for other in (uniform(torch.tensor(step_key(7, 4)), 1, shape, cpu),   # next step
                  uniform(torch.tensor(step_key(8, 3)), 1, shape, cpu),   # another seed
                  uniform(torch.tensor(step_key(7, 3)), 2, shape, cpu)):  # another site
        assert float(((u < 0.1) == (other < 0.1)).float().mean()) < 0.9


def test_swap_keeps_the_function_and_is_undone():
    """In eval mode the swapped model computes what it did (the registered attention applies
    GPT-2's causal mask); in training the masks follow the key; on exit the model is as it
    was, its state_dict included."""
    model, ids = gpt2(), torch.randint(0, 20, (6, 4))
    model.eval()
    before = model(input_ids=ids).logits
    keys = set(model.state_dict())
    with counter_dropout(model):
        assert len(sites(model)) == 7  # embeddings, and per block attention, residual, MLP
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
        assert set(model.state_dict()) == keys  # the keys are not saved
        model.train()
        set_step(model, seed=1, step=0)
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        set_step(model, seed=1, step=1)
        c = model(input_ids=ids).logits
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert type(model.transformer.drop) is nn.Dropout
    assert model.config._attn_implementation != "instill_counter_dropout"
