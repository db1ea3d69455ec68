"""tools/plot_layout.py draws a PNG and counts the causal block pairs no head reads; uncovered pairs are
white, ticks are integers, and it draws the layer of a training config or a preset."""

import importlib.util
import pathlib

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest

from megatron_s2 import S2Pattern

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "plot_layout.py"
spec = importlib.util.spec_from_file_location("plot_layout", TOOL)
plot_layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_layout)


def test_plot_reports_lost_coverage(tmp_path):
    out = tmp_path / "layout.png"
    # kv_group with 2 KV heads and stride 4: offsets 0 and 2 read residues 0 and 2 only.
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=4, head_pattern="kv_group")
    missing = plot_layout.plot_layout(pattern, 4, 2, 16 * 12, 2, str(out))
    # Causal pairs beyond the diagonal whose key block has an odd residue, counted directly.
    expected = sum(1 for qb in range(12) for kb in range(qb) if kb % 4 in (1, 3))
    assert missing == expected
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)
    assert plot_layout.plot_layout(full, 4, 2, 16 * 12, 2, str(out)) == 0


def _union_colours(fig):
    """RGBA of every cell of the union panel (the last image axis), as drawn."""
    image = [ax for ax in fig.axes if ax.images][-1].images[0]
    return image.to_rgba(image.get_array())


def test_window_layer_union_is_white_where_no_head_reads():
    blocks, local = 10, 3
    fig, missing = plot_layout.draw_layout(S2Pattern.window(block_size=16, local_blocks=local), 3, 3,
                                           16 * blocks, 2)
    try:
        colours = _union_colours(fig)
        fig.canvas.draw()
        ticks = [ax.get_xticks() for ax in fig.axes] + [ax.get_yticks() for ax in fig.axes]
    finally:
        plt.close(fig)
    white = np.array(matplotlib.colors.to_rgba("white"))
    grey = np.array(matplotlib.colors.to_rgba(plot_layout.NON_CAUSAL_COLOUR))
    for qb in range(blocks):
        for kb in range(blocks):
            if kb > qb:
                assert np.allclose(colours[qb, kb], grey), (qb, kb)  # not causal
            elif qb - kb >= local:
                assert np.allclose(colours[qb, kb], white), (qb, kb)  # causal, read by no head
            else:  # read by all 3 heads: a colour of the map, neither white nor grey
                assert not np.allclose(colours[qb, kb], white) and not np.allclose(colours[qb, kb], grey)
    assert missing == sum(max(0, qb - local + 1) for qb in range(blocks))
    # Block indices and head counts are whole numbers (the colour bar is one of the axes).
    for values in ticks:
        assert np.allclose(values, np.round(values)), values


def test_help_example_keeps_its_line_continuation():
    assert "--num-kv-heads 8 \\\n        --local-blocks 16" in plot_layout.__doc__


CONFIG = """\
megatron:
  num-layers: 3
  num-attention-heads: 4
  group-query-attention: true
  num_query_groups: 2
  seq-length: 256
s2:
  layers: DWS
  defaults: {block_size: 16, local_blocks: 2, vert_stride: 4, head_pattern: kv_group}
  allow_partial_coverage: true
"""


def test_config_layer_is_the_layer_training_uses(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(CONFIG)
    pattern, heads, kv_heads, seq_len = plot_layout.layer_from_config(str(path), 1)
    assert pattern == S2Pattern.window(block_size=16, local_blocks=2, head_pattern="kv_group")
    assert (heads, kv_heads, seq_len) == (4, 2, 256)
    assert plot_layout.layer_from_config(str(path), 0)[0] is None  # dense
    assert plot_layout.layer_from_config(str(path), 2, num_heads=8, seq_len=512)[1:] == (8, 2, 512)
    out = tmp_path / "layer1.png"
    plot_layout.main(["--config", str(path), "--layer", "1", "--out", str(out)])
    # 16 blocks, window of 2: every causal pair two or more blocks back is unread.
    assert f"{sum(max(0, qb - 1) for qb in range(16))} causal block pairs read by no head" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="layers 0..2"):
        plot_layout.main(["--config", str(path), "--layer", "3", "--out", str(out)])


@pytest.mark.parametrize("argv", [["--layer", "1"], ["--config", "x.yaml"],
                                  ["--config", "x.yaml", "--layer", "0", "--vert-stride", "8"],
                                  ["--config", "x.yaml", "--layer", "0", "--preset", "window"]])
def test_option_mistakes_are_refused(argv):
    with pytest.raises(SystemExit):
        plot_layout.parse_args(argv)


def test_presets_with_command_line_changes():
    none = dict.fromkeys(plot_layout.PATTERN_OPTIONS)
    assert plot_layout.pattern_from_options("phi3_small", 8, **none) == S2Pattern.phi3_small()
    assert plot_layout.pattern_from_options("dkernel", 8, **{**none, "vert_stride": 32}) == \
        S2Pattern.dkernel(8, vert_stride=32)
    assert plot_layout.pattern_from_options("window", 8, **{**none, "local_blocks": 4}) == \
        S2Pattern.window(local_blocks=4)
    assert plot_layout.pattern_from_options(None, 8, **none) == S2Pattern()
