"""The places where the run changes Megatron's training loop: each replaces one module-level name
that ``megatron.training.training`` looks up at call time (no copies of Megatron code)."""

from __future__ import annotations

import signal
from functools import wraps

import megatron.training.training as megatron_training
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..core.config import S2AttentionConfig
from ..ops.flops import sparse_aware_flops
from .progress import ProgressLine
from .validation import TrainingSetupError


class ScheduleExplainingOptimizerParamScheduler(OptimizerParamScheduler):
    """Megatron's scheduler; a learning-rate schedule that differs from the resumed checkpoint's
    (e.g. a longer --train-iters) fails with the two flags that resolve it, not a bare assert."""

    def _check_and_set(self, cls_value, sd_value, name):
        if cls_value != sd_value and not (self.override_opt_param_scheduler
                                          or self.use_checkpoint_opt_param_scheduler):
            steps = " (in samples: iterations x global batch size)" if "iterations" in name else ""
            raise TrainingSetupError(
                f"the checkpoint in --load was trained with another learning-rate schedule: {name} "
                f"{sd_value} in the checkpoint, {cls_value} from this run's flags{steps}. Fix: to "
                "continue with this run's schedule (e.g. a longer --train-iters), add "
                "--override-opt_param-scheduler; to keep the checkpoint's schedule, add "
                "--use-checkpoint-opt_param-scheduler (docs/training.md, 'Continue training')")
        return super()._check_and_set(cls_value, sd_value, name)


def install_sparse_aware_logging(s2_config: S2AttentionConfig) -> None:
    """Megatron's throughput (TFLOP/s/GPU) counts S2 work as done; add the progress line.

    Both are module-level functions that ``megatron.training.training.train`` looks up at call
    time, so replacing them there is the one seam needed.
    """
    patterns = [layer.pattern for layer in s2_config.layers]
    flops_fn = sparse_aware_flops(megatron_training.num_floating_point_operations, patterns)
    megatron_training.num_floating_point_operations = flops_fn
    megatron_training.training_log = ProgressLine(megatron_training.training_log, flops_fn)


def use_shipped_dataset_helpers() -> None:
    """The megatron-core wheel ships the compiled dataset helper but not its Makefile; Megatron's
    start-up would try to rebuild it with `make` and exit. Use the shipped one."""
    import megatron.core.datasets.utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let Megatron compile it as usual
    dataset_utils.compile_helpers = lambda: None


def scope_exit_signal_handler_to_training(args) -> None:
    """--exit-signal-handler: SIGTERM means "save a checkpoint and exit" while Megatron's ``train``
    runs, and a plain exit before and after it.

    Megatron installs its handler at start-up for the life of the process, but only the training
    loop checks the flag it sets: elsewhere (start-up, the final evaluation, a crash's exit) SIGTERM
    was ignored and a stuck process could only be killed. ``train`` is looked up at call time, so
    wrapping it there scopes the handler.
    """
    if not args.exit_signal_handler:
        return
    exit_signal = args.exit_signal
    megatron_handler = signal.signal(exit_signal, signal.SIG_DFL)
    train = megatron_training.train

    @wraps(train)
    def train_saving_on_signal(*train_args, **train_kwargs):
        signal.signal(exit_signal, megatron_handler)
        try:
            return train(*train_args, **train_kwargs)
        finally:
            signal.signal(exit_signal, signal.SIG_DFL)

    megatron_training.train = train_saving_on_signal


def install(args, s2_config: S2AttentionConfig) -> None:
    """All of the above, for a training run."""
    scope_exit_signal_handler_to_training(args)
    install_sparse_aware_logging(s2_config)
    megatron_training.OptimizerParamScheduler = ScheduleExplainingOptimizerParamScheduler
    use_shipped_dataset_helpers()
