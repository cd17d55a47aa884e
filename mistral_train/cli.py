"""The `mistral-train` command (also `python -m mistral_train`).

    mistral-train [train] [recipe=NAME] [KEY=VALUE ...]   train (default recipe: tiny_pretrain_sft)
    mistral-train config [recipe=NAME] [KEY=VALUE ...]    print the resolved run configuration
    mistral-train audit [recipe=NAME] [KEY=VALUE ...]     check the run's SFT data and labels, without training
    mistral-train plan [recipe=NAME] [num_processes=N] [device_gib=80] [strategy=S] [KEY=VALUE ...]
                                                          per-device memory of the run per strategy; does it fit
    mistral-train generate FOLDER --prompt TEXT [...]     continue a prompt with an HF Mistral folder or a LoRA adapter
    mistral-train merge ADAPTER [--base DIR] --out DIR [--overwrite]   merge a LoRA/QLoRA adapter into a full HF folder
    mistral-train export FOLDER --out DIR [--format hf|native]   a model or adapter (merged) as an HF or native folder
    mistral-train plot RUN_DIR                            redraw RUN_DIR/loss.png from metrics.jsonl

argparse reads the verbs and their flags; everything after `train`/`config`/`audit`/`plan` is a Hydra override
(`trainer.max_steps=20`, `adapter=none`), composed and routed into a staged recipe's stages by
`mistral_train.train.stage_overrides.load_routed`.
Heavy modules (torch, the loop) are imported inside the verbs, so `--help` and config errors are quick.
A user error (bad data, config value or path, a run folder in use, no CUDA) ends with one line and exit
status 2; `--debug` or MISTRAL_TRAIN_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mistral_train.config import DEFAULT_RECIPE, RunConfig, run_config_yaml
from mistral_train.errors import ConfigError
from mistral_train.errors import UserError
from mistral_train.train.stage_overrides import load_routed

PROG = "mistral-train"
DEBUG_ENV = "MISTRAL_TRAIN_DEBUG"  # set to 1: user errors keep their traceback, as with --debug
OVERRIDES_HELP = """\
overrides (KEY=VALUE, Hydra syntax):
  recipe=NAME              a file in recipes/ (default: tiny_pretrain_sft)
  model.path=DIR           an HF Mistral folder        data.path=FILE|DIR|[A,B]
  data.format=text         trainer.max_steps=N         trainer.max_seq_len=N
  adapter=none             run.dir=DIR run.name=NAME   resume=true|latest|CHECKPOINT_DIR
  any other field: `mistral-train config` lists them all
"""
PLAN_HELP = """\
plan keys (taken out before the overrides are composed):
  num_processes=N          processes, one per GPU (default 1)
  device_gib=G             memory of one device, GiB (default 80)
  strategy=S               ddp fsdp2 zero1 zero2 zero2_offload zero3 zero3_offload zero3_offload_params (default: all)
  optimizer=O              auto adamw adamw_mixed adamw8bit adamw_kahan adamw_sr (auto: what trainer.optimizer and
                           trainer.bf16_update keep, or adamw_mixed under DeepSpeed bf16)
"""
EXAMPLES = """\
examples:
  mistral-train                                   tiny Mistral on the bundled text, on CPU
  mistral-train trainer.max_steps=20 run.name=quick
  mistral-train recipe=mistral7b_continued_pretrain model.path=/models/Mistral-7B-v0.1 data.path=corpus/
  mistral-train config trainer.lr=1e-3            show what a run would use
  mistral-train audit recipe=tiny_sft data.path=chats.jsonl   check labels, BOS/EOS and the template
  mistral-train plan recipe=mistral7b_full_sft num_processes=8 strategy=zero3   GiB per GPU; fits in 80 GiB?
  mistral-train generate runs/tiny_pretrain_sft/sft/final --chat --prompt "What is three plus four?"
  mistral-train merge runs/tiny_lora_sft/sft/final --out merged/      adapter + base -> one HF folder
  mistral-train export runs/tiny_lora_sft/sft/final --format native --out native/   params.json for vLLM/mistral-inference
  mistral-train plot runs/tiny_pretrain_sft/sft
