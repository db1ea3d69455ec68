"""S2 YAML config: every accepted form resolves to the intended layers, and every mistake is an
early error naming the key, the value and the fix."""

import dataclasses
import json

import pytest

from megatron_s2.core.config import S2AttentionConfig, apply_overrides, load_s2_config, parse_override
from megatron_s2.ops.pattern import S2ConfigError, S2CoverageError, S2Pattern

SMALL = {"block_size": 16, "local_blocks": 2, "vert_stride": 4}


def kinds(cfg):
    return "".join("D" if layer.is_dense else "S" for layer in cfg.layers)


def resolve(data, **kw):
    return S2AttentionConfig.from_dict(data, **kw)


# -- forms ----------------------------------------------------------------------------------------


def test_pattern_string_list_and_dense_every_n_agree():
    by_string = resolve({"layers": "DSSD", "defaults": SMALL})
    by_list = resolve({"layers": ["dense", "s2", "S", {"type": "dense"}], "defaults": SMALL})
    by_every_n = resolve({"dense_every_n": 3, "dense_phase": 0, "defaults": SMALL}, num_layers=4)
    assert kinds(by_string) == kinds(by_list) == kinds(by_every_n) == "DSSD"
    assert by_string == by_list == by_every_n
    assert by_string.layers[1].pattern == S2Pattern(**SMALL)
    # Phi-3-small's layout: every second layer dense, starting at layer 1 (layers from 0).
    assert kinds(resolve({"dense_every_n": 2, "dense_phase": 1}, num_layers=6)) == "SDSDSD"
    # No layer form: all S2.
    assert kinds(resolve({}, num_layers=3)) == "SSS"
    # Megatron's hybrid pattern style allows '|' separators between pipeline stages.
    assert kinds(resolve({"layers": "DS|SS"})) == "DSSS"


def test_precedence_defaults_entry_overrides_and_presets():
    cfg = resolve(
        {
            "preset": "phi3_small",
            "defaults": {"block_size": 16, "local_blocks": 4},
            "layers": ["s2", {"vert_stride": 2}, "dense", "s2", "s2"],
            "overrides": [
                {"layers": "3-4", "local_blocks": 1},
                {"layers": [4], "head_pattern": "homogeneous"},
                {"layers": 2, "type": "s2", "num_dense_heads": 1},
                {"layers": 0, "type": "dense"},
            ],
        }
    )
    phi3 = S2Pattern.phi3_small(block_size=16, local_blocks=4)
    assert cfg.layers[0].is_dense
    assert cfg.layers[1].pattern == dataclasses.replace(phi3, vert_stride=2)
    assert cfg.layers[2].pattern == dataclasses.replace(phi3, num_dense_heads=1)
    assert cfg.layers[3].pattern == dataclasses.replace(phi3, local_blocks=1)
    assert cfg.layers[4].pattern == dataclasses.replace(phi3, local_blocks=1, head_pattern="homogeneous")
    # The dkernel preset derives the stripe step from the query heads (and a per-layer stride).
    dk = resolve({"preset": "dkernel", "layers": "SS", "overrides": [{"layers": 1, "vert_stride": 64}]},
                 num_attention_heads=16)
    assert dk.layers[0].pattern == S2Pattern.dkernel(16)
    assert dk.layers[1].pattern == S2Pattern.dkernel(16, vert_stride=64)
    assert dk.layers[1].pattern.head_sliding_step == 4


def test_round_trip_is_explicit_json_and_needs_no_model():
    cfg = resolve({"preset": "dkernel", "dense_every_n": 2, "cp_exchange": "allgather", "cp_overlap": False,
                   "allow_partial_coverage": True}, num_layers=4, num_attention_heads=8)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["version"] == 1 and data["cp_exchange"] == "allgather" and data["cp_overlap"] is False
    assert data["allow_partial_coverage"] is True
    assert data["layers"][0] == {"type": "dense"}
    assert set(data["layers"][1]) == {"type"} | {f.name for f in dataclasses.fields(S2Pattern)}
    assert S2AttentionConfig.from_dict(data) == cfg


