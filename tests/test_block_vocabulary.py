"""One block vocabulary: every label the load report shows (`hadakron.arch`'s `block_of`) is a name the loader's
`block_weights` syntax takes, and naming it changes exactly the modules of that block; earlier spellings still parse.
"""
from __future__ import annotations

import pytest

from hadakron.arch import ANIMA, SDXL
from hadakron.block_weights import block_id, parse_block_weights


def sdxl_modules() -> list[tuple[str, str]]:
    """(part, dotted) of every SDXL layer hadakron knows: UNet (conv layers and time/label embeds included), CLIPs."""
    return [(part, dotted) for part in SDXL.parts for dotted in SDXL.layers[part]]


def anima_modules(num_blocks: int) -> list[tuple[str, str]]:
    """(part, dotted) of an Anima model with `num_blocks` DiT blocks: the known layers of blocks.0 carried to every
    block index, plus the non-block DiT layers (embedders, final layer, llm_adapter) and the text encoder."""
    block0 = [d[len("blocks.0."):] for d in ANIMA.layers["unet"] if d.startswith("blocks.0.")]
    other = [d for d in ANIMA.layers["unet"] if not d.startswith("blocks.")]
    unet = [f"blocks.{i}.{local}" for i in range(num_blocks) for local in block0] + other
    return [("unet", d) for d in unet] + [("te", d) for d in ANIMA.layers["te"]]


def assert_each_label_selects_its_block(family: str, modules, **kw) -> set[str]:
    fam = SDXL if family == "sdxl" else ANIMA
    shown = [fam.block_of(p, d) for p, d in modules]  # what the load report shows for each module
    ids = [block_id(family, p, d) for p, d in modules]
    for label in sorted(set(shown)):
        bw = parse_block_weights(f"{label}=0.25", family, **kw)
        assert [bw.strength(i) for i in ids] == [0.25 if s == label else 1.0 for s in shown], label
        for spelling in (label.lower(), label.upper()):  # ids are case-insensitive
            assert parse_block_weights(f"{spelling}=0.25", family, **kw).values == bw.values, spelling
    return set(shown)


def test_every_sdxl_label_parses_and_selects_exactly_its_block():
    labels = assert_each_label_selects_its_block("sdxl", sdxl_modules())
    assert labels == {"TE1", "TE2", "M00", "OTHER"} | {f"IN{i:02d}" for i in range(9)} | {
        f"OUT{i:02d}" for i in range(9)}


@pytest.mark.parametrize("num_blocks", [28, 40, 52])
def test_every_anima_label_parses_and_selects_exactly_its_block(num_blocks):
    modules = anima_modules(num_blocks)
    labels = assert_each_label_selects_its_block("anima", modules, num_blocks=num_blocks)
    assert labels == {"te", "llm_adapter", "OTHER"} | {f"blocks.{i}" for i in range(num_blocks)}


def test_block_id_is_the_report_label():
    for part, dotted in sdxl_modules():
        assert block_id("sdxl", part, dotted) == SDXL.block_of(part, dotted)
    for part, dotted in anima_modules(40):
        assert block_id("anima", part, dotted) == ANIMA.block_of(part, dotted)


def test_sdxl_spellings_people_type_keep_working():
    """LBW's BASE (and TE, CLIP) set both text encoders; TE1 / TE2 set one; vectors' BASE slot sets both."""
    te1, te2 = ("te1", "text_model.encoder.layers.0.mlp.fc1"), ("te2", "text_model.encoder.layers.30.mlp.fc1")
    for text in ("BASE=0", "base=0", "TE=0", "clip=0", "NONE"):
        bw = parse_block_weights(text, "sdxl")
        assert bw.strength(block_id("sdxl", *te1)) == 0 and bw.strength(block_id("sdxl", *te2)) == 0, text
    one = parse_block_weights("TE2=0.5", "sdxl")
    assert one.strength(block_id("sdxl", *te1)) == 1.0 and one.strength(block_id("sdxl", *te2)) == 0.5
    vec = parse_block_weights("0.3," + ",".join(["1"] * 11), "sdxl")
    assert vec.strength("TE1") == vec.strength("TE2") == 0.3
    outall = parse_block_weights("OUTALL, BASE=0.5", "sdxl")
    assert outall.strength("TE1") == outall.strength("TE2") == 0.5 and outall.strength("IN04") == 0


def test_anima_spellings_people_type_keep_working():
    q = lambda i: ("unet", f"blocks.{i}.self_attn.q_proj")  # noqa: E731
    bw = parse_block_weights("blocks.3=0.5, blocks.10-12=0, llm_adapter=0, te=0.25", "anima", num_blocks=40)
    assert bw.strength(block_id("anima", *q(3))) == 0.5
    assert [bw.strength(block_id("anima", *q(i))) for i in (9, 10, 12, 13)] == [1.0, 0, 0, 1.0]
    assert bw.strength(block_id("anima", "unet", "llm_adapter.blocks.0.mlp.0")) == 0
    assert bw.strength(block_id("anima", "te", "layers.0.mlp.up_proj")) == 0.25
    old = parse_block_weights("BLOCK03=0.5, block39=0.7, BLOCK10-BLOCK12=0, LLM_ADAPTER=0, TE=0.25", "anima",
                              num_blocks=40)  # the labels earlier load reports showed
    assert old.values == {**bw.values, "blocks.39": 0.7}
    vec = parse_block_weights(",".join(["0.5"] + ["1"] * 40 + ["0"] + ["2"]), "anima", num_blocks=41)
    assert vec.strength("blocks.39") == 1 and vec.strength("blocks.40") == 0 and vec.strength("llm_adapter") == 2
