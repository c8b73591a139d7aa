"""llama-quantize's override flags, with its spelling and meaning (docs/ALLOCATION.md, "Pins").

* ``--tensor-type PATTERN=TYPE`` / ``--tensor-type-file FILE`` (tools/quantize/quantize.cpp
  ``parse_tensor_type``, ``parse_tensor_type_file``): the file holds the same entries separated by
  whitespace; the pattern is lower-cased (ASCII) and matched with ``std::regex_search`` against
  each tensor name that llama.cpp quantises, unanchored, first matching entry wins
  (src/llama-quant.cpp ``llama_tensor_get_type``).
* ``--output-tensor-type`` / ``--token-embedding-type``: output.weight / token_embd.weight (and
  per_layer_token_embd.weight unless a pattern names it) take that type, before any pattern.
* ``--leave-output-tensor`` (``quantize_output_tensor = false``): output.weight keeps the type it
  has in the model quantised (BF16 from an HF checkpoint); here a pin to that type.
* ``--override-kv KEY=TYPE:VALUE`` (common/common.cpp ``string_parse_kv_override``): written into
  the output's metadata by llama.cpp's quantiser itself.

In alphaq a pinned tensor is a fixed item of the allocation: its bytes count against the budget
and the knapsack allocates the rest. Its type goes through llama.cpp's shape fallback
(qtypes.effective_type) like every other type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from alphaq.errors import AlphaQError, InputError
from alphaq.gguf.qtypes import llama_quantizes, resolve_type

OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
PER_LAYER_TOKEN_EMBD = "per_layer_token_embd.weight"  # llama-quant.cpp tensor_name_match_token_embd

# C isspace() in the "C" locale: what `std::ifstream >> std::string` splits the file at
_CXX_SPACE = re.compile(rb"[ \t\n\v\f\r]+")
# Python-only group syntax that ECMAScript (std::regex's default grammar) rejects or reads
# differently: named groups, lookbehind, inline flags, comments; (?: (?= (?! are shared
_PYTHON_ONLY_GROUP = re.compile(r"\(\?(?![:=!])")


# ----------------------------------------------------------------------------------------------
# --tensor-type / --tensor-type-file
# ----------------------------------------------------------------------------------------------


def parse_tensor_type(text: str, source: str = "--tensor-type") -> tuple[str, str]:
    """One ``PATTERN=TYPE`` entry -> (lower-cased pattern, canonical type name); checks both."""
    pattern, sep, type_name = text.partition("=")
    form = "the form is PATTERN=TYPE, e.g. attn_v=q8_0"
    if not sep:
        raise InputError(f"{source} {text!r} has no '='; {form}")
    if not pattern:
        raise InputError(f"{source} {text!r} names no tensor pattern; {form}")
    if not type_name:
        raise InputError(f"{source} {text!r} names no type; {form}")
    pattern = pattern.encode().lower().decode()  # quantize.cpp: std::transform(..., tolower)
    return compile_pattern(pattern, source).pattern, pin_type(type_name, f"{source} {text!r}")


def read_tensor_type_file(path: str | Path) -> list[tuple[str, str]]:
    """The entries of a llama-quantize --tensor-type-file, in file order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--tensor-type-file {path}: cannot read it ({exc.strerror or exc})") from None
    entries = []
    for word in _CXX_SPACE.split(data):
        if word:
            try:
                text = word.decode()
            except UnicodeDecodeError:
                raise InputError(f"--tensor-type-file {path}: entry {word[:60]!r} is not UTF-8") from None
            entries.append(parse_tensor_type(text, f"--tensor-type-file {path}: entry"))
    return entries


def tensor_type_entries(tensor_type: str | Iterable[str] | None = (),
                        tensor_type_file: str | Path | Iterable[str | Path] | None = ()) -> tuple[tuple[str, str], ...]:
    """--tensor-type entries followed by those of each --tensor-type-file (the Python API's order;
    the CLI keeps the command line's order, as llama-quantize does)."""
    if isinstance(tensor_type, str):
        tensor_type = [tensor_type]
    entries = [parse_tensor_type(t) for t in tensor_type or ()]
    for f in tensor_type_files(tensor_type_file):
        entries.extend(read_tensor_type_file(f))
    return tuple(entries)


