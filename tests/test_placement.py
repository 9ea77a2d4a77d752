"""Placement of the parameters the original GHN rules skip, checked on small models of each family."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from timm.layers import LayerScale
from torch import nn

from conftest import SHARED
from timm_ghn.errors import TimmGhnError
from timm_ghn.graph import build_graph
from timm_ghn.hypernet import load_ghn
from timm_ghn.pipeline import DEFAULT_GHN
from timm_ghn.placement import Placement, extended_placement, from_decoded, is_norm_like, to_decoded
from timm_ghn.predict import decoded_blocks, predict_parameters


class Owner(nn.Module):
    """A module that owns a parameter under a given name, as timm models own tokens and tables."""


@pytest.mark.parametrize(
    "module, local, shape, primitive, decoded_shape",
    [
        (LayerScale(96), "gamma", (96,), "cse", (96,)),
        (Owner(), "gamma", (64, 1, 1), "cse", (64,)),
        (Owner(), "temperature", (8, 1, 1), "cse", (8,)),
        (Owner(), "skipinit_gain", (), "cse", (1,)),
        (Owner(), "alpha", (4, 320), "cse", (1280,)),
        (Owner(), "q_bias", (768,), "bias", (768,)),
        (nn.GroupNorm(4, 32), "weight", (32,), "ln", (32,)),
        (Owner(), "cls_token", (1, 1, 384), "pos_enc", (1, 384, 1, 1)),
        (Owner(), "reg_token", (1, 4, 96), "pos_enc", (1, 96, 2, 2)),
        (Owner(), "pos_embed", (1, 197, 192), "pos_enc", (1, 192, 14, 14)),
        (Owner(), "pos_embed", (1, 256, 31, 31), "pos_enc", (1, 256, 31, 31)),
        (Owner(), "pos_embed", (1, 14, 14, 384), "pos_enc", (1, 384, 14, 14)),
        (Owner(), "pos_embed", (1, 64, 11, 15), "pos_enc", (1, 64, 11, 15)),
        (Owner(), "pos_embed", (1, 11, 15, 64), "pos_enc", (1, 64, 11, 15)),
        (Owner(), "relative_position_bias_table", (732, 12), "pos_enc", (1, 12, 27, 27)),
        (Owner(), "relative_position_bias_table", (12, 13, 13), "pos_enc", (1, 12, 13, 13)),
        (Owner(), "attention_biases", (8, 49), "pos_enc", (1, 8, 7, 7)),
        (Owner(), "rel_pos_h", (55, 96), "pos_enc", (1, 96, 1, 55)),
        (nn.Conv1d(320, 27, 1), "weight", (27, 320, 1), "conv", (27, 320, 1, 1)),
        (nn.Conv1d(8, 8, 3, groups=8), "weight", (8, 1, 3), "sep_conv", (8, 1, 3, 1)),
        (nn.Conv3d(1, 16, (9, 9, 1)), "weight", (16, 1, 9, 9, 1), "conv", (16, 9, 9, 1)),
        (nn.ConvTranspose2d(64, 128, 4), "weight", (64, 128, 4, 4), "conv", (128, 64, 4, 4)),
        (nn.ConvTranspose2d(64, 128, 4), "bias", (128,), "bias", (128,)),
        (Owner(), "w_g", (64, 1), "conv", (1, 64)),
        (nn.LSTM(8, 8), "weight_ih_l0", (32, 8), "conv", (32, 8)),
        (nn.LSTM(8, 8), "bias_hh_l0", (32,), "bias", (32,)),
    ],
)
def test_extended_placement_table(module, local, shape, primitive, decoded_shape):
    placement = extended_placement(module, local, shape)

    assert placement is not None
    assert placement.primitive == primitive
    assert placement.decoded_shape == decoded_shape


@pytest.mark.parametrize(
    "module, local, shape",
    [
        (Owner(), "lambda_q1", (32,)),
        (Owner(), "freqs", (2, 12, 12, 32)),
    ],
)
def test_excluded_kinds_stay_unplaced(module, local, shape):
    assert extended_placement(module, local, shape) is None


def test_norm_like_needs_vector_weight():
    class MatrixNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

    class ChannelsLastNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, 1, 1, 8))

    assert not is_norm_like(MatrixNorm())
    assert is_norm_like(ChannelsLastNorm())
    assert is_norm_like(nn.GroupNorm(2, 8))
    assert extended_placement(MatrixNorm(), "weight", (4, 4)).primitive == "conv"


def test_scale_and_shift_use_their_1d_rules():
    assert extended_placement(LayerScale(8), "gamma", (8,)).is_weight
    assert not extended_placement(Owner(), "v_bias", (8,)).is_weight
    assert not extended_placement(Owner(), "tau", (8,)).is_weight


@pytest.mark.parametrize(
    "module, local, shape",
    [
        (Owner(), "pos_embed", (1, 197, 16)),
        (Owner(), "pos_embed", (1, 16, 7, 7)),
        (Owner(), "pos_embed", (1, 7, 7, 16)),
        (Owner(), "pos_embed", (1, 16, 5, 7)),
        (Owner(), "pos_embed", (1, 5, 7, 16)),
        (Owner(), "attention_biases", (4, 49)),
        (Owner(), "relative_position_bias_table", (12, 4)),
        (Owner(), "alpha", (4, 10)),
        (nn.Conv1d(6, 4, 3), "weight", (4, 6, 3)),
        (nn.ConvTranspose2d(6, 4, 3), "weight", (6, 4, 3, 3)),
        (Owner(), "w_g", (6, 1)),
    ],
)
def test_layout_round_trip(module, local, shape):
    placement = extended_placement(module, local, shape)
    tensor = torch.randn(shape)

    decoded = to_decoded(tensor, placement)
    restored = from_decoded(decoded, placement, shape)

    assert tuple(decoded.shape) == placement.decoded_shape
    assert tuple(restored.shape) == shape
    if placement.prefix_rows:
        # Prefix rows (class-token positions) come back as zeros, the rest unchanged.
        assert torch.equal(restored[:, placement.prefix_rows :], tensor[:, placement.prefix_rows :])
        assert torch.equal(restored[:, : placement.prefix_rows], torch.zeros_like(tensor[:, : placement.prefix_rows]))
    elif placement.suffix_rows:
        # Suffix rows (class-token entries of a relative table) come back as zeros, the rest unchanged.
        grid_rows = shape[0] - placement.suffix_rows
        assert torch.equal(restored[:grid_rows], tensor[:grid_rows])
        assert torch.equal(restored[grid_rows:], torch.zeros_like(tensor[grid_rows:]))
    else:
        assert torch.equal(restored, tensor)


def test_non_square_position_map_keeps_grid():
    """PiT at a non-square image size has a ``[1, C, h, w]`` map with ``h != w``."""
    with torch.device("meta"):
        model = timm.create_model("pit_ti_224", img_size=(96, 128))

    graph = build_graph(model)

    (node,) = [node for node in graph.nodes if node.param_name == "pos_embed"]
    assert tuple(model.pos_embed.shape) == (1, 64, 11, 15)
    assert node.placement.decoded_shape == (1, 64, 11, 15)
    assert node.placement.channels_first


def test_embedding_rows_follow_grid():
    """Position ``(y, x)`` of the decoded map is token ``prefix + y·w + x`` of the table."""
    placement = Placement("pos_enc", (1, 3, 2, 2), "embedding", prefix_rows=1)
    decoded = torch.arange(12.0).reshape(1, 3, 2, 2)

    table = from_decoded(decoded, placement, (1, 5, 3))

    assert torch.equal(table[0, 0], torch.zeros(3))
    assert torch.equal(table[0, 1], decoded[0, :, 0, 0])
    assert torch.equal(table[0, 2], decoded[0, :, 0, 1])
    assert torch.equal(table[0, 4], decoded[0, :, 1, 1])


def test_relative_table_class_rows_trail():
    """BEiT's relative position table ends with its 3 class-token entries; row ``dy·w + dx`` is grid position ``(dy, dx)``."""
    placement = extended_placement(Owner(), "relative_position_bias_table", (732, 12))
    decoded = torch.randn(placement.decoded_shape)

    table = from_decoded(decoded, placement, (732, 12))

    assert (placement.prefix_rows, placement.suffix_rows) == (0, 3)
    assert torch.equal(table[0], decoded[0, :, 0, 0])
    assert torch.equal(table[28], decoded[0, :, 1, 1])
    assert torch.equal(table[728], decoded[0, :, 26, 26])
    assert torch.equal(table[729:], torch.zeros(3, 12))


