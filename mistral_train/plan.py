"""`mistral-train plan`: per-device training memory of a run, before it runs (arithmetic only: no torch, no weights).

Optimizer states per trainable parameter, b the weights' bytes (4 fp32, 2 bf16/fp16): adamw 2b, m and v in the
weights' dtype, as our loop keeps them (train/optim.py, torch AdamW); adamw_mixed 8 (fp32 m, v) + 4 (an fp32 master
of 16-bit weights), DeepSpeed's ZeRO optimizer under bf16, where a replica holds 16 bytes/param (its ZeRO-0
figure); adamw8bit 2 + 8/256, bitsandbytes' AdamW8bit (8-bit m and v, an fp32 absmax per 256 values each).
Our loop over 16-bit trained weights (trainer.bf16_update, train/optim.py): fp32_master is adamw_mixed (fp32
master, m and v), kahan is adamw_kahan (2b + a 2-byte compensation per 16-bit parameter), stochastic_rounding
is adamw_sr (2b: nothing stored), plain is adamw.
Model states per device, N processes. Wt trainable weights; F a frozen float base (LoRA); Q an NF4 base (uint8
buffers: neither FSDP2 nor ZeRO shards them); O optimizer states; G the gradient partition ZeRO steps on: an fp32
copy (4 bytes/param) beside 16-bit weights, else the gradients Wt themselves (G32: the copy only, else 0).
  ddp (and one process)  weights Wt+F+Q           grads Wt                optim O
  fsdp2                  weights (Wt+F)/N+Q+live  grads Wt/N+live         optim O/N
  zero1 | zero2          weights Wt+F+Q           grads Wt+G32/N | (Wt+G32)/N  optim O/N
  zero2_offload          weights Wt+F+Q           grads 0                 optim 0   host G+O
  zero3 | zero3_offload  weights (Wt+F)/N+Q+live  grads G/N+live | live   optim O/N | 0 (host G+O)
  zero3_offload_params   weights Q+live           grads live              optim 0   host Wt+F+G+O
With bf16 this is the accounting of DeepSpeed's estimators (ZeRO-2: 2Ψ + 18Ψ/N bytes, offloaded 2Ψ; ZeRO-3:
18Ψ/N + 4L, offloaded 2Ψ/N + 4L and 4L; L the largest module's parameters): tests/oracle/test_plan_deepspeed.py.
live: ZeRO-3 gathers one module at a time (L weights and gradients); FSDP2 keeps its root unit (embeddings, final
norm, lm_head) gathered plus a decoder block and the prefetched next (weights root + 2 blocks, grads root + 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mistral_train.config import AdapterSpec, ModelSpec, RunConfig, TrainerSpec
from mistral_train.errors import ConfigError
from mistral_train import plan_moe, plan_vision
from mistral_train.jsonfile import read_json_object
from mistral_train.model import native
from mistral_train.model.config import MistralConfig
from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
ADAMW8BIT_BYTES = 2 + 2 * 4 / 256
RESERVE_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers, allocator slack: outside every term
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BUNDLED_VOCAB = {None: 32000, "bundled:v1": 32000, "bundled:v2": 32768, "bundled:v3": 32768}
# ddp also stands for one process; *_offload: DeepSpeed's offload_optimizer to the CPU; *_params: offload_param too
STRATEGIES = ("ddp", "fsdp2", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "zero3_offload_params")
DEEPSPEED, SHARDING_ONLY = STRATEGIES[2:], ("fsdp2", "zero1", "zero2", "zero3")  # the latter: left out for 1 process
OPTIMIZERS = ("auto", "adamw", "adamw_mixed", "adamw8bit", "adamw_kahan", "adamw_sr")
NOT_DEEPSPEED = ("adamw", "adamw8bit", "adamw_kahan", "adamw_sr")  # DeepSpeed's ZeRO optimizer keeps fp32 masters
# the states our loop's adamw keeps over 16-bit trained weights, by trainer.bf16_update (auto: kahan)
BF16_UPDATE_STATES = {"auto": "adamw_kahan", "kahan": "adamw_kahan", "fp32_master": "adamw_mixed",
                      "stochastic_rounding": "adamw_sr", "plain": "adamw"}


def linear_shapes(cfg: MistralConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every decoder linear an adapter may target, by transformers' module names (lm_head excluded):
    each layer's attention, and its MLP where it is dense (with experts: Small 4's shared experts; the routers and
    3-D routed experts are plan_moe.expert_sizes')."""
    h, moe = cfg.hidden_size, set(plan_moe.expert_layers(cfg))
    shapes = {}
    for n in range(cfg.num_hidden_layers):
        layer = plan_moe.attention_shapes(cfg)
        if n not in moe:
            layer.update(plan_moe.swiglu_shapes("mlp", h, cfg.intermediate_size))
        elif cfg.mlp_kind == "shared_moe" and cfg.n_shared_experts:
            shared = cfg.n_shared_experts * cfg.moe_intermediate_size
            layer.update(plan_moe.swiglu_shapes("mlp.shared_experts", h, shared))
        shapes.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    return shapes


