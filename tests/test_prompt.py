"""A1111 extra-network prompt syntax: parse, weights, format_tag round trips."""

from __future__ import annotations

import pytest

from diffadapt.prompt import ExtraNetwork, PromptError, StackEntry, format_tag, parse

E = StackEntry

PARSE_CASES = [
    # (prompt, clean prompt, stack)
    ("a photo of a cat", "a photo of a cat", []),
    ("", "", []),
    ("a cat <lora:ink:0.8> <lora:film:0.5:0.3>", "a cat", [E("ink", 0.8, 0.8), E("film", 0.5, 0.3)]),
    ("<lora:ink:0.8><lora:film:1>", "", [E("ink", 0.8, 0.8), E("film", 1.0, 1.0)]),
    ("<lora:ink>", "", [E("ink")]),
    ("<lora:ink:0.4:0.6:8>", "", [E("ink", 0.4, 0.6, dyn=8)]),
    # named args override positional ones; unet defaults to the (final) te
    ("<lora:ink:unet=0.5:te=0.2>", "", [E("ink", 0.2, 0.5)]),
    ("<lora:ink:te=0.2>", "", [E("ink", 0.2, 0.2)]),
    ("<lora:ink:0.9:unet=0.1>", "", [E("ink", 0.9, 0.1)]),
    ("<lora:ink:0.9:0.8:te=0.3>", "", [E("ink", 0.3, 0.8)]),
    ("<lora:ink:1:dyn=16>", "", [E("ink", 1.0, 1.0, dyn=16)]),
    ("<lora:ink:1:mid=0.2>", "", [E("ink", 1.0, 1.0)]),  # named args A1111 does not read are ignored
    # negative and odd-looking numbers
    ("x <lora:ink:-1>", "x", [E("ink", -1.0, -1.0)]),
    ("<lora:ink:-0.5:.25>", "", [E("ink", -0.5, 0.25)]),
    ("<lora:ink:1e-3>", "", [E("ink", 0.001, 0.001)]),
    # names with spaces, dots, dashes, slashes, unicode; padding around names and numbers is dropped
    ("<lora:my style v1.5-final:0.7>", "", [E("my style v1.5-final", 0.7, 0.7)]),
    ("<lora:sub/dir/ink:0.7>", "", [E("sub/dir/ink", 0.7, 0.7)]),
    ("<lora:墨水:0.7>", "", [E("墨水", 0.7, 0.7)]),
    ("<lora: ink : 0.7 >", "", [E("ink", 0.7, 0.7)]),
    # the lyco alias has the same arguments
    ("<lyco:ink:0.5:0.25>", "", [E("ink", 0.5, 0.25, kind="lyco")]),
    # duplicates are all kept, in prompt order
    ("<lora:ink:0.5> a <lora:ink:0.25>", "a", [E("ink", 0.5, 0.5), E("ink", 0.25, 0.25)]),
    # commas and spaces the tags leave behind
    ("a cat, <lora:ink:1>, best quality", "a cat, best quality", [E("ink")]),
    ("<lora:ink:1>, a cat", "a cat", [E("ink")]),
    ("a cat,<lora:ink:1>", "a cat", [E("ink")]),
    ("a cat,   <lora:ink:1> ,  , dog", "a cat, dog", [E("ink")]),
    ("(masterpiece:1.2), a cat <lora:ink:1>", "(masterpiece:1.2), a cat", [E("ink")]),
    ("a cat\n<lora:ink:1>\nBREAK  dog", "a cat\n\nBREAK dog", [E("ink")]),
    # not tags: no kind, no arguments, or the kind is not a word
    ("a <cat> <lora:> <:x>", "a <cat> <lora:> <:x>", []),
    ("5 < 6 > 4", "5 < 6 > 4", []),
]


@pytest.mark.parametrize("prompt,clean,stack", PARSE_CASES, ids=[c[0][:40] or "empty" for c in PARSE_CASES])
def test_parse(prompt, clean, stack):
    parsed = parse(prompt)
    assert parsed.prompt == clean
    assert parsed.stack == stack
    assert parsed.other == []


