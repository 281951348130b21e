"""include= naming a block (a module whose ops all run in its submodules: BERT's "encoder.layer.0"): patterns
select a layer by its own name, so the block selects none of its layers, and every pass that takes include says
so in "skipped" with the layers under it and the glob that selects them, instead of "matches no module"."""
import pytest
import torch

import slimfx
from slimfx import ir
from slimfx.passes import LowerSparse, PassContext, Prune, Quantize


@pytest.fixture(scope="module")
def tiny_bert():
    """A one-layer random BERT captured at (2, 8): layers named "encoder.layer.0.attention.self.query" and so on."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64)).eval()
    kw = dict(input_ids=torch.randint(0, 50, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long))
    return slimfx.capture(bert, (), kw)


def _run(cap, p):
    return p(ir.fork(cap.graph), PassContext(cap.captured.example_args, cap.captured.example_kwargs))


SELF = ("['encoder.layer.0.attention.self'] match modules but none of their layers (a pattern selects a layer by its "
        "own name): the layers under them are ['encoder.layer.0.attention.self.key', "
        "'encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']; "
        "'encoder.layer.0.attention.self.*' selects them")


@pytest.mark.parametrize("p", [Quantize(include="encoder.layer.0.attention.self"),
                               Prune(sparsity=0.5, include="encoder.layer.0.attention.self", score="magnitude"),
                               Prune(sparsity=0.5, pattern="neurons", include="encoder.layer.0.attention.self"),
                               LowerSparse(include="encoder.layer.0.attention.self")],
                         ids=["Quantize", "Prune", "Prune-neurons", "LowerSparse"])
def test_a_block_name_names_the_layers_under_it(tiny_bert, p):
    res = _run(tiny_bert, p)
    assert not res.modified
    assert res.stats["skipped"]["include"] == SELF


@pytest.mark.parametrize("p", [Quantize(include=("*.query", "encoder.layer.0")),
                               Prune(sparsity=0.5, include=("*.query", "encoder.layer.0"), score="magnitude")],
                         ids=["Quantize", "Prune"])
def test_a_block_beside_a_pattern_that_selects_is_named(tiny_bert, p):
    """The block's pattern is named even when another selects layers; more than four layers under it end in '...'."""
    res = _run(tiny_bert, p)
    assert res.modified
    assert res.stats["skipped"]["include"].startswith(
        "['encoder.layer.0'] match modules but none of their layers (a pattern selects a layer by its own name): "
        "the layers under them are ['encoder.layer.0.attention.output.dense', ")
    assert res.stats["skipped"]["include"].endswith("] ...; 'encoder.layer.0.*' selects them")


def test_the_glob_it_suggests_selects_the_layers(tiny_bert):
    res = _run(tiny_bert, Quantize(include="encoder.layer.0.attention.self.*"))
    assert res.stats["layers"] == 3 and "include" not in res.stats["skipped"]
    res = _run(tiny_bert, Prune(sparsity=0.5, include="encoder.layer.0.intermediate.*", score="magnitude"))
    assert res.modified and "include" not in res.stats["skipped"]


def test_a_structured_group_selected_by_its_block_name_is_not_reported(tiny_bert):
    """Prune(pattern="heads") selects an attention block by its own name ("encoder.layer.0.attention"): that is
    a selection, not a block name selecting nothing."""
    res = _run(tiny_bert, Prune(sparsity=0.5, pattern="heads", include="encoder.layer.0.attention"))
    assert res.stats["shrunk"] == {"encoder.layer.0.attention": "4 -> 2 kv heads"}
    assert res.stats["skipped"] == {}


def test_a_name_of_no_module_still_says_so(tiny_bert):
    res = _run(tiny_bert, Prune(sparsity=0.5, include="layer.0", score="magnitude"))
    assert "['layer.0'] matches no module of the graph (its names look like " in res.stats["skipped"]["include"]
