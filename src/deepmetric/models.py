"""Embedding networks: backbones, embedding heads and Siamese / triplet / joint wrappers.

Shapes use ``B`` for the batch size. Image backbones take ``(B, C, H, W)``; the MLP takes
``(B, D)``. Every backbone returns ``(B, out_features)`` and declares what it expects through
``input_ndim`` and ``in_channels`` (CNNs) or ``in_features`` (MLP), so that
:class:`EmbeddingNet` can reject badly shaped inputs with a readable error: the contract is
:class:`Backbone` (and :class:`MapReadout` for a convolutional map readout). The built-in
backbones are registered by name in :data:`BACKBONES` (``model.backbone``), each entry with its
options and its first layer; :func:`register_backbone` adds one.

Wrappers (:class:`SiameseNet`, :class:`TripletNet`, :class:`JointNet`) hold one
:class:`EmbeddingNet` and call that very module for every branch, so all branches share one
set of weights.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.checks import positive_int

__all__ = [
    "BACKBONES",
    "INPUT_SIZE",
    "MLP",
    "MODEL_BUILDERS",
    "Backbone",
    "BackboneEntry",
    "BasicBlock",
    "ClassifierHead",
    "EmbeddingNet",
    "JointNet",
    "MapReadout",
    "ResNetSmall",
    "SiameseNet",
    "SmallCNN",
    "TripletNet",
    "VGGSmall",
    "build_backbone",
    "build_registered",
    "declared_input",
    "embed",
    "embedding_part",
    "embedding_state",
    "first_layer_keys",
    "projections",
    "register_backbone",
    "register_model",
]


class Batchable(Protocol):
    """A sized sequence of inputs whose slices ``x[i:j]`` are tensors."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> torch.Tensor: ...


@runtime_checkable
class Backbone(Protocol):
    """What :class:`EmbeddingNet` needs of a backbone, and what every registered one declares.

    - ``out_features``: the width of its output ``(B, out_features)`` (the one requirement:
      ``EmbeddingNet`` refuses a module without it);
    - ``input_ndim``: the dimensions of an input batch, 4 for images ``(B, C, H, W)``, 2 for
      vectors ``(B, F)``;
    - the input size, its dim 1, in the attribute :data:`INPUT_SIZE` names for that
      ``input_ndim``: ``in_channels`` (C) for images, ``in_features`` (F) for vectors.

    With the last two declared, ``EmbeddingNet`` checks every input and names the expected
    shape (see :func:`declared_input`). A backbone that can also hand out its last
    convolutional map is a :class:`MapReadout` as well.
    """

    out_features: int
    input_ndim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class MapReadout(Protocol):
    """A backbone whose last convolutional map can be read out with its features
    (``model.conv_readout``): ``forward_with_map(x) -> (map (B, map_features), features
    (B, out_features))``."""

    map_features: int

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


#: the attribute holding a backbone's input size (dim 1 of its input) for each ``input_ndim``
INPUT_SIZE: dict[int, str] = {4: "in_channels", 2: "in_features"}