def test_unknown_networks_are_stripped_into_other():
    parsed = parse("a cat <hypernet:anime:0.6>, <lora:ink:0.5> <LORA:Ink:1> <ti:tok>")
    assert parsed.prompt == "a cat"
    assert parsed.stack == [E("ink", 0.5, 0.5)]
    assert parsed.other == [
        ExtraNetwork("hypernet", ("anime", "0.6"), "<hypernet:anime:0.6>"),
        ExtraNetwork("LORA", ("Ink", "1"), "<LORA:Ink:1>"),  # kinds are case-sensitive, as A1111's registry
        ExtraNetwork("ti", ("tok",), "<ti:tok>"),
    ]


@pytest.mark.parametrize("prompt,match", [
    ("<lora:ink:strong>", "not a number"),
    ("<lora:ink:1:x>", "not a number"),
    ("<lora:ink:te=abc>", "not a number"),
    ("<lora:ink:nan>", "not finite"),
    ("<lora:ink:inf>", "not finite"),
    ("<lora:ink:1:1:eight>", "not an integer"),
    ("<lora:te=1>", "no network name"),
    ("<lora: :1>", "no network name"),
])
def test_bad_arguments_raise(prompt, match):
    with pytest.raises(PromptError, match=match):
        parse(prompt)


def test_weight_dict_gives_te_to_every_text_encoder():
    w = E("ink", te=0.2, unet=0.7).weight
    assert w["unet"] == w["transformer"] == 0.7
    assert w["text_encoder"] == w["text_encoder_2"] == w["text_encoder_3"] == 0.2


def test_weights_sum_repeated_names_in_first_mention_order():
    parsed = parse("<lora:film:1> <lora:ink:0.5:0.25> x <lora:ink:0.25:-0.5>")
    weights = parsed.weights()
    assert list(weights) == ["film", "ink"]
    assert weights["ink"]["text_encoder"] == 0.75 and weights["ink"]["unet"] == -0.25
    assert weights["film"] == E("film").weight
    assert parsed.names() == ["film", "ink"]


@pytest.mark.parametrize("args,kwargs,tag", [
    (("ink",), {}, "<lora:ink:1>"),
    (("ink", 0.8), {}, "<lora:ink:0.8>"),
    (("ink", 0.8, 0.8), {}, "<lora:ink:0.8>"),
    (("ink", 0.5, 0.3), {}, "<lora:ink:0.5:0.3>"),
    (("ink", -1.0), {}, "<lora:ink:-1>"),
    (("ink", 1.0), {"dyn": 8}, "<lora:ink:1:1:8>"),
    (("ink", 0.5), {"kind": "lyco"}, "<lyco:ink:0.5>"),
    (("my style v1.5",), {}, "<lora:my style v1.5:1>"),
])
def test_format_tag(args, kwargs, tag):
    assert format_tag(*args, **kwargs) == tag


@pytest.mark.parametrize("name,te,unet,dyn", [
    ("ink", 1.0, 1.0, None), ("ink", 0.8, 0.8, None), ("film", 0.5, 0.3, None), ("x", -0.75, 2.5, 4),
    ("a b/c.d-e", 0.1 + 0.2, 1 / 3, None), ("tiny", 1e-7, -1e12, None), ("a=b=c", 0.0, -0.0, None),
])
def test_format_then_parse_is_identity(name, te, unet, dyn):
    parsed = parse(format_tag(name, te, unet, dyn=dyn))
    assert parsed.prompt == ""
    assert parsed.stack == [E(name, te, unet, dyn)]
    assert parse(parsed.stack[0].tag()).stack == parsed.stack


def test_parse_then_format_round_trips_a_stack():
    prompt = "a cat <lora:ink:0.8> <lyco:film:0.5:0.3> <lora:x:unet=0.2:te=0.1:dyn=2>"
    stack = parse(prompt).stack
    assert parse(" ".join(e.tag() for e in stack)).stack == stack


@pytest.mark.parametrize("name", ["", " ink", "a:b", "a>b", "<a", "k=v"])
def test_format_tag_refuses_names_that_would_not_read_back(name):
    with pytest.raises(PromptError):
        format_tag(name, 1.0)


def test_format_tag_refuses_non_finite_multipliers():
    with pytest.raises(PromptError):
        format_tag("ink", float("nan"))