def module_sizes(cfg: MistralConfig) -> dict[str, int]:
    """Own parameter count of every module that holds parameters; a tied lm_head is embed_tokens' weight,
    so it is left out. sum(values) == sum(p.numel() for p in Mistral(cfg).parameters())."""
    h = cfg.hidden_size
    sizes = {"model.embed_tokens": cfg.vocab_size * h, "model.norm": h}
    for n in range(cfg.num_hidden_layers):
        sizes[f"model.layers.{n}.input_layernorm"] = sizes[f"model.layers.{n}.post_attention_layernorm"] = h
    sizes.update({name: a * b for name, (a, b) in linear_shapes(cfg).items()})
    sizes.update(plan_moe.expert_sizes(cfg))  # experts and routers (and Small 4's latent norms); {} when dense
    if not cfg.tie_word_embeddings:
        sizes["lm_head"] = cfg.vocab_size * h
    return sizes


@dataclass
class Weights:
    """The parameters of a run, by how they are stored and trained (bytes are for the whole model)."""

    total: int  # the model's own parameters (adapters not included)
    trainable: int  # Ψ: full fine-tuning, every one; LoRA, adapters plus modules_to_save copies
    trainable_bytes: float  # Wt
    sixteen_bit: int  # trainable parameters held in 16 bits (they get fp32 masters under adamw_mixed)
    frozen_bytes: float = 0.0  # F: a frozen float base
    nf4_bytes: float = 0.0  # Q: a frozen NF4 base
    float_params: int = 0  # parameters FSDP2 / ZeRO-3 shard (everything but the NF4 base)
    lm_head_trains: bool = True  # the chunked loss then keeps an fp32 (vocab, hidden) gradient buffer