def test_beit_relative_table_predicted_by_grid(bundled_ghn):
    """The predicted table keeps its class-token entries (the last 3 rows of timm's BEiT table) at zero."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", embed_dim=32, depth=1, num_heads=2, img_size=64)

    predict_parameters(model, bundled_ghn, predict_classifier=True)

    table = model.blocks[0].attn.relative_position_bias_table
    grid_rows = table.shape[0] - 3
    assert torch.equal(table[grid_rows:], torch.zeros_like(table[grid_rows:]))
    assert table[:3].abs().sum() > 0, "the first relative positions are predicted"


# --- small models of each family, predicted on the CPU ----------------------------------------

FAMILIES = {
    # name: (constructor kwargs, parameter kinds the mapping places that the original rules skip)
    "test_vit": ({}, {"cls_token", "pos_embed"}),
    "test_vit2": ({}, {"reg_token", "gamma"}),
    "test_vit3": ({}, {"latent", "pos_embed"}),
    "test_vit_relpos": ({}, set()),
    "test_convnext": ({}, {"gamma"}),
    "test_coatnet": ({}, {"relative_position_bias_table"}),
    "test_maxvit": ({}, {"relative_position_bias_table"}),
    "test_efficientnet_gn": ({}, {"weight", "bias"}),
    "test_efficientnet_evos": ({}, {"v", "weight", "bias"}),
    "test_nfnet": ({}, {"gain"}),
    "mixer_s16_224": ({"img_size": 64}, set()),
    "swin_tiny_patch4_window7_224": ({"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, {"relative_position_bias_table"}),
    "swinv2_tiny_window8_256": ({"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, {"logit_scale", "q_bias", "v_bias"}),
    "beit_base_patch16_224": ({"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}, {"cls_token", "gamma_1", "q_bias", "relative_position_bias_table"}),
    "coat_lite_tiny": ({}, {"cls_token1"}),
    "edgenext_xx_small": ({}, {"gamma_xca", "temperature"}),
    "deit_tiny_distilled_patch16_224": ({"depth": 2, "img_size": 64}, {"dist_token"}),
    "pit_ti_224": ({"img_size": 96}, {"pos_embed"}),
    "levit_128s": ({}, {"attention_biases"}),
    "efficientvim_m1": ({}, {"alpha", "weight"}),
    "swiftformer_xs": ({}, {"w_g", "gamma"}),
    "convnextv2_atto": ({}, {"weight", "bias"}),
    "efficientnet_cc_b0_4e": ({}, {"weight"}),
    "lambda_resnet26t": ({}, {"weight"}),
    "dla46_c": ({}, set()),  # the classifier is a 1x1 convolution
    "sequencer2d_s": ({"layers": (1, 1, 1, 1)}, {"weight_ih_l0", "weight_hh_l0_reverse", "bias_ih_l0"}),
}


@pytest.fixture(scope="module")
def bundled_ghn():
    return load_ghn(DEFAULT_GHN)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_fully_predicted(bundled_ghn, name):
    kwargs, new_kinds = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    initial = {key: value.clone() for key, value in model.named_parameters()}
    original = build_graph(model, extended=False)

    result = predict_parameters(model, bundled_ghn, predict_classifier=True)

    assert result.unpredicted == []
    assert result.fraction_predicted == 1.0
    skipped_before = {name.rsplit(".", 1)[-1] for name in original.unplaced}
    assert new_kinds <= skipped_before, "the kinds under test are ones the original rules skip"
    for key, value in model.named_parameters():
        assert torch.isfinite(value).all(), key
        if value.numel() > 1:
            assert not torch.equal(value, initial[key]), f"{key} kept its initialization"
    with torch.no_grad():
        output = model.eval()(torch.randn(2, *result.graph.input_size))
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("style", ["ghn2", "ghn3"])
def test_norm_bias_decoded_once(bundled_ghn, style):
    """EvoNorm's scale ``v`` is a weight of a norm module, but the bias belongs to ``weight``."""
    model = timm.create_model("test_efficientnet_evos")
    graph = build_graph(model, style=style)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    with torch.no_grad():
        embeddings = bundled_ghn.model.embed_nodes(graph).final
        names = [name for name, _, _ in decoded_blocks(bundled_ghn.model, graph, embeddings, shapes)]

    carriers = [node.param_name for node in graph.nodes if node.bias_name == "bn1.bias"]
    assert carriers == ["bn1.weight"]
    assert sorted(names) == sorted(set(names)), "a parameter is decoded more than once"


