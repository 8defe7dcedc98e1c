"""Caption -> object prompts: the documented parsing rules, the fallback, class lists."""

import logging

import pytest

from ssattn.guidance.prompts import DEFAULT_PROMPTS, parse_caption, parse_classes, prompts_from_caption


@pytest.mark.parametrize("caption, expected", [
    ("The key objects in this image are a diver, two fish and some coral.", ["diver", "fish", "coral"]),
    ("Key objects: sea turtle; school of fish; blue water", ["sea turtle", "fish"]),
    ("1. A scuba diver\n2. A shipwreck\n3. Seaweed", ["scuba diver", "shipwreck", "seaweed"]),
    ("In this image, there is a yellow fish swimming near a coral reef with a robot.",
     ["yellow fish", "coral reef", "robot"]),
    ("There are several jellyfish floating in the ocean.", ["jellyfish"]),
    ("- shark\n- rocks\n- a group of divers", ["shark", "rocks", "divers"]),
    ("Fish, fishes, FISH and a fish", ["fish"]),  # dedupe ignores case and plural
    ("an underwater remotely operated vehicle", ["vehicle"]),  # verb forms end a phrase
])
def test_parse_caption_rules(caption, expected):
    assert parse_caption(caption) == expected


def test_parse_caption_caps_count_and_words():
    cap = "crab, shark, ray, eel, octopus, squid"
    assert parse_caption(cap) == ["crab", "shark", "ray", "eel"]
    assert parse_caption(cap, max_prompts=2) == ["crab", "shark"]
    assert parse_caption("big old rusty iron anchor chain") == ["iron anchor chain"]  # last 3 words


@pytest.mark.parametrize("caption", ["", "   ", "The image is blurry and dark.", "!!! 123 ...", "water, sea, ocean",
                                     "It is there."])
def test_no_usable_words(caption):
    assert parse_caption(caption) == []


def test_fallback_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="ssattn.guidance"):
        out = prompts_from_caption("the image is murky")
    assert out == list(DEFAULT_PROMPTS)
    assert "no usable object words" in caplog.text and "murky" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssattn.guidance"):
        assert prompts_from_caption("a diver") == ["diver"]
    assert caplog.text == ""
    assert prompts_from_caption("", max_prompts=2, fallback=("robot", "fish", "x")) == ["robot", "fish"]


def test_parse_caption_bad_args():
    with pytest.raises(TypeError, match="caption must be a str"):
        parse_caption(None)
    with pytest.raises(ValueError, match="max_prompts"):
        parse_caption("fish", max_prompts=0)


def test_parse_classes():
    assert parse_classes(" fish,diver , sea  turtle,fish,") == ["fish", "diver", "sea turtle"]
    assert parse_classes(["robot", "robot", "crab"]) == ["robot", "crab"]
    with pytest.raises(ValueError, match="no class names"):
        parse_classes(" , ,")
    with pytest.raises(TypeError, match="strings"):
        parse_classes([1, 2])
