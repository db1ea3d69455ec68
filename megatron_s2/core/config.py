"""Per-layer S2 attention configuration: YAML (or a dict) in, one validated setting per layer out.

No Megatron import: the training script, the Hugging Face export and the tools all read the same
resolved form. Layers are numbered from 0 everywhere in this module (Megatron's own ``layer_number``
starts at 1). The YAML forms are described in ``docs/megatron.md``; in short::

    preset: dkernel             # optional base for the S2 parameters: dkernel | phi3_small
    defaults: {block_size: 64, local_blocks: 16, vert_stride: 16}
    layers: DDSSSSSS            # D dense, S S2, W window-only; or a list, or dense_every_n: 2 (+ dense_phase: 1)
    overrides:
      - {layers: "4-7", vert_stride: 8}
    allow_partial_coverage: false
    cp_exchange: s2             # or allgather
    cp_overlap: auto            # or true / false

``S2AttentionConfig.to_dict()`` writes the explicit per-layer form (every parameter spelled out), which
``from_dict`` reads back without needing the model's shape: that is the form stored with checkpoints and
in Hugging Face configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..ops.pattern import BlockMaskPattern, S2ConfigError, S2CoverageError, S2Pattern
from .context_parallel import CP_EXCHANGES, validate_context_parallel

FORMAT_VERSION = 1
PATTERN_KEYS = tuple(f.name for f in dataclasses.fields(S2Pattern))
PRESETS = ("dkernel", "phi3_small")
# A window layer is an S2 layer without stripes (vert_stride 0): the sliding-window control.
LAYER_TYPES = {"dense": "dense", "d": "dense", "s2": "s2", "s": "s2", "sparse": "s2", "window": "window",
               "w": "window"}
LAYER_LETTERS = {"D": "dense", "S": "s2", "W": "window"}
TOP_LEVEL_KEYS = (
    "version",
    "preset",
    "defaults",
    "layers",
    "dense_every_n",
    "dense_phase",
    "overrides",
    "allow_partial_coverage",
    "cp_exchange",
    "cp_overlap",
)
_LAYER_ENTRY_KEYS = ("type", "preset") + PATTERN_KEYS
_OVERRIDE_KEYS = ("layers",) + _LAYER_ENTRY_KEYS


def _fail(key: str, value: Any, problem: str, fix: str) -> S2ConfigError:
    return S2ConfigError(f"S2 config key '{key}' = {value!r}: {problem}. Fix: {fix}")


def _overlap_setting(value: Any) -> Optional[bool]:
    """``cp_overlap``: auto (YAML "auto" or None), or a boolean (not 0/1: they would not round-trip)."""
    if value is None or value == "auto":
        return None
    if not isinstance(value, bool):
        raise _fail("cp_overlap", value, "not auto, true or false",
                    "use auto (the exchange's measured default), true or false")
    return value


def _check_keys(mapping: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(allowed)}"
            raise _fail(f"{where}{key}", mapping[key], "unknown key", hint)


def _check_mapping(value: Any, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail(key, value, "expected a mapping (key: value pairs)", "write it as a YAML mapping")
    return value


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """Attention of one layer: ``pattern is None`` means dense causal attention."""

    index: int  # from 0
    pattern: Optional[S2Pattern] = None

    @property
    def is_dense(self) -> bool:
        return self.pattern is None

    @property
    def kind(self) -> str:
        """``dense``, ``s2``, ``window`` (an S2 pattern without stripes) or ``mask`` (explicit block mask)."""
        if self.pattern is None:
            return "dense"
        if not isinstance(self.pattern, S2Pattern):
            return "mask"
        return "window" if self.pattern.is_window else "s2"

    def to_dict(self) -> dict:
        if self.pattern is None:
            return {"type": "dense"}
        if not isinstance(self.pattern, S2Pattern):
            raise S2ConfigError(f"layer {self.index}: an explicit block mask ({type(self.pattern).__name__}) "
                                "has no YAML/dict form; store the mask tensor separately")
        return {"type": self.kind, **dataclasses.asdict(self.pattern)}


@dataclasses.dataclass(frozen=True)
class S2AttentionConfig:
    """The resolved per-layer attention of a model (``layers[i]`` is layer ``i``, from 0)."""

    layers: tuple
    allow_partial_coverage: bool = False
    cp_exchange: str = "s2"
    cp_overlap: Optional[bool] = None  # None ("auto"): the exchange's default (context_parallel.OVERLAP_DEFAULTS)
    # The --s2-override strings this config was resolved with, so that errors can say which values
    # came from the command line; not part of the layout (no effect on equality or to_dict).
    command_line: tuple = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerAttention) or layer.index != i:
                raise S2ConfigError(f"layers[{i}] must be LayerAttention(index={i}, ...), got {layer!r}")
        if self.cp_exchange not in CP_EXCHANGES:
            raise _fail("cp_exchange", self.cp_exchange, "unknown exchange", f"use one of {', '.join(CP_EXCHANGES)}")
        object.__setattr__(self, "cp_overlap", _overlap_setting(self.cp_overlap))
        if not isinstance(self.allow_partial_coverage, bool):
            raise _fail("allow_partial_coverage", self.allow_partial_coverage, "not a boolean", "use true or false")

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path, **kwargs) -> "S2AttentionConfig":
        """Read a YAML file (an S2 config, or a training config, whose ``s2:`` section is read as by
        ``from_section``, see ``read_config_file``); keyword arguments as in ``from_dict``."""
        flags, section, training_file = _read_config_file(path)
        try:
            return cls.from_section(section, **kwargs) if training_file else cls.from_dict(section, **kwargs)
        except S2ConfigError as err:
            raise S2ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_section(cls, section: Mapping, *, num_layers: Optional[int] = None, overrides: Iterable[str] = (),
                     **kwargs) -> "S2AttentionConfig":
        """A training config's ``s2:`` section: without one (and without overrides) every layer is dense,
        as in plain Megatron-LM; otherwise as ``from_dict``."""
        overrides = list(overrides)
        if not section and not overrides:
            if num_layers is None:
                raise S2ConfigError("a training config without an 's2:' section is all dense: pass num_layers=")
            return cls.dense(num_layers)
        return cls.from_dict(section, num_layers=num_layers, overrides=overrides, **kwargs)

    @classmethod
    def dense(cls, num_layers: int) -> "S2AttentionConfig":
        """Every layer dense (a plain Megatron model)."""
        return cls.from_dict({"layers": ["dense"] * num_layers})

    @classmethod
    def from_dict(
        cls,
        data: Mapping,
        *,
        num_layers: Optional[int] = None,
        num_attention_heads: Optional[int] = None,
        overrides: Iterable[str] = (),
    ) -> "S2AttentionConfig":
        """Resolve any accepted form to one setting per layer.

        ``num_layers`` is needed by ``dense_every_n`` and by configs without ``layers``; with
        ``layers`` given it is checked against their count. ``num_attention_heads`` is needed by the
        ``dkernel`` preset. ``overrides`` are command-line ``key=value`` strings (see
        ``apply_overrides``).
        """
        overrides = tuple(overrides)
        data = apply_overrides(_check_mapping(data, "<top level>"), overrides)
        with _naming_command_line_values(overrides):
            return cls._resolve(data, num_layers, num_attention_heads, overrides)

    @classmethod
    def _resolve(cls, data: Mapping, num_layers, num_attention_heads, overrides: tuple) -> "S2AttentionConfig":
        _check_keys(data, TOP_LEVEL_KEYS, "")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise _fail("version", version, "unsupported format version", f"use version: {FORMAT_VERSION}")
        base = dict(_check_mapping(data.get("defaults", {}), "defaults"))
        _check_keys(base, ("preset",) + PATTERN_KEYS, "defaults.")
        if "preset" in data:
            base.setdefault("preset", data["preset"])
        entries = _layer_entries(data, num_layers)
        _apply_layer_overrides(entries, data.get("overrides", []))
        _check_defaults_overrides_apply(overrides, entries)
        _check_window_entries(entries)
        # Precedence: defaults < the layer's own entry < overrides (already merged into the entry).
        # A window layer takes the S2 defaults (block_size, local_blocks, ...) without the stripes.
        no_stripes = {"vert_stride": 0}
        entries = [e if e["type"] == "dense" else {**base, **e, **(no_stripes if e["type"] == "window" else {})}
                   for e in entries]
        layers = tuple(
            LayerAttention(i, _build_pattern(entry, i, num_attention_heads)) for i, entry in enumerate(entries)
        )
        return cls(
            layers=layers,
            allow_partial_coverage=data.get("allow_partial_coverage", False),
            cp_exchange=data.get("cp_exchange", "s2"),
            cp_overlap=data.get("cp_overlap", "auto"),
            command_line=overrides,
        )

    def to_dict(self) -> dict:
        """The explicit, JSON-serializable form (stable; ``from_dict`` reads it back)."""
        return {
            "version": FORMAT_VERSION,
            "layers": [layer.to_dict() for layer in self.layers],
            "allow_partial_coverage": self.allow_partial_coverage,
            "cp_exchange": self.cp_exchange,
            "cp_overlap": "auto" if self.cp_overlap is None else self.cp_overlap,
        }

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sparse_layers(self) -> list:
        return [layer.index for layer in self.layers if not layer.is_dense]

    # -- validation against the model ----------------------------------------------------------

    def validate(
        self,
        *,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: Optional[int] = None,
        seq_length: Optional[int] = None,
        tensor_parallel_size: int = 1,
        context_parallel_size: int = 1,
    ) -> None:
        """Check this config against the model and parallel sizes; raise ``S2ConfigError`` naming the
        key, the value and the fix (and which values came from the command line). ``num_query_groups=None``
        means MHA."""
        with _naming_command_line_values(self.command_line):
            self._validate(num_layers, num_attention_heads, num_query_groups, seq_length, tensor_parallel_size,
                           context_parallel_size)

    def _validate(self, num_layers, num_attention_heads, num_query_groups, seq_length, tensor_parallel_size,
                  context_parallel_size) -> None:
        num_query_groups = num_attention_heads if num_query_groups is None else num_query_groups
        if num_layers != self.num_layers:
            raise _fail(
                "layers",
                f"{self.num_layers} layers",
                f"the model has {num_layers} layers (--num-layers)",
                f"give exactly one entry per layer (layers are numbered 0..{num_layers - 1})",
            )
        if num_attention_heads % num_query_groups:
            raise S2ConfigError(
                f"--num-attention-heads {num_attention_heads} is not a multiple of "
                f"--num-query-groups {num_query_groups}. Fix: choose query groups that divide the heads"
            )
        tp, cp = tensor_parallel_size, context_parallel_size
        if num_attention_heads % tp:
            raise S2ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                f"{num_attention_heads}. Fix: choose a TP size that divides the number of heads"
            )
        if num_query_groups % tp and tp % num_query_groups:
            raise S2ConfigError(
                f"--tensor-model-parallel-size {tp} and --num-query-groups {num_query_groups}: one must "
                f"divide the other (Megatron splits or replicates KV groups across TP ranks). Fix: "
                f"change one of them"
            )
        for layer in self.layers:
            if layer.is_dense:
                continue
            key, pattern = f"layers[{layer.index}]", layer.pattern
            if isinstance(pattern, BlockMaskPattern):
                if pattern.mask.shape[0] != num_attention_heads:
                    raise S2ConfigError(f"layer {layer.index}: the block mask has {pattern.mask.shape[0]} heads "
                                        f"but the model has {num_attention_heads}. Fix: one mask row per query head")
                continue  # an explicit mask is the user's coverage choice
            try:
                pattern.head_offsets(num_attention_heads, num_query_groups)
            except S2ConfigError as err:
                raise _fail(f"{key}.num_dense_heads", pattern.num_dense_heads, str(err),
                            f"use at most {num_attention_heads} dense heads") from None
            if cp > 1 and seq_length is not None:
                try:
                    validate_context_parallel(seq_length, cp, pattern.block_size)
                except S2ConfigError as err:  # its message already says how to fix it
                    raise S2ConfigError(f"S2 config key '{key}.block_size' = {pattern.block_size}: {err}") from None
            if not self.allow_partial_coverage:
                try:
                    pattern.check_coverage(num_attention_heads, num_query_groups, seq_length)
                except S2CoverageError as err:
                    raise S2CoverageError(f"S2 config layer {layer.index} (layers[{layer.index}]): {err}") from None

    def validate_for_megatron(self, transformer_config, seq_length: Optional[int] = None) -> None:
        """``validate`` with the sizes read from a Megatron ``TransformerConfig`` (duck-typed)."""
        self.validate(
            num_layers=transformer_config.num_layers,
            num_attention_heads=transformer_config.num_attention_heads,
            num_query_groups=transformer_config.num_query_groups,
            seq_length=seq_length,
            tensor_parallel_size=transformer_config.tensor_model_parallel_size,
            context_parallel_size=transformer_config.context_parallel_size,
        )

    # -- start-up log --------------------------------------------------------------------------

    def summary(self, seq_length: Optional[int] = None) -> str:
        """A short table, one row per run of identical consecutive layers, for start-up logs, followed by
        a notice for layers that do not cover the context (window-only)."""
        header = ("layers", "type", "block", "local", "stride", "heads", "step", "offset", "dense_h")
        rows = []
        for run in _runs(self.layers):
            p, kind = run[0].pattern, run[0].kind
            if kind == "dense":
                rows.append((_span(run), "dense") + ("-",) * 7)
            elif kind == "mask":
                rows.append((_span(run), "mask", str(p.block_size)) + ("-",) * 6)
            elif kind == "window":  # the stripe parameters do not apply
                rows.append((_span(run), "window", str(p.block_size), str(p.local_blocks)) + ("-",) * 4
                            + (str(p.num_dense_heads),))
            else:
                step = "auto" if p.head_sliding_step is None else str(p.head_sliding_step)
                rows.append((_span(run), "s2", str(p.block_size), str(p.local_blocks), str(p.vert_stride),
                             p.head_pattern, step, str(p.head_sliding_offset), str(p.num_dense_heads)))
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        kinds = [layer.kind for layer in self.layers]
        counts = ", ".join(f"{kinds.count(k)} {name}" for k, name in
                           (("s2", "S2"), ("window", "window"), ("mask", "block-mask"), ("dense", "dense"))
                           if k in kinds or k in ("s2", "dense"))
        lines = [
            f"S2 attention: {self.num_layers} layers ({counts}; numbered from 0), "
            f"cp_exchange={self.cp_exchange}, cp_overlap={'auto' if self.cp_overlap is None else self.cp_overlap}, "
            f"allow_partial_coverage={self.allow_partial_coverage}"
        ]
        if seq_length is not None:
            lines[0] += f", seq_length={seq_length}"
        for row in [header] + rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        return "\n".join(lines + self.coverage_notices(seq_length))

    def coverage_notices(self, seq_length: Optional[int] = None) -> list:
        """One line per run of layers that do not cover the context (window-only layers, which are
        allowed because they were asked for), and the model's reach when no layer covers it."""
        notices, blind = [], []
        for run in _runs(self.layers):
            p = run[0].pattern
            notice = p.coverage_notice(seq_length) if isinstance(p, S2Pattern) else None
            if notice:
                notices.append(f"NOTICE: layer{'s' if len(run) > 1 else ''} {_span(run)}: {notice}.")
                blind += [layer.pattern.window_tokens for layer in run]
        if blind and len(blind) == self.num_layers:
            reach = f"{len(blind)} layers x window = {sum(blind)} tokens"
            if seq_length is not None and sum(blind) >= seq_length:
                notices.append(f"NOTICE: no layer covers the context alone; through the stack ({reach}) "
                               f"the model can still reach all {seq_length} tokens.")
            else:
                notices.append(f"NOTICE: no layer covers the context: the model's receptive field is at most "
                               f"{reach}" + (f" of {seq_length}" if seq_length is not None else "") + ".")
        return notices


