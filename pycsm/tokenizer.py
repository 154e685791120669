"""CSM-1B text tokenizer: Llama-3 byte-level BPE, built with the ``tokenizers`` package.

A CSM GGUF file stores only ``tokenizer.ggml.tokens`` (128256 strings in GPT-2 byte-to-unicode form,
index = id, ids 128000.. are specials such as ``<|begin_of_text|>``) and ``tokenizer.ggml.merges``
(``"left right"`` strings, in priority order). The pre-tokenizer is not stored; it is Llama-3's split
regex, supplied here. The pipeline is the one of Llama-3's / csm-1b's ``tokenizer.json``:

* no normalizer;
* pre-tokenizer: ``Split(LLAMA3_PATTERN, isolated)`` then ``ByteLevel(add_prefix_space=False,
  use_regex=False)``;
* model: BPE with the merges and ``ignore_merges=True`` (a pre-token that is itself in the vocabulary
  is emitted whole, as tiktoken does);
* decoder: ``ByteLevel``;
* special tokens (ids >= 128000, and any token of the form ``<|...|>``) registered as added special
  tokens, so they are never split and, by default, are recognised when they appear in the input text.

The GGUF metadata is read by a small self-contained reader (:func:`read_gguf_metadata`) that maps the
file, walks only the header and the key/value section, and checks every count and length against the
file size, raising :class:`ValueError` for a truncated or corrupt file.
"""

from __future__ import annotations

import mmap
import numbers
import os
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "LLAMA3_PATTERN",
    "SPECIAL_TOKEN_START",
    "Tokenizer",
    "read_gguf_metadata",
]

#: Llama-3's pre-tokenizer split regex (tiktoken and Hugging Face use the same one).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: First id of the special tokens in the Llama-3 vocabulary.
SPECIAL_TOKEN_START = 128000

_SPECIAL_FORM = re.compile(r"<\|.*\|>", re.DOTALL)

GGUF_TOKENS_KEY = "tokenizer.ggml.tokens"
GGUF_MERGES_KEY = "tokenizer.ggml.merges"
GGUF_TEXT_VOCAB_KEY = "csm.text_vocab_size"
MAX_MERGES = 1 << 20  # Llama 3 has 280 147