def run_weights(cfg: MistralConfig, adapter: AdapterSpec, weight_bytes: int, adapter_bytes: int = 4) -> Weights:
    """Weights of a run: full fine-tuning, or LoRA/QLoRA (adapters fp32 as ours and peft keep them; frozen base)."""
    sizes = module_sizes(cfg)
    total, sixteen = sum(sizes.values()), weight_bytes == 2
    if adapter.kind == "none":
        return Weights(total, total, total * weight_bytes, total if sixteen else 0, float_params=total)
    linears, targets = linear_shapes(cfg), adapter.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        chosen = list(linears)
    elif isinstance(targets, str):
        chosen = [n for n in linears if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + str(t)) for t in targets)]
    experts_lora = plan_moe.expert_lora_parameters(cfg, list(adapter.target_parameters), adapter.r)
    if not chosen and not experts_lora:
        raise ConfigError(f"adapter.target_modules={targets!r} matches no decoder linear "
                          "(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")
    names = {**sizes, "lm_head": cfg.vocab_size * cfg.hidden_size}  # a tied head is copied when saved
    # an entry names the module or one holding it, at dot boundaries: "lm_head", "embed_tokens", "layers.0"
    saved = [n for n in names if any(f".{t}." in f".{n}." for t in adapter.modules_to_save)]
    lora = sum(adapter.r * (i + o) + (o if adapter.use_dora else 0) for i, o in (linears[n] for n in chosen))
    lora += experts_lora  # adapter.target_parameters: LoRA on expert weights (and a named router)
    copies = sum(names[n] for n in saved)
    # every decoder linear, and every routed expert (the router stays in the weights' dtype)
    nf4 = sum(a * b for a, b in linears.values()) + plan_moe.expert_parameters(cfg) if adapter.kind == "qlora" else 0
    return Weights(total, lora + copies, adapter_bytes * lora + weight_bytes * copies,
                   (lora if adapter_bytes == 2 else 0) + (copies if sixteen else 0),
                   frozen_bytes=weight_bytes * (total - nf4), nf4_bytes=NF4_BYTES * nf4,
                   float_params=total - nf4 + lora + copies, lm_head_trains="lm_head" in saved)


@dataclass
class Activations:
    """Bytes of one micro-batch's activations (see `activation_bytes`)."""

    layers: float  # saved by the decoder blocks in the forward
    recompute: float  # one block recomputed in the backward (gradient checkpointing)
    head: float  # final norm, RoPE tables, the loss's precomputed gradients (saved)
    loss: float  # the chunked loss's transient buffers
    masks: float
    casts: float  # autocast's 16-bit copies of fp32 weights

    @property
    def total(self) -> float:
        return self.layers + self.recompute + self.head + self.loss + self.masks + self.casts


def down_proj_keeps_input(adapter: AdapterSpec) -> bool:
    """Whether down_proj keeps the SwiGLU product for backward: blocks.MLP fuses it away for a plain nn.Linear only,
    not for NF4 (qlora) or a LoRA target (a regex target is tried on layer 0's name)."""
    if adapter.kind != "lora":
        return adapter.kind == "qlora"
    targets, name = adapter.target_modules, "model.layers.0.mlp.down_proj"
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def whole_blocks(policy) -> bool:  # partial policies (attention, mlp, every_k) planned as none: an upper bound
    return policy is True or str(policy).lower() in ("true", "block")