def declared_input(backbone: nn.Module) -> tuple[int | None, int | None]:
    """``(input_ndim, input size)`` a backbone declares (see :class:`Backbone`); None for what
    it leaves out, which is then not checked."""
    ndim = getattr(backbone, "input_ndim", None)
    if isinstance(ndim, bool) or not isinstance(ndim, int):
        return None, None
    size = getattr(backbone, INPUT_SIZE.get(ndim, ""), None)
    return ndim, size if isinstance(size, int) and not isinstance(size, bool) else None


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Two-layer CNN after the classic MNIST triplet example.

    ``conv(32, 3x3) -> ReLU -> maxpool(2) -> conv(64, 3x3) -> ReLU -> maxpool(2)
    -> adaptive avg pool to S x S -> flatten -> Linear(64 S^2, 256) -> ReLU``.

    ``padding=0`` is the classic network: 28 -> 26 -> 13 -> 11 -> 5, so S = 5. ``padding=1``
    keeps the border: 28 -> 28 -> 14 -> 14 -> 7, S = 7 (1.6x the multiply-adds; on
    Fashion-MNIST the better network, see ``configs/fashion_mnist.yaml``). With
    ``batch_norm=True`` a BatchNorm2d follows each convolution (before the ReLU). For 28x28
    inputs the feature map is already S x S and the adaptive pool is skipped; larger inputs
    (any ``H, W >= 28``) are pooled down to S x S.

    For CPU speed the max-pool runs before the ReLU (the two commute, so the function is
    the same, with 4x less ReLU work) and the convolutions run in ``channels_last`` memory
    format (weights are stored that way; inputs are converted in ``forward``).

    Input ``(B, in_channels, H, W)``, output ``(B, 256)``.
    """

    input_ndim: int = 4
    out_features: int

    def __init__(self, in_channels: int = 1, batch_norm: bool = False, padding: int = 0) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        if padding not in (0, 1):
            raise ValueError(f"padding must be 0 or 1, got {padding!r}")
        self.in_channels = in_channels
        self.batch_norm = batch_norm
        self.padding = padding
        self.out_features = 256
        #: side of the last feature map for a 28x28 input (and of the adaptive pool)
        self.side = 7 if padding else 5

        def conv_block(c_in: int, c_out: int) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, 3, padding=padding, bias=not batch_norm)
            layers: list[nn.Module] = [conv]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            # max-pool then ReLU == ReLU then max-pool (ReLU is monotone), but cheaper.
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.conv1 = conv_block(in_channels, 32)
        self.conv2 = conv_block(32, 64)
        self.pool = nn.AdaptiveAvgPool2d((self.side, self.side))
        self.fc = nn.Sequential(
            nn.Linear(64 * self.side**2, self.out_features), nn.ReLU(inplace=True)
        )
        self.to(memory_format=torch.channels_last)

    @property
    def map_features(self) -> int:
        """Size of the last convolution's map, flattened: ``64 S^2``."""
        return 64 * self.side**2

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W) -> (map (B, 64 S^2), features (B, 256))``: the last convolution's
        map (after its ReLU and pool), flattened, and what :meth:`forward` returns."""
        x = self.conv2(self.conv1(x.contiguous(memory_format=torch.channels_last)))
        if x.shape[-2:] != (self.side, self.side):
            x = self.pool(x)
        flat = torch.flatten(x, 1)
        return flat, self.fc(flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 256)``."""
        return self.forward_with_map(x)[1]


class VGGSmall(nn.Module):
    """Small VGG-style CNN: three stages of two ``conv3x3 -> BatchNorm -> ReLU``, widths
    ``(16, 32, 64)``, a 2x2 max-pool after the first two stages, then ``Linear(64 * 7 * 7,
    256) -> ReLU``: 28 -> 14 -> 7. Six convolutions for about 1.7x the time of
    :class:`SmallCNN` (two); on Fashion-MNIST the better network (see
    ``configs/fashion_mnist.yaml``). Inputs larger than 28x28 (any ``H, W >= 28``) are
    average-pooled to 7 x 7 before the linear layer. Runs in ``channels_last``; the pool runs
    before the last ReLU of a stage (they commute: the same function, cheaper).

    Input ``(B, in_channels, H, W)``, output ``(B, 256)``.
    """

    input_ndim: int = 4
    out_features: int

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        widths = tuple(widths)
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        for w in widths:
            positive_int("each width", w)
        self.in_channels = in_channels
        self.widths = widths
        self.out_features = 256
        layers: list[nn.Module] = []
        prev = in_channels
        for stage, width in enumerate(widths):
            for conv in range(2):
                layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
                if conv == 1 and stage < 2:
                    layers.append(nn.MaxPool2d(2))
                layers.append(nn.ReLU(inplace=True))
                prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Sequential(
            nn.Linear(widths[-1] * 49, self.out_features), nn.ReLU(inplace=True)
        )
        self.to(memory_format=torch.channels_last)

    @property
    def map_features(self) -> int:
        """Size of the last stage's map, flattened: ``widths[-1] * 7 * 7``."""
        return self.widths[-1] * 49

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W) -> (map (B, widths[-1] * 49), features (B, 256))``: the last
        stage's map, flattened, and what :meth:`forward` returns."""
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        if x.shape[-2:] != (7, 7):
            x = self.pool(x)
        flat = torch.flatten(x, 1)
        return flat, self.fc(flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 256)``."""
        return self.forward_with_map(x)[1]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BatchNorm with an identity (or 1x1 projection) skip.

    Input ``(B, in_channels, H, W)``, output ``(B, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetSmall(nn.Module):
    """Small residual CNN for RGB / larger images.

    Stem ``conv3x3(widths[0]) + BN + ReLU``, then one stage of ``blocks_per_stage`` basic
    blocks per entry of ``widths`` (stride 2 at the start of every stage but the first),
    then global average pooling. Runs in ``channels_last`` memory format (faster on CPU).

    Input ``(B, in_channels, H, W)``, output ``(B, widths[-1])``.
    """

    input_ndim: int = 4
    out_features: int

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("blocks_per_stage", blocks_per_stage)
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must contain at least one stage width")
        for w in widths:
            positive_int("each width", w)
        self.in_channels = in_channels
        self.widths = widths
        self.out_features = widths[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        prev = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(prev, w, stride))
                prev = w
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, widths[-1])``."""
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        return torch.flatten(self.pool(self.stages(x)), 1)


