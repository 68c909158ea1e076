"""A Pruner's saved state: its layout, its checksum, and the validation of the whole of it.

:meth:`Pruner.state_dict <gpuprune.Pruner.state_dict>` writes, and :meth:`Pruner.load_state_dict
<gpuprune.Pruner.load_state_dict>` reads, one dict:

===================  ==========================================================================
``config``           every setting plans depend on (equal to the loader's, setting by setting)
``stats``            :meth:`LossStats.state_dict <gpuprune.LossStats.state_dict>`
``rounds``           pruned plans made so far
``epoch``            the epoch observations are stamped with (the current plan's; 0 before one)
``selection_epoch``  the epoch the current selection was drawn in (-1: none, or a full plan)
``plan``             the current plan: its epoch, ``full``, ids (None for a full plan: its order is
                     recomputed from the seed), ``weight`` and packed ``rescaled`` bits
``history``          one record per plan: ``epoch``, ``size``, ``full``, ``reselected``, ``overlap``
``checksum``         sha256 of everything else (:func:`state_checksum`)
===================  ==========================================================================

:func:`check_state` refuses any state a Pruner with this configuration could not have saved,
before anything is copied: not only each field's type and range, but the facts that tie them
together (a state edited and re-checksummed must not load). The history must be a run of this
schedule: epochs increasing, each record's ``full`` and ``reselected`` what the schedule says, its
size the budget (or, for InfoBatch, a count in range), overlaps in [0, 1] (exactly 1 after a reused
selection or between two full plans); ``rounds`` is the number of pruned records, ``selected`` sums
to their sizes, the plan is the last record, and a pruned plan is one the policy can make
(:meth:`Policy.check_selection <gpuprune.Policy.check_selection>`: for InfoBatch, weight ``1/q`` and
exactly the kept count of its below-mean mask).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Callable, NamedTuple

import torch

from ._checks import MISSING, check_float, check_int, config_differences
from .plan import Plan, mask_lookup
from .policies import Policy, Selection
from .schedule import Schedule
from .sizes import index_dtype
from .stats import LossStats

__all__ = ["FORMAT", "Progress", "make_state", "check_state", "state_checksum", "saved_num_epochs",
           "check_extension"]

#: the ``config["format"]`` of a Pruner state (unchanged since 0.2: its states still load)
FORMAT = "gpuprune.Pruner/2"
_KEYS = ("config", "stats", "rounds", "epoch", "selection_epoch", "plan", "history", "checksum")
_PLAN_KEYS = ("epoch", "full", "indices", "weight", "rescaled")
_RECORD_KEYS = ("epoch", "size", "full", "reselected", "overlap")


class Progress(NamedTuple):
    """What a Pruner has planned so far, besides its statistics.

    Attributes:
        plan: the current plan, or None before the first.
        epoch: the epoch observations are stamped with (the current plan's; 0 before one).
        rounds: pruned plans made so far.
        selection_epoch: the epoch the current selection was drawn in (-1: none, or a full plan).
        history: one record per plan (``overlap`` a float, or None for the first).
    """

    plan: Plan | None
    epoch: int
    rounds: int
    selection_epoch: int
    history: list[dict]

    def advance(self, plan: Plan, reselect: bool, record: dict) -> "Progress":
        """The progress once ``plan`` (a new selection if ``reselect``) is current, ``record``
        appended to the history."""
        return Progress(plan, plan.epoch, self.rounds + (0 if plan.full else 1),
                        plan.epoch if reselect else -1 if plan.full else self.selection_epoch,
                        self.history + [record])

    def records(self) -> list[dict]:
        """The history with every overlap a float (or None): the overlaps still on the device
        (0-d tensors) are stacked and copied to the host together, one synchronisation."""
        held = [r["overlap"] for r in self.history if isinstance(r["overlap"], torch.Tensor)]
        values = iter(torch.stack(held).tolist() if held else ())
        return [{**r, "overlap": next(values) if isinstance(r["overlap"], torch.Tensor)
                 else r["overlap"]} for r in self.history]

    def nbytes(self) -> int:
        """Device bytes held: the current plan (ids, rescaled mask) and the overlaps on the device."""
        total = sum(r["overlap"].element_size() for r in self.history
                    if isinstance(r["overlap"], torch.Tensor))
        if self.plan is not None:
            total += self.plan.indices.numel() * self.plan.indices.element_size()
            if self.plan.rescaled is not None:
                total += self.plan.rescaled.numel()
        return total


def state_checksum(state: dict) -> str:
    """sha256 over a state dict's content (every tensor's dtype, shape and bytes; every value),
    excluding its ``"checksum"`` entry."""
    h = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(b"{")
            for key in sorted(obj, key=str):
                if key == "checksum" and obj is state:
                    continue
                h.update(repr(key).encode())
                feed(obj[key])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for item in obj:
                feed(item)
            h.update(b"]")
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    feed(state)
    return h.hexdigest()


def make_state(config: dict, stats: LossStats, progress: Progress) -> dict:
    """The state dict of a Pruner (tensors cloned), with its checksum. Each saved id is stored
    once: the plan's ids (whose set is the current selection); a full plan stores none."""
    plan = progress.plan
    state = {
        "config": config,
        "stats": stats.state_dict(),
        "rounds": progress.rounds,
        "epoch": progress.epoch,
        "selection_epoch": progress.selection_epoch,
        "plan": None if plan is None else {
            "epoch": plan.epoch, "full": plan.full,
            "indices": None if plan.full else plan.indices.clone(),
            "weight": plan.weight,
            "rescaled": None if plan.rescaled is None else plan.rescaled.clone()},
        "history": [dict(r) for r in progress.history],
    }
    state["checksum"] = state_checksum(state)
    return state


def check_state(state, *, config: dict, schedule: Schedule, policy: Policy, k: int,
                stats: LossStats, full_plan: Callable[[int], Plan]) -> Progress:
    """Validate a whole saved state against the Pruner that loads it; return what it restores.

    Args:
        state: the dict to check.
        config, schedule, policy, k: the loading Pruner's configuration and rule.
        stats: the loading Pruner's statistics (for shapes; they are not changed).
        full_plan: makes the plan of a full epoch (its order comes from the seed).

    Raises:
        TypeError, ValueError: naming the entry, for anything this Pruner could not have saved.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from Pruner.state_dict(), got "
                        f"{type(state).__name__}")
    missing, extra = sorted(set(_KEYS) - set(state)), sorted(set(state) - set(_KEYS), key=str)
    if missing or extra:
        raise ValueError(f"state_dict must have exactly the keys {sorted(_KEYS)}: missing "
                         f"{missing}, unknown {extra}")
    if not isinstance(state["checksum"], str) or state["checksum"] != state_checksum(state):
        raise ValueError("state_dict['checksum'] does not match the state's content: the state "
                         "was modified or corrupted after Pruner.state_dict()")
    check_config(state["config"], config)
    rounds = check_int("state_dict['rounds']", state["rounds"], minimum=0)
    epoch = schedule.check_epoch(state["epoch"], "state_dict['epoch']")
    selection_epoch = check_int("state_dict['selection_epoch']", state["selection_epoch"],
                                minimum=-1, maximum=epoch)
    stats.check_state_dict(state["stats"], max_epoch=epoch, max_selected=rounds)
    history = _check_history(state["history"], schedule, k, stats.num_samples)
    pruned = [r for r in history if not r["full"]]
    if rounds != len(pruned):
        raise ValueError(f"state_dict['rounds']={rounds}, but the history holds {len(pruned)} "
                         f"pruned plans")
    planned = sum(r["size"] for r in pruned)
    if int(state["stats"]["selected"].sum()) != planned:
        raise ValueError(f"state_dict['stats']['selected'] sums to "
                         f"{int(state['stats']['selected'].sum())}, but the history's pruned "
                         f"plans hold {planned} ids")
    last = history[-1] if history else None
    chosen = -1 if last is None or last["full"] else max(
        (r["epoch"] for r in history if r["reselected"]), default=-1)
    if selection_epoch != chosen:
        raise ValueError(f"state_dict['selection_epoch']={selection_epoch}, but the history's "
                         f"current selection was drawn in epoch {chosen}")
    if last is None:
        if state["plan"] is not None or epoch:
            raise ValueError("state_dict['history'] is empty but the state holds a plan or "
                             "an epoch")
        return Progress(None, 0, 0, -1, [])
    if last["epoch"] != epoch:
        raise ValueError(f"state_dict['epoch']={epoch}, but the last plan in the history is of "
                         f"epoch {last['epoch']}")
    plan = _check_plan(state["plan"], last, schedule, policy, k, stats, full_plan)
    return Progress(plan, epoch, rounds, selection_epoch, history)


def check_config(saved, mine: dict) -> None:
    """Every setting of ``saved`` equal to ``mine``'s, nested ones (the policy's) named by their
    dotted path (:func:`gpuprune._checks.config_differences`). A checkpoint of a shorter run says
    how to extend it."""
    if not isinstance(saved, dict):
        raise TypeError(f"state_dict['config'] must be a dict, got {type(saved).__name__}")
    differences = config_differences(saved, mine)
    a, b = differences.get("schedule.num_epochs", (None, None))
    if isinstance(a, int) and isinstance(b, int) and a < b:
        raise ValueError(f"checkpoint was made with schedule.num_epochs={a}, this Pruner has "
                         f"schedule.num_epochs={b}: to continue that run for more epochs, load it "
                         f"with pruner.load_state_dict(state, extend=True) (docs/integrations.md, "
                         f"\"Resume with more epochs\")")
    for key, (a, b) in differences.items():
        if a is MISSING:
            raise ValueError(f"state_dict['config'] is missing {key!r} (this Pruner has "
                             f"{key}={b!r})")
        if b is MISSING:
            raise ValueError(f"state_dict['config'] has an unknown setting {key!r}")
        raise ValueError(f"checkpoint was made with {key}={a!r}, this Pruner has {key}={b!r}")


def saved_num_epochs(state, mine: int | None) -> int:
    """The ``num_epochs`` of the run a state was saved from, for extending it to ``mine`` epochs:
    an int in ``[1, mine]``, or TypeError/ValueError naming the entry (nothing else is checked
    here: :func:`check_state` checks the whole state against that run's configuration)."""
    if mine is None:
        raise ValueError("extend=True continues a run for more epochs, but this Pruner has no "
                         "num_epochs: create it with the run's new num_epochs")
    try:
        saved = state["config"]["schedule"]["num_epochs"]
    except (TypeError, KeyError) as e:
        raise ValueError(f"state_dict['config']['schedule']['num_epochs'] is missing: is it a "
                         f"Pruner.state_dict()? ({e!r})") from None
    if saved is None:
        raise ValueError("checkpoint was made with schedule.num_epochs=None (an open-ended run), "
                         "which has no end to move: extend=True needs a run with num_epochs")
    saved = check_int("state_dict['config']['schedule']['num_epochs']", saved, minimum=1)
    if saved > mine:
        raise ValueError(f"checkpoint was made with schedule.num_epochs={saved}, more than this "
                         f"Pruner's num_epochs={mine}: extend=True only lengthens a run")
    return saved


def check_extension(progress: Progress, saved: Schedule, longer: Schedule) -> None:
    """Refuse to continue a run of schedule ``saved`` with the ``longer`` one unless every epoch
    it planned has the same kind (full or pruned, a new selection or not) in both: then the
    longer run is the one a Pruner made with ``longer`` from the start would have trained. That
    holds for every epoch before the saved run's first final full-data (InfoBatch: annealing)
    epoch, and fails at that epoch when the longer schedule prunes it. Under a keep schedule
    every pruned epoch planned must also keep its budget (``budget(e, 0)``: 0 stands for the
    constant k, which both share)."""
    previous = None
    for record in progress.history:
        e = record["epoch"]
        if (saved.is_full(e), saved.selects(e, previous)) != (longer.is_full(e),
                                                              longer.selects(e, previous)):
            first = saved.num_epochs - saved.final
            kind = {True: "full-data", False: "pruned"}
            raise ValueError(
                f"cannot extend this checkpoint: its run (num_epochs={saved.num_epochs}) planned "
                f"epoch {e} as a {kind[saved.is_full(e)]} epoch, which with "
                f"num_epochs={longer.num_epochs} is {kind[longer.is_full(e)]}; its final "
                f"full-data (InfoBatch: annealing) epochs start at epoch {first}. Extend from a "
                f"checkpoint saved before epoch {first} was planned, or keep "
                f"num_epochs={saved.num_epochs}")
        if not saved.is_full(e) and saved.budget(e, 0) != longer.budget(e, 0):
            raise ValueError(
                f"cannot extend this checkpoint: its keep schedule gave epoch {e} a budget of "
                f"{saved.budget(e, 0)} samples, which over num_epochs={longer.num_epochs} is "
                f"{longer.budget(e, 0)} (a (shape, start, end) keep schedule spreads over the "
                f"run's length); keep num_epochs={saved.num_epochs}, or give keep as a callable "
                f"of the epoch, whose sizes do not depend on num_epochs")
        previous = e


def _check_history(history, schedule: Schedule, k: int, n: int) -> list[dict]:
    """The records, checked one by one and as a run of ``schedule``; returned as plain copies."""
    if not isinstance(history, list):
        raise ValueError(f"state_dict['history'] must be a list, got {type(history).__name__}")
    out: list[dict] = []
    previous = None
    for i, r in enumerate(history):
        name = f"state_dict['history'][{i}]"
        if not isinstance(r, dict) or set(r) != set(_RECORD_KEYS):
            raise ValueError(f"{name} must be a dict with exactly the keys {list(_RECORD_KEYS)}, "
                             f"got {r!r}")
        e = schedule.check_epoch(r["epoch"], f"{name}['epoch']")
        if previous is not None and e <= previous:
            raise ValueError(f"{name}['epoch']={e} does not follow the previous record's epoch "
                             f"{previous}: plans move forward")
        for key, want in (("full", schedule.is_full(e)),
                          ("reselected", schedule.selects(e, previous))):
            if r[key] is not want:
                raise ValueError(f"{name}['{key}']={r[key]!r}, but this schedule makes it "
                                 f"{want!r} for epoch {e}")
        size = schedule.epoch_size(e, n, k)
        got = check_int(f"{name}['size']", r["size"], minimum=1, maximum=n)
        if size is not None and got != size:
            raise ValueError(f"{name}['size']={got}, but epoch {e} plans {size} samples")
        out.append({**r, "overlap": _check_overlap(name, r["overlap"], previous, e, schedule)})
        previous = e
    return out


def _check_overlap(name: str, overlap, previous: int | None, epoch: int,
                   schedule: Schedule) -> float | None:
    if previous is None:
        if overlap is not None:
            raise ValueError(f"{name}['overlap'] must be None for the first plan, got {overlap!r}")
        return None
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) \
            or not 0.0 <= float(overlap) <= 1.0:
        raise ValueError(f"{name}['overlap'] must be a float in [0, 1], got {overlap!r}")
    same = schedule.reuses(epoch, previous) or (schedule.is_full(epoch)
                                                and schedule.is_full(previous))
    if same and float(overlap) != 1.0:
        raise ValueError(f"{name}['overlap']={overlap!r}, but epoch {epoch} plans the previous "
                         f"plan's sample set again (overlap 1.0)")
    return float(overlap)


def _check_plan(p, last: dict, schedule: Schedule, policy: Policy, k: int, stats: LossStats,
                full_plan: Callable[[int], Plan]) -> Plan:
    if not isinstance(p, dict) or set(p) != set(_PLAN_KEYS):
        raise ValueError("state_dict['plan'] must be a dict with epoch, full, indices, weight and "
                         "rescaled (the history holds plans)")
    epoch = schedule.check_epoch(p["epoch"], "state_dict['plan']['epoch']")
    if epoch != last["epoch"]:
        raise ValueError(f"state_dict['plan']['epoch']={epoch} differs from "
                         f"state_dict['epoch']={last['epoch']}")
    full = p["full"]
    if full is not schedule.is_full(epoch):
        raise ValueError(f"state_dict['plan']['full']={full!r}, but epoch {epoch} is "
                         f"{'full' if schedule.is_full(epoch) else 'pruned'} in this schedule")
    if full:
        if p["indices"] is not None or p["rescaled"] is not None or p["weight"] != 1.0:
            raise ValueError("state_dict['plan'] of a full epoch must have indices=None, "
                             "rescaled=None and weight=1.0")
        return full_plan(epoch)
    n = stats.num_samples
    ids = _checked_ids("state_dict['plan']['indices']", p["indices"], n)
    if ids.numel() != last["size"]:
        raise ValueError(f"state_dict['plan']['indices'] holds {ids.numel()} ids, its history "
                         f"record says {last['size']}")
    weight = check_float("state_dict['plan']['weight']", p["weight"], low=1.0)
    bits = _checked_bits(p["rescaled"], n)
    if bits is None and weight != 1.0:
        raise ValueError("state_dict['plan']['weight'] must be 1.0 when nothing is rescaled")
    mask = None if bits is None else mask_lookup(bits, torch.arange(n, device=bits.device))
    policy.check_selection(Selection(ids, mask, weight), schedule.epoch_size(epoch, n, k), n,
                           "state_dict['plan']['indices']")
    device = stats.device
    return Plan(epoch, ids.to(device), False, n, weight, None if bits is None else bits.to(device))


def _checked_ids(name: str, t, num_samples: int) -> torch.Tensor:
    """A saved id tensor: 1-D, the id dtype, values unique and in [0, N)."""
    dtype = index_dtype(num_samples)
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_samples:
        raise ValueError(f"{name} holds ids outside [0, {num_samples}): [{lo}, {hi}]")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} holds duplicate ids")
    return t


def _checked_bits(bits, n: int) -> torch.Tensor | None:
    """Packed rescaled bits (:func:`gpuprune.plan.pack_mask`): ``ceil(N / 8)`` uint8, no bit set
    past sample N - 1."""
    if bits is None:
        return None
    size = math.ceil(n / 8)
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 \
            or tuple(bits.shape) != (size,):
        raise ValueError(f"state_dict['plan']['rescaled'] must be None or a ({size},) uint8 tensor")
    spare = 8 * size - n
    if spare and int(bits[-1]) >> (8 - spare):
        raise ValueError(f"state_dict['plan']['rescaled'] marks samples past num_samples={n}")
    return bits
