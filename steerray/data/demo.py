"""The built-in ``demo`` source: offline SteerLM conversations whose labels really depend on the text.

It is the embedded default for the README's pipeline on a machine without the hub, and a controlled
data set on which a reward model and a steered SFT model can learn something measurable in minutes on
a CPU. It is not a stand-in for real data: the language is templated and the topics few.

Each answer is assembled from sentence banks by a few hidden knobs; the nine labels are then computed
from the answer itself, so each attribute has a visible cause:

- verbosity: the answer's word count (bucketed 0-4); the length asked for is uniform over the scale, and
  brief answers open with "In short:"-style words, detailed ones with "Let me explain..." and linked points;
- complexity: share of technical sentences and long words;
- correctness: a wrong fact lowers it (one draw per answer, so long answers are not less correct);
- helpfulness: correct, coherent, polite content at any length is a 4; a deflection ("I cannot help
  with that") is 0;
- coherence: repeated sentences and non-sequiturs lower it;
- toxicity: rude remarks raise it; humor: jokes; creativity: metaphors;
- quality: helpfulness, correctness and coherence together, minus toxicity.

Conversations are single-turn, or two-turn with a follow-up question on the same topic (about a third).
Generation is deterministic per (seed, index), so any worker can make any row.
"""

from __future__ import annotations

import random
from typing import Any

from steerray.attributes import encode_label
from steerray.templates import SYSTEM_PROMPT, make_conversation

