"""A 20-turn, two-speaker conversation on a full-size CSM-1B file: prompt sizes and time per turn.

    python3 benchmarks/dialogue.py --model /work/models/q8_0.gguf            # 10 s cap per turn
    python3 benchmarks/dialogue.py --model m.gguf --turns 8 --cap 4 --json dialogue.json

`CSM.stream_converse` speaks the script below with both speakers' voice references (5 s of codes
each) in every prompt. A random-weight model (benchmarks/make_model.py) never ends a turn, so every
turn runs to its cap and the context fills as fast as it can: from the thirteenth turn on, each
prompt holds the references and the twelve most recent turns, which fit beside the turn's 125
frames, close to the 2048 positions of the context. Per turn it prints the prompt positions, how many earlier
turns the prompt kept, the time to the turn's first audio chunk (prefill + 4 frames + their decode)
and the turn's whole time; --json gets every measurement, rewritten after each turn (an interrupted
run keeps what it measured). Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a source checkout: import this pycsm
    sys.path.insert(0, str(REPO))

import pycsm  # noqa: E402

SCRIPT = [  # one sentence per turn: one piece of up to the cap each
    ("Ann", "Morning, did you sleep at all with that storm going on?"),
    ("Bob", "Barely, the shutters kept banging until about three."),
    ("Ann", "Same here, so I finally got up and tied ours shut with a scarf."),
    ("Bob", "That is resourceful, did it hold?"),
    ("Ann", "It held, but the scarf did not survive."),
    ("Bob", "A noble sacrifice, would you like some coffee?"),
    ("Ann", "Please, and make it strong, I have the quarterly review at ten."),
    ("Bob", "Oh no, is that today, I thought it was next week?"),
    ("Ann", "It was moved, did you not get the email on Friday?"),
    ("Bob", "I get about two hundred emails on a Friday, which one was it?"),
    ("Ann", "The one with the red flag and the subject line in capitals."),
    ("Bob", "That narrows it down to about forty."),
    ("Ann", "Well, it is at ten, in the big room, and you are presenting the numbers."),
    ("Bob", "I am presenting the numbers, since when?"),
    ("Ann", "Since you volunteered at the last meeting and said, leave it to me."),
    ("Bob", "I say that about everything, nobody is supposed to take it seriously."),
    ("Ann", "Apparently someone did, and you have two hours."),
    ("Bob", "Right, coffee first, panic second, slides third."),
    ("Ann", "I will help with the slides if you bring me a croissant."),
    ("Bob", "Deal, two croissants even, you might be saving my job."),
]
VOICE_FRAMES = 63  # 5 s of reference codes per speaker


def main() -> int:
    ap = argparse.ArgumentParser(description="Time a two-speaker conversation on a full-size CSM GGUF.")
    ap.add_argument("--model", default=str(REPO / "benchmarks" / "models" / "csm-1b-random-q8_0.gguf"),
                    help="a full-size CSM GGUF (benchmarks/make_model.py --size full --outtype q8_0)")
    ap.add_argument("--turns", type=int, default=len(SCRIPT), help=f"turns to speak, 1..{len(SCRIPT)}")
    ap.add_argument("--cap", type=float, default=10.0, help="cap per turn in seconds (default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write every measurement to this file")
    args = ap.parse_args()
    if not 1 <= args.turns <= len(SCRIPT):
        ap.error(f"--turns must be in 1..{len(SCRIPT)}")

    rng = np.random.default_rng(args.seed)
    voices = {name: pycsm.Segment(0, text, rng.integers(0, 2048, (VOICE_FRAMES, 32), dtype=np.int32))
              for name, text in [("Ann", "This is how I sound on a good day, when the coffee is hot."),
                                 ("Bob", "And this is me, reading a sentence aloud for the record.")]}
    t0 = time.perf_counter()
    tts = pycsm.CSM(args.model, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    rows = []
    with tts:
        context = tts.model.hparams.bb_max_pos
        print(f"{Path(args.model).name}: loaded in {load_s:.1f} s, context {context} positions, "
              f"{args.threads} threads, cap {args.cap:g} s per turn")
        print(f"{'turn':>4} {'who':>4} {'prompt':>6} {'kept':>4} {'frames':>6} {'first audio s':>13} "
              f"{'turn s':>7} {'s/s audio':>9}")
        st = tts.stream_converse(SCRIPT[:args.turns], voices, seed=args.seed, max_audio_length_ms=args.cap * 1000,
                                 chunk_frames=4, gap_ms=300)
        start = first = None
        current = -1

        def save(total=None) -> None:
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"model": args.model, "threads": args.threads, "cap_s": args.cap, "context": context,
                     "load_s": load_s, "total_s": total, "turns": rows}, indent=2))

        def close_turn(end: float) -> None:
            pieces = [p for p in st.pieces if p.turn == current]
            frames = sum(p.codes.shape[0] for p in pieces)
            kept_turns = {st.pieces[j].turn for p in pieces[:1] for j in p.context}
            row = {"turn": current + 1, "speaker": SCRIPT[current][0], "pieces": len(pieces),
                   "prompt_positions": [p.n_prompt for p in pieces], "kept_turns": len(kept_turns),
                   "frames": frames, "first_audio_s": first - start, "turn_s": end - start,
                   "s_per_s_audio": (end - start) / max(frames * 0.08, 1e-9)}
            rows.append(row)
            save()
            print(f"{row['turn']:>4} {row['speaker']:>4} {max(row['prompt_positions']):>6} {row['kept_turns']:>4} "
                  f"{frames:>6} {row['first_audio_s']:>13.2f} {row['turn_s']:>7.2f} {row['s_per_s_audio']:>9.2f}",
                  flush=True)

        t_all = time.perf_counter()
        start = t_all
        for chunk in st:
            now = time.perf_counter()
            if chunk.gap:
                continue
            if chunk.turn != current:
                if current >= 0:
                    close_turn(now_prev)
                    start = now_prev
                current, first = chunk.turn, now
            now_prev = now
        close_turn(time.perf_counter())
        total = time.perf_counter() - t_all
    positions = [max(r["prompt_positions"]) for r in rows]
    print(f"{len(rows)} turns in {total:.1f} s ({total / len(rows):.1f} s per turn); prompts {min(positions)}.."
          f"{max(positions)} positions of {context}; stop reason {st.stop_reason}")
    save(total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
