"""AdamW over fp32 master copies of 16-bit parameters (`trainer.bf16_update=fp32_master`).

bf16 keeps 8 bits of mantissa: an update below half an ulp of the weight (lr 1e-5 on weights ~0.02 is one)
rounds to nothing when it is added to the bf16 weight itself. Here the update is added to an fp32 master
copy, with fp32 moments, by torch's own AdamW maths (`torch.optim.adam.adam` with decoupled weight decay, the
function torch.optim.AdamW calls), and the 16-bit parameter the model computes with is the master rounded
to nearest after each step. No maintained library offers this for a plain torch optimizer (DeepSpeed's
bf16 optimizer does it inside its engine), hence this class.

State per parameter: `step`, `exp_avg`, `exp_avg_sq` (fp32) and, for 16-bit parameters, `master` (fp32):
12 bytes per 16-bit parameter beside its 2-byte weight and gradient. fp32 parameters step in place
(no master). The state is ordinary optimizer state, so checkpoints (torch.save of state_dict, FSDP2's
DCP) carry the masters; `load_state_dict` keeps them fp32 where torch's loader casts state to the
parameter's dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim.adam import adam

FP32_KEYS = ("master", "exp_avg", "exp_avg_sq")


class MasterWeightAdamW(torch.optim.Optimizer):
    """torch AdamW (decoupled weight decay) on fp32 masters of 16-bit parameters; see the module docstring."""

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, foreach: Optional[bool] = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))

    def _state(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            # step as torch AdamW keeps it outside fused/capturable: a CPU fp32 scalar tensor
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if param.dtype != torch.float32:
                state["master"] = param.detach().to(torch.float32)
            master = state.get("master", param)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            masters = [s.get("master", p) for s, p in zip(states, params)]
            beta1, beta2 = group["betas"]
            adam(masters, [p.grad.to(torch.float32) for p in params], [s["exp_avg"] for s in states],
                 [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=group["foreach"],
                 decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for param, master in zip(params, masters):
                if master is not param:
                    param.copy_(master)  # round to nearest: the weights the next forward computes with
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating state to each parameter's dtype (bf16 here): put the saved fp32
        masters and moments back over those casts, so a resumed run continues from the same fp32 values."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in FP32_KEYS:
                if key in saved:
                    self.state[param][key] = saved[key].to(device=param.device, dtype=torch.float32, copy=True)