# topic: (question stem, simple true facts, technical true facts, false facts)
TOPICS: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "the sky": ("why the sky is blue", [
        "Sunlight contains every colour of light.",
        "Blue light is scattered by the air more than red light.",
        "That scattered blue light reaches our eyes from every direction, so the whole sky looks blue."],
        ["This effect is called Rayleigh scattering, whose strength grows with the inverse fourth power of the wavelength.",
         "At sunset the optical path through the atmosphere lengthens, so shorter wavelengths are depleted and reds dominate."],
        ["The sky is blue because it reflects the colour of the oceans.", "Blue light travels faster than red light in air."]),
    "photosynthesis": ("how photosynthesis works", [
        "Plants use sunlight to make their own food.",
        "They take in water through their roots and carbon dioxide through their leaves.",
        "The process releases oxygen into the air."],
        ["Chlorophyll in the thylakoid membranes absorbs photons and drives the light-dependent reactions that produce ATP and NADPH.",
         "The Calvin cycle then fixes carbon dioxide into three-carbon sugars using the enzyme RuBisCO."],
        ["Plants get all of their food from the soil.", "Photosynthesis happens mainly in the roots of a plant."]),
    "the heart": ("how the human heart works", [
        "The heart is a muscle that pumps blood around the body.",
        "It has four chambers, two on the left and two on the right.",
        "Blood picks up oxygen in the lungs and the heart sends it to the rest of the body."],
        ["The sinoatrial node generates the electrical impulses that set the heart's rhythm.",
         "Valves such as the mitral and aortic valves keep blood flowing in one direction during systole and diastole."],
        ["The heart has six chambers.", "The heart pumps air into the lungs."]),
    "volcanoes": ("what causes volcanoes to erupt", [
        "Deep under the ground there is very hot melted rock called magma.",
        "When pressure builds up, the magma pushes its way to the surface.",
        "Once it reaches the surface it is called lava."],
        ["Volatile gases such as water vapour and carbon dioxide exsolve from the magma as it rises, and their expansion drives explosive eruptions.",
         "Most volcanism is concentrated at subduction zones, divergent plate boundaries and mantle plume hotspots."],
        ["Volcanoes erupt because the moon pulls on them.", "Lava is cold when it first comes out of a volcano."]),
    "saving money": ("how to save money each month", [
        "Write down what you spend for a month to see where your money goes.",
        "Set aside a fixed amount as soon as you are paid.",
        "Cut back on small things you buy often, like takeaway coffee."],
        ["Automating transfers into a high-yield savings account exploits present bias by removing the monthly decision.",
         "A zero-based budget allocates every unit of income to a category, which makes discretionary leakage visible."],
        ["Keeping cash under the mattress is the best way to grow savings.", "Credit cards help you save because you pay later."]),
    "learning a language": ("how to learn a new language", [
        "Practise a little every day instead of a lot once a week.",
        "Learn the most common words first.",
        "Talk with native speakers as early as you can, even if you make mistakes."],
        ["Spaced repetition schedules reviews just before predicted forgetting, which maximises retention per minute studied.",
         "Comprehensible input slightly above your current level drives acquisition more efficiently than explicit grammar drills."],
        ["Adults cannot learn new languages after the age of twenty.", "Reading grammar books alone is enough to become fluent."]),
    "sleep": ("why sleep is important", [
        "Sleep lets your body and brain rest and recover.",
        "Most adults need about seven to nine hours each night.",
        "Poor sleep makes it harder to concentrate the next day."],
        ["During slow-wave sleep the glymphatic system clears metabolic waste such as beta-amyloid from the brain.",
         "REM sleep is associated with memory consolidation and emotional regulation through hippocampal-neocortical replay."],
        ["Adults only need three hours of sleep a night.", "Sleeping less makes your memory stronger."]),
    "exercise": ("how to start exercising", [
        "Start with short walks and slowly make them longer.",
        "Pick an activity you enjoy so that you keep doing it.",
        "Rest days help your muscles recover."],
        ["Progressive overload, a gradual increase in training volume or intensity, drives neuromuscular and cardiovascular adaptation.",
         "Zone two aerobic training improves mitochondrial density and fat oxidation with little recovery cost."],
        ["You should exercise as hard as possible every single day from the start.", "Stretching before running prevents all injuries."]),
    "the internet": ("how the internet works", [
        "The internet is a huge network of computers connected together.",
        "Information is sent in small pieces called packets.",
        "Each device has an address so the packets know where to go."],
        ["The TCP/IP suite splits data into packets that routers forward hop by hop using BGP-learned routes.",
         "DNS resolves human-readable domain names into IP addresses through a hierarchy of authoritative name servers."],
        ["The internet is stored on one giant computer in America.", "Emails travel through telephone wires as sound."]),
    "recycling": ("why recycling matters", [
        "Recycling turns old materials into new products.",
        "It means less rubbish goes to landfill.",
        "It saves energy compared with making things from scratch."],
        ["Recycling aluminium needs about five percent of the energy of primary smelting from bauxite.",
         "Contamination in single-stream collection lowers the purity of recovered material and its resale value."],
        ["All plastic can be recycled forever without losing quality.", "Recycling uses more energy than making new glass from sand."]),
    "bread": ("how to bake bread at home", [
        "Mix flour, water, salt and yeast into a dough.",
        "Knead the dough and let it rise until it doubles in size.",
        "Bake it in a hot oven until the crust is golden."],
        ["Kneading aligns gluten proteins into an elastic network that traps carbon dioxide produced by yeast fermentation.",
         "A hydration of around seventy percent and a long cold proof develop flavour through slower enzymatic activity."],
        ["Bread rises because of the salt.", "You should bake bread at a very low temperature for six hours."]),
    "the moon": ("why the moon has phases", [
        "The moon does not make its own light; it reflects sunlight.",
        "As the moon goes around the Earth we see different parts of its lit side.",
        "A full cycle of phases takes about a month."],
        ["The synodic month of about 29.5 days is longer than the sidereal month because the Earth moves along its orbit.",
         "The moon is tidally locked, so the same hemisphere always faces the Earth."],
        ["The phases are caused by the Earth's shadow.", "The moon makes its own light like a small sun."]),
    "vaccines": ("how vaccines work", [
        "A vaccine teaches your immune system to recognise a germ.",
        "It does this without making you really sick.",
        "If the real germ comes later, your body can fight it off faster."],
        ["Vaccines present antigens that prime B cells and T cells, producing long-lived memory lymphocytes.",
         "mRNA vaccines deliver lipid-encapsulated transcripts that host ribosomes translate into the target antigen."],
        ["Vaccines work by killing all bacteria in the body.", "Vaccines change your DNA permanently."]),
    "time management": ("how to manage my time better", [
        "Make a short list of the most important tasks each morning.",
        "Do the hardest task first, when you have the most energy.",
        "Turn off notifications while you work."],
        ["Timeboxing allocates fixed calendar slots to tasks, which counters Parkinson's law.",
         "The Eisenhower matrix separates urgency from importance so that reactive work does not crowd out strategic work."],
        ["Multitasking always makes you finish work faster.", "Working without any breaks is the most productive approach."]),
    "rainbows": ("how rainbows form", [
        "Rainbows appear when sunlight shines through raindrops.",
        "The light bends and splits into different colours.",
        "You see a rainbow when the sun is behind you and rain is in front of you."],
        ["Dispersion in water droplets separates wavelengths, and a single internal reflection produces the primary bow at about 42 degrees.",
         "A secondary bow arises from two internal reflections, which reverses the colour order."],
        ["Rainbows are made of coloured water.", "You can walk to the end of a rainbow."]),
    "electric cars": ("how electric cars work", [
        "Electric cars run on a big battery instead of petrol.",
        "The battery powers an electric motor that turns the wheels.",
        "You charge the car by plugging it in."],
        ["Lithium-ion cells store energy through intercalation of lithium ions between graphite anodes and metal-oxide cathodes.",
         "Regenerative braking runs the motor as a generator, recovering kinetic energy into the battery."],
        ["Electric cars need to be refuelled with petrol every week.", "Electric motors are less efficient than petrol engines."]),
}

