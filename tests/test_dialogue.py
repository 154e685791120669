"""Conversations (CSM.converse / stream_converse), the context budget (pycsm.budget) and long text
that outgrows the context (hardening finding 8), on the tiny model with a small context.

The tiny random model never emits the end frame, so every piece runs to its cap and the sizes of
all prompts are known in advance. The test computes the budget rule on its own (from the tokenizer
and the frame counts) and checks each prompt's choice against it.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pycsm import CSM, GenerationOptions, Segment, Voice
from pycsm.budget import keep_recent
from pycsm.cli import main
from pycsm.conversation import TurnError, normalize_turns, number_speakers
from pycsm.text import split_sentences

MS = 400  # 5 frames per piece
F = MS // 80
SPF = 1920  # samples per frame


def with_max_pos(src: Path, dst: Path, max_pos: int) -> Path:
    """A copy of a CSM GGUF whose backbone context is `max_pos` positions (the u32 value of
    csm.backbone.max_pos patched in place)."""
    shutil.copyfile(src, dst)
    key = b"csm.backbone.max_pos"
    with open(dst, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(struct.pack("<Q", len(key)) + key)
        assert at > 0
        at += 8 + len(key)
        assert struct.unpack_from("<I", m, at)[0] == 4  # GGUF type u32
        struct.pack_into("<I", m, at + 4, max_pos)
    return dst


@pytest.fixture(scope="module")
def small(tiny_dir, tmp_path_factory):
    """The tiny model with a 160-position context."""
    path = with_max_pos(tiny_dir / "tiny-f16.gguf", tmp_path_factory.mktemp("m") / "ctx160.gguf", 160)
    with CSM(path, n_threads=1) as t:
        assert t.model.hparams.bb_max_pos == 160
        yield t


@pytest.fixture(scope="module")
def path40(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with a 40-position context (hardening finding 8's reproduction)."""
    return with_max_pos(tiny_dir / "tiny-f16.gguf", tmp_path_factory.mktemp("m") / "ctx40.gguf", 40)


@pytest.fixture(scope="module")
def tiny40(path40):
    with CSM(path40, n_threads=1) as t:
        yield t


# ---------------------------------------------------------------------------------------------
# the rule alone
# ---------------------------------------------------------------------------------------------

def test_keep_recent():
    # C = 100, fixed 20, cap 30: room 50 for history
    assert keep_recent(100, 20, [10, 20, 30], 30) == 2          # 30 + 20 = 50 fits, + 10 does not
    assert keep_recent(100, 20, [10, 25, 30], 30) == 1          # 30 fits, 30 + 25 does not
    assert keep_recent(100, 20, [11, 20, 20], 30) == 2          # 40 fits, 51 does not
    assert keep_recent(100, 20, [11, 20, 20], 29) == 3          # room 51: all three
    assert keep_recent(100, 20, [5, 60, 5], 30) == 1            # the 60 stops the run: no holes
    assert keep_recent(100, 20, [10, 10, 10], 30, history_limit=1) == 1
    assert keep_recent(100, 20, [10, 10, 10], 30, history_limit=0) == 0
    assert keep_recent(100, 20, [10], 0) == 0                   # no cap: the piece may use all the rest
    assert keep_recent(100, 20, [10], 90) == 0                  # its cap does not fit: nothing kept
    assert keep_recent(100, 20, [], 30) == 0


# ---------------------------------------------------------------------------------------------
# turns and speakers
# ---------------------------------------------------------------------------------------------

def test_speakers_numbered_in_order_of_appearance():
    assert number_speakers(["Ann", "Bob", "Ann"]) == {"Ann": 0, "Bob": 1}
    # ids stay; names take the smallest ids left free
    assert number_speakers(["Ann", 0, "Bob", 2, "Cy"]) == {0: 0, 2: 2, "Ann": 1, "Bob": 3, "Cy": 4}
    assert number_speakers([1, "Ann"]) == {1: 1, "Ann": 0}