def _span(run: Sequence[LayerAttention]) -> str:
    first, last = run[0].index, run[-1].index
    return f"{first}" if first == last else f"{first}-{last}"


def read_config_file(path) -> tuple:
    """``(megatron flag defaults, S2 section)`` of a config file: the project's one YAML reader.

    A mapping with top-level ``megatron:`` and/or ``s2:`` keys is a training config (the form of
    ``configs/*.yaml``: ``pretrain_gpt_s2.py`` flags plus the S2 settings); any other is an S2 config
    alone.
    """
    flags, section, _ = _read_config_file(path)
    return flags, section


def _read_config_file(path) -> tuple:
    """``read_config_file`` plus whether the file is a training config."""
    import yaml

    if not os.path.isfile(path):
        raise S2ConfigError(f"{path}: no such file. Fix: give the path of a YAML file, e.g. "
                            "configs/quickstart.yaml")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise S2ConfigError(f"{path} is not valid YAML: {err}") from None
    try:
        data = _check_mapping(data, "<top level>")
        if "megatron" not in data and "s2" not in data:
            return {}, data, False
        unknown = sorted(set(data) - {"megatron", "s2"})
        if unknown:
            raise S2ConfigError(f"unknown top-level key(s) {unknown}. Fix: a file with a 'megatron:' section "
                                "holds only 'megatron:' and 's2:'")
        flags = data.get("megatron") or {}
        if not isinstance(flags, Mapping):
            raise S2ConfigError("'megatron:' must map flag names to values")
    except S2ConfigError as err:
        raise S2ConfigError(f"{path}: {err}") from None
    return dict(flags), data.get("s2") or {}, True


