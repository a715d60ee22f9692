"""Block-weight text parsing and module -> block mapping (pure, no ComfyUI)."""
import pytest

from hadakron.block_weights import (
    BlockWeightsError, anima_block_id, block_id, parse_block_weights, sdxl_block_id,
)


def test_empty_text_is_identity():
    bw = parse_block_weights("", "sdxl")
    assert bw.is_identity()
    assert bw.strength("IN04") == 1.0 and bw.strength("TE1") == 1.0 and bw.strength("OTHER") == 1.0
    assert parse_block_weights(None, "anima").strength("blocks.3") == 1.0


def test_sdxl_module_block_ids():
    assert sdxl_block_id("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q") == "IN04"
    assert sdxl_block_id("unet", "input_blocks.0.0") == "IN00"
    assert sdxl_block_id("unet", "middle_block.1.proj_in") == "M00"
    assert sdxl_block_id("unet", "output_blocks.8.0.skip_connection") == "OUT08"
    assert sdxl_block_id("unet", "time_embed.0") == "OTHER"
    assert sdxl_block_id("te1", "text_model.encoder.layers.0.mlp.fc1") == "TE1"
    assert sdxl_block_id("te2", "text_model.encoder.layers.3.self_attn.q_proj") == "TE2"


def test_anima_module_block_ids():
    assert anima_block_id("unet", "blocks.13.self_attn.q_proj") == "blocks.13"
    assert anima_block_id("unet", "llm_adapter.blocks.0.cross_attn.q_proj") == "llm_adapter"
    assert anima_block_id("unet", "t_embedder.1.linear_1") == "OTHER"
    assert anima_block_id("te", "layers.0.mlp.up_proj") == "te"
    assert block_id("anima", "unet", "blocks.2.mlp.layer1") == "blocks.2"


def test_sdxl_12_value_vector_maps_attention_blocks():
    vals = [0.1 * i for i in range(12)]
    bw = parse_block_weights(",".join(f"{v:.1f}" for v in vals), "sdxl")
    order = ["TE1", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
    for name, v in zip(order, vals):
        assert bw.strength(name) == pytest.approx(v)
    assert bw.strength("TE2") == bw.strength("TE1")  # the BASE slot sets both text encoders
    # blocks outside the 12-value form keep 1
    assert bw.strength("IN01") == 1.0 and bw.strength("OUT07") == 1.0 and bw.strength("OTHER") == 1.0


def test_sdxl_20_value_vector_and_label():
    vals = list(range(20))
    bw = parse_block_weights("XL:" + ",".join(str(v) for v in vals), "sdxl")
    assert bw.strength("TE1") == 0 and bw.strength("TE2") == 0
    assert bw.strength("IN00") == 1 and bw.strength("IN08") == 9
    assert bw.strength("M00") == 10
    assert bw.strength("OUT00") == 11 and bw.strength("OUT08") == 19


def test_sdxl_presets():
    outall = parse_block_weights("OUTALL", "sdxl")
    assert outall.strength("TE1") == 1 and outall.strength("TE2") == 1 and outall.strength("IN04") == 0 and outall.strength("M00") == 0
    assert all(outall.strength(f"OUT{i:02d}") == 1 for i in range(9))
    midd = parse_block_weights("midd", "sdxl")
    assert [midd.strength(b) for b in ("IN05", "IN07", "M00", "OUT02", "OUT03")] == [0, 1, 1, 1, 0]
    none = parse_block_weights("NONE", "sdxl")
    assert none.strength("TE1") == 0 and none.strength("TE2") == 0 and none.strength("OTHER") == 0 and none.strength("OUT05") == 0
    assert parse_block_weights("ALL", "sdxl").is_identity()
    assert parse_block_weights("ALL0.5", "sdxl").strength("IN07") == 0.5
    inall = parse_block_weights("INALL", "sdxl")
    assert inall.strength("IN08") == 1 and inall.strength("OUT00") == 0


def test_named_entries_groups_ranges_and_override():
    bw = parse_block_weights("IN04=0.5, OUT=0, OUT03=2, te=0.25", "sdxl")
    assert bw.strength("IN04") == 0.5
    assert bw.strength("OUT00") == 0 and bw.strength("OUT08") == 0
    assert bw.strength("OUT03") == 2
    assert bw.strength("TE1") == 0.25 and bw.strength("TE2") == 0.25
    assert bw.strength("IN05") == 1.0
    rng = parse_block_weights("IN04-IN07=0", "sdxl")
    assert [rng.strength(f"IN{i:02d}") for i in range(3, 9)] == [1, 0, 0, 0, 0, 1]
    mixed = parse_block_weights("OUTALL\nIN08=0.3", "sdxl")
    assert mixed.strength("IN08") == 0.3 and mixed.strength("OUT01") == 1 and mixed.strength("IN04") == 0


def test_anima_named_and_vector():
    bw = parse_block_weights("blocks.3=0.5, blocks.0-9=0, llm_adapter=0, te=0, blocks.3=0.7", "anima")
    assert bw.strength("blocks.3") == 0.7
    assert bw.strength("blocks.0") == 0 and bw.strength("blocks.9") == 0
    assert bw.strength("blocks.10") == 1.0
    assert bw.strength("llm_adapter") == 0 and bw.strength("te") == 0
    vec = parse_block_weights(",".join(["0.5"] + ["1"] * 9 + ["0"] + ["2"]), "anima", num_blocks=10)
    assert vec.strength("te") == 0.5 and vec.strength("blocks.9") == 0 and vec.strength("llm_adapter") == 2
    assert parse_block_weights("NONE", "anima", num_blocks=10).strength("blocks.4") == 0


@pytest.mark.parametrize("text,family,fragment", [
    ("1,0,1", "sdxl", "found 3"),
    ("IN09=1", "sdxl", "out of range"),
    ("FOO=1", "sdxl", "unknown SDXL block"),
    ("IN04=abc", "sdxl", "not a number"),
    ("IN04=nan", "sdxl", "not a"),
    ("MIDDLEISH", "sdxl", "neither a preset"),
    ("IN04=1, OUTALL", "sdxl", "must come first"),
    ("IN04=1, 0.5", "sdxl", "bare number"),
    ("blocks.40=1", "anima", "out of range"),
    ("input_blocks=0", "anima", "unknown Anima block"),
    ("1,1,1", "anima", "takes 30 values"),
])
def test_errors_are_clear(text, family, fragment):
    with pytest.raises(BlockWeightsError) as err:
        parse_block_weights(text, family)
    assert fragment in str(err.value)
