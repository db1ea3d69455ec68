"""Keep the resolved S2 attention settings with every Megatron checkpoint and check them on resume.

Megatron saves its argument namespace in every checkpoint (``state_dict['args']``), whatever the
format. ``attach_to_args`` puts the resolved per-layer settings there (``args.s2_attention``, the
explicit form of ``S2AttentionConfig.to_dict()``), so each save carries them with no extra file or
hook. ``check_resume`` reads them back from the checkpoint that ``--load`` will resume, before any
model is built, and refuses a different attention layout unless ``--allow-s2-layout-change``.

A checkpoint without S2 settings (plain Megatron-LM) counts as all layers dense.
"""

from __future__ import annotations

from typing import Optional

ARGS_ATTRIBUTE = "s2_attention"


class S2LayoutMismatchError(RuntimeError):
    """Resuming would change which attention pattern some layer uses."""


def attach_to_args(args, s2_config) -> None:
    """Store the resolved settings in Megatron's args, which every checkpoint saves."""
    setattr(args, ARGS_ATTRIBUTE, s2_config.to_dict())


def _default_megatron_args():
    """Megatron's argument defaults (what a run with no flags would use). Not ``arguments.megatron_parser``:
    ``arguments`` imports this module (through ``validation``), and the layer test forbids the circle."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args([])


def read_checkpoint_s2_settings(load_dir: str, args=None) -> tuple:
    """``(found, settings)`` of the latest checkpoint in ``load_dir`` (or ``args.ckpt_step``'s).

    ``found`` is False when there is no checkpoint; ``settings`` is None for a checkpoint saved
    without S2 settings, else the dict of ``S2AttentionConfig.to_dict()``. ``args`` are the run's
    Megatron arguments (default: Megatron's defaults). Reads only the common (rank-0) part, with or
    without torch.distributed, so it runs before the training processes start.
    """
    from megatron.training.checkpointing import _load_base_checkpoint, checkpoint_exists

    if args is None:
        args = _default_megatron_args()
    if not checkpoint_exists(load_dir):
        return False, None
    # Megatron's own reader for --use-checkpoint-args; rank0=True loads only the common state.
    state_dict, _, _, _ = _load_base_checkpoint(load_dir, args, rank0=True)
    if not state_dict:
        return False, None
    checkpoint_args = state_dict.get("args")
    return True, getattr(checkpoint_args, ARGS_ATTRIBUTE, None)


def _layer_kinds(settings: Optional[dict], num_layers: int) -> list:
    """The per-layer pattern dicts, all dense for a checkpoint without S2 settings."""
    if settings is None:
        return [{"type": "dense"}] * num_layers
    return list(settings["layers"])


def describe_differences(saved: Optional[dict], current: dict) -> list:
    """Human-readable lines, one per layer whose attention differs (layers numbered from 0)."""
    now = _layer_kinds(current, len(current["layers"]))
    before = _layer_kinds(saved, len(now))
    lines = []
    if len(before) != len(now):
        lines.append(f"the checkpoint has {len(before)} layers, this run {len(now)}")
    for index, (old, new) in enumerate(zip(before, now)):
        if old == new:
            continue
        if old.get("type") != new.get("type"):
            lines.append(f"layer {index}: {_describe_layer(old)} -> {_describe_layer(new)}")
            continue
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        lines.append(f"layer {index}: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    return lines


def _describe_layer(layer: dict) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in layer.items() if k != "type" and v is not None)
    return f"{layer.get('type')} ({params})" if params else str(layer.get("type"))


def check_resume(args, s2_config) -> Optional[list]:
    """Compare this run's S2 layout with the checkpoint ``--load`` resumes; raise on a change.

    Returns the list of differences that ``--allow-s2-layout-change`` let through (empty when equal),
    or None when there is nothing to resume.
    """
    load_dir = getattr(args, "load", None)
    if not load_dir:
        return None
    found, saved = read_checkpoint_s2_settings(load_dir, args)
    if not found:
        return None
    differences = describe_differences(saved, s2_config.to_dict())
    if differences and not getattr(args, "allow_s2_layout_change", False):
        shown = "\n  ".join(differences[:8])
        more = f"\n  ... and {len(differences) - 8} more layers" if len(differences) > 8 else ""
        origin = "" if saved is not None else " (it has no S2 settings: a plain Megatron checkpoint, all dense)"
        raise S2LayoutMismatchError(
            f"the checkpoint in --load {load_dir}{origin} was trained with a different S2 attention "
            f"layout than --s2-config gives now:\n  {shown}{more}\n"
            "Fix: resume with the same S2 config, or pass --allow-s2-layout-change to continue "
            "training with the new layout on purpose (the weights are reused as they are)."
        )
    return differences
