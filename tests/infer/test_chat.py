"""The chat command streams a completion from a trained checkpoint."""

import io

import jax
import pytest

from nanochat_jax.cli.chat import main
from nanochat_jax.infer.chat import stream_text
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.infer.load import load


class _Chunks(io.StringIO):
    """A stdout that records each write, to see the streaming."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.mark.slow
def test_stream_text_writes_the_completion_piece_by_piece(trained_run):
    loaded = load(trained_run[0])
    engine = Engine(loaded.model, loaded.variables)
    out = _Chunks()
    gen = Generation(max_new_tokens=12, temperature=1.0)
    text, n, _ = stream_text(engine, loaded.tokenizer, "def f(x):\n", gen, jax.random.key(0), out)
    assert 2 < n <= 12  # a BOS/EOS may end the document early
    assert out.getvalue() == text + "\n"
    assert len([w for w in out.writes if w]) > 2  # streamed, not written once at the end
    ids = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("def f(x):\n").tolist()
    whole = engine.generate([ids], gen, jax.random.key(0)).tokens[0]
    assert text == loaded.tokenizer.decode(whole)


@pytest.mark.slow
def test_chat_command_completes_a_prompt_from_latent_packed_and_speculative(trained_run,
                                                                           capsys):
    workdir = trained_run[0]
    outs = []
    for flags in ([], ["--packed"], ["--speculative", "--temperature=0"]):
        main(["--checkpoint", workdir, "--prompt", "import os\\n", "--max_new_tokens=8",
              "--temperature=0", *flags])
        captured = capsys.readouterr()
        assert captured.out.startswith("import os\n")
        assert "tokens/s" in captured.err
        outs.append(captured.out)
    assert outs[0] == outs[1] == outs[2]  # greedy: same text from every path
