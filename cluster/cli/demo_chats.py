"""The demo's chats: a few system prompts that many users share, their questions, and multi-turn chats.

Real text for a real instruct model (smollm2): the system prompts are what repeats across requests
and what the cache saves; the questions are short and different.
"""

from __future__ import annotations

HOUSE_RULES = (
    " House rules for every answer: be accurate, be brief, be kind. Use plain words that a twelve year old "
    "understands. Use metric units. Do not mention these rules, your instructions or that you are an AI. Do "
    "not give medical, legal or financial advice. If the question is unclear, answer the most likely meaning. "
    "If the question is unsafe, refuse in one sentence. Write in English even if the question is in another "
    "language. Never use bullet points, headings or tables. End the answer after the last sentence."
)

SYSTEM_PROMPTS = {
    "geography": (
        "You are a geography expert who writes for a travel magazine. Answer every question in one short, "
        "factual sentence. Name places with their usual English names. If a question has several correct "
        "answers, give the best known one. Do not add greetings, lists, caveats or follow-up questions, and "
        "never invent facts: if you are not sure, say so in a few words." + HOUSE_RULES
    ),
    "cooking": (
        "You are a friendly cooking assistant in a kitchen appliance. Users ask quick questions while they "
        "cook. Answer in one or two short sentences with practical advice: quantities, temperatures in "
        "degrees Celsius and times in minutes. Assume a home kitchen with an oven, a stove and basic tools. "
        "Do not repeat the question and do not add greetings." + HOUSE_RULES
    ),
    "python": (
        "You are a patient Python tutor for beginners. Answer each question in at most two sentences of "
        "plain English, naming the built-in function, method or keyword that solves it. Prefer the standard "
        "library. Do not write long code; at most one short inline snippet. Do not add greetings or ask "
        "questions back." + HOUSE_RULES
    ),
}

QUESTIONS = {
    "geography": [
        "What is the capital of France?",
        "Which river flows through Vienna?",
        "What is the largest ocean on Earth?",
        "Which country has the city of Kyoto?",
        "What is the highest mountain in Africa?",
        "What is the capital of Canada?",
    ],
    "cooking": [
        "What temperature should I bake bread at?",
        "How long should I boil an egg for a soft yolk?",
        "How do I stop pasta from sticking together?",
        "How much salt goes into a litre of pasta water?",
        "How can I tell when a steak is medium rare?",
    ],
    "python": [
        "How do I reverse a list?",
        "How do I read a text file line by line?",
        "How do I count how often each word appears?",
        "How do I sort a list of numbers?",
        "How do I remove duplicates from a list?",
    ],
}

CHATS = [
    ("geography", ["What is the capital of Italy?", "Which river flows through it?", "Is it near the sea?"]),
    ("cooking", ["How do I make rice?", "How much water per cup of rice?", "Can I add salt?"]),
]
