"""Defaults for every run: each field here is read by the package part named by its group.

Other configs start from `base.get_config()` and change what they need; command-line
overrides (`--config.optimizer.lr=1e-3`) must name fields that exist here.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()

    # model/: a preset from nanochat_jax.model.config.PRESETS; None fields keep the preset.
    c.model = config_dict.ConfigDict()
    c.model.preset = "125m"
    c.model.ternary = True  # False: the same architecture in dense precision (the baseline)
    # ternary_product: "kernel" (the packed-weight kernel with an STE custom VJP) or
    # "fake_quant" (quantise, then a float matmul); kernel_backend: "auto" = Pallas (Mosaic)
    # on TPU, Pallas (Triton) on GPU, the jnp reference on CPU, by the platform of the mesh's
    # devices; or pallas / interpret / reference
    c.model.ternary_product = "kernel"
    c.model.kernel_backend = "auto"
    c.model.ternary_impl = config_dict.placeholder(str)  # the old spelling of both: mapped
    c.model.vocab_size = 32768  # >= data.vocab_size
    c.model.seq_len = 1024
    c.model.d_model = config_dict.placeholder(int)
    c.model.n_layers = config_dict.placeholder(int)
    c.model.n_heads = config_dict.placeholder(int)
    c.model.n_kv_heads = config_dict.placeholder(int)
    c.model.d_ff = config_dict.placeholder(int)
    c.model.tie_embeddings = False
    c.model.ffn_activation = "relu2"  # or "silu" (SwiGLU; what llama.cpp's bitnet arch runs)
    # activations and matmuls: "auto" = bfloat16 where the step is compiled for a GPU or TPU
    # (fp32 master weights, norm statistics, softmax and loss), float32 on a CPU (fastest
    # there); or "float32" / "bfloat16" everywhere
    c.model.compute_dtype = "auto"
    c.model.remat = "none"  # full | dots | loop: recompute activations in the backward
    # One nn.scan over the blocks (stacked parameters): compile time independent of depth
    c.model.scan_layers = False
    # nvfp4 | mxfp4: the backward of a dense model's linear layers in simulated FP4,
    # gradients stochastically rounded (forward exact; ternary/fp4.py says what is and is not
    # simulated); fp4_hadamard: 16-point random Hadamard on the weight gradient's operands;
    # fp4_head: the LM head's backward too (NVIDIA's recipe keeps it in BF16; a ternary
    # model's fp4_backward needs it, the head being its only non-ternary matmul)
    c.model.fp4_backward = "none"
    c.model.fp4_hadamard = False
    c.model.fp4_head = False
    c.model.rope_theta = 500_000.0
    c.model.norm_eps = 1e-5
    c.model.init_std = 0.02

    # data/: a corpus built from `source` (see nanochat_jax/data/corpus.py): rust-src,
    # rust-src-full, librust, python-stdlib, a directory (searched for `extensions`) or a
    # glob. Built once into `corpus_dir` (None: ~/.cache/nanochat_jax/corpora/<key>).
    c.data = config_dict.ConfigDict()
    c.data.source = "rust-src"
    c.data.extensions = (".rs",)
    c.data.max_file_bytes = 100_000  # larger files are dropped
    c.data.val_fraction = 0.05  # share of files held out, chosen by a hash of the path
    c.data.max_bytes = 0  # read at most this many bytes of training text (0: all)
    c.data.vocab_size = 32768  # BPE size trained on the corpus; 263 = plain bytes
    c.data.corpus_dir = config_dict.placeholder(str)
    c.data.batch_size = 32  # global batch (rows), split over processes
    c.data.prefetch = 2  # batches prepared ahead by the loader thread

    # train/: the loop.
    c.training = config_dict.ConfigDict()
    c.training.steps = 5000
    c.training.seed = 0
    c.training.log_every = 10
    c.training.eval_every = 250
    c.training.eval_batches = 8
    # Rust code eval during training (eval/code.py): every `code_eval_every` steps (0: off),
    # greedy completions of a problem set (None: the builtin one) cut at the end of the
    # function body, compiled and tested with rustc -> eval/compile_rate, eval/pass_rate.
    c.training.code_eval_every = 0
    c.training.code_eval_problems = config_dict.placeholder(str)
    c.training.code_eval_max_new_tokens = 128
    # k > 1: the batch is split into k micro-batches whose gradients are averaged before
    # one update (same result as the whole batch, 1/k of the activation memory)
    c.training.grad_accum = 1
    c.training.z_loss = 0.0  # coefficient of mean(logsumexp^2); 1e-4 is PaLM's
    c.training.vocab_chunk = 8192  # LM-head columns per chunk of the cross-entropy
    # On CPU: XLA's scheduler for the compiled steps. "memory" (XLA's sequential one) or
    # "concurrency" (XLA:CPU's default: overlaps independent ops, keeps far more buffers
    # live; e3_full's peak RSS 5.5 vs 4.2 GB at the same speed, BUILD.md). Ignored off CPU.
    c.training.cpu_schedule = "memory"
    # "START,COUNT": a jax.profiler trace of train steps START .. START+COUNT-1 (1-based)
    # into WORKDIR/profile (TensorBoard's profile plugin, Perfetto); "" = off
    c.training.profile_steps = ""
    # MFU denominator, FLOP/s of ONE chip (MFU divides by it times the device count); None:
    # the device kind's bf16 datasheet rate (train/metrics.py CHIPS), measured on a CPU
    c.training.peak_flops = config_dict.placeholder(float)
    # Before the first step on GPU/TPU, time the Pallas kernel's tilings for the step's
    # shapes (ternary/kernel.py); kept in $NANOCHAT_TUNE_CACHE, else
    # ~/.cache/nanochat_jax/kernel_tiles.json, and read back by later runs. False: the cached
    # or untuned default tiles.
    c.training.tune_kernel = True
    # A step whose loss, gradient or update is NaN/inf is skipped on device (counted in
    # training/skipped_steps); this many in a row stop the run, keeping the last checkpoint
    c.training.max_consecutive_skips = 10

    # optim/factory.py: `name` picks a builder (adamw, lion, muon, muon_8bit, galore2,
    # galore2_muon_8bit), which reads the shared fields and the sub-groups it uses.
    c.optimizer = config_dict.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1.5e-3  # lr of the hidden matrices (all leaves for adamw / lion)
    c.optimizer.adam_lr = 3e-4  # muon*, galore2*: lr of the AdamW group (embedding, head, norms)
    # every >= 2-D weight (embedding and head too; not norms) in every arm, times its lr
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip = 1.0  # global-norm clip; 0 disables
    c.optimizer.schedule = "bitnet"  # constant | linear | cosine | bitnet (two-stage)
    c.optimizer.warmup_steps = 375
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.stage2_at = 0.5  # bitnet: fraction of steps where LR drops and decay stops
    c.optimizer.stage2_lr_ratio = 2 / 3  # bitnet: 1.5e-3 -> 1e-3 as in the BitNet FAQ
    # AdamW: the adamw arm, every hybrid arm's AdamW group, GaLore 2's rank-r Adam
    c.optimizer.adamw = config_dict.ConfigDict()
    c.optimizer.adamw.b1 = 0.9
    c.optimizer.adamw.b2 = 0.95
    c.optimizer.adamw.eps = 1e-8
    # Lion's own (Chen et al. 2023): b1 interpolates the update, b2 the momentum; use an lr
    # 3-10x below AdamW's (e3_lion)
    c.optimizer.lion = config_dict.ConfigDict()
    c.optimizer.lion.b1 = 0.9
    c.optimizer.lion.b2 = 0.99
    # Muon: muon, muon_8bit, and galore2_muon_8bit's inner step
    c.optimizer.muon = config_dict.ConfigDict()
    c.optimizer.muon.momentum = 0.95
    c.optimizer.muon.ns_steps = 5  # Newton-Schulz iterations
    c.optimizer.muon.eps = 1e-8
    c.optimizer.muon.consistent_rms = config_dict.placeholder(float)  # 0.2: Moonlight scaling
    # *_8bit: blockwise int8 optimizer states
    c.optimizer.int8 = config_dict.ConfigDict()
    c.optimizer.int8.block_size = 256
    c.optimizer.int8.min_size = 4096  # smaller state tensors stay fp32
    # galore2*: GaLore 2 on the hidden matrices
    c.optimizer.galore = config_dict.ConfigDict()
    c.optimizer.galore.rank = 128  # projection rank (docs/techniques.md#galore-2: 128 at 60M)
    c.optimizer.galore.update_every = 200  # projector refresh period T
    # alpha on the back-projected Adam update (galore2_muon_8bit instead scales its Muon
    # update to full-rank Muon's RMS: optim/factory.py)
    c.optimizer.galore.scale = 0.25
    c.optimizer.galore.svd = "randomized"  # randomized (GaLore 2) or full
    # optim/fire.py: FIRE re-initialises the hidden matrices once, at `step` (any optimizer)
    c.optimizer.fire = config_dict.ConfigDict()
    c.optimizer.fire.step = config_dict.placeholder(int)
    # Newton-Schulz steps: 10 (FIRE's default, docs/techniques.md#fire) leaves 768-wide Gaussian
    # matrices far from isometric (min singular value 0.003); 30 converges
    c.optimizer.fire.iters = 30

    # model/mtp.py + losses.py: multi-token prediction (docs/techniques.md#mtp). Depth k predicts
    # token t+k+1; the loss adds weight * mean_k L_k, weight -> weight_final at switch_at x
    # steps.
    c.mtp = config_dict.ConfigDict()
    c.mtp.enabled = False
    c.mtp.kind = "sequential"  # sequential (DeepSeek-V3 modules) or parallel (Gloeckle heads)
    c.mtp.depth = 1
    c.mtp.weight = 0.3  # DeepSeek-V3: 0.3 for the first 10T of 14.8T tokens, then 0.1
    c.mtp.weight_final = 0.1
    c.mtp.switch_at = 0.68

    # model/loop.py + losses.py: LoopLM (docs/techniques.md#looplm). The block stack runs max_loops
    # times with shared weights; loss = E_p(t)[CE_t] - entropy * H(p), entropy ->
    # entropy_final.
    c.loop = config_dict.ConfigDict()
    c.loop.enabled = False
    c.loop.max_loops = 4  # Ouro: 4 (8 was unstable)
    c.loop.entropy = 0.1  # the coefficient beta (Ouro: 0.1, then 0.05)
    c.loop.entropy_final = 0.05
    c.loop.switch_at = 0.5

    # model/hyper.py: mHC (docs/techniques.md#mhc), the residual stream widened to `streams` copies.
    c.mhc = config_dict.ConfigDict()
    c.mhc.enabled = False
    c.mhc.streams = 4
    c.mhc.sinkhorn_iters = 20
    c.mhc.dynamic = True  # input-dependent maps; False: static learned maps

    # collider.py: Collider token filtering (docs/techniques.md#collider). Keeps the top keep_ratio
    # of each batch's positions by `score` (loss, or excess_loss over the model in
    # `reference`, a run's workdir with the same tokenizer) and runs the BitLinears' backward
    # on those only.
    c.collider = config_dict.ConfigDict()
    c.collider.enabled = False
    c.collider.keep_ratio = 0.7  # Rho-1 keeps ~60-70%; Collider reports -35% backprop at 0.6
    c.collider.score = "loss"  # loss | excess_loss
    c.collider.reference = config_dict.placeholder(str)
    # False: filter the loss only and run the exact backward (Rho-1, no savings) - the
    # ablation that separates the selection's effect from Collider's backward approximation
    c.collider.sparse_backward = True

    # train/trackers.py: Weights & Biases beside metrics.jsonl and TensorBoard (same tags);
    # the run id is kept in the checkpoint sidecar so a resumed run continues its W&B run.
    # mode: auto (online when the W&B server answers, else offline) | online | offline |
    # disabled. name "": the workdir's name; entity "": your default entity.
    c.logging = config_dict.ConfigDict()
    c.logging.wandb = False
    c.logging.project = "nanochat-jax"
    c.logging.entity = ""
    c.logging.name = ""
    c.logging.mode = "auto"

    # train/checkpoint.py
    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.max_to_keep = 3

    # train/sharding.py: the device mesh over every device of every process; -1 = the rest.
    # fsdp shards parameters and optimizer states, tensor splits heads / MLP / vocabulary,
    # and the batch is split over data x fsdp.
    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # train/sharding.py: multi-process start-up (jax.distributed.initialize) before any
    # device is used. coordinator_address (host:port) with num_processes and process_id, or
    # auto=True for JAX's detection (TPU pods, SLURM, Open MPI, JAX_* environment variables).
    c.distributed = config_dict.ConfigDict()
    c.distributed.auto = False
    c.distributed.coordinator_address = config_dict.placeholder(str)
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    return c