def test_training_file_without_s2_section_is_dense_for_every_reader(tmp_path):
    """pretrain_gpt_s2.py (from_section) and the converters (from_yaml) read one file alike."""
    path = tmp_path / "train.yaml"
    path.write_text("megatron: {num-layers: 3}\n")
    assert kinds(S2AttentionConfig.from_yaml(path, num_layers=3)) == "DDD"
    assert kinds(S2AttentionConfig.from_section({}, num_layers=3)) == "DDD"
    # Overrides alone apply to S2 on every layer, for both.
    assert kinds(S2AttentionConfig.from_yaml(path, num_layers=3, overrides=["vert_stride=2"])) == "SSS"
    with pytest.raises(S2ConfigError, match="num_layers="):
        S2AttentionConfig.from_yaml(path)


def test_yaml_file_and_command_line_overrides(tmp_path):
    path = tmp_path / "s2.yaml"
    path.write_text("defaults: {block_size: 16, vert_stride: 4}\nlayers: DSSS\n")
    assert (load_s2_config(path).cp_exchange, load_s2_config(path).cp_overlap) == ("s2", None)  # defaults
    cfg = load_s2_config(path, overrides=["vert_stride=2", "defaults.local_blocks=3", "cp_exchange=allgather",
                                          "cp_overlap=true"])
    assert cfg.layers[1].pattern == S2Pattern(block_size=16, vert_stride=2, local_blocks=3)
    assert (cfg.cp_exchange, cfg.cp_overlap) == ("allgather", True)
    assert load_s2_config(path, overrides=["cp_overlap=auto"]).to_dict()["cp_overlap"] == "auto"
    # Switching forms from the command line replaces the other form.
    assert kinds(load_s2_config(path, overrides=["dense_every_n=2"], num_layers=4)) == "DSDS"
    assert kinds(load_s2_config(path, overrides=["layers=SSSD"])) == "SSSD"
    assert parse_override("allow_partial_coverage=true") == (("allow_partial_coverage",), True)
    assert parse_override("head_sliding_step=null") == (("defaults", "head_sliding_step"), None)
    assert apply_overrides({"layers": "DS"}, ["dense_every_n=2"]) == {"dense_every_n": 2}


def test_summary_lists_every_layer_once():
    cfg = resolve({"layers": "DSSSD", "defaults": SMALL, "overrides": [{"layers": 3, "vert_stride": 2}]})
    text = cfg.summary(seq_length=1024)
    assert "5 layers (3 S2, 2 dense; numbered from 0)" in text
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "1-2", "3", "4"]
    assert rows[2][4] == "2" and rows[1][4] == "4"


def test_validate_accepts_a_good_model():
    cfg = resolve({"layers": "DSSS", "defaults": SMALL})
    cfg.validate(num_layers=4, num_attention_heads=8, num_query_groups=2, seq_length=256,
                 tensor_parallel_size=2, context_parallel_size=2)
    # Fewer KV groups than TP ranks is allowed (Megatron replicates them).
    cfg.validate(num_layers=4, num_attention_heads=8, num_query_groups=1, tensor_parallel_size=4)


# -- errors ---------------------------------------------------------------------------------------

