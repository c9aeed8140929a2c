"""Stream a completion to a text stream as the engine generates it (the chat command's output).

Our models are base models trained on source files, so a chat turn is a completion: the model
continues the prompt until it ends the document (BOS/EOS) or reaches `max_new_tokens`. The
command is `python -m nanochat_jax.cli.chat`.
"""

from __future__ import annotations

import sys
import time

from nanochat_jax.infer.engine import Engine, Generation


def stream_text(engine: Engine, tokenizer, prompt: str, gen: Generation, key, out=sys.stdout
                ) -> tuple[str, int, float]:
    """Write the completion of `prompt` to `out` as it is generated.
    -> (completion text, tokens generated, seconds)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt).tolist()
    tokens: list[int] = []
    shown = ""
    start = time.perf_counter()
    for chunk in engine.stream(ids, gen, key):
        tokens += chunk
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd"):  # a multi-byte character cut between tokens: wait for it
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tokenizer.decode(tokens)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text, len(tokens), time.perf_counter() - start