def tensor_type_files(tensor_type_file: str | Path | Iterable[str | Path] | None) -> tuple[Path, ...]:
    """The Python API's tensor_type_file (one path or several, or None) as paths."""
    if isinstance(tensor_type_file, (str, Path)):
        tensor_type_file = [tensor_type_file]
    return tuple(Path(f) for f in tensor_type_file or ())


def compile_pattern(pattern: str, source: str = "--tensor-type") -> re.Pattern:
    """The pattern as Python compiles it; a one-line error for an invalid one or for syntax only
    Python accepts (llama.cpp compiles it with std::regex, ECMAScript grammar)."""
    if _PYTHON_ONLY_GROUP.search(pattern):
        raise InputError(f"{source} pattern {pattern!r} uses Python-only '(?...' syntax; llama.cpp's "
                          "std::regex (ECMAScript) accepts only (?: (?= (?!")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InputError(f"{source} pattern {pattern!r} is not a valid regular expression: {exc}") from None


def pin_type(name: str, source: str) -> str:
    """Canonical name of a pin's type (any type alphaq knows a size and bit width for)."""
    try:
        return resolve_type(name).name
    except AlphaQError as exc:
        raise InputError(f"{source}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# which tensor each pin takes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pins:
    types: dict[str, tuple[str, str]]  # tensor -> (requested type name, why), model order
    unused: tuple[str, ...]  # one line per flag or entry that pins no tensor (a warning)


def resolve_pins(names_and_shapes: Iterable[tuple[str, Sequence[int]]], output_tensor_type: str | None,
                 token_embedding_type: str | None, tensor_types: Sequence[tuple[str, str]],
                 output_flag: str = "--output-tensor-type") -> Pins:
    """The pinned type of every tensor llama.cpp quantises that a pin takes, in llama.cpp's order
    (llama-quant.cpp llama_tensor_get_type): --token-embedding-type, --output-tensor-type (or
    ``output_flag``, the flag that set output_tensor_type: --leave-output-tensor), then the first
    --tensor-type entry whose pattern std::regex_search finds in the name."""
    compiled = [(compile_pattern(p), t) for p, t in tensor_types]
    won = [0] * len(compiled)
    matched = [0] * len(compiled)
    types: dict[str, tuple[str, str]] = {}
    quantised = [n for n, shape in names_and_shapes if llama_quantizes(n, shape)]
    for name in quantised:
        hits = [i for i, (rx, _) in enumerate(compiled) if rx.search(name)]
        for i in hits:
            matched[i] += 1
        if token_embedding_type and name in (TOKEN_EMBD, PER_LAYER_TOKEN_EMBD) and not (
                name == PER_LAYER_TOKEN_EMBD and hits):
            types[name] = (token_embedding_type, "pinned: --token-embedding-type")
        elif output_tensor_type and name == OUTPUT:
            types[name] = (output_tensor_type, f"pinned: {output_flag}")
        elif hits:
            won[hits[0]] += 1
            pattern, t = tensor_types[hits[0]]
            types[name] = (t, f"pinned: --tensor-type {pattern}={t.lower()}")
    return Pins(types, _unused(quantised, output_tensor_type, token_embedding_type, tensor_types, won, matched,
                               output_flag))


def _unused(quantised, output_tensor_type, token_embedding_type, tensor_types, won, matched,
            output_flag) -> tuple[str, ...]:
    """llama-quantize ignores these silently; alphaq names them in the summary."""
    unused = []
    if output_tensor_type and OUTPUT not in quantised:
        flag = output_flag + ("" if output_flag == "--leave-output-tensor" else f" {output_tensor_type.lower()}")
        unused.append(f"{flag}: the model has no {OUTPUT} (tied embeddings); nothing pinned")
    if token_embedding_type and not ({TOKEN_EMBD, PER_LAYER_TOKEN_EMBD} & set(quantised)):
        unused.append(f"--token-embedding-type {token_embedding_type.lower()}: the model has no {TOKEN_EMBD}; "
                      "nothing pinned")
    for (pattern, t), w, m in zip(tensor_types, won, matched):
        if w == 0:
            why = ("every tensor it matches is taken by an earlier pin" if m
                   else "it matches no tensor that llama.cpp quantises")
            unused.append(f"--tensor-type {pattern}={t.lower()} pins nothing: {why}")
    return tuple(unused)


# ----------------------------------------------------------------------------------------------
# --override-kv
# ----------------------------------------------------------------------------------------------

KV_KINDS = ("int", "float", "bool", "str")
_KV_FORM = "the form is KEY=TYPE:VALUE with TYPE int, float, bool or str, e.g. general.name=str:my-model"
# keys alphaq writes itself or plans the file's layout with
_RESERVED_KEYS = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT)
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class KVOverride:
    key: str
    kind: str  # "int", "float", "bool" or "str" (llama_model_kv_override_type)
    value: int | float | bool | str

    @property
    def gguf_bytes(self) -> int:
        """Bytes the key/value adds to a GGUF header at most (key, value type, value as llama.cpp
        writes it: int as u32, float as f32)."""
        size = {"int": 4, "float": 4, "bool": 1}.get(self.kind) or 8 + len(str(self.value).encode())
        return 8 + len(self.key.encode()) + 4 + size


