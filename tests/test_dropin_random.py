"""Random encoder-decoders composed of the patterns of public enhancement networks (issue 23).

A small seeded generator (tests/_dropin_nets.random_net) picks 2 to 4
levels, random widths and input channels, a block per stage (ECA, custom
conv_block, DropPath, selective-kernel fusion, CBAM, spatial gate, attention
gate, plain conv), how the encoder gives its skips (module outputs, (skip,
down) tuples, a list from an encoder submodule) and how each decoder stage
takes them (concatenation, pix2pix UNetUp, (feature, side) outputs, a
PixelShuffle upsampler paired too). Every network gets the five drop-in
properties with no options and no warning.
"""

import warnings

import pytest
import torch

from tests import _dropin_nets as nets

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")

SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_encoder_decoder_needs_no_options(seed):
    net = nets.random_net(seed)
    x = torch.randn(2, net.in_ch, 16, 16)
    nets.check_five(lambda: nets.random_net(seed), net.pairs, x)


def test_the_generator_covers_every_pattern():
    """The seeds above compose every block, encoder and decoder kind (a generator stuck on one would pass too)."""
    made = [nets.random_net(seed) for seed in SEEDS]
    blocks = {type(m).__name__ for n in made for m in n.modules()}
    for name in ("ECA", "conv_block", "DropPathBlock", "SKFusion", "CBAM", "SpatialGate", "AttentionGated", "UNetUp",
                 "SideOutput", "SkipDown", "ListEncoder", "PixelShuffle"):
        assert name in blocks, name
    assert {n.in_ch for n in made} == {1, 3, 4}
    assert {len(n.decoder_kinds) + 1 for n in made} == {2, 3, 4}
    assert sum(len(n.pairs) for n in made) >= 60