RESOLVE_ERRORS = [
    ({"layerz": "DS"}, "'layerz'", "did you mean 'layers'"),
    ({"layers": "DXS"}, "'layers'", "letter 'X' at layer 1"),
    ({"layers": ["dense", "sparse2"]}, "'layers[1]'", "use 'dense'"),
    ({"layers": [{"type": "dense", "vert_stride": 4}]}, "'layers[0].vert_stride'", "make the layer S2"),
    ({"layers": [{"vert_strid": 4}]}, "'layers[0].vert_strid'", "did you mean 'vert_stride'"),
    ({"layers": []}, "'layers'", "non-empty"),
    ({"layers": "DS", "dense_every_n": 2}, "'dense_every_n'", "either 'layers' or 'dense_every_n'"),
    ({"dense_every_n": 0}, "'dense_every_n'", "positive integer"),
    ({"dense_every_n": 2, "dense_phase": 2}, "'dense_phase'", "[0, 1]"),
    ({"layers": "DSS", "overrides": [{"layers": 3, "vert_stride": 2}]}, "'overrides[0].layers'", "numbered from 0"),
    ({"layers": "DSS", "overrides": [{"layers": "2-1", "vert_stride": 2}]}, "'overrides[0].layers'", "inclusive"),
    ({"layers": "DSS", "overrides": [{"layers": 0, "vert_stride": 2}]}, "'overrides[0].layers'", "add type: s2"),
    ({"layers": "DSS", "overrides": [{"vert_stride": 2}]}, "'overrides[0].layers'", "say which layers"),
    ({"layers": "DSS", "overrides": {"layers": 1}}, "'overrides'", "expected a list"),
    ({"layers": "DSS", "overrides": [{"layers": 1, "type": "dense", "vert_stride": 2}]}, "'overrides[0].type'", "two overrides"),
    ({"layers": "SS", "defaults": {"block_size": 48}}, "layer 0 (layers[0]", "power of two"),
    ({"layers": "SS", "defaults": {"vert_stride": -1}}, "layer 0 (layers[0]", "vert_stride"),
    ({"layers": "SS", "defaults": {"head_pattern": "per_head"}}, "layer 0", "heterogeneous"),
    ({"layers": "SS", "preset": "longformer"}, "'layers[0].preset'", "dkernel, phi3_small"),
    ({"layers": "SS", "preset": "dkernel"}, "'layers[0].preset'", "num_attention_heads="),
    ({"layers": "SS", "cp_exchange": "ring"}, "'cp_exchange'", "allgather, s2"),
    ({"layers": "SS", "cp_overlap": "yes"}, "'cp_overlap'", "auto"),
    ({"layers": "SS", "cp_overlap": 1}, "'cp_overlap'", "auto"),
    ({"layers": "SS", "allow_partial_coverage": "yes"}, "'allow_partial_coverage'", "true or false"),
    ({"layers": "SS", "version": 2}, "'version'", "version: 1"),
    ({"dense_every_n": 2}, "layer count", "num_layers="),
    ({"layers": "SS", "defaults": [1, 2]}, "'defaults'", "mapping"),
]


@pytest.mark.parametrize("data,key,fix", RESOLVE_ERRORS, ids=[e[1] + "|" + e[2] for e in RESOLVE_ERRORS])
def test_resolve_errors_name_key_and_fix(data, key, fix):
    with pytest.raises(S2ConfigError) as info:
        resolve(data)
    assert key in str(info.value) and fix in str(info.value)


def test_layer_count_mismatch_at_resolve():
    with pytest.raises(S2ConfigError, match="has 3 entries but the model has 4 layers"):
        resolve({"layers": "DSS"}, num_layers=4)


VALIDATE_ERRORS = [
    (dict(num_layers=5), "'layers'", "numbered 0..4"),
    (dict(num_attention_heads=6, num_query_groups=4), "--num-query-groups 4", "divide the heads"),
    (dict(tensor_parallel_size=3), "--tensor-model-parallel-size 3", "divides the number of heads"),
    (dict(num_query_groups=4, num_attention_heads=12, tensor_parallel_size=6), "--num-query-groups 4", "one of them"),
    (dict(context_parallel_size=4, seq_length=192), "'layers[1].block_size'", "2 * 4 * 16 = 128"),
    (dict(num_attention_heads=2, num_query_groups=2, seq_length=1024), "layer 1", "allow_partial_coverage"),
]


@pytest.mark.parametrize("overrides,key,fix", VALIDATE_ERRORS, ids=[e[1] for e in VALIDATE_ERRORS])
def test_validate_errors_name_key_and_fix(overrides, key, fix):
    cfg = resolve({"layers": "DSSS", "defaults": SMALL})
    model = dict(num_layers=4, num_attention_heads=8, num_query_groups=2, seq_length=256)
    model.update(overrides)
    with pytest.raises(S2ConfigError) as info:
        cfg.validate(**model)
    assert key in str(info.value) and fix in str(info.value)


