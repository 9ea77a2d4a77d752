"""Tests of GHN-orth post-processing (timm_ghn.postprocess), on CPU."""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import pytest
import timm
import torch
from torch import nn

from timm_ghn.postprocess import (
    add_correlated_noise_,
    correlation_std,
    default_start_layer,
    ghn_orth_,
    orthogonalize_,
    weight_modules,
)
from timm_ghn.postprocess import _repeat_period
from timm_ghn.predict import fit_block

RESNET18_LAYERS = 21


def _random_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _numpy_view(weight: torch.Tensor, variant: str) -> np.ndarray:
    matrix = weight.reshape(weight.shape[0], -1).double().numpy()
    if variant == "released" and matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    return matrix


def _numpy_correlation_std(weight: torch.Tensor, variant: str) -> float:
    return float(np.std(np.corrcoef(_numpy_view(weight, variant)), ddof=1))


def _tall_matrix(weight: torch.Tensor) -> torch.Tensor:
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.t()
    return matrix


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10)


# correlation_std


@pytest.mark.parametrize("variant", ["released", "paper"])
@pytest.mark.parametrize(
    "shape",
    [
        (40, 6),  # tall linear
        (6, 40),  # wide linear
        (12, 12),  # square
        (8, 4, 3, 3),  # wide conv
        (32, 4, 1, 1),  # tall 1x1 conv
        (16, 1, 3, 3),  # depthwise conv
    ],
)
def test_correlation_std_matches_numpy(shape: tuple[int, ...], variant: str) -> None:
    weight = _random_weight(shape)
    expected = _numpy_correlation_std(weight, variant)

    actual = correlation_std(weight, variant)

    assert isinstance(actual, float)
    assert actual == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("variant", ["released", "paper"])
@pytest.mark.parametrize("repeats", [(8, 1), (3, 4), (1, 5)])
def test_correlation_std_tiled_weight(repeats: tuple[int, int], variant: str) -> None:
    # GHN predictions are tiled from small decoded blocks, so rows or columns repeat.
    block = _random_weight((4, 6), seed=1)
    weight = block.repeat(*repeats)
    expected = _numpy_correlation_std(weight, variant)

    actual = correlation_std(weight, variant)

    assert actual == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("variant", ["released", "paper"])
@pytest.mark.parametrize(
    ("block_shape", "target"),
    [
        ((5, 7), (23, 30)),  # the last tile is cut in both dims
        ((6, 4, 3, 3), (20, 9, 3, 3)),  # wide conv, columns repeat every 4 * 9 entries
        ((7, 3), (48, 3)),  # rows repeat, columns do not
    ],
)
def test_correlation_std_cut_tiles_match_numpy(
    block_shape: tuple[int, ...], target: tuple[int, ...], variant: str
) -> None:
    # fit_block cuts the last tile when the block does not divide the target, as GHN prediction does.
    weight = fit_block(_random_weight(block_shape, seed=2), target)
    expected = _numpy_correlation_std(weight, variant)

    actual = correlation_std(weight, variant)

    assert actual == pytest.approx(expected, rel=1e-9)


def test_correlation_std_almost_tiled_weight() -> None:
    # One changed entry breaks the period, so the whole matrix must be read.
    weight = fit_block(_random_weight((4, 6), seed=3), (18, 40))
    weight[17, 39] += 0.5

    for variant in ("released", "paper"):
        assert correlation_std(weight, variant) == pytest.approx(_numpy_correlation_std(weight, variant), rel=1e-5)


def test_repeat_period() -> None:
    block = _random_weight((5, 7), seed=4)
    tiled = fit_block(block, (23, 30))
    assert _repeat_period(tiled, 0) == 5
    assert _repeat_period(tiled, 1) == 7
    assert _repeat_period(block, 0) == 5
    assert _repeat_period(block, 1) == 7

    # Row 3 equals row 0, but row 4 differs from row 1: no period, the full size is returned.
    rows = _random_weight((6, 4), seed=5)
    rows[3] = rows[0]
    assert _repeat_period(rows, 0) == 6
    rows[4:] = rows[1:3]
    assert _repeat_period(rows, 0) == 3


def test_correlation_std_float64_weight() -> None:
    weight = _random_weight((24, 5)).double()

    assert correlation_std(weight) == pytest.approx(_numpy_correlation_std(weight, "released"), rel=1e-5)


def test_correlation_std_identical_rows_is_zero() -> None:
    weight = _random_weight((1, 7)).repeat(10, 1)

    assert correlation_std(weight, "paper") == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(
    ("shape", "variant"),
    [
        ((1, 8, 3, 3), "released"),  # tall view [72, 1]: one column
        ((1, 8, 3, 3), "paper"),  # [1, 72]: one row
        ((5, 1), "released"),  # one column
    ],
)
def test_correlation_std_degenerate_shape_is_nan(shape: tuple[int, ...], variant: str) -> None:
    weight = _random_weight(shape)

    assert math.isnan(correlation_std(weight, variant))


