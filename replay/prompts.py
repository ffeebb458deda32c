"""What the base model is asked when it writes its own replay text: topics, styles, chat prompts.

Owns only data and the deterministic way it is combined: seed topics and writing styles for the
synthetic corpus, and varied chat prompts (questions, instructions, arithmetic, writing, code)
for behaviour rehearsal. Knows nothing of how the model is reached.
"""

from __future__ import annotations

import itertools
import random

TOPICS = (
    "photosynthesis", "volcanoes", "the Roman Empire", "the printing press", "black holes", "honey bees",
    "the French Revolution", "vaccines", "coral reefs", "the stock market", "jazz music", "the Moon landing",
    "plate tectonics", "the human heart", "electric cars", "the Great Wall of China", "antibiotics",
    "the internet", "rainforests", "the Olympic Games", "chess", "baking bread", "the water cycle",
    "ancient Egypt", "solar panels", "the immune system", "Shakespeare", "climate change", "glaciers",
    "the periodic table", "dinosaurs", "the Renaissance", "bicycles", "coffee", "the Silk Road", "tides",
    "earthquakes", "democracy", "the human brain", "penguins", "the steam engine", "origami", "tea",
    "the Amazon river", "vitamins", "computer programming", "the Industrial Revolution", "mountains",
    "deserts", "the solar system", "gardening", "the violin", "football", "mathematics", "bridges",
    "trains", "the ocean floor", "language learning", "impressionist painting", "rice farming", "sleep",
    "recycling", "wolves", "the Pyramids of Giza", "DNA", "airplanes", "the Arctic", "cheese making",
    "public libraries", "the telephone", "hurricanes", "the Byzantine Empire", "bees and pollination",
    "cryptography", "the printing of money", "marathon running", "elephants", "the Milky Way", "salt",
    "the Vikings", "friendship", "museums", "the compass", "wind energy", "the piano", "pizza", "rivers",
    "architecture", "the Moon", "spiders", "healthy breakfast", "ancient Greece", "submarines", "maps",
    "yoga", "the camera", "snow", "whales", "the calendar", "television", "mushrooms", "lighthouses",
)

# (chat instruction, completion prefix) for each style; {topic} is filled in.
STYLES = (
    ("Write an encyclopedia-style paragraph about {topic}.", "An encyclopedia article about {topic}.\n\n"),
    ("Explain how {topic} works to a curious student.", "A teacher explains {topic} to a curious student.\n\n"),
    ("Describe the history of {topic}.", "The history of {topic}\n\n"),
    ("Write a short story that involves {topic}.", "A short story about {topic}.\n\n"),
    ("List five interesting facts about {topic}, with a sentence on each.", "Five facts about {topic}:\n\n1."),
    ("Write a short news report about {topic}.", "News report: {topic}\n\n"),
    ("Write a dialogue between two friends talking about {topic}.", "Two friends talk about {topic}.\n\n"),
    ("Write a practical guide related to {topic}.", "A practical guide: {topic}\n\n"),
)

COUNTRIES = ("France", "Japan", "Italy", "Germany", "Brazil", "Canada", "Egypt", "Spain", "India", "Kenya",
             "Australia", "Mexico", "Norway", "Peru", "Poland", "Thailand")
CONCEPTS = ("gravity", "inflation", "photosynthesis", "the water cycle", "machine learning", "evolution",
            "electricity", "supply and demand", "the seasons", "a rainbow", "vaccination", "compound interest",
            "the greenhouse effect", "recursion", "democracy", "friction")
ACTIVITIES = ("studying for an exam", "sleeping better", "saving money", "learning to cook", "running a first 5k",
              "writing a cover letter", "staying focused at work", "keeping a houseplant alive",
              "making new friends", "travelling on a budget", "public speaking", "learning a new language")
WORDS = ("serendipity", "ephemeral", "resilience", "ubiquitous", "nostalgia", "meticulous", "benevolent",
         "paradox", "empathy", "candid", "frugal", "ambiguous")
THINGS = ("the sea", "autumn leaves", "a lost key", "the city at night", "an old dog", "the first snow",
          "a lighthouse", "morning coffee", "a train journey", "the stars", "a garden", "rain on a window")
CODE_TASKS = ("reverses a string", "checks whether a number is prime", "returns the largest item in a list",
              "counts the vowels in a word", "computes the factorial of n", "removes duplicates from a list",
              "converts Celsius to Fahrenheit", "checks whether a word is a palindrome")
PAIRS = (("a virus", "a bacterium"), ("weather", "climate"), ("a lake", "a sea"), ("speed", "velocity"),
         ("a simile", "a metaphor"), ("RAM", "storage"), ("a crocodile", "an alligator"), ("baking", "frying"))
BOOKS = ("Romeo and Juliet", "Pride and Prejudice", "Don Quixote", "The Odyssey", "War and Peace",
         "Hamlet", "Moby-Dick", "The Little Prince")
ANIMALS = ("spider", "cat", "bird", "horse", "insect", "octopus", "dog", "starfish")
FIXED = ("Hello! How are you today?", "Who are you?", "Can you help me plan a birthday party?",
         "Tell me a joke.", "What should I cook for dinner tonight?", "Summarize what a CPU does in one sentence.",
         "Give me a good name for a pet goldfish.", "What day comes after Monday?")


def corpus_asks(seed: int) -> list[tuple[str, str, str]]:
    """(topic, chat instruction, completion prefix) for every topic × style, shuffled by `seed`."""
    asks = [(topic, chat.format(topic=topic), prefix.format(topic=topic))
            for topic, (chat, prefix) in itertools.product(TOPICS, STYLES)]
    random.Random(seed).shuffle(asks)
    return asks


def chat_prompts(seed: int) -> list[str]:
    """Varied chat prompts, shuffled by `seed` (every kind is spread through the list)."""
    rng = random.Random(seed)
    prompts = [f"What is the capital of {country}?" for country in COUNTRIES]
    prompts += [f"Explain {concept} in simple terms." for concept in CONCEPTS]
    prompts += [f"Give me three tips for {activity}." for activity in ACTIVITIES]
    prompts += [f'What does the word "{word}" mean?' for word in WORDS]
    prompts += [f"Write a short poem about {thing}." for thing in THINGS]
    prompts += [f"Write a Python function that {task}." for task in CODE_TASKS]
    prompts += [f"What is the difference between {a} and {b}?" for a, b in PAIRS]
    prompts += [f"Who wrote {book}?" for book in BOOKS]
    prompts += [f"How many legs does a {animal} have?" for animal in ANIMALS]
    prompts += [f"What is {rng.randint(2, 99)} plus {rng.randint(2, 99)}?" for _ in range(8)]
    prompts += [f"What is {rng.randint(2, 12)} times {rng.randint(2, 12)}?" for _ in range(8)]
    prompts += list(FIXED)
    rng.shuffle(prompts)
    return prompts
