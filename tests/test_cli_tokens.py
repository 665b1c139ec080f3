"""``docev tokens``: one JSON line per size, the same numbers as the geometry module."""

import json

import pytest

from docev.cli import main
from docev.vision.geometry import num_image_tokens, plan_tiles
from tests.conftest import CONFIGS


def test_tokens_prints_one_line_per_size(capsys):
    sizes = [(1, 1), (3508, 2480), (100, 7000)]
    args = ["tokens", "--config", str(CONFIGS / "docev_preview.yaml")]
    for h, w in sizes:
        args += ["--size", f"{h}x{w}"]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(sizes)
    for (h, w), line in zip(sizes, lines, strict=True):
        plan = plan_tiles(h, w, 560, 1, 9)
        assert line == {
            "height": h, "width": w, "canvas": list(plan.canvas), "grid": list(plan.grid), "tiles": plan.num_tiles,
            "tokens": {str(r): num_image_tokens(h, w, r, tile_size=560, patch_size=14) for r in (2, 3)},
        }  # fmt: skip
    assert lines[0]["tokens"] == {"2": 400 + 20 * 21, "3": 169 + 13 * 14} and lines[0]["tiles"] == 2


def test_tokens_follows_overrides_and_rejects_bad_sizes(capsys):
    args = ["tokens", "--config", str(CONFIGS / "tiny.yaml"), "--size", "112x112", "tokenizer.sampling_ratio=[4]"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == {"4": 2 * 2 + 2 * (2 + 1)}  # 8x8 pooled by 4: 2x2
    with pytest.raises(SystemExit) as exc:
        main(["tokens", "--config", str(CONFIGS / "tiny.yaml"), "--size", "12by3"])
    assert exc.value.code == 2 and "expected HEIGHTxWIDTH" in capsys.readouterr().err
