"""The Triton implementations of the DisEnt/LfF loss operations: the heads and cross-entropy that
`dfa_fast.ops` calls, and the pieces the heads are built from (GCE, the weighted cross-entropy, the
weighting), which `benchmarks/kernels.py` times on their own.

Same names, signatures, return values and in-place EMA updates as `kernels/reference.py`; the tests
compare the two. Launches per call (forward / backward):

| operation | forward | backward |
| --- | --- | --- |
| cross_entropy, gce | 1 | 1 |
| weighted_cross_entropy | 1 (2 beyond 256 rows at <= 16 classes: a zeroed scalar) | 1 |
| sample_weights | 3 (scatter, EMA apply + class max, weights) | - |
| lff_head | 3 (4 with ``gather``) | 1 |
| disent_head | 3 (4 with ``gather``) | 1 (2 above 2048 rows) |

None of them synchronises with the host, so a training step built on them can be captured by CUDA
graphs (the EMA scratch is allocated on the first call: make it a warm-up step).

The fused head permutes within its own rows only: `dfa_fast.ops` sends a swap across data-parallel
ranks (``Swap.source``, the global batch to permute over) to the PyTorch reference.
"""
from .gce import cross_entropy, gce
from .head import disent_head
from .weighting import lff_head, sample_weights, weighted_cross_entropy

__all__ = ["cross_entropy", "gce", "sample_weights", "weighted_cross_entropy", "disent_head",
           "lff_head"]
