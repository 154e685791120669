"""Tests for pycsm.tokenizer against tiktoken with the real Llama-3 ranks (from llama-models)."""

from __future__ import annotations

import functools
import os
import random
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for llama3_vocab
# Fallback only (appended): an installed pycsm takes precedence over the source tree.
sys.path.append(str(Path(__file__).resolve().parents[1]))

import llama3_vocab  # noqa: E402
from pycsm.tokenizer import Tokenizer, read_gguf_metadata  # noqa: E402

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")


# ---------------------------------------------------------------------------------------- fixtures


@functools.lru_cache(maxsize=None)
def llama3_tokenizer() -> Tokenizer:
    tokens, merges = llama3_vocab.llama3_tokens_and_merges()
    return Tokenizer(tokens, merges)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return llama3_vocab.tiktoken_encoding()


FRAGMENTS = [
    # numbers
    "1", "12", "123", "1234", "12345", "1234567", "3.14", "-42", "1,000", "1,000,000", "0.001",
    "2024-05-17", "+1 (555) 010-9999", "1e10", "0x1F", "100%", "$19.99", "€5", "½ ¾", "٣٤٥", "१२३",
    "１２３", "Ⅻ", "²³",
    # whitespace
    " ", "  ", "   ", "\t", "\t\t", " \t ", "\n", "\r\n", "\n\n\n", "\r", " \n ", "  \n\n  ",
    "\u00a0", "\u3000", "\u2003", "a  b", "trailing   ", "   leading", "\ttabbed\tline\t",
    # punctuation
    "!!!", "...", "?!?", "…", "--", "—", "«»", "“quoted”", "'single'", "(parens)", "[brackets]",
    "{braces}", "a,b;c:d", "!!!\n", "?\r\n", ".\n\n", "#hashtag", "@mention", "~~~", "***", "___",
    "=====", "-----", "aaaaaaaaaaaa", "zzzzzzzzzzzzzzzzzzzz", "ababababab", "!!!!!!!!!!!!!!!!",
    # contractions
    "don't", "I'M", "they'll", "we've", "you're", "she'd", "it's", "DON'T", "Y'all", "O'Neil",
    "rock 'n' roll", "'s", "'S", "students'", "can't've",
    # words / accents
    "Hello", "hello world", "HELLO WORLD", "café", "naïve", "Ünïcödé", "résumé", "façade",
    "Ångström", "Straße", "São Paulo", "Zürich", "ŁÓDŹ", "İstanbul", "ﬁne", "e\u0301",
    # scripts
    "你好，世界", "日本語のテキスト", "한국어 문장", "Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Xin chào thế giới",
    "Tôi có nhiều việc phải làm điều hợp", "ሰላም ልዑል", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "hello世界мир", "abcАБВαβγ", "ｆｕｌｌｗｉｄｔｈ",
    # emoji
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵🇺🇸", "❤️", "🤖 robots!", "🎉🎉🎉", "1️⃣", "👩🏾‍💻",
    # urls / code
    "https://example.com/path?q=1&x=y#frag", "http://localhost:8080/", "user@example.org",
    "C:\\Users\\me\\file.txt", "/usr/local/bin/python3", "def f(x):\n    return x**2\n",
    "if (a && b) { return -1; }", "for i in range(10): print(i)", "x = [1, 2, 3]  # comment",
    "<div class=\"a\">hi</div>", "SELECT * FROM t WHERE id=42;", "{\"key\": [true, null]}",
    "    indented", "\tdef g():\n\t\tpass", "a->b", "a=>b", "i++", "!==", "<=>", "#include <stdio.h>",
    # CSM-ish text
    "[0]Hello there.", "[1]How are you doing today?", "Um, well... I mean—yeah.",
]