def test_correlation_std_constant_row_is_nan() -> None:
    # 0.1 is not exactly representable, so centring leaves float32 residue in the constant row.
    weight = _random_weight((6, 10))
    weight[:, 2] = 0.1  # row 2 of the transposed (tall) view

    assert math.isnan(correlation_std(weight, "released"))
    assert not math.isnan(correlation_std(weight, "paper"))

    weight[2, :] = 0.1  # output channel 2
    assert math.isnan(correlation_std(weight, "paper"))


def test_correlation_std_avoids_rows_by_rows_matrix() -> None:
    weight = _random_weight((20000, 16))
    # Entries of a correlation between independent rows of n = 16 observations have variance
    # 1/(n - 1), so the std over R is close to sqrt(1/15) = 0.258.
    activities = [torch.profiler.ProfilerActivity.CPU]

    started = time.perf_counter()
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        sigma = correlation_std(weight)
    seconds = time.perf_counter() - started

    largest_allocation = max((event.cpu_memory_usage for event in profile.events()), default=0)
    assert largest_allocation < 64 * 2**20  # a 20000 x 20000 float32 matrix is 1.6 GB
    assert seconds < 5.0
    assert 0.2 < sigma < 0.3


def test_correlation_std_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 dims"):
        correlation_std(torch.ones(5))
    with pytest.raises(TypeError, match="floating-point"):
        correlation_std(torch.ones(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="'transposed'"):
        correlation_std(_random_weight((5, 5)), variant="transposed")


# orthogonalize_


@pytest.mark.parametrize("shape", [(32, 8), (16, 16), (64, 4, 1, 1), (24, 1, 3, 3)])
def test_orthogonalize_tall_weight(shape: tuple[int, ...]) -> None:
    weight = _random_weight(shape)
    original = _tall_matrix(weight).clone()

    result = orthogonalize_(weight)

    assert result is weight
    q = _tall_matrix(weight)
    columns = q.shape[1]
    torch.testing.assert_close(q.t() @ q, torch.eye(columns), rtol=0, atol=1e-5)
    assert bool((torch.diagonal(q.t() @ original) > 0).all())
    assert float(weight.double().square().sum()) == pytest.approx(columns, rel=1e-5)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (6, 40)])
def test_orthogonalize_wide_weight_rows(shape: tuple[int, ...]) -> None:
    weight = _random_weight(shape)
    original = weight.reshape(shape[0], -1).clone()

    orthogonalize_(weight)

    filters = weight.reshape(shape[0], -1)
    torch.testing.assert_close(filters @ filters.t(), torch.eye(shape[0]), rtol=0, atol=1e-5)
    assert bool((torch.diagonal(filters @ original.t()) > 0).all())
    assert float(weight.double().square().sum()) == pytest.approx(shape[0], rel=1e-5)


def test_orthogonalize_keeps_zero_diagonal_column() -> None:
    # The second column is zero, so R[1, 1] = 0. sign(0) = 0 would zero that column of Q.
    weight = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])

    orthogonalize_(weight)

    torch.testing.assert_close(weight.t() @ weight, torch.eye(2), rtol=0, atol=1e-6)


def test_orthogonalize_keeps_dtype_and_storage() -> None:
    weight = _random_weight((12, 5)).double()
    pointer = weight.data_ptr()

    orthogonalize_(weight)

    assert weight.dtype == torch.float64
    assert weight.data_ptr() == pointer
    torch.testing.assert_close(weight.t() @ weight, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-5)


def test_orthogonalize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 dims"):
        orthogonalize_(torch.ones(4))

    weight = _random_weight((4, 3))
    weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(4, 3\).*NaN"):
        orthogonalize_(weight)


# add_correlated_noise_


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_noise_scale_matches_seeded_draw(variant: str) -> None:
    weight = _random_weight((16, 8, 3, 3))
    original = weight.clone()
    beta = 0.5
    sigma = correlation_std(original, variant)

    add_correlated_noise_(weight, beta, generator=torch.Generator().manual_seed(0), variant=variant)

    expected = beta * sigma * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weight - original, expected, rtol=1e-5, atol=1e-6)


def test_noise_global_generator_matches_randn_like() -> None:
    weight = _random_weight((10, 20))
    beta = 3e-5
    sigma = correlation_std(weight)
    torch.manual_seed(0)
    expected = weight + beta * sigma * torch.randn_like(weight)

    torch.manual_seed(0)
    add_correlated_noise_(weight, beta)

    torch.testing.assert_close(weight, expected, rtol=0, atol=0)


