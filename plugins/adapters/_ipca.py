"""Incremental PCA over batches of layer inputs, as EVA computes it (Paischer et al. 2024, §3.2,
"incremental SVD"), following scikit-learn's ``IncrementalPCA.partial_fit`` (Ross et al. 2008,
"Incremental Learning for Robust Visual Tracking", with the mean update of Chan et al. 1982)
with a seeded randomized SVD (Halko et al. 2011) in place of the full one — the same steps, in
the same dtypes, as PEFT 0.21's ``peft.utils.incremental_pca``, so an EVA init computed here
equals PEFT's for the same inputs. A private module of the plugins package, not a plugin.
"""
import torch


class IncrementalPCA:
    """The top ``n_components`` principal directions of all rows seen by :meth:`partial_fit`."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components, self.q, self.seed, self.niter = n_components, 2 * n_components, seed, niter
        self.components_ = self.singular_values_ = None
        self.mean_ = self.var_ = None
        self.n_samples_seen_ = torch.tensor([0])
        self.converged = torch.zeros(n_components, dtype=torch.bool)   # set by the caller's test (EVA: cos ≥ τ)

    def partial_fit(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (n × features) in: centre them, stack them under the current
        components scaled by their singular values and the mean correction, and take the
        top singular directions of that (Ross et al. 2008, §3.1)."""
        x = x.clone() if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        first = self.components_ is None
        n = x.shape[0]
        mean, var, total = _mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_.to(x.device))
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = torch.sqrt((self.n_samples_seen_.to(x.device).double() / total) * n) * (self.mean_ - batch_mean)
            x = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, x, correction))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        vt = v.mH
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])   # svd_flip on V
        vt *= signs.view(-1, 1)
        self.explained_variance_ratio_ = (s ** 2 / torch.sum(var * total))[:self.n_components]
        self.n_samples_seen_ = total
        self.components_, self.singular_values_ = vt[:self.n_components], s[:self.n_components]
        self.mean_, self.var_ = mean, var


def _mean_and_var(x, last_mean, last_var, last_count):
    """Running column mean and variance with ``x``'s rows added (Chan et al. 1982), in float64."""
    new_count = torch.tensor([x.shape[0]], device=x.device)
    count = last_count + new_count
    last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None \
        else last_mean * last_count
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    centred = x - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_unnormalized = centred.square_().sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_var is None:
        return mean, new_unnormalized / count, count
    ratio = last_count.double() / new_count
    unnormalized = last_var * last_count + new_unnormalized + ratio / count * (last_sum / ratio - new_sum).square()
    return mean, unnormalized / count, count
