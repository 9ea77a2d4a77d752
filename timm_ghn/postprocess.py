r"""GHN-orth: noise and orthogonalisation applied to GHN-predicted weights.

GHN-orth is the post-processing of Knyazev, "Pretraining a Neural Network before Knowing Its
Architecture" (ICML 2022 pre-training workshop, arXiv:2207.10049), as released in ppuda
(https://github.com/facebookresearch/ppuda, ``ppuda.utils.init.init``). Predicted weights are tiled
from small decoded blocks, so they are rank-deficient and their filters are strongly correlated.
GHN-orth breaks those ties by adding a small amount of noise and replaces each weight with an
orthogonal matrix before fine-tuning.

Procedure (:func:`ghn_orth_`):

1. List the modules whose ``weight`` has at least 2 dims, in ``model.named_modules()`` order
   (registration order, not execution order), numbered from 1 (the *layer index* ``ℓ``).
   Let ``M`` be their number. The module with ``ℓ = M`` is assumed to be the classifier and is
   never changed.
2. Every other module with ``ℓ ≥ L`` (the start layer) gets, in this order,

   * noise: ``W ← W + β · σ(W) · N(0, 1)`` with ``σ`` from :func:`correlation_std`, and
   * orthogonalisation: ``W ← Q · diag(sign(diag(R)))`` from the QR decomposition of the tall
     2-D view of ``W`` (:func:`orthogonalize_`).

   Modules with ``ℓ < L``, biases, norm layers and buffers are left bitwise unchanged.

Two variants are implemented. They differ only in the axis of the correlation behind ``σ``:

* ``"released"`` (the ppuda code): ``σ`` is the standard deviation of the correlation between the
  rows of the *tall* view, that is the ``[K, C·kh·kw]`` reshape transposed when
  ``K < C·kh·kw``. Only when ``K ≥ C·kh·kw`` (expanding 1x1 convs, depthwise convs, linear layers
  with at least as many outputs as inputs) is this the correlation between output channels. For
  the common ``K < C·kh·kw`` case (ResNet-50 ``layer4.0.conv2``: 512 x 4608) it is the
  4608 x 4608 correlation between input positions, computed across output channels.
* ``"paper"`` (the report's text): ``σ`` comes from the ``K x K`` correlation between the ``K``
  output channels.

In both variants the standard deviation is taken over all entries of the correlation matrix,
including its unit diagonal, with Bessel's correction, on the weight before the noise is added.
The noise ``N(0, β·σ)`` is read with ``β·σ`` as the standard deviation, as the code does.

Start layers: the published settings are ``L = 37`` for ResNet-50 (54 layers with a 2-D weight)
and ``L = 100`` for ConvNeXt-Base (113 layers) in the report. The ppuda README states that the
report's ConvNeXt value is a mistake and that 94 should be used, so the ``"released"`` variant
uses 94. timm and torchvision register these modules in the same order, so layer 37 is
``layer3.3.conv3`` in both and layer 94 is timm's ``stages.2.blocks.24.conv_dw`` (torchvision's
``features.5.24.block.0``).

Noise is drawn from a :class:`torch.Generator` on the CPU, one draw of the weight's shape per
processed layer in module order. With a generator seeded 0 (``seed=0``, the default) the draws
equal those of ``torch.manual_seed(0)`` followed by ppuda's ``torch.randn_like(weight)`` calls on
CPU weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time

import torch
from timm.models import split_model_name_tag
from torch import Tensor, nn

from .errors import InvalidOptionError

__all__ = [
    "OrthReport",
    "add_correlated_noise_",
    "correlation_std",
    "default_start_layer",
    "ghn_orth_",
    "orthogonalize_",
    "weight_modules",
]

logger = logging.getLogger(__name__)

VARIANTS = ("released", "paper")
"""Accepted values of the ``variant`` argument."""

# Start layers published for GHN-orth, keyed by timm model name without the pretrained tag, then
# by variant. Each entry also stores the number of 2-D weight layers the value was chosen for.
_START_LAYER_PRESETS: dict[str, tuple[int, dict[str, int]]] = {
    "resnet50": (54, {"released": 37, "paper": 37}),
    "convnext_base": (113, {"released": 94, "paper": 100}),
}


@dataclasses.dataclass
class OrthReport:
    """Summary of one :func:`ghn_orth_` call."""

    num_layers: int
    """Number of modules with a weight of at least 2 dims (``M``)."""
    start_layer: int
    """First 1-based layer index that was eligible for the transform (``L``)."""
    transformed: list[str]
    """Names of the modules that got noise or orthogonalisation, in module order."""
    skipped_classifier: str | None
    """Name of the last registered 2-D weight module, left unchanged, or ``None`` when ``M = 0``."""
    beta: float
    """Noise scale ``β``."""
    variant: str
    """Correlation axis used for ``σ``: ``"released"`` or ``"paper"``."""
    seconds: float
    """Wall-clock time of the call, in seconds."""


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise InvalidOptionError(
            f"invalid GHN-orth variant {variant!r}: expected one of {', '.join(map(repr, VARIANTS))}"
        )


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
        raise InvalidOptionError(f"invalid GHN-orth beta {beta!r}: expected a finite number >= 0")


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dims, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got dtype {weight.dtype}")


def _tall_view(weight: Tensor) -> tuple[Tensor, bool]:
    """Reshape ``weight`` to ``[K, prod(rest)]`` and transpose it if it is wider than tall.

    Returns the view and whether it was transposed. The view shares memory with ``weight`` when
    ``reshape`` allows it.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.shape[0] < matrix.shape[1]:
        return matrix.t(), True
    return matrix, False


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the ``(name, module)`` pairs whose ``weight`` attribute is a tensor of >= 2 dims.

    The order is that of ``model.named_modules()``: registration order, pre-order, each module
    once even if it is registered under several names. Position ``i`` in the list (0-based) is
    layer index ``i + 1``. Convolutions, linear layers and embeddings are included. Norm layers
    (1-D weight) and ``nn.MultiheadAttention`` (no ``weight`` attribute) are not.
    """
    modules = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() >= 2:
            modules.append((name, module))
    return modules


def default_start_layer(num_layers: int, model_name: str | None = None, variant: str = "released") -> int:
    r"""Return the default 1-based start layer ``L`` of GHN-orth.

    Published presets, looked up by ``model_name`` with any timm pretrained tag stripped
    (``"resnet50.a1_in1k"`` is ``"resnet50"``):

    * ``resnet50``: 37 in both variants.
    * ``convnext_base``: 94 for ``"released"`` (the ppuda README value) and 100 for ``"paper"``.

    Any other model transforms the deepest third of its 2-D weight layers:

    .. math::
        L = \left\lfloor \frac{2M}{3} \right\rfloor + 1

    which is 37 for ResNet-50's ``M = 54`` layers. A preset is still returned when ``num_layers``
    differs from the count it was chosen for, with a warning in the log.

    Args:
        num_layers: ``M``, the number of modules with a weight of at least 2 dims.
        model_name: timm model name, optionally with a pretrained tag.
        variant: ``"released"`` or ``"paper"``.

    Raises:
        InvalidOptionError: ``num_layers`` is negative or not an integer, or ``variant`` is
            unknown. It is a subclass of ``ValueError``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 0:
        raise InvalidOptionError(f"invalid number of layers {num_layers!r}: expected an integer >= 0")
    _check_variant(variant)

    if model_name is not None:
        base_name, _ = split_model_name_tag(model_name)
        preset = _START_LAYER_PRESETS.get(base_name)
        if preset is not None:
            expected_layers, start_by_variant = preset
            if num_layers != expected_layers:
                logger.warning(
                    "GHN-orth start layer preset for %s was chosen for %d layers with a 2-D weight, "
                    "but the model has %d; using the preset %d anyway",
                    base_name, expected_layers, num_layers, start_by_variant[variant],
                )
            return start_by_variant[variant]

    return int(num_layers) * 2 // 3 + 1


