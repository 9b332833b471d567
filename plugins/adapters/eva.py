"""EVA — Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation" (arXiv:2410.07170).

A modifier of the ``"init"`` slot that looks at data: A starts as the top right-singular
vectors of each layer's inputs over the run's first training batches, B at zero, so the
adapted model starts equal to the base and A spans the directions the data excites most
(§3.1). The calibration hook (:meth:`calibrate`) gives it those batches after attach::

    X_l  = inputs of layer l at the labelled tokens     (prompt and padding masked, §3.2)
    V_l  = top-(ρ·r) principal directions of X_l        (incremental PCA, batch by batch, until
                                                         the directions stop moving: cos ≥ τ)
    ranks: the r·L components with the largest explained-variance ratio across all layers,
           at most ρ·r per layer (§3.3, "adaptive rank allocation"; ρ = 1: r everywhere)
    A_l = V_l[:r_l]     B_l = 0     α_l = α·r_l/r (the scaling of r kept)

The result (each layer's A, whose row count is its rank) is saved with the adapter, so
``--resume``, ``qpeft eval`` and ``--init-adapter`` rebuild the init without data; PEFT reads
the ranks from ``rank_pattern``/``alpha_pattern``. The steps and their order follow PEFT
0.21's ``peft.tuners.lora.eva`` (same components and ranks for the same batches, tested).

    lora+eva      lora:r=8+eva:rho=1      dora+eva:calibration_batches=16      lora+eva+rslora
"""
import dataclasses
from collections import Counter

import torch

from qpeft import Adapter, OptionsError, adapter_layers, hookimpl, option
from qpeft.plugins.adapters._ipca import IncrementalPCA



@dataclasses.dataclass
class EVAOptions:
    calibration_batches: int = option(8, "training batches the SVD of the layer inputs sees before training")
    rho: float = option(2.0, "ρ ≥ 1: a layer may get up to ρ·r ranks (1: no redistribution, §3.3)")
    tau: float = option(0.99, "τ: a direction has converged when its cosine to the last batch's is ≥ τ")
    label_mask: bool = option(True, "use only the tokens the loss sees (labels ≠ -100), as PEFT's use_label_mask")
    whiten: bool = option(False, "divide each direction by the square root of its singular value")
    adjust_alpha: bool = option(True, "α_l = α·r_l/r, so a layer's scaling stays α/r (PEFT's adjust_scaling_factors)")
    max_passes: int = option(25, "passes over the batches at most before unsettled layers take the last estimate "
                             "(PEFT cycles until every direction settles)")

    def __post_init__(self):
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {self.calibration_batches}")
        if self.max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, got {self.max_passes}")
        if self.rho < 1:
            raise ValueError(f"rho must be ≥ 1, got {self.rho}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")


