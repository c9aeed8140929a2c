"""Rust code generation metrics of a model: compile rate, test pass rate and pass@k.

`Sampler` turns the inference engine into the text-level `generate(prompts, n, temperature)`
that GRPO and these metrics use; `evaluate_code` samples n completions per problem, cuts
each at the end of the function body (`Problem.cut`), and verifies them with rustc in
parallel worker threads (each check is a subprocess).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import jax

from nanochat_jax.data.tokenizer import BPETokenizer
from nanochat_jax.errors import ConfigError, EvalError
from nanochat_jax.eval.passk import mean_pass_at_k
from nanochat_jax.eval.problems import Problem, load_problems
from nanochat_jax.eval.sandbox import (
    INSTALL_HINT,
    RustResult,
    check_compiles,
    run_tests,
    rustc_available,
)
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.model.params import unscan, unscanned
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train.schedule import Evaluator

# text-level generation: (prompts, n, temperature) -> n completions per prompt
Generate = Callable[[list[str], int, float], list[list[str]]]


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


def generate_completions(sampler: Generate, problems: Sequence[Problem], *, samples: int = 1,
                         temperature: float = 0.0) -> list[list[str]]:
    """`samples` raw completions (uncut) of each problem's prompt."""
    if not problems:
        raise EvalError("code evaluation needs at least one problem")
    if samples > 1 and temperature == 0:
        raise EvalError("several samples per problem need temperature > 0 (greedy repeats "
                        "one completion)")
    return sampler([p.prompt for p in problems], samples, temperature)


def score_completions(problems: Sequence[Problem], completions: Sequence[Sequence[str]], *,
                      tests: bool = True) -> dict[str, float]:
    """Raw completions (n per problem, the same n for all) -> {'eval/compile_rate',
    'eval/pass_rate' (with tests), 'eval/pass_at_k' (pass@k; k in 1, 5, 10 up to n)}."""
    results = verify_all(problems, completions, tests=tests)
    metrics = {"eval/compile_rate": statistics.fmean(
        compiled.compiles for rs in results for compiled, _ in rs)}
    if tests:
        passed = {p.task_id: [tested is not None and tested.passed for _, tested in rs]
                  for p, rs in zip(problems, results, strict=True)}
        metrics["eval/pass_rate"] = statistics.fmean(x for ps in passed.values() for x in ps)
        samples = len(completions[0])
        ks = [k for k in (1, 5, 10) if k <= samples]
        metrics.update({f"eval/pass_at_{k}": v for k, v in mean_pass_at_k(passed, ks).items()})
    return metrics


def evaluate_code(sampler: Generate, problems: Sequence[Problem], *, samples: int = 1,
                  temperature: float = 0.0, tests: bool = True) -> dict[str, float]:
    """`sampler` (a Sampler, or any such function) -> `score_completions`' metrics of
    `samples` completions per problem, and 'eval/code_seconds'."""
    start = time.monotonic()
    completions = generate_completions(sampler, problems, samples=samples,
                                       temperature=temperature)
    metrics = score_completions(problems, completions, tests=tests)
    metrics["eval/code_seconds"] = time.monotonic() - start
    return metrics


def save_generations(path: str, problems: Sequence[Problem],
                     completions: Sequence[Sequence[str]], **about) -> None:
    """One JSON line per completion: task_id, sample index, the raw completion (uncut, so a
    later re-score may cut differently) and `about` (checkpoint, step, temperature, ...)."""
    with open(path, "w", encoding="utf-8") as f:
        for problem, texts in zip(problems, completions, strict=True):
            for i, text in enumerate(texts):
                f.write(json.dumps({"task_id": problem.task_id, "sample": i,
                                    "completion": text, **about}) + "\n")


def load_generations(path: str, problems: Sequence[Problem]) -> list[list[str]]:
    """The completions of `save_generations`' file, ordered as `problems`; every problem
    must have the same number of samples and every task_id must be one of `problems`."""
    if not os.path.isfile(path):
        raise EvalError(f"generations file {path} does not exist")
    by_task: dict[str, dict[int, str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_task.setdefault(row["task_id"], {})[int(row["sample"])] = row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EvalError(f"{path}:{n}: expected a JSON object with task_id, sample and "
                                f"completion ({type(e).__name__}: {e})") from None
    ids = {p.task_id for p in problems}
    unknown, missing = sorted(set(by_task) - ids), sorted(ids - set(by_task))
    if unknown or missing:
        raise EvalError(f"{path} does not match the problem set: "
                        + "; ".join(f"{what} {names[:5]}{' ...' if len(names) > 5 else ''}"
                                    for what, names in (("not in the set:", unknown),
                                                        ("without generations:", missing))
                                    if names)
                        + " (use the --problems the generations were made for)")
    counts = {len(v) for v in by_task.values()}
    if len(counts) != 1:
        raise EvalError(f"{path}: problems have different numbers of samples {sorted(counts)}")
    return [[by_task[p.task_id][i] for i in sorted(by_task[p.task_id])] for p in problems]


def training_evaluators(config) -> tuple[Evaluator, ...]:
    """The trainer's periodic code evaluation for a run config (`train(config, workdir,
    evaluators=...)`): every `training.code_eval_every` steps, the code metrics of greedy
    completions of `training.code_eval_problems` (default the builtin set). Empty when
    `training.code_eval_every` is 0. rustc and the problem file are checked here, before the
    run starts."""
    training = config.training
    if not training.code_eval_every:
        return ()
    if not rustc_available():
        raise ConfigError(f"training.code_eval_every={training.code_eval_every} needs rustc: "
                          f"{INSTALL_HINT}; or set training.code_eval_every=0")
    problems = load_problems(training.code_eval_problems or "builtin")

    def build(model: Transformer, tokenizer: BPETokenizer):
        # decoding runs unrolled blocks; variables are set per call: one compilation serves all
        engine = Engine(Transformer(unscanned(model.cfg)), {})
        sampler = Sampler(engine, tokenizer, max_new_tokens=training.code_eval_max_new_tokens)

        def evaluate(params) -> dict[str, float]:
            engine.variables = {"params": unscan(model.cfg, params)[1]}
            return evaluate_code(sampler, problems)

        return evaluate

    return (Evaluator("code", training.code_eval_every, build, _describe_code),)


def _describe_code(evaluated: dict[str, float]) -> str:
    return (f"compile rate {evaluated['eval/compile_rate']:.3f}, "
            f"pass rate {evaluated['eval/pass_rate']:.3f}")

