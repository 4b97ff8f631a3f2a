"""llama.cpp's side of bench/quant.py, run by the python of a venv with llama-cpp-python
(it does not import kiln or torch). Reads a JSON job on stdin, prints one JSON line:

- perplexity of the GGUF model on the given token ids, in the same non-overlapping windows
  as kiln's (each window a fresh sequence from position 0, no BOS added);
- single-stream decode: one prompt, greedy, tokens/s of the decode steps (prefill excluded);
- concurrent decode: N prompts prefilled as N sequences of one context, then every step
  decodes one token of each through one llama_batch (llama.cpp's batched API, the best
  batched figure it has; its bundled server runs one request at a time);
- model bytes as llama.cpp counts them (llama_model_size).

Uses the C API through llama_cpp's ctypes bindings so that the batch holds many sequences.
llama.cpp's log goes to stderr (bench/quant.py keeps only its tail, on failure).
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
import time

import llama_cpp as lc
import numpy as np


class Runner:
    def __init__(self, path: str, n_ctx: int, n_seq: int, n_batch: int, threads: int) -> None:
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        # llama.cpp's AMX repacked weights ("extra buffer types") crash llama_decode on this
        # machine's CPU in llama-cpp-python 0.3.36 (a segfault on the first decode, any batch);
        # off, as llama.cpp's own `--no-repack` does, it runs its AVX-512 kernels.
        mparams.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        for start in range(0, len(items), self.n_batch):
            part = items[start:start + self.n_batch]
            b = self.batch
            b.n_tokens = len(part)
            for i, (tok, pos, seq, logits) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
                b.seq_id[i][0] = seq
            if lc.llama_decode(self.ctx, b) != 0:
                raise SystemExit("llama_decode failed")

    def logits(self, i: int) -> np.ndarray:
        ptr = lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def perplexity(self, ids: list[int], window: int) -> float:
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            self.clear()
            inp = chunk[:-1]
            self.decode([(t, p, 0, True) for p, t in enumerate(inp)])
            for i, target in enumerate(chunk[1:]):
                row = self.logits(i).astype(np.float64)
                m = row.max()
                nll += m + math.log(np.exp(row - m).sum()) - row[target]
            count += len(inp)
        return math.exp(nll / count)

    def decode_rate(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Prefill every prompt (sequence i), then time greedy decode steps of all of them."""
        self.clear()
        nxt = []
        for s, ids in enumerate(prompts):  # one prefill per sequence: its logits are the call's last
            self.decode([(t, p, s, p == len(ids) - 1) for p, t in enumerate(ids)])
            nxt.append(int(np.argmax(self.logits(-1))))
        pos = [len(ids) for ids in prompts]
        elapsed = 0.0
        for _ in range(new_tokens):
            t = time.perf_counter()
            self.decode([(nxt[s], pos[s], s, True) for s in range(len(prompts))])
            nxt = [int(np.argmax(self.logits(s))) for s in range(len(prompts))]
            elapsed += time.perf_counter() - t
            pos = [p + 1 for p in pos]
        return len(prompts) * new_tokens / elapsed


def main() -> int:
    job = json.loads(sys.stdin.read())
    n_seq = max(1, len(job["batch"]))
    longest = max(len(p) for p in job["batch"] + [job["single"]]) + job["new_tokens"]
    # One context for everything: room for every concurrent sequence (llama.cpp splits the
    # context among sequences) and for a perplexity window.
    n_ctx = n_seq * max(longest, job["window"] + 1)
    r = Runner(job["gguf"], n_ctx, n_seq, max(512, job["window"]), job["threads"])
    out: dict = {"model_bytes": int(lc.llama_model_size(r.model)), "version": lc.__version__}
    if job.get("perplexity"):
        out["perplexity"] = r.perplexity(job["ppl_ids"], job["window"])
    if job.get("speed"):
        r.decode_rate([job["single"][:8]], 2)  # warm-up
        out["single_stream_tok_s"] = r.decode_rate([job["single"]], job["new_tokens"])
        out["concurrent_tok_s"] = r.decode_rate(job["batch"], job["new_tokens"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
