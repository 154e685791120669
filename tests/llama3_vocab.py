"""Llama-3 / CSM-1B text vocabulary rebuilt offline from llama-models' tiktoken ranks.

CSM-1B uses the Llama-3.2 tokenizer. Its ranks ship, in tiktoken format (``base64-token rank`` per
line), with the PyPI package ``llama-models`` as ``llama_models/llama3/tokenizer.model``. This module
turns them into what a CSM GGUF file stores (``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``)
and into a Hugging Face ``tokenizer.json`` equivalent to the one published with csm-1b.

Merges are rebuilt the way transformers' ``TikTokenConverter`` does it: for every multi-byte token,
every split into two pieces that are both in the vocabulary is a merge, ranked by the rank of the
token they produce (ties broken by the ranks of the two pieces). That yields exactly 280147 merges,
the count found in the published csm-1b GGUF files and in Llama-3's ``tokenizer.json``. With the BPE
model's ``ignore_merges`` flag (a pre-token that is itself in the vocabulary is emitted whole) this
reproduces tiktoken's rank-based merging.

Public helpers:

* :func:`load_ranks` - ``{token bytes: rank}`` (128000 entries).
* :func:`special_token_names` - the 256 names of ids 128000..128255 as CSM uses them.
* :func:`llama3_tokens_and_merges` - ``(tokens, merges)`` as tuples of str, cached.
* :func:`tiktoken_encoding` - a ``tiktoken.Encoding`` with Llama-3's split regex (the reference).
* :func:`build_hf_tokenizer` / :func:`write_tokenizer_json` - a ``tokenizers.Tokenizer`` / its JSON.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

N_BASE = 128000
N_SPECIAL = 256
N_VOCAB = N_BASE + N_SPECIAL
BOS_ID = 128000
EOS_ID = 128001

#: Llama-3's pre-tokenizer regex (identical in tiktoken's and Hugging Face's Llama-3 tokenizers).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_model_path() -> Path:
    """Path of llama-models' ``llama3/tokenizer.model`` (tiktoken ranks)."""
    import llama_models  # imported lazily: only needed when the ranks are used

    path = Path(llama_models.__file__).resolve().parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models does not ship {path}")
    return path


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (as in tokenizers' ByteLevel)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=None)
def _byte_translation() -> dict[int, str]:
    # latin-1 maps byte b to code point b, so str.translate applies the byte map in C.
    return {b: ch for b, ch in bytes_to_unicode().items()}


def token_bytes_to_string(token: bytes) -> str:
    """Token bytes in GPT-2 byte-to-unicode form (the form stored in tokenizer.json and GGUF)."""
    return token.decode("latin-1").translate(_byte_translation())


@functools.lru_cache(maxsize=None)
def load_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Read a tiktoken ranks file: ``{token bytes: rank}``. Ranks must be exactly 0..n-1."""
    path = Path(path) if path is not None else tokenizer_model_path()
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def special_token_names() -> list[str]:
    """Names of ids 128000..128255 as in csm-1b's ``tokenizer.json``.

    csm-1b's tokenizer is Meta's Llama-3.2-1B ``tokenizer.json`` (transformers' CSM conversion script
    copies it) with 128002 renamed ``<|AUDIO|>`` and 128003 ``<|audio_eos|>``. Llama-3.1/3.2's Hugging
    Face names differ from llama-models' ``llama3/tokenizer.py`` list at two ids: 128005 is
    ``<|reserved_special_token_2|>`` (llama-models: ``<|step_id|>``) and 128011 is
    ``<|reserved_special_token_3|>`` (llama-models: ``<|image|>``), so the reserved tokens run
    3..247 from 128011 (llama-models: 2..245). The Hugging Face naming is used here.
    """
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|AUDIO|>",  # Llama-3.2: <|reserved_special_token_0|>
        "<|audio_eos|>",  # Llama-3.2: <|reserved_special_token_1|>
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{3 + i}|>" for i in range(N_SPECIAL - len(names))]
    assert len(names) == N_SPECIAL and names[-1] == "<|reserved_special_token_247|>"
    return names


def build_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """All merges implied by tiktoken ranks, in priority order (transformers' TikTokenConverter)."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            rl = ranks.get(left)
            if rl is None:
                continue
            rr = ranks.get(right)
            if rr is None:
                continue
            merges.append((rank, rl, rr, left, right))
    merges.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


@functools.lru_cache(maxsize=None)
def llama3_tokens_and_merges() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(tokens, merges)`` as a CSM GGUF stores them: 128256 token strings in byte-to-unicode form
    (index = id, specials from 128000) and 280147 ``"left right"`` merge strings. Cached."""
    ranks = load_ranks()
    if len(ranks) != N_BASE:
        raise ValueError(f"expected {N_BASE} ranks, got {len(ranks)}")
    by_rank: list[bytes] = [b""] * N_BASE
    for token, rank in ranks.items():
        by_rank[rank] = token
    tokens = [token_bytes_to_string(t) for t in by_rank] + special_token_names()
    merges = [
        token_bytes_to_string(left) + " " + token_bytes_to_string(right)
        for left, right in build_merges(ranks)
    ]
    return tuple(tokens), tuple(merges)


@functools.lru_cache(maxsize=None)
def tiktoken_encoding():
    """The reference: ``tiktoken.Encoding`` with Llama-3's ranks, regex and CSM's specials."""
    import tiktoken

    return tiktoken.Encoding(
        name="llama3-csm",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=load_ranks(),
        special_tokens={name: N_BASE + i for i, name in enumerate(special_token_names())},
    )


def build_hf_tokenizer():
    """A ``tokenizers.Tokenizer`` laid out like csm-1b's ``tokenizer.json``.

    BPE model (base vocabulary 0..127999, the merges, ``ignore_merges``), no normalizer, pre-tokenizer
    ``Sequence[Split(Llama-3 regex, isolated), ByteLevel(add_prefix_space=False, use_regex=False)]``,
    ByteLevel decoder, the 256 specials as added special tokens, and Sesame's post-processor that
    wraps a single sequence in ``<|begin_of_text|> ... <|end_of_text|>`` when
    ``add_special_tokens=True``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges = llama3_tokens_and_merges()
    vocab = {tok: i for i, tok in enumerate(tokens[:N_BASE])}
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Specials are appended in id order, so they receive ids 128000.. (checked below).
    tok.add_special_tokens(
        [
            AddedToken(name, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for name in tokens[N_BASE:]
        ]
    )
    bos, eos = tokens[BOS_ID], tokens[EOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, BOS_ID), (eos, EOS_ID)],
    )
    for i in (N_BASE, N_BASE + 2, N_VOCAB - 1):
        if tok.token_to_id(tokens[i]) != i:
            raise RuntimeError(f"special token {tokens[i]!r} did not get id {i}")
    if tok.get_vocab_size(with_added_tokens=True) != N_VOCAB:
        raise RuntimeError("unexpected vocabulary size")
    return tok


def write_tokenizer_json(path: str | os.PathLike) -> Path:
    """Write a Hugging Face ``tokenizer.json`` equivalent to csm-1b's; returns the path."""
    path = Path(path)
    build_hf_tokenizer().save(str(path), pretty=False)
    return path
