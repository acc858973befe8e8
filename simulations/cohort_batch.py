"""A whole cohort's one-step client updates in one pass: the batched engine of the in-process run.

In the cross-device setting (one user per client, one local epoch of plain SGD on that user's
row) a client's update is one SGD step taken at the global weights,
``delta_i = -lr * grad L_i(w)``, with ``L_i`` the Mult-VAE loss of the client's row under its
own dropout mask and reparameterisation noise (Liang et al. 2018, eq. 6). The sum over a cohort
of these deltas, each clipped to norm C for DP-FedAvg (McMahan et al. 2018, Alg. 1), therefore
needs one forward and one backward pass over the cohort as a batch:

- the random draws are each client's own: :func:`client_noise` replays, per client seed, what
  :func:`client.local.compute_update` draws (a fork of torch's generator, the dropout mask, the
  reparameterisation noise);
- each client's norm comes without materializing its gradient: a linear layer's per-example
  weight gradient is the outer product ``g_i a_i^T`` of the gradient at its output and its
  input, whose Frobenius norm is ``|g_i| |a_i|`` (Goodfellow 2015, "Efficient per-example
  gradient computations"; the "ghost norm" of Li et al. 2022);
- the clipped sum of a layer's weight gradients is ``(c * G)^T A`` for the clip factors ``c``.

With an Adv-MultVAE adversary head (``[fairness] adversary``, Ganhor et al. 2022) each client's
loss gains the head's cross-entropy on its own user's attribute (:func:`client_labels`), the
head's linear layers join the per-client norms and sums, and the gradient reaches the encoder
through the same reversal as in the model (:func:`common.model.reverse_gradient`). With group
re-weighting (``[fairness] reweight``) each client's loss is multiplied by its user's weight
(:func:`client_user_weights`) before the gradient, as ``compute_update`` does.

The result equals the sum of ``compute_update`` deltas to float32 rounding (the tests check it);
for a cohort of 1,000 clients on 3,000 items it takes about a second on one core instead of
twenty. The first layer's input is sparse (a user's few items), so it stays a scipy matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from client.local import group_weights
from common.fairness.attacker import attribute_labels
from common.model import (
    AdversaryObjective,
    ModelConfig,
    ModelKind,
    VAEOutput,
    adversary_loss,
    reverse_gradient,
    run_adversary_head,
)
from common.run.config import FairnessConfig, RunConfig
from common.run.folder import _client_arrays, client_sizes, load_user_attributes

__all__ = [
    "batched_unsupported",
    "client_labels",
    "client_noise",
    "client_train_rows",
    "client_user_weights",
    "cohort_update_sum",
    "population_rows",
]


def batched_unsupported(cfg: RunConfig, run_dir: Path) -> str | None:
    """Why the batched computation does not reproduce this run's clients, or ``None``."""
    if cfg.model.kind != ModelKind.MULTVAE.value:
        return f"model.kind is {cfg.model.kind!r} (the batched engine covers multvae)"
    if cfg.client.optimizer != "sgd" or cfg.client.local_epochs != 1:
        return "clients take more than one plain SGD step (client.optimizer, local_epochs)"
    if cfg.client.max_grad_norm is not None:
        return "clients clip their gradients (client.max_grad_norm)"
    sizes = client_sizes(run_dir)
    if min(sizes) != 1 or max(sizes) != 1:
        return "some client holds more than one user"
    return None


