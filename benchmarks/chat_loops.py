"""How often the chat's first reply loops: 20 varied first messages on the default model, each
answered with up to the chat's 512 tokens, under greedy decoding (the chat's old default),
llama.cpp's conversation sampling, that sampling with DRY, and with DRY and llama.cpp's repeat
penalty (the chat's default). A reply loops when some span
of 40 characters occurs in it three times or more.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/chat_loops.py [--max-tokens 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MESSAGES = [
    "Hi! My name is Ada. Please remember it.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "Give me three tips for learning to cook.",
    "What is photosynthesis?",
    "Tell me a story about a brave mouse.",
    "How do I make a cup of tea?",
    "What are the planets of the solar system?",
    "Why is the sky blue?",
    "Describe your favourite season and why.",
    "What is 17 times 23?",
    "Can you help me plan a trip to Japan?",
    "What is the difference between a virus and a bacterium?",
    "Write an email asking my boss for a day off.",
    "List some good habits for a healthy life.",
    "How does the internet work?",
    "Who was Ada Lovelace?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet.",
]
SPAN, TIMES = 40, 3


def loops(text: str) -> bool:
    """Some SPAN-character span occurs TIMES times or more (overlaps allowed)."""
    counts: dict[str, int] = {}
    for i in range(len(text) - SPAN + 1):
        span = text[i:i + SPAN]
        counts[span] = counts.get(span, 0) + 1
        if counts[span] >= TIMES:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--only-dry", default="", help="comma-separated DRY multipliers to try alone, e.g. 1.5,2")
    parser.add_argument("--seed-offset", type=int, default=0, help="seeds are offset + the message's index")
    parser.add_argument("--show", action="store_true", help="print each looping reply")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, help="with --only-dry: llama.cpp's repeat penalty")
    parser.add_argument("--dry-last-n", type=int, default=64,
                        help="with --only-dry: tokens DRY scans (-1: the whole conversation)")
    args = parser.parse_args()
    import runtime
    from runtime.chat import CHAT_DRY_MULTIPLIER, CHAT_REPEAT_PENALTY, CONVERSATION_DEFAULTS, ChatSession

    model = runtime.load(progress=False)
    dry = dict(dry_multiplier=CHAT_DRY_MULTIPLIER, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=64)
    configs = {
        "greedy (the old chat default)": {},
        "llama.cpp conversation sampling": dict(CONVERSATION_DEFAULTS),
        f"that sampling + DRY {CHAT_DRY_MULTIPLIER}": dict(CONVERSATION_DEFAULTS, dry=dry),
        f"+ repeat penalty {CHAT_REPEAT_PENALTY} (the chat's default)": dict(
            CONVERSATION_DEFAULTS, dry=dry, repeat_penalty=CHAT_REPEAT_PENALTY),
    }
    if args.only_dry:
        configs = {f"that sampling + DRY {m}, last {args.dry_last_n}, repeat penalty {args.repeat_penalty}": dict(
            CONVERSATION_DEFAULTS, repeat_penalty=args.repeat_penalty,
            dry=dict(dry, dry_multiplier=float(m), dry_penalty_last_n=args.dry_last_n))
                   for m in args.only_dry.split(",")}
    print("| decoding | replies that loop (of 20) | tokens generated | seconds |\n|---|---|---|---|")
    for name, sampling in configs.items():
        looping, tokens, start = 0, 0, time.perf_counter()
        for seed, message in enumerate(MESSAGES):
            params = dict(sampling, seed=args.seed_offset + seed) if sampling else {}
            session = ChatSession(model, sampling=params, max_tokens=args.max_tokens)
            reply = "".join(session.send(message))
            looping += loops(reply)
            if args.show and loops(reply):
                print(f"--- {message!r} (seed {args.seed_offset + seed}):\n{reply}\n---", flush=True)
            tokens += session.last.generated_tokens
        print(f"| {name} | {looping} | {tokens} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
