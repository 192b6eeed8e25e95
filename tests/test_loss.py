"""The indicator-masked loss: gradients reach exactly the heads whose task is in the batch."""

import math

import pytest
import torch

from mdmt.ml.loss import mdmt_loss
from mdmt.ml.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("resnet18", seed=0)


def _grads(model, y_prog, y_sev, norm):
    torch.manual_seed(1)
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(len(y_prog), 3, 32, 32)
    lp, ls = model(x)
    terms = mdmt_loss(lp, ls, torch.tensor(y_prog), torch.tensor(y_sev), norm=norm)
    terms.total.backward()
    g = {
        "prognosis": [p.grad for p in model.heads["prognosis"].parameters()],
        "severity": [p.grad for p in model.heads["severity"].parameters()],
        "backbone": [p.grad for p in model.backbone.parameters()],
    }
    return terms, g


def _all_zero(grads):
    return all(gr is not None and torch.count_nonzero(gr) == 0 for gr in grads)


def _some_nonzero(grads):
    return all(gr is not None for gr in grads) and any(torch.count_nonzero(gr) > 0 for gr in grads)


@pytest.mark.parametrize("norm", ["task", "batch"])
def test_prognosis_only_batch_leaves_severity_head_untouched(model, norm):
    terms, g = _grads(model, [0, 1, 1, 0], [-1, -1, -1, -1], norm)
    assert terms.severity.item() == 0.0 and not math.isnan(terms.total.item())
    assert _all_zero(g["severity"])
    assert _some_nonzero(g["prognosis"]) and _some_nonzero(g["backbone"])


@pytest.mark.parametrize("norm", ["task", "batch"])
def test_severity_only_batch_leaves_prognosis_head_untouched(model, norm):
    terms, g = _grads(model, [-1, -1, -1, -1], [0, 3, 2, 1], norm)
    assert terms.prognosis.item() == 0.0 and not math.isnan(terms.total.item())
    assert _all_zero(g["prognosis"])
    assert _some_nonzero(g["severity"]) and _some_nonzero(g["backbone"])


@pytest.mark.parametrize("norm", ["task", "batch"])
def test_mixed_batch_trains_both_heads(model, norm):
    terms, g = _grads(model, [0, -1, 1, -1], [-1, 2, 3, 0], norm)
    assert _some_nonzero(g["prognosis"]) and _some_nonzero(g["severity"]) and _some_nonzero(g["backbone"])


def test_normalisations_differ_by_task_share():
    torch.manual_seed(0)
    lp, ls = torch.randn(4, 2), torch.randn(4, 4)
    yp, ys = torch.tensor([1, -1, -1, -1]), torch.tensor([0, 1, 2, 3])
    task = mdmt_loss(lp, ls, yp, ys, norm="task")
    batch = mdmt_loss(lp, ls, yp, ys, norm="batch")
    # one prognosis sample of four: the whole-batch mean is a quarter of the per-task mean
    assert torch.isclose(batch.prognosis * 4, task.prognosis)
    assert torch.isclose(batch.severity, task.severity)  # every sample has a severity label
    ce = torch.nn.functional.cross_entropy(lp[:1], yp[:1])
    assert torch.isclose(task.prognosis, ce)


def test_empty_task_gives_zero_not_nan():
    lp, ls = torch.randn(3, 2, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    for norm in ("task", "batch"):
        t = mdmt_loss(lp, ls, torch.tensor([-1, -1, -1]), torch.tensor([-1, -1, -1]), norm=norm)
        assert t.total.item() == 0.0
        t.total.backward()
        assert torch.count_nonzero(lp.grad) == 0 and not torch.isnan(lp.grad).any()
