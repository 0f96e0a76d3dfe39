"""Generate the synthetic subject-verb agreement corpus in `corpora/agreement/` (standard library only).

Built on the lecture's long-term dependency "the cat , which already ate a bunch of food , was full"
/ "the cats , ... , were full": a subject noun phrase, zero to three modifiers (prepositional phrases
and relative clauses whose nouns are independently singular or plural, so often "attractors" of the
other number), then a main verb agreeing with the subject's head noun. One sentence per line,
lower-case, "," and "." as tokens (Penn Treebank LM style). A relative pronoun attaches to the noun
right before it, and a present-tense verb in the clause agrees with that noun ("the cat near the
tables that stand ...") or, in an object clause, with the clause's own subject ("that the farmer
sees"). `generate_sentence` returns a `Sentence` recording subject, main verb and its other-number
form, so Linzen et al. (2016) minimal pairs are `Sentence.with_wrong_verb`; they are written to
pairs.tsv from a separate RNG, so adding them left train/valid/test unchanged. The output depends only
on the seeds and the counts:  python scripts/make_agreement_corpus.py --seed 1234 --out corpora/agreement
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Verb(NamedTuple):
    """The forms of one verb; the past forms differ only for "be" (was/were)."""

    singular: str
    plural: str
    past_singular: str
    past_plural: str


def verb(spec: str) -> Verb:
    """"eats/eat/ate" or "is/are/was/were" -> Verb."""
    forms = spec.split("/")
    return Verb(*forms) if len(forms) == 4 else Verb(forms[0], forms[1], forms[2], forms[2])


def pairs(text: str) -> list[tuple[str, str]]:
    """"cat/cats dog/dogs" -> [("cat", "cats"), ("dog", "dogs")]: (singular, plural)."""
    return [(item.split("/")[0], item.split("/")[1]) for item in text.split()]


def frames(text: str) -> list[str]:
    """Alternatives separated by "|"; placeholders in braces are expanded by `SentenceBuilder.expand`."""
    return [item.strip() for item in text.split("|")]


def verb_frames(text: str) -> list[tuple[Verb, str]]:
    """"eats/eat/ate {food} | ..." -> [(Verb, "{food}"), ...]: each verb with its complement."""
    return [(verb(frame.split(" ", 1)[0]), frame.split(" ", 1)[1]) for frame in frames(text)]


NOUNS = {
    "animal": pairs("cat/cats dog/dogs mouse/mice horse/horses bird/birds fox/foxes wolf/wolves goose/geese "
                    "ox/oxen rabbit/rabbits duck/ducks cow/cows goat/goats pig/pigs owl/owls bear/bears "
                    "monkey/monkeys frog/frogs puppy/puppies kitten/kittens lion/lions tiger/tigers "
                    "donkey/donkeys squirrel/squirrels elephant/elephants"),
    "person": pairs("child/children man/men woman/women person/people farmer/farmers teacher/teachers "
                    "doctor/doctors baker/bakers student/students girl/girls boy/boys neighbor/neighbors "
                    "king/kings queen/queens nurse/nurses driver/drivers cook/cooks painter/painters "
                    "sailor/sailors baby/babies friend/friends soldier/soldiers artist/artists author/authors "
                    "fisherman/fishermen"),
    "thing": pairs("table/tables chair/chairs box/boxes book/books key/keys lamp/lamps bench/benches car/cars "
                   "basket/baskets bed/beds cup/cups clock/clocks stone/stones boat/boats picture/pictures "
                   "letter/letters shelf/shelves window/windows door/doors wall/walls fence/fences toy/toys "
                   "ball/balls"),
    "place": pairs("house/houses river/rivers bridge/bridges garden/gardens barn/barns church/churches "
                   "road/roads tower/towers field/fields park/parks kitchen/kitchens school/schools "
                   "forest/forests village/villages lake/lakes hill/hills farm/farms shop/shops"),
}
KIND_GROUPS = {"animate": ["animal", "person"], "inanimate": ["thing", "place"],
               "any": ["animal", "person", "thing", "place"]}
# The mass nouns each container goes with, so there is no "a slice of milk".
CONTAINERS = {pairs(spec.split(":")[0])[0]: spec.split(":")[1].split(",") for spec in (
    "bunch/bunches:food,grass,hay bowl/bowls:soup,rice,milk,water,fruit piece/pieces:bread,cheese,meat,cake "
    "slice/slices:bread,cheese,meat,cake plate/plates:food,rice,meat,fruit,cake bag/bags:rice,corn,food,hay "
    "jar/jars:honey,milk,water").split()}
MASS_NOUNS = sorted({noun for masses in CONTAINERS.values() for noun in masses})

# Every determiner is marked for number, so "a cats" and "these cat" cannot occur; "the" is the
# most frequent, as in real text.
SINGULAR_DETERMINERS = ["the"] * 6 + ["a"] * 3 + ["this", "that", "every", "each"]
PLURAL_DETERMINERS = ["the"] * 6 + ["these", "those", "some", "many", "several", "two", "three"]
MASS_DETERMINERS = ["the"] * 4 + ["some", "this", "that", "no"]
ADJECTIVES = {kind: words.split() for kind, words in {
    "animal": "young old small big little black white brown gray hungry lazy quiet noisy clever friendly "
              "tired sleepy angry brave shy wild tiny fat",
    "person": "young old tall little happy hungry lazy quiet noisy clever friendly tired sleepy angry brave "
              "shy kind busy strong",
    "thing": "old new small big large little red blue green black white brown broken wooden heavy empty "
             "dark clean dirty",
    "place": "old new small big large quiet dark busy empty narrow wide green",
    "mass": "fresh old warm cold sweet dry good"}.items()}
# Colours and materials go last in English ("big black", "old wooden"), and two of them read badly.
LAST_ADJECTIVES = set("black white brown gray red blue green wooden".split())
PREDICATE_ADJECTIVES = ("full hungry tired happy sleepy quiet angry sad calm busy afraid wet cold warm "
                        "lazy sick proud nervous").split()
ADVERBS_PRESENT = "often always never sometimes usually still also".split()
# "already" thrice: the lecture's "which already ate a bunch of food".
ADVERBS_PAST = "already already already often always never sometimes once recently also".split()
TIMES_PRESENT = frames("today | now | again | every day | at night | in the morning")
TIMES_PAST = frames("yesterday | again | at night | in the morning | last night | that day")
LOCATIVE_PREPOSITIONS = [("near", "any"), ("behind", "any"), ("beside", "any"), ("next to", "any"),
                         ("in front of", "any"), ("by", "inanimate"), ("under", "thing"), ("on", "thing"),
                         ("in", "place"), ("inside", "place"), ("outside", "place")]
# A noun's modifier may also say whom it is with or where it is from; a verb's {pp} may not
# ("sleeps from the village").
MODIFIER_PREPOSITIONS = LOCATIVE_PREPOSITIONS + [("with", "animate"), ("from", "place")]

# Each complement ends in a noun phrase, so a relative clause after it has a noun to attach to.
ANIMATE_VERBS = verb_frames(
    "eats/eat/ate {food} | wants/want/wanted {food} | sees/see/saw {any} | likes/like/liked {any} | "
    "watches/watch/watched {animate} | follows/follow/followed {animate} | chases/chase/chased {animal} | "
    "finds/find/found {thing} | carries/carry/carried {thing} | visits/visit/visited {place} | "
    "sleeps/sleep/slept {pp} | lives/live/lived {pp} | waits/wait/waited {pp} | sits/sit/sat {pp} | "
    "plays/play/played {pp} | hides/hide/hid {pp} | is/are/was/were {pp}")
INANIMATE_VERBS = verb_frames("is/are/was/were {pp} | stands/stand/stood {pp} | lies/lie/lay {pp} | "
                              "belongs/belong/belonged to {animate}")
MASS_VERBS = verb_frames("is/are/was/were {pp} | belongs/belong/belonged to {animate} | "
                         "comes/come/came from {place}")
VERBS_BY_ANTECEDENT = {"animal": ANIMATE_VERBS, "person": ANIMATE_VERBS, "thing": INANIMATE_VERBS,
                       "place": INANIMATE_VERBS, "mass": MASS_VERBS}
OBJECT_CLAUSE_VERBS = [verb(spec) for spec in
                       "sees/see/saw likes/like/liked finds/find/found remembers/remember/remembered".split()]
BE, HAVE, DO, SEEM = map(verb, "is/are/was/were has/have/had does/do/did seems/seem/seemed".split())
ACTION_VERBS = [(forms, complement) for forms, complement in ANIMATE_VERBS if forms != BE]
PROGRESSIVES = frames("sleeping {pp} | eating {food} | waiting {pp} | playing {pp} | sitting {pp} | "
                      "watching {animate} | chasing {animal} | hiding {pp} | carrying {thing}")
PARTICIPLES = frames("eaten {food} | seen {any} | found {thing} | visited {place} | followed {animate} | "
                     "chased {animal} | carried {thing}")
# (verb, complement, weight): the main predicate; the subject is always animate.
MAIN_PREDICATES = [(BE, "{adjective}", 5), (BE, "{pp}", 1), (BE, "{progressive}", 2),
                   (SEEM, "{adjective}", 1), (HAVE, "{thing}", 1), (HAVE, "{participle}", 1),
                   (DO, "not {base}", 1)] + [(forms, complement, 1) for forms, complement in ACTION_VERBS]
MODIFIER_COUNT_WEIGHTS = [40, 35, 17, 8]  # 0, 1, 2, 3 modifiers: short distances most frequent
PUNCTUATION = {",", "."}
DEFAULT_SIZES = {"train": 30000, "valid": 2000, "test": 2000}  # train.txt about 1.8 MB
# Minimal pairs per attractor count (0, 1, 2, 3 or more): equal shares, since in running text 3+
# attractors are 1% of sentences and these are the hard cases (Linzen et al. 2016).
DEFAULT_PAIRS_PER_ATTRACTOR_COUNT = 500
PAIRS_HEADER = ("correct", "wrong", "distance", "attractors")


def agreeing_verb(forms: Verb, plural: bool, past: bool) -> str:
    if past:
        return forms.past_plural if plural else forms.past_singular
    return forms.plural if plural else forms.singular


@dataclass(frozen=True)
class Sentence:
    """One generated sentence with what an agreement test needs to know about it."""

    tokens: tuple[str, ...]
    subject_index: int        # the head noun of the subject
    subject_plural: bool
    verb_index: int           # the main verb, which agrees with the subject
    verb_other_form: str      # the main verb in the other number (was -> were)
    words_between: int        # word tokens strictly between subject and verb (punctuation excluded)
    attractors: int           # nouns between subject and verb whose number differs from the subject's

    def text(self) -> str:
        return " ".join(self.tokens)

    def with_wrong_verb(self) -> tuple[str, ...]:
        """The ungrammatical member of the minimal pair."""
        return self.tokens[:self.verb_index] + (self.verb_other_form,) + self.tokens[self.verb_index + 1:]


@dataclass
class SentenceBuilder:
    """Appends tokens left to right, recording each noun and the noun a relative clause would modify."""

    rng: random.Random
    tokens: list[str] = field(default_factory=list)
    nouns: list[tuple[int, bool]] = field(default_factory=list)  # (index, plural)
    antecedent: tuple[str, bool] = ("animal", False)             # (kind, plural) of the last noun

    def add(self, words: str) -> None:
        self.tokens.extend(words.split())

    def add_noun(self, word: str, kind: str, plural: bool) -> None:
        self.nouns.append((len(self.tokens), plural))
        self.tokens.append(word)
        self.antecedent = (kind, plural)

    def coin(self) -> bool:
        return self.rng.random() < 0.5

    def determiner(self, plural: bool, next_word: str) -> str:
        word = self.rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)
        # Spelling decides: the word lists hold no "hour" or "unicorn" that would fool it.
        return "an" if word == "a" and next_word[0] in "aeiou" else word

    def adjectives(self, kind: str) -> list[str]:
        """None, one, or two as in "big black": a second adjective is always one of LAST_ADJECTIVES."""
        count = self.rng.choices([0, 1, 2], weights=[60, 32, 8])[0]
        last_words = [word for word in ADJECTIVES[kind] if word in LAST_ADJECTIVES]
        if count == 2 and last_words:
            first = self.rng.choice([word for word in ADJECTIVES[kind] if word not in LAST_ADJECTIVES])
            return [first, self.rng.choice(last_words)]
        return self.rng.sample(ADJECTIVES[kind], min(count, 1))

    def noun_phrase(self, kind: str, plural: bool | None = None) -> None:
        """Determiner, adjectives, noun; `kind` may be a group such as "animate"."""
        kind = self.rng.choice(KIND_GROUPS.get(kind, [kind]))
        plural = self.coin() if plural is None else plural
        noun = self.rng.choice(NOUNS[kind])[plural]
        adjectives = self.adjectives(kind)
        self.add(" ".join([self.determiner(plural, (adjectives + [noun])[0])] + adjectives))
        self.add_noun(noun, kind, plural)

    def food_phrase(self) -> None:
        """"a bunch of food", "two bowls of warm soup" or "the old bread"."""
        adjective = self.rng.choice(ADJECTIVES["mass"]) if self.rng.random() < 0.3 else ""
        if self.coin():
            container, plural = self.rng.choice(list(CONTAINERS)), self.coin()
            self.add(self.determiner(plural, container[plural]))
            self.add_noun(container[plural], "thing", plural)
            self.add(f"of {adjective}")
            self.add_noun(self.rng.choice(CONTAINERS[container]), "mass", False)
            self.antecedent = ("thing", plural)  # "two bowls of soup that are ...": the bowls
        else:
            self.add(f"{self.rng.choice(MASS_DETERMINERS)} {adjective}")
            self.add_noun(self.rng.choice(MASS_NOUNS), "mass", False)

    def prepositional_phrase(self, prepositions: list[tuple[str, str]]) -> None:
        preposition, kind = self.rng.choice(prepositions)
        self.add(preposition)
        self.noun_phrase(kind)

    def expand(self, template: str) -> None:
        """Append `template`, expanding each {placeholder}; other words are copied."""
        for word in template.split():
            if not word.startswith("{"):
                self.add(word)
            elif word == "{food}":
                self.food_phrase()
            elif word == "{pp}":
                self.prepositional_phrase(LOCATIVE_PREPOSITIONS)
            elif word == "{adjective}":
                very = "very " if self.rng.random() < 0.15 else ""
                self.add(very + self.rng.choice(PREDICATE_ADJECTIVES))
            elif word == "{progressive}":
                self.expand(self.rng.choice(PROGRESSIVES))
            elif word == "{participle}":
                self.expand(self.rng.choice(PARTICIPLES))
            elif word == "{base}":  # the plural present is the bare form: "does not eat"
                forms, complement = self.rng.choice(ACTION_VERBS)
                self.expand(f"{forms.plural} {complement}")
            else:
                self.noun_phrase(word.strip("{}"))

    def subject_relative_clause(self, restrictive: bool) -> None:
        """"that lives near the river" or ", which already ate a bunch of food ,"."""
        kind, plural = self.antecedent
        pronoun = "who" if kind == "person" else ("that" if restrictive else "which")
        forms, complement = self.rng.choice(VERBS_BY_ANTECEDENT[kind])
        past = self.coin()
        adverb = self.rng.choice(ADVERBS_PAST if past else ADVERBS_PRESENT) if self.rng.random() < 0.3 else ""
        self.add(pronoun if restrictive else f", {pronoun}")
        self.add(f"{adverb} {agreeing_verb(forms, plural, past)}")
        self.expand(complement)
        self.add("" if restrictive else ",")

    def object_relative_clause(self) -> None:
        """"that the farmers saw": the verb agrees with the clause's own subject."""
        self.add("that")
        self.noun_phrase("animate")
        _, plural = self.antecedent  # now the clause's subject
        self.add(agreeing_verb(self.rng.choice(OBJECT_CLAUSE_VERBS), plural, self.coin()))

    def modifiers(self, count: int) -> None:
        """Only the last modifier may be a comma clause or an object clause: after either, the next
        modifier would have no clear noun to attach to."""
        for position in range(count):
            last = position == count - 1
            choice = self.rng.choices(["pp", "restrictive", "nonrestrictive", "object"],
                                      weights=[40, 30, 20, 10] if last else [55, 45, 0, 0])[0]
            if choice == "pp":
                self.prepositional_phrase(MODIFIER_PREPOSITIONS)
            elif choice == "object":
                self.object_relative_clause()
            else:
                self.subject_relative_clause(restrictive=choice == "restrictive")