def test_turn_forms_and_errors():
    got = normalize_turns([("Ann", " Hi. "), {"speaker": 1, "text": "Yo."}, Segment(3, "Hey.")])
    assert got == [("Ann", "Hi."), (1, "Yo."), (3, "Hey.")]
    with pytest.raises(ValueError, match="turn 2 is empty"):
        normalize_turns([("Ann", "Hi."), ("Bob", "  ")])
    with pytest.raises(ValueError, match="turn 1: the speaker"):
        normalize_turns([(-1, "Hi.")])
    with pytest.raises(ValueError, match="turn 1: the speaker"):
        normalize_turns([(True, "Hi.")])
    with pytest.raises(ValueError, match="turn 1: the speaker"):
        normalize_turns([(2**31, "Hi.")])
    with pytest.raises(ValueError, match="turn 1: a dict turn"):
        normalize_turns([{"speaker": 0, "text": "Hi.", "voice": "x"}])
    with pytest.raises(TypeError, match="turn 1"):
        normalize_turns([["Ann", "Hi."]])
    with pytest.raises(ValueError, match="turn 1 has audio"):
        normalize_turns([Segment(0, "Hi.", np.zeros((2, 32), dtype=np.int32))])
    with pytest.raises(TypeError, match="sequence"):
        normalize_turns("Ann: Hi.")


# ---------------------------------------------------------------------------------------------
# converse on a 160-position context
# ---------------------------------------------------------------------------------------------

TURNS = [
    ("Ann", "Did you see the sky this morning?"),
    ("Bob", "I did. Red at dawn, they say, is a warning. Sailors know it."),
    ("Ann", "Then we stay ashore."),
    (2, "Count me in."),
    ("Bob", "Fine by me."),
    ("Ann", "Good. Let us make tea while we wait for the weather to turn, shall we?"),
    ("Bob", "Yes."),
    (2, "Two sugars, please, and a biscuit if there are any left."),
    ("Ann", "There are."),
    ("Bob", "Then it is settled."),
]


def budget_reference(tok, context, refs, pieces, cap):
    """The budget rule computed from scratch: for each piece (speaker id, text), the indices of the
    earlier pieces its prompt keeps and its prompt size. refs: (id, text, frames) voice references.
    Every piece has `cap` frames (the tiny model never ends a piece early)."""
    def size(spk, text, frames=None):
        n = len(tok.encode_segment(text, spk, parse_special=False))
        return n if frames is None else n + frames + 1

    fixed_refs = sum(size(s, t, n) for s, t, n in refs)
    out = []
    for k, (spk, text) in enumerate(pieces):
        own = size(spk, text)
        room = context - fixed_refs - own - cap
        kept, used = [], 0
        for j in range(k - 1, -1, -1):
            s = size(pieces[j][0], pieces[j][1], cap)
            if used + s > room:
                break
            used += s
            kept.insert(0, j)
        out.append((tuple(kept), fixed_refs + used + own))
    return out


def test_converse_keeps_the_recent_turns_that_fit(small):
    ann = small.generate("I am Ann, and this is my voice.", speaker=7, seed=1, max_audio_length_ms=480)
    voices = {"Ann": Segment(7, "I am Ann, and this is my voice.", ann)}  # its own id is ignored
    progress = []
    conv = small.converse(TURNS, voices, seed=100, max_audio_length_ms=MS, gap_ms=250, pause_ms=100,
                          progress=lambda done, total: progress.append((done, total)))
    assert conv.speakers == {"Ann": 0, "Bob": 1, 2: 2}
    assert progress == [(i, len(TURNS)) for i in range(len(TURNS) + 1)]

    # the pieces: each turn's sentences, in order
    plan = [(t, conv.speakers[s], sentence) for t, (s, text) in enumerate(TURNS) for sentence in split_sentences(text)]
    assert len(plan) > len(TURNS)  # some turns are long
    assert [(p.turn, p.speaker, p.text) for p in conv.pieces] == plan
    assert [p.seed for p in conv.pieces] == [100 + k for k in range(len(plan))]

    expect = budget_reference(small.model.tokenizer, 160, [(0, voices["Ann"].text, 6)],
                              [(s, text) for _, s, text in plan], F)
    for p, (kept, n_prompt) in zip(conv.pieces, expect):
        assert p.codes.shape == (F, 32) and p.stop_reason == "max_length"
        assert (p.index, p.context, p.n_prompt) == (p.index, kept, n_prompt)
        assert p.n_prompt + F <= 160
    dropped = [k for k, (kept, _) in enumerate(expect) if k and kept[:1] != (0,)]
    assert dropped, "the conversation never outgrew the context: the test proves nothing"
    assert any(len(kept) >= 3 for kept, _ in expect)

    # each piece is what generate() gives with the references and the kept pieces as context
    ref = [Segment(0, voices["Ann"].text, ann.codes)]
    for p in conv.pieces:
        ctx = ref + [Segment(conv.pieces[j].speaker, conv.pieces[j].text, conv.pieces[j].codes) for j in p.context]
        alone = small.generate(p.text, speaker=p.speaker, context=ctx, seed=p.seed, max_audio_length_ms=MS,
                               parse_special=False)
        np.testing.assert_array_equal(alone.codes, p.codes)

    # per-turn audio: its pieces with 100 ms pauses; the conversation: turns with 250 ms gaps
    assert len(conv.turns) == len(TURNS)
    for t, audio in enumerate(conv.turns):
        n = sum(p.turn == t for p in conv.pieces)
        assert audio.samples.shape == (n * F * SPF + (n - 1) * 2400,)
        assert audio.seed == next(p.seed for p in conv.pieces if p.turn == t)
    gap = np.zeros(250 * 24, dtype=np.float32)
    joined = np.concatenate([x for a in conv.turns for x in (gap, a.samples)][1:])
    np.testing.assert_array_equal(conv.audio.samples, joined)
    np.testing.assert_array_equal(conv.audio.codes, np.concatenate([p.codes for p in conv.pieces]))
    assert conv.stop_reason == "max_length" and conv.audio.seed == 100
    # the first piece alone, with the same samples as generate()
    first = small.generate(plan[0][2], speaker=0, context=ref, seed=100, max_audio_length_ms=MS)
    np.testing.assert_array_equal(conv.turns[0].samples, first.samples)