def _repeat_period(matrix: Tensor, dim: int) -> int:
    """Return the smallest ``p`` with ``matrix`` equal along ``dim`` to its own shift by ``p``.

    Index ``i`` along ``dim`` then holds the same slice as index ``i mod p``, as in a GHN
    prediction tiled from a decoded block (:func:`timm_ghn.predict.fit_block`). Only the first
    later slice equal to slice 0 is tried. When that candidate fails, the function returns
    ``matrix.shape[dim]`` (no repeat), even if a longer period exists. Comparisons are exact.
    """
    size = matrix.shape[dim]
    if size < 2:
        return size

    first = matrix.narrow(dim, 0, 1)
    equal_to_first = (matrix == first).all(dim=1 - dim)
    candidates = torch.nonzero(equal_to_first[1:])
    if candidates.numel() == 0:
        return size

    period = int(candidates[0]) + 1
    overlap = size - period
    if torch.equal(matrix.narrow(dim, period, overlap), matrix.narrow(dim, 0, overlap)):
        return period
    return size


def _repeat_counts(size: int, period: int) -> Tensor:
    """Return how often each index ``r < period`` occurs as ``i mod period`` for ``i < size``."""
    counts = torch.full((period,), size // period, dtype=torch.float64)
    counts[: size % period] += 1
    return counts


def _row_correlation_std(matrix: Tensor) -> float:
    r"""Return the sample std of all entries of the Pearson correlation between rows of ``matrix``.

    With ``Z`` the rows centred and scaled to unit L2 norm, the correlation is ``R = Z Zᵀ``
    (``m x m`` for ``m`` rows). Its entry sums follow from the smaller of the two Gram matrices:

    .. math::
        \sum_{ij} R_{ij} = \lVert \mathbf{1}^\top Z \rVert^2, \qquad
        \sum_{ij} R_{ij}^2 = \lVert Z Z^\top \rVert_F^2 = \lVert Z^\top Z \rVert_F^2

    so ``R`` itself is never formed when it is the larger one. With ``N = m²``,
    ``std = sqrt((ΣR² - (ΣR)²/N) / (N - 1))``.

    Tiled matrices are reduced first. If row ``i`` equals row ``i mod p`` and column ``j``
    equals column ``j mod q`` (:func:`_repeat_period`), only the ``p x q`` block ``B`` is read.
    Column ``s`` of ``B`` occurs ``d_s`` times in each row, so the row means, norms and inner
    products are the ``d``-weighted ones of ``B``. Row ``r`` occurs ``c_r`` times, so with
    ``Y = diag(√c) Z_B diag(√d)`` (``Z_B`` the weighted unit rows of ``B``):

    .. math::
        \sum_{ij} R_{ij} = \lVert c^\top Z_B \operatorname{diag}(\sqrt d) \rVert^2, \qquad
        \sum_{ij} R_{ij}^2 = \lVert Y Y^\top \rVert_F^2

    This is the same value in exact arithmetic, at the cost of the block. The block is computed
    in float64, and an untiled matrix keeps the float32 product.
    """
    rows, cols = matrix.shape
    if rows < 2 or cols < 2:
        # One row gives N - 1 = 0. One column gives zero variance in every row.
        return float("nan")

    row_period = _repeat_period(matrix, 0)
    col_period = _repeat_period(matrix, 1)
    tiled = row_period < rows or col_period < cols
    values = matrix[:row_period, :col_period].to(torch.float64 if tiled else torch.float32)

    # A constant row has zero variance. Test equality exactly, because centring it in float32 can
    # leave rounding residue that would otherwise be scaled up to a unit-norm row of noise.
    constant_rows = (values == values[:, :1]).all(dim=1)
    if bool(constant_rows.any()):
        return float("nan")

    if tiled:
        row_counts = _repeat_counts(rows, row_period).to(values.device)
        col_weights = _repeat_counts(cols, col_period).to(values.device)
        centred = values - (values * col_weights).sum(dim=1, keepdim=True) / cols
        centred = centred * col_weights.sqrt()
    else:
        centred = values - values.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        return float("nan")
    unit_rows = centred / norms

    if tiled:
        column_sums = row_counts @ unit_rows
        unit_rows = unit_rows * row_counts.sqrt().unsqueeze(1)
    else:
        column_sums = unit_rows.sum(dim=0)
    if unit_rows.shape[0] <= unit_rows.shape[1]:
        gram = unit_rows @ unit_rows.t()
    else:
        gram = unit_rows.t() @ unit_rows

    entry_sum = float(column_sums.double().square().sum())
    entry_square_sum = float(gram.double().square().sum())
    count = float(rows) * float(rows)
    variance = (entry_square_sum - entry_sum * entry_sum / count) / (count - 1.0)
    # Rounding can push a zero variance (all rows equal up to sign) slightly below zero.
    return math.sqrt(max(variance, 0.0))


def correlation_std(weight: Tensor, variant: str = "released") -> float:
    r"""Return ``σ``, the std of the correlation matrix of ``weight`` used to scale GHN-orth noise.

    ``weight`` of shape ``[K, ...]`` is first reshaped to ``V = [K, prod(rest)]``.

    * ``"released"``: ``V`` is transposed when ``K < prod(rest)``, so that it is tall, and ``R``
      is the Pearson correlation between the rows of that tall view.
    * ``"paper"``: ``R`` is the ``K x K`` correlation between the rows of the untransposed ``V``
      (the output channels).

    Rows are the variables and columns the observations, as in ``numpy.corrcoef``. The result is
    the standard deviation of all ``n = rows²`` entries of ``R``, diagonal included, with
    Bessel's correction:

    .. math::
        \sigma = \sqrt{\frac{1}{n - 1} \sum_{ij} (R_{ij} - \bar R)^2}

    It is computed from the Gram matrix of the smaller side, so memory grows with
    ``min(rows, cols)²`` rather than ``rows²``. A view tiled from a smaller block, as GHN
    predictions are, is reduced to that block first and computed in float64, which takes
    milliseconds even for a 4096 x 1024 weight. Other views use a float32 matrix product on the
    weight's device, and the final sums combine in float64. On random float32 matrices the result
    matched ``numpy.std(numpy.corrcoef(view), ddof=1)`` to within 1e-7 relative, and on tiled
    ones to within 1e-15 (measured on CPU).
    ``corrcoef`` clips entries to ``[-1, 1]`` and this function does not, which matters only at
    rounding level.

    Returns:
        ``σ`` as a Python float, or ``nan`` when the correlation is undefined: a row with zero
        variance (a constant row, or a view with one column) or a view with one row. No error is
        raised in that case, so the caller decides what to do.

    Raises:
        ValueError: ``weight`` has fewer than 2 dims.
        TypeError: ``weight`` is not a floating-point tensor.
        InvalidOptionError: ``variant`` is unknown (a subclass of ``ValueError``).
    """
    _check_weight(weight)
    _check_variant(variant)

    if variant == "released":
        matrix, _ = _tall_view(weight)
    else:
        matrix = weight.reshape(weight.shape[0], -1)
    return _row_correlation_std(matrix)


def add_correlated_noise_(
    weight: Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    variant: str = "released",
) -> Tensor:
    r"""Add Gaussian noise scaled by the weight's correlation spread to ``weight``, in place.

    .. math::
        W \leftarrow W + \beta \, \sigma(W) \, \varepsilon, \qquad \varepsilon \sim \mathcal{N}(0, 1)

    with ``σ`` from :func:`correlation_std` on the weight before the noise. ``ε`` has the
    weight's shape and is drawn on the CPU in float32 with
    ``torch.randn(weight.shape, generator=generator)``, then moved to the weight's device and
    dtype. A CPU generator seeded 0 thus gives the same values as ppuda's
    ``torch.manual_seed(0); torch.randn_like(weight)`` on a CPU weight. With
    ``generator=None`` the global CPU generator is used, also for CUDA weights.

    Exactly one draw of the weight's shape is taken per call, even when the noise is not added,
    so that later draws from the same generator do not depend on this weight's values.

    Args:
        weight: tensor of at least 2 dims, changed in place.
        beta: ``β``, finite and >= 0.
        generator: CPU random generator for ``ε``.
        variant: correlation axis of ``σ``, ``"released"`` or ``"paper"``.

    Returns:
        ``weight``.

    Raises:
        InvalidOptionError: ``beta`` is negative or not finite, or ``variant`` is unknown.
    """
    _check_beta(beta)
    _check_weight(weight)
    sigma = correlation_std(weight, variant)

    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    if math.isnan(sigma):
        # NOTE: ppuda adds NaN noise here and turns the whole weight into NaN. Keeping the weight
        # is a deliberate deviation, and the warning is the only sign that this layer got no noise.
        logger.warning(
            "GHN-orth noise skipped for a weight of shape %s: the correlation of its rows is "
            "undefined (a constant row, a single row or a single column)",
            tuple(weight.shape),
        )
        return weight

    noise = noise.to(device=weight.device, dtype=weight.dtype)
    weight.add_(noise.mul_(beta * sigma))
    return weight


def orthogonalize_(weight: Tensor) -> Tensor:
    r"""Replace ``weight`` in place with the sign-corrected orthogonal factor of its QR decomposition.

    With ``V`` the tall 2-D view of ``weight`` (``[K, prod(rest)]``, transposed when
    ``K < prod(rest)``) and ``V = QR`` its reduced QR decomposition:

    .. math::
        V \leftarrow Q \, \operatorname{diag}(s), \qquad
        s_j = \begin{cases} -1 & R_{jj} < 0 \\ +1 & \text{otherwise} \end{cases}

    so the columns of the tall view are orthonormal and ``diag(Vᵀ_{old} V_{new}) ≥ 0``. A wide
    weight therefore ends up with orthonormal output filters, and the sum of squares of the result
    is ``min(rows, cols)``. The scale of the input is discarded: no gain is applied.

    ppuda multiplies by ``sign(R_jj)``, which zeroes column ``j`` when ``R_jj = 0`` (a
    rank-deficient view). Here a zero diagonal entry counts as ``+1``, so every column stays a
    unit vector.

    The decomposition runs in float32 (``torch.linalg.qr``) on the weight's device, and the
    result is cast back to the weight's dtype.

    Returns:
        ``weight``.

    Raises:
        ValueError: ``weight`` has fewer than 2 dims or contains NaN or infinity.
        TypeError: ``weight`` is not a floating-point tensor.
    """
    _check_weight(weight)
    matrix, transposed = _tall_view(weight)
    matrix = matrix.to(torch.float32)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            f"cannot orthogonalise a weight of shape {tuple(weight.shape)}: it contains NaN or infinity"
        )

    q, r = torch.linalg.qr(matrix, mode="reduced")
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    q = q * signs

    if transposed:
        q = q.t()
    weight.copy_(q.reshape(weight.shape))
    return weight


