"""The offline, license-clean training corpus: nothing is downloaded, ever.

Three sources, all plain text split into paragraphs:

1. ``grammar_paragraphs``: stories about fictional people, places and objects, written by a seeded
   grammar in this file (the word lists and templates are our own, Apache-2.0 with the package).
2. ``stdlib_paragraphs``: docstrings of a fixed list of Python standard-library modules, read with
   ``inspect`` at data-build time (Python Software Foundation License; present on every machine).
   Their exact text follows the running Python version, so corpora built under different Pythons
   differ slightly; the grammar part is identical everywhere for a seed.
3. ``text_file_paragraphs``: the user's own UTF-8 text files (``--text FILE`` / recipe ``text_files``).

The word lists double as the vocabulary of the synthetic tasks (RULER's ``adj-noun`` keys).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Iterable
from pathlib import Path

FIRST_NAMES = (
    "Ada Bram Cleo Dara Elio Fenna Gus Hedda Ivo Juno Kasimir Lena Milo Nadia Otto Petra Quinn Rosa "
    "Sven Tilda Ugo Vera Wim Xenia Yuri Zora Anouk Bodo Carla Dirk Edda Flint Greta Hugo Inka Jonas "
    "Kira Lorin Maren Nils Oda Pim Runa Sorin Tamsin Ulla Viggo Wanda"
).split()
LAST_NAMES = (
    "Ashdown Brightwater Coldbrook Dunmore Everly Fairweather Greystone Hollow Ironwood Juniper "
    "Kettleby Larkspur Mossgrove Northcott Oakhart Pennywhistle Quarry Rookwood Silverlake Thornbury "
    "Underhill Vale Westmarch Yarrow"
).split()
PLACES = (
    "Amberford,Briarwick,Cinderholm,Dovecrest,Elmsworth,Foxmere,Glimmerdale,Harrowgate,Ivybridge,"
    "Juniper Hollow,Kestrel Bay,Lanternfield,Marrowby,Nettlecombe,Orchard Reach,Pebblebrook,Quillon,"
    "Ravenshade,Saltmarsh,Thistledown,Umberleigh,Violet Harbor,Willowmere,Yellowstone Ridge"
).split(",")
BUILDINGS = "library bakery market lighthouse museum workshop station harbor mill tower school garden".split()
ADJECTIVES = (
    "ancient bright calm clever curious dusty eager fancy gentle golden hidden honest humble jolly "
    "kind little lively lucky merry mighty narrow noble odd patient quiet rapid rusty shiny silent "
    "silver sleepy smooth sturdy swift tall tiny vivid warm wild wise wooden young"
).split()
NOUNS = (
    "anchor apple arrow badge basket bell blanket boat bottle bridge candle castle cloud coin comet "
    "compass crown drum feather flute garden glove hammer harp helmet island jar kettle key kite "
    "ladder lamp lantern map mirror needle ocean orchard pebble pencil piano quilt ribbon river "
    "saddle shell shovel spoon star teapot thimble tiger tower trumpet umbrella violin wagon whistle"
).split()
ANIMALS = "badger cat crow deer dog fox goat hare heron horse lynx mole otter owl pony raven sheep wren".split()
COLORS = "red blue green yellow purple orange grey white black brown teal amber".split()
MATERIALS = "oak pine copper brass glass clay stone wool linen silver iron birch".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
JOBS = "baker teacher sailor painter carpenter gardener doctor miller clockmaker fisher weaver poet".split()

# Each template is one sentence; slots are filled by ``_fill``. {p} is the paragraph's protagonist.
_TEMPLATES = (
    "{p} lived in {place} with a {adj} {animal} named {name}.",
    "Every {day}, {p} walked to the {building} in {place} to buy {n} {noun}s.",
    "The {noun} that {p} found near the {building} was {color} and {adj}.",
    "In {year}, {p} built a {adj} {noun} out of {material}.",
    "{p} worked as a {job} and was known for being {adj}.",
    "One morning {p} met {q} at the {building}, and they talked about a {adj} {noun}.",
    "{q} told {p} that the {building} in {place} had a {color} door.",
    "{p} kept {n} {color} {noun}s in a {material} box under the bed.",
    "When it rained, {p} read old stories about a {adj} {animal} from {place}.",
    "The road from {place} to {place2} is {n} miles long and passes a {adj} {building}.",
    "{p} wrote a letter to {q} about the {noun} that had gone missing.",
    "Nobody in {place} remembers who painted the {building} {color}.",
    "At the age of {age}, {p} moved from {place2} to {place}.",
    "{p} and {q} sailed a {material} boat across the lake on a {adj} {day}.",
    "The {job} of {place} once traded a {noun} for a {adj} {animal}.",
    "{p} likes {color} tea, {adj} songs and long walks by the {building}.",
    "After {n} years, {p} finally fixed the {adj} {noun} in the {building}.",
    "It is said that a {adj} {animal} guards the {building} of {place2}.",
    "{q} laughed when {p} dropped the {noun} into the river.",
    "By evening the {noun} was {color}, and {p} decided to keep it.",
)


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _fill(template: str, rng: random.Random, protagonist: str) -> str:
    first = protagonist.split()[0]
    text = template.format(
        p=rng.choice((protagonist, first, first)),
        q=rng.choice(FIRST_NAMES),
        name=rng.choice(FIRST_NAMES),
        place=rng.choice(PLACES),
        place2=rng.choice(PLACES),
        building=rng.choice(BUILDINGS),
        adj=rng.choice(ADJECTIVES),
        noun=rng.choice(NOUNS),
        animal=rng.choice(ANIMALS),
        color=rng.choice(COLORS),
        material=rng.choice(MATERIALS),
        day=rng.choice(WEEKDAYS),
        job=rng.choice(JOBS),
        n=rng.randint(2, 99),
        age=rng.randint(5, 90),
        year=rng.randint(1200, 2099),
    )
    return _A_BEFORE_VOWEL.sub(r"\1n ", text)


def grammar_paragraph(rng: random.Random) -> str:
    """3-7 sentences about one fictional person."""
    protagonist = person(rng)
    return " ".join(_fill(rng.choice(_TEMPLATES), rng, protagonist) for _ in range(rng.randint(3, 7)))


def grammar_paragraphs(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [grammar_paragraph(rng) for _ in range(num)]


# A fixed list so the corpus does not depend on which third-party packages are installed.
STDLIB_MODULES = (
    "abc argparse array base64 bisect calendar collections colorsys contextlib copy csv dataclasses "
    "datetime decimal difflib enum fnmatch fractions functools glob gzip hashlib heapq hmac html "
    "inspect io ipaddress itertools json logging math operator os pathlib pickle pprint queue random "
    "re sched secrets shlex shutil socket statistics string struct subprocess tempfile textwrap "
    "threading time timeit tokenize typing unittest urllib.parse uuid warnings weakref zipfile zlib"
).split()


def stdlib_paragraphs(modules: Iterable[str] = STDLIB_MODULES) -> list[str]:
    """Docstrings of the modules and of their public classes and functions, one paragraph per
    blank-line-separated block (deduplicated, in a fixed order)."""
    seen: set[str] = set()
    out: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a trimmed Python build; the corpus simply lacks that module
            continue
        objects = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objects:
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            for block in doc.split("\n\n"):
                block = " ".join(block.split())
                if len(block) >= 40 and block not in seen:
                    seen.add(block)
                    out.append(block)
    return out


def text_file_paragraphs(paths: Iterable[str | Path]) -> list[str]:
    """The user's own text: each file split at blank lines, whitespace normalised."""
    out: list[str] = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        out.extend(" ".join(b.split()) for b in text.split("\n\n") if b.strip())
    return out


def build_corpus(
    seed: int = 0,
    num_grammar: int = 20000,
    stdlib: bool = True,
    text_files: Iterable[str | Path] = (),
) -> list[str]:
    """All paragraphs, shuffled with ``seed``. Deterministic for a seed on one Python version."""
    paragraphs = grammar_paragraphs(num_grammar, seed)
    if stdlib:
        paragraphs += stdlib_paragraphs()
    paragraphs += text_file_paragraphs(text_files)
    random.Random(seed + 1).shuffle(paragraphs)
    return paragraphs