def activation_bytes(cfg: MistralConfig, batch: int, seq: int, *, act_bytes: int, resid_bytes: int, checkpointing: bool,
                     loss_chunk: int, lm_head_trains: bool, masked: bool = True, cast_params: int = 0,
                     down_kept: bool = False) -> Activations:
    """Activations of one micro-batch of B = `batch` rows of T = `seq` tokens, N = B T.

    a = act_bytes (matmul outputs: 2 under bf16 autocast or 16-bit weights), r = resid_bytes (residual stream:
    model.dtype); h hidden, q = heads * head_dim, kv = kv_heads * head_dim, i intermediate, V vocab, L layers.
    Per layer and token P = 2(r h + 4) + k a h + a(q + 2kv) + a q + 4 heads + 2 a i: each RMSNorm keeps its
    input and fp32 rstd (model/fused.py); the linears their input (k = 2, one per norm; 5 under autocast over fp32,
    one cast per linear); SDPA q, k, v (GQA not expanded), its output (o_proj's input too) and fp32 logsumexp; the
    SwiGLU MLP gate and up (silu and the product are recomputed; 3 a i with `down_kept`: an adapted or NF4
    down_proj keeps the product it is given).
    layers = L N P; with gradient checkpointing L N r h (each block's input) and recompute = N P.
    head = N(r h + 4) (final norm) + 2 N head_dim r (RoPE cos, sin) + N r h (the hidden gradient our chunked
    loss makes in the forward) + 4 V h (fp32 lm_head gradient, while the head trains).
    loss = N r h (label tokens' hidden copy) + a (chunk, V) fp32 logits buffer and its 16-bit cast, never (N, V).
    masks (`masked`: packed documents, padding, a window < T): the bool (B, T, T) mask and SDPA's float bias of it
    per layer, a B T^2 (one layer's with checkpointing). casts = 2 `cast_params`. Checked against what autograd
    saves (tests/test_plan.py). Assumes all tokens have labels (an upper bound), CUDA SDPA (no T x T scores), no
    dropout; LoRA's rank-sized tensors and the backward's transients are left to RESERVE_GIB.
    """
    h, i, heads, L, hd, a, r = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                                cfg.head_dim, act_bytes, resid_bytes)
    q, kv, n = heads * hd, cfg.num_key_value_heads * hd, batch * seq
    norm = r  # model/fused.py's rms_norm keeps x, not its fp32 copies
    mlp = plan_moe.mlp_activation_bytes(cfg, a, down_kept)  # 2 a i for a dense SwiGLU
    per_token = 2 * (norm * h + 4) + (2 if a == r else 5) * a * h + a * (q + 2 * kv) + a * q + 4 * heads + mlp
    layers = L * n * r * h if checkpointing else L * n * per_token
    head = n * (norm * h + 4 + 2 * hd * r + r * h) + (4 * cfg.vocab_size * h if lm_head_trains else 0)
    loss = n * r * h + min(loss_chunk, n) * cfg.vocab_size * (4 + (2 if min(a, r) == 2 else 0))
    masks = batch * seq * seq * (1 + a * (1 if checkpointing else L)) if masked else 0
    return Activations(layers, n * per_token if checkpointing else 0, head, loss, masks, 2 * cast_params)


@dataclass
class Row:
    """One strategy's bytes per device."""

    strategy: str
    optimizer: str
    weights: float
    grads: float
    optimizer_states: float
    activations: float
    host: float  # CPU memory of the node for offloaded states
    total: float  # weights + grads + optimizer_states + activations
    fits: bool  # total + RESERVE_GIB <= the device's GiB


def model_states(strategy: str, n: int, w: Weights, optimizer: str, largest: int, block: int,
                 root: int) -> tuple[float, float, float, float]:
    """(weights, grads, optimizer states, host) bytes per device: the module docstring's table."""
    Wt, F, Q, P16, zero = w.trainable_bytes, w.frozen_bytes, w.nf4_bytes, w.sixteen_bit, strategy in DEEPSPEED
    # (states, the fp32 gradient copy ZeRO's optimizer steps on beside 16-bit weights)
    O, G32 = {"adamw": (2 * Wt, 0.0), "adamw_sr": (2 * Wt, 0.0), "adamw_kahan": (2 * Wt + 2 * P16, 0.0),
              "adamw8bit": (ADAMW8BIT_BYTES * w.trainable, 0.0),
              "adamw_mixed": (8 * w.trainable + 4 * P16, 4 * P16 if zero else 0.0)}[optimizer]
    G = G32 or Wt  # the gradient partition the optimizer reads
    per_w, per_g = (Wt + F) / w.float_params, Wt / w.float_params  # bytes per gathered parameter
    live = {"fsdp2": (root + 2 * block, root + block)}.get(strategy, (largest, largest))
    live_w, live_g = live[0] * per_w, live[1] * per_g
    full, sharded = Wt + F + Q, (Wt + F) / n + Q + live_w
    return {"ddp": (full, Wt, O, 0.0), "fsdp2": (sharded, Wt / n + live_g, O / n, 0.0),
            "zero1": (full, Wt + G32 / n, O / n, 0.0), "zero2": (full, (Wt + G32) / n, O / n, 0.0),
            "zero2_offload": (full, 0.0, 0.0, G + O), "zero3": (sharded, G / n + live_g, O / n, 0.0),
            "zero3_offload": (sharded, live_g, 0.0, G + O),
            "zero3_offload_params": (Q + live_w, live_g, 0.0, Wt + F + G + O)}[strategy]