def test_coverage_error_and_opt_out():
    data = {"layers": "SS", "defaults": {**SMALL, "head_pattern": "kv_group"}}
    model = dict(num_layers=2, num_attention_heads=8, num_query_groups=2, seq_length=1024)
    with pytest.raises(S2CoverageError, match=r"kb % 4 in \[1, 3\]"):
        resolve(data).validate(**model)
    resolve({**data, "allow_partial_coverage": True}).validate(**model)
    # A sequence inside the local window is always covered.
    resolve(data).validate(**{**model, "seq_length": 32})


def test_dense_heads_beyond_head_count():
    cfg = resolve({"layers": "S", "defaults": {**SMALL, "num_dense_heads": 9}})
    with pytest.raises(S2ConfigError, match="'layers\\[0\\].num_dense_heads' = 9"):
        cfg.validate(num_layers=1, num_attention_heads=8)


@pytest.mark.parametrize("text,fix", [
    ("vert_stride", "key=value"),
    ("overrides=[]", "YAML file"),
    ("foo=1", "not settable"),
    ("defaults.a.b=1", "not settable"),
    ("vert_stride=[1", "not valid YAML"),
])
def test_bad_command_line_overrides(text, fix):
    with pytest.raises(S2ConfigError, match=fix):
        parse_override(text)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layers: DQ\n")
    with pytest.raises(S2ConfigError, match="bad.yaml"):
        load_s2_config(path)


def test_explicit_block_mask_layers():
    import torch

    from megatron_s2.core.config import LayerAttention
    from megatron_s2.ops.pattern import BlockMaskPattern

    mask = BlockMaskPattern(torch.eye(4, dtype=torch.bool)[None].expand(2, 4, 4).clone(), block_size=16)
    cfg = S2AttentionConfig(layers=(LayerAttention(0, None), LayerAttention(1, mask)))
    cfg.validate(num_layers=2, num_attention_heads=2)
    assert cfg.summary().splitlines()[-1].split()[:3] == ["1", "mask", "16"]
    with pytest.raises(S2ConfigError, match="block mask has 2 heads"):
        cfg.validate(num_layers=2, num_attention_heads=4)
    with pytest.raises(S2ConfigError, match="no YAML/dict form"):
        cfg.to_dict()


# -- window-only layers (the sliding-window control) ----------------------------------------------


def test_window_layers_from_letters_list_entries_and_overrides():
    window = S2Pattern.window(block_size=16, local_blocks=2)
    by_letters = resolve({"layers": "DSWW", "defaults": SMALL})
    assert [layer.kind for layer in by_letters.layers] == ["dense", "s2", "window", "window"]
    assert by_letters.layers[2].pattern == window == dataclasses.replace(S2Pattern(**SMALL), vert_stride=0)
    by_list = resolve({"layers": ["D", "s2", "window", {"type": "W", "local_blocks": 2}], "defaults": SMALL})
    assert by_list == by_letters
    # Per-layer overrides: type window, or vert_stride 0 on an S2 layer, make a layer window-only.
    by_overrides = resolve({"layers": "DSSS", "defaults": SMALL,
                            "overrides": [{"layers": 2, "type": "window"}, {"layers": 3, "vert_stride": 0}]})
    assert by_overrides == by_letters
    # ... and type s2 gives a window layer its stripes back (from the defaults).
    assert resolve({"layers": "W", "defaults": SMALL,
                    "overrides": [{"layers": 0, "type": "s2"}]}).layers[0].pattern == S2Pattern(**SMALL)
    # The explicit form stores the window layers and reads them back.
    stored = json.loads(json.dumps(by_letters.to_dict()))
    assert stored["layers"][2]["type"] == "window" and stored["layers"][2]["vert_stride"] == 0
    assert S2AttentionConfig.from_dict(stored) == by_letters


