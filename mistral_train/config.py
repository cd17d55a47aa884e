"""Run configuration schema: one dataclass per Hydra config group.

The YAML files in `configs/` and `recipes/` only set values; these dataclasses are the schema.
They are registered with Hydra's ConfigStore (see `register_schemas`), so a misspelt key or a
value of the wrong type fails when the configuration is composed, naming the key.

`load_run_config(recipe, overrides)` composes `recipes/NAME.yaml` (which lists the groups in
`configs/`) with command-line overrides through Hydra's compose API, and returns a RunConfig;
`dump_run_config` writes the resolved result next to a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mistral_train.config_checks import describe_error, missing_keys, suggest_key, unknown_keys
from mistral_train.data.spec import DataSpec  # the data group's schema lives with data/, which reads it
from mistral_train.errors import ConfigError


@dataclass
class ModelSpec:
    """The model to train: an HF folder (`path`) or a fresh model of the given shape."""

    path: Optional[str] = None  # HF Mistral folder; when set, the shape fields below are ignored
    # a folder / file, "bundled:v1|v2|v3" (shipped in mistral-common), or null: the model folder's
    # own tokenizer (bundled:v1 for a fresh model). A fresh model's vocabulary is the tokenizer's.
    tokenizer: Optional[str] = None
    # the published model's vocabulary (131072 for Tekken models), for `plan` of a recipe without model.path;
    # null: the tokenizer's. A run never reads it: a folder's config.json, or a fresh model's tokenizer, decides.
    vocab_size: Optional[int] = None
    # likewise for a vision-language model (Mistral3ForConditionalGeneration): its vision tower's shape, which
    # plan counts as carried (mistral_train/plan_vision.py: TOWER_KEYS, PROJECTOR_KEYS); a run carries the folder's
    vision: Optional[dict[str, Any]] = None
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    sliding_window: Optional[int] = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the weights are kept in
    # recompute activations in the backward: false | true (= block) | block | attention | mlp | every_k
    gradient_checkpointing: Any = False
    checkpoint_every: int = 1  # checkpoint layers 0, k, 2k, ... (every_k needs k >= 2)
    activation_offloading: bool = False  # saved activations to CPU memory in the forward, back in the backward
    # a fresh model's transformers class (model/model_types.py): mistral (dense MLP) or mixtral (experts in every
    # layer, the keys below with MixtralConfig's names; a dense model ignores them)
    model_type: str = "mistral"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001  # the load-balancing loss's weight in every training step; 0 turns it off
    router_jitter_noise: float = 0.0
    # a published config.json's keys for a model_type whose fields this spec lacks (mistral4: latent attention,
    # shared and routed experts), read by `plan` without model.path (the class's defaults for the rest)
    hf_config: Optional[dict[str, Any]] = None


@dataclass
class DPOSpec:
    """Preference optimisation (trainer.objective=dpo): the loss (train/steps.py) and the reference policy (train/reference.py)."""

    loss_type: Any = "sigmoid"  # a trl loss_type name, or a list of them mixed by loss_weights (MPO)
    loss_weights: Optional[list[float]] = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    # auto: adapter runs use the adapter-disabled model, or a frozen copy of the adapter they started
    # from (adapter.path: the SFT model, not the bare base); full runs a frozen copy of the model;
    # reference-free losses (simpo, orpo) none. Or: copy | adapter_off | initial_adapter | none.
    reference: str = "auto"
    precompute_reference: bool = False  # compute reference log-probs once, cache them on disk, reuse them
    reference_cache: Optional[str] = None  # cache folder; None: {run.dir}/reference_cache
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05


@dataclass
class RewardSpec:
    """Reward model training (trainer.objective=reward): Bradley-Terry on the sequence-classification head."""

    center_rewards_coefficient: Optional[float] = None  # + coef * mean((r_chosen + r_rejected)^2)


@dataclass
class GRPOSpec:
    """Online RL (trainer.objective=grpo or rloo): rollouts, rewards and trl's GRPO loss family, with trl's
    GRPOConfig/RLOOConfig names and defaults (where they differ between the two, rloo's are named below).
    A micro-batch holds `trainer.batch_size` completions: batch_size // num_generations prompts, each
    sampled num_generations times; one rollout serves one optimizer step's window, num_iterations times."""

    num_generations: int = 8  # completions per prompt (rloo: at least 2; trl RLOOConfig default: 2)
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None  # None: no cut (trl's top_k=0)
    num_iterations: int = 1  # optimizer steps on each rollout; old log-probs kept from generation time
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo (grpo only)
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: epsilon
    delta: Optional[float] = None  # two-sided clipping bound of the ratio
    beta: float = 0.0  # KL coefficient (k3 estimator); 0: no reference model is kept (trl RLOOConfig default: 0.05)
    scale_rewards: str = "group"  # group | batch | none
    importance_sampling_level: str = "token"  # token | sequence
    mask_truncated_completions: bool = False
    # reward functions: "module:function" strings or {function: ..., weight: ..., kwargs: {...}} / {model: FOLDER}
    reward_funcs: list[Any] = field(default_factory=list)
    reward_weights: Optional[list[float]] = None
    reference: str = "auto"  # as trainer.dpo.reference (used only when beta > 0)
    rollout_engine: str = "generate"  # generate (ours: batched, KV cache) | vllm (where installed)
    loss_options: dict[str, Any] = field(default_factory=dict)  # sapo/vespo extras (sapo_temperature_neg, ...)
    normalize_advantages: bool = False  # rloo only (trl RLOOConfig): standardise the window's advantages


@dataclass
class KTOSpec:
    """Unpaired preferences (trainer.objective=kto), trl's KTOConfig names and defaults."""

    loss_type: str = "kto"  # kto | apo_zero_unpaired
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = "auto"  # as trainer.dpo.reference


@dataclass
class TrainerSpec:
    """The optimisation loop."""

    objective: str = "pretrain"  # pretrain | sft | dpo | reward | grpo | rloo | kto (train/objectives.py)
    max_steps: int = 150
    max_seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit (train/optim.py)
    # how adamw updates bf16/fp16 trained weights (train/optim.py): auto (kahan when any trained parameter is
    # 16-bit, else plain) | fp32_master (+12 B/param) | kahan (+2 B/param) | stochastic_rounding | plain
    # (rounds small updates away: only by name); DeepSpeed keeps its own fp32 masters
    bf16_update: str = "auto"
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    loss_chunk_size: int = 1024  # tokens per cross-entropy chunk
    compile: str = "auto"  # torch.compile each decoder block: auto (on CUDA, off on CPU, where it gains ~7%: docs/benchmarks.md) | true | false
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    # auto (what the launcher set up: an Accelerate DeepSpeed/FSDP config, else ddp over several processes)
    # | single | ddp | fsdp2 | zero1 | zero2 | zero3; see mistral_train/dist/strategy.py and docs/distributed.md
    strategy: str = "auto"
    deepspeed_config: Optional[str] = None  # zeroN without an Accelerate DeepSpeed config: default configs/deepspeed/zeroN.json
    seed: int = 0
    log_every: int = 5
    save_every: Optional[int] = None  # steps between checkpoints; the last step always writes one
    keep_last: int = 2  # checkpoints kept on disk
    # a checkpoint write that fails (disk full, I/O error): stop (one error line) | retry (warn, train on, save
    # again at the next save_every; the last step's save always stops). docs/reliability.md
    save_failure: str = "stop"
    # a step whose loss or global grad norm is NaN/inf takes no update (train/guards.py); after this many in a
    # row the run stops (0: never stops)
    max_nonfinite_steps: int = 10
    # signals that make the run checkpoint at the next step boundary and exit 0 (SLURM, Kubernetes preemption)
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preemption_grace_s: float = 30.0  # the time the scheduler allows (SLURM KillWait, Kubernetes' default: 30 s); a longer stop warns
    eval_every: Optional[int] = None  # steps between held-out evaluations (data.eval_fraction > 0); None: at the end only
    eval_before_training: bool = False  # also evaluate at step 0, before the first update (logged as step 0)
    eval_max_new_tokens: int = 16  # exact match on held-out rows with an "answer": greedy tokens per reply; 0: off
    sample_prompt: str = "The cat"
    sample_max_new_tokens: int = 40
    dpo: DPOSpec = field(default_factory=DPOSpec)
    reward: RewardSpec = field(default_factory=RewardSpec)
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    kto: KTOSpec = field(default_factory=KTOSpec)


@dataclass
class AdapterSpec:
    """Parameter-efficient fine-tuning. `none` trains every weight; `lora` trains LoRA adapters on a
    frozen base; `qlora` does the same over a base whose linears are NF4 (bitsandbytes' format)."""

    kind: str = "none"  # none | lora | qlora
    path: Optional[str] = None  # a PEFT adapter folder to start from (continue an SFT adapter); else a fresh one
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of names (q_proj, ...), a regex, or all-linear
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, e.g. [lm_head]
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"  # default | gaussian | pissa | none (peft's init_lora_weights: true | gaussian | pissa | false)
    merge_at_end: bool = False  # also write {run}/merged/: the adapter merged into a full-precision copy of the base
    # parameters adapted by name, peft's target_parameters: MoE expert weights [mlp.experts.gate_up_proj,
    # mlp.experts.down_proj]; the router (mlp.gate.weight) only when named here (needs dropout 0, no DoRA)
    target_parameters: list[str] = field(default_factory=list)


@dataclass
class TrackingSpec:
    """Where metrics go. metrics.jsonl is always written."""

    # any tracker Accelerate supports, by name: wandb, tensorboard, mlflow, aim, comet_ml, clearml,
    # dvclive, swanlab, trackio; `wandb: true` / `tensorboard: true` add those two as well
    trackers: list[str] = field(default_factory=list)
    wandb: bool = False
    wandb_mode: str = "offline"  # WANDB_MODE in the environment wins
    wandb_project: str = "mistral-train"  # also the MLflow experiment and other trackers' project name
    tensorboard: bool = False
    progress_bar: bool = True
    plot: bool = True


@dataclass
class RunSpec:
    """Where the run directory goes: `{dir}/{name}`."""

    name: str = "tiny"
    dir: str = "runs"


@dataclass
class RunConfig:
    """A complete run: what recipes compose and `fit()` consumes."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    run: RunSpec = field(default_factory=RunSpec)
    resume: Optional[str] = None  # "true"/"latest" or a checkpoint folder
    # Stages run one after another as separate runs in {run.dir}/{run.name}/{stage}: each maps a stage name
    # to the settings it changes over the recipe's own (e.g. {sft: {data: {format: messages}}}); every stage
    # after the first starts from the previous stage's final/ model unless it sets model.path. See train/stages.py.
    stages: dict[str, Any] = field(default_factory=dict)


# ---- composing a RunConfig from recipes/ + configs/ (Hydra compose API: no output dirs, no chdir)

CONFIG_ROOT_ENV = "MISTRAL_TRAIN_CONFIG_ROOT"
DEFAULT_RECIPE = "tiny_pretrain_sft"
GROUP_SCHEMAS = {"model": ModelSpec, "data": DataSpec, "trainer": TrainerSpec, "adapter": AdapterSpec, "tracking": TrackingSpec}


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore: `run_schema`, the root each recipe lists first, and
    `schema/<group>`, which each group file lists first, so its keys are checked wherever it is composed.
    (Kept out of the groups themselves so they never show up as a choice like `adapter=...`.)
    Also the `${required:hint}` resolver: YAML marks a value the user must give with it, because a
    `???` merged over a schema default keeps the default instead of becoming missing."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)
    if not OmegaConf.has_resolver("bundled_data"):  # ${bundled_data:NAME}: a file of mistral_train/resources/data
        OmegaConf.register_new_resolver("bundled_data", _bundled_data)


def config_root() -> Path:
    """The folder holding `configs/` and `recipes/`: $MISTRAL_TRAIN_CONFIG_ROOT, else the source checkout."""
    env = os.environ.get(CONFIG_ROOT_ENV)
    root = (Path(env).expanduser() if env else Path(__file__).resolve().parents[1]).resolve()
    missing = [name for name in ("configs", "recipes") if not (root / name).is_dir()]
    if missing:
        origin = f"${CONFIG_ROOT_ENV}" if env else "the folder above the installed package"
        raise ConfigError(
            f"no {' or '.join(f'{m}/' for m in missing)} folder in {root} ({origin}); install mistral-train "
            f"from a source checkout (pip install -e .) or set {CONFIG_ROOT_ENV} to a folder holding configs/ and recipes/"
        )
    return root


def list_recipes(root: Optional[Path] = None) -> list[str]:
    """Names of the recipes (`recipes/*.yaml`) under `root` (default `config_root()`)."""
    return sorted(p.stem for p in ((root or config_root()) / "recipes").glob("*.yaml"))


def load_run_config(recipe: str = DEFAULT_RECIPE, overrides: Sequence[str] = ()) -> RunConfig:
    """Compose `recipes/{recipe}.yaml` with Hydra overrides (`a.b=v`, `group=option`) into a RunConfig,
    checked against the schema. Composition only: the command line loads through
    train/stage_overrides.py `load_routed`, which also sends the overrides into a staged recipe's stages.

    Raises:
        ConfigError: unknown recipe, key or group option, a value of the wrong type, or a required
            value (`${required:...}` or `???`) left unset; the message is one line naming it.
    """
    root = config_root()
    if not (root / "recipes" / f"{recipe}.yaml").is_file():
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(list_recipes(root))} (in {root / 'recipes'})")
    register_schemas()
    configs = str(root / "configs").replace("\\", "\\\\").replace("'", "\\'")
    try:
        with initialize_config_dir(config_dir=str(root / "recipes"), version_base="1.3", job_name="mistral_train"):
            cfg = compose(config_name=recipe, overrides=[f"hydra.searchpath=['file://{configs}']", *overrides])
        # `+key=v` bypasses the schema's struct flag; to_object would then drop or set stray attributes.
        unknown = unknown_keys(cfg, RunConfig)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}{suggest_key(unknown[0], RunConfig)}")
        missing = missing_keys(OmegaConf.to_container(cfg, resolve=False))
        if missing:
            keys = " ".join(f"{m.split(' ')[0]}=..." for m in missing)
            raise ConfigError(f"recipe {recipe!r} needs {' and '.join(missing)}: pass {keys}")
        run = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe_error(err, RunConfig, root, overrides)) from err
    except yaml.YAMLError as err:  # a YAML file that does not parse; the text names file and line
        raise ConfigError("invalid YAML: " + " ".join(line.strip() for line in str(err).splitlines())) from err
    return _normalize(run)


def run_config_yaml(cfg: RunConfig) -> str:
    """The fully resolved configuration as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def dump_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved configuration to `path` (e.g. runs/NAME/config.yaml); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_config_yaml(cfg), encoding="utf-8")
    return path


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """Read a config.yaml written by `dump_run_config` back into a RunConfig, checked against the schema."""
    try:
        return _normalize(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {describe_error(err, RunConfig)}") from err


def _home(path: Any) -> Any:
    return os.path.expanduser(path) if isinstance(path, str) else path


def _normalize(run: RunConfig) -> RunConfig:
    path = run.data.path
    if not (path is None or isinstance(path, str) or (isinstance(path, list) and all(isinstance(p, str) for p in path))):
        raise ConfigError(f"data.path must be a path or a list of paths, got {path!r}")
    # Hydra parses resume=true as a bool, which the str field then holds as "True".
    if run.resume is not None and run.resume.lower() in ("true", "false"):
        run.resume = "true" if run.resume.lower() == "true" else None
    # `~` arrives literally (Hydra needs it quoted on the command line): expand it in every path field.
    run.model.path, run.model.tokenizer, run.run.dir, run.resume = map(_home, (run.model.path, run.model.tokenizer, run.run.dir, run.resume))
    run.data.path = [_home(p) for p in path] if isinstance(path, list) else _home(path)
    return run


def _required(*hint: str) -> Any:
    raise ValueError(f"a required value is not set ({', '.join(hint)})")


def _bundled_data(name: str) -> str:
    """The path of a data file shipped in the package (recipes name bundled data sets this way, wherever
    the package is installed)."""
    from importlib import resources

    path = Path(str(resources.files("mistral_train") / "resources" / "data" / name))
    if not path.is_file():
        raise ValueError(f"no bundled data file {name!r} in {path.parent}")
    return str(path)