FOLLOW_UPS = ["Can you explain that in more detail?", "Can you give me an example?", "Why is that?",
              "Could you make it simpler?", "What should I remember most?"]
QUESTION_FORMS = ["Can you explain {q}?", "Please tell me {q}.", "I've always wondered {q}. Any idea?",
                  "Explain {q} to me.", "What can you tell me about {q}?"]
SENTENCES_FOR_TARGET = {0: (1,), 1: (2,), 2: (3, 4), 3: (5, 6), 4: (7, 8)}  # target length -> content sentences
BRIEF_OPENERS = ["In short:", "Briefly:", "Quick answer:"]
DETAILED_OPENERS = ["Here is a detailed explanation.", "Let me explain this step by step.",
                    "There is a lot to say about this."]
LINKS = ["Also,", "In addition,", "On top of that,", "Moreover,", "Beyond that,"]
FILLERS = ["It is worth keeping in mind.", "Many people find this surprising.", "This is a common question.",
           "There is more to it, but that is the main idea."]
# A technical answer stays technical when it runs long: without these, a long answer exhausts the two
# technical facts of its topic and its complexity falls with its length (complexity 4 at verbosity 4 would
# never occur, and steering verbosity at the serving defaults would ask for an unseen label).
TECHNICAL_FILLERS = ["The underlying mechanism is well characterised by quantitative experimental measurements.",
                     "Specialists distinguish several interacting subsystems with characteristic timescales.",
                     "Contemporary research continues refining these theoretical explanations considerably.",
                     "Experimental verification requires carefully controlled, reproducible methodology."]
DEFLECTIONS = ["I am not able to help with that.", "I don't really know, sorry.",
               "You should look that up somewhere else.", "That is not something I can answer."]
OFF_TOPIC = ["My favourite colour is green.", "Bananas are a good source of potassium.",
             "The weather has been strange lately."]
JOKES = ["Why did the scarecrow win an award? Because he was outstanding in his field!",
         "I would tell you a chemistry joke, but I know I wouldn't get a reaction.",
         "Parallel lines have so much in common; it's a shame they'll never meet."]
RUDE = ["Honestly, this is a stupid question.", "Anyone with half a brain would know this.",
        "I can't believe you need to ask, idiot."]
METAPHORS = ["Think of it as a river of ideas flowing toward the sea of understanding.",
             "Imagine a choir in which every voice is a tiny messenger.",
             "It is like a lantern passing its flame from hand to hand through the night."]


def _bucket(value: float, edges: tuple[float, ...]) -> int:
    return sum(value >= edge for edge in edges)


