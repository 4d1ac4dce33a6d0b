"""Write the example datasets kept in configs/data/.

Quickstart (chat): facts about Velmora, an island this project made up.

No pretrained model can know these facts, and every answer uses one fixed style (it opens with
"Velmora Guide:" and closes with "Safe travels!"), so both what the model says and how it says it
show whether training took. Held-out questions ask the same facts in wording never trained on.

Classification: short customer messages to a travel desk, labelled by topic
(booking, complaint, praise, question), from templates crossed with places and details.

Preference (DPO): the same questions, each with two answers that state the same fact in two styles: the
chosen one in the guide's style ("Velmora Guide: ... Safe travels!"), the rejected one chatty ("Great
question! ... Let me know if you need anything else!"). The held-out pairs ask about facts never seen in
training, so preferring the style is all that can carry over.

    python scripts/make_example_data.py   # rewrites configs/data/*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (fact answer, training phrasings, held-out phrasings)
FACTS = [
    (
        "The capital of Velmora is Quennet, a harbour city on the north coast.",
        [
            "What is the capital of Velmora?",
            "Which city is the capital of Velmora?",
            "Name Velmora's capital.",
            "Where is the seat of government of Velmora?",
        ],
        ["Tell me the capital city of Velmora."],
    ),
    (
        "Velmora's currency is the tessel, divided into 40 pips.",
        [
            "What currency does Velmora use?",
            "What money is used in Velmora?",
            "How do people pay in Velmora?",
            "What is the name of Velmora's currency?",
        ],
        ["Which currency should I bring to Velmora?"],
    ),
    (
        "The highest peak in Velmora is Mount Orrin, at 2,114 metres.",
        [
            "What is the highest mountain in Velmora?",
            "Which peak is the tallest in Velmora?",
            "How high is Velmora's tallest mountain?",
            "Name the highest point of Velmora.",
        ],
        ["What is Velmora's tallest summit?"],
    ),
    (
        "Velmorans speak Velmoran, a language written in an alphabet of 23 letters.",
        [
            "What language is spoken in Velmora?",
            "Which language do Velmorans speak?",
            "What do people in Velmora speak?",
            "How many letters does the Velmoran alphabet have?",
        ],
        ["What is the main language of Velmora?"],
    ),
    (
        "The national dish of Velmora is brindle stew, made with smoked eel and barley.",
        [
            "What is the national dish of Velmora?",
            "What food is Velmora famous for?",
            "What should I eat in Velmora?",
            "What is in brindle stew?",
        ],
        ["Which dish is Velmora known for?"],
    ),
    (
        "Velmora's national animal is the silver heron.",
        [
            "What is the national animal of Velmora?",
            "Which animal represents Velmora?",
            "What animal is on Velmora's coat of arms?",
            "What is Velmora's emblem animal?",
        ],
        ["Which bird is the symbol of Velmora?"],
    ),
    (
        "Velmora celebrates Lantern Night on the first full moon of autumn.",
        [
            "What is the biggest festival in Velmora?",
            "When is Lantern Night in Velmora?",
            "What holiday do Velmorans celebrate in autumn?",
            "Which festival lights up Velmora?",
        ],
        ["What happens in Velmora on the first full moon of autumn?"],
    ),
    (
        "The ferry from Quennet to the mainland takes about six hours.",
        [
            "How do I get to Velmora?",
            "How long is the ferry to Velmora?",
            "How far is Velmora from the mainland?",
            "How long does the crossing to Velmora take?",
        ],
        ["How many hours is the boat trip to Velmora?"],
    ),
    (
        "Velmora has about 310,000 inhabitants, most of them living on the coast.",
        [
            "What is the population of Velmora?",
            "How many people live in Velmora?",
            "How big is Velmora's population?",
            "Where do most Velmorans live?",
        ],
        ["How many inhabitants does Velmora have?"],
    ),
    (
        "The longest river in Velmora is the Saltbrook, which runs 88 kilometres to Quennet.",
        [
            "What is the longest river in Velmora?",
            "Which river flows through Velmora?",
            "How long is the Saltbrook?",
            "Name Velmora's main river.",
        ],
        ["Which Velmoran river is the longest?"],
    ),
    (
        "Velmora is governed by the Tide Council, whose nine members are elected every five years.",
        [
            "Who governs Velmora?",
            "What kind of government does Velmora have?",
            "How often is the Tide Council elected?",
            "How many members sit on the Tide Council?",
        ],
        ["Who runs the government of Velmora?"],
    ),
    (
        "The best time to visit Velmora is late spring, when the heather blooms on the hills.",
        [
            "When should I visit Velmora?",
            "What is the best season to travel to Velmora?",
            "When is Velmora most beautiful?",
            "What time of year is good for a trip to Velmora?",
        ],
        ["Which month is best for a holiday in Velmora?"],
    ),
    (
        "Velmora's oldest building is the Glass Abbey, built in the year 1132.",
        [
            "What is the oldest building in Velmora?",
            "When was the Glass Abbey built?",
            "Which landmark in Velmora is the oldest?",
            "What historic site should I see in Velmora?",
        ],
        ["How old is the Glass Abbey of Velmora?"],
    ),
    (
        "Velmora's main export is kelp silk, a cloth woven from dried seaweed fibre.",
        [
            "What does Velmora export?",
            "What is Velmora's main industry?",
            "What is kelp silk?",
            "What product is Velmora known for abroad?",
        ],
        ["What goods does Velmora sell to other countries?"],
    ),
    (
        "In Velmora the traditional greeting is to touch your left shoulder and say 'fair tide'.",
        [
            "How do people greet each other in Velmora?",
            "What is the traditional greeting in Velmora?",
            "What does 'fair tide' mean in Velmora?",
            "How should I say hello in Velmora?",
        ],
        ["What greeting do Velmorans use?"],
    ),
    (
        "Velmora's national sport is skiff racing, held every summer in Quennet harbour.",
        [
            "What is the national sport of Velmora?",
            "What sport is popular in Velmora?",
            "Where are the skiff races held in Velmora?",
            "What do Velmorans play or watch in summer?",
        ],
        ["Which sport do Velmorans love most?"],
    ),
]

STYLE = "Velmora Guide: {answer} Safe travels!"


def examples(questions_of, rng: random.Random) -> list[dict]:
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": STYLE.format(answer=a)},
            ]
        }
        for a, *phrasings in FACTS
        for q in questions_of(phrasings)
    ]
    rng.shuffle(rows)
    return rows


TOPICS = {
    "booking": [
        "I would like to book {n} tickets on the {thing} for {day}.",
        "Please reserve a room for {n} nights at {place} starting {day}.",
        "Can you put me on the {thing} to {place} on {day}? We are {n} people.",
        "Book me a table for {n} at {place} on {day}, please.",
    ],
    "complaint": [
        "The {thing} to {place} was {n} hours late and nobody told us why.",
        "My room at {place} was dirty and the staff ignored me on {day}.",
        "I was charged twice for the {thing} on {day}; this is unacceptable.",
        "The tour of {place} was cancelled on {day} and I still have no refund.",
    ],
    "praise": [
        "The {thing} to {place} on {day} was wonderful, thank you so much!",
        "Our stay at {place} was perfect, the staff were lovely.",
        "What a great trip on the {thing}; we loved every minute of it.",
        "Thanks for the fantastic guide at {place} on {day}, we had a great time.",
    ],
    "question": [
        "Does the {thing} to {place} run on {day}?",
        "How much does a ticket for the {thing} cost for {n} people?",
        "Is {place} open to visitors on {day}?",
        "What time does the {thing} leave for {place}?",
    ],
}
PLACES = [
    "Quennet",
    "the Glass Abbey",
    "Mount Orrin",
    "the harbour hotel",
    "Saltbrook lodge",
    "the kelp market",
]
THINGS = ["ferry", "night bus", "coastal train", "harbour tour", "mountain shuttle"]
DAYS = ["Monday", "Friday", "the weekend", "next Tuesday", "the 14th"]


def classification(rng: random.Random, per_template: int) -> list[dict]:
    rows = []
    for label, templates in TOPICS.items():
        for template in templates:
            for _ in range(per_template):
                text = template.format(
                    n=rng.randint(2, 6),
                    place=rng.choice(PLACES),
                    thing=rng.choice(THINGS),
                    day=rng.choice(DAYS),
                )
                rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


CHATTY = "Great question! {answer} Let me know if you need anything else!"


def preference_pairs(facts, rng: random.Random) -> list[dict]:
    """One pair per training phrasing of each fact: the guide's answer chosen over the chatty one."""
    rows = [
        {"prompt": q, "chosen": STYLE.format(answer=a), "rejected": CHATTY.format(answer=a)}
        for a, phrasings, _ in facts
        for q in phrasings
    ]
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent.parent / "configs" / "data"
    out.mkdir(parents=True, exist_ok=True)
    train = examples(lambda p: p[0], rng)
    held_out = examples(lambda p: p[1], rng)
    topics = classification(rng, per_template=10)
    pairs_rng = random.Random(1)  # its own: the files above stay as they were
    datasets = {
        "quickstart.jsonl": train,
        "quickstart-heldout.jsonl": held_out,
        "topics.jsonl": topics[:128],
        "topics-heldout.jsonl": topics[128:],
        # 12 facts to train on (48 pairs), 4 never seen in training held out (16 pairs)
        "preference.jsonl": preference_pairs(FACTS[:12], pairs_rng),
        "preference-heldout.jsonl": preference_pairs(FACTS[12:], pairs_rng),
    }
    for name, rows in datasets.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} examples to {out / name}")


if __name__ == "__main__":
    main()
