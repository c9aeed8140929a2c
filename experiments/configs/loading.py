"""Loading run configs: names, variants, overrides and the `--config` command-line flag.

Every script that takes a run config imports this module (not the training command):

    load_config("tiny:rust,gguf")              the ConfigDict of a family with variants
    load_config("e3_full:seed")                an old name (ALIASES), the same config
    load_config("path/to/my_config.py")        a config file of one's own
    apply_overrides(config, ["training.steps=5"])      the benchmarks' `--set`
    run_name("tiny:rust,gguf") == "tiny_rust_gguf"     the default workdir's name

A config is NAME[:VARIANT,VARIANT...]: variants are comma-separated. A list of configs (the
benchmark's `--configs`) is separated by spaces, so `e3:muon e3:full,seed` is two configs
whatever their variants are. A name, variant or field that does not exist fails with one
`error:` line naming the choices, before any compute.

`define_config_flag()` registers absl's `--config` flag (ml_collections' config_flags); a
command calls it once at module level and passes `config_argv(sys.argv)` and
`parse_flags` to `absl.app.run`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os

from absl import flags
from ml_collections import config_flags

from experiments.configs import ALIASES, variant_names

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = "tiny"


@functools.cache
def families() -> tuple[str, ...]:
    """The config families: the modules of this directory that define `get_config`."""
    found = []
    for name in sorted(os.listdir(CONFIG_DIR)):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(CONFIG_DIR, name)) as f:
                tree = ast.parse(f.read())
            if any(isinstance(node, ast.FunctionDef) and node.name == "get_config"
                   for node in tree.body):
                found.append(name[:-3])
    return tuple(found)


def available_configs() -> list[str]:
    """The config families and the old names (ALIASES)."""
    return sorted([*families(), *ALIASES])


def canonical(value: str) -> str:
    """An old config name (`tiny_rust_gguf`, `e3_full:seed`) -> FAMILY:VARIANTS; other
    values unchanged."""
    name, _, variants = value.partition(":")
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
    """A space-separated list of configs: "e3:muon e3:full,seed" -> ["e3:muon", "e3:full,seed"].
    Commas separate a config's variants only: a piece that is not a config (the list written
    with commas, `e3_muon,e3_full`) fails naming the separator."""
    configs = text.split()
    names = available_configs()
    for config in configs:
        name, _, variants = canonical(config).partition(":")
        if name.endswith(".py") or os.sep in name:
            continue
        pieces = [name.split(",")[0], *name.split(",")[1:], *variant_names(variants)]
        if "," in name or any(":" in v or v in names for v in pieces[1:]):
            raise SystemExit(f"error: {config!r} is not one config: separate configs with "
                             f"spaces (commas separate one config's variants: e3:full,seed); "
                             f"configs: {', '.join(names)}")
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


def check_overrides_of(config, argv: list[str]) -> None:
    """Fail on `--config.a.b=...` overrides of `argv` that name no field of `config`,
    listing the fields there."""
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


@functools.cache
def define_config_flag():
    """absl's `--config` flag (a config file, locked), defined once per process: a command
    calls it at its top level (two commands imported together share it)."""
    return config_flags.DEFINE_config_file(
        "config", None, "Config NAME in experiments/configs/ (default tiny) or a file path.",
        lock_config=True)


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


def config_argv(argv: list[str]) -> tuple[list[str], str]:
    """A command line with `--config=NAME` resolved to its file and every `--config.*`
    override checked: (argv for absl, NAME). Exits with the message on a bad one."""
    argv, name = _rewrite_argv(argv)
    config_arg = next(a for a in argv if a.startswith("--config=") or a == "--config")
    config_path = (config_arg.split("=", 1)[1] if "=" in config_arg
                   else argv[argv.index("--config") + 1])
    check_overrides_of(load_config(config_path), argv)
    return argv, name


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad value (`--config.training.steps=abc`) reported as the
    one `error:` line every other refusal gives, not absl's FATAL banner."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