class MLP(nn.Module):
    """Fully connected network ``Linear + ReLU`` per hidden size, for vectors.

    Input ``(B, in_features)``, output ``(B, hidden[-1])`` (``(B, in_features)`` when
    ``hidden`` is empty: the MLP is then the identity).
    """

    input_ndim: int = 2
    out_features: int

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        positive_int("in_features", in_features)
        hidden = tuple(hidden)
        for h in hidden:
            positive_int("each hidden size", h)
        self.in_features = in_features
        self.hidden = hidden
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        self.net = nn.Sequential(*layers)
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_features) -> (B, out_features)``."""
        return self.net(x)


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone by name (``model.backbone``).

    ``factory(in_channels=C, **options)`` (``input_ndim`` 4: images) or
    ``factory(in_features=F, **options)`` (``input_ndim`` 2: vectors) builds it (a
    :class:`Backbone`); ``options``: the ``model.*`` config keys it also takes, each with what
    it means; ``first_layer``: the key of its first layer's weight in its state dict, shaped
    ``(out, C or F, ...)``, which gives the input size of a run saved without
    ``preprocess.json``; ``map_readout``: it is a :class:`MapReadout` (``model.conv_readout``).
    """

    factory: Callable[..., nn.Module]
    input_ndim: int
    first_layer: str
    options: Mapping[str, str] = field(default_factory=dict)
    map_readout: bool = False

    def build(self, input_size: int, **options: object) -> nn.Module:
        """The backbone for inputs of this size (channels or features) with ``options``."""
        return self.factory(**{INPUT_SIZE[self.input_ndim]: input_size}, **options)


#: The backbones by name, the table behind ``model.backbone`` (in the order the config lists
#: them); :func:`register_backbone` adds one.
BACKBONES: dict[str, BackboneEntry] = {
    "small_cnn": BackboneEntry(
        SmallCNN,
        input_ndim=4,
        first_layer="conv1.0.weight",
        options={
            "batch_norm": "BatchNorm after each convolution",
            "padding": "1 keeps the border (28 -> 14 -> 7), 0 is the classic network (-> 5)",
        },
        map_readout=True,
    ),
    "vgg_small": BackboneEntry(
        VGGSmall, input_ndim=4, first_layer="features.0.weight", map_readout=True
    ),
    "resnet_small": BackboneEntry(ResNetSmall, input_ndim=4, first_layer="stem.0.weight"),
    "mlp": BackboneEntry(MLP, input_ndim=2, first_layer="net.0.weight"),
}


def register_backbone(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_ndim: int,
    first_layer: str,
    options: Mapping[str, str] | None = None,
    map_readout: bool = False,
    replace: bool = False,
) -> BackboneEntry:
    """Register a backbone under ``name`` (see :class:`BackboneEntry` for the fields), so
    that ``model.backbone=NAME`` builds it; ``replace=True`` replaces an entry of that name
    (else a ``ValueError``). tests/test_registry.py checks every registered backbone against
    the :class:`Backbone` contract."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a backbone name is a word such as my_cnn, got {name!r}")
    if name in BACKBONES and not replace:
        raise ValueError(f"backbone {name!r} is registered already: pass replace=True")
    if input_ndim not in INPUT_SIZE:
        raise ValueError(f"input_ndim must be one of {sorted(INPUT_SIZE)}, got {input_ndim!r}")
    entry = BackboneEntry(factory, input_ndim, first_layer, dict(options or {}), map_readout)
    BACKBONES[name] = entry
    return entry


def build_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build the backbone registered in :data:`BACKBONES` under ``name`` with ``kwargs``.

    Raises ``ValueError`` (listing the valid names) for an unknown name.
    """
    try:
        entry = BACKBONES[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r}; valid names: {valid}") from None
    return entry.factory(**kwargs)


