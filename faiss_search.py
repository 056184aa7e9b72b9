"""Nearest-neighbour search past the exact product, with faiss: an index of a gallery's embeddings (flat, IVF or HNSW,
by inner product, the similarity of the metrics), its Recall@K against the exact search, and searching it. faiss is
optional: faiss-cpu, or faiss's GPU build, which builds flat and IVF indexes on the GPU where there is one."""
import math
import os

import numpy as np

import utils

KINDS = ('flat', 'ivf', 'hnsw')
INSTALL = 'pip install faiss-cpu (or faiss\'s GPU build: conda install -c pytorch faiss-gpu)'
IVF_PROBES = 32             # lists an IVF search visits, written with the index
IVF_TRAINING_PER_LIST = 64  # k-means training points per list, at most (faiss warns below 39)
HNSW_NEIGHBOURS = 16        # graph links per vector (HNSW's M)
HNSW_EF_CONSTRUCTION = 40  # faiss's default
HNSW_EF_SEARCH = 128        # candidates an HNSW search keeps, written with the index
RECALL_QUERIES = 1000       # gallery vectors that query the index for its Recall@K against the exact search
RECALL_KS = (1, 10)


def available():
    """Whether faiss imports: installed, and built for this NumPy (faiss-cpu before 1.9 fails beside NumPy 2)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def load_faiss():
    """The faiss module, or the advice to install it."""
    if not available():
        raise utils.UsageError(f'--faiss needs faiss, which is not installed (or not for this NumPy): {INSTALL}; '
                               f'without --faiss the exact search needs nothing more')
    import faiss
    return faiss


def ivf_lists(count):
    """IVF's number of lists for count vectors: about 4 sqrt(count) (faiss's guideline), with at least 39 training
    points a list."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def build(vectors, kind, gpu=None, seed=0):
    """A faiss index of kind (KINDS) of the (N, d) float32 vectors, by inner product: IVF trained by k-means on at most
    IVF_TRAINING_PER_LIST points a list drawn with seed; flat and IVF on the GPU numbered gpu where it is given and
    faiss is its GPU build. Returned on the CPU, ready to write."""
    faiss = load_faiss()
    count, width = vectors.shape
    if kind == 'hnsw':
        index = faiss.IndexHNSWFlat(width, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        index.add(vectors)
        return index
    if kind == 'flat':
        index = faiss.IndexFlatIP(width)
    else:
        lists = ivf_lists(count)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(IVF_PROBES, lists)
    gpu = gpu if gpu is not None and hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > gpu else None
    if gpu is not None:
        resources = faiss.StandardGpuResources()  # lives until the index is back on the CPU
        index = faiss.index_cpu_to_gpu(resources, gpu, index)
    if kind == 'ivf':
        draw = np.random.default_rng(seed).permutation(count)[:IVF_TRAINING_PER_LIST * index.nlist]
        index.train(vectors[np.sort(draw)])
    index.add(vectors)
    return faiss.index_gpu_to_cpu(index) if gpu is not None else index


def writer(index):
    """A writer of the index for run_files.save_together."""
    import faiss
    return lambda tmp: faiss.write_index(index, tmp)


def search(index, queries, k):
    """(similarities, gallery indices), each (Q, k), of the (Q, d) float32 queries' top k; -1 where the index found
    fewer (an approximate index may)."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_neighbours(vectors, queries, k):
    """Indices (Q, k) of the queries' k most similar vectors by the exact inner product (faiss.knn, in blocks)."""
    import faiss
    return faiss.knn(np.ascontiguousarray(queries), vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_against_exact(index, vectors, ks=RECALL_KS, count=RECALL_QUERIES, seed=0):
    """{K: Recall@K} of the index against the exact search: for count of the gallery's own vectors (drawn with seed) as
    queries, the mean fraction of their K exact nearest neighbours (themselves left out) that the index returns in its
    top K (the k-NN recall of ann-benchmarks); and the number of queries. ({}, 0) for a gallery of one vector."""
    if len(vectors) < 2:
        return {}, 0
    chosen = np.sort(np.random.default_rng(seed).permutation(len(vectors))[:count])
    k = min(max(ks) + 1, len(vectors))
    exact = without_self(exact_neighbours(vectors, vectors[chosen], k), chosen)
    found = without_self(search(index, vectors[chosen], k)[1], chosen)
    recalls = {}
    for K in ks:
        K = min(K, k - 1)
        hits = [len(set(a[:K]) & set(b[:K]) - {-1}) for a, b in zip(exact, found)]
        recalls[K] = float(np.mean(hits)) / K
    return recalls, len(chosen)


def without_self(neighbours, queries):
    """Each row of neighbours (Q, k) without its query's own index (its last entry where the query is not there),
    (Q, k - 1)."""
    own = neighbours == queries[:, None]
    keep = np.where(own.any(1, keepdims=True), ~own, np.arange(neighbours.shape[1])[None, :] < neighbours.shape[1] - 1)
    return neighbours[keep].reshape(len(neighbours), -1)


def faiss_path(index_path):
    """The faiss index written beside an index.py gallery: <prefix>_<name>_index.faiss."""
    return os.path.splitext(index_path)[0] + '.faiss'


def read_beside(index_path, features):
    """The faiss index beside the gallery at index_path, when there is one that holds its (N, d) features, else None
    (with a warning where one is there but faiss is not installed, or it holds other vectors: a write cut between the
    two files, or one copied from elsewhere). Checked by its size and by the vectors it holds at three positions."""
    path = faiss_path(index_path)
    if not os.path.isfile(path):
        return None
    if not available():
        utils.warn(f'{path} is there but faiss is not installed ({INSTALL}): searching exactly')
        return None
    import faiss
    try:
        index = faiss.read_index(path)
    except RuntimeError as e:
        utils.warn(f'{path} cannot be read ({str(e).splitlines()[0][:80]}): searching exactly')
        return None
    if not holds(index, features):
        utils.warn(f'{path} holds other vectors than {index_path}: searching exactly; write it again with index.py '
                   f'--update --faiss KIND')
        return None
    return index


def holds(index, features):
    """Whether the faiss index holds the (N, d) float32 features, in their order (checked at the first, middle and
    last)."""
    import faiss
    if index.ntotal != len(features) or index.d != features.shape[1]:
        return False
    if isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        faiss.downcast_index(index).make_direct_map()
    return all(np.array_equal(index.reconstruct(int(i)), features[i]) for i in {0, len(features) // 2,
                                                                                  len(features) - 1})