def load_s2_config(path, **kwargs) -> S2AttentionConfig:
    """Shorthand for ``S2AttentionConfig.from_yaml(path, **kwargs)``."""
    return S2AttentionConfig.from_yaml(path, **kwargs)


# -- command-line overrides --------------------------------------------------------------------


def parse_override(text: str) -> tuple:
    """``"vert_stride=8"`` -> ``(("defaults", "vert_stride"), 8)``.

    The key is a top-level key (``layers``, ``dense_every_n``, ``cp_exchange``, ...), an S2
    parameter (short for ``defaults.<name>``) or a dotted path (``defaults.block_size``). The value
    is read as YAML, so ``8``, ``true``, ``null`` and ``DSSD`` have their usual types.
    """
    import yaml

    if not isinstance(text, str) or "=" not in text:
        raise S2ConfigError(f"S2 override {text!r} is not of the form key=value (e.g. vert_stride=8)")
    key, raw = (part.strip() for part in text.split("=", 1))
    path = tuple(key.split("."))
    if len(path) == 1 and path[0] in PATTERN_KEYS:
        path = ("defaults", path[0])
    if path[0] not in TOP_LEVEL_KEYS or (path[0] == "defaults") != (len(path) == 2) or len(path) > 2:
        close = difflib.get_close_matches(path[-1], PATTERN_KEYS + TOP_LEVEL_KEYS, n=1)
        raise S2ConfigError(
            f"S2 override key {key!r} is not settable from the command line"
            f"{f' (did you mean {close[0]!r}?)' if close else ''}. Fix: use a top-level key "
            f"({', '.join(k for k in TOP_LEVEL_KEYS if k not in ('defaults', 'overrides', 'version'))}), "
            f"an S2 parameter ({', '.join(PATTERN_KEYS)}) or defaults.<parameter>; per-layer "
            f"overrides belong in the YAML file"
        )
    if path[0] in ("overrides", "version"):
        raise S2ConfigError(f"S2 override key {key!r}: set '{path[0]}' in the YAML file instead")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise S2ConfigError(f"S2 override {text!r}: the value is not valid YAML ({err})") from None
    return path, value


