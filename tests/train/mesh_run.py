"""Train the small test config on a mesh, in a fresh process (the device count is fixed when
JAX starts): `python tests/train/mesh_run.py WORKDIR DATA FSDP TENSOR [PROCESS_ID N_PROCESSES
PORT]`. Prints one line `RESULT {json}`: the run's summary and the live shardings of the
query kernel, its Adam moment, the embedding and a norm."""

import json
import sys

import jax

from experiments.configs import tiny
from nanochat_jax.model.config import from_run_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.train import sharding
from nanochat_jax.train.metrics import flops_per_token
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.trainer import train


def small_config():
    """tiny on the Python stdlib, 2 layers x 64 tokens, 16 rows, 6 steps, checkpoints at 3."""
    c = tiny.get_config()
    c.model.n_layers, c.model.seq_len = 2, 64
    c.data.max_bytes, c.data.batch_size = 600_000, 16
    c.training.steps, c.training.eval_every, c.training.log_every = 6, 3, 1
    c.training.eval_batches, c.training.peak_flops = 2, 1e11
    c.optimizer.warmup_steps = 2
    c.checkpoint.every = 3
    return c


def main(argv):
    workdir, (data, fsdp, tensor) = argv[0], map(int, argv[1:4])
    c = small_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    if len(argv) > 4:
        c.distributed.process_id, c.distributed.num_processes = int(argv[4]), int(argv[5])
        c.distributed.coordinator_address = f"localhost:{argv[6]}"
    summary = train(c, workdir)

    model = Transformer(from_run_config(c))
    tx, _ = build_optimizer(c.optimizer, c.training.steps)
    mesh = sharding.make_mesh(c.mesh)
    state = init_train_state(model, tx, 0, c.model.seq_len, mesh)
    q = state.params["block_0"]["attn"]["q"]["kernel"]
    mu = next(leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
              if sharding.path_name(path).endswith("mu/block_0/attn/q/kernel"))

    def spec(x):
        return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]

    out = {"summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
           "devices": jax.device_count(), "processes": jax.process_count(),
           "flops_per_token": flops_per_token(from_run_config(c), c.model.seq_len),
           "peak_flops": c.training.peak_flops,
           "q_spec": spec(q), "q_shard": list(q.addressable_shards[0].data.shape),
           "mu_spec": spec(mu), "embed_spec": spec(state.params["embed"]["embedding"]),
           "norm_spec": spec(state.params["final_norm"]["scale"])}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
