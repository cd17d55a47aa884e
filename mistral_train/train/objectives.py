"""The objectives fit() trains, in one table: `trainer.objective` -> an `ObjectiveEntry`.

An entry says all that the rest of a run needs to know about its objective, so that nothing else
compares objective names: how its step is built (the loss and the units it is normalised by,
train/steps.py), the kind of data it reads (data/formats.py: text, chat, preference), the model's head,
whether greedy replies mean anything (held-out exact match, sample.txt), whether exp(eval loss) is a
perplexity, how loss.png names its loss, and, for an objective with a reference policy, which
reference the run uses (preflight resolves it before any data is read).

Adding an objective is one entry here plus its step (and, for a new kind of data, that kind in data/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from mistral_train.config import RunConfig
from mistral_train.data.formats import KIND_NAMES
from mistral_train.tracking.plots import LM_LOSS
from mistral_train.train.kto_step import kto_with_reference
from mistral_train.train.reference import dpo_with_reference, resolve_reference
from mistral_train.train.online import build_online
from mistral_train.train.steps import Objective, language_model, reward_objective

# (cfg, model, data, pad_id, accelerator) -> the run's step and unit counter. Called once the model is built
# and on its device, before any checkpoint loads into it (a reference policy is the starting model).
Builder = Callable[[RunConfig, Any, Any, int, Any], Objective]


@dataclass(frozen=True)
class ObjectiveEntry:
    build: Builder
    data_kind: str  # the kind of rows it trains on (data/formats.py KIND_NAMES)
    task: str = "causal_lm"  # the model's head: causal_lm | sequence_classification
    generates: bool = True  # greedy replies mean something: held-out exact match, sample.txt
    perplexity: bool = True  # the loss is per token, so exp(eval loss) is a perplexity
    padded_only: bool = False  # it pools each row's last token: packed batches are refused (data.packing=false)
    # (curve name, y-axis label) of its loss in loss.png, given trainer.dpo.loss_type
    loss_label: Callable[[Any], tuple[str, str]] = lambda _loss_type: LM_LOSS
    reference: Optional[Callable[[RunConfig], str]] = None  # the reference kind a run uses; ValueError if bad

    @property
    def chat(self) -> bool:
        """Its data is conversations (chat rows or pairs): samples are prompted as a user turn."""
        return self.data_kind != "text"


def _language_model(cfg: RunConfig, *_) -> Objective:
    return language_model(cfg.trainer.loss_chunk_size)


def _online_label(name: str) -> Callable[[Any], tuple[str, str]]:
    return lambda _loss_type: (f"{name} loss", f"{name} policy loss (trainer.grpo), mean per accumulation window")


def _online_reference(cfg: RunConfig) -> str:
    """grpo/rloo keep a reference only for the KL term (trainer.grpo.beta > 0)."""
    return resolve_reference(cfg.trainer.grpo, cfg.adapter, "trainer.grpo", free=cfg.trainer.grpo.beta == 0)


def _dpo_label(loss_type: Any) -> tuple[str, str]:
    kind = "+".join(loss_type) if isinstance(loss_type, list) else loss_type
    return "DPO loss", f"DPO loss ({kind}), mean per pair"


OBJECTIVES: dict[str, ObjectiveEntry] = {
    # pretrain and sft share the step (summed CE over labels); they differ only in the data they read
    "pretrain": ObjectiveEntry(_language_model, "text"),
    "sft": ObjectiveEntry(_language_model, "chat"),
    "dpo": ObjectiveEntry(dpo_with_reference, "preference", perplexity=False, loss_label=_dpo_label,
                          reference=lambda cfg: resolve_reference(cfg.trainer.dpo, cfg.adapter)),
    "reward": ObjectiveEntry(lambda cfg, *_: reward_objective(cfg.trainer.reward), "preference",
                             task="sequence_classification", generates=False, perplexity=False, padded_only=True,
                             loss_label=lambda _: ("reward loss", "reward-model loss -log sigmoid(r_chosen - "
                                                   "r_rejected), mean per pair")),
    # online RL: each step's window is sampled from the policy (train/online.py); exact match still means something
    "grpo": ObjectiveEntry(lambda cfg, *args: build_online(cfg, *args, rloo=False), "prompt", perplexity=False,
                           loss_label=_online_label("GRPO"), reference=_online_reference),
    "rloo": ObjectiveEntry(lambda cfg, *args: build_online(cfg, *args, rloo=True), "prompt", perplexity=False,
                           loss_label=_online_label("RLOO"), reference=_online_reference),
    # unpaired desirable/undesirable completions (train/kto_step.py); the reference as DPO's, never none
    "kto": ObjectiveEntry(kto_with_reference, "unpaired", perplexity=False,
                          loss_label=lambda _: ("KTO loss", "KTO loss, mean per example"),
                          reference=lambda cfg: resolve_reference(cfg.trainer.kto, cfg.adapter, "trainer.kto",
                                                                  free=False)),
}


def objective_entry(name: str) -> ObjectiveEntry:
    """The entry of `trainer.objective`; ValueError naming the known ones for another name."""
    if name not in OBJECTIVES:
        raise ValueError(f"trainer.objective {name!r} is not available; expected one of {list(OBJECTIVES)}")
    return OBJECTIVES[name]


def check_data_kind(objective: str, kind: str, where: str) -> None:
    """Raise ValueError when `where` (e.g. "data.path prefs.jsonl") holds `kind` rows and `objective`
    trains on another kind: one line naming the data, what it holds, what the objective reads and the
    way out (data.format=chosen_only for SFT on pairs)."""
    wanted = objective_entry(objective).data_kind
    if wanted == kind:
        return
    what = f"{where} holds {KIND_NAMES[kind]}, but trainer.objective={objective} trains on {KIND_NAMES[wanted]}"
    if wanted == "chat" and kind == "preference":
        raise ValueError(f"{what}, and would learn the rejected answers as well as the chosen ones; set "
                         "data.format=chosen_only to fine-tune on the prompts and chosen answers only, or train on "
                         "the pairs with trainer.objective=dpo or reward (recipe=tiny_dpo, recipe=tiny_reward)")
    fix = {"text": "plain text: a .txt file, or rows with a 'text' field (data.format=text)",
           "chat": "chat rows: messages, sharegpt, alpaca or prompt_completion (data.format=auto detects them)",
           "preference": "preference pairs: prompt/chosen/rejected rows (data.format=preference)",
           "prompt": "prompts: rows with a 'prompt' (a string or message list) and no completion, other fields "
                     "kept for the reward functions (data.format=prompt_only)",
           "unpaired": "unpaired preferences: prompt/completion/label rows, label true for a desirable completion "
                       "(data.format=unpaired)"}[wanted]
    others = ", ".join(f"trainer.objective={o}" for o, e in OBJECTIVES.items() if e.data_kind == kind)
    raise ValueError(f"{what}; give it {fix}, or train on this data with {others}")


def loss_label(objective: str, loss_type: Any = "sigmoid") -> tuple[str, str]:
    """(curve name, y-axis label) of the loss a run of `objective` logs (tracking/plots.py run_objective reads
    both from a run's config.yaml); a language model's for a name not in the table."""
    return OBJECTIVES[objective].loss_label(loss_type) if objective in OBJECTIVES else LM_LOSS