def test_noise_undefined_correlation_keeps_weight(caplog: pytest.LogCaptureFixture) -> None:
    weight = _random_weight((1, 8, 3, 3))
    original = weight.clone()
    generator = torch.Generator().manual_seed(0)

    with caplog.at_level(logging.WARNING, logger="timm_ghn.postprocess"):
        add_correlated_noise_(weight, 1.0, generator=generator)

    assert torch.equal(weight, original)
    assert "(1, 8, 3, 3)" in caplog.text
    # The skipped layer still consumes its draw, so the next draw is the second of the stream.
    reference = torch.Generator().manual_seed(0)
    torch.randn(weight.shape, generator=reference)
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=reference))


@pytest.mark.parametrize("beta", [-1.0, float("nan"), float("inf")])
def test_noise_rejects_invalid_beta(beta: float) -> None:
    with pytest.raises(ValueError, match=str(beta)):
        add_correlated_noise_(_random_weight((4, 4)), beta)


# weight_modules and default_start_layer


def test_weight_modules_order_and_filter() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.MultiheadAttention(4, 2),
        nn.Sequential(nn.Embedding(10, 4), shared),
        shared,
        nn.LayerNorm(4),
        nn.Linear(4, 2, bias=False),
    )

    names = [name for name, _ in weight_modules(model)]

    # nn.MultiheadAttention keeps in_proj_weight without a module, but out_proj is a Linear.
    assert names == ["0", "2.out_proj", "3.0", "3.1", "6"]


def test_default_start_layer_resnet50() -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    modules = weight_modules(model)

    assert len(modules) == 54
    assert default_start_layer(54, "resnet50") == 37
    assert default_start_layer(54, "resnet50", variant="paper") == 37
    assert default_start_layer(54, "resnet50.a1_in1k") == 37
    assert default_start_layer(54) == 37
    assert modules[36][0] == "layer3.3.conv3"
    assert modules[-1][0] == "fc"


def test_default_start_layer_convnext_base() -> None:
    with torch.device("meta"):
        model = timm.create_model("convnext_base")
    modules = weight_modules(model)

    assert len(modules) == 113
    assert default_start_layer(113, "convnext_base") == 94
    assert default_start_layer(113, "convnext_base.fb_in22k_ft_in1k", variant="paper") == 100
    assert modules[93][0] == "stages.2.blocks.24.conv_dw"
    assert modules[99][0] == "stages.2.blocks.26.conv_dw"
    assert modules[-1][0] == "head.fc"


@pytest.mark.parametrize(("num_layers", "expected"), [(0, 1), (1, 1), (3, 3), (21, 15), (113, 76)])
def test_default_start_layer_two_thirds_rule(num_layers: int, expected: int) -> None:
    assert default_start_layer(num_layers, "vit_small_patch16_224") == expected
    assert default_start_layer(num_layers, variant="paper") == expected


def test_default_start_layer_preset_count_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="timm_ghn.postprocess"):
        start = default_start_layer(53, "resnet50")

    assert start == 37
    assert "53" in caplog.text


def test_default_start_layer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="-1"):
        default_start_layer(-1)
    with pytest.raises(ValueError, match="'orth'"):
        default_start_layer(54, "resnet50", variant="orth")


# ghn_orth_


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_ghn_orth_changes_only_selected_layers(resnet18: nn.Module) -> None:
    model = copy.deepcopy(resnet18)
    before = _state_copy(model)
    modules = weight_modules(model)
    expected_names = [name for name, _ in modules[14:-1]]

    report = ghn_orth_(model, beta=3e-5, start_layer=15)

    assert report.num_layers == RESNET18_LAYERS
    assert report.start_layer == 15
    assert report.transformed == expected_names
    assert report.skipped_classifier == "fc"
    assert report.beta == 3e-5
    assert report.variant == "released"
    assert report.seconds >= 0
    changed_keys = {f"{name}.weight" for name in expected_names}
    after = model.state_dict()
    for key, value in before.items():
        if key in changed_keys:
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    for name, module in modules[14:-1]:
        weight = module.weight.detach()
        rows, columns = weight.reshape(weight.shape[0], -1).shape
        assert float(weight.double().square().sum()) == pytest.approx(min(rows, columns), rel=1e-5)


def test_ghn_orth_default_start_layer(resnet18: nn.Module) -> None:
    model = copy.deepcopy(resnet18)

    report = ghn_orth_(model, model_name="resnet18.a1_in1k")

    assert report.start_layer == 15
    assert len(report.transformed) == RESNET18_LAYERS - 15


