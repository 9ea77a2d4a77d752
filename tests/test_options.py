"""``InitOptions``: one set of checked options for ``initialize_model``, ``make_request``,
``resolve_initialization`` and the ``predict`` and ``pull`` commands."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from timm_ghn import InitOptions, InvalidOptionError, initialize_model, resolve_initialization
from timm_ghn.cache import make_request
from timm_ghn.cli import build_parser
from timm_ghn.cli_options import init_options
from timm_ghn.pipeline import DEFAULT_GHN

MODEL = "test_resnet"


def test_options_are_frozen():
    options = InitOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 1.0


def test_model_kwargs_copied():
    kwargs = {"drop_rate": 0.1}
    options = InitOptions(model_kwargs=kwargs)
    kwargs["drop_rate"] = 0.5
    assert options.model_kwargs == {"drop_rate": 0.1}


def test_timm_kwargs_merge_num_classes():
    options = InitOptions(num_classes=10, model_kwargs={"pretrained": True, "drop_rate": 0.1})
    assert options.timm_kwargs == {"drop_rate": 0.1, "num_classes": 10}


def test_device_stored_as_torch_device():
    assert InitOptions(device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"method": "orth"}, "method 'orth'"),
        ({"beta": -1.0}, "beta -1.0"),
        ({"beta": float("inf")}, "beta inf"),
        ({"start_layer": -2}, "start layer -2"),
        ({"seed": -1}, "seed -1"),
        ({"seed": 1.5}, "seed 1.5"),
        ({"variant": "newest"}, "variant 'newest'"),
        ({"num_classes": 0}, "--num-classes 0"),
        ({"num_classes": 3, "model_kwargs": {"num_classes": 4}}, "num_classes 4"),
        ({"model_kwargs": [("drop_rate", 0.1)]}, "model kwargs"),
        ({"device": "gpu0"}, "device 'gpu0'"),
    ],
    ids=["method", "beta_negative", "beta_infinite", "start_layer", "seed_negative", "seed_float", "variant",
         "num_classes", "num_classes_conflict", "kwargs_not_mapping", "device"],
)
def test_invalid_value_rejected(fields, named):
    with pytest.raises(InvalidOptionError) as caught:
        InitOptions(**fields)
    assert named in str(caught.value)


def test_replace_checks_values():
    with pytest.raises(InvalidOptionError, match="beta"):
        dataclasses.replace(InitOptions(), beta=-1.0)


def test_unknown_keyword_rejected():
    with pytest.raises(TypeError, match="bogus"):
        initialize_model(MODEL, bogus=1)


def test_initialize_model_object_equals_keywords():
    keywords = {"ghn": DEFAULT_GHN, "method": "ghn_orth", "seed": 3, "num_classes": 5}
    _, from_keywords = initialize_model(MODEL, **keywords)
    model_a, _ = initialize_model(MODEL, **keywords)
    model_b, from_object = initialize_model(MODEL, InitOptions(**keywords))

    assert from_object.metadata() == from_keywords.metadata()
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


def test_keywords_override_options():
    base = InitOptions(ghn=DEFAULT_GHN, seed=1)
    _, report = initialize_model(MODEL, base, method="ghn", seed=2)
    assert report.method == "ghn"
    assert report.seed == 2


def test_make_request_object_equals_keywords():
    by_keywords, _ = make_request(MODEL, ghn=DEFAULT_GHN, beta=1e-4, num_classes=5)
    by_object, _ = make_request(MODEL, InitOptions(ghn=DEFAULT_GHN, beta=1e-4, model_kwargs={"num_classes": 5}))
    assert by_keywords.key == by_object.key


def test_make_request_ignores_device():
    on_cpu, _ = make_request(MODEL, ghn=DEFAULT_GHN, device="cpu")
    default, _ = make_request(MODEL, ghn=DEFAULT_GHN)
    assert on_cpu.key == default.key


def test_resolve_accepts_options(tmp_path):
    options = InitOptions(ghn=DEFAULT_GHN, method="ghn")
    first = resolve_initialization(MODEL, options, cache_dir=tmp_path, hub_repo=[])
    second = resolve_initialization(MODEL, ghn=DEFAULT_GHN, method="ghn", cache_dir=tmp_path, hub_repo=[])
    assert first.source == "predicted"
    assert second.source == "cache"
    assert second.path == first.path


def test_cli_defaults_equal_dataclass_defaults():
    args = build_parser().parse_args(["predict", MODEL])
    assert init_options(args) == InitOptions()


def test_pull_takes_predict_options_but_device():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    predict = {action.dest for action in subcommands["predict"]._actions}
    pull = {action.dest for action in subcommands["pull"]._actions}
    option_fields = {field.name for field in dataclasses.fields(InitOptions)}
    assert option_fields - {"device"} <= pull
    assert "device" not in pull
    assert option_fields <= predict