def apply_overrides(data: Mapping, overrides: Iterable[str]) -> dict:
    """A copy of ``data`` with each ``key=value`` override applied in order.

    Setting ``layers`` removes ``dense_every_n``/``dense_phase`` and vice versa, so an override can
    switch between the forms.
    """
    result = dict(data)
    if "defaults" in result and isinstance(result["defaults"], Mapping):
        result["defaults"] = dict(result["defaults"])
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "defaults":
            result.setdefault("defaults", {})
            result["defaults"] = {**_check_mapping(result["defaults"], "defaults"), path[1]: value}
            continue
        if path[0] == "layers":
            result.pop("dense_every_n", None)
            result.pop("dense_phase", None)
        elif path[0] in ("dense_every_n", "dense_phase"):
            result.pop("layers", None)
        result[path[0]] = value
    return result


# -- resolution helpers ------------------------------------------------------------------------


def _check_num_layers(num_layers, needed_by: str) -> int:
    if num_layers is None:
        raise S2ConfigError(
            f"S2 config: {needed_by} needs the model's layer count. Fix: pass num_layers= (from "
            f"--num-layers) or list the layers explicitly under 'layers'"
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise S2ConfigError(f"num_layers must be a positive integer, got {num_layers!r}")
    return num_layers


def _layer_entries(data: Mapping, num_layers: Optional[int]) -> list:
    """One dict per layer with at least ``type`` ('dense' or 's2') and any per-layer parameters."""
    has_every_n = "dense_every_n" in data or "dense_phase" in data
    if "layers" in data and has_every_n:
        raise _fail("dense_every_n", data.get("dense_every_n"), "given together with 'layers'",
                    "use either 'layers' or 'dense_every_n' (+ 'dense_phase')")
    if "layers" in data:
        entries = _explicit_entries(data["layers"])
        if num_layers is not None and len(entries) != num_layers:
            raise _fail("layers", data["layers"], f"has {len(entries)} entries but the model has "
                        f"{num_layers} layers (--num-layers)", "give exactly one entry per layer")
        return entries
    if not has_every_n:
        count = _check_num_layers(num_layers, "a config without 'layers' (all layers S2)")
        return [{"type": "s2"} for _ in range(count)]
    n = data.get("dense_every_n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _fail("dense_every_n", n, "must be a positive integer",
                    "e.g. dense_every_n: 2 makes every second layer dense")
    phase = data.get("dense_phase", 0)
    if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < n:
        raise _fail("dense_phase", phase, f"must be an integer in [0, {n - 1}]",
                    f"layer i is dense when i % {n} == dense_phase (layers numbered from 0); "
                    f"Phi-3-small's layout is dense_every_n: 2, dense_phase: 1")
    count = _check_num_layers(num_layers, "'dense_every_n'")
    return [{"type": "dense" if i % n == phase else "s2"} for i in range(count)]


def _explicit_entries(layers) -> list:
    if isinstance(layers, str):
        letters = [c for c in layers if c not in " |"]  # '|' as in Megatron's hybrid pattern
        for position, letter in enumerate(letters):
            if letter not in LAYER_LETTERS:
                raise _fail("layers", layers, f"letter {letter!r} at layer {position} (from 0) is "
                            "not 'D' (dense), 'S' (S2) or 'W' (window-only)",
                            "write one D, S or W per layer, e.g. DSSSSSSS")
        return [{"type": LAYER_LETTERS[c]} for c in letters]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise _fail("layers", layers, "expected a pattern string or a non-empty list",
                    "e.g. layers: DSSS, or layers: [dense, s2, {vert_stride: 8}]")
    entries = []
    for i, item in enumerate(layers):
        key = f"layers[{i}]"
        if isinstance(item, str):
            entry = {"type": _layer_type(item, key)}
        elif isinstance(item, Mapping):
            _check_keys(item, _LAYER_ENTRY_KEYS, f"{key}.")
            entry = dict(item)
            entry["type"] = _layer_type(item.get("type", "s2"), f"{key}.type")
            _reject_params_on_dense(entry, key)
        else:
            raise _fail(key, item, "expected 'dense', 's2', 'window' or a mapping of S2 parameters",
                        "e.g. - dense, or - {vert_stride: 8}")
        entries.append(entry)
    return entries


def _layer_type(value, key: str) -> str:
    kind = LAYER_TYPES.get(value.lower()) if isinstance(value, str) else None
    if kind is None:
        raise _fail(key, value, "unknown layer type", "use 'dense' (or D), 's2' (or S) or 'window' (or W)")
    return kind


def _reject_params_on_dense(entry: Mapping, key: str) -> None:
    if entry["type"] == "dense":
        params = [k for k in entry if k != "type"]
        if params:
            raise _fail(f"{key}.{params[0]}", entry[params[0]], "S2 parameters given for a dense layer",
                        "remove them, or make the layer S2 (type: s2)")


def _select_layers(selector, key: str, num_layers: int) -> list:
    """``3``, ``[1, 4]``, ``"4-7"`` (inclusive) or ``"all"`` -> layer indices (from 0)."""
    if selector == "all":
        return list(range(num_layers))
    if isinstance(selector, int) and not isinstance(selector, bool):
        indices = [selector]
    elif isinstance(selector, str) and selector.count("-") == 1:
        first, last = selector.split("-")
        try:
            indices = list(range(int(first), int(last) + 1))
        except ValueError:
            indices = []
        if not indices:
            raise _fail(key, selector, "not a range 'first-last' (inclusive, from 0)", "e.g. layers: 4-7")
    elif isinstance(selector, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in selector):
        indices = list(selector)
    else:
        raise _fail(key, selector, "not a layer selector",
                    "use a layer number, a list of them, a range '4-7' (inclusive) or 'all'; layers are numbered from 0")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise _fail(key, selector, f"layer {bad[0]} does not exist (the model has layers 0..{num_layers - 1}, "
                    "numbered from 0)", f"select layers in 0..{num_layers - 1}")
    return indices


def _apply_layer_overrides(entries: list, overrides) -> None:
    if not isinstance(overrides, (list, tuple)):
        raise _fail("overrides", overrides, "expected a list", "e.g. overrides: [{layers: 4-7, vert_stride: 8}]")
    for n, override in enumerate(overrides):
        key = f"overrides[{n}]"
        override = _check_mapping(override, key)
        _check_keys(override, _OVERRIDE_KEYS, f"{key}.")
        if "layers" not in override:
            raise _fail(f"{key}.layers", None, "missing", "say which layers it changes, e.g. layers: 4-7")
        params = {k: v for k, v in override.items() if k not in ("layers", "type")}
        kind = _layer_type(override["type"], f"{key}.type") if "type" in override else None
        for index in _select_layers(override["layers"], f"{key}.layers", len(entries)):
            entry = entries[index]
            if kind == "dense":
                if params:
                    raise _fail(f"{key}.type", "dense", "S2 parameters given with type: dense",
                                "split it into two overrides")
                entries[index] = {"type": "dense"}
                continue
            if kind is not None and kind != entry["type"]:
                # A dense layer made sparse gets the defaults like any other; s2 <-> window keeps the
                # layer's own parameters except the stripes.
                kept = {} if entry["type"] == "dense" else {k: v for k, v in entry.items() if k != "vert_stride"}
                entry = {**kept, "type": kind}
            if entry["type"] == "dense" and params:
                raise _fail(f"{key}.layers", override["layers"], f"sets S2 parameters on layer {index}, "
                            "which is dense", "exclude that layer, or add type: s2 to make it sparse")
            entries[index] = {**entry, **params}


def _check_defaults_overrides_apply(overrides: Iterable[str], entries: list) -> None:
    """A command-line override of an S2 parameter sets its default, which a layer's own value wins
    over: refuse one that no S2 layer would take (e.g. on the explicit per-layer form that checkpoints
    and Hugging Face configs store) instead of ignoring it."""
    sparse = [e for e in entries if e["type"] != "dense"]
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] != "defaults" or not sparse:
            continue
        takers = [e for e in sparse if path[1] not in e and not (e["type"] == "window" and path[1] == "vert_stride")]
        if not takers:
            windows = path[1] == "vert_stride" and any(e["type"] == "window" for e in sparse)
            raise S2ConfigError(
                f"S2 override {text!r} changes nothing: every S2 layer sets {path[1]} itself (an explicit "
                f"per-layer config){', and window layers have no stripes' if windows else ''}. Fix: set it "
                f"per layer in the YAML file, or give a config whose layers take {path[1]} from 'defaults'")


