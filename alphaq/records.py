"""Plain records passed between stages (spectral -> plan -> quantize -> report).

One `MatrixStats` per analysed weight matrix: a 2-D tensor, or one expert slice of a merged
3-D expert tensor. Names are GGUF tensor names (``blk.3.ffn_down_exps.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MatrixStats:
    tensor: str  # GGUF tensor name, e.g. "blk.0.ffn_down_exps.weight"
    block: int | None  # transformer block index, None for token_embd/output
    expert: int | None  # expert index inside a merged 3-D tensor, None otherwise
    kind: str  # GGUF name without "blk.N." and ".weight": "ffn_down_exps", "attn_q", "ffn_up_shexp", "token_embd", ...
    rows: int  # output features (numpy rows; GGUF ne1)
    cols: int  # input features = row length seen by ggml (GGUF ne0)
    params: int  # rows * cols
    alpha: float  # PL_Alpha_Hill; NaN when `signal` is False
    variance: float  # population variance of the weights
    k: int  # number of eigenvalues in the fitted tail
    n_eigs: int  # number of pooled FARMS eigenvalues
    signal: bool = True  # False for all-zero / constant / too-small matrices ("no signal")

    @property
    def is_expert(self) -> bool:
        return self.expert is not None
