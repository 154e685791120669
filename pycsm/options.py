"""`GenerationOptions`: the sampling and synthesis options of every `CSM` call, defined once.

>>> opts = pycsm.GenerationOptions(temperature=0.7, seed=42)
>>> tts.generate("Hello.", options=opts)                  # or the same as keywords:
>>> tts.generate("Hello.", temperature=0.7, seed=42)
>>> tts.generate_batch(texts, options=opts, top_k=20)     # keywords override the options' fields

Every field is checked when the object is made (ValueError / TypeError naming the field), so a bad
value from a caller, a file or a request never reaches the native library. A new option is added
here: its field, its default, its check; `CSM`'s methods and the command line take it from here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from dataclasses import dataclass

# The upper bound of a temperature: logits divided by 10 already sample almost uniformly among the
# top-k codes; beyond it a value is a mistake (crispasr's -t is threads: `-t 8` meant 8 threads).
MAX_TEMPERATURE = 10.0
# Seeds are 64-bit (csm_sampling_params.seed).
SEED_BITS = 64


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _temperature(t, name: str) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) \
            or not 0 <= t <= MAX_TEMPERATURE:
        raise ValueError(f"{name} must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {t!r}")
    return float(t)


def _top_k(k, name: str) -> int:
    if not _is_int(k) or k < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 = no top-k cut), got {k!r}")
    return int(k)


def _seed(seed) -> int | None:
    if seed is None:
        return None
    if not _is_int(seed):
        raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")
    if not 0 <= seed < 1 << SEED_BITS:
        raise ValueError(f"seed must be in [0, 2**{SEED_BITS}) or None (a random seed), got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class GenerationOptions:
    """How codes are sampled and how long an utterance may get.

    temperature: sampling temperature of every codebook, in [0, 10]; 0 = greedy (argmax).
    top_k: sample among the k most likely codes; 0 = no cut (values above the 2051 codes of a
        codebook mean no cut too).
    depth_temperature / depth_top_k: the same for codebooks 1..31 (the depth decoder); None = as
        temperature / top_k.
    max_audio_length_ms: cap on one utterance (one sentence of a long text), rounded up to 80 ms
        frames and clamped to what the model's context holds; None = until the model ends the
        utterance or the context is full.
    seed: None draws a fresh random seed for each call (returned as `Audio.seed`); an int in
        [0, 2**64) reproduces the output. 0 is a seed like any other here (the command line's
        `--seed 0` means "random", as crispasr's does).
    parse_special: True (the reference's behaviour) reads special-token text such as
        ``<|end_of_text|>`` in the text as those tokens; False reads it as plain characters. Use
        False for text from users or files: a special token can otherwise start a new segment as
        another speaker.
    """

    temperature: float = 0.9
    top_k: int = 50
    depth_temperature: float | None = None
    depth_top_k: int | None = None
    max_audio_length_ms: float | None = 90_000
    seed: int | None = None
    parse_special: bool = True

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise in place once, here
        set_(self, "temperature", _temperature(self.temperature, "temperature"))
        set_(self, "top_k", _top_k(self.top_k, "top_k"))
        if self.depth_temperature is not None:
            set_(self, "depth_temperature", _temperature(self.depth_temperature, "depth_temperature"))
        if self.depth_top_k is not None:
            set_(self, "depth_top_k", _top_k(self.depth_top_k, "depth_top_k"))
        ms = self.max_audio_length_ms
        if ms is not None:
            if isinstance(ms, bool) or not isinstance(ms, numbers.Real) or not math.isfinite(ms) or ms <= 0:
                raise ValueError(f"max_audio_length_ms must be a number > 0 (or None), got {ms!r}")
            set_(self, "max_audio_length_ms", float(ms))
        set_(self, "seed", _seed(self.seed))
        if not isinstance(self.parse_special, bool):
            raise TypeError(f"parse_special must be True or False, not {self.parse_special!r}")

    @classmethod
    def resolve(cls, options: "GenerationOptions | None" = None, /, **overrides) -> "GenerationOptions":
        """`options` (or the defaults) with `overrides` applied: what every `CSM` method does with its
        ``options=`` and keyword arguments. TypeError for a keyword that is not a field."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a GenerationOptions, not {type(options).__name__}")
        unknown = sorted(set(overrides) - FIELDS)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (GenerationOptions fields: "
                            f"{', '.join(sorted(FIELDS))})")
        if options is None:
            return cls(**overrides)
        return dataclasses.replace(options, **overrides) if overrides else options

    def with_seed(self) -> "GenerationOptions":
        """These options with `seed` fixed: a fresh random one when it is None."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbits(SEED_BITS))

    def max_frames(self, frame_ms: float, context_frames: int) -> int:
        """The frame cap for the native call: max_audio_length_ms in frames (rounded up), at most
        `context_frames` (what the context can hold; no larger output buffer is ever made)."""
        if self.max_audio_length_ms is None:
            return context_frames
        # round() first so that 560.0000000001 ms stays 7 frames of 80 ms
        frames = math.ceil(round(min(self.max_audio_length_ms / frame_ms, float(context_frames)), 6))
        return max(1, min(frames, context_frames))

    def sampling(self, vocab_size: int) -> dict:
        """temperature / top_k / depth_temperature / depth_top_k for `Generator.generate`, top-k
        values clamped to the codebook size (a larger k cuts nothing; int32 cannot wrap)."""
        def k(v):
            return None if v is None else min(v, vocab_size)

        return {"temperature": self.temperature, "top_k": k(self.top_k),
                "depth_temperature": self.depth_temperature, "depth_top_k": k(self.depth_top_k)}


FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationOptions))
