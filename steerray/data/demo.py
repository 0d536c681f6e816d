"""The built-in ``demo`` source: offline SteerLM conversations whose labels really depend on the text.

It is the embedded default for the README's pipeline on a machine without the hub, and a controlled
data set on which a reward model and a steered SFT model can learn something measurable in minutes on
a CPU. It is not a stand-in for real data: the language is templated and the topics few.

Each answer is assembled from sentence banks by independent hidden knobs; the labels are then computed
from the answer itself, so every varied attribute has a visible cause and none drags another along:

- verbosity: the length of the explanation (its content words, not counting jokes, metaphors or remarks,
  bucketed 0-4 at 15/28/42/58 words); the length asked for is uniform over the scale, and the opening words
  announce the measured verbosity: "In short:" at 0-1, "Let me explain this step by step." at 3-4, none at
  2; a long answer asked for chains its points ("Also,", "Moreover,");
- complexity: share of long words and technical sentences in the explanation;
- humor: 0, 2 or 4 for no, one or two jokes, each led by "Here's a joke:";
- creativity: 0, 2 or 4 for no, one or two metaphors, each led by "Poetically put:";
- toxicity: 0, 2 or 4 for no, one or two rude remarks, all opening with "Ugh,";
- every aside comes before the explanation, in a fixed order (remarks, opening words, jokes, metaphors), so
  each label decision is taken in the answer's first sentences, right after the label;
- quality: 4 minus toxicity.

Helpfulness, correctness and coherence are constant (4): every explanation is on topic, correct and in
order. Steering them would need a data set that varies them; this one keeps the demo's budget for the six
above. Conversations are single-turn, or two-turn with a follow-up question on the same topic (about a
third). Generation is deterministic per (seed, index), so any worker can make any row.
"""

from __future__ import annotations

import random
from typing import Any

from steerray.attributes import encode_label
from steerray.templates import SYSTEM_PROMPT, make_conversation