@dataclass
class PlanOptions:
    """The plan verb's own keys, taken out of the Hydra overrides."""

    num_processes: int = 1
    device_gib: float = 80.0
    strategy: Optional[str] = None  # None: every strategy that means something for num_processes
    # auto: our loop's outside DeepSpeed (trainer.optimizer, and trainer.bf16_update over 16-bit trained weights:
    # `loop_optimizer`), adamw_mixed under it with 16-bit weights
    optimizer: str = "auto"


PLAN_KEYS = {"num_processes": "must be a whole number >= 1 (processes, one per GPU)",
             "device_gib": "must be a positive number (GiB of one device, e.g. 80)",
             "strategy": "expected one of " + ", ".join(STRATEGIES),
             "optimizer": "expected one of " + ", ".join(OPTIMIZERS)}


def split_plan_options(overrides: Sequence[str]) -> tuple[PlanOptions, list[str]]:
    """Take num_processes=, device_gib=, strategy=, optimizer= out of `overrides`; errors name the key."""
    opts, rest = PlanOptions(), [item for item in overrides if item.partition("=")[0] not in PLAN_KEYS]
    for key, _, value in (item.partition("=") for item in overrides if item not in rest):
        valid = {"num_processes": value.isdigit() and int(value) >= 1,
                 "device_gib": bool(re.fullmatch(r"\d+(\.\d*)?|\.\d+", value)) and float(value) > 0,
                 "strategy": value in STRATEGIES, "optimizer": value in OPTIMIZERS}[key]
        if not valid:
            raise ConfigError(f"{key}={value}: {PLAN_KEYS[key]}")
        setattr(opts, key, int(value) if key == "num_processes" else float(value) if key == "device_gib" else value)
    return opts, rest


def model_shape(spec: ModelSpec) -> MistralConfig:
    """The architecture: model.path's config.json (no weights read; a mistral3 file's `text_config`), else the
    spec's fields + the tokenizer's vocab."""
    try:
        if spec.path and native.is_native_folder(Path(spec.path)):  # params.json: Mistral's native format
            return native.read_params(Path(spec.path))
        if spec.path:
            path = Path(spec.path) / "config.json"
            d = read_json_object(path) if path.is_file() else {}
            if d.get("model_type") == "mistral3":  # a vision-language folder: its language model is what trains
                if not isinstance(d.get("text_config"), dict):
                    raise ValueError(f"{path}: a mistral3 config needs a `text_config` object")
                return MistralConfig.from_hf_dict(d["text_config"], source=f"{path} `text_config`")
            return MistralConfig.from_json_file(path)
        if spec.hf_config:  # a class whose fields ModelSpec lacks (mistral4): its config.json keys, defaults for the rest
            return MistralConfig.from_hf_dict({"model_type": spec.model_type, "vocab_size": spec.vocab_size,
                                               **spec.hf_config}, source="model.hf_config")
        # a preset's published vocabulary (its tokenizer lives in a folder not given); the bundled vocabularies
        # are known; another tokenizer file is cheap to read
        vocab = (spec.vocab_size or BUNDLED_VOCAB.get(spec.tokenizer)
                 or load_tokenizer(resolve_tokenizer_path(spec.tokenizer)).vocab_size)
        return MistralConfig.from_spec(spec, vocab_size=vocab)
    except (ValueError, OSError) as err:  # the messages name the file or the field
        raise ConfigError(f"model.path={spec.path}: {err}" if spec.path else f"model: {err}") from err


