"""Index vectors whose geometry is the geometry of users' *embeddings*, in K (or fewer) dimensions.

The basis B (K x n) is the flattened stage-1 user table; a coefficient user's embedding is B^T c.
The basis is not orthogonal, so distances between raw coefficient vectors mean little. With the
Gram matrix G = B B^T = W W^T, the vector x = W^T c satisfies <x_a, x_b> = c_a^T G c_b =
<E_a, E_b>: inner products and L2 distances between index vectors equal those between
materialised embeddings (DESIGN.md section 2 writes the Cholesky factor L; any factor works).

We use the Cholesky factor (W = L, as DESIGN.md says): unique, deterministic and fast (~30 ms at
K = 1,000, against ~10 s for an eigendecomposition on 2 busy cores), so every process derives the
same index vectors and a snapshot written by one process is valid in another. A rank-deficient
basis (K > n, or duplicated users) has no Cholesky factor; then the symmetric eigen factor
W = V_r sqrt(Lambda_r), truncated to the numerical rank r, is used, and the snapshot fingerprint
covers the factor itself, so a process whose LAPACK returns a different (rotated) factor rebuilds
rather than mixing coordinate systems.

Direct-mode users have an embedding e rather than coefficients. They are indexed by the
least-squares projection of e onto the span of the basis: x = W^+ (B e) (L^{-1} B e with Cholesky). Then
<x_e, x_c> = <e, B^T c> exactly for every coefficient user c (the part of e outside the span is
orthogonal to every coefficient user), and the similarity reported for a direct user is the
cosine of its projection. This is documented behaviour, not an approximation hidden from callers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from premier.errors import InvalidEmbeddingError
from premier.users import UserEmbeddingTable

RANK_TOLERANCE = 1e-10  # eigenvalues below this fraction of the largest are treated as zero


class BasisProjection:
    """Maps coefficient vectors and direct embeddings of one basis to (unnormalised) index vectors."""

    def __init__(self, basis: UserEmbeddingTable):
        weight = basis.weight.detach().to("cpu", torch.float64)
        self.num_users = int(weight.shape[0])
        self.user_shape = tuple(int(s) for s in weight.shape[1:])
        flat = weight.reshape(self.num_users, -1)  # B: (K, n)
        if self.num_users == 0:
            raise InvalidEmbeddingError("the stage-1 basis holds no users; coefficient records cannot be served")
        gram = flat @ flat.T
        top = float(gram.diagonal().max())
        if top <= 0:
            raise InvalidEmbeddingError("the stage-1 basis is all zeros; no user can be indexed")
        chol, info = torch.linalg.cholesky_ex(gram)
        diag = chol.diagonal()
        if int(info) == 0 and float(diag.min()) > RANK_TOLERANCE**0.5 * top**0.5:
            self.method = "cholesky"
            self.dim = self.num_users
            coef_factor = chol  # x = c @ L  (i.e. L^T c)
            direct_factor = torch.linalg.solve_triangular(
                chol, torch.eye(self.num_users, dtype=torch.float64), upper=False
            ).T
            extra = b""
        else:
            self.method = "eigen"
            evals, evecs = torch.linalg.eigh(gram)
            keep = evals > float(evals.max()) * RANK_TOLERANCE
            evals, evecs = evals[keep], evecs[:, keep]
            evecs = evecs * torch.where(evecs[evecs.abs().argmax(0), torch.arange(evecs.shape[1])] < 0, -1.0, 1.0)
            self.dim = int(evals.numel())
            coef_factor, direct_factor = evecs * evals.sqrt(), evecs / evals.sqrt()
            extra = coef_factor.to(torch.float32).numpy().tobytes()
        self._coef_factor_t = coef_factor.to(torch.float32).contiguous()  # (K, r): x = c @ this
        self._direct_factor = direct_factor.to(torch.float32).contiguous()  # (K, r): x = (e_flat @ B^T) @ this
        self._basis_t = flat.T.to(torch.float32).contiguous()  # (n, K)
        self.fingerprint = hashlib.sha256(
            basis.weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            + repr((self.method, self.num_users, self.user_shape, self.dim)).encode()
            + extra
        ).hexdigest()

    # Products run in torch, not numpy: numpy's OpenBLAS keeps its own spinning thread pool, which
    # fought FAISS's OpenMP threads on 2 cores (a 1 x 1000 projection took ~4 ms instead of ~0.1 ms).
    def coefficients(self, coefficients: np.ndarray) -> np.ndarray:
        """(M, K) coefficient rows -> (M, r) float32 index vectors (not normalised)."""
        c = torch.from_numpy(np.ascontiguousarray(coefficients, dtype=np.float32).reshape(-1, self.num_users))
        with torch.no_grad():
            return (c @ self._coef_factor_t).numpy()

    def embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """(M, N, U) or (M, N*U) direct embeddings -> (M, r) float32 index vectors of their projections."""
        e = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self._basis_t.shape[0]))
        with torch.no_grad():
            return ((e @ self._basis_t) @ self._direct_factor).numpy()


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in place (zero rows stay zero: similarity 0 to everyone)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


__all__ = ["BasisProjection", "normalise"]
