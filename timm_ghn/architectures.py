"""Random small-to-medium timm networks for GHN training, and held-out ones for evaluation.

An :class:`ArchitectureSpec` is a family name plus JSON-serialisable constructor arguments of that
family's own timm class (``ResNet``, ``ConvNeXt``, ``VisionTransformer``, ``EfficientNet``,
``MobileNetV3``, ``RegNet``, ``MlpMixer``). :class:`ArchitectureSampler` draws specs with
randomized depths, widths, kernel sizes, normalization and activation layers, keeps those whose
parameter count lies in a budget, and never returns a spec that equals a held-out one. The same
seed gives the same sequence of specs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from timm_ghn.errors import InvalidOptionError

__all__ = [
    "FAMILIES",
    "HELD_OUT",
    "ArchitectureSpec",
    "ArchitectureSampler",
    "held_out_specs",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """One network: a family from :data:`FAMILIES` and its constructor arguments.

    ``kwargs`` holds only JSON values (activation and normalization layers by their timm names), so
    a spec can be stored in checkpoint metadata and compared by :meth:`key`.
    """

    family: str
    kwargs: Mapping[str, Any]
    name: str = ""

    def key(self) -> str:
        """Return a canonical JSON string of family and arguments (the name is not part of it)."""
        return json.dumps([self.family, self.kwargs], sort_keys=True)

    def label(self) -> str:
        """Return the name if the spec has one, else the family with a short hash of the key."""
        if self.name:
            return self.name
        return f"{self.family}-{hashlib.sha1(self.key().encode()).hexdigest()[:8]}"

    def build(self, num_classes: int, img_size: int = 32) -> nn.Module:
        """Create the timm model with ``num_classes`` outputs for square images of ``img_size`` pixels."""
        if self.family not in FAMILIES:
            raise InvalidOptionError(f"unknown architecture family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        model = FAMILIES[self.family](dict(self.kwargs), num_classes, img_size)
        model.expected_input_sz = (3, img_size, img_size)
        return model

    def num_params(self, num_classes: int, img_size: int = 32) -> int:
        """Count the parameters without allocating them (the model is built on the meta device)."""
        with torch.device("meta"):
            model = self.build(num_classes, img_size)
        return sum(p.numel() for p in model.parameters())

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "kwargs": dict(self.kwargs), "name": self.name}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ArchitectureSpec":
        return cls(family=values["family"], kwargs=dict(values["kwargs"]), name=values.get("name", ""))


# ---------------------------------------------------------------------------------------------
# Builders: JSON arguments -> timm constructor call


def _act(name: str) -> type[nn.Module]:
    from timm.layers import get_act_layer

    return get_act_layer(name)


def _norm(name: str) -> type[nn.Module]:
    from timm.layers import get_norm_layer

    return get_norm_layer(name)


def _build_resnet(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[kwargs.pop("block")]
    attn = kwargs.pop("attn", "")
    return ResNet(
        block=block,
        layers=tuple(kwargs.pop("layers")),
        channels=tuple(kwargs.pop("channels")),
        act_layer=_act(kwargs.pop("act")),
        norm_layer=_norm(kwargs.pop("norm")),
        block_args={"attn_layer": attn} if attn else None,
        num_classes=num_classes,
        **kwargs,
    )


def _build_convnext(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    norm = kwargs.pop("norm", None)
    return ConvNeXt(
        depths=tuple(kwargs.pop("depths")),
        dims=tuple(kwargs.pop("dims")),
        norm_layer=_norm(norm) if norm else None,
        num_classes=num_classes,
        **kwargs,
    )


def _build_vit(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, act_layer=_act(kwargs.pop("act")), num_classes=num_classes, **kwargs)


def _build_mixer(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(
        img_size=img_size,
        mlp_ratio=tuple(kwargs.pop("mlp_ratio")),
        act_layer=_act(kwargs.pop("act")),
        num_classes=num_classes,
        **kwargs,
    )


def _build_efficientnet(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    return EfficientNet(
        block_args=decode_arch_def(kwargs.pop("arch_def")),
        act_layer=_act(kwargs.pop("act")),
        norm_layer=nn.BatchNorm2d,
        num_classes=num_classes,
        **kwargs,
    )


def _build_mobilenetv3(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv3 import MobileNetV3

    # The squeeze-excitation layer of timm's own MobileNetV3 constructors (_gen_mobilenet_v3).
    se_layer = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    return MobileNetV3(
        block_args=decode_arch_def(kwargs.pop("arch_def")),
        act_layer=_act(kwargs.pop("act")),
        norm_layer=nn.BatchNorm2d,
        se_layer=se_layer,
        num_classes=num_classes,
        **kwargs,
    )


def _build_regnet(kwargs: dict, num_classes: int, img_size: int) -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(RegNetCfg(**kwargs), num_classes=num_classes)


#: Family name -> builder ``(kwargs, num_classes, img_size) -> model``.
FAMILIES: dict[str, Callable[[dict, int, int], nn.Module]] = {
    "resnet": _build_resnet,
    "convnext": _build_convnext,
    "vit": _build_vit,
    "mixer": _build_mixer,
    "efficientnet": _build_efficientnet,
    "mobilenetv3": _build_mobilenetv3,
    "regnet": _build_regnet,
}


# ---------------------------------------------------------------------------------------------
# Random arguments per family. ``scale`` in (0, 1] shrinks widths when a draw exceeds the budget.


def _widths(rng: random.Random, stages: int, choices: Sequence[int], scale: float, multiple: int = 8) -> list[int]:
    base = max(multiple, int(rng.choice(choices) * scale) // multiple * multiple)
    return [base * 2**i for i in range(stages)]


def _sample_resnet(rng: random.Random, scale: float) -> dict:
    stages = 4  # timm's ResNet.forward_features calls layer1 to layer4
    block = rng.choice(["basic", "bottleneck"])
    kwargs: dict[str, Any] = {
        "block": block,
        "layers": [rng.randint(1, 3) for _ in range(stages)],
        "channels": _widths(rng, stages, [8, 16, 24, 32, 48], scale),
        "stem_width": rng.choice([16, 24, 32]),
        "stem_type": rng.choice(["", "deep"]),
        "replace_stem_pool": rng.random() < 0.3,
        "avg_down": rng.random() < 0.3,
        "act": rng.choice(["relu", "relu", "silu", "gelu", "leaky_relu"]),
        "norm": "batchnorm2d" if rng.random() < 0.8 else "layernorm2d",
        "attn": rng.choice(["", "", "se"]),
    }
    if block == "bottleneck" and rng.random() < 0.5:
        # ResNeXt: grouped 3x3 convolutions of width channels * base_width / 64 * cardinality.
        kwargs["cardinality"] = rng.choice([2, 4, 8])
        kwargs["base_width"] = rng.choice([8, 16, 32])
    return kwargs


def _sample_convnext(rng: random.Random, scale: float) -> dict:
    stages = 4  # timm's ConvNeXt builds four stages
    conv_mlp = rng.random() < 0.3
    kwargs: dict[str, Any] = {
        "depths": [rng.randint(1, 3) for _ in range(stages)],
        "dims": _widths(rng, stages, [8, 16, 24, 32, 48], scale),
        "kernel_sizes": rng.choice([3, 5, 7]),
        "patch_size": rng.choice([2, 4]),
        "ls_init_value": rng.choice([None, 1e-6]),
        "conv_mlp": conv_mlp,
        "use_grn": rng.random() < 0.2,
        "act_layer": rng.choice(["gelu", "gelu", "silu", "relu"]),
    }
    if conv_mlp:
        # timm's ConvNeXt accepts another norm layer only with conv_mlp (channels-first norms).
        kwargs["norm"] = rng.choice(["layernorm2d", "batchnorm2d"])
    return kwargs


def _sample_vit(rng: random.Random, scale: float) -> dict:
    heads = rng.choice([2, 3, 4, 6])
    head_dim = max(8, int(rng.choice([16, 24, 32]) * scale) // 8 * 8)
    pool = rng.choice(["token", "avg"])
    return {
        "patch_size": rng.choice([4, 8, 8]),
        "embed_dim": heads * head_dim,
        "depth": rng.randint(2, 6),
        "num_heads": heads,
        "mlp_ratio": rng.choice([2.0, 3.0, 4.0]),
        "qkv_bias": rng.random() < 0.8,
        "global_pool": pool,
        "class_token": pool == "token",
        "pre_norm": rng.random() < 0.2,
        "act": rng.choice(["gelu", "gelu", "silu"]),
    }


def _sample_mixer(rng: random.Random, scale: float) -> dict:
    return {
        "patch_size": rng.choice([4, 4, 8]),
        "num_blocks": rng.randint(2, 8),
        "embed_dim": max(16, int(rng.choice([64, 96, 128, 192, 256]) * scale) // 16 * 16),
        "mlp_ratio": [rng.choice([0.25, 0.5]), rng.choice([2.0, 4.0])],
        "act": rng.choice(["gelu", "gelu", "silu"]),
    }


def _block_string(rng: random.Random, kind: str, repeats: int, stride: int, channels: int, se: bool, relu: bool) -> str:
    kernel = rng.choice([3, 3, 5, 7])
    parts = [kind, f"r{repeats}", f"k{kernel}", f"s{stride}"]
    if kind != "ds":
        parts.append(f"e{rng.choice([1, 3, 4, 6])}")
    parts.append(f"c{channels}")
    if se:
        parts.append("se0.25")
    if relu:
        parts.append("nre")
    return "_".join(parts)


def _mobile_arch_def(rng: random.Random, scale: float, kinds: Sequence[str], relu_prob: float) -> list[list[str]]:
    """Draw an EfficientNet-style ``arch_def``: a depthwise-separable stage, then 2 to 5 stages."""
    stages = rng.randint(3, 6)
    channels = max(8, int(rng.choice([8, 16, 24]) * scale) // 8 * 8)
    arch_def = [[_block_string(rng, "ds", 1, 1, channels, rng.random() < 0.3, rng.random() < relu_prob)]]
    for index in range(1, stages):
        channels = max(8, int(channels * rng.choice([1.5, 2.0])) // 8 * 8)
        stride = 2 if index <= 4 else 1
        kind = rng.choice(kinds) if index <= 2 else "ir"
        repeats = rng.randint(1, 3)
        arch_def.append([_block_string(rng, kind, repeats, stride, channels, rng.random() < 0.5, rng.random() < relu_prob)])
    return arch_def


def _sample_efficientnet(rng: random.Random, scale: float) -> dict:
    return {
        "arch_def": _mobile_arch_def(rng, scale, ["ir", "er"], relu_prob=0.0),
        "stem_size": max(8, int(rng.choice([16, 24, 32]) * scale) // 8 * 8),
        "num_features": max(64, int(rng.choice([128, 256, 384, 512]) * scale) // 32 * 32),
        "act": rng.choice(["silu", "silu", "relu", "relu6"]),
    }


def _sample_mobilenetv3(rng: random.Random, scale: float) -> dict:
    return {
        "arch_def": _mobile_arch_def(rng, scale, ["ir"], relu_prob=0.5),
        "stem_size": max(8, int(rng.choice([16, 24]) * scale) // 8 * 8),
        "num_features": max(64, int(rng.choice([256, 512, 768]) * scale) // 32 * 32),
        "head_norm": False,
        "act": rng.choice(["hard_swish", "hard_swish", "relu"]),
    }


def _sample_regnet(rng: random.Random, scale: float) -> dict:
    group = rng.choice([8, 16])
    return {
        "depth": rng.randint(6, 14),
        "w0": max(group, int(rng.choice([16, 24, 32]) * scale) // 8 * 8),
        "wa": round(rng.uniform(8.0, 32.0) * scale, 1),
        "wm": round(rng.uniform(2.0, 2.6), 1),
        "group_size": group,
        "se_ratio": rng.choice([0.0, 0.25]),
        "stem_width": rng.choice([16, 32]),
        "act_layer": rng.choice(["relu", "silu"]),
    }


_SAMPLERS: dict[str, Callable[[random.Random, float], dict]] = {
    "resnet": _sample_resnet,
    "convnext": _sample_convnext,
    "vit": _sample_vit,
    "mixer": _sample_mixer,
    "efficientnet": _sample_efficientnet,
    "mobilenetv3": _sample_mobilenetv3,
    "regnet": _sample_regnet,
}


# ---------------------------------------------------------------------------------------------
# Held-out architectures: fixed specs that the sampler never returns.


def _spec(name: str, family: str, **kwargs: Any) -> ArchitectureSpec:
    return ArchitectureSpec(family=family, kwargs=kwargs, name=name)


#: Named architectures kept out of training for zero-shot evaluation (two or more per family for
#: the common families). :class:`ArchitectureSampler` rejects any draw equal to one of them.
HELD_OUT: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        _spec("resnet-basic-s", "resnet", block="basic", layers=[2, 2, 2, 1], channels=[16, 32, 64, 128], stem_width=32,
              stem_type="", replace_stem_pool=False, avg_down=False, act="relu", norm="batchnorm2d", attn=""),
        _spec("resnet-se-silu", "resnet", block="basic", layers=[1, 2, 2, 1], channels=[24, 48, 96, 192], stem_width=24,
              stem_type="deep", replace_stem_pool=False, avg_down=True, act="silu", norm="batchnorm2d", attn="se"),
        _spec("resnext-s", "resnet", block="bottleneck", layers=[1, 2, 2, 1], channels=[16, 32, 64, 128], stem_width=32,
              stem_type="", replace_stem_pool=False, avg_down=False, act="relu", norm="batchnorm2d", attn="",
              cardinality=4, base_width=16),
        _spec("convnext-k7", "convnext", depths=[2, 2, 2, 1], dims=[16, 32, 64, 128], kernel_sizes=7, patch_size=2,
              ls_init_value=None, conv_mlp=False, use_grn=False, act_layer="gelu"),
        _spec("convnext-bn-k5", "convnext", depths=[1, 2, 3, 1], dims=[16, 32, 64, 128], kernel_sizes=5, patch_size=2,
              ls_init_value=None, conv_mlp=True, use_grn=False, act_layer="gelu", norm="batchnorm2d"),
        _spec("vit-p4-d6", "vit", patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=3.0, qkv_bias=True,
              global_pool="avg", class_token=False, pre_norm=False, act="gelu"),
        _spec("efficientnet-s", "efficientnet", arch_def=[["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e6_c24_se0.25"],
              ["ir_r2_k5_s2_e6_c40_se0.25"], ["ir_r2_k3_s2_e6_c80_se0.25"]], stem_size=16, num_features=256, act="silu"),
        _spec("mobilenetv3-s", "mobilenetv3", arch_def=[["ds_r1_k3_s1_c16_nre"], ["ir_r2_k3_s2_e4_c24_nre"],
              ["ir_r2_k5_s2_e3_c40_se0.25"], ["ir_r2_k3_s2_e6_c80_se0.25"]], stem_size=16, num_features=512,
              head_norm=False, act="hard_swish"),
        _spec("regnet-s", "regnet", depth=10, w0=16, wa=16.0, wm=2.3, group_size=8, se_ratio=0.25, stem_width=32,
              act_layer="relu"),
        _spec("mixer-p4", "mixer", patch_size=4, num_blocks=4, embed_dim=128, mlp_ratio=[0.5, 4.0], act="gelu"),
    )
}


def held_out_specs(names: Iterable[str] | None = None) -> list[ArchitectureSpec]:
    """Return the held-out specs with the given names (all of them by default)."""
    if names is None:
        return list(HELD_OUT.values())
    specs = []
    for name in names:
        if name not in HELD_OUT:
            raise InvalidOptionError(f"unknown held-out architecture {name!r}: expected one of {', '.join(HELD_OUT)}")
        specs.append(HELD_OUT[name])
    return specs


class ArchitectureSampler:
    """Seeded sampler of architecture specs within a parameter budget.

    Args:
        families: family names from :data:`FAMILIES` (default: all), drawn uniformly.
        min_params, max_params: budget in parameters, counted with ``num_classes`` outputs.
        num_classes: outputs of the classifier used for the budget.
        img_size: image side in pixels (ViT and MLP-Mixer need it).
        exclude: specs never to return (default: :data:`HELD_OUT`), compared by :meth:`ArchitectureSpec.key`.
        seed: seed of the sampler's own ``random.Random``.
    """

    def __init__(
        self,
        families: Sequence[str] | None = None,
        min_params: int = 50_000,
        max_params: int = 2_000_000,
        num_classes: int = 10,
        img_size: int = 32,
        exclude: Iterable[ArchitectureSpec] | None = None,
        seed: int = 0,
    ) -> None:
        self.families = list(families) if families else list(_SAMPLERS)
        unknown = [f for f in self.families if f not in _SAMPLERS]
        if unknown:
            raise InvalidOptionError(f"unknown architecture families {unknown}: expected a subset of {', '.join(_SAMPLERS)}")
        if not 0 < min_params < max_params:
            raise InvalidOptionError(
                f"invalid parameter budget [{min_params}, {max_params}]: expected 0 < min_params < max_params"
            )
        self.min_params = int(min_params)
        self.max_params = int(max_params)
        self.num_classes = int(num_classes)
        self.img_size = int(img_size)
        self.excluded = {spec.key() for spec in (HELD_OUT.values() if exclude is None else exclude)}
        self.rng = random.Random(seed)

    def sample(self, family: str | None = None, max_tries: int = 200) -> ArchitectureSpec:
        """Draw one spec whose parameter count lies in ``[min_params, max_params]``.

        A draw above the budget is redrawn with widths scaled down by 0.8, and one below it with
        widths scaled up by 1.25 (up to the family's own widths at scale 1).

        Raises:
            InvalidOptionError: no draw fitted the budget within ``max_tries``.
        """
        family = family or self.rng.choice(self.families)
        scale = 1.0
        for _ in range(max_tries):
            spec = ArchitectureSpec(family, _SAMPLERS[family](self.rng, scale))
            if spec.key() in self.excluded:
                continue
            try:
                count = spec.num_params(self.num_classes, self.img_size)
            except AssertionError:
                # timm's RegNet requires its width schedule to give exactly four stages.
                continue
            if count > self.max_params:
                scale = max(0.1, scale * 0.8)
            elif count < self.min_params:
                scale = min(1.0, scale * 1.25)
            else:
                return spec
        raise InvalidOptionError(
            f"no {family} architecture within [{self.min_params:,}, {self.max_params:,}] parameters after "
            f"{max_tries} draws; widen the budget (--min-params/--max-params)"
        )

    def sample_many(self, count: int) -> list[ArchitectureSpec]:
        """Draw ``count`` specs, each from a family chosen uniformly at random."""
        return [self.sample() for _ in range(count)]