def test_every_parameter_is_predicted_or_listed(bundled_ghn, caplog):
    """A kind left at timm's init (differential-attention lambdas) is listed and logged by name."""
    torch.manual_seed(0)
    model = timm.create_model("vit_dlittle_patch16_reg1_gap_256", depth=1, img_size=64)

    with caplog.at_level(logging.WARNING, logger="timm_ghn"):
        result = predict_parameters(model, bundled_ghn, predict_classifier=True)

    lambdas = sorted(name for name, _ in model.named_parameters() if ".lambda_" in name)
    assert lambdas
    assert sorted(result.unpredicted) == lambdas
    assert sorted(result.predicted + result.unpredicted) == sorted(name for name, _ in model.named_parameters())
    assert lambdas[0] in caplog.text


def test_shared_module_gets_node_per_use():
    """CoaT applies one ``cpe`` module in several blocks: one node per use, no cycle."""
    with torch.device("meta"):
        model = timm.create_model("coat_lite_tiny")

    graph = build_graph(model)

    uses = [node for node in graph.nodes if node.param_name == "cpe1.proj.weight"]
    assert len(uses) == 2
    assert graph.placed.count("cpe1.proj.weight") == 1


class TwiceConcatenatedToken(nn.Module):
    """A class token concatenated before and after the patch tokens, in one ``torch.cat``."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls_token = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls_token, tokens, self.cls_token.expand(tokens.shape[0], -1, -1)], dim=1)
        return self.head(tokens.mean(1))


@pytest.mark.parametrize("style", ["ghn2", "ghn3"])
def test_token_read_twice_by_one_operation(style):
    """Two reads by one operation are one use: a second node would end the graph and take the classifier flags."""
    graph = build_graph(TwiceConcatenatedToken(), input_size=(3, 16, 16), style=style)

    names = [node.param_name for node in graph.nodes]
    assert names.count("cls_token") == 1
    assert names[-2:] == ["head.weight", "head.bias"]
    assert graph.nodes[-2].last_weight
    assert graph.nodes[-1].last_bias


def test_tracing_restores_shared_module():
    model = timm.create_model("coat_lite_tiny")
    before = {name: p for name, p in model.named_parameters()}

    build_graph(model)

    after = dict(model.named_parameters())
    assert all(after[name] is before[name] for name in before)
    assert not any(p.is_meta for p in after.values())


def test_recurrent_layers_traced_once_per_weight():
    """Sequencer2d's bidirectional LSTMs unroll into 20k+ autograd nodes; the stand-in reads each weight once."""
    with torch.device("meta"):
        model = timm.create_model("sequencer2d_s")
    lstm = model.stages[0].blocks[0].rnn_tokens.rnn_v

    graph = build_graph(model)

    assert graph.unplaced == []
    assert graph.num_nodes < 1000
    assert "forward" not in vars(lstm), "the stand-in forward is removed after tracing"
    names = [node.param_name for node in graph.nodes]
    weight_ih = names.index("stages.0.blocks.0.rnn_tokens.rnn_v.weight_ih_l0")
    weight_hh = names.index("stages.0.blocks.0.rnn_tokens.rnn_v.weight_hh_l0")
    assert graph.adjacency[weight_ih, weight_hh] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_predicted(bundled_ghn, dtype):
    """A half-precision model gets the float32 prediction, rounded to its dtype."""
    torch.manual_seed(0)
    reference = timm.create_model("test_vit")
    model = timm.create_model("test_vit").to(dtype)

    expected = predict_parameters(reference, bundled_ghn, predict_classifier=True)
    result = predict_parameters(model, bundled_ghn, predict_classifier=True)

    assert result.unpredicted == []
    assert result.predicted == expected.predicted
    for name, value in model.named_parameters():
        assert value.dtype == dtype, name
        assert torch.equal(value, reference.get_parameter(name).to(dtype)), name


