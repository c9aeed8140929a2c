"""`experiments.compile --topology=cpu`: the train step compiled for this host, with its memory
analysis (no libtpu needed), and the loss's vocabulary chunk as a memory lever."""

import pytest

from experiments.configs import tiny


def _compiled_train_row(vocab_chunk: int) -> dict:
    from experiments.compile import compile_steps

    c = tiny.get_config()
    c.data.batch_size = 8
    c.training.vocab_chunk = vocab_chunk
    info, (train,) = compile_steps(c, "cpu", 0)
    assert info["topology"] == "cpu" and info["ternary_impl"] == "auto -> reference"
    return train


@pytest.mark.slow
def test_the_cpu_compile_reports_memory_and_a_smaller_vocab_chunk_needs_less():
    whole, chunked = _compiled_train_row(384), _compiled_train_row(128)  # tiny's vocab: 384
    for row in (whole, chunked):
        assert row["argument_bytes"] > 0 and row["flops"] > 0 and "fits" not in row
    # the logits slab [B T, chunk] and its backward shrink with the chunk
    assert chunked["temp_bytes"] < whole["temp_bytes"]


@pytest.mark.slow
def test_a_scanned_model_compiles_its_train_step_and_the_unrolled_decode_step():
    """The decode row of a `model.scan_layers` run is compiled from the unrolled twin
    (`transformer.unscan`), as inference runs it."""
    from experiments.compile import compile_steps

    c = tiny.get_config()
    c.data.batch_size = 8
    c.model.scan_layers = True
    info, (train, decode) = compile_steps(c, "cpu", 1)
    assert info["scan_layers"] and train["step"].startswith("train")
    assert decode["step"].startswith("decode") and decode["total_bytes"] > 0