def ghn_orth_(
    model: nn.Module,
    beta: float = 3e-5,
    start_layer: int | None = None,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    variant: str = "released",
    model_name: str | None = None,
    orthogonalize: bool = True,
) -> OrthReport:
    """Apply GHN-orth to ``model`` in place: noise, then orthogonalisation, from ``start_layer`` on.

    The modules of :func:`weight_modules` are numbered from 1 to ``M``. Module ``M``, assumed
    to be the classifier, is skipped. Every module with index ``>= start_layer`` gets
    :func:`add_correlated_noise_` (when ``beta > 0``) and then :func:`orthogonalize_` (when
    ``orthogonalize``). Biases, 1-D weights and buffers are not touched. Everything runs under
    ``torch.no_grad()``.

    A module registered under several names is processed once. A weight tensor shared by two
    modules is processed once per module, as in ppuda.

    Args:
        model: network whose weights were predicted by a GHN.
        beta: noise scale ``β``, finite and >= 0. ``0`` skips the noise.
        start_layer: first 1-based layer index to transform. ``0`` and ``1`` both mean the first
            layer. ``None`` takes :func:`default_start_layer` for ``M``, ``model_name`` and
            ``variant``.
        seed: seed of the CPU generator created when ``generator`` is ``None``.
        generator: CPU generator for the noise, used instead of ``seed``. One draw of the
            weight's shape is taken per processed layer, in module order.
        variant: ``"released"`` (ppuda's correlation axis) or ``"paper"`` (output channels).
        model_name: timm model name, used only to look up the default start layer.
        orthogonalize: whether to orthogonalise. ``False`` with ``beta > 0`` adds noise only.

    Returns:
        An :class:`OrthReport`. ``transformed`` is empty when neither step is enabled.

    Raises:
        InvalidOptionError: ``beta``, ``start_layer`` or ``variant`` is invalid (a subclass of
            ``ValueError``).
        ValueError: a transformed weight contains NaN or infinity before orthogonalisation. The
            modules before it have already been changed.
    """
    started = time.perf_counter()
    _check_beta(beta)
    _check_variant(variant)
    if start_layer is not None and (
        isinstance(start_layer, bool) or not isinstance(start_layer, numbers.Integral) or start_layer < 0
    ):
        raise InvalidOptionError(f"invalid GHN-orth start layer {start_layer!r}: expected an integer >= 0")

    modules = weight_modules(model)
    num_layers = len(modules)
    if start_layer is None:
        start_layer = default_start_layer(num_layers, model_name, variant)
    start_layer = max(1, int(start_layer))
    if start_layer > max(1, num_layers - 1):
        raise InvalidOptionError(
            f"invalid GHN-orth start layer {start_layer}: the model has {num_layers} layers with a 2-D weight and "
            f"the last one (the classifier) is never changed, so the start layer must be at most {max(1, num_layers - 1)}"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(seed)

    add_noise = beta > 0
    transformed: list[str] = []
    skipped_classifier = modules[-1][0] if modules else None
    # The classifier is the last entry, so it is never part of the candidates.
    candidates = modules[:-1] if (add_noise or orthogonalize) else []

    with torch.no_grad():
        for index, (name, module) in enumerate(candidates, start=1):
            if index < start_layer:
                continue

            weight = module.weight
            if add_noise:
                add_correlated_noise_(weight, beta, generator=generator, variant=variant)
            if orthogonalize:
                try:
                    orthogonalize_(weight)
                except ValueError as error:
                    message = f"GHN-orth failed at module {name!r} (layer {index}): {error}"
                    raise ValueError(message) from error
            transformed.append(name)

    report = OrthReport(
        num_layers=num_layers,
        start_layer=start_layer,
        transformed=transformed,
        skipped_classifier=skipped_classifier,
        beta=float(beta),
        variant=variant,
        seconds=time.perf_counter() - started,
    )
    logger.debug(
        "GHN-orth transformed %d of %d layers from layer %d in %.3f s",
        len(transformed), num_layers, start_layer, report.seconds,
    )
    return report
