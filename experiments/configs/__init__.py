"""Run configs as families with variants: `--config=FAMILY[:VARIANT,VARIANT...]`.

    base                 every default (the 125m model on rust-src, 32k BPE)
    tiny[:rust,gguf,mtp] the tiny model (tiny.py)
    e3[:ARM][,full,seed] the E3 optimizer comparison (e3.py)

A family module's `get_config(variants)` starts from `base` and applies each variant in the
order given. `ALIASES` keeps the names the configs had as separate files working (every
README/BUILD command of the time used them); both spellings give the same config and the
same default workdir (`runs/tiny_rust_gguf` for `tiny:rust,gguf` and `tiny_rust_gguf`).
"""

from __future__ import annotations

from collections.abc import Callable

ALIASES = {
    "tiny_rust": "tiny:rust",
    "tiny_rust_gguf": "tiny:rust,gguf",
    "e3_lion": "e3:lion",
    "e3_muon": "e3:muon",
    "e3_muon_8bit": "e3:muon_8bit",
    "e3_galore2": "e3:galore2",
    "e3_galore2_muon_8bit": "e3:galore2_muon_8bit",
    "e3_full": "e3:full",
}


def variant_names(variants: str | None) -> list[str]:
    """"a,b" -> ["a", "b"] (None or "" -> [])."""
    return [v.strip() for v in (variants or "").split(",") if v.strip()]


def known_variants(variants: str | None, choices, family: str, choose: str) -> list[str]:
    """The comma-separated `variants` as a list, each one of `choices`; an unknown one fails
    naming them (`choose`: how the family's choices read, with an example)."""
    names = variant_names(variants)
    unknown = [v for v in names if v not in choices]
    if unknown:
        raise ValueError(f"unknown {family} variant(s) {', '.join(map(repr, unknown))}: "
                         f"choose {choose}")
    return names


def apply_variants(config, variants: str | None, table: dict[str, Callable], family: str):
    """`config` with each comma-separated variant's function (table: name -> fn(config))
    applied in order. Unknown names fail with the family's choices."""
    names = known_variants(variants, table, family,
                           f"from {', '.join(table)}, comma-separated "
                           f"(--config={family}:{','.join(list(table)[:2])})")
    for name in names:
        table[name](config)
    return config
