"""LPIPS similarity, reported as ``1 - LPIPS`` (the ``lpips`` package, AlexNet trunk by default).

Preprocessing: the shorter side is resized to ``size`` (256 by default; bilinear with antialiasing), the centre
``size x size`` is kept, and pixel values go to ``[-1, 1]`` (LPIPS's input convention; its own scaling layer
follows inside the model). Both sets of a pair are therefore compared at the same resolution.

:meth:`LpipsBackend.pairwise` computes the distance of every pair from per-image features, each image through
the trunk once: with unit-normalised trunk features ``f`` of layer ``l`` and the non-negative linear weights
``w_l``, ``d(a, b) = sum_l mean_hw sum_c w_lc (f_a - f_b)^2``, expanded into norms and one matrix product. It
equals ``lpips.LPIPS.forward`` on each pair.

Weights: the linear layers ship with the ``lpips`` package (``lpips/weights/v0.1/<net>.pth``); the trunk is
torchvision's ImageNet checkpoint (``alexnet-owt-7be5be79.pth`` for ``alex``), looked for in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) and otherwise downloaded by torch (never offline, ``HF_HUB_OFFLINE=1``).
``eval.lpips_weights`` may name that trunk checkpoint, or a full LPIPS state dict (``net.*`` and ``lin*`` keys).
Files are read with ``weights_only=True`` (or as safetensors).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import (FeatureCache, Images, MetricWeightsMissing, check_not_empty, chunks, first_line, num_images, offline,
                   to_uint8_list)

DEFAULT_NET = "alex"
DEFAULT_SIZE = 256
TRUNK_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


def to_lpips_input(images: Images, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """float32 ``[n, 3, size, size]`` in ``[-1, 1]``: shorter side resized to ``size``, centre crop."""
    out = []
    for a in to_uint8_list(images):
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            s = size / min(h, w)
            nh, nw = max(size, round(h * s)), max(size, round(w * s))
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size]
        out.append(x.clamp(0, 1) * 2 - 1)
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


class LpipsBackend:
    """``1 - LPIPS`` of every pair. ``model``: an ``lpips.LPIPS`` (v0.1, with linear layers)."""

    name = "lpips"
    kind = "similarity"

    def __init__(self, model: torch.nn.Module, *, size: int = DEFAULT_SIZE, label: str = "", random_init: bool = False,
                 device: str | torch.device = "cpu", batch: int = 16):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.size = int(size)
        self.label = label or "lpips"
        self.random_init = bool(random_init)
        self.batch = int(batch)
        self.cache = FeatureCache()

    def preprocess(self, images: Images) -> torch.Tensor:
        return to_lpips_input(images, self.size)

    def _weights(self) -> list[torch.Tensor]:
        return [lin.model[-1].weight.detach().float().view(-1).cpu() for lin in self.model.lins]

    def _compute(self, images: Images) -> list[torch.Tensor]:
        import lpips

        per_layer: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for part in chunks(to_uint8_list(images), self.batch):
                x = self.model.scaling_layer(to_lpips_input(part, self.size).to(self.device))
                feats = self.model.net.forward(x)
                for i, f in enumerate(feats):
                    if len(per_layer) <= i:
                        per_layer.append([])
                    per_layer[i].append(lpips.normalize_tensor(f).float().cpu())
        return [torch.cat(v) for v in per_layer]

    def layer_features(self, images: Images) -> list[torch.Tensor]:
        """Unit-normalised trunk features per layer, ``[n, C_l, H_l, W_l]`` (cached by the images' pixels)."""
        return self.cache.get(images, self._compute)

    def pairwise(self, a: Images, b: Images) -> torch.Tensor:
        """LPIPS distance of every pair, ``[len(a), len(b)]`` (float32)."""
        na, nb = num_images(a), num_images(b)
        if na == 0 or nb == 0:
            return torch.zeros(na, nb)
        fa, fb = self.layer_features(a), self.layer_features(b)
        d = torch.zeros(na, nb, dtype=torch.float64)
        for w, xa, xb in zip(self._weights(), fa, fb):
            hw = xa.shape[-1] * xa.shape[-2]
            w4 = w.view(1, -1, 1, 1)
            sa = (w4 * xa.square()).sum(dim=(1, 2, 3)).double() / hw
            sb = (w4 * xb.square()).sum(dim=(1, 2, 3)).double() / hw
            cross = ((xa * w4).flatten(1) @ xb.flatten(1).T).double() / hw
            d += sa[:, None] + sb[None, :] - 2 * cross
        return d.float()

    def pair_matrix(self, a: Images, b: Images) -> torch.Tensor:
        """``1 - LPIPS`` of every pair, ``[len(a), len(b)]``."""
        return 1.0 - self.pairwise(a, b)

    def mean_similarity(self, a: Images, b: Images) -> float:
        """``M(a, b)``: the mean of ``1 - LPIPS`` over all pairs."""
        check_not_empty(a)
        check_not_empty(b)
        return float(self.pair_matrix(a, b).double().mean())


# ----------------------------------------------------------------------------------------------- loading


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict")
    return state


def _trunk_to_lpips(model: torch.nn.Module, trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``features.<i>.<p>`` keys -> lpips ``net.slice<k>.<i>.<p>`` keys."""
    out = {}
    for key in model.net.state_dict():
        _, index, rest = key.split(".", 2)
        out[f"net.{key}"] = trunk[f"features.{index}.{rest}"]
    return out


def _package_lins(net: str) -> dict[str, torch.Tensor]:
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise MetricWeightsMissing(f"LPIPS linear layers ({net}) not found at {path}; reinstall the lpips package "
                                   f"or give an LPIPS state dict: --set eval.lpips_weights=/path/to/lpips_{net}.pth")
    return _read(path)


def _trunk(net: str, cache_dir: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    url = TRUNK_URLS[net]
    name = os.path.basename(url)
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    how = (f"provide it with --set eval.lpips_weights=/path/to/{name} or copy it into {folder} "
           f"(from {url}; the linear layers ship with the lpips package)")
    what = f"LPIPS trunk weights ({net}: torchvision ImageNet checkpoint {name})"
    if (folder / name).is_file():
        return _read(folder / name)
    if offline():
        raise MetricWeightsMissing(f"{what} not found offline (HF_HUB_OFFLINE=1): looked for {folder / name}; {how}")
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(folder), map_location="cpu", progress=False,
                                                  check_hash=True, weights_only=True)
    except Exception as e:  # URLError without network, hash mismatch, ...
        raise MetricWeightsMissing(f"{what} not found: looked for {folder / name}, and the download failed "
                                   f"({first_line(e, 100)}); {how}") from e


def lpips_state(model: torch.nn.Module, net: str, weights: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The full state dict (trunk ``net.*`` + linear ``lin*``) of an ``lpips.LPIPS`` of ``net``."""
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise MetricWeightsMissing(f"LPIPS weights ({net}) not found: eval.lpips_weights={weights} is not a file; "
                                       f"give the torchvision checkpoint {os.path.basename(TRUNK_URLS[net])} or a "
                                       f"full LPIPS state dict")
        state = _read(path)
        if any(k.startswith("features.") for k in state):
            return {**_trunk_to_lpips(model, state), **_package_lins(net)}
        if any(k.startswith("net.") for k in state):
            return state if any(k.startswith("lin") for k in state) else {**state, **_package_lins(net)}
        raise ValueError(f"{path}: neither a torchvision {net} checkpoint (features.*) nor an LPIPS state dict (net.*)")
    return {**_trunk_to_lpips(model, _trunk(net, cache_dir)), **_package_lins(net)}


def load_lpips(net: str = DEFAULT_NET, weights: str | None = None, *, device: str | torch.device = "cpu",
               random_init: bool = False, cache_dir: str | os.PathLike | None = None, size: int = DEFAULT_SIZE,
               batch: int = 16) -> LpipsBackend:
    """An :class:`LpipsBackend` with trunk ``net`` (``alex``, ``vgg``, ``squeeze``).

    ``cache_dir``: the folder of torchvision checkpoints (default ``$TORCH_HOME/hub/checkpoints``).
    ``random_init``: trunk and linear layers randomly initialised, nothing read (tests only).
    """
    import lpips

    if net not in TRUNK_URLS:
        raise ValueError(f"unknown LPIPS net '{net}'; choose from {', '.join(TRUNK_URLS)}")
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    if not random_init:
        state = lpips_state(model, net, weights, cache_dir)
        # lpips keeps its linear layers twice (lin0.. and the ModuleList lins.0..): the first names are the files'
        expected = {k for k in model.state_dict() if not k.startswith(("scaling_layer.", "lins."))}
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"LPIPS weights for '{net}' lack {len(missing)} tensors, e.g. {missing[0]}")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    label = f"lpips {net}" + (" (random init)" if random_init else "")
    return LpipsBackend(model, size=size, label=label, random_init=random_init, device=device, batch=batch)