def carried(spec: ModelSpec, shape: MistralConfig) -> int:
    """Parameters a run carries untouched beside the language model (a mistral3 folder's vision tower and
    projector, plan_vision.py): counted, never on the device."""
    if spec.path and native.is_native_folder(Path(spec.path)):
        return 0  # a native folder we read holds the language model only (model/native.py refuses vision keys)
    if spec.path:
        path = Path(spec.path) / "config.json"
        return plan_vision.of_config_json(read_json_object(path), str(path))
    return plan_vision.of_spec(spec.vision, shape.hidden_size)


def loop_optimizer(trainer: TrainerSpec, w: Weights) -> str:
    """The plan's name for the optimizer states our loop keeps (outside DeepSpeed) for `trainer` over `w`."""
    if trainer.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return "adamw8bit"
    if not w.sixteen_bit:
        return "adamw"  # fp32 trained weights: every bf16_update is plain AdamW
    if trainer.bf16_update not in BF16_UPDATE_STATES:
        raise ConfigError(f"trainer.bf16_update={trainer.bf16_update}: expected one of {', '.join(BF16_UPDATE_STATES)}")
    return BF16_UPDATE_STATES[trainer.bf16_update]


@dataclass
class Plan:
    """What `format_plan` prints: the run, its architecture, and one Row per strategy."""

    run: RunConfig
    model: MistralConfig
    weights: Weights  # as our loop holds them (ddp)
    options: PlanOptions
    rows: list[Row] = field(default_factory=list)
    carried: int = 0  # parameters carried untouched, no device memory (a vision tower and projector)
    expert_bytes: dict[str, float] = field(default_factory=dict)  # routed experts' weights per device, by strategy


def plan_run(cfg: RunConfig, options: Optional[PlanOptions] = None) -> Plan:
    """Per-device memory of `cfg` for each strategy in `options` (all of them by default)."""
    opts, t = options or PlanOptions(), cfg.trainer
    for key, value, allowed in (("model.dtype", cfg.model.dtype, DTYPE_BYTES),
                                ("trainer.precision", t.precision, ("fp32", "bf16"))):
        if value not in allowed:
            raise ConfigError(f"{key}={value}: expected one of {', '.join(allowed)}")
    if opts.strategy in DEEPSPEED and opts.optimizer in NOT_DEEPSPEED:
        raise ConfigError(f"optimizer={opts.optimizer} with strategy={opts.strategy}: DeepSpeed's ZeRO optimizer keeps "
                          "fp32 master weights and moments; use optimizer=auto or adamw_mixed")
    shape, b, autocast, n = model_shape(cfg.model), DTYPE_BYTES[cfg.model.dtype], t.precision == "bf16", opts.num_processes
    sizes = module_sizes(shape)  # FSDP2 units below: a decoder block, and the root (embeddings, norm, lm_head)
    block = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    root = sum(sizes.values()) - shape.num_hidden_layers * block
    strategies = [opts.strategy] if opts.strategy else [  # DeepSpeed rows only with an optimizer DeepSpeed runs
        s for s in STRATEGIES if not (n == 1 and s in SHARDING_ONLY) and not (s in DEEPSPEED and opts.optimizer
                                                                              in NOT_DEEPSPEED)]
    plan = Plan(cfg, shape, run_weights(shape, cfg.adapter, b), opts, carried=carried(cfg.model, shape))
    for s in strategies:
        ds16 = s in DEEPSPEED and (b == 2 or autocast)  # DeepSpeed's bf16 casts every float weight, adapters too
        wb = 2 if ds16 else b
        w = run_weights(shape, cfg.adapter, wb, adapter_bytes=2 if ds16 else 4)
        optimizer = opts.optimizer if opts.optimizer != "auto" else (
            "adamw_mixed" if ds16 else "adamw" if s in DEEPSPEED else loop_optimizer(t, w))
        # bf16 autocast over fp32 weights keeps a 16-bit copy of each (float) linear weight until the backward
        casts = (sum(sizes[k] for k in linear_shapes(shape) if cfg.adapter.kind != "qlora")
                 + shape.vocab_size * shape.hidden_size) if autocast and wb == 4 else 0
        act = activation_bytes(shape, t.batch_size, t.max_seq_len, act_bytes=2 if autocast or wb == 2 else 4,
                               resid_bytes=wb, checkpointing=whole_blocks(cfg.model.gradient_checkpointing), loss_chunk=t.loss_chunk_size,
                               lm_head_trains=w.lm_head_trains, cast_params=casts,
                               down_kept=down_proj_keeps_input(cfg.adapter))
        weights, grads, optim, host = model_states(s, n, w, optimizer, max(sizes.values()), block, root)
        total = weights + grads + optim + act.total
        if plan_moe.is_moe(shape):  # NF4 experts are not sharded (like Q); float ones as the weights are
            experts = plan_moe.expert_parameters(shape)
            sharded = n if s in ("fsdp2", "zero3", "zero3_offload") else 1
            plan.expert_bytes[s] = (NF4_BYTES * experts if cfg.adapter.kind == "qlora"
                                    else 0.0 if s == "zero3_offload_params" else wb * experts / sharded)
        plan.rows.append(Row(s, optimizer, weights, grads, optim, act.total, host, total,
                             total / GIB + RESERVE_GIB <= opts.device_gib))
    return plan


