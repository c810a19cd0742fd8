"""The nearest-preference index: FAISS over unit-norm index vectors, inner product = cosine similarity.

Derived state only: it is built from the database and caught up from it, never written to first.

Kind by size:
- exact: `IndexIDMap2(IndexFlatIP)` while the vectors total at most EXACT_MAX_FLOATS (5M floats,
  20 MB: ~5,000 users at 1,000-d). Brute force, exact results, a few ms per query at that size.
- ivf: `IndexIVFScalarQuantizer` (inner product, fp16 codes) with nlist ~ 4 sqrt(N) lists and a
  hash-table direct map for reconstruct/remove. fp16 halves memory and the bytes a search streams
  (search at 1M x 1000-d is memory-bound) at a cost to similarities of ~1e-3, far below the gaps
  that decide a top-10. It uses FAISS's native ids, not IndexIDMap2:
  IndexIDMap2's remove_ids compacts its id table assuming the sub-index renumbers as a flat index
  does, which IVF does not, so ids go wrong after a delete (checked on faiss 1.15).
  HNSW was ruled out: building it over 1M x 1000-d vectors takes far too long on 2 cores, and it
  deletes poorly. nprobe is calibrated at build time to a recall target (held-out self-excluded
  queries against brute force), so accuracy does not silently depend on the data.

Snapshots are `faiss.write_index` files (no pickle) plus a JSON manifest written last, naming
the file, its size and CRC32, the database change number it reflects, the store and checkpoint
it belongs to and the basis projection's fingerprint; anything that does not match is ignored
and the index rebuilt from the database.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from premier.files import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

EXACT_MAX_FLOATS = 5_000_000


def default_exact_max(dim: int) -> int:
    """Most vectors the exact index holds before IVF: brute force streams N x dim floats per query."""
    return int(min(50_000, max(1_000, EXACT_MAX_FLOATS // max(dim, 1))))


RECALL_TARGET = 0.97
MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = "premier-store-index"
SNAPSHOT_VERSION = 1
_CALIBRATION_QUERIES = 200
_CALIBRATION_K = 10


def nlist_for(n: int) -> int:
    """About 4 sqrt(N) lists (power of two), at least 16, and at least ~40 training points per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(4, round(math.log2(target)))
    return max(16, min(nlist, max(16, n // 40)))


@dataclass
class IndexInfo:
    """Parameters that travel with an index (and its snapshot manifest)."""

    kind: str  # "exact" | "ivf"
    dim: int
    nlist: int = 0
    nprobe: int = 0
    trained_size: int = 0
    calibrated_recall: float | None = None


class VectorIndex:
    """One FAISS index with its parameters; callers serialise mutation against search (see UserStore)."""

    def __init__(self, index: faiss.Index, info: IndexInfo):
        self.index = index
        self.info = info

    # ------------------------------------------------------------------ building
    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), IndexInfo("exact", dim))

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        exact_max: int | None = None,
        recall_target: float = RECALL_TARGET,
        seed: int = 0,
    ) -> VectorIndex:
        """Index unit-norm `vectors` (N, d) under int64 `ids`; the kind is chosen by N."""
        n, dim = vectors.shape
        if n < (exact_max or default_exact_max(dim)):
            out = cls.empty(dim)
            out.add(vectors, ids)
            return out
        nlist = nlist_for(n)
        ivf = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        ivf.cp.niter = 10  # k-means quality plateaus early; 25 iterations would 2.5x the build
        ivf.cp.seed = seed
        ivf.cp.min_points_per_centroid = 16
        rng = np.random.default_rng(seed)
        sample = min(n, nlist * 32)  # ~2 minutes of k-means at 1M x 1000-d on 2 cores
        train = vectors[np.sort(rng.choice(n, sample, replace=False))] if sample < n else vectors
        t0 = time.perf_counter()
        ivf.train(np.ascontiguousarray(train))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        for lo in range(0, n, 100_000):
            ivf.add_with_ids(vectors[lo : lo + 100_000], ids[lo : lo + 100_000])
        out = cls(ivf, IndexInfo("ivf", dim, nlist, 1, n))
        out._calibrate(vectors, ids, recall_target, rng)
        log.info(
            "built IVF index over %d vectors (nlist %d, nprobe %d, recall %.3f) in %.1fs",
            n,
            nlist,
            out.info.nprobe,
            out.info.calibrated_recall or 0,
            time.perf_counter() - t0,
        )
        return out

    def _calibrate(self, vectors: np.ndarray, ids: np.ndarray, target: float, rng: np.random.Generator) -> None:
        """Smallest nprobe whose recall@10 (query's own id excluded) reaches `target` on sampled members."""
        n = vectors.shape[0]
        q_rows = rng.choice(n, min(_CALIBRATION_QUERIES, n), replace=False)
        queries = np.ascontiguousarray(vectors[q_rows])
        k = _CALIBRATION_K + 1
        truth = exact_top_k(vectors, ids, queries, k)
        nprobe, recall = 1, 0.0
        while True:
            _, got = self.search(queries, k, nprobe=nprobe)
            recall = recall_at(truth, got, exclude=ids[q_rows], k=_CALIBRATION_K)
            if recall >= target or nprobe >= self.info.nlist:
                break
            nprobe = min(self.info.nlist, nprobe * 2)
        self.info.nprobe, self.info.calibrated_recall = nprobe, recall

    # ------------------------------------------------------------------ use
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        # IVF's hash-table direct map has a fast path for an explicit id array; IDMap2 wants a set.
        if self.info.kind == "exact":
            sel = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        else:
            sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
        return int(self.index.remove_ids(sel))

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, exact: bool = False, single_thread: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) of the k best per query; ids are -1 where fewer than k exist.

        `single_thread` runs FAISS's OpenMP with one thread for this call: a single small query
        gains nothing from a thread team, and on a busy 2-core machine waking one (while BLAS
        threads from the query projection still spin) cost ~8 ms per search instead of ~0.3 ms.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = None
        if self.info.kind == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = self.info.nlist if exact else int(nprobe or self.info.nprobe)
        if not single_thread:
            return self.index.search(queries, k, params=params)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # per calling thread in libgomp; restored below
        try:
            return self.index.search(queries, k, params=params)
        finally:
            faiss.omp_set_num_threads(before)

    def reconstruct(self, uid: int) -> np.ndarray | None:
        try:
            return self.index.reconstruct(int(uid))
        except RuntimeError:  # not in the index
            return None

    def memory_bytes(self) -> int:
        """Vector payload plus ids (what grows with N); excludes FAISS's small fixed overheads."""
        per = self.info.dim * (4 if self.info.kind == "exact" else 2) + 8
        return self.ntotal * per + (self.info.nlist * self.info.dim * 4 if self.info.kind == "ivf" else 0)

    # ------------------------------------------------------------------ snapshots
    def save(self, folder: Path, manifest: dict) -> Path:
        """Write the index, then the manifest that names it (atomically); remove older snapshot files.

        A file lock keeps two processes from interleaving; a crash leaves either the old manifest
        (and its file) or the new one, and stray files are removed by the next save.
        """
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / ".lock"):
            name = f"index-{manifest['seq']}-{secrets.token_hex(4)}.faiss"
            tmp = folder / f".{name}.tmp"
            try:
                faiss.write_index(self.index, str(tmp))
                size, crc = _size_and_crc(tmp, fsync=True)
                os.replace(tmp, folder / name)
                fsync_dir(folder)
            finally:
                tmp.unlink(missing_ok=True)
            full = {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                **manifest,
                **asdict(self.info),
                "ntotal": self.ntotal,
                "file": name,
                "bytes": size,
                "crc32": crc,
                "written_at": time.time(),
            }
            atomic_write_bytes(folder / MANIFEST, json.dumps(full, indent=1).encode())
            for old in folder.glob("*.faiss"):
                if old.name != name:
                    old.unlink(missing_ok=True)
            for stray in folder.glob(".*.tmp"):  # left by a writer killed mid-save (we hold the lock)
                stray.unlink(missing_ok=True)
        return folder / name

    @classmethod
    def load(cls, folder: Path, expect: dict) -> tuple[VectorIndex, dict] | None:
        """The snapshot in `folder` if it is intact and its manifest matches `expect`; else None (and why, logged)."""
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != SNAPSHOT_FORMAT or manifest.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"format {manifest.get('format')!r} v{manifest.get('version')!r}")
            for key, want in expect.items():
                if manifest.get(key) != want:
                    raise ValueError(f"{key} is {str(manifest.get(key))[:16]!r}, expected {str(want)[:16]!r}")
            file = folder / str(manifest["file"])
            if "/" in str(manifest["file"]) or not file.is_file():
                raise ValueError(f"index file {manifest['file']!r} is missing")
            size, crc = _size_and_crc(file)
            if size != manifest["bytes"] or crc != manifest["crc32"]:
                raise ValueError(f"index file {file.name} is damaged (size {size}, crc {crc:08x})")
            index = faiss.read_index(str(file))
            info = IndexInfo(**{k: manifest[k] for k in IndexInfo.__dataclass_fields__})
            if int(index.ntotal) != manifest["ntotal"] or int(index.d) != info.dim:
                raise ValueError("index contents disagree with the manifest")
            if info.kind == "ivf":
                if (
                    faiss.extract_index_ivf(index).direct_map.type != faiss.DirectMap.Hashtable
                ):  # (a view; `index` owns it)
                    raise ValueError("IVF snapshot lacks its id map")
            return cls(index, info), manifest
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
            log.warning("ignoring index snapshot in %s (%s); rebuilding from the database", folder, e)
            return None


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Brute-force top-k ids by inner product (the ground truth for recall), chunked to bound memory."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for lo in range(0, vectors.shape[0], chunk):
        s = queries @ vectors[lo : lo + chunk].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cand_i = np.concatenate([best_i, ids[lo : lo + chunk][part]], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def recall_at(truth: np.ndarray, got: np.ndarray, k: int, exclude: np.ndarray | None = None) -> float:
    """Mean |top-k(got) ∩ top-k(truth)| / k, with each query's `exclude` id dropped from both first."""
    hits = total = 0
    for i in range(len(truth)):
        skip = -1 if exclude is None else exclude[i]
        t = [x for x in truth[i] if x >= 0 and x != skip][:k]
        g = [x for x in got[i] if x >= 0 and x != skip][:k]
        hits += len(set(t) & set(g))
        total += len(t)
    return hits / total if total else 1.0


def _size_and_crc(path: Path, fsync: bool = False) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            crc = zlib.crc32(block, crc)
            size += len(block)
        if fsync:
            os.fsync(fh.fileno())
    return size, crc


class _locked:
    """An exclusive advisory file lock (fcntl.flock), held for a with-block."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _locked:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


__all__ = ["VectorIndex", "IndexInfo", "default_exact_max", "RECALL_TARGET", "nlist_for", "exact_top_k", "recall_at"]