def client_train_rows(
    run_dir: Path, client_ids: list[int], *, fraction: float, split_seeds: list[int]
) -> sp.csr_matrix:
    """``(len(client_ids), n_items)``: each one-user client's training row, stacked.

    The rows :func:`client.local.split_local` keeps for training: a user with ``n >= 5`` items
    holds out ``int(fraction * n)`` of them, chosen by ``default_rng(seed).choice`` over the
    row's stored order. One sparse slice for the cohort instead of two sparse matrices per
    client (a cohort of 1,000: milliseconds instead of a second).
    """
    # rundata keeps the partition file cached; load_client_shard would slice it per client
    train, offsets, rows, _ = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    ids = np.asarray(client_ids, dtype=np.int64)
    if np.any(offsets[ids + 1] - offsets[ids] != 1):
        raise ValueError("every client must hold exactly one user")
    block = sp.csr_matrix(train[rows[offsets[ids]]], dtype=np.float32)  # (B, I)
    indptr = [0]
    kept: list[np.ndarray] = []
    for i, seed in enumerate(split_seeds):
        cols = block.indices[block.indptr[i] : block.indptr[i + 1]]
        n = len(cols)
        if n >= 5:  # split_local's rule and generator
            held = np.random.default_rng(seed).choice(n, size=int(fraction * n), replace=False)
            keep = np.ones(n, dtype=bool)
            keep[held] = False
            cols = cols[keep]
        kept.append(cols)
        indptr.append(indptr[-1] + len(cols))
    flat = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int32)
    data = np.ones(len(flat), dtype=np.float32)
    return sp.csr_matrix((data, flat, np.asarray(indptr)), shape=(len(ids), block.shape[1]))


def client_labels(
    run_dir: Path, client_ids: list[int], fairness: FairnessConfig
) -> np.ndarray | None:
    """``(len(client_ids),)`` int64: each one-user client's adversary target, ``-1`` unknown.

    What :func:`client.local.adversary_labels` gives each client from its shard's attribute
    (``RUN_DIR/data/users.json``, training rows in ``clients.npz`` order); ``None`` without
    ``fairness.adversary``.
    """
    if not fairness.adversary:
        return None
    _, offsets, rows, _ = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    ids = np.asarray(client_ids, dtype=np.int64)
    if np.any(offsets[ids + 1] - offsets[ids] != 1):
        raise ValueError("every client must hold exactly one user")
    values = load_user_attributes(Path(run_dir), "train").get(fairness.adversary)
    if values is None:
        return np.full(len(ids), -1, dtype=np.int64)
    return attribute_labels(fairness.adversary, values[rows[offsets[ids]]])


def client_user_weights(
    run_dir: Path, client_ids: list[int], fairness: FairnessConfig
) -> np.ndarray | None:
    """``(len(client_ids),)`` float32: each one-user client's loss weight (group re-weighting).

    What :func:`client.local.group_weights` gives each client from its shard's attribute
    (``RUN_DIR/data/users.json``, training rows in ``clients.npz`` order); ``None`` without
    ``fairness.reweight``.
    """
    if not fairness.reweight:
        return None
    _, offsets, rows, _ = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    ids = np.asarray(client_ids, dtype=np.int64)
    if np.any(offsets[ids + 1] - offsets[ids] != 1):
        raise ValueError("every client must hold exactly one user")
    attributes = load_user_attributes(Path(run_dir), "train")
    values = attributes.get(fairness.reweight_attribute)
    own = {} if values is None else {fairness.reweight_attribute: values[rows[offsets[ids]]]}
    return group_weights(fairness, own, len(ids))


def population_rows(run_dir: Path) -> sp.csr_matrix:
    """``(n_users, n_items)``: the rows of every client of a prepared run, in client order."""
    train, offsets, rows, _ = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    return sp.csr_matrix(train[rows[offsets[0] : offsets[-1]]])


def client_noise(model_cfg: ModelConfig, seeds: list[int]) -> tuple[np.ndarray, torch.Tensor]:
    """Each client's dropout multiplier ``(B, n_items)`` and reparameterisation noise ``(B, d)``.

    What ``compute_update`` draws from ``Generator().manual_seed(seed)``:
    ``common.training._forked_rng`` seeds torch's global generator with
    ``randint(0, 2**62, generator=generator)``; from it the model's input dropout draws
    ``bernoulli(1 - p)`` and divides by ``1 - p`` (ATen's CPU dropout; nothing for p = 0), then
    the reparameterisation draws ``randn(1, d)``. A fresh generator with that seed gives the
    same streams.
    """
    p = model_cfg.dropout
    latent = model_cfg.dims[-1]
    masks = torch.ones(len(seeds), model_cfg.n_items)  # (B, I)
    eps = torch.empty(len(seeds), latent)  # (B, d)
    for i, seed in enumerate(seeds):
        outer = torch.Generator().manual_seed(seed)
        inner = torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=outer).item())
        )
        if p > 0:
            masks[i : i + 1].bernoulli_(1 - p, generator=inner).div_(1 - p)
        eps[i : i + 1] = torch.randn(1, latent, generator=inner)
    return masks.numpy(), eps