def format_plan(plan: Plan) -> str:
    """The plan as a text table, GiB per device."""
    m, w, o, run = plan.model, plan.weights, plan.options, plan.run
    def label(strategy: str) -> str:  # one process replicates nothing: trainer.strategy calls it single
        return "single" if strategy == "ddp" and o.num_processes == 1 else strategy

    rows = [("GiB per device", "optimizer", "weights", "grads", "optim", "activ", "total", "host", "fits")] + [(label(r.strategy), r.optimizer, *(f"{c / GIB:.2f}" if c else "-" for c in (r.weights, r.grads,
            r.optimizer_states, r.activations, r.total, r.host)), "yes" if r.fits else "NO")
            for r in plan.rows]
    return "\n".join([
        f"model: {w.total:,} parameters ({w.total / 1e9:.2f} B), {w.trainable:,} trained (adapter={run.adapter.kind})"
        f"; weights {run.model.dtype}, precision {run.trainer.precision}",
        *([f"carried untouched: {plan.carried:,} parameters ({plan.carried / 1e9:.2f} B: vision tower and projector, "
           "copied from the folder when saving, never on the device)"] if plan.carried else []),
        *filter(None, [plan_moe.describe(m, w.total, {label(k): v for k, v in plan.expert_bytes.items()}, GIB)]),
        f"shape: hidden {m.hidden_size}, {m.num_hidden_layers} layers, {m.num_attention_heads} heads / "
        f"{m.num_key_value_heads} KV heads x {m.head_dim}, intermediate {m.intermediate_size}, vocab {m.vocab_size}, "
        f"tied lm_head: {m.tie_word_embeddings}",
        f"micro-batch: {run.trainer.batch_size} x {run.trainer.max_seq_len} tokens, gradient checkpointing: "
        f"{run.model.gradient_checkpointing}; {o.num_processes} process(es) of {o.device_gib:g} GiB", "",
        *(f"{a:<22}{b:<13}" + "".join(f"{c:>8}" for c in cells) + f"  {fits}" for a, b, *cells, fits in rows), "",
        f"fits: total + {RESERVE_GIB:g} GiB (CUDA context, NCCL) <= {o.device_gib:g} GiB; host: the node's CPU memory for "
        "offloaded states (DeepSpeed pins ~1.5x that)",
        "adamw: m and v in the weights' dtype; adamw_mixed: fp32 master, m and v (DeepSpeed, or trainer.bf16_update="
        "fp32_master); adamw_kahan: adamw + a 16-bit compensation (bf16_update=kahan, auto); adamw_sr: adamw's bytes "
        "(stochastic_rounding)"])