def test_ghn_orth_seed_is_reproducible(resnet18: nn.Module) -> None:
    first, second, other = (copy.deepcopy(resnet18) for _ in range(3))

    ghn_orth_(first, beta=1e-2, start_layer=17, seed=3)
    ghn_orth_(second, beta=1e-2, start_layer=17, seed=3)
    ghn_orth_(other, beta=1e-2, start_layer=17, seed=4)

    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key
    assert not torch.equal(first_state["layer4.1.conv2.weight"], other_state["layer4.1.conv2.weight"])


def test_ghn_orth_generator_replaces_seed(resnet18: nn.Module) -> None:
    from_seed, from_generator = copy.deepcopy(resnet18), copy.deepcopy(resnet18)

    ghn_orth_(from_seed, beta=1e-2, start_layer=19, seed=5)
    ghn_orth_(from_generator, beta=1e-2, start_layer=19, seed=0, generator=torch.Generator().manual_seed(5))

    for key, value in from_seed.state_dict().items():
        assert torch.equal(value, from_generator.state_dict()[key]), key


def test_ghn_orth_noise_only(resnet18: nn.Module) -> None:
    model = copy.deepcopy(resnet18)
    originals = {name: module.weight.detach().clone() for name, module in weight_modules(model)}
    beta = 1e-2

    report = ghn_orth_(model, beta=beta, start_layer=18, seed=7, orthogonalize=False)

    generator = torch.Generator().manual_seed(7)
    assert report.transformed == [name for name, _ in weight_modules(model)[17:-1]]
    for name, module in weight_modules(model):
        original = originals[name]
        if name not in report.transformed:
            assert torch.equal(module.weight, original), name
            continue
        noise = torch.randn(original.shape, generator=generator)
        expected = original + beta * correlation_std(original) * noise
        torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-6, atol=1e-7)


def test_ghn_orth_paper_variant_noise_scale() -> None:
    model = nn.Sequential(nn.Linear(24, 6), nn.Linear(6, 2))
    # A tiled weight, like a GHN prediction, where the two correlation axes give different spreads.
    original = _random_weight((2, 6), seed=2).repeat(3, 4)
    with torch.no_grad():
        model[0].weight.copy_(original)
    paper_sigma = correlation_std(original, "paper")
    assert paper_sigma != pytest.approx(correlation_std(original, "released"), rel=0.1)

    ghn_orth_(model, beta=1e-2, start_layer=1, variant="paper", orthogonalize=False)

    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(0))
    expected = original + 1e-2 * paper_sigma * noise
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-6, atol=1e-7)


def test_ghn_orth_zero_beta_only_orthogonalizes(resnet18: nn.Module) -> None:
    model = copy.deepcopy(resnet18)
    originals = {name: module.weight.detach().clone() for name, module in weight_modules(model)}

    report = ghn_orth_(model, beta=0.0, start_layer=19)

    assert report.transformed == ["layer4.1.conv1", "layer4.1.conv2"]
    for name, module in weight_modules(model):
        expected = originals[name].clone()
        if name in report.transformed:
            orthogonalize_(expected)
        assert torch.equal(module.weight, expected), name


def test_ghn_orth_start_layer_zero_equals_one() -> None:
    torch.manual_seed(0)
    pristine = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.Linear(8, 3))
    from_zero, from_one = copy.deepcopy(pristine), copy.deepcopy(pristine)

    report = ghn_orth_(from_zero, beta=1e-2, start_layer=0)
    ghn_orth_(from_one, beta=1e-2, start_layer=1)

    assert report.transformed == ["0", "2"]
    for key, value in from_zero.state_dict().items():
        assert torch.equal(value, from_one.state_dict()[key]), key


def test_ghn_orth_nothing_enabled_keeps_model(resnet18: nn.Module) -> None:
    model = copy.deepcopy(resnet18)

    report = ghn_orth_(model, beta=0.0, start_layer=1, orthogonalize=False)

    assert report.transformed == []
    for key, value in resnet18.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_ghn_orth_model_without_2d_weights() -> None:
    report = ghn_orth_(nn.Sequential(nn.LayerNorm(4)))

    assert report.num_layers == 0
    assert report.transformed == []
    assert report.skipped_classifier is None


def test_ghn_orth_nonfinite_weight_names_module() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")

    with pytest.raises(ValueError, match=r"'1' \(layer 2\).*\(8, 8\)"):
        ghn_orth_(model, beta=0.0, start_layer=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": -1.0}, "-1.0"),
        ({"beta": float("nan")}, "nan"),
        ({"start_layer": -2}, "-2"),
        ({"start_layer": 2.5}, "2.5"),
        ({"variant": "ppuda"}, "'ppuda'"),
    ],
)
def test_ghn_orth_rejects_invalid_options(options: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = _state_copy(model)

    with pytest.raises(ValueError, match=message):
        ghn_orth_(model, **options)

    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