SEPARATORS = ["", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \n", "   ", ", ", ". ", "\n \n"]

CHAR_POOL = (
    [chr(c) for c in range(0x20, 0x7F)]
    + [chr(c) for c in range(0xA0, 0x180)]
    + [chr(c) for c in range(0x391, 0x3CA)]
    + [chr(c) for c in range(0x410, 0x450)]
    + [chr(c) for c in range(0x5D0, 0x5EB)]
    + [chr(c) for c in range(0x627, 0x64B)]
    + [chr(c) for c in range(0x900, 0x97F)]
    + [chr(c) for c in range(0x300, 0x370)]  # combining marks
    + [chr(c) for c in range(0x3040, 0x30FF)]
    + [chr(c) for c in range(0x4E00, 0x4F00)]
    + [chr(c) for c in range(0xAC00, 0xAD00)]
    + [chr(c) for c in range(0x1F300, 0x1F650)]
    + [chr(c) for c in range(0x1D400, 0x1D500)]
    + ["\u200d", "\ufe0f", "\u00a0", "\u2028", "\u3000", "\t", "\n", "\r", "\r\n", " ", " ", " "]
)


@functools.lru_cache(maxsize=None)
def corpus() -> tuple[str, ...]:
    rng = random.Random(20240517)
    lines: list[str] = list(FRAGMENTS)
    templates = ["{}", " {}", "{} ", "  {}  ", "The value is {}.", "\t{}\n", "({})", "x{}y", "{}\n\n\n"]
    for frag in FRAGMENTS:
        lines.append(rng.choice(templates).format(frag))
    for _ in range(400):
        parts = rng.sample(FRAGMENTS, rng.randint(2, 6))
        text = parts[0]
        for p in parts[1:]:
            text += rng.choice(SEPARATORS) + p
        lines.append(text)
    for _ in range(150):
        lines.append("".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 40))))
    for n in range(1, 25):  # runs of digits and spaces of every length
        lines.append("9" * n)
        lines.append("x" + " " * n + "y")
        lines.append(" " * n)
        lines.append("\n" * n)
    return tuple(lines)


SPECIAL_LINES = [
    "<|AUDIO|>",
    "<|begin_of_text|>hello<|end_of_text|>",
    "text <|audio_eos|> more",
    "<|AUDIO|><|AUDIO|>",
    " <|eot_id|>\n",
    "<|reserved_special_token_200|>x",
    "<|not_a_token|> <|AUDIO",
]


# ------------------------------------------------------------------------------------------ vocab


def test_vocab_shape():
    tokens, merges = llama3_vocab.llama3_tokens_and_merges()
    assert len(tokens) == 128256
    assert len(set(tokens)) == len(tokens)
    assert len(merges) == 280147  # the count in the published csm-1b GGUF files
    assert tokens[128000] == "<|begin_of_text|>"
    assert tokens[128001] == "<|end_of_text|>"
    assert tokens[128002] == "<|AUDIO|>"
    assert tokens[128003] == "<|audio_eos|>"
    assert tokens[128009] == "<|eot_id|>"
    assert tokens[128255] == "<|reserved_special_token_247|>"
    assert tokens[220] == "Ġ" and tokens[198] == "Ċ"
    assert merges[0] == "Ġ Ġ"


def test_corpus_size():
    assert len(corpus()) >= 500


# ---------------------------------------------------------------------------- encode vs tiktoken


def test_encode_matches_tiktoken(tok, ref):
    mismatches = []
    for line in corpus():
        ours = tok.encode(line)
        theirs = ref.encode(line, disallowed_special=())
        if ours != theirs:
            mismatches.append((line, ours, theirs))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]!r}"


def test_encode_whole_corpus_matches_tiktoken(tok, ref):
    text = "\n".join(corpus())
    assert tok.encode(text) == ref.encode(text, disallowed_special=())


def test_every_vocab_token_text_matches_tiktoken(tok, ref):
    """Each base token whose bytes are valid UTF-8, encoded as text, matches tiktoken. This catches
    tokens that BPE merges alone cannot reach (588 of them, e.g. ' việc'; BPE's ignore_merges)."""
    texts = []
    for token in llama3_vocab.load_ranks():
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    assert len(texts) > 120000
    mismatches = []
    for text in texts:
        ours, theirs = tok.encode(text), ref.encode_ordinary(text)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]!r}"


