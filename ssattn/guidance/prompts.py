"""Turning a captioner's free-text answer into short object prompts for the aligner.

Rules of parse_caption (deterministic, no tagger needed):

1. Lower-case; drop a lead-in such as "the key objects in this image are"
   (everything up to the last ":" of the first line, or a known opening phrase).
2. Split into phrases on newlines, ",", ";", ".", "/", bullets and
   numbering ("1.", "-", "*"), and the words "and", "or", "with", "as well as".
3. In a phrase "X of Y" where X is a collective/quantity ("school of fish",
   "a group of divers") keep Y.
4. Prepositions, auxiliaries, pronouns and verb forms ("-ing", "-ed",
   "-ly" words that are not common nouns) end a phrase ("a fish swimming
   near a reef" gives "fish" and "reef"). Other stopwords (articles,
   quantities, scene words like "image"/"photo", degradation adjectives like
   "blurry"/"murky") and anything but letters and hyphens are dropped; keep
   at most the last 3 words (English noun phrases end in their noun).
5. Drop a phrase whose last word is background ("water", "ocean", "sea",
   "seabed", "sand", "background", ...): the map should mark objects.
6. Deduplicate (a trailing plural "s" ignored), keep the first `max_prompts`.

If nothing is left, DEFAULT_PROMPTS are used and a warning is logged.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("ssattn.guidance")

DEFAULT_PROMPTS = ("fish", "diver", "robot", "coral")
DEFAULT_QUESTION = (
    "This is a degraded underwater photo. List the key objects in it "
    "(animals, people, man-made things) as a short comma-separated list of nouns."
)
MAX_PROMPTS = 4
MAX_WORDS = 3

STOPWORDS = frozenset("""
a an the this that these those there here it its it's they them their he she his her we our you your i my me
is are was were be been being am has have had do does did can could may might will would shall should must
of in on at to from by for with without into onto over under above below near around behind between among
through across along about against inside outside within upon beside besides next top bottom left right
front back middle center centre side
and or but nor so yet also as well such than then very quite rather just only even too
some any many much more most few several various numerous multiple lots lot plenty number couple pair
one two three four five six seven eight nine ten dozen dozens hundreds
other others another each every all both either neither no not none
what which who whom whose where when why how
image images picture pictures photo photos photograph photographs scene scenes view shot frame
visible seen shown present appears appear seems seem see seeing key main primary important notable
object objects item items thing things element elements include includes including like e g eg etc
large small big little tiny huge
underwater blurry blurred hazy murky dark dim bright unclear cloudy foggy dull noisy clear degraded low quality
greenish bluish yellowish distorted
""".split())

# Words that end a noun phrase: what follows them is a new phrase ("fish swimming near a reef").
BREAKERS = frozenset("""
is are was were be been being am has have had do does did can could may might will would shall should must
of in on at to from by for with without into onto over under above below near around behind between among
through across along about against inside outside within upon beside besides
it its they them their he she his her we our you your i my me who which that what where when
""".split())

COLLECTIVES = frozenset("""
school schools group groups number numbers couple pair pairs lot lots bunch bunches kind kinds type types
variety herd swarm cluster clusters collection piece pieces set sets shoal shoals colony colonies patch patches
""".split())

BACKGROUND = frozenset("""
water waters ocean oceans sea seas seabed seafloor floor sand sands background foreground surface bottom
depth depths environment area light lighting sunlight haze visibility blue green color colour colors colours
""".split())

# -ing / -ed words that are nouns (kept although rule 4 drops verb forms).
NOUN_EXCEPTIONS = frozenset("""
ring string wing king sling building ceiling painting clothing bedding fishing railing piling shipwreck
seaweed bed shed sled reed weed
""".split())

_LEAD_INS = (
    r"^(?:in|on)\s+(?:this|the)\s+(?:underwater\s+)?(?:image|photo|picture|scene)\s*,?\s*",
    r"^(?:the\s+)?(?:key|main)\s+objects?\s+(?:in|of)\s+(?:this|the)\s+\w+\s+(?:are|is|include)\s*",
    r"^(?:there\s+(?:is|are)|i\s+(?:can\s+)?see|we\s+(?:can\s+)?see)\s+",
)
_SPLIT = re.compile(r"[\n,;./()\[\]|:!?]+|\s(?:and|or|with|as well as|plus)\s|^\s*[-*\u2022]\s*|\s\d+\s*[.)]\s")


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("es") and word[-3] in "hsxz":  # fishes, boxes
        return word[:-2]
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _verb_form(w: str) -> bool:
    return w not in NOUN_EXCEPTIONS and len(w) > 4 and (w.endswith("ly") or w.endswith("ing") or w.endswith("ed"))


def _keep_word(w: str) -> bool:
    if w in STOPWORDS or len(w) < 2 or not re.fullmatch(r"[a-z][a-z\-]*", w):
        return False
    return not _verb_form(w)


def _phrases(chunk: str) -> list[str]:
    words = [w.strip("'-") for w in re.findall(r"[a-z][a-z\-']*|\d+", chunk)]
    if "of" in words:  # "school of fish" -> "fish"; "bottle of wine" stays
        i = words.index("of")
        if all(w in STOPWORDS or w in COLLECTIVES for w in words[:i]):
            words = words[i + 1:]
    runs, run = [], []
    for w in words + ["of"]:  # sentinel breaker flushes the last run
        if w in BREAKERS or _verb_form(w):
            if run:
                runs.append(run)
            run = []
        elif _keep_word(w):
            run.append(w)
    out = []
    for run in runs:
        run = run[-MAX_WORDS:]
        if run[-1] not in BACKGROUND:
            out.append(" ".join(run))
    return out


def parse_caption(text: str, max_prompts: int = MAX_PROMPTS) -> list[str]:
    """Object phrases in a captioner's answer, per the module's rules; [] when none is usable."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    t = text.lower().replace("\u2019", "'").strip()
    first, sep, rest = t.partition("\n")
    if ":" in first:  # "Key objects: fish, coral"
        first = first.rsplit(":", 1)[1]
    t = first + sep + rest
    for pattern in _LEAD_INS:
        t = re.sub(pattern, "", t.strip())
    out, seen = [], set()
    for chunk in _SPLIT.split(" " + t + " "):
        if not chunk or not chunk.strip():
            continue
        for p in _phrases(chunk):
            key = " ".join(_singular(w) for w in p.split())
            if key in seen:
                continue
            seen.add(key)
            out.append(p)
            if len(out) >= max_prompts:
                return out
    return out


def prompts_from_caption(text: str, max_prompts: int = MAX_PROMPTS, fallback=DEFAULT_PROMPTS) -> list[str]:
    """parse_caption, falling back to `fallback` (logged) when the caption has no usable words."""
    found = parse_caption(text, max_prompts)
    if found:
        return found
    log.warning("caption %r has no usable object words; using the generic prompt %s", text[:200], ", ".join(fallback))
    return list(fallback)[:max_prompts] if max_prompts else list(fallback)


def parse_classes(spec) -> list[str]:
    """Class names from "fish,diver, coral" or a list; stripped, deduplicated, in order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"class names must be strings, got {item!r}")
        name = " ".join(item.split())
        if name and name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no class names in {spec!r}")
    return out