class _FirstLayers(Mapping[str, str]):
    """name -> the key of that backbone's first layer in an :class:`EmbeddingNet`'s state
    dict, for every registered backbone (a live view of :data:`BACKBONES`)."""

    def __getitem__(self, name: str) -> str:
        return "backbone." + BACKBONES[name].first_layer  # EmbeddingNet.backbone

    def __iter__(self) -> Iterator[str]:
        return iter(BACKBONES)

    def __len__(self) -> int:
        return len(BACKBONES)


def first_layer_keys() -> Mapping[str, str]:
    """The first layer of every registered backbone, as a key of an :class:`EmbeddingNet`'s
    state dict (``backbone.conv1.0.weight`` for small_cnn): a live view of :data:`BACKBONES`."""
    return _FirstLayers()


# --------------------------------------------------------------------------------------------
# Embedding and wrappers
# --------------------------------------------------------------------------------------------


def _expected_shape(ndim: int, size1: int | None) -> str:
    """Human readable expected shape, e.g. ``(B, 1, H, W)``, ``(B, 784)`` or ``(B, ...)``."""
    if ndim == 4:
        return f"(B, {'C' if size1 is None else size1}, H, W)"
    if ndim == 2:
        return f"(B, {'D' if size1 is None else size1})"
    return "(" + ", ".join(["B"] + ["_"] * (ndim - 1)) + ")"


