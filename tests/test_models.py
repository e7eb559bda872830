import pytest
import torch

from kdflow.config import load_schema
from kdflow.efficiency import count_macs
from kdflow.models import MODELS, build_model, count_parameters
from kdflow import KdflowError


@pytest.mark.parametrize("name,params", [("deepnn", 1_186_986), ("lightnn", 267_738)])
def test_parameter_counts_match_the_tutorial(name, params):
    assert count_parameters(build_model(name)) == params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_and_features(name):
    model = build_model(name).eval()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    assert torch.allclose(model.classify(model.features(x)), logits)


def test_schema_lists_exactly_the_models():
    enum = load_schema()["$defs"]["training"]["properties"]["model"]["enum"]
    assert sorted(enum) == sorted(MODELS)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(KdflowError, match="unknown model 'resnet'"):
        build_model("resnet")


@pytest.mark.parametrize("name,millions", [("deepnn", 94.2), ("lightnn", 1.3)])
def test_macs_counted_from_the_model_match_the_reference(name, millions):
    assert count_macs(build_model(name)) / 1e6 == pytest.approx(millions, abs=0.05)
