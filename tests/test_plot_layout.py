"""tools/plot_layout.py draws a PNG and counts the causal block pairs no head reads."""

import importlib.util
import pathlib

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