class Tokenizer:
    """Llama-3 byte-level BPE tokenizer as used by CSM-1B.

    Args:
        tokens: the vocabulary, index = id, strings in GPT-2 byte-to-unicode form (128256 for CSM).
        merges: BPE merges as ``"left right"`` strings, highest priority first.
        bos_id: id of ``<|begin_of_text|>`` (128000).
        eos_id: id of ``<|end_of_text|>`` (128001).

    Special tokens typed in the text: the CSM reference (Sesame's generator and transformers'
    ``CsmProcessor``) encodes the prompt with the Hugging Face tokenizer, which matches added special
    tokens in the input before pre-tokenizing. This class does the same by default: ``encode("<|AUDIO|>")``
    is ``[128002]``, not the ids of ``<``, ``|``, ``AUDIO``, ``|>``. Pass ``parse_special=False`` to
    :meth:`encode` / :meth:`encode_segment` to treat such text as ordinary characters (as
    ``tiktoken``'s ``encode(text, disallowed_special=())`` does), e.g. for untrusted input.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        bos_id: int = 128000,
        eos_id: int = 128001,
    ) -> None:
        tokens = list(tokens)
        merges = list(merges)
        if not tokens:
            raise ValueError("tokenizer vocabulary is empty")
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"token {i} is not a non-empty string: {tok!r}")
            if tok in vocab:
                raise ValueError(f"token {tok!r} appears twice in the vocabulary (ids {vocab[tok]} and {i})")
            vocab[tok] = i
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not _is_int(value) or not 0 <= value < len(tokens):
                raise ValueError(f"{name} {value!r} is not a valid id (vocabulary has {len(tokens)} tokens)")

        pairs: list[tuple[str, str]] = []
        for i, merge in enumerate(merges):
            if not isinstance(merge, str):
                raise ValueError(f"merge {i} is not a string: {merge!r}")
            cut = merge.find(" ", 1)  # as llama.cpp: the left part may itself start with a space
            if cut <= 0 or cut == len(merge) - 1:
                raise ValueError(f"merge {i} is not of the form 'left right': {merge!r}")
            left, right = merge[:cut], merge[cut + 1 :]
            if left not in vocab or right not in vocab or left + right not in vocab:
                raise ValueError(f"merge {i} ({merge!r}) uses or produces a token missing from the vocabulary")
            pairs.append((left, right))

        self._tokens: list[str] = tokens
        self._bos_id = int(bos_id)
        self._eos_id = int(eos_id)
        self._special_ids = frozenset(
            i for i, tok in enumerate(tokens) if i >= SPECIAL_TOKEN_START or _SPECIAL_FORM.fullmatch(tok)
        )
        self._tk = _build_backend(vocab, pairs, [tokens[i] for i in sorted(self._special_ids)])
        for i in self._special_ids:
            if self._tk.token_to_id(tokens[i]) != i:  # would mean the backend renumbered a special
                raise RuntimeError(f"special token {tokens[i]!r} did not keep id {i}")
        self._tk_plain = None  # lazily built copy that does not parse special-token text

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, bos_id: int = 128000, eos_id: int = 128001) -> "Tokenizer":
        """Build the tokenizer from a GGUF file's ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``.

        Only the file's header and metadata are read (memory-mapped); a truncated or corrupt file,
        or one without these two string arrays, raises :class:`ValueError`.
        """
        meta = read_gguf_metadata(path, keys=(GGUF_TOKENS_KEY, GGUF_MERGES_KEY, GGUF_TEXT_VOCAB_KEY))
        # the bounds libcsm's loader applies (csm_model.cpp): no more strings than text tokens, at
        # most MAX_MERGES merges
        limits = {GGUF_TOKENS_KEY: meta.get(GGUF_TEXT_VOCAB_KEY), GGUF_MERGES_KEY: MAX_MERGES}
        for key in (GGUF_TOKENS_KEY, GGUF_MERGES_KEY):
            if key not in meta:
                raise ValueError(f"{os.fspath(path)}: GGUF file has no '{key}' metadata")
            value = meta[key]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ValueError(f"{os.fspath(path)}: GGUF metadata '{key}' is not an array of strings")
            limit = limits[key]
            if isinstance(limit, int) and len(value) > limit:
                raise ValueError(f"{os.fspath(path)}: GGUF metadata '{key}' has {len(value)} entries, more than {limit}")
        return cls(meta[GGUF_TOKENS_KEY], meta[GGUF_MERGES_KEY], bos_id=bos_id, eos_id=eos_id)

    # ------------------------------------------------------------------ properties

    @property
    def n_vocab(self) -> int:
        """Number of token ids (128256 for CSM-1B)."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids registered as special tokens."""
        return self._special_ids

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of ``token_id`` (byte-to-unicode form)."""
        self._check_ids([token_id])
        return self._tokens[token_id]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, without BOS/EOS.

        With ``parse_special`` (the default, as the Hugging Face tokenizer CSM's reference uses),
        special-token text such as ``"<|AUDIO|>"`` becomes that token's id.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        backend = self._tk if parse_special else self._plain_backend()
        return backend.encode(text, add_special_tokens=False).ids

    def encode_segment(self, text: str, speaker: int, *, parse_special: bool = True) -> list[int]:
        """A CSM text segment: ``[BOS] + encode(f"[{speaker}]{text}") + [EOS]``.

        ``speaker`` must be a non-negative integer (``bool`` is refused).
        """
        if not _is_int(speaker) or speaker < 0:
            raise ValueError(f"speaker must be a non-negative integer, got {speaker!r}")
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        return [self._bos_id, *self.encode(f"[{int(speaker)}]{text}", parse_special=parse_special), self._eos_id]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Special tokens are rendered as their text unless ``skip_special_tokens``.

        Byte sequences that are not valid UTF-8 (e.g. half of a multi-byte character) decode to
        U+FFFD, as in the Hugging Face tokenizer.
        """
        ids = list(ids)
        self._check_ids(ids)
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ internals

    def _check_ids(self, ids: Sequence[Any]) -> None:
        n = len(self._tokens)
        for i in ids:
            if not _is_int(i) or not 0 <= i < n:
                raise ValueError(f"token id {i!r} is out of range [0, {n})")

    def _plain_backend(self):
        if self._tk_plain is None:
            from tokenizers import Tokenizer as _HFTokenizer

            plain = _HFTokenizer.from_str(self._tk.to_str())
            plain.encode_special_tokens = True  # special-token text is split like ordinary text
            self._tk_plain = plain
        return self._tk_plain

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, bos_id={self._bos_id}, eos_id={self._eos_id})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HFTokenizer

    # Every token, specials included, goes into the BPE vocabulary so that the specials keep their
    # ids when registered below (the added vocabulary reuses an id the model already has).
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    if specials:
        tk.add_special_tokens(
            [
                AddedToken(s, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
                for s in specials
            ]
        )
    return tk


# ====================================================================== GGUF metadata reader

_GGUF_MAGIC = b"GGUF"
_GGUF_SUPPORTED_VERSIONS = (2, 3)  # v2 and v3 share the layout (64-bit counts); v1 used 32-bit ones

_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32, _T_BOOL = range(8)
_T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = range(8, 13)

_SCALAR_FORMATS = {
    _T_UINT8: "B",
    _T_INT8: "b",
    _T_UINT16: "H",
    _T_INT16: "h",
    _T_UINT32: "I",
    _T_INT32: "i",
    _T_FLOAT32: "f",
    _T_BOOL: "B",
    _T_UINT64: "Q",
    _T_INT64: "q",
    _T_FLOAT64: "d",
}
_SCALAR_SIZES = {t: struct.calcsize("<" + f) for t, f in _SCALAR_FORMATS.items()}
# Smallest encoded size of one value of each type (for validating counts before walking them).
_MIN_SIZES = {**_SCALAR_SIZES, _T_STRING: 8, _T_ARRAY: 12}
_MAX_ARRAY_DEPTH = 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _GGUFReader:
    def __init__(self, buf, size: int, path: str) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, message: str):
        raise ValueError(f"{self.path}: corrupt or truncated GGUF file: {message}")

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, but only {left} remain")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, decode: bool = True) -> str | None:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        if not decode:
            return None
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} at offset {start} is not valid UTF-8 ({e.reason})")

    def value(self, vtype: int, what: str, decode: bool, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            size = _SCALAR_SIZES[vtype]
            self.need(size, what)
            start = self.pos
            self.pos += size
            if not decode:
                return None
            (v,) = struct.unpack_from("<" + _SCALAR_FORMATS[vtype], self.buf, start)
            return bool(v) if vtype == _T_BOOL else v
        if vtype == _T_STRING:
            return self.string(what, decode)
        if vtype == _T_ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                self.fail(f"{what}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
            etype = self.u32(f"element type of {what}")
            if etype not in _MIN_SIZES:
                self.fail(f"{what}: unknown array element type {etype}")
            count = self.u64(f"element count of {what}")
            min_size = _MIN_SIZES[etype]
            if count > (self.size - self.pos) // min_size:
                self.fail(
                    f"{what}: {count} elements of type {etype} cannot fit in the "
                    f"{self.size - self.pos} bytes left at offset {self.pos}"
                )
            if etype in _SCALAR_FORMATS:
                start = self.pos
                self.pos += count * min_size
                if not decode:
                    return None
                values = list(struct.unpack_from(f"<{count}{_SCALAR_FORMATS[etype]}", self.buf, start))
                return [bool(v) for v in values] if etype == _T_BOOL else values
            if etype == _T_STRING:
                return self._string_array(count, what, decode)
            out = []
            for i in range(count):
                v = self.value(etype, f"{what}[{i}]", decode, depth + 1)
                if decode:
                    out.append(v)
            return out if decode else None
        self.fail(f"{what}: unknown value type {vtype}")

    def _string_array(self, count: int, what: str, decode: bool) -> list[str] | None:
        # Hot loop (hundreds of thousands of strings): inlined checks, same messages as string().
        buf, size, unpack = self.buf, self.size, _U64.unpack_from
        pos = self.pos
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            if decode:
                try:
                    append(buf[pos : pos + n].decode("utf-8"))
                except UnicodeDecodeError as e:
                    self.fail(f"{what}[{i}] at offset {pos} is not valid UTF-8 ({e.reason})")
            pos += n
        self.pos = pos
        return out if decode else None


def read_gguf_metadata(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Read the key/value metadata of a GGUF file (version 2 or 3, little-endian).

    Args:
        path: the GGUF file. It is memory-mapped; only the header and the metadata section are
            touched, so multi-gigabyte files are cheap to read.
        keys: if given, only these keys are decoded and returned; the others are skipped (their
            types, counts and lengths are still checked against the file size, their strings are
            not UTF-8 decoded). By default every key is returned.

    Returns:
        ``{key: value}``: ints, floats, bools, strings, and (nested) lists for arrays.

    Raises:
        ValueError: not a GGUF file, unsupported version, or any count or length that does not fit
            in the file (truncated or corrupt).
    """
    path_str = os.fspath(path)
    wanted = None if keys is None else set(keys)
    with open(path_str, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path_str}: not a GGUF file (only {size} bytes, the header alone is 24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_metadata(_GGUFReader(buf, size, path_str), wanted)


def _read_metadata(r: _GGUFReader, wanted: set[str] | None) -> dict[str, Any]:
    magic = bytes(r.buf[0:4])
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{r.path}: not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    r.pos = 4
    version = r.u32("version")
    if version not in _GGUF_SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in _GGUF_SUPPORTED_VERSIONS:
            raise ValueError(f"{r.path}: big-endian GGUF files are not supported")
        raise ValueError(f"{r.path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata key/value count")
    left = r.size - r.pos
    # Each key/value needs at least 8 (key length) + 4 (type) + 1 (value) bytes; each tensor info at
    # least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    if n_kv > left // 13 or n_tensors > left // 24 or n_kv * 13 + n_tensors * 24 > left:
        r.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than {left} bytes can hold")

    out: dict[str, Any] = {}
    seen: set[str] = set()
    for i in range(n_kv):
        key = r.string(f"key of metadata entry {i}")
        if key in seen:
            r.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = r.u32(f"type of metadata '{key}'")
        decode = wanted is None or key in wanted
        value = r.value(vtype, f"metadata '{key}'", decode)
        if decode:
            out[key] = value
    return out