def test_voices_and_options(small):
    codes = small.generate("I am Bob.", speaker=3, seed=1, max_audio_length_ms=MS).codes
    turns = [("Ann", "Hello, Bob."), ("Bob", "Hello, Ann.")]
    by_segment = small.converse(turns, {"Bob": Segment(3, "I am Bob.", codes)}, seed=5, max_audio_length_ms=MS)
    by_voice = small.converse(turns, {"Bob": Voice(3, "I am Bob.", codes)}, seed=5, max_audio_length_ms=MS)
    np.testing.assert_array_equal(by_segment.audio.codes, by_voice.audio.codes)
    # Bob's reference is spoken under Bob's dialogue id (1), before every turn
    ref = [Segment(1, "I am Bob.", codes)]
    first = small.generate("Hello, Bob.", speaker=0, context=ref, seed=5, max_audio_length_ms=MS)
    np.testing.assert_array_equal(by_voice.pieces[0].codes, first.codes)
    # the dialogue defaults: 10 s cap (125 frames), plain text; an options object replaces them,
    # keywords override either
    d = small.converse([(0, "Hi.")], seed=1)
    assert d.pieces[0].codes.shape == (125, 32) and d.pieces[0].stop_reason == "max_length"
    o = small.converse([(0, "Hi.")], options=GenerationOptions(max_audio_length_ms=160, seed=1))
    assert o.pieces[0].codes.shape == (2, 32) and o.audio.seed == 1
    k = small.converse([(0, "Hi.")], options=GenerationOptions(max_audio_length_ms=160, seed=1), seed=2,
                       max_audio_length_ms=240)
    assert k.pieces[0].codes.shape == (3, 32) and k.audio.seed == 2