def _answer(rng: random.Random, topic: str) -> tuple[str, dict[str, int]]:
    _, simple, technical, false = TOPICS[topic]
    target = rng.randrange(5)  # the length asked for, uniform over the verbosity scale
    length = rng.choice(SENTENCES_FOR_TARGET[target])  # content sentences
    technical_share = rng.choice([0.0, 0.0, 0.3, 0.6, 1.0])
    deflect = rng.random() < 0.08
    sentences: list[str] = []
    wrong = repeats = off_topic = jokes = rude = metaphors = 0
    if deflect:
        sentences.append(rng.choice(DEFLECTIONS))
    else:
        pool_simple, pool_tech = list(simple), list(technical)
        rng.shuffle(pool_simple)
        rng.shuffle(pool_tech)
        for _ in range(length):
            if rng.random() < technical_share and pool_tech:
                sentences.append(pool_tech.pop())
            elif pool_simple:
                sentences.append(pool_simple.pop())
            elif pool_tech:
                sentences.append(pool_tech.pop())
            else:
                sentences.append(rng.choice(TECHNICAL_FILLERS if rng.random() < technical_share else FILLERS))
        # One draw per answer, not per sentence: a long answer is not likelier to be wrong, so
        # correctness (and quality) do not drag verbosity along with them.
        if rng.random() < 0.15:
            sentences[rng.randrange(len(sentences))] = rng.choice(false)
            wrong += 1
        if target >= 3:  # detailed answers chain their points, as long answers tend to
            sentences = [sentences[0]] + [_linked(rng, s) if rng.random() < 0.6 else s for s in sentences[1:]]
        if rng.random() < 0.12:
            sentences.append(rng.choice(sentences))
            repeats += 1
        if rng.random() < 0.08:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(OFF_TOPIC))
            off_topic += 1
        # The opening words announce the length, as a chat model's do ("Briefly: ..." vs "Let me explain
        # step by step."): the label is then visible in the very first tokens, which a small model learns
        # to follow within a few hundred examples (the stop decision alone it did not, on a CPU budget).
        if target <= 1:
            sentences.insert(0, rng.choice(BRIEF_OPENERS))
        elif target >= 3:
            sentences.insert(0, rng.choice(DETAILED_OPENERS))
    if rng.random() < 0.12:
        sentences.append(rng.choice(JOKES))
        jokes += 1
    if rng.random() < 0.08:
        sentences.insert(0, rng.choice(RUDE))
        rude += 1 + (rng.random() < 0.3)
    if rng.random() < 0.12:
        sentences.append(rng.choice(METAPHORS))
        metaphors += 1 + (rng.random() < 0.3)
    text = " ".join(sentences)
    labels = _labels(text, set(technical), deflect, wrong, repeats + off_topic, jokes, rude, metaphors)
    return text, labels


def _linked(rng: random.Random, sentence: str) -> str:
    first_word = sentence.split(" ", 1)[0]
    if first_word[:1].isupper() and first_word[1:].islower():  # "The" -> "the", but keep "DNS"
        sentence = sentence[0].lower() + sentence[1:]
    return f"{rng.choice(LINKS)} {sentence}"


def _labels(text: str, technical: set[str], deflect: bool, wrong: int, incoherent: int, jokes: int,
            rude: int, metaphors: int) -> dict[str, int]:
    words = text.split()
    long_words = sum(len(w.strip(".,!?;:")) >= 9 for w in words) / max(len(words), 1)
    technical_sentences = sum(s in text for s in technical)
    verbosity = _bucket(len(words), (25, 45, 70, 100))
    complexity = min(4, _bucket(long_words, (0.06, 0.12, 0.18, 0.25)) + (technical_sentences >= 2))
    correctness = max(0, 4 - 2 * wrong) if not deflect else 2
    coherence = max(0, 4 - 2 * incoherent)
    # Helpful = on topic, correct and polite, at any length: a one-line answer can be a 4, so a user can
    # ask for helpfulness 4 at verbosity 0 (the serving defaults) and get what the data taught.
    helpfulness = 0 if deflect else max(0, min(4, 2 + 2 * (wrong == 0) - incoherent - rude))
    toxicity = min(4, 2 * rude)
    quality = max(0, min(4, round((helpfulness + correctness + coherence) / 3) - rude))
    return {"quality": quality, "toxicity": toxicity, "humor": min(4, 2 * jokes),
            "creativity": min(4, 2 * metaphors), "helpfulness": helpfulness, "correctness": correctness,
            "coherence": coherence, "complexity": complexity, "verbosity": verbosity}


def demo_conversation(index: int, seed: int = 10) -> dict[str, Any]:
    """The ``index``-th demo conversation (deterministic for a given seed)."""
    rng = random.Random(f"steerray-demo:{seed}:{index}")
    topic = rng.choice(sorted(TOPICS))
    question = rng.choice(QUESTION_FORMS).format(q=TOPICS[topic][0])
    answer, labels = _answer(rng, topic)
    turns: list[tuple[str, str, str | None]] = [("User", question, None), ("Assistant", answer, encode_label(labels))]
    if rng.random() < 0.33:
        follow_answer, follow_labels = _answer(rng, topic)
        turns += [("User", rng.choice(FOLLOW_UPS), None), ("Assistant", follow_answer, encode_label(follow_labels))]
    conversation = make_conversation(turns, SYSTEM_PROMPT)
    conversation["id"] = f"demo-{index}"
    conversation["topic"] = topic
    return conversation