class EmbeddingNet(nn.Module):
    """``backbone -> Linear(backbone.out_features, dim) -> optional L2 normalisation``.

    The backbone must have an integer ``out_features``. If it also declares ``input_ndim``
    and ``in_channels`` / ``in_features`` (all backbones here do: see :class:`Backbone`),
    inputs are checked and a mismatch raises ``ValueError`` naming the expected and the
    received shape.

    With ``mirror=True`` (images only) the network in eval mode embeds each image and its
    mirror image (flipped left-right) in one forward pass and returns the mean of the two
    projections, ``e(x) = (fc(f(x)) + fc(f(flip(x)))) / 2``, then normalises: the embedding
    of an image and of its mirror image are then the same, as they are for the flip-averaged
    features of face recognition. Training (train mode) embeds each image once, as it is.

    With ``projection_head=True`` the ``Linear`` is a head for training only, as in SimCLR
    (Chen et al. 2020: the features before the head carry over to other tasks better than its
    outputs): train mode returns ``normalize(fc(f(x)))`` (``dim`` wide) for the loss, eval mode
    returns ``normalize(f(x))`` (``backbone.out_features`` wide; ``self.dim`` says which), or
    the head's outputs again while ``self.project`` is true (see :func:`projections`). With
    ``conv_readout=True`` as well (a backbone with ``forward_with_map``: SmallCNN, VGGSmall),
    the eval embedding also holds the last convolutional map: ``normalize([normalize(f(x)),
    normalize(map(x))])``, ``out_features + map_features`` wide (256 + 3,136 for SmallCNN):
    the convolutions, which specialise least, carry over to new classes best.

    Input: whatever the backbone takes, e.g. ``(B, C, H, W)``; output ``(B, dim)`` with unit
    L2 norm rows when ``normalize`` is true.
    """

    def __init__(
        self,
        backbone: Backbone | nn.Module,
        dim: int = 128,
        normalize: bool = True,
        mirror: bool = False,
        projection_head: bool = False,
        conv_readout: bool = False,
    ) -> None:
        super().__init__()
        out_features = getattr(backbone, "out_features", None)
        if isinstance(out_features, bool) or not isinstance(out_features, int):
            raise TypeError("backbone must have an integer attribute 'out_features'")
        positive_int("dim", dim)
        self.backbone = backbone
        self.fc = nn.Linear(out_features, dim)
        self.projection_head = projection_head
        #: width of the head's outputs (what the loss sees in training)
        self.projection_dim = dim
        if conv_readout and not projection_head:
            raise ValueError("conv_readout=True reads out before the head: needs projection_head")
        if conv_readout and not (isinstance(backbone, MapReadout) and backbone.map_features):
            raise ValueError(
                f"conv_readout=True needs a backbone with forward_with_map and map_features "
                f"(SmallCNN, VGGSmall), not {type(backbone).__name__}"
            )
        self.conv_readout = conv_readout
        #: width of the embeddings in eval mode
        self.dim = out_features if projection_head else dim
        if conv_readout:
            self.dim += int(backbone.map_features)  # type: ignore[union-attr]
        #: eval mode with a projection head: return the head's outputs (validation loss)
        self.project = False
        self.normalize = normalize
        # Declared input expectation (None: unknown, not checked).
        self.input_ndim, self._input_size1 = declared_input(backbone)
        if mirror and self.input_ndim not in (None, 4):
            raise ValueError("mirror=True averages an image with its mirror image: needs images")
        self.mirror = mirror

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` does not match the backbone's declared input shape."""
        ndim = self.input_ndim
        if ndim is None:
            return
        size1 = self._input_size1
        if x.dim() != ndim or (size1 is not None and x.shape[1] != size1):
            raise ValueError(
                f"{type(self.backbone).__name__} expects input of shape "
                f"{_expected_shape(ndim, size1)}, got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x -> (B, dim)``."""
        self.check_input(x)
        head = self.training or self.project or not self.projection_head
        if self.mirror and not self.training:
            both = self._embed(torch.cat([x, x.flip(-1)]), head)  # (2B, D)
            e = both.unflatten(0, (2, -1)).mean(0)  # a symbolic batch size stays symbolic
        else:
            e = self._embed(x, head)
        return F.normalize(e, p=2.0, dim=1) if self.normalize else e

    def _embed(self, x: torch.Tensor, head: bool) -> torch.Tensor:
        """The head's outputs, or the readout before it (features, with the map)."""
        if head:
            return self.fc(self.backbone(x))
        if not self.conv_readout:
            return self.backbone(x)
        conv_map, features = self.backbone.forward_with_map(x)  # a MapReadout
        return torch.cat([F.normalize(features, dim=1), F.normalize(conv_map, dim=1)], 1)


@contextlib.contextmanager
def projections(model: nn.Module) -> Iterator[None]:
    """Inside, every :class:`EmbeddingNet` in ``model`` with a projection head returns the
    head's outputs in eval mode too (what its loss was trained on)."""
    nets = [m for m in model.modules() if isinstance(m, EmbeddingNet) and m.projection_head]
    for m in nets:
        m.project = True
    try:
        yield
    finally:
        for m in nets:
            m.project = False


def _shared_forward(net: nn.Module, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``net`` applied once to the concatenated ``parts``, split back: every branch goes through
    the same forward pass (with BatchNorm, the same batch statistics), as one network should."""
    sizes = [len(p) for p in parts]
    return tuple(net(torch.cat(parts)).split(sizes))


def module_device(net: nn.Module) -> torch.device | None:
    """The device of ``net``'s first parameter (or buffer); ``None`` for a network without
    either."""
    for tensor in itertools.chain(net.parameters(), net.buffers()):
        return tensor.device
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` (the current GPU) and ``cuda:N`` name the same device when N is the current."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return a.index == b.index