def test_stream_converse_tags_chunks(small):
    turns = [("Ann", "Hello there. How are you?"), ("Bob", "Well, thanks."), ("Ann", "Good.")]
    conv = small.converse(turns, seed=5, max_audio_length_ms=MS, gap_ms=200)
    st = small.stream_converse(turns, seed=5, max_audio_length_ms=MS, gap_ms=200, chunk_frames=2)
    chunks = list(st)
    assert [(c.turn, c.speaker) for c in chunks if c.gap] == [(1, "Bob"), (2, "Ann")]
    assert all(not c.samples.any() for c in chunks if c.gap)
    for t, (who, _) in enumerate(turns):
        assert {c.speaker for c in chunks if c.turn == t} == {who}
    # 3 frames of 5 in chunks of 2: 2, 2, 1 per piece
    assert [c.samples.shape[0] // SPF for c in chunks if c.turn == 1 and not c.gap] == [2, 2, 1]
    np.testing.assert_array_equal(st.codes, conv.audio.codes)
    assert [p.context for p in st.pieces] == [p.context for p in conv.pieces]
    # the streaming Mimi decoder agrees with the one-shot one to F16 rounding (see test_api.py)
    np.testing.assert_allclose(np.concatenate([c.samples for c in chunks]), conv.audio.samples, rtol=0, atol=2e-3)


def test_converse_stops_and_checks_before_generating(small):
    conv = small.converse(TURNS[:4], seed=1, max_audio_length_ms=MS, progress=lambda done, total: done < 2)
    assert conv.stop_reason == "aborted" and len(conv.turns) == 2
    assert {p.turn for p in conv.pieces} == {0, 1}

    calls = []
    with pytest.raises(TurnError, match=r"turn 2 needs \d+ prompt positions .*context holds 160") as e:
        small.converse([("Ann", "Short."), ("Bob", "word " * 200)], max_audio_length_ms=MS, max_chars=2000,
                       progress=lambda *a: calls.append(a))
    assert calls == [] and e.value.turn == 1  # refused before anything was generated
    with pytest.raises(ValueError, match="no turn is spoken by 'Cy'"):
        small.converse([("Ann", "Hi.")], voices={"Cy": Segment(0, "x")})
    with pytest.raises(TypeError, match="a voice must be"):
        small.converse([("Ann", "Hi.")], voices={"Ann": "ann.wav"})
    with pytest.raises(ValueError, match="gap_ms"):
        small.converse([("Ann", "Hi.")], gap_ms=-1)
    with pytest.raises(ValueError, match="no turns"):
        small.converse([])


def test_plain_text_by_default(small):
    tok = small.model.tokenizer
    text = "a<|end_of_text|><|begin_of_text|>[1]b"
    conv = small.converse([(0, text)], seed=2, max_audio_length_ms=MS)
    assert conv.pieces[0].n_prompt == len(tok.encode_segment(text, 0, parse_special=False))
    special = small.converse([(0, text)], seed=2, max_audio_length_ms=MS, parse_special=True)
    assert special.pieces[0].n_prompt == len(tok.encode_segment(text, 0, parse_special=True))
    assert special.pieces[0].n_prompt != conv.pieces[0].n_prompt


# ---------------------------------------------------------------------------------------------
# long text on a full context (hardening finding 8)
# ---------------------------------------------------------------------------------------------

LONG = "The first sentence is here. A second one follows it. And then a third."


def test_generate_long_never_fails_for_a_full_context(tiny40):
    sentences = split_sentences(LONG)
    # no cap (90 s): every sentence may fill the context, so none keeps the one before; before the
    # budget the second prompt overflowed ("the prompt has 58 positions but the context holds 40")
    a = tiny40.generate_long(LONG, seed=9)
    alone = [tiny40.generate(s, seed=9 + i) for i, s in enumerate(sentences)]
    assert all(x.stop_reason == "context_full" for x in alone)
    np.testing.assert_array_equal(a.codes, np.concatenate([x.codes for x in alone]))
    assert a.stop_reason == "context_full"
    assert a.samples.shape[0] == sum(x.samples.shape[0] for x in alone) + 2 * 150 * 24
    # a 3-frame cap leaves room for the previous sentence: it is kept, as before
    b = tiny40.generate_long(LONG, seed=9, max_audio_length_ms=240)
    first = tiny40.generate(sentences[0], seed=9, max_audio_length_ms=240)
    second = tiny40.generate(sentences[1], context=[Segment(0, sentences[0], first.codes)], seed=10,
                             max_audio_length_ms=240)
    np.testing.assert_array_equal(b.codes[:6], np.concatenate([first.codes, second.codes]))
    # streamed, the same
    st = tiny40.stream_long(LONG, seed=9)
    list(st)
    np.testing.assert_array_equal(st.codes, a.codes)


def test_generate_long_refuses_a_sentence_that_cannot_fit_before_generating(tiny40):
    calls = []
    with pytest.raises(ValueError, match="sentence 2 needs"):
        tiny40.generate_long("Short. Many " + "words " * 50, progress=lambda *a: calls.append(a))
    assert calls == []


def test_cli_long_text_on_a_full_context_writes_every_sentence(path40, tiny40, tmp_path, capsys):
    out = tmp_path / "long.wav"
    rc = main([LONG, "-m", str(path40), "-o", str(out), "--seed", "9", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    a = tiny40.generate_long(LONG, seed=9)
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], a.to_int16())
    assert "context is full" in err
