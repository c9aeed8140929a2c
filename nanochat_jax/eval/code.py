"""Rust code generation metrics of a model: compile rate, test pass rate and pass@k.

`Sampler` turns the inference engine into the text-level `generate(prompts, n, temperature)`
that GRPO and these metrics use; `evaluate_code` samples n completions per problem, cuts
each at the end of the function body (`Problem.cut`), and verifies them with rustc in
parallel worker threads (each check is a subprocess).
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import time
from collections.abc import Sequence

import jax

from nanochat_jax.data.tokenizer import BPETokenizer
from nanochat_jax.errors import EvalError
from nanochat_jax.eval.grpo import Generate
from nanochat_jax.eval.passk import mean_pass_at_k
from nanochat_jax.eval.rust import Problem, RustResult, check_compiles, run_tests
from nanochat_jax.infer.engine import Engine, Generation


class Sampler:
    """Text in, completions out: prompts are BOS + their tokens, generation stops at BOS or
    EOS (the document separators the model was trained with) or after `max_new_tokens`.
    Rows are generated `batch_size` at a time; each call draws fresh randomness."""

    def __init__(self, engine: Engine, tokenizer: BPETokenizer, *, max_new_tokens: int = 192,
                 top_k: int = 0, top_p: float = 0.95, batch_size: int = 32, seed: int = 0):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.top_k, self.top_p = max_new_tokens, top_k, top_p
        self.batch_size = batch_size
        self.key, self.calls = jax.random.key(seed), 0
        self.tokens_generated = 0

    def __call__(self, prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        """n completions of each prompt (the continuation text, prompt excluded)."""
        tok = self.tokenizer
        gen = Generation(max_new_tokens=self.max_new_tokens, temperature=temperature,
                         top_k=self.top_k if temperature > 0 else 0,
                         top_p=self.top_p if temperature > 0 else 1.0,
                         stop_tokens=(tok.bos_id, tok.eos_id))
        # Token healing, simply: a prompt ending in whitespace ("{\n") ends at a token
        # boundary the BPE rarely produced in training ("{\n    " is usually one or two other
        # tokens), which makes a model close the block at once. The trailing whitespace is
        # left for the model to write, and removed from the front of what it writes.
        heads = [p.rstrip() for p in prompts]
        rows = [[tok.bos_id] + tok.encode(h).tolist() for h in heads for _ in range(n)]
        out: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            self.calls += 1
            key = jax.random.fold_in(self.key, self.calls)
            result = self.engine.generate(rows[start:start + self.batch_size], gen, key)
            self.tokens_generated += sum(len(t) for t in result.tokens)
            out += [tok.decode(t) for t in result.tokens]
        tails = [p[len(h):] for p, h in zip(prompts, heads, strict=True)]
        return [[_after(text, tails[i]) for text in out[i * n:(i + 1) * n]]
                for i in range(len(prompts))]


def _after(text: str, tail: str) -> str:
    """A completion of the prompt without its trailing whitespace `tail`, as a completion of
    the whole prompt: `tail` (or as much of it as the text starts with) dropped."""
    common = 0
    while common < min(len(tail), len(text)) and text[common] == tail[common]:
        common += 1
    return text[common:]


def verify_all(problems: Sequence[Problem], completions: Sequence[Sequence[str]], *,
               tests: bool = True, workers: int | None = None
               ) -> list[list[tuple[RustResult, RustResult | None]]]:
    """Each completion cut and checked: (compile-only result, test result or None). The
    tests run only when asked for and the program alone compiles."""
    def check(problem: Problem, completion: str):
        program = problem.program(problem.cut(completion))
        compiled = check_compiles(program)
        tested = run_tests(program, problem.tests) if tests and compiled.compiles else None
        return compiled, tested

    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        futures = [[pool.submit(check, p, c) for c in cs]
                   for p, cs in zip(problems, completions, strict=True)]
        return [[f.result() for f in fs] for fs in futures]


def evaluate_code(sampler: Generate, problems: Sequence[Problem], *, samples: int = 1,
                  temperature: float = 0.0, tests: bool = True) -> dict[str, float]:
    """`sampler` (a Sampler, or any such function) -> {'eval/compile_rate',
    'eval/pass_rate' (with tests), 'eval/pass_at_k' (pass@k; k in 1, 5, 10 up to `samples`),
    'eval/code_seconds'} of `samples` completions per problem."""
    if not problems:
        raise EvalError("evaluate_code needs at least one problem")
    if samples > 1 and temperature == 0:
        raise EvalError("several samples per problem need temperature > 0 (greedy repeats "
                        "one completion)")
    start = time.monotonic()
    completions = sampler([p.prompt for p in problems], samples, temperature)
    results = verify_all(problems, completions, tests=tests)
    metrics = {"eval/compile_rate": statistics.fmean(
        compiled.compiles for rs in results for compiled, _ in rs)}
    if tests:
        passed = {p.task_id: [tested is not None and tested.passed for _, tested in rs]
                  for p, rs in zip(problems, results, strict=True)}
        metrics["eval/pass_rate"] = statistics.fmean(x for ps in passed.values() for x in ps)
        ks = [k for k in (1, 5, 10) if k <= samples]
        metrics.update({f"eval/pass_at_{k}": v for k, v in mean_pass_at_k(passed, ks).items()})
    metrics["eval/code_seconds"] = time.monotonic() - start
    return metrics