class EVA(Adapter):
    name = "eva"
    description = "EVA: A from the top singular vectors of each layer's inputs on training data (Paischer et al. 2024)"
    role = "modifier"
    modifies = "init"
    Options = EVAOptions

    def initialize(self, layer, scaling: float) -> None:
        """Nothing at attach (A Kaiming, B zero, as PEFT's ``init_lora_weights="eva"``): the
        data-driven A comes in :meth:`apply_calibration`."""

    def calibration_batches(self) -> int:
        return self.options.calibration_batches

    @torch.no_grad()
    def calibrate(self, model, batches) -> dict:
        """Each layer's A: its top principal directions, at the rank the budget gives it."""
        layers = adapter_layers(model)
        budget = sum(layer.r for layer in layers.values())
        most = {name: round(layer.r * self.options.rho) for name, layer in layers.items()}
        first = next(iter(batches))
        shared = _equal_inputs(model, layers, first, self._mask)   # q, k, v see one input: one SVD
        for group in _groups(shared):
            for name in group:
                most[name] = max(most[n] for n in group)
        pcas = {name: IncrementalPCA(most[name]) for name in layers if name not in shared}
        owner = {**{n: n for n in pcas}, **shared}
        ranks = self._fit(model, layers, batches, pcas, owner, shared, most, budget)
        state, unsettled = {}, 0
        for name, rank in ranks.items():
            pca = pcas[owner[name]]
            unsettled += not bool(pca.converged[:rank].all())
            a = pca.components_[:rank]
            state[name] = a / pca.singular_values_[:rank].sqrt().reshape(-1, 1) if self.options.whiten else a
        if unsettled:     # PEFT would cycle on; a layer whose inputs have no dominant directions never settles
            batches.say(f"qpeft: eva: {unsettled} of {len(ranks)} layers' directions still moved after {self.options.max_passes} "
                        f"passes over {len(batches)} batches (cosine < tau={self.options.tau}); they start from the "
                        "last estimate (more eva:calibration_batches or a lower eva:tau let them settle)")
        return state

    def _fit(self, model, layers, batches, pcas, owner, shared, most, budget) -> dict:
        """Feed batches (cycling) until every layer's directions up to its rank converged."""
        done = dict.fromkeys(pcas, False)
        ranks, rows = dict(most), {}
        hooks = [layers[name].register_forward_hook(self._hook(name, pcas[name], rows, done))
                 for name in pcas]
        try:
            for _ in range(self.options.max_passes):
                for batch in batches:
                    for name, pca in pcas.items():
                        done[name] = bool(pca.converged[:ranks[name]].all())
                    if all(done.values()):
                        return ranks
                    rows["mask"] = self._mask(batch)
                    model(**batch)
                    if all(p.components_ is not None for p in pcas.values()):
                        ranks = _allocate(pcas, owner, shared, most, budget)
        finally:
            for hook in hooks:
                hook.remove()
        missing = [name for name, p in pcas.items() if p.components_ is None]
        if missing:
            raise OptionsError(f"eva: {missing[0]} never saw {pcas[missing[0]].n_components} labelled tokens in one "
                               f"batch (ρ·r components need as many); use a larger --batch-size or a lower rank")
        return ranks

    def _hook(self, name, pca, rows, done):
        def fold_in(module, args, output):
            if done[name]:
                return
            x = args[0][rows["mask"]]
            if x.shape[0] < pca.n_components:   # too few tokens for the components (as PEFT: skip)
                return
            before = None if pca.components_ is None else pca.components_.clone()
            pca.partial_fit(x.to(torch.float32))
            if before is not None:
                pca.converged = torch.nn.functional.cosine_similarity(pca.components_, before) >= self.options.tau
        return fold_in

    def _mask(self, batch) -> tuple:
        """Indices of the tokens whose inputs count: attended (and labelled, with label_mask)."""
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        if self.options.label_mask and "labels" in batch:
            mask = mask & (batch["labels"] != -100)
        return mask.nonzero().T.unbind()

    def apply_calibration(self, model, state: dict) -> None:
        """A ← the saved directions; a layer whose rank changed gets new tensors (α scaled)."""
        for name, layer in adapter_layers(model).items():
            if name not in state:
                continue
            a = state[name]
            if a.shape[0] != layer.r:
                alpha = layer.lora_alpha * a.shape[0] / layer.r if self.options.adjust_alpha else layer.lora_alpha
                layer.set_rank(a.shape[0], alpha)
            with torch.no_grad():
                layer.lora_A.copy_(a.to(layer.lora_A.device, layer.lora_A.dtype))
                layer.lora_B.zero_()


def _equal_inputs(model, layers, batch, rows) -> dict:
    """``{layer: first layer with the same input}`` for layers fed the same tensor."""
    seen, hooks, index = {}, [], rows(batch)

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0][index].detach().cpu())
        return hook

    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(keep(name)))
    try:
        model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    shared, firsts = {}, []
    for name, x in seen.items():
        same = next((f for f in firsts if seen[f].shape == x.shape and torch.equal(seen[f], x)), None)
        if same is None:
            firsts.append(name)
        else:
            shared[name] = same
    return shared


def _groups(shared: dict) -> list[list[str]]:
    groups: dict = {}
    for name, first in shared.items():
        groups.setdefault(first, [first]).append(name)
    return list(groups.values())


def _allocate(pcas, owner, shared, most, budget) -> dict:
    """The ``budget`` components with the largest explained-variance ratios over all layers,
    at most ``most[l]`` per layer (§3.3); a layer sharing an input never outranks its first."""
    ratios = {name: pca.explained_variance_ratio_[:most[name]] for name, pca in pcas.items()}
    keys, values = zip(*[(k, c) for k, name in owner.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {k: counts.get(k, 0) for k in owner}
    for name, first in shared.items():
        if counts[first] < counts[name]:
            counts[first], counts[name] = counts[name], counts[first]
    return counts


@hookimpl
def register_adapters(register):
    register(EVA)
