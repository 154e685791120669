"""Build the seeded tiny CSM test model and its reference data (from transformers, fp32).

    python3 tests/reference/make_tiny.py OUT_DIR

`build(out_dir)` writes into OUT_DIR:
  checkpoint/        save_pretrained() of a random tiny CsmForConditionalGeneration (codec: tiny
                     random MimiModel) plus tokenizer.json (the real Llama-3 BPE, csm-1b specials)
  tiny-f32.gguf, tiny-f16.gguf   via pycsm.convert
  reference.npz      see REFERENCE_KEYS below

Prompt layout (arrays `prompt_*`, int32 [P, 33]): columns 0..31 are audio codes, column 32 is
the text token id, -1 marks an absent column. A text row embeds text_embd[id]; an audio row
embeds sum_cb audio_embd[cb * 2051 + code_cb] (no text part). Each text segment is the
tokenisation of "[speaker]text" with <|begin_of_text|> first and <|end_of_text|> last.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

N_FRAMES = 10  # greedy frames per prompt (we do not stop at an all-zero frame)
MIMI_T = 12  # frames of random codes for the Mimi decode reference
ENC_SAMPLES = 29500  # encoder test signal; not a multiple of 1920, so the convs' extra right padding matters
SEED = 1234

REFERENCE_KEYS = [
    "prompt_plain", "prompt_ctx",                    # int32 [P, 33]
    "plain_logits0", "ctx_logits0",                  # float32 [2051]: codebook-0 logits after the prompt
    "plain_codes", "ctx_codes",                      # int32 [N_FRAMES, 32]: greedy frames
    "plain_depth_logits", "ctx_depth_logits",        # float32 [31, 2051]: depth logits, frame 0, teacher forced
    "plain_frame_logits", "ctx_frame_logits",        # float32 [N_FRAMES, 32, 2051]: the logits behind each
                                                     # greedy code (to judge near-tie departures)
    "mimi_codes", "mimi_pcm",                        # int32 [12, 32] -> float32 [12 * 1920]
    "mimi_enc_input", "mimi_enc_codes",              # float32 [29500] (~1.23 s @ 24 kHz) -> int32 [16, 32]
]

BACKBONE_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=0.125,
                     high_freq_factor=0.5, original_max_position_embeddings=1024)
DEPTH_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1 / 512,
                  high_freq_factor=1 / 128, original_max_position_embeddings=16)

# csm-1b's special tokens: Llama-3.2's list with reserved tokens 0 and 1 renamed.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>",
                  "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(SPECIAL_TOKENS))]


def tiny_config():
    from transformers import CsmConfig

    codec = dict(model_type="mimi", hidden_size=64, num_filters=8, codebook_size=2048, codebook_dim=32,
                 vector_quantization_hidden_dimension=32, num_quantizers=32, num_semantic_quantizers=1,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                 upsample_groups=64, sliding_window=250)
    depth = dict(num_codebooks=32, backbone_hidden_size=128, vocab_size=2051, hidden_size=64,
                 intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=33, rope_parameters=DEPTH_ROPE)
    return CsmConfig(num_codebooks=32, vocab_size=2051, text_vocab_size=128256, hidden_size=128,
                     intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=2048, rope_parameters=BACKBONE_ROPE,
                     depth_decoder_config=depth, codec_config=codec)


def randomize(model, seed=SEED):
    """Overwrite every weight with seeded random values of sane scale.

    Linear/conv weights ~ N(0, 1/fan_in) (heads 3x that, so logits have clear argmax margins),
    norm weights U(0.7, 1.3), biases small, layer scales U(0.1, 1). Mimi codebooks: an
    effective codebook E ~ N(0, 0.3^2) and cluster_usage u (mostly 0.05..3, a few below 1e-5,
    two exactly 0), with embed_sum = E * max(u, 1e-5), so only the 1e-5 clamp recovers E.
    """
    import torch
    from torch import nn
    from transformers.models.csm.modeling_csm import CsmCodebooksHead, CsmRMSNorm
    from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook, MimiLayerScale

    g = torch.Generator().manual_seed(seed)
    normal = lambda shape, std: torch.randn(shape, generator=g) * std  # noqa: E731
    uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g)  # noqa: E731

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                gain = 3.0 if name == "lm_head" else 1.0
                m.weight.copy_(normal(m.weight.shape, gain / m.weight.shape[1] ** 0.5))
            elif isinstance(m, nn.Embedding):  # audio rows are summed over 32 codebooks
                std = 1.0 if name == "embed_text_tokens" else 32 ** -0.5
                m.weight.copy_(normal(m.weight.shape, std))
            elif isinstance(m, CsmCodebooksHead):
                m.weight.copy_(normal(m.weight.shape, 3.0 / m.weight.shape[1] ** 0.5))
            elif isinstance(m, (CsmRMSNorm, nn.LayerNorm)):
                m.weight.copy_(uniform(m.weight.shape, 0.7, 1.3))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(normal(m.bias.shape, 0.1))
            elif isinstance(m, MimiLayerScale):
                m.scale.copy_(uniform(m.scale.shape, 0.1, 1.0))
            elif isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                k = m.kernel_size[0]
                if isinstance(m, nn.Conv1d):  # weight [out, in/groups, k]
                    fan_in = m.weight.shape[1] * k
                else:  # weight [in, out/groups, k]: each output sees in/groups * k/stride taps
                    fan_in = m.weight.shape[0] // m.groups * k / m.stride[0]
                m.weight.copy_(normal(m.weight.shape, fan_in ** -0.5))
                if m.bias is not None:
                    m.bias.copy_(normal(m.bias.shape, 0.05))
            elif isinstance(m, MimiEuclideanCodebook):
                n, dim = m.embed_sum.shape
                embed = normal((n, dim), 0.3)
                usage = uniform((n,), 0.05, 3.0)
                tiny = torch.randperm(n, generator=g)[:10]
                usage[tiny[:8]] = uniform((8,), 1e-9, 5e-6)
                usage[tiny[8:]] = 0.0
                m.embed_sum.copy_(embed * usage.clamp(min=1e-5)[:, None])
                m.cluster_usage.copy_(usage)
                m._embed = None  # drop the cached normalised codebook
        # Codes 2048..2050 are not Mimi codes: shrink their head rows so greedy decoding never
        # picks them (a reader that masks them then agrees with this reference).
        model.lm_head.weight[2048:] *= 0.01
        model.depth_decoder.codebooks_head.weight[:, :, 2048:] *= 0.01
        model.codec_model.decoder.decoder_seanet.layers[-1].conv.weight *= 0.2  # PCM mostly within [-1, 1]


def write_tokenizer(path: Path):
    """tokenizer.json from the real Llama-3 ranks (llama_models), csm-1b's specials and post-processor."""
    import llama_models
    from tokenizers.processors import TemplateProcessing
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    tok = TikTokenConverter(vocab_file=str(ranks), extra_special_tokens=SPECIAL_TOKENS).converted()
    # Like Sesame's load_llama3_tokenizer(): BOS ... EOS around every encoded text.
    tok.post_processor = TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0 <|end_of_text|>:0",
        special_tokens=[("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001)])
    assert tok.get_vocab_size() == 128256
    tok.save(str(path))


def text_rows(tok, speaker: int, text: str) -> np.ndarray:
    ids = tok.encode(f"[{speaker}]{text}").ids
    assert ids[0] == 128000 and ids[-1] == 128001
    rows = np.full((len(ids), 33), -1, np.int32)
    rows[:, 32] = ids
    return rows


def audio_rows(codes: np.ndarray) -> np.ndarray:
    rows = np.full((len(codes), 33), -1, np.int32)
    rows[:, :32] = codes
    return rows


def embed_prompt(model, prompt: np.ndarray):
    """inputs_embeds [1, P, H] from the model's own embedding modules."""
    import torch

    rows = []
    for row in prompt:
        if row[32] >= 0:
            rows.append(model.embed_text_tokens(torch.tensor([int(row[32])])))
        else:
            codes = torch.tensor(row[:32], dtype=torch.long)[None, None, :]
            rows.append(model.backbone_model.embed_tokens(codes)[0])  # sums the 32 codebook rows
    return torch.cat(rows, 0)[None]


def greedy(model, prompt: np.ndarray, n_frames: int = N_FRAMES):
    """Greedy frames with transformers modules.

    Returns (logits0 [V], codes [F, 32], depth_logits [31, V], frame_logits [F, 32, V]).
    """
    import torch

    out = model.backbone_model(inputs_embeds=embed_prompt(model, prompt), use_cache=True)
    cache, frames, all_logits = out.cache, [], []
    for f in range(n_frames):
        h = out.last_hidden_state[:, -1, :]  # final-normed hidden of the last position
        logits = [model.lm_head(h)[0]]
        codes = [int(logits[0].argmax())]
        # Depth decoder, fresh cache per frame: position 0 = h, position 1 = codebook 0, ...
        dd = model.depth_decoder(input_ids=torch.tensor([[0, codes[0]]]), backbone_last_hidden_state=h,
                                 use_cache=True, logits_to_keep=1)
        for k in range(1, 32):
            logits.append(dd.logits[0, -1])
            codes.append(int(logits[-1].argmax()))
            if k < 31:
                dd = model.depth_decoder(input_ids=torch.tensor([[codes[-1]]]), cache=dd.cache,
                                         use_cache=True, logits_to_keep=1)
        if f == 0:  # teacher-forced depth logits of codebooks 1..31 for the first frame
            tf = model.depth_decoder(input_ids=torch.tensor([[0] + codes[:31]]), backbone_last_hidden_state=h)
            depth_logits = tf.logits[0].numpy().copy()
            assert (depth_logits.argmax(-1) == np.array(codes[1:])).all(), "cached vs teacher-forced depth differ"
        frames.append(codes)
        all_logits.append(torch.stack(logits).numpy())
        frame = model.backbone_model.embed_tokens(torch.tensor(codes)[None, None, :])
        out = model.backbone_model(inputs_embeds=frame, cache=cache, use_cache=True)
        cache = out.cache
    all_logits = np.stack(all_logits)
    return all_logits[0, 0].copy(), np.array(frames, np.int32), depth_logits, all_logits


def _build(out: Path):
    import torch
    from tokenizers import Tokenizer
    from transformers import CsmForConditionalGeneration

    from pycsm.convert import convert

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = CsmForConditionalGeneration(tiny_config()).eval()
    randomize(model)
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt)
    write_tokenizer(ckpt / "tokenizer.json")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))

    ref = {}
    ctx_codes = rng.integers(0, 2048, size=(5, 32))
    ref["prompt_plain"] = text_rows(tok, 0, "Hello there, world.")
    ref["prompt_ctx"] = np.concatenate([text_rows(tok, 1, "First context line."), audio_rows(ctx_codes),
                                        audio_rows(np.zeros((1, 32), np.int64)),  # EOS frame after context audio
                                        text_rows(tok, 0, "Now speak this.")])
    with torch.no_grad():
        for name in ("plain", "ctx"):
            logits0, codes, depth, frame_logits = greedy(model, ref[f"prompt_{name}"])
            ref[f"{name}_logits0"], ref[f"{name}_codes"] = logits0, codes
            ref[f"{name}_depth_logits"], ref[f"{name}_frame_logits"] = depth, frame_logits

        # model.generate() takes the plain prompt as input_ids (its text ids merge through
        # embed_text_tokens, exactly our text rows); it must give the same greedy frames.
        # (The ctx prompt would need raw audio input_values, so it is not cross-checked.)
        gen = model.generate(input_ids=torch.tensor(ref["prompt_plain"][None, :, 32], dtype=torch.long),
                             do_sample=False, depth_decoder_do_sample=False, max_new_tokens=N_FRAMES)
        assert (gen[0].numpy() == ref["plain_codes"]).all(), "greedy loop disagrees with model.generate"

        codec = model.codec_model
        mimi_codes = rng.integers(0, 2048, size=(MIMI_T, 32))
        pcm = codec.decode(torch.tensor(mimi_codes.T[None], dtype=torch.long)).audio_values
        ref["mimi_codes"], ref["mimi_pcm"] = mimi_codes, pcm.numpy().reshape(-1)
        assert ref["mimi_pcm"].shape == (MIMI_T * 1920,)
        t = np.arange(ENC_SAMPLES) / 24000.0
        sig = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 587 * t + 1.0) \
            + 0.1 * np.sin(2 * np.pi * 1500 * t) + 0.02 * rng.standard_normal(t.shape)
        ref["mimi_enc_input"] = sig.astype(np.float32)
        enc = codec.encode(torch.from_numpy(ref["mimi_enc_input"])[None, None]).audio_codes  # [1, 32, T']
        ref["mimi_enc_codes"] = enc[0].T.numpy()
        assert len(ref["mimi_enc_codes"]) == int(codec.get_encoded_length(torch.tensor(ENC_SAMPLES))) == 16

    for name in ("plain", "ctx"):
        assert ref[f"{name}_codes"].max() < 2048
    ref = {k: (v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(np.float32)) for k, v in ref.items()}
    assert sorted(ref) == sorted(REFERENCE_KEYS)
    np.savez(out / "reference.npz", **ref)
    for outtype in ("f32", "f16"):
        convert(ckpt, out / f"tiny-{outtype}.gguf", outtype)


def build(out_dir) -> Path:
    """Write the tiny model and reference data into out_dir (skips the work when already complete)."""
    out = Path(out_dir)
    done = out / "COMPLETE"
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        _build(out)
        done.write_text(json.dumps({"seed": SEED, "frames": N_FRAMES}))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny.py OUT_DIR")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's pycsm
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(build(sys.argv[1]))