def _check_window_entries(entries: list) -> None:
    """A window layer has no stripes: a stripe stride given for it (entry or override) is a mistake."""
    for index, entry in enumerate(entries):
        if entry["type"] == "window" and entry.get("vert_stride", 0) != 0:
            raise _fail(f"layers[{index}].vert_stride", entry["vert_stride"],
                        "a window layer has no vertical stripes",
                        "drop vert_stride for that layer, or make it an S2 layer (type: s2 / letter S)")


@contextlib.contextmanager
def _naming_command_line_values(overrides: Sequence[str]):
    """Add to an S2ConfigError which of the keys it names were set by --s2-override, so that nobody
    looks for the value in the YAML file."""
    try:
        yield
    except S2ConfigError as err:
        message = str(err)
        named = [text for text in overrides
                 if re.search(rf"\b{re.escape(parse_override(text)[0][-1])}\b", message)]
        if not named:
            raise
        flags = " ".join(f"--s2-override {text}" for text in named)
        raise type(err)(f"{message} (Note: set on the command line, not in the file: {flags}.)") from None


def _build_pattern(entry: Mapping, index: int, num_attention_heads: Optional[int]) -> Optional[S2Pattern]:
    if entry["type"] == "dense":
        return None
    params = {k: v for k, v in entry.items() if k not in ("type", "preset")}
    preset = entry.get("preset")
    key = f"layers[{index}]"
    try:
        if preset is None:
            return S2Pattern(**params)
        if preset == "phi3_small":
            return S2Pattern.phi3_small(**params)
        if preset == "dkernel":
            if num_attention_heads is None:
                raise _fail(f"{key}.preset", preset, "the dkernel preset derives head_sliding_step from "
                            "the number of query heads", "pass num_attention_heads= when loading the config")
            return S2Pattern.dkernel(num_attention_heads, **params)
    except S2ConfigError as err:
        if str(err).startswith("S2 config key"):
            raise
        raise S2ConfigError(f"S2 config layer {index} ({key}, after defaults and overrides): {err}. "
                            "Fix: change that parameter in 'defaults', the layer entry or 'overrides'") from None
    raise _fail(f"{key}.preset", preset, "unknown preset", f"use one of {', '.join(PRESETS)}")


def _runs(layers: Sequence[LayerAttention]) -> list:
    runs = []
    for layer in layers:
        if runs and runs[-1][-1].pattern == layer.pattern:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs
