"""The ``[s2]`` progress line printed per --log-interval, and its reader for tools and tests."""

from __future__ import annotations

import re

import torch
from megatron.training import get_args, get_tensorboard_writer, get_timers, get_wandb_writer
from megatron.training.utils import is_last_rank

from . import cpu_compat


# What ProgressLine prints, for the tools and tests that read training logs. Rates are per GPU, or
# per rank (process) in CPU mode.
PROGRESS_LINE = re.compile(
    r"^\[s2\] iteration (?P<iteration>\d+)/\d+ \| loss (?P<loss>\S+) \| tokens/s/(?:GPU|rank) (?P<tokens_per_s>[\d,]+) \| "
    r"TFLOP/s/(?:GPU|rank) (?P<tflops>[\d.]+) \(S2-aware\) \| step (?P<step_ms>[\d.]+) ms"
    r"(?: \| peak mem (?P<peak_gib>[\d.]+) GiB)?", re.M)


def read_progress(text: str) -> dict:
    """``{iteration: fields as printed}`` of the progress lines in a training log."""
    return {int(m["iteration"]): m.groupdict() for m in PROGRESS_LINE.finditer(text)}


class ProgressLine:
    """One line per --log-interval: iteration, loss, tokens/s/GPU, TFLOP/s/GPU (S2-aware), step
    time, peak GPU memory (this rank), ETA; in CPU mode the rates are per rank.

    Wraps Megatron's ``training_log`` (it keeps printing its own detailed line) and writes the same
    numbers to TensorBoard / wandb under ``s2/``.
    """

    def __init__(self, megatron_training_log, flops_fn):
        self._training_log = megatron_training_log
        self._flops_fn = flops_fn
        self._last_logged = None

    def __call__(self, loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        args = get_args()
        if self._last_logged is None:
            self._last_logged = iteration - 1  # first step of this process (fresh or resumed)
        first = kwargs.get("is_first_iteration", False)
        log_now = iteration % args.log_interval == 0 or first
        if log_now:
            # Megatron's own interval timer (it pauses during evaluation); read before it resets.
            elapsed = get_timers()("interval-time").elapsed(barrier=False, reset=False)
        result = self._training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        if not log_now:
            return result
        seconds_per_step = max(elapsed, 1e-9) / max(1, iteration - self._last_logged)
        if not first:  # Megatron keeps its timer running through the first iteration's log
            self._last_logged = iteration
        if not is_last_rank():
            return result
        tokens_per_step = args.global_batch_size * args.seq_length
        tokens_per_s_device = tokens_per_step / seconds_per_step / args.world_size
        tflops_device = self._flops_fn(args, args.global_batch_size) / seconds_per_step / args.world_size / 1e12
        eta = (args.train_iters - iteration) * seconds_per_step if args.train_iters else 0.0
        loss = loss_dict.get("lm loss")
        loss_text = f"{float(loss):.9g}" if loss is not None else "n/a"
        unit = "rank" if cpu_compat.cpu_mode_requested() else "GPU"
        line = (f"[s2] iteration {iteration}/{args.train_iters} | loss {loss_text} | "
                f"tokens/s/{unit} {tokens_per_s_device:,.0f} | TFLOP/s/{unit} {tflops_device:.2f} (S2-aware) | "
                f"step {seconds_per_step * 1000:.1f} ms")
        scalars = {f"s2/tokens_per_s_per_{unit.lower()}": tokens_per_s_device,
                   f"s2/tflops_per_{unit.lower()}": tflops_device}
        if torch.cuda.is_available():
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
            line += f" | peak mem {peak_gib:.2f} GiB"
            scalars["s2/peak_memory_gib"] = peak_gib
        print(f"{line} | ETA {_format_seconds(eta)}", flush=True)
        writer = get_tensorboard_writer()
        if writer:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)
        wandb_writer = get_wandb_writer()
        if wandb_writer:
            wandb_writer.log(scalars, iteration)
        return result


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