def parse_kv_override(text: str) -> KVOverride:
    """``KEY=TYPE:VALUE`` as common.cpp string_parse_kv_override reads it, but strict: a value
    llama.cpp would misread (atol/atof of junk, a negative or too large int) is an error."""
    key, sep, rest = text.partition("=")
    if not sep or not key:
        raise InputError(f"--override-kv {text!r}: {'no key' if sep else 'no =' }; {_KV_FORM}")
    if len(key.encode()) > 127:
        raise InputError(f"--override-kv {text[:40]!r}...: the key is longer than llama.cpp's 127 bytes")
    if key.startswith("split."):  # llama-gguf-split's keys: written per part (--split-max-*), read by the loader
        raise InputError(f"--override-kv {text!r}: {key} is a split key, written by the split itself "
                         "(--split-max-size / --split-max-tensors); it cannot be overridden")
    if key.startswith("alphaq.") or key in _RESERVED_KEYS:
        raise InputError(f"--override-kv {text!r}: alphaq writes {key} itself (its plan, or the layout it plans); "
                          "it cannot be overridden")
    kind, colon, value = rest.partition(":")
    if not colon or kind not in KV_KINDS:
        raise InputError(f"--override-kv {text!r}: unknown type {kind!r}; {_KV_FORM}")
    return KVOverride(key, kind, _kv_value(text, kind, value))


def _kv_value(text: str, kind: str, value: str):
    if kind == "str":
        if len(value.encode()) > 127:
            raise InputError(f"--override-kv {text[:60]!r}...: a str value holds at most 127 bytes (llama.cpp)")
        return value
    if kind == "bool":
        if value not in ("true", "false"):
            raise InputError(f"--override-kv {text!r}: a bool is true or false; {_KV_FORM}")
        return value == "true"
    try:
        number = int(value, 10) if kind == "int" else float(value)
    except ValueError:
        raise InputError(f"--override-kv {text!r}: {value!r} is not a{'n' if kind == 'int' else ''} {kind}; "
                          f"{_KV_FORM}") from None
    if kind == "int" and not 0 <= number <= _UINT32_MAX:
        raise InputError(f"--override-kv {text!r}: llama.cpp writes an int as uint32, so it must be in "
                          f"0..{_UINT32_MAX}")
    return number


def kv_overrides(texts: str | Iterable[str] | None) -> tuple[KVOverride, ...]:
    if isinstance(texts, str):
        texts = [texts]
    return tuple(t if isinstance(t, KVOverride) else parse_kv_override(t) for t in texts or ())
