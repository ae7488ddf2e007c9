"""``FastFTCallback``: a transformers ``TrainerCallback`` that reports the patch and runs fastft's schedules.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[fastft.integrations.FastFTCallback(cola_every=100)])

At the start of training it prints the patch report once (and the selection report when a partial-backprop
selection is active); then, after every N-th optimizer step, it runs:

* ``cola_every=N``: Chain of LoRA (:mod:`fastft.integrations.cola`): the LoRA/DoRA adapters are merged into
  the base weights and restarted as at patch time, with fresh optimizer state (same Parameter objects,
  their state dropped; the LR schedule goes on). Not after the last step (that link would never train).
* ``reselect=fn`` with ``reselect_every=M``: ``fn(model)`` — whatever re-selection a method needs, e.g.
  re-running a partial-backprop policy (:func:`reselect_trainable`) on the current weights. It also runs
  once at the start of training, after the Trainer has built its optimizer over every candidate parameter,
  so that parameters chosen later are in the optimizer (a parameter left out gets no gradient, and AdamW
  skips it: it keeps its state for when it is chosen again).
* ``sparse_schedule=True`` (the default): the schedules of a sparse fine-tuning patch
  (:class:`fastft.SparseConfig`: SpIEL's prune/regrow cycles, Diff Pruning's fixing step;
  :mod:`fastft.plans.sparse_schedule`) run after every optimizer step with the Trainer's optimizer, so the
  optimizer state follows the moved slots. A model with no sparse schedule is not affected.

Everything that can be refused is checked in ``on_train_begin``, before the first step: COLA on a model
without LoRA adapters or over 4-bit bases, a re-selection that turns on parameters the optimizer does not
hold.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as err:  # transformers is a dependency; keep the message clear anyway
    raise ImportError("fastft.integrations needs transformers (pip install transformers)") from err

from ..patch import build_report, is_patched
from ..plans.sparse_schedule import sparse_schedules
from ..policies import select_trainable, selection_state, unselect
from . import cola


def _optimizer_parameter_ids(optimizer: Any) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def reselect_trainable(policy: str, budget: float | None = None, seed: int = 0, **options: Any) -> Callable[[nn.Module], Any]:
    """A ``reselect`` function for :class:`FastFTCallback`: undo the model's current selection (if any) and
    run ``fastft.select_trainable(model, policy, budget, seed, **options)`` again; returns its report.

    With ``policy="flops"`` the importance is probed again on the current weights (GreenTrainer's
    periodic re-selection), on the ``batch=`` given here.
    """
    def reselect(model: nn.Module):
        if selection_state(model) is not None:
            unselect(model)
        return select_trainable(model, policy, budget=budget, seed=seed, **options)

    reselect.__qualname__ = f"reselect_trainable({policy!r})"
    return reselect


class FastFTCallback(TrainerCallback):
    """Reports the fastft patch once and runs Chain of LoRA and re-selection schedules (module docstring).

    Args:
        cola_every: merge the LoRA/DoRA adapters into the base and restart them every this many optimizer
            steps (Chain of LoRA); None: never.
        reselect: ``fn(model)`` run at the start of training and every ``reselect_every`` steps (e.g.
            :func:`reselect_trainable`); what it returns is printed when it has a ``__str__`` worth showing.
        reselect_every: the period of ``reselect`` in optimizer steps (None: only at the start).
        seed: base seed of COLA's re-initialisation (link at step t uses ``seed + t``); None: the Trainer's
            ``args.seed``.
        log: where reports and schedule events go (default ``print``, on the main process only); None: silent.
        sparse_schedule: run the schedules of a :class:`fastft.SparseConfig` patch (SpIEL, Diff Pruning's
            ``fix_at_step``) after every optimizer step; False leaves them to the caller.
    """

    def __init__(
        self,
        cola_every: int | None = None,
        reselect: Callable[[nn.Module], Any] | None = None,
        reselect_every: int | None = None,
        seed: int | None = None,
        log: Callable[[str], Any] | None = print,
        sparse_schedule: bool = True,
    ):
        for name, value in (("cola_every", cola_every), ("reselect_every", reselect_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"FastFTCallback.{name}={value!r}: a number of optimizer steps >= 1, or None.")
        if reselect is not None and not callable(reselect):
            raise ValueError("FastFTCallback.reselect must be a callable taking the model (e.g. fastft.integrations.reselect_trainable(...)).")
        if reselect_every is not None and reselect is None:
            raise ValueError("FastFTCallback.reselect_every needs reselect=... (the function to run).")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"FastFTCallback.seed={seed!r}: an integer, or None for the Trainer's seed.")
        self.cola_every = cola_every
        self.reselect = reselect
        self.reselect_every = reselect_every
        self.seed = seed
        self.log = log
        if not isinstance(sparse_schedule, bool):
            raise ValueError(f"FastFTCallback.sparse_schedule={sparse_schedule!r}: True or False.")
        self.sparse_schedule = sparse_schedule
        self.reported = False
        self.events: list[tuple[int, str]] = []  # (global step, what happened): COLA links, re-selections

    # ------------------------------------------------------------------ helpers
    def _say(self, state, text: str) -> None:
        if self.log is not None and state.is_world_process_zero:
            self.log(text)

    def _reselect(self, state, model: nn.Module, optimizer: Any) -> None:
        result = self.reselect(model)
        if optimizer is not None:
            held = _optimizer_parameter_ids(optimizer)
            missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
            if missing:
                raise ValueError(
                    f"FastFTCallback: after re-selection {len(missing)} trainable parameters (e.g. {missing[:3]}) are not "
                    "in the optimizer, so they would never train. The Trainer builds its optimizer over the parameters "
                    "that require grad when training starts: do not call fastft.select_trainable before the Trainer; "
                    "let the callback make the first selection (reselect=...)."
                )
        self.events.append((state.global_step, "reselect"))
        if result is not None:
            self._say(state, f"fastft: selection at step {state.global_step}\n{result}")

    def _due(self, every: int | None, state) -> bool:
        step = state.global_step
        return every is not None and step > 0 and step % every == 0 and (not state.max_steps or step < state.max_steps)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("FastFTCallback needs the Trainer to pass the model to its callbacks.")
        if self.cola_every is not None:
            cola.chain_modules(model)  # raises now (before any step) when COLA cannot run on this model
            if optimizer is not None:
                params = [p for _, m in cola.chain_modules(model) for p in m.adapter_parameters().values() if p.requires_grad]
                held = _optimizer_parameter_ids(optimizer)
                if params and not any(id(p) in held for p in params):
                    raise ValueError(
                        "FastFTCallback(cola_every=...): the optimizer holds none of the LoRA adapters; build it over "
                        "the patched model (fastft.patch before creating the Trainer / optimizer)."
                    )
        if self.reselect is not None:
            self._reselect(state, model, optimizer)
        if not self.reported:
            self.reported = True
            if is_patched(model):
                self._say(state, f"fastft: {build_report(model)}")
            elif self.reselect is None:
                self._say(state, "fastft: this model is not patched by fastft (nothing to report).")
            if self.cola_every is not None:
                self._say(state, f"fastft: Chain of LoRA: adapters merged and restarted every {self.cola_every} steps")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._due(self.cola_every, state):
            seed = (args.seed if self.seed is None else self.seed) + state.global_step
            names = cola.merge_and_restart(model, optimizer, seed=seed)
            self.events.append((state.global_step, "cola"))
            self._say(state, f"fastft: Chain of LoRA: merged and restarted {len(names)} adapters at step {state.global_step}")
        if self.reselect is not None and self._due(self.reselect_every, state):
            self._reselect(state, model, optimizer)
        if self.sparse_schedule and model is not None:
            for schedule in sparse_schedules(model):
                final = bool(state.max_steps) and state.global_step >= state.max_steps
                for done in schedule.step(model, state.global_step, optimizer, final=final):
                    self.events.append((state.global_step, "sparse"))
                    self._say(state, f"fastft: {done} at step {state.global_step}")