def test_window_and_s2_models_differ_only_in_the_stripes():
    defaults = {"block_size": 64, "local_blocks": 8, "vert_stride": 8, "num_dense_heads": 0}
    windows = resolve({"layers": "WWWWWWWW", "defaults": defaults})
    sparse = resolve({"layers": "SSSSSSSS", "defaults": defaults})
    for w, s in zip(windows.layers, sparse.layers):
        assert w.pattern == dataclasses.replace(s.pattern, vert_stride=0)


@pytest.mark.parametrize("data,overrides,key,fix", [
    ({"layers": [{"type": "window", "vert_stride": 4}]}, [], "layers[0].vert_stride", "type: s2"),
    ({"layers": "W", "overrides": [{"layers": 0, "vert_stride": 8}]}, [], "layers[0].vert_stride", "type: s2"),
    ({"layers": "SWX"}, [], "'layers'", "one D, S or W per layer"),
    ({"layers": "WW"}, ["vert_stride=8"], "changes nothing", "window layers have no stripes"),
])
def test_window_mistakes_are_named(data, overrides, key, fix):
    with pytest.raises(S2ConfigError) as info:
        resolve({**data, "defaults": SMALL}, overrides=overrides)
    assert key in str(info.value) and fix in str(info.value)


def test_window_layers_pass_validation_and_the_summary_says_what_they_miss():
    cfg = resolve({"layers": "WWWW", "defaults": SMALL})
    cfg.validate(num_layers=4, num_attention_heads=8, num_query_groups=2, seq_length=1024,
                 context_parallel_size=2)
    text = cfg.summary(seq_length=1024)
    assert "4 layers (0 S2, 4 window, 0 dense" in text
    assert "layers 0-3: window-only: each query reads only the last 32 tokens" in text
    assert "the model's receptive field is at most 4 layers x window = 128 tokens of 1024" in text
    # With S2 layers beside them, the model covers the context; the window layers are still named.
    hybrid = resolve({"layers": "SWWS", "defaults": SMALL}).summary(seq_length=1024)
    assert "layers 1-2: window-only" in hybrid and "receptive field" not in hybrid
    assert "through the stack (4 layers x window = 128 tokens) the model can still reach all 128" in \
        cfg.summary(seq_length=128)
    # A context inside the window is covered: nothing to report.
    assert "NOTICE" not in cfg.summary(seq_length=32)


# -- errors say which values came from the command line (issue 14) --------------------------------


def test_errors_name_values_set_on_the_command_line(tmp_path):
    path = tmp_path / "s2.yaml"
    path.write_text("defaults: {block_size: 16, local_blocks: 2, vert_stride: 4}\nlayers: SS\n")
    model = dict(num_layers=2, num_attention_heads=8, num_query_groups=2, seq_length=1024)
    load_s2_config(path).validate(**model)
    with pytest.raises(S2CoverageError) as info:
        load_s2_config(path, overrides=["vert_stride=32", "cp_exchange=allgather"]).validate(**model)
    assert "command line" in str(info.value) and "--s2-override vert_stride=32" in str(info.value)
    assert "cp_exchange" not in str(info.value)  # not involved
    with pytest.raises(S2ConfigError, match="command line.*--s2-override block_size=100"):
        load_s2_config(path, overrides=["block_size=100"])
    # Values from the file are not blamed on the command line.
    path.write_text("defaults: {block_size: 100}\nlayers: SS\n")
    with pytest.raises(S2ConfigError) as info:
        load_s2_config(path, overrides=["local_blocks=2"])
    assert "command line" not in str(info.value)


def test_resuming_with_window_layers_names_the_change():
    from megatron_s2.training.checkpoint_layout import describe_differences

    saved = resolve({"layers": "SS", "defaults": SMALL}).to_dict()
    lines = describe_differences(saved, resolve({"layers": "SW", "defaults": SMALL}).to_dict())
    assert len(lines) == 1 and lines[0].startswith("layer 1: s2 (") and " -> window (" in lines[0]
    assert "vert_stride=0" in lines[0]
