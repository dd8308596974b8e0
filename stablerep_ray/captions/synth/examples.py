"""The built-in instruction line and in-context example pool of each prompt kind.

A prompt is the kind's instruction, k examples drawn from its pool, then the new input and ``=>``; a
base (non-chat) language model continues the pattern with one caption line. Each example is
``input => caption``, the input written exactly as ``prompts.prompt_input`` writes new inputs.
``captions.synth.examples`` replaces a kind's pool with the user's own.
"""

from __future__ import annotations

SEPARATOR = " => "

INSTRUCTIONS = {
    "concept": "Each line turns the name of a thing into a one-line caption of a photograph that shows it.",
    "concept_background": "Each line turns the name of a thing and a setting into a one-line caption of a "
    "photograph of that thing in that setting.",
    "concept_relation": "Each line turns the name of a thing and a spatial relation into a one-line caption of "
    "a photograph where the thing stands in that relation to something else.",
    "background": "Each line turns a place into a one-line caption of a photograph of that place with no "
    "main subject.",
    "texture": "Each line turns the name of a texture into a one-line caption of a close-up photograph "
    "filled with that texture.",
}

EXAMPLES = {
    "concept": (
        "golden retriever => a golden retriever asleep on a kitchen floor beside its water bowl",
        "espresso machine => a chrome espresso machine on a cafe counter, steam rising from the wand",
        "red fox => a red fox trotting across a frosty meadow in early morning light",
        "acoustic guitar => an acoustic guitar leaning against a brick wall with its case open",
        "lighthouse => a striped lighthouse on a rocky point under a clear sky",
        "tabby cat => a tabby cat stretching on a windowsill covered in houseplants",
        "sailboat => a small white sailboat tilted by the wind on a choppy grey sea",
        "bicycle => an old city bicycle with a wicker basket parked against a lamp post",
        "strawberry => a single ripe strawberry with a drop of water on its skin",
        "hot air balloon => a patchwork hot air balloon drifting over green hills at sunrise",
        "owl => a barn owl perched on a fence post, looking straight at the camera",
        "fire truck => a red fire truck with its ladder raised in front of an apartment block",
        "sunflower => a tall sunflower turning toward the sun in a farm field",
        "teapot => a blue porcelain teapot with a chipped spout on a linen tablecloth",
    ),
    "concept_background": (
        "golden retriever, a snowy park => a golden retriever bounding through fresh snow in a city park",
        "espresso machine, a small apartment kitchen => a compact espresso machine on the counter of a narrow "
        "apartment kitchen",
        "red fox, a suburban garden => a red fox sniffing around a vegetable bed in a suburban back garden",
        "acoustic guitar, a campfire at night => an acoustic guitar resting on a log next to a crackling campfire "
        "at night",
        "lighthouse, a foggy coast => a lighthouse barely visible through thick fog on a rocky coast",
        "tabby cat, a bookshop => a tabby cat curled up on a pile of paperbacks in a quiet bookshop",
        "sailboat, a harbour at sunset => a sailboat moored in a calm harbour as the sun sets behind the masts",
        "bicycle, a rainy street => a bicycle chained to a railing on a wet street reflecting neon signs",
        "strawberry, a market stall => heaps of strawberries in paper trays on a busy market stall",
        "owl, a pine forest => an owl on a low branch deep in a dim pine forest",
        "fire truck, a parade => a polished fire truck decorated with flags driving in a town parade",
        "teapot, a garden table => a teapot and two cups on a metal garden table among flower pots",
    ),
    "concept_relation": (
        "golden retriever, next to => a golden retriever sitting next to a child on a porch step",
        "espresso machine, behind => a barista behind a large espresso machine pulling a shot",
        "red fox, under => a red fox resting under a fallen tree trunk in the woods",
        "acoustic guitar, on top of => an acoustic guitar lying on top of an unmade bed",
        "lighthouse, above => seagulls circling above a white lighthouse",
        "tabby cat, inside => a tabby cat sitting inside a cardboard box on a living room rug",
        "sailboat, in front of => a sailboat gliding in front of a row of colourful harbour houses",
        "bicycle, beside => a bicycle propped beside a wooden bench in a park",
        "strawberry, on top of => a strawberry balanced on top of a slice of cheesecake",
        "owl, near => an owl perched near a glowing street lamp at dusk",
        "fire truck, to the left of => a fire truck parked to the left of an ambulance outside a station",
        "teapot, next to => a steaming teapot next to a plate of biscuits",
    ),
    "background": (
        "a train station platform => an empty train station platform at dusk under yellow lights",
        "a desert canyon => the red walls of a desert canyon lit by late afternoon sun",
        "a school gym => an empty school gym with polished floors and folded bleachers",
        "a bamboo forest => tall green bamboo stalks in a forest with soft filtered light",
        "a frozen lake => a wide frozen lake under a pale winter sky",
        "a parking garage => rows of empty parking spaces on a concrete level of a parking garage",
        "a vineyard => neat rows of grapevines on a hillside in summer",
        "a library reading room => a quiet library reading room with long tables and green lamps",
        "a beach at low tide => wet sand and shallow pools on a beach at low tide",
        "a mountain pass => a winding road through a rocky mountain pass above the clouds",
        "a laundromat => a row of washing machines in a brightly lit laundromat at night",
        "a sand background => a plain sand-coloured studio backdrop, evenly lit",
    ),
    "texture": (
        "woven => a close-up of tightly woven wicker strands in warm brown tones",
        "cracked => dry cracked mud forming an irregular grid of plates",
        "striped => bold parallel stripes of fabric filling the whole frame",
        "dotted => a close-up of a surface covered in small evenly spaced dots",
        "bubbly => a macro shot of foam made of many tiny bubbles",
        "braided => a close-up of thick braided rope in three strands",
        "checkered => a checkered pattern of alternating squares, seen straight on",
        "marbled => polished marble with grey veins running across a white surface",
        "knitted => a close-up of chunky knitted wool stitches",
        "rusty => a flaking rusty metal sheet in orange and brown",
        "wavy => a pattern of smooth wavy lines rippling across the frame",
        "honeycombed => a honeycomb of hexagonal wax cells, some filled with honey",
    ),
}