def generate_sentence(rng: random.Random) -> Sentence:
    """Subject, modifiers, agreeing main verb, complement, optional time phrase, "."."""
    builder = SentenceBuilder(rng)
    subject_plural = builder.coin()
    builder.noun_phrase("animate", subject_plural)
    subject_index = builder.nouns[0][0]
    builder.modifiers(rng.choices(range(len(MODIFIER_COUNT_WEIGHTS)), weights=MODIFIER_COUNT_WEIGHTS)[0])
    weights = [weight for *_, weight in MAIN_PREDICATES]
    forms, complement, _ = rng.choices(MAIN_PREDICATES, weights=weights)[0]
    past = forms == BE and builder.coin()  # only "be" shows number in the past tense (was/were)
    verb_index = len(builder.tokens)
    builder.add(agreeing_verb(forms, subject_plural, past))
    builder.expand(complement)
    if rng.random() < 0.2:
        builder.add(rng.choice(TIMES_PAST if past else TIMES_PRESENT))
    builder.add(".")
    tokens = tuple(builder.tokens)
    return Sentence(
        tokens=tokens, subject_index=subject_index, subject_plural=subject_plural, verb_index=verb_index,
        verb_other_form=agreeing_verb(forms, not subject_plural, past),
        words_between=sum(token not in PUNCTUATION for token in tokens[subject_index + 1:verb_index]),
        attractors=sum(subject_index < index < verb_index and plural != subject_plural
                       for index, plural in builder.nouns))


