"""The dissipating-inputs probe: how much of the input survives each layer (PNNH.md section 5).

``probe_model`` runs a batch (and a matched noise batch) through a model with forward hooks on
its feature layers and returns one value per layer for every measure. Each layer's output is
reduced to an n x n Gram matrix and a few statistics inside its hook, so a 56-layer net at
batch 256 never holds all feature maps at once.

The noise floor of a measure is its value for the same layer's features of a random-noise
input, scored against the real input: what the measure reports for a representation of the
same net that carries nothing of the input. (The measure of the noise input against its own
features, "how much of a noise input the net keeps", is reported as ``*_noise_self``. It is
not a floor: iid noise images are nearly orthogonal to each other, and a net that keeps them
apart keeps CKA(noise, features) high; on Fashion-MNIST it stays above the real input's CKA
at every layer of plain56, resnet56 and pnnh56 alike.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.probe.dists import DISTS, gray_image
from pnnh.probe.hooks import capture, feature_layers, preserved_state
from pnnh.probe.metrics import (activation_stats, cka_from_grams, count_sketch, flatten, gram,
                                ridge_recoverability)

# A layer within this distance of the noise floor has reached it. About one standard deviation
# of the floors over seeds (init, image subset and noise draw together; Fashion-MNIST, n = 256,
# 56-layer nets): CKA floor 0.006-0.025, recoverability floor 0.001-0.007.
CROSSING_MARGIN = 0.02


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with the per-channel (dim 1) mean and std of ``x``."""
    dims = [d for d in range(x.ndim) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return mean + std * z


def _forward(model: nn.Module, layers, x: torch.Tensor, *, max_features: int | None, seed: int,
             dists: DISTS | None, reference: torch.Tensor | None, keep_outputs: bool):
    """One forward pass; per layer: the feature Gram, activation stats, DISTS to the
    ``reference`` images, and (``keep_outputs``) the output tensor itself for a backward pass.
    Returns (model output, per-layer records)."""
    records: list[dict] = [{} for _ in layers]
    size = tuple(x.shape[-2:])

    def on_output(i: int, out: torch.Tensor) -> None:
        with torch.no_grad():
            f = out.detach()
            rec = records[i]
            rec["shape"] = list(f.shape[1:])
            rec.update(activation_stats(f))
            rec["gram"] = _gram(f, max_features, seed, stream=i + 1)
            if dists is not None and f.ndim == 4 and f.shape[-1] * f.shape[-2] > 1:
                rec["image"] = gray_image(f[:len(reference)], size)[:, :1]
            if keep_outputs:
                rec["output"] = out

    with capture(layers, on_output):
        output = model(x)
    if dists is not None:
        scores = _dists_to_input(dists, reference, [r.pop("image", None) for r in records])
        for rec, score in zip(records, scores):
            rec["dists"] = score
    return output, records


def _dists_to_input(dists: DISTS, reference: torch.Tensor, images: list[torch.Tensor | None],
                    chunk: int = 256) -> list[float | None]:
    """Mean DISTS between ``reference`` and each layer's image batch (None stays None).

    All layers' images go through VGG16 together, in chunks: one forward per chunk instead of
    one per layer, which is what makes DISTS affordable on a CPU.
    """
    with torch.no_grad():
        ref_taps = dists.taps(reference)
        present = [i for i, img in enumerate(images) if img is not None]
        scores: list[float | None] = [None] * len(images)
        e = len(reference)
        per_chunk = max(1, chunk // e)
        for start in range(0, len(present), per_chunk):
            group = present[start:start + per_chunk]
            taps = dists.taps(torch.cat([images[i] for i in group]).expand(-1, 3, -1, -1))
            for j, i in enumerate(group):
                scores[i] = float(dists.distance(ref_taps, [t[j * e:(j + 1) * e] for t in taps]).mean())
    return scores


def _gram(z: torch.Tensor, max_features: int | None, seed: int, stream: int) -> torch.Tensor:
    """Gram matrix of ``z``, count-sketched first when wider than ``max_features``; each
    ``stream`` (0 = the input, i + 1 = layer i) has its own reproducible sketch."""
    if max_features is not None and flatten(z).shape[1] > max_features:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stream)
        z = count_sketch(z, max_features, generator)
    return gram(z)


def probe_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                noise: bool = True, grad: bool = True, ridge: float | None = None,
                max_features: int | None = 65536, bn_stats: str = "batch", seed: int = 0,
                dists: DISTS | None = None, dists_examples: int = 32) -> dict:
    """Per-layer dissipating-inputs measures of ``model`` on the batch ``x`` (labels ``y``).

    Returns a JSON-able dict of lists, one value per feature layer (:func:`feature_layers`):

    - layers, shapes: layer names and per-example feature shapes;
    - cka: linear CKA (float64) between the flattened input and the flattened features;
    - recoverability: held-out R^2 of ridge regression of the input from the layer's
      features, fit on a random half of the batch and scored on the other half (see
      :func:`pnnh.probe.metrics.ridge_recoverability`). ``ridge`` is the penalty relative to
      the mean feature norm; None picks it per layer by exact leave-one-out error on the
      training half over 1e-6 ... 1e3, which keeps useless features at R^2 ~ 0 instead of an
      overfit R^2 << 0;
    - cka_noise, recoverability_noise (``noise``): the noise floor, the same measure between
      ``x`` and the layer's features of a noise input (Gaussian, same shape and per-channel
      mean/std as ``x``), which carry nothing of ``x``;
    - cka_noise_self, recoverability_noise_self (``noise``): the measure between the noise
      input and its own features: how much of a noise input the layer keeps (not a floor);
    - survival, dead, sq_channel_mean, channel_var: see
      :func:`pnnh.probe.metrics.activation_stats`;
    - grad_norm (``grad``): Frobenius norm over the batch of dLoss/d(features), one backward
      pass of mean cross-entropy with ``y`` (of the mean output when ``y`` is None);
    - dists, dists_noise (``dists`` given): DISTS between the input image and the layer's
      channel-mean map (for the noise floor: of the noise input's features), on the first
      ``dists_examples`` examples; spatial feature maps (B, C, H, W) with H*W > 1 only, else None.

    Features wider than ``max_features`` per example are count-sketched to that many
    dimensions before CKA and ridge (unbiased Gram estimate); None keeps them exact.
    ``noise=False`` skips the noise pass and its keys. The model is left exactly as it was:
    hooks removed, train/eval flags and buffers restored (see :func:`preserved_state` for
    ``bn_stats``), parameters, their ``.grad`` and ``requires_grad`` untouched (gradients are
    taken with ``torch.autograd.grad`` with respect to the features only).
    """
    layers = feature_layers(model)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"probe_model needs a batch of at least 4 examples (2 to fit, 2 to score), got {n}")
    if y is not None and tuple(y.shape) != (n,):
        raise ValueError(f"y must have shape ({n},) to match x, got {tuple(y.shape)}")
    if max_features is not None and max_features < 1:
        raise ValueError(f"max_features must be >= 1 or None, got {max_features}")
    if dists is not None and x.ndim != 4:
        raise ValueError(f"DISTS compares images: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if ridge is not None and not ridge > 0:
        raise ValueError(f"ridge must be > 0 or None (leave-one-out choice), got {ridge}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = x.detach().to(device, torch.float32)  # metrics in float32/64 whatever the model runs in
    y = y.to(device) if y is not None else None
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    train, test = perm[: n // 2].to(x.device), perm[n // 2:].to(x.device)
    noise_x = _noise_like(x, generator) if noise else None
    reference = gray_image(x[:dists_examples], tuple(x.shape[-2:])) if dists is not None else None
    common = dict(max_features=max_features, seed=seed, dists=dists, reference=reference)

    with preserved_state(model, bn_stats):
        with torch.enable_grad() if grad else torch.no_grad():
            x_in = x.to(dtype, copy=True).requires_grad_(grad)
            output, data = _forward(model, layers, x_in, keep_outputs=grad, **common)
            grad_norms = _feature_grad_norms(output, y, [r.pop("output", None) for r in data]) if grad else None
        del output
        if noise:
            with torch.no_grad():
                _, noise_recs = _forward(model, layers, noise_x.to(dtype), keep_outputs=False, **common)

    gx = _gram(x, max_features, seed, stream=0)
    result: dict = {"layers": [name for name, _ in layers], "shapes": [r["shape"] for r in data]}
    result["cka"] = [cka_from_grams(gx, r["gram"]) for r in data]
    result["recoverability"] = [ridge_recoverability(r["gram"], x, train, test, ridge) for r in data]
    if noise:
        gn = _gram(noise_x, max_features, seed, stream=0)
        result["cka_noise"] = [cka_from_grams(gx, r["gram"]) for r in noise_recs]
        result["recoverability_noise"] = [ridge_recoverability(r["gram"], x, train, test, ridge)
                                          for r in noise_recs]
        result["cka_noise_self"] = [cka_from_grams(gn, r["gram"]) for r in noise_recs]
        result["recoverability_noise_self"] = [ridge_recoverability(r["gram"], noise_x, train, test, ridge)
                                               for r in noise_recs]
    for key in ("survival", "dead", "sq_channel_mean", "channel_var"):
        result[key] = [r[key] for r in data]
    if grad:
        result["grad_norm"] = grad_norms
    if dists is not None:
        result["dists"] = [r["dists"] for r in data]
        if noise:
            result["dists_noise"] = [r["dists"] for r in noise_recs]
    result["n_examples"] = n
    result["settings"] = {"ridge": ridge, "max_features": max_features, "bn_stats": bn_stats,
                          "seed": seed, "loss": "cross_entropy" if y is not None else "mean_output"}
    return result


def _feature_grad_norms(output: torch.Tensor, y: torch.Tensor | None,
                        features: list[torch.Tensor]) -> list[float | None]:
    """Norm of dLoss/d(feature) per layer (None where the loss does not depend on it)."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; grad=True needs a tensor of logits")
    loss = F.cross_entropy(output.float(), y) if y is not None else output.float().mean()
    wanted = [i for i, f in enumerate(features) if f.requires_grad]
    grads = torch.autograd.grad(loss, [features[i] for i in wanted], allow_unused=True)
    norms: list[float | None] = [None] * len(features)
    for i, g in zip(wanted, grads):
        norms[i] = None if g is None else float(g.detach().double().norm())
    return norms


def crossing_layer(result: dict, margin: float = CROSSING_MARGIN, measure: str = "cka") -> int | None:
    """First layer index (0-based, in ``result["layers"]``) where the input similarity has
    reached its noise floor: ``result[measure][i] <= result[measure + "_noise"][i] + margin``;
    None if it never does. ``measure`` is "cka" (default) or "recoverability"."""
    if measure not in ("cka", "recoverability"):
        raise ValueError(f"measure must be 'cka' or 'recoverability', got {measure!r}")
    floor = f"{measure}_noise"
    if floor not in result:
        raise ValueError(f"the probe result has no {floor!r}: run probe_model with noise=True")
    for i, (value, level) in enumerate(zip(result[measure], result[floor])):
        if value <= level + margin:
            return i
    return None


def probe_summary(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                  seed: int = 0) -> dict:
    """A small JSON-able digest of :func:`probe_model` for training logs (no backward pass).

    Keys: layers (count), final_cka, final_cka_noise, crossing_layer (CKA),
    final_recoverability, final_recoverability_noise, crossing_layer_recoverability,
    mean_survival, min_survival, mean_dead.
    """
    r = probe_model(model, x, y, grad=False, seed=seed)
    return {
        "layers": len(r["layers"]),
        "final_cka": r["cka"][-1],
        "final_cka_noise": r["cka_noise"][-1],
        "crossing_layer": crossing_layer(r),
        "final_recoverability": r["recoverability"][-1],
        "final_recoverability_noise": r["recoverability_noise"][-1],
        "crossing_layer_recoverability": crossing_layer(r, measure="recoverability"),
        "mean_survival": sum(r["survival"]) / len(r["survival"]),
        "min_survival": min(r["survival"]),
        "mean_dead": sum(r["dead"]) / len(r["dead"]),
    }