def _encoded_input(x: sp.csr_matrix, masks: np.ndarray) -> sp.csr_matrix:
    """The model's ``dropout(normalize(x))`` ``(B, I)`` as a sparse matrix, bitwise as torch.

    For a binary row of n items ``F.normalize`` gives ``1 / sqrt(n)`` (float32) on its items.
    """
    counts = np.diff(x.indptr)  # (B,)
    norms = np.sqrt(np.maximum(counts, 1).astype(np.float32))  # (B,), float32 like torch
    row_of = np.repeat(np.arange(x.shape[0]), counts)  # (nnz,)
    values = (np.float32(1.0) / norms[row_of]) * masks[row_of, x.indices]  # (nnz,)
    return sp.csr_matrix((values.astype(np.float32), x.indices, x.indptr), shape=x.shape)


def cohort_update_sum(
    weights: dict[str, np.ndarray],
    model_cfg: ModelConfig,
    x: sp.csr_matrix,
    seeds: list[int],
    *,
    beta: float,
    lr: float,
    clip: float | None,
    labels: np.ndarray | None = None,
    user_weights: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sum of the cohort's one-step SGD deltas, each clipped to norm ``clip`` when given.

    Parameters
    ----------
    weights:
        Global Mult-VAE weights (float32 arrays by state-dict name).
    model_cfg:
        Its architecture.
    x:
        ``(B, n_items)`` binary training rows, one per client (:func:`client_train_rows`).
    seeds:
        Each client's ``compute_update`` seed.
    beta, lr:
        KL weight of the round and the clients' SGD learning rate.
    clip:
        C, or ``None`` for no clipping.
    labels:
        ``(B,)`` int64 adversary targets (``-1`` unknown, :func:`client_labels`) when the model
        has an adversary head; ``None`` trains the head on nothing (its delta is 0), as
        ``compute_update`` without labels.
    user_weights:
        ``(B,)`` float32 loss weight of each client (:func:`client_user_weights`); ``None``:
        1 each.

    Returns
    -------
    tuple[dict[str, np.ndarray], np.ndarray]
        The float64 sum ``sum_i min(1, C / |delta_i|) delta_i`` per parameter, and the norms
        ``|delta_i|`` ``(B,)`` before clipping.
    """
    n_layers = len(model_cfg.dims)
    latent = model_cfg.dims[-1]
    names = [f"encoder.{i}" for i in range(n_layers)] + [f"decoder.{i}" for i in range(n_layers)]
    n_adv = 0  # adversary layers per head
    heads: list[list[str]] = []  # each head's layer names
    if model_cfg.adversary_classes > 0:
        n_adv = 2 if model_cfg.adversary_hidden > 0 else 1
        prefixes = (
            ["adversary"]
            if model_cfg.adversary_heads == 1
            else [f"adversary.{k}" for k in range(model_cfg.adversary_heads)]
        )
        heads = [[f"{prefix}.{i}" for i in range(n_adv)] for prefix in prefixes]
        names += [name for head in heads for name in head]
    w = {k: torch.from_numpy(v) for k, v in weights.items()}
    masks, eps = client_noise(model_cfg, seeds)
    first = _encoded_input(x, masks)  # (B, I) sparse
    rows = torch.from_numpy(x.toarray())  # (B, I)
    # Every layer's output is a leaf: the backward pass then computes only d loss / d output.
    pre = torch.from_numpy(np.asarray(first @ weights[f"{names[0]}.weight"].T))  # (B, h1)
    pre = (pre + w[f"{names[0]}.bias"]).requires_grad_(True)
    outputs = [pre]
    inputs: list[torch.Tensor] = []  # dense inputs of layers 1..L-1
    mu = logvar = pre
    h = pre if n_layers == 1 else torch.tanh(pre)
    for j, name in enumerate(names[1 : 2 * n_layers], start=1):
        if j == n_layers:  # between encoder and decoder: reparameterise
            mu, logvar = h[:, :latent], h[:, latent:]  # (B, d), (B, d)
            h = mu + eps * torch.exp(0.5 * logvar)  # (B, d)
        inputs.append(h.detach())
        out = h @ w[f"{name}.weight"].T + w[f"{name}.bias"]  # (B, out)
        outputs.append(out)
        h = out if j in (n_layers - 1, 2 * n_layers - 1) else torch.tanh(out)
    nll = -(F.log_softmax(h, dim=1) * rows).sum(dim=1)  # (B,)
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)  # (B,)
    losses = nll + beta * kl  # (B,): each client's vae_loss on its own row
    if heads:  # the adversary heads on mu, as MultVAE._adversary_outputs
        confuse = model_cfg.adversary_objective is AdversaryObjective.CONFUSE
        speed = model_cfg.adversary_speed
        source = mu.detach() if confuse else reverse_gradient(mu, model_cfg.adversary_scale)
        logits: list[torch.Tensor] = []
        for head in heads:
            a = source  # (B, d)
            for k, name in enumerate(head):
                inputs.append(a.detach())
                out = a @ w[f"{name}.weight"].T + w[f"{name}.bias"]  # (B, out)
                if not out.requires_grad:  # confuse: the first layer reads a detached mu
                    out.requires_grad_(True)
                outputs.append(out)  # the linear output: its gradient gives the weights'
                a = out * speed
                a = a if k == n_adv - 1 else torch.tanh(a)
            logits.append(a)
        confusion: list[torch.Tensor] | None = None
        if confuse:  # the frozen heads (w needs no gradient) on mu, gradient x +scale
            scaled = reverse_gradient(mu, -model_cfg.adversary_scale)  # (B, d)
            confusion = []
            for head in heads:
                pairs = [(w[f"{name}.weight"], w[f"{name}.bias"]) for name in head]
                confusion.append(run_adversary_head(pairs, scaled, speed))

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)  # (B, K, C)

        y = torch.full((x.shape[0],), -1, dtype=torch.int64)
        if labels is not None:
            y = torch.as_tensor(np.asarray(labels, dtype=np.int64))  # (B,)
        output = VAEOutput(
            h, mu, logvar, stack(logits), None if confusion is None else stack(confusion)
        )
        losses = losses + adversary_loss(output, y, model_cfg.adversary_class_weights)  # (B,)
    if user_weights is not None:  # group re-weighting: w_i L_i, as train_epochs' weighted mean
        losses = losses * torch.as_tensor(np.asarray(user_weights, dtype=np.float32))  # (B,)
    if not bool(torch.isfinite(losses).all()):
        raise FloatingPointError("a client's loss is not finite")
    grads = [g.numpy() for g in torch.autograd.grad(losses.sum(), outputs)]  # row i: d L_i
    first_sq = np.asarray(first.multiply(first).sum(axis=1), dtype=np.float64).ravel()  # (B,)
    in_sq = [first_sq] + [a.double().pow(2).sum(dim=1).numpy() for a in inputs]
    squares = np.zeros(x.shape[0])  # (B,)
    for a2, g in zip(in_sq, grads, strict=True):
        # |g a^T|_F^2 + |g|^2 = |g|^2 (|a|^2 + 1): weight and bias of one linear layer
        squares += np.square(g, dtype=np.float64).sum(axis=1) * (a2 + 1.0)
    norms = lr * np.sqrt(squares)  # (B,)
    scale = np.ones_like(norms)
    if clip is not None:
        big = norms > clip
        scale[big] = clip / norms[big]
    factors = (-lr * scale).astype(np.float32)[:, None]  # (B, 1)
    total: dict[str, np.ndarray] = {}
    for j, (name, g) in enumerate(zip(names, grads, strict=True)):
        gs = g * factors  # (B, out)
        # (out, in): the first layer's input is sparse
        inp = first if j == 0 else inputs[j - 1].numpy()
        weight_sum = np.asarray(inp.T @ gs).T
        total[f"{name}.weight"] = weight_sum.astype(np.float64)
        total[f"{name}.bias"] = gs.sum(axis=0, dtype=np.float64)  # (out,)
    return total, norms
