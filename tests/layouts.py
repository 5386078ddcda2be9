"""Write a timm ConvNeXt-V2 state dict in the other toolboxes' layouts (the inverse of formats.py).

Checked against the real files in shared/fixtures (test_formats.py), then used to make
checkpoints of every size in every layout.
"""

from __future__ import annotations

import re

import torch


def _common(key: str) -> str:
    key = re.sub(r"^stem\.", "downsample_layers.0.", key)
    key = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
    return re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)


def _linear(key: str, v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1) if re.search(r"mlp\.fc[12]\.weight$", key) else v  # 1x1 conv -> Linear


def to_mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        v = _linear(k, v)
        if k.startswith("head.fc."):
            out[k] = v
            continue
        k = _common(k).replace(".conv_dw.", ".depthwise_conv.").replace(
            ".mlp.fc1.", ".pointwise_conv1.").replace(".mlp.fc2.", ".pointwise_conv2.").replace(
            ".mlp.grn.weight", ".grn.gamma").replace(".mlp.grn.bias", ".grn.beta")
        k = re.sub(r"^head\.norm\.", "norm3.", k)
        out["backbone." + k] = v
    return out


def to_official(sd: dict[str, torch.Tensor], grn_shape: str = "1,1,1,C") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        v = _linear(k, v)
        k = _common(k).replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(
            ".mlp.fc2.", ".pwconv2.").replace(".mlp.grn.weight", ".grn.gamma").replace(
            ".mlp.grn.bias", ".grn.beta")
        k = re.sub(r"^head\.norm\.", "norm.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        if ".grn." in k:
            v = v.reshape(1, 1, 1, -1) if grn_shape == "1,1,1,C" else v.reshape(1, -1)
        out[k] = v
    return out


def to_official_fcmae_raw(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A raw FCMAE pre-training dump: sparse encoder tensors plus decoder parts."""
    dense = to_official({k: v for k, v in sd.items() if not k.startswith("head.")}, "1,C")
    out = {}
    for k, v in dense.items():
        m = re.match(r"^(downsample_layers\.[123]\.1|stages\.\d+\.\d+\.dwconv)\.(weight|bias)$", k)
        if m and m.group(2) == "weight":
            if v.shape[1] == 1 and "dwconv" in k:  # (C,1,k,k) -> (k*k, C)
                v = v.transpose(3, 2).reshape(v.shape[0], -1).permute(1, 0)
            else:  # (out,in,k,k) -> (k*k, in, out)
                v = v.transpose(3, 2).reshape(v.shape[0], v.shape[1], -1).permute(2, 1, 0)
            k = m.group(1) + ".kernel"
        elif m:
            v = v.reshape(1, -1)
        elif re.match(r"^(downsample_layers\.[123]\.0|stages\.\d+\.\d+\.norm)\.", k):
            k = k.rsplit(".", 1)[0] + ".ln." + k.rsplit(".", 1)[1]
        elif re.search(r"\.pwconv[12]\.", k):
            k = k.rsplit(".", 1)[0] + ".linear." + k.rsplit(".", 1)[1]
        out["encoder." + k] = v.contiguous()
    out["mask_token"] = torch.zeros(1, 512, 1, 1)
    out["proj.weight"] = torch.zeros(512, 320, 1, 1)
    out["decoder.0.dwconv.weight"] = torch.zeros(512, 1, 7, 7)
    out["pred.weight"] = torch.zeros(3072, 512, 1, 1)
    return out
