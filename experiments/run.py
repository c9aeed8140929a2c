"""`python -m experiments.run --config=NAME [--config.group.field=value ...] [--workdir=DIR]`

NAME is a config family in `experiments/configs/` with optional variants
(`tiny:rust,gguf`; experiments/configs/__init__.py lists them), one of the names they had
before families (`tiny_rust_gguf`), or a path to a config file. Overrides go through
ml_collections' config flags; a name, variant or field that does not exist fails before any
compute. The default workdir is `runs/NAME` with the variants joined by underscores
(`runs/tiny_rust_gguf`); re-running the same command resumes from it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs import ALIASES, variant_names
from nanochat_jax.errors import NanochatError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = "tiny"


def available_configs() -> list[str]:
    """The config families (modules of experiments/configs/) and the old names (ALIASES)."""
    families = [f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_")]
    return sorted(families + list(ALIASES))


def canonical(value: str) -> str:
    """An old config name (`tiny_rust_gguf`, `e3_full:seed`) -> FAMILY:VARIANTS; other
    values unchanged."""
    name, sep, variants = value.partition(":")
    if name not in ALIASES:
        return value
    family, _, own = ALIASES[name].partition(":")
    joined = ",".join(v for v in (own, variants) if v)
    return f"{family}:{joined}" if joined else family


def run_name(value: str) -> str:
    """The default workdir's name of a `--config` value: the family and its variants joined
    by underscores (`tiny:rust,gguf` and `tiny_rust_gguf` -> tiny_rust_gguf)."""
    name, _, variants = canonical(value).partition(":")
    name = os.path.basename(name).removesuffix(".py")
    return "_".join([name, *variant_names(variants)])


def split_configs(text: str) -> list[str]:
    """A comma-separated list of configs whose own variants are comma-separated too:
    "e3:muon,e3:full,seed,tiny_rust" -> ["e3:muon", "e3:full,seed", "tiny_rust"] (a piece
    that names no config is a variant of the one before it)."""
    names, configs = available_configs(), []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        family = piece.partition(":")[0]
        if configs and ":" in configs[-1] and ":" not in piece and family not in names:
            configs[-1] += "," + piece
        else:
            configs.append(piece)
    return configs


def resolve_config_arg(value: str) -> str:
    """A config NAME[:VARIANTS] (or old name) -> the path of its file[:VARIANTS]; paths pass
    through unchanged."""
    name, sep, arg = canonical(value).partition(":")
    if name.endswith(".py") or os.sep in name:
        return value
    if name not in available_configs():
        hint = difflib.get_close_matches(name, available_configs(), n=1)
        raise SystemExit(f"error: unknown config {name!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; choose one of: {', '.join(available_configs())}")
    return os.path.join(CONFIG_DIR, name + ".py") + sep + arg


def _rewrite_argv(argv: list[str]) -> tuple[list[str], str]:
    """Map `--config=NAME` / `--config NAME` to the config file; returns (argv, NAME)."""
    out, name, i = [argv[0]], DEFAULT_CONFIG, 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config="):
            name = arg.split("=", 1)[1]
            arg = "--config=" + resolve_config_arg(name)
        elif arg == "--config" and i + 1 < len(argv):
            name = argv[i + 1]
            out.append(arg)
            arg = resolve_config_arg(name)
            i += 1
        out.append(arg)
        i += 1
    if not any(a == "--config" or a.startswith("--config=") for a in out):
        out.insert(1, "--config=" + resolve_config_arg(DEFAULT_CONFIG))
    return out, run_name(name)


def load_config(name_or_path: str):
    """The ConfigDict of a config NAME, NAME:VARIANTS or file path (what `--config` accepts);
    the variants are passed to `get_config` as ml_collections' config_flags does. A bad
    variant exits with the family's choices."""
    path, sep, variants = resolve_config_arg(name_or_path).partition(":")
    spec = importlib.util.spec_from_file_location("_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_config(variants) if sep else module.get_config()
    except ValueError as e:
        raise SystemExit(f"error: --config={name_or_path}: {e}") from None


def apply_overrides(config, items: list[str]):
    """`GROUP.FIELD=VALUE` settings (the benchmark scripts' `--set`) applied to a ConfigDict;
    VALUE is read as a Python literal, else kept as a string. Unknown fields fail."""
    for item in items:
        path, sep, text = item.partition("=")
        check_overrides_of(config, [f"--config.{path}="] if sep else [f"--config.{item}"])
        if not sep:
            raise SystemExit(f"error: --set {item}: expected GROUP.FIELD=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *groups, field = path.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[field] = value
    return config


def check_overrides(config_path: str, argv: list[str]) -> None:
    """Fail on `--config.a.b=...` overrides that name no field, listing the fields there."""
    check_overrides_of(load_config(config_path), argv)


def check_overrides_of(config, argv: list[str]) -> None:
    """`check_overrides` on a loaded ConfigDict."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, walked = config, []
        for key in arg[len("--config."):].split("=", 1)[0].split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                where = ".".join(["config", *walked])
                raise SystemExit(f"error: {arg.split('=', 1)[0]}: {where} has no field {key!r}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                 + (f"; its fields are: {', '.join(fields)}" if fields else
                                    f"; {where} is a value, not a group"))
            node, walked = node[key], walked + [key]


CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config NAME in experiments/configs/ (default tiny) or a file path.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")


def main(argv: list[str], name: str) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nanochat_jax.eval.code import training_evaluators  # after flag parsing: fast --help
    from nanochat_jax.train.step import cpu_schedule_flags
    from nanochat_jax.train.trainer import train

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    workdir = _WORKDIR.value or os.path.join("runs", name)
    try:  # the CPU scheduler flag must be in place before JAX starts its CPU backend
        os.environ["XLA_FLAGS"] = cpu_schedule_flags(CONFIG.value.training.cpu_schedule,
                                                     os.environ.get("XLA_FLAGS", ""))
        summary = train(CONFIG.value, workdir, training_evaluators(CONFIG.value))
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    import jax

    if jax.process_index():
        return  # process 0 reports
    keys = ("loss/ce", "eval/ce", "eval/bpb", "throughput/tokens_per_sec", "throughput/mfu")
    print("final: step {} | ".format(summary["step"])
          + " | ".join(f"{k} {summary[k]:.4g}" for k in keys if k in summary))
    print(f"workdir: {workdir}  (tensorboard --logdir {os.path.join(workdir, 'tb')})")


def config_argv(argv: list[str]) -> tuple[list[str], str]:
    """A command line with `--config=NAME` resolved to its file and every `--config.*`
    override checked: (argv for absl, NAME). Exits with the message on a bad one."""
    argv, name = _rewrite_argv(argv)
    config_arg = next(a for a in argv if a.startswith("--config=") or a == "--config")
    config_path = (config_arg.split("=", 1)[1] if "=" in config_arg
                   else argv[argv.index("--config") + 1])
    check_overrides(config_path, argv)
    return argv, name


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad value (`--config.training.steps=abc`) reported as the
    one `error:` line every other refusal gives, not absl's FATAL banner."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None


def run() -> None:
    argv, name = config_argv(sys.argv)
    app.run(lambda a: main(a, name), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