class TokenClassifier(nn.Module):
    """A patch embedding, one extra parameter applied to the tokens, and a linear classifier."""

    def __init__(self, name, shape):
        super().__init__()
        self.extra_name = name
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        extra = getattr(self, self.extra_name)
        if extra.dim() == 3:
            tokens = torch.cat([extra.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        elif extra.numel() == 0:
            tokens = tokens + extra.sum()
        else:
            tokens = tokens * extra.reshape(1, 1, -1)
        return self.head(tokens.mean(1))


@pytest.mark.parametrize(
    "name, shape, placed",
    [
        ("pos_embed", (), True),
        ("gamma", (), True),
        ("reg_token", (1, 0, 8), False),
        ("gamma", (0,), False),
    ],
)
def test_scalar_and_empty_parameters(bundled_ghn, name, shape, placed):
    """A 0-D parameter is predicted; one with no elements has nothing to predict and stays unplaced."""
    torch.manual_seed(0)
    model = TokenClassifier(name, shape)

    result = predict_parameters(model, bundled_ghn, predict_classifier=True)

    assert (name in result.predicted) == placed
    assert result.unpredicted == ([] if placed else [name])
    assert result.fraction_predicted == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("normalization", [nn.utils.spectral_norm, nn.utils.weight_norm])
def test_tracing_restores_hook_set_weight(normalization):
    """The legacy spectral and weight norms set ``module.weight`` as a plain attribute in a pre-hook."""
    model = nn.Sequential(normalization(nn.Conv2d(3, 8, 3)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model(torch.randn(1, 3, 8, 8))
    weight = model[0].weight

    build_graph(model, input_size=(3, 8, 8))

    assert model[0].weight is weight
    assert not model[0].weight.is_meta


def test_second_trace_reaches_cached_biases():
    """LeViT caches its attention biases per device in eval mode; the meta entry is dropped after tracing."""
    with torch.device("meta"):
        model = timm.create_model("levit_128s")
    model.eval()

    first = build_graph(model)
    second = build_graph(model)

    assert first.unplaced == []
    assert second.unplaced == []
    assert model.stages[0].blocks[0].attn.attention_bias_cache == {}


class RecurrentClassifier(nn.Module):
    """An LSTM over the rows of a one-channel image, then a linear classifier."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.rnn(x[:, 0])[0].mean(1))


class FinalStateClassifier(nn.Module):
    """A recurrent layer over the rows of a one-channel image, classified from its final state ``h_n``."""

    def __init__(self, recurrent_type, batch_first, bidirectional):
        super().__init__()
        self.rnn = recurrent_type(8, 6, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        sequence = x[:, 0] if self.rnn.batch_first else x[:, 0].transpose(0, 1)
        _, final = self.rnn(sequence)
        hidden = final[0] if isinstance(final, tuple) else final
        return self.head(hidden[-1])


@pytest.mark.parametrize("recurrent_type", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_final_state_placed(recurrent_type, batch_first, bidirectional):
    """A model that reads only ``h_n`` reaches the recurrent weights through the stand-in."""
    model = FinalStateClassifier(recurrent_type, batch_first, bidirectional)

    graph = build_graph(model, input_size=(1, 5, 8))

    assert graph.unplaced == []
    last_layer = "rnn.weight_hh_l1_reverse" if bidirectional else "rnn.weight_hh_l1"
    assert last_layer in graph.placed


@pytest.mark.parametrize("input_size", [(1, 8, 8), (1, 8, 5)], ids=["traced", "forward-raises"])
def test_tracing_restores_instance_forward(input_size):
    """A ``forward`` set on the LSTM instance (a wrapper) is put back after the stand-in."""
    model = RecurrentClassifier()
    wrapped = model.rnn.forward

    def logged_forward(*args, **kwargs):
        return wrapped(*args, **kwargs)

    model.rnn.forward = logged_forward

    try:
        build_graph(model, input_size=input_size)
    except TimmGhnError:
        assert input_size == (1, 8, 5), "only the wrong input size may fail"

    assert vars(model.rnn).get("forward") is logged_forward


def test_ghn3_style_places_tokens():
    path = SHARED / "reference" / "ghn3" / "ghn3tm8_rand_seed0.pt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    ghn = load_ghn(path)
    torch.manual_seed(0)
    model = timm.create_model("test_vit")

    result = predict_parameters(model, ghn, predict_classifier=True)

    assert result.unpredicted == []
    assert {"cls_token", "pos_embed"} <= set(result.predicted)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_distilled_heads_get_classifier_flags():
    """DeiT-distilled averages two heads, so its graph ends in a sum, not in a classifier."""
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_distilled_patch16_224")

    graph = build_graph(model)

    weights = sorted(node.param_name for node in graph.nodes if node.last_weight)
    biases = sorted(node.param_name for node in graph.nodes if node.last_bias)
    assert weights == ["head.weight", "head_dist.weight"]
    assert biases == ["head.bias", "head_dist.bias"]
    sinks = [node.name for v, node in enumerate(graph.nodes) if not (graph.adjacency[v] == 1).any()]
    assert sinks == ["AddBackward0"], "every token and head feeds the final sum"


def test_distilled_heads_follow_predict_classifier(bundled_ghn):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=64)

    result = predict_parameters(model, bundled_ghn, predict_classifier=False)

    assert sorted(result.unpredicted) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert not result.classifier_predicted