def generate_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[str]]:
    """Each split's lines in turn; no line occurs twice in the corpus, so no valid or test sentence
    is a training sentence."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[str]] = {}
    for name, size in sizes.items():
        splits[name] = []
        while len(splits[name]) < size:
            line = generate_sentence(rng).text()
            if line not in seen:
                seen.add(line)
                splits[name].append(line)
    return splits


def generate_pairs(seed: int, per_attractor_count: int, exclude: set[str]) -> list[tuple[str, str, int, int]]:
    """(correct, wrong, words between subject and verb, attractors) for `per_attractor_count` sentences
    with each of 0, 1, 2 and 3+ attractors, none in `exclude` (the training lines) or repeated. Its own
    RNG, so the corpus splits do not depend on it."""
    rng = random.Random(seed)
    seen = set(exclude)
    wanted = {count: per_attractor_count for count in range(4)}
    rows = []
    while any(wanted.values()):
        sentence = generate_sentence(rng)
        line, bucket = sentence.text(), min(sentence.attractors, 3)
        if wanted[bucket] and line not in seen:
            seen.add(line)
            wanted[bucket] -= 1
            rows.append((line, " ".join(sentence.with_wrong_verb()), sentence.words_between, sentence.attractors))
    return rows


def write_pairs(path: Path, rows: list[tuple[str, str, int, int]]) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as file:
        file.write("".join("\t".join(map(str, row)) + "\n" for row in [PAIRS_HEADER, *rows]))


def report(splits: dict[str, list[str]], out: Path) -> str:
    """A Markdown table of lines, tokens, vocabulary and bytes per split, for the README."""
    rows = ["| split | lines | tokens | vocabulary | bytes |", "|---|---:|---:|---:|---:|"]
    vocabularies = {name: {token for line in lines for token in line.split()}
                    for name, lines in splits.items()}
    for name, lines in splits.items():
        tokens = sum(len(line.split()) for line in lines)
        size = (out / f"{name}.txt").stat().st_size
        rows.append(f"| {name} | {len(lines):,} | {tokens:,} | {len(vocabularies[name]):,} | {size:,} |")
    every_type = set().union(*vocabularies.values())
    rows.append(f"\nvocabulary of all splits: {len(every_type)} types (punctuation included); "
                f"types outside train: {len(every_type - vocabularies.get('train', set()))}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path("corpora/agreement"))
    for split, default in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}-sentences", type=int, default=default)
    parser.add_argument("--pairs-seed", type=int, default=5678, help="seed of the minimal pairs' own RNG")
    parser.add_argument("--pairs-per-attractor-count", type=int, default=DEFAULT_PAIRS_PER_ATTRACTOR_COUNT,
                        help="pairs with 0, 1, 2 and 3+ attractors each; 0 writes no pairs.tsv")
    arguments = parser.parse_args()
    sizes = {split: getattr(arguments, f"{split}_sentences") for split in DEFAULT_SIZES}
    splits = generate_splits(arguments.seed, sizes)
    arguments.out.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        # newline="\n" so the bytes are the same on every platform.
        with open(arguments.out / f"{name}.txt", "w", encoding="ascii", newline="\n") as file:
            file.write("".join(line + "\n" for line in lines))
    print(report(splits, arguments.out))
    if arguments.pairs_per_attractor_count > 0:
        rows = generate_pairs(arguments.pairs_seed, arguments.pairs_per_attractor_count,
                              exclude=set(splits.get("train", [])))
        write_pairs(arguments.out / "pairs.tsv", rows)
        print(f"\npairs.tsv: {len(rows):,} minimal pairs, none of whose correct sentences is in train.txt")


if __name__ == "__main__":
    main()