def test_special_tokens_parsed_like_hf(tok, ref):
    for line in SPECIAL_LINES:
        assert tok.encode(line) == ref.encode(line, allowed_special="all"), line
        assert tok.encode(line, parse_special=False) == ref.encode(line, disallowed_special=()), line
    assert tok.encode("<|AUDIO|>") == [128002]
    assert tok.encode("<|audio_eos|>") == [128003]
    assert 128002 not in tok.encode("<|AUDIO|>", parse_special=False)


def test_decode_round_trip(tok):
    for line in corpus() + tuple(SPECIAL_LINES):
        assert tok.decode(tok.encode(line)) == line
        assert tok.decode(tok.encode(line, parse_special=False)) == line


def test_decode_special_and_errors(tok):
    ids = tok.encode_segment("hi", 0)
    assert tok.decode(ids) == "<|begin_of_text|>[0]hi<|end_of_text|>"
    assert tok.decode(ids, skip_special_tokens=True) == "[0]hi"
    assert tok.decode([]) == ""
    for bad in ([-1], [tok.n_vocab], [1.5], ["3"], [True]):
        with pytest.raises(ValueError):
            tok.decode(bad)


def test_encode_empty_and_type(tok):
    assert tok.encode("") == []
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- segments


def test_encode_segment(tok, ref):
    ids = tok.encode_segment("Hello there.", 0)
    assert ids[0] == 128000 and ids[-1] == 128001
    assert ids[1:-1] == tok.encode("[0]Hello there.")
    assert ids[1:-1] == ref.encode("[0]Hello there.", disallowed_special=())
    assert tok.decode(ids[1:-1]) == "[0]Hello there."
    ids7 = tok.encode_segment("  two\nlines ", 7)
    assert ids7 == [128000] + tok.encode("[7]  two\nlines ") + [128001]
    assert tok.encode_segment("", 3) == [128000] + tok.encode("[3]") + [128001]
    assert tok.encode_segment("x", 12345)[1:-1] == tok.encode("[12345]x")
    np = pytest.importorskip("numpy")
    assert tok.encode_segment("x", np.int64(2)) == tok.encode_segment("x", 2)


@pytest.mark.parametrize("speaker", [-1, 1.0, "0", None, True, False, 2.5])
def test_bad_speaker(tok, speaker):
    with pytest.raises(ValueError):
        tok.encode_segment("hello", speaker)


def test_properties(tok):
    assert tok.n_vocab == 128256
    assert tok.bos_id == 128000 and tok.eos_id == 128001
    assert tok.special_ids == frozenset(range(128000, 128256))
    assert tok.id_to_token(128002) == "<|AUDIO|>"


