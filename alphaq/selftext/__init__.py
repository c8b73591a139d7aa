"""Stage 1 of the default path: text the model writes itself.

The float model samples ``n_seq`` sequences of ``n_ctx`` tokens from BOS at temperature 1 through
llama.cpp, with a seeded generator, so the same model and settings give byte-identical tokens.
This is the only text the default path reads: the importance matrix and the damage measurements
both run on it. No calibration data, no external text.

End-of-generation and control tokens are never drawn (their probability is set to zero), so every
sequence has its full length and no sequence stops early or restarts mid-window.
"""

from __future__ import annotations

import json
import logging
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from alphaq.errors import AlphaQError
from alphaq.files import cache_root, fingerprint
from alphaq.pipeline.resume import pause_for_test

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTextConfig:
    n_seq: int = 16  # sequences, decoded side by side
    n_ctx: int = 256  # tokens per sequence, BOS included
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_seq < 1 or self.n_ctx < 2:
            raise AlphaQError(f"self text needs n_seq >= 1 and n_ctx >= 2, got {self.n_seq} x {self.n_ctx}")
        if not isinstance(self.seed, numbers.Integral) or self.seed < 0:  # (llama.cpp's -1, a random seed, would break that)
            raise AlphaQError(f"--seed {self.seed}: must be an integer >= 0 (the self text is seeded, so that two "
                              "runs write byte-identical files)")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise AlphaQError(f"sampling temperature {self.temperature} must be a positive number")


def _banned(session) -> np.ndarray:
    """Tokens never drawn: end-of-generation and control tokens (BOS among them)."""
    lc, vocab = session._lc, session._vocab
    ban = np.zeros(session.n_vocab, dtype=bool)
    for tok in range(session.n_vocab):
        ban[tok] = bool(lc.llama_vocab_is_eog(vocab, tok)) or bool(lc.llama_vocab_is_control(vocab, tok))
    if ban.all():
        raise AlphaQError("every token of the vocabulary is an end or control token; nothing to sample")
    return ban


def draw(logits: np.ndarray, ban: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``logits`` from softmax(logits / T), banned tokens excluded.

    Inverse-CDF sampling in float64 with one uniform number per row, so the draw depends only on
    the logits and the generator state."""
    z = logits.astype(np.float64) / temperature
    z[:, ban] = -np.inf
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(z)) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), len(ban) - 1).astype(np.int32)


def sample(model: Path, cfg: SelfTextConfig = SelfTextConfig(), *, progress: bool = False,
           n_threads: int | None = None) -> np.ndarray:
    """(n_seq, n_ctx) int32 tokens the model wrote, each row starting with BOS."""
    from tqdm import tqdm

    from alphaq.runtime.forward import Session

    rng = np.random.default_rng(cfg.seed)
    with Session(model, cfg.n_ctx, n_seq=cfg.n_seq, n_threads=n_threads) as s:
        if s.bos < 0:
            raise AlphaQError(f"{model} has no BOS token to start its own text from")
        ban = _banned(s)
        pause_for_test("self text")
        out = np.zeros((cfg.n_seq, cfg.n_ctx), dtype=np.int32)
        out[:, 0] = s.bos
        s.clear()
        for pos in tqdm(range(cfg.n_ctx - 1), desc="self text", unit="tok", disable=not progress,
                        dynamic_ncols=True):
            logits = s.step(out[:, pos], pos)
            out[:, pos + 1] = draw(logits, ban, cfg.temperature, rng)
    return out


def sample_cache_path(key: str, cfg: SelfTextConfig, cache_dir: Path | None = None) -> Path:
    """Where `cached_sample` keeps the text of the model whose fingerprint is ``key``."""
    d = Path(cache_dir) if cache_dir else cache_root() / "selftext"
    return d / f"{key}-{cfg.n_seq}x{cfg.n_ctx}-t{cfg.temperature:g}-s{cfg.seed}.npy"


def load_sample(path: Path) -> np.ndarray | None:
    """The cached tokens at ``path``, or None when there are none (or they are unreadable)."""
    try:
        return np.load(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        return None


def cached_sample(model: Path, cfg: SelfTextConfig = SelfTextConfig(), *, progress: bool = False,
                  cache_dir: Path | None = None, key: str | None = None) -> np.ndarray:
    """`sample`, cached under ~/.cache/alphaq/selftext keyed by the model's content and ``cfg``."""
    path = sample_cache_path(key or fingerprint(model), cfg, cache_dir)
    tokens = load_sample(path)
    if tokens is not None and tokens.shape == (cfg.n_seq, cfg.n_ctx):
        log.info("self text: reusing %s", path)
        return tokens
    tokens = sample(model, cfg, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, tokens)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps({"model": str(model), **asdict(cfg)}, indent=1) + "\n")
    return tokens


def detokenize(model: Path, tokens: np.ndarray) -> list[str]:
    """The sequences as text, for a person to read what the model wrote."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return [llm.detokenize([int(t) for t in row[1:]]).decode("utf-8", errors="replace") for row in tokens]