@torch.no_grad()
def embed(
    net: nn.Module,
    x: torch.Tensor | Batchable,
    device: torch.device | str | None = None,
    *,
    batch: int = 1024,
) -> torch.Tensor:
    """(N, dim) float32 embeddings of ``x`` (N, ...) in eval mode, returned on the CPU, computed
    ``batch`` inputs at a time on ``device``; the module's train / eval mode is restored.
    ``x`` is a tensor or anything whose slices are tensors (``ArrayDataset.inputs``: uint8
    pixels are then converted one batch at a time).

    ``device=None``: where the network's parameters are (the CPU for a network without any).
    A network whose parameters are elsewhere than ``device`` is a ``ValueError`` (move it with
    ``net.to(device)`` first): ``embed`` never moves a caller's network behind its back."""
    where = module_device(net)
    device = where if device is None else torch.device(device)
    if where is not None and not _same_device(where, device):
        raise ValueError(
            f"the network is on {where}, the inputs would go to {device}: move it first "
            f"(net.to({str(device)!r})) or pass device={str(where)!r}"
        )
    was_training = net.training
    net.eval()
    try:
        out = [net(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, getattr(net, "dim", 0))


class SiameseNet(nn.Module):
    """Two branches through one shared :class:`EmbeddingNet`.

    ``forward(x1, x2) -> (e1, e2)``, each ``(B, dim)``.
    """

    def __init__(self, embedding_net: EmbeddingNet) -> None:
        super().__init__()
        self.embedding_net = embedding_net

    @property
    def dim(self) -> int:
        return self.embedding_net.dim

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass over ``cat([x1, x2])``, so BatchNorm sees one batch of 2B."""
        e1, e2 = _shared_forward(self.embedding_net, x1, x2)
        return e1, e2

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``x -> (B, dim)``."""
        return self.embedding_net(x)


class TripletNet(nn.Module):
    """Anchor / positive / negative branches through one shared :class:`EmbeddingNet`.

    ``forward(a, p, n) -> (ea, ep, en)``, each ``(B, dim)``; with ``concat=True`` a single
    ``(B, 3 * dim)`` tensor ``[ea | ep | en]`` (as in the Keras triplet model).
    """

    def __init__(self, embedding_net: EmbeddingNet, concat: bool = False) -> None:
        super().__init__()
        self.embedding_net = embedding_net
        self.concat = concat

    @property
    def dim(self) -> int:
        return self.embedding_net.dim

    def forward(
        self, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
        ea, ep, en = _shared_forward(self.embedding_net, a, p, n)  # one pass: one set of BN stats
        if self.concat:
            return torch.cat((ea, ep, en), dim=1)
        return ea, ep, en

    def get_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``x -> (B, dim)``."""
        return self.embedding_net(x)


class ClassifierHead(nn.Module):
    """Linear classifier on embeddings: ``(B, dim) -> (B, num_classes)`` logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        positive_int("dim", dim)
        positive_int("num_classes", num_classes)
        self.dim = dim
        self.num_classes = num_classes
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc(e)


class JointNet(nn.Module):
    """Embedding plus a classifier on that embedding, for joint softmax + triplet training.

    ``forward(x) -> (embeddings (B, dim), logits (B, num_classes))``.
    """

    def __init__(self, embedding_net: EmbeddingNet, num_classes: int) -> None:
        super().__init__()
        self.embedding_net = embedding_net
        self.head = ClassifierHead(embedding_net.dim, num_classes)

    @property
    def dim(self) -> int:
        return self.embedding_net.dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embedding_net(x)
        return e, self.head(e)


# --------------------------------------------------------------------------------------------
# Registered models: how a run of ``fit`` with a network of its own is rebuilt later
# --------------------------------------------------------------------------------------------

#: name -> function returning a fresh (untrained) embedding network; filled by
#: :func:`register_model` when the module defining the network is imported.
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


#: The views that share one embedding network (``embedding_net``) with something around it.
WithEmbeddingNet = SiameseNet | TripletNet | JointNet
EMBEDDING_PREFIX = "embedding_net."


def embedding_part(model: nn.Module) -> nn.Module:
    """The part of ``model`` that maps inputs to embeddings: a Siamese, triplet or joint
    view's shared ``embedding_net`` (the classifier head dropped), else ``model`` itself."""
    return model.embedding_net if isinstance(model, WithEmbeddingNet) else model


def embedding_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of :func:`embedding_part` in a saved state dict: the ``embedding_net.``
    entries with that prefix removed (a joint run's head left out) when there are any,
    else ``state`` as it is."""
    if not any(k.startswith(EMBEDDING_PREFIX) for k in state):
        return state
    n = len(EMBEDDING_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(EMBEDDING_PREFIX)}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(**args) -> nn.Module`` under ``name``, so that a run trained
    with ``fit(..., builder=name, builder_args=args)`` can be rebuilt by ``deepmetric
    evaluate`` (``--import MODULE`` imports the module that registers it). Only functions
    registered by code you import are ever called: a run folder cannot name arbitrary code.

    Example::

        @register_model("my_cnn")
        def my_cnn(dim: int = 64) -> nn.Module: ...
    """

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODEL_BUILDERS[name] = fn
        return fn

    return register


def build_registered(name: str, **args: object) -> nn.Module:
    """``MODEL_BUILDERS[name](**args)``, with a clear error when ``name`` is not registered."""
    if name not in MODEL_BUILDERS:
        known = ", ".join(sorted(MODEL_BUILDERS)) or "none"
        raise ValueError(
            f"model builder {name!r} is not registered (registered: {known}); import the "
            "module that registers it (deepmetric evaluate --import MODULE)"
        )
    return MODEL_BUILDERS[name](**args)