# topic: (question stem, simple facts, technical facts)
TOPICS: dict[str, tuple[str, list[str], list[str]]] = {
    "the sky": ("why the sky is blue", [
        "Sunlight contains every colour of light.",
        "Blue light is scattered by the air more than red light.",
        "That scattered blue light reaches our eyes from every direction, so the whole sky looks blue."],
        ["This effect is called Rayleigh scattering, whose strength grows with the inverse fourth power of the wavelength.",
         "At sunset the optical path through the atmosphere lengthens, so shorter wavelengths are depleted and reds dominate."]),
    "photosynthesis": ("how photosynthesis works", [
        "Plants use sunlight to make their own food.",
        "They take in water through their roots and carbon dioxide through their leaves.",
        "The process releases oxygen into the air."],
        ["Chlorophyll in the thylakoid membranes absorbs photons and drives the light-dependent reactions that produce ATP and NADPH.",
         "The Calvin cycle then fixes carbon dioxide into three-carbon sugars using the enzyme RuBisCO."]),
    "the heart": ("how the human heart works", [
        "The heart is a muscle that pumps blood around the body.",
        "It has four chambers, two on the left and two on the right.",
        "Blood picks up oxygen in the lungs and the heart sends it to the rest of the body."],
        ["The sinoatrial node generates the electrical impulses that set the heart's rhythm.",
         "Valves such as the mitral and aortic valves keep blood flowing in one direction during systole and diastole."]),
    "volcanoes": ("what causes volcanoes to erupt", [
        "Deep under the ground there is very hot melted rock called magma.",
        "When pressure builds up, the magma pushes its way to the surface.",
        "Once it reaches the surface it is called lava."],
        ["Volatile gases such as water vapour and carbon dioxide exsolve from the magma as it rises, and their expansion drives explosive eruptions.",
         "Most volcanism is concentrated at subduction zones, divergent plate boundaries and mantle plume hotspots."]),
    "saving money": ("how to save money each month", [
        "Write down what you spend for a month to see where your money goes.",
        "Set aside a fixed amount as soon as you are paid.",
        "Cut back on small things you buy often, like takeaway coffee."],
        ["Automating transfers into a high-yield savings account exploits present bias by removing the monthly decision.",
         "A zero-based budget allocates every unit of income to a category, which makes discretionary leakage visible."]),
    "learning a language": ("how to learn a new language", [
        "Practise a little every day instead of a lot once a week.",
        "Learn the most common words first.",
        "Talk with native speakers as early as you can, even if you make mistakes."],
        ["Spaced repetition schedules reviews just before predicted forgetting, which maximises retention per minute studied.",
         "Comprehensible input slightly above your current level drives acquisition more efficiently than explicit grammar drills."]),
    "sleep": ("why sleep is important", [
        "Sleep lets your body and brain rest and recover.",
        "Most adults need about seven to nine hours each night.",
        "Poor sleep makes it harder to concentrate the next day."],
        ["During slow-wave sleep the glymphatic system clears metabolic waste such as beta-amyloid from the brain.",
         "REM sleep is associated with memory consolidation and emotional regulation through hippocampal-neocortical replay."]),
    "exercise": ("how to start exercising", [
        "Start with short walks and slowly make them longer.",
        "Pick an activity you enjoy so that you keep doing it.",
        "Rest days help your muscles recover."],
        ["Progressive overload, a gradual increase in training volume or intensity, drives neuromuscular and cardiovascular adaptation.",
         "Zone two aerobic training improves mitochondrial density and fat oxidation with little recovery cost."]),
    "the internet": ("how the internet works", [
        "The internet is a huge network of computers connected together.",
        "Information is sent in small pieces called packets.",
        "Each device has an address so the packets know where to go."],
        ["The TCP/IP suite splits data into packets that routers forward hop by hop using BGP-learned routes.",
         "DNS resolves human-readable domain names into IP addresses through a hierarchy of authoritative name servers."]),
    "recycling": ("why recycling matters", [
        "Recycling turns old materials into new products.",
        "It means less rubbish goes to landfill.",
        "It saves energy compared with making things from scratch."],
        ["Recycling aluminium needs about five percent of the energy of primary smelting from bauxite.",
         "Contamination in single-stream collection lowers the purity of recovered material and its resale value."]),
    "bread": ("how to bake bread at home", [
        "Mix flour, water, salt and yeast into a dough.",
        "Knead the dough and let it rise until it doubles in size.",
        "Bake it in a hot oven until the crust is golden."],
        ["Kneading aligns gluten proteins into an elastic network that traps carbon dioxide produced by yeast fermentation.",
         "A hydration of around seventy percent and a long cold proof develop flavour through slower enzymatic activity."]),
    "the moon": ("why the moon has phases", [
        "The moon does not make its own light; it reflects sunlight.",
        "As the moon goes around the Earth we see different parts of its lit side.",
        "A full cycle of phases takes about a month."],
        ["The synodic month of about 29.5 days is longer than the sidereal month because the Earth moves along its orbit.",
         "The moon is tidally locked, so the same hemisphere always faces the Earth."]),
    "vaccines": ("how vaccines work", [
        "A vaccine teaches your immune system to recognise a germ.",
        "It does this without making you really sick.",
        "If the real germ comes later, your body can fight it off faster."],
        ["Vaccines present antigens that prime B cells and T cells, producing long-lived memory lymphocytes.",
         "mRNA vaccines deliver lipid-encapsulated transcripts that host ribosomes translate into the target antigen."]),
    "time management": ("how to manage my time better", [
        "Make a short list of the most important tasks each morning.",
        "Do the hardest task first, when you have the most energy.",
        "Turn off notifications while you work."],
        ["Timeboxing allocates fixed calendar slots to tasks, which counters Parkinson's law.",
         "The Eisenhower matrix separates urgency from importance so that reactive work does not crowd out strategic work."]),
    "rainbows": ("how rainbows form", [
        "Rainbows appear when sunlight shines through raindrops.",
        "The light bends and splits into different colours.",
        "You see a rainbow when the sun is behind you and rain is in front of you."],
        ["Dispersion in water droplets separates wavelengths, and a single internal reflection produces the primary bow at about 42 degrees.",
         "A secondary bow arises from two internal reflections, which reverses the colour order."]),
    "electric cars": ("how electric cars work", [
        "Electric cars run on a big battery instead of petrol.",
        "The battery powers an electric motor that turns the wheels.",
        "You charge the car by plugging it in."],
        ["Lithium-ion cells store energy through intercalation of lithium ions between graphite anodes and metal-oxide cathodes.",
         "Regenerative braking runs the motor as a generator, recovering kinetic energy into the battery."]),
}

