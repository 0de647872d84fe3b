import pytest
import torch
from torch import nn

from sdlab.models.empty import empty_modules


def test_modules_are_built_on_meta_without_initialisers_and_init_is_restored():
    before = nn.init.normal_
    with empty_modules():
        layer = nn.Embedding(1000, 16)
        assert nn.init.normal_ is not before
    assert layer.weight.is_meta and nn.init.normal_ is before
    t = torch.empty(3)
    nn.init.ones_(t)
    assert torch.equal(t, torch.ones(3))


def test_initialisers_come_back_after_an_error():
    before = nn.init.kaiming_uniform_
    with pytest.raises(RuntimeError), empty_modules():
        raise RuntimeError("while building")
    assert nn.init.kaiming_uniform_ is before
