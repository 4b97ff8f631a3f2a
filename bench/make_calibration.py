"""Write a model-generated calibration text for `kiln quantize` (GPTQ).

Why: GPTQ fits each layer to the activations it sees; a few thousand tokens of one style
over-fit (held-out error above round-to-nearest on some layers). Sampling the model itself
over many topics and styles gives tens of thousands of varied tokens whose activations look
like the model's own (the "self-calibration" idea used by data-free quantization work). The
text is only activation statistics: it is the model's prose, not checked for facts.

    python bench/make_calibration.py --out kiln/runtime/quant/data/calibration-generated.txt

This is how kiln's shipped `calibration-generated.txt` was made (default model, the defaults
below: 128 samples, ~38k tokens, ~4 minutes on 2 cores). Each sample has its own seed; a
rerun gives the same text up to float rounding that differs with batching.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TOPICS = (
    "the history of the printing press", "how photosynthesis works",
    "a Python function that merges two sorted lists", "the rules of chess", "why the sky is blue",
    "a recipe for bread", "the causes of the French Revolution",
    "how a compiler turns source code into machine code", "a short story about a lighthouse keeper",
    "the difference between TCP and UDP", "how vaccines train the immune system",
    "a letter to a friend about moving to a new city", "the water cycle",
    "how to solve a quadratic equation", "the plot of a detective novel",
    "how interest rates affect the economy", "the life of honeybees",
    "a SQL query that finds duplicate rows and why it works", "the theory of plate tectonics",
    "how to write a good cover letter", "the basics of music theory",
    "what a hash table is and how collisions are handled", "the geography of South America",
    "a poem about autumn", "how electric motors work", "the Roman Empire's road network",
    "how to debug a memory leak in a C program", "the ethics of artificial intelligence",
    "the structure of a cell", "a dialogue between a teacher and a student about fractions",
    "how the stock market works", "the rules of basketball", "how a bill becomes a law",
    "a JavaScript example of promises and async functions", "the life cycle of stars",
    "tips for learning a foreign language", "how climate change affects oceans",
    "a product description for a hiking backpack", "the invention of the telephone",
    "how to use regular expressions to parse dates", "the philosophy of Stoicism",
    "how a neural network learns", "a travel guide to Kyoto", "how to care for houseplants",
    "the mathematics of probability with dice", "the Unix command line: pipes and redirection",
    "the human digestive system", "how bridges carry loads", "a news report about a local festival",
    "Shakespeare's Hamlet", "the design of a REST API for a library", "how batteries store energy",
    "the history of jazz", "an explanation of recursion with examples", "how to budget personal finances",
    "the migration of birds", "a summary of Newton's laws of motion", "how databases use indexes",
    "the Renaissance in Italy", "a bash script that backs up a folder", "the causes of earthquakes",
    "how to give constructive feedback", "the rules of grammar for commas", "how the internet routes packets",
)
STYLES = ("Write a detailed explanation of {}.", "Tell me about {}.", "Write an essay on {}.",
          "Explain {} to a beginner, with examples.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the text file to write")
    ap.add_argument("--model", default="default", help="the model that writes the text [default: default]")
    ap.add_argument("--per-topic", type=int, default=2, help="samples per topic (different styles and seeds) [default 2]")
    ap.add_argument("--max-tokens", type=int, default=320, help="tokens per sample [default 320]")
    args = ap.parse_args()

    from kiln.config import EngineConfig
    from kiln.runtime.engine import Engine
    from kiln.runtime.request import SamplingParams

    engine = Engine(EngineConfig(model=args.model, kv_cache_bytes=1 << 30, max_num_seqs=64))
    tok = engine.tokenizer
    prompts, params = [], []
    for i, topic in enumerate(TOPICS):
        for j in range(args.per_topic):
            message = STYLES[(i + j) % len(STYLES)].format(topic)
            prompts.append(tok.encode_chat([{"role": "user", "content": message}]))
            # Sampled (not greedy) with a mild repetition penalty: varied, non-looping prose.
            params.append(SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens,
                                         seed=1000 * i + j, repetition_penalty=1.1))
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(tok.decode(o) for o in outputs) + "\n", encoding="utf-8")
    print(f"{len(prompts)} samples, {sum(map(len, outputs))} tokens in {time.perf_counter() - start:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