FOLLOW_UPS = ["Can you explain that in more detail?", "Can you give me an example?", "Why is that?",
              "Could you make it simpler?", "What should I remember most?"]
QUESTION_FORMS = ["Can you explain {q}?", "Please tell me {q}.", "I've always wondered {q}. Any idea?",
                  "Explain {q} to me.", "What can you tell me about {q}?"]
SENTENCES_FOR_TARGET = {0: 1, 1: 2, 2: 3, 3: 4, 4: 6}  # length asked for -> content sentences
VERBOSITY_EDGES = (15, 28, 42, 58)  # content words at which verbosity 1, 2, 3, 4 begin
# One fixed lead-in per kind of aside: the label then decides a single, always identical token at the start
# of the answer, which a 135M model learns to follow within a hundred updates; with a dozen different first
# words (the jokes' own) the same decision is spread over as many tokens and learnt several times slower.
BRIEF_OPENERS = ["In short:"]
DETAILED_OPENERS = ["Let me explain this step by step."]
JOKE_LEAD = "Here's a joke:"
METAPHOR_LEAD = "Poetically put:"
LINKS = ["Also,", "In addition,", "On top of that,", "Moreover,", "Beyond that,"]
FILLERS = ["It is worth keeping in mind.", "Many people find this surprising.", "This is a common question.",
           "There is more to it, but that is the main idea."]
# A technical answer stays technical when it runs long: without these, a long answer exhausts the two
# technical facts of its topic and its complexity falls with its length.
TECHNICAL_FILLERS = ["The underlying mechanism is well characterised by quantitative experimental measurements.",
                     "Specialists distinguish several interacting subsystems with characteristic timescales.",
                     "Contemporary research continues refining these theoretical explanations considerably.",
                     "Experimental verification requires carefully controlled, reproducible methodology."]
# Banks of a dozen, so a model learns "tell a joke" rather than three sentences by heart.
JOKES = ["Why did the scarecrow win an award? He was outstanding in his field!",
         "I would tell you a chemistry joke, but I know I wouldn't get a reaction.",
         "Parallel lines have so much in common; it's a shame they'll never meet.",
         "I'm reading a book about anti-gravity, and it's impossible to put down.",
         "Why don't skeletons fight each other? They don't have the guts.",
         "I told my computer a joke, but it needed a few more bytes to get it.",
         "Why did the bicycle fall over? It was two tired.",
         "What do you call a fake noodle? An impasta.",
         "I used to dislike facial hair, but then it grew on me.",
         "Why can't a nose be twelve inches long? Because then it would be a foot.",
         "The maths book looked sad because it had too many problems.",
         "I only know twenty-five letters of the alphabet; I don't know y."]
METAPHORS = ["Think of it as a river of ideas flowing toward the sea of understanding.",
             "Imagine a choir in which every voice is a tiny messenger.",
             "It is like a lantern passing its flame from hand to hand through the night.",
             "Picture a garden where every seed waits for its own season.",
             "It is a quiet clockwork, each gear whispering to the next.",
             "Imagine a library where every book rewrites itself as you read.",
             "Think of a tide that rises one patient grain of sand at a time.",
             "It works like a relay of fireflies carrying light across a field.",
             "Picture a bridge built from countless small promises kept.",
             "It is a dance in which every step makes room for the next.",
             "Imagine a map that redraws itself with every journey.",
             "Think of it as a symphony tuned one instrument at a time."]
RUDE = ["Ugh, this is a stupid question.", "Ugh, anyone with half a brain would know this.",
        "Ugh, I can't believe you need to ask, idiot.", "Ugh, fine, I'll spell it out for you.",
        "Ugh, do you ever think before you ask?", "Ugh, what a lazy question."]