# ------------------------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_matches(tok, tmp_path):
    path = llama3_vocab.write_tokenizer_json(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.get_vocab_size(with_added_tokens=True) == 128256
    for line in corpus() + tuple(SPECIAL_LINES):
        assert hf.encode(line, add_special_tokens=False).ids == tok.encode(line), line
    for speaker, text in [(0, "Hello there."), (1, " spaced  out\n"), (5, "<|AUDIO|>")]:
        assert hf.encode(f"[{speaker}]{text}", add_special_tokens=True).ids == tok.encode_segment(text, speaker)


# ------------------------------------------------------------------------------------------ GGUF


def _write_gguf(path: Path, tokens, merges, extra=None, endianess=None) -> Path:
    kwargs = {} if endianess is None else {"endianess": endianess}
    w = gguf.GGUFWriter(str(path), "csm-tts", **kwargs)
    w.add_uint32("csm.text_vocab_size", len(tokens))
    w.add_token_list(list(tokens))
    w.add_token_merges(list(merges))
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_vocab():
    """Byte tokens, a handful of merges and two specials: a small but valid byte-level BPE."""
    byte_chars = list(llama3_vocab.bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l", "Ġworl d"]
    tokens = byte_chars + [m.replace(" ", "") for m in merges] + ["<|begin_of_text|>", "<|end_of_text|>"]
    return tokens, merges


def _tiny_gguf(tmp_path: Path) -> Path:
    tokens, merges = _tiny_vocab()
    return _write_gguf(tmp_path / "tiny.gguf", tokens, merges)


def _kv_end(path: Path) -> int:
    """Offset where the metadata section ends, from the gguf package's own reader."""
    reader = gguf.GGUFReader(str(path))
    end = 0
    for field in reader.fields.values():
        end = max(end, field.offset + sum(int(p.nbytes) for p in field.parts))
    return end


def test_from_gguf_round_trip_full(tok, tmp_path):
    tokens, merges = llama3_vocab.llama3_tokens_and_merges()
    path = _write_gguf(tmp_path / "csm-tok.gguf", tokens, merges)
    loaded = Tokenizer.from_gguf(path)
    assert loaded.n_vocab == 128256
    lines = corpus()[::3] + tuple(SPECIAL_LINES)
    for line in lines:
        assert loaded.encode(line) == tok.encode(line), line
    assert loaded.encode_segment("Hi", 1) == tok.encode_segment("Hi", 1)
    meta = read_gguf_metadata(path, keys=["tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
    assert meta["tokenizer.ggml.tokens"] == list(tokens)
    assert meta["tokenizer.ggml.merges"] == list(merges)


def test_tiny_tokenizer_from_gguf(tmp_path):
    path = _tiny_gguf(tmp_path)
    tokens, _ = _tiny_vocab()
    t = Tokenizer.from_gguf(path, bos_id=len(tokens) - 2, eos_id=len(tokens) - 1)
    ids = t.encode("hello world")
    assert [t.id_to_token(i) for i in ids] == ["hello", "Ġworld"]
    assert t.decode(ids) == "hello world"
    assert t.encode("<|end_of_text|>") == [len(tokens) - 1]  # `<|...|>` tokens are special
    assert t.special_ids == frozenset({len(tokens) - 2, len(tokens) - 1})
    assert t.encode_segment("hello", 3) == [t.bos_id, *t.encode("[3]hello"), t.eos_id]


def test_read_gguf_metadata_matches_gguf_package(tmp_path):
    tokens, merges = _tiny_vocab()
    extra = {
        "general.name": "csm-1b",
        "csm.backbone.rope_theta": 500000.0,
        "test.flag": True,
        "test.ints": [1, 2, 3],
        "test.floats": [0.5, -1.25],
        "test.strings": ["a", "", "ü"],
    }
    path = _write_gguf(tmp_path / "meta.gguf", tokens, merges, extra)
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "csm-tts"
    assert meta["general.name"] == "csm-1b"
    assert meta["csm.text_vocab_size"] == len(tokens)
    assert meta["csm.backbone.rope_theta"] == 500000.0
    assert meta["test.flag"] is True
    assert meta["test.ints"] == [1, 2, 3]
    assert meta["test.floats"] == [0.5, -1.25]
    assert meta["test.strings"] == ["a", "", "ü"]
    assert meta["tokenizer.ggml.tokens"] == tokens
    reader = gguf.GGUFReader(str(path))
    assert set(meta) == {k for k in reader.fields if not k.startswith("GGUF.")}
    only = read_gguf_metadata(path, keys=["general.name"])
    assert only == {"general.name": "csm-1b"}


def test_gguf_reader_does_not_load_file(tmp_path):
    """Trailing data (tensor payload) is never read: peak Python allocation stays tiny."""
    path = _tiny_gguf(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\0" * (64 << 20))
    tracemalloc.start()
    try:
        Tokenizer.from_gguf(path, bos_id=0, eos_id=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_truncated_gguf_raises(tmp_path):
    path = _tiny_gguf(tmp_path)
    data = path.read_bytes()
    end = _kv_end(path)
    assert 24 < end <= len(data)
    bad = tmp_path / "truncated.gguf"
    for cut in range(0, end):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            read_gguf_metadata(bad)


def _header(version=3, n_tensors=0, n_kv=1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "not a GGUF"),
        (b"GGML" + b"\0" * 40, "magic"),
        (_header(version=1) + b"\0" * 40, "version"),
        (_header(version=99) + b"\0" * 40, "version"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + b"\0" * 40, "big-endian"),
        (_header(n_kv=1 << 60), "metadata entries"),
        (_header(n_tensors=1 << 40), "tensors"),
        (_header() + struct.pack("<Q", 1 << 62) + b"k" * 16, "key of metadata entry 0"),
        (_header() + _gstr(b"k") + struct.pack("<I", 77) + b"\0" * 16, "unknown value type"),
        (_header() + _gstr(b"k") + struct.pack("<IQ", 8, 1 << 50) + b"xx", "metadata 'k'"),
        (_header() + _gstr(b"k") + struct.pack("<IIQ", 9, 8, 1 << 40) + b"\0" * 16, "cannot fit"),
        (_header() + _gstr(b"k") + struct.pack("<IIQ", 9, 4, 1 << 40) + b"\0" * 16, "cannot fit"),
        (_header() + _gstr(b"k") + struct.pack("<IIQ", 9, 42, 1) + b"\0" * 16, "element type"),
        (_header() + _gstr(b"k") + struct.pack("<I", 8) + _gstr(b"\xff\xfe"), "UTF-8"),
        (_header() + _gstr(b"\xc3") + struct.pack("<I", 0) + b"\0", "UTF-8"),
        (_header(n_kv=2) + (_gstr(b"k") + struct.pack("<IB", 0, 1)) * 2, "twice"),
    ],
)
def test_corrupt_gguf_raises(tmp_path, blob, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message):
        read_gguf_metadata(path)  # decodes every value
    with pytest.raises(ValueError):
        Tokenizer.from_gguf(path)  # decodes only the tokenizer arrays


@pytest.mark.parametrize(
    "blob, message",
    [
        (_header(n_kv=0) + b"\0" * 8, "tokenizer.ggml.tokens"),
        (
            _header(n_kv=2)
            + _gstr(b"tokenizer.ggml.tokens") + struct.pack("<IIQI", 9, 4, 1, 7)
            + _gstr(b"tokenizer.ggml.merges") + struct.pack("<IIQ", 9, 8, 0),
            "array of strings",
        ),
    ],
)
def test_gguf_without_tokenizer_raises(tmp_path, blob, message):
    path = tmp_path / "notok.gguf"
    path.write_bytes(blob)
    read_gguf_metadata(path)  # well-formed metadata
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf(path)


def test_big_endian_gguf_refused(tmp_path):
    tokens, merges = _tiny_vocab()
    path = _write_gguf(tmp_path / "be.gguf", tokens, merges, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match="big-endian"):
        Tokenizer.from_gguf(path)


def test_fuzzed_gguf_only_raises_value_error(tmp_path):
    """Random byte corruption of the metadata either still parses or raises ValueError, never
    anything else (no struct.error, MemoryError, IndexError...)."""
    path = _tiny_gguf(tmp_path)
    data = bytearray(path.read_bytes())
    end = _kv_end(path)
    rng = random.Random(7)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(end)
            mutated[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        bad.write_bytes(bytes(mutated))
        try:
            read_gguf_metadata(bad)
        except ValueError:
            pass


def test_invalid_vocab_rejected():
    tokens, merges = _tiny_vocab()
    with pytest.raises(ValueError, match="twice"):
        Tokenizer(tokens + [tokens[5]], merges, bos_id=0, eos_id=1)
    with pytest.raises(ValueError, match="missing"):
        Tokenizer(tokens, merges + ["x yz"], bos_id=0, eos_id=1)
    with pytest.raises(ValueError, match="left right"):
        Tokenizer(tokens, merges + ["nospace"], bos_id=0, eos_id=1)
    with pytest.raises(ValueError, match="bos_id"):
        Tokenizer(tokens, merges, bos_id=len(tokens), eos_id=1)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer([], [], bos_id=0, eos_id=0)


def test_from_gguf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(os.fspath(tmp_path / "nope.gguf"))
