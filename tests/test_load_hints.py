"""Load starts a symbol whose example size was 0 or 1 from 2 (transformers 5.17's batched rotary matmul guards a
batch of 1 and made the dim static on load), and keeps the example's size for what reads it: the note on dims
that were equal in the example, and a second save."""
import json

import torch

import slimfx


class _Two(torch.nn.Module):
    def forward(self, a, b):
        return a.sum(0) + b.sum(0)


def test_a_loaded_batch_one_symbol_keeps_its_example_size(tmp_path):
    a, b = torch.randn(1, 4), torch.randn(2, 4)
    cm = slimfx.compile(_Two().eval(), (a, b), dynamic=True, backend="torch", progress=False)
    args = (torch.randn(3, 4), torch.randn(5, 4))
    assert cm._signature.diverged(args, {}) is None
    slimfx.save(cm, tmp_path / "m")
    loaded = slimfx.load(tmp_path / "m")
    assert loaded._signature.diverged(args, {}) is None          # 'a' was 1, 'b' 2: never equal
    assert torch.allclose(loaded(*args), _Two()(*args))
    slimfx.save(loaded, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "slimfx.json").read_text())
    hints = sorted(s["hint"] for s in saved["graph"]["symbols"].values())
    assert 1 in hints and 2 in hints, hints