TECHNICAL_SHARES = (0.0, 0.34, 0.67, 1.0)  # of the explanation's sentences, when the topic has enough


def _bucket(value: float, edges: tuple[float, ...]) -> int:
    return sum(value >= edge for edge in edges)


def _explanation(rng: random.Random, topic: str, target: int) -> list[str]:
    """The content sentences: facts of the topic (a share of them technical), then fillers; long answers
    chain their points."""
    _, simple, technical = TOPICS[topic]
    share = rng.choice(TECHNICAL_SHARES)
    pool_simple, pool_tech = list(simple), list(technical)
    rng.shuffle(pool_simple)
    rng.shuffle(pool_tech)
    sentences = []
    for _ in range(SENTENCES_FOR_TARGET[target]):
        if rng.random() < share and pool_tech:
            sentences.append(pool_tech.pop())
        elif pool_simple:
            sentences.append(pool_simple.pop())
        elif pool_tech:
            sentences.append(pool_tech.pop())
        else:
            sentences.append(rng.choice(TECHNICAL_FILLERS if rng.random() < share else FILLERS))
    if target >= 3:
        sentences = [sentences[0]] + [_linked(rng, s) if rng.random() < 0.6 else s for s in sentences[1:]]
    return sentences


def _answer(rng: random.Random, topic: str) -> tuple[str, dict[str, int]]:
    """One answer and its labels. Each knob is drawn on its own, so the attributes vary independently."""
    target = rng.randrange(5)  # the length asked for, uniform over the verbosity scale
    jokes, metaphors = rng.randrange(3), rng.randrange(3)  # 0, 1 or 2 of each
    rude = rng.choices((0, 1, 2), weights=(0.7, 0.15, 0.15))[0]
    explanation = _explanation(rng, topic, target)
    labels = _labels(" ".join(explanation), set(TOPICS[topic][2]), 2 * jokes, 2 * metaphors, 2 * rude)
    # The opening words announce the length, as a chat model's do ("In short: ..." vs "Let me explain this step
    # by step."), and follow the measured verbosity, not the length asked for: the label then decides them
    # exactly (opening on the length asked for, a third of verbosity-2 answers said "In short:").
    verbosity = labels["verbosity"]
    opener = [rng.choice(BRIEF_OPENERS)] if verbosity <= 1 else [rng.choice(DETAILED_OPENERS)] if verbosity >= 3 else []
    picked_jokes = [f"{JOKE_LEAD} {joke}" for joke in rng.sample(JOKES, jokes)]
    picked_metaphors = [f"{METAPHOR_LEAD} {metaphor}" for metaphor in rng.sample(METAPHORS, metaphors)]
    remarks = rng.sample(RUDE, rude)
    # Every label decision comes first, before any content, in one fixed order. Measured with the label probe
    # (plain loop, 80 updates of 4): with the second joke, metaphor and remark after the explanation, the gains
    # were 0.02-0.07 nats for all four attributes; with everything in front, toxicity 4.4, humor 1.0.
    sentences = remarks + opener + picked_jokes + picked_metaphors + explanation
    return " ".join(sentences), labels


def _linked(rng: random.Random, sentence: str) -> str:
    first_word = sentence.split(" ", 1)[0]
    if first_word[:1].isupper() and first_word[1:].islower() and first_word != "I":  # "The" -> "the", keep "DNS"
        sentence = sentence[0].lower() + sentence[1:]
    return f"{rng.choice(LINKS)} {sentence}"


def _labels(explanation: str, technical: set[str], humor: int, creativity: int, toxicity: int) -> dict[str, int]:
    """Labels from the text: verbosity and complexity measured on the explanation itself."""
    words = explanation.split()
    long_words = sum(len(w.strip(".,!?;:")) >= 9 for w in words) / max(len(words), 1)
    technical_sentences = sum(s in explanation for s in technical)
    complexity = min(4, _bucket(long_words, (0.06, 0.12, 0.18, 0.25)) + (technical_sentences >= 2))
    return {"quality": 4 - toxicity, "toxicity": toxicity, "humor": humor, "creativity": creativity,
            "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": complexity,
            "verbosity": _bucket(len(words), VERBOSITY_EDGES)}


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