"""


def split_recipe(overrides: Sequence[str]) -> tuple[str, list[str]]:
    """Take `recipe=NAME` out of the overrides: (recipe name, remaining overrides)."""
    recipes = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    if len(recipes) > 1:
        raise ConfigError(f"recipe given {len(recipes)} times ({', '.join(recipes)}); give one recipe=NAME")
    rest = [o for o in overrides if not o.startswith("recipe=")]
    return (recipes[0] if recipes else DEFAULT_RECIPE), rest


def _run_config(overrides: Sequence[str]) -> RunConfig:
    recipe, rest = split_recipe(overrides)
    return load_routed(recipe, rest)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _run_config(args.overrides)
    from mistral_train.train.guards import Preempted
    from mistral_train.train.loop import fit  # imported here: torch and the data stack are slow to load

    try:
        run_dir = fit(cfg)
    except Preempted:  # checkpoint written and its line printed (train/guards.py): a clean stop, exit 0
        return 0
    print(f"run directory: {run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(run_config_yaml(_run_config(args.overrides)), end="")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """What the run would check and prepare before step 1 (counts, label audit, a marked sample), printed;
    a staged recipe audits each stage whose data exists already (a later stage's model may not)."""
    cfg = _run_config(args.overrides)
    from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path
    from mistral_train.train.run_data import read_data  # imported here: the data stack is slow to load
    from mistral_train.train.stages import stage_configs

    stages = stage_configs(cfg) if cfg.stages else [(None, cfg)]
    for name, stage in stages:
        if name:
            print(f"== stage {name}")
        try:
            tokenizer = load_tokenizer(resolve_tokenizer_path(stage.model.tokenizer, stage.model.path))
            data = read_data(stage, tokenizer, check=False)  # as fit() reads it, without a model
            print("\n".join(data.summary))  # first: the table shows why the data may not fill a batch
            data.check_batch_size()
        except ValueError as err:  # AuditError, unreadable rows: the data, not the code, is at fault
            raise ConfigError(f"{'stage ' + name + ': ' if name else ''}{err}") from err
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-device memory of the run for each strategy (mistral_train/plan.py); builds no model, reads no data."""
    from mistral_train.plan import format_plan, plan_run, split_plan_options

    options, rest = split_plan_options(args.overrides)  # num_processes=, device_gib=, strategy=, optimizer=
    given = {o.split("=", 1)[0] for o in rest}
    rest += [] if "data.path" in given else ["data.path=null"]  # a recipe's required data does not change memory
    try:
        cfg = _run_config(rest)
    except ConfigError as err:  # a recipe that requires model.path: plan the shape its model.* fields give
        if "model.path" in given:
            raise
        try:
            cfg = _run_config([*rest, "model.path=null"])
        except ConfigError:
            raise err from None
        print("no model.path given: planning the recipe's model.* shape")
    print(format_plan(plan_run(cfg, options)))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from mistral_train.train.export import merge_adapter_folder

    adapter, out = Path(args.adapter), Path(args.out)
    if not adapter.is_dir():
        raise ConfigError(f"{adapter} does not exist; give a LoRA adapter folder, e.g. runs/NAME/final of an adapter run")
    if not (adapter / "adapter_config.json").is_file():
        full = " (it is a full model: nothing to merge)" if (adapter / "config.json").is_file() else ""
        raise ConfigError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json){full}; try runs/NAME/final")
    if out.exists() and not args.overwrite:  # checked before the base loads: a slip must not cost a merged model
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it, or name a new folder")
    merge_adapter_folder(adapter, out, base=args.base, dtype=args.dtype)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mistral_train.folders import is_adapter_folder, is_model_folder
    from mistral_train.train.export import export_folder

    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir() or not (is_model_folder(folder) or is_adapter_folder(folder)):
        raise ConfigError(f"{folder} is not a model folder (config.json or params.json) nor a LoRA adapter folder "
                          "(adapter_config.json); try runs/NAME/final")
    if out.exists() and not args.overwrite:  # checked before the model loads
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it, or name a new folder")
    export_folder(folder, out, args.format, base=args.base, dtype=args.dtype, tokenizer=args.tokenizer)
    print(f"wrote {out} ({args.format})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mistral_train.tracking.plots import plot_run, run_objective
    from mistral_train.train.objectives import loss_label

    # ConfigError for a folder without metrics (a staged run's: its stages)
    print(plot_run(args.run_dir, loss=loss_label(*run_objective(Path(args.run_dir)))))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from mistral_train.chat import chat_prompt
    from mistral_train.generate import generate, load_for_generation
    from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path
    from mistral_train.tokenizer.tool_calls import ToolCallError, parse_answer

    if args.prompt is None and not (args.chat and args.messages):
        args.usage.error("the following arguments are required: --prompt (or --chat --messages FILE)")  # exits 2

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but this machine has no CUDA device; use --device auto or cpu")
    model, folders = load_for_generation(args.folder, args.base)  # a model folder, or an adapter + its base
    source = None
    for folder in folders:  # the folder's own tokenizer wins (an adapter's, then its base's)
        try:
            source = resolve_tokenizer_path(None, folder)
            break
        except FileNotFoundError:
            continue
    try:  # --tokenizer is the fallback
        source = source or resolve_tokenizer_path(args.tokenizer)
    except ValueError as err:  # an unknown bundled version: a usage error, not a bug
        raise ConfigError(f"--tokenizer {args.tokenizer}: {err}") from err
    tokenizer = load_tokenizer(source)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    if args.chat:  # the conversation (+ the prompt as a user turn) in the tokenizer's chat format, ready for the answer
        messages, tools = _chat_inputs(args)
        try:
            prompt = chat_prompt(tokenizer, messages, tools)
        except ValueError as err:  # a malformed conversation or tools file: the user's to fix
            raise ConfigError(f"{args.messages or '--prompt'}: {err}") from err
    elif args.messages or args.tools:
        raise ConfigError("--messages and --tools need --chat")
    else:
        prompt = tokenizer.encode(args.prompt, bos=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tokenizer.eos_id, generator=generator)
    print(tokenizer.decode(ids[0].tolist()))  # prompt + completion, decoded together so spacing is right
    if args.chat:  # a tool call: the answer as an assistant message (JSON) to append to --messages
        try:
            answer = parse_answer(tokenizer, ids[0, len(prompt):].tolist())
        except ToolCallError as err:
            print(f"{PROG}: warning: the answer's tool calls do not parse: {err}", file=sys.stderr)
            return 0
        if answer.get("tool_calls"):
            print(json.dumps(answer, ensure_ascii=False))
    return 0


def _chat_inputs(args: argparse.Namespace) -> tuple[list, Optional[list]]:
    """(messages, tools) of `generate --chat`: --messages (a JSON list of messages), then --prompt as a user turn."""
    def read_list(path: str, what: str) -> list:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); expected a JSON list of {what}") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
        return data

    messages = read_list(args.messages, "OpenAI-form messages") if args.messages else []
    tools = read_list(args.tools, 'tools ({"type": "function", "function": {...}})') if args.tools else None
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
    if not messages:
        raise ConfigError("generate --chat needs --prompt or --messages")
    return messages, tools


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=fmt, epilog=EXAMPLES,
                                     description="Train, sample from and inspect Mistral-architecture models.")
    parser.add_argument("--debug", action="store_true",  # taken out of argv by main() wherever it stands
                        help=f"show the traceback of a user error (also {DEBUG_ENV}=1)")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", title="commands (default: train)")
    for name, helptext, handler in (("train", "train a recipe (the default command)", cmd_train),
                                    ("config", "print the resolved configuration of a run, without running it", cmd_config),
                                    ("audit", "check a run's SFT data (labels, BOS/EOS, template round trip) "
                                              "without training", cmd_audit)):
        sub = verbs.add_parser(name, help=helptext, description=helptext, epilog=OVERRIDES_HELP, formatter_class=fmt)
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe=NAME and Hydra overrides")
        sub.set_defaults(handler=handler)

    plan = verbs.add_parser("plan", help="per-device memory (weights, gradients, optimizer, activations) of a run "
                                         "per strategy, and whether it fits", formatter_class=fmt,
                            description="Per-device memory of a run under DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 (with "
                                        "CPU offload), from its architecture alone, and whether it fits a device.",
                            epilog=PLAN_HELP + OVERRIDES_HELP)
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="plan keys, recipe=NAME and Hydra overrides")
    plan.set_defaults(handler=cmd_plan)

    gen = verbs.add_parser("generate", help="continue a prompt with a saved model",
                           description="Continue a prompt with an HF Mistral folder (e.g. runs/NAME/final), or with "
                                       "a LoRA adapter folder applied to the base it names (or --base).")
    gen.add_argument("folder", help="HF folder: config.json + *.safetensors (+ tokenizer.model), or a LoRA adapter "
                                    "folder: adapter_config.json + adapter_model.safetensors")
    gen.add_argument("--prompt", default=None, help="the text to continue; with --chat, a user turn")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user turn of the chat template; an "
                     "answer with tool calls is also printed as an assistant message in JSON")
    gen.add_argument("--messages", default=None, help="with --chat: a JSON file holding the conversation so far (a list "
                     "of OpenAI-form messages, tool results included); --prompt, if given, is added as a user turn")
    gen.add_argument("--tools", default=None, help="with --chat: a JSON file holding the tool definitions (a list of "
                     '{"type": "function", "function": {"name", "description", "parameters"}})')
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0, help="for sampling (temperature > 0)")
    gen.add_argument("--tokenizer", default="bundled:v1",
                     help="used when FOLDER has no tokenizer: a file/folder or bundled:v1|v2|v3 (default bundled:v1)")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    gen.add_argument("--base", default=None, help="for an adapter FOLDER: its base HF folder (default: the one it names)")
    gen.set_defaults(handler=cmd_generate, usage=gen)

    merge = verbs.add_parser("merge", help="merge a LoRA/QLoRA adapter into its base and write a full HF folder",
                             description="Merge a PEFT adapter (a LoRA/QLoRA run's final/ or a checkpoint) into a "
                                         "full-precision copy of its base (a QLoRA base is dequantized, never "
                                         "re-quantized) and write an HF folder; prints the largest logit difference "
                                         "between the adapter model and the merged one.")
    merge.add_argument("adapter", help="adapter folder: adapter_config.json + adapter_model.safetensors")
    merge.add_argument("--out", required=True, help="the HF folder to write")
    merge.add_argument("--base", default=None, help="base HF folder (default: the one the adapter names)")
    merge.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="dtype of the merged weights (default: the run's model.dtype)")
    merge.add_argument("--overwrite", action="store_true", help="replace --out when it exists (default: refuse)")
    merge.set_defaults(handler=cmd_merge)

    export = verbs.add_parser("export", help="write a model (or an adapter merged into its base) as an HF folder or "
                                             "in Mistral's native format",
                              description="Write the model of FOLDER (an HF or native model folder, or a LoRA/QLoRA "
                                          "adapter folder, merged into a full-precision copy of its base first) as an "
                                          "HF folder or in Mistral's native format: params.json + "
                                          "consolidated.safetensors + tekken.json or tokenizer.model.vN, what "
                                          "mistral-inference and vLLM (--config-format mistral --load-format mistral "
                                          "--tokenizer-mode mistral) read.")
    export.add_argument("folder", help="a run's final/ (model or adapter), a checkpoint, or any model folder")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", default="hf", choices=["hf", "native"], help="hf (default) or native")
    export.add_argument("--base", default=None, help="for an adapter FOLDER: its base model folder (default: the one "
                                                     "it names)")
    export.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the stored ones; an adapter's run's model.dtype)")
    export.add_argument("--tokenizer", default=None, help="used when FOLDER (and its base) hold no tokenizer: a file, "
                                                          "folder or bundled:v1|v2|v3")
    export.add_argument("--overwrite", action="store_true", help="replace --out when it exists (default: refuse)")
    export.set_defaults(handler=cmd_export)

    plot = verbs.add_parser("plot", help="redraw a run's loss.png from its metrics.jsonl")
    plot.add_argument("run_dir", help="a run directory, e.g. runs/tiny_pretrain_sft/sft")
    plot.set_defaults(handler=cmd_plot)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status: 2 for a usage error or a user error (errors.UserError, a path that
    is missing or already taken), printed as one line `mistral-train: error: ...`; with --debug (anywhere on
    the line) or MISTRAL_TRAIN_DEBUG=1 a user error is raised with its traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not args or "=" in args[0] or args[0].startswith("~"):  # bare overrides mean `train`
        args.insert(0, "train")
    parsed = build_parser().parse_args(args)  # bad usage: argparse prints it and exits with 2
    try:
        return parsed.handler(parsed)
    except (UserError, FileNotFoundError, FileExistsError) as err:  # the user's to fix: one line, no traceback
        if debug:
            raise
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The error's message on one line (a few messages quote a multi-line value)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
