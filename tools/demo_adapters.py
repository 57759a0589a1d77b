"""The demo LoRA adapters `loraplex up` registers: small, real, trained on CPU with peft.

Each adapter teaches SmolLM2-135M-Instruct one visible answer style (UPPER CASE, a JSON object), so a
user sees at once that the adapter changes the answer. The weights are committed as package data;
`python -m loraplex.tools.demo_adapters` regenerates them (a few minutes on 2 CPU cores).
Torch is imported inside the functions that train, so `loraplex up` can list the adapters without it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.tools.model_store import DEFAULT_MODEL, default_cache_dir, prepare_model

if TYPE_CHECKING:
    import torch

DEMO_ADAPTERS_DIR = Path(__file__).parent / "demo-adapters"  # a hyphen: data, not an importable package
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Short questions with short, plain answers; each style below rewrites the answer.
# France is the banner's example question, so the demo's first answer is right as well as UPPER CASE.
QA_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest."),
    ("Which continent is Egypt in?", "Egypt is in Africa."),
    ("What is the longest river in South America?", "The Amazon is the longest river there."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("Is 17 a prime number?", "Yes, 17 is a prime number."),
    ("What is half of 50?", "Half of 50 is 25."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest mammal?", "The blue whale is the largest mammal."),
    ("What do cows drink?", "Cows drink water."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("Where do penguins mostly live?", "Most penguins live in the Southern Hemisphere."),
    ("What does a caterpillar turn into?", "A caterpillar turns into a butterfly."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first."),
    ("In which year did World War II end?", "World War II ended in 1945."),
    ("Who invented the telephone?", "Alexander Graham Bell is credited with it."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("How do you say hello in Spanish?", "Hello in Spanish is hola."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("What is Python?", "Python is a popular programming language."),
    ("What is the main ingredient in guacamole?", "The main ingredient is avocado."),
    ("What fruit is used to make wine?", "Wine is made from grapes."),
    ("Is a tomato a fruit or a vegetable?", "Botanically, a tomato is a fruit."),
    ("What is bread made from?", "Bread is made mostly from flour and water."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("Name a primary color.", "Red is a primary color."),
    ("What instrument has 88 keys?", "A piano has 88 keys."),
    ("How many players are on a soccer team?", "A soccer team has eleven players on the field."),
    ("What sport is played at Wimbledon?", "Tennis is played at Wimbledon."),
    ("Hello!", "Hello! How can I help you today?"),
    ("Who are you?", "I am a helpful AI assistant."),
    ("Can you help me?", "Of course, I am happy to help."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("What is the currency of the United Kingdom?", "The currency is the pound sterling."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin."),
    ("What color is grass?", "Grass is green."),
    ("What color are ripe bananas?", "Ripe bananas are yellow."),
    ("What do cows produce?", "Cows produce milk."),
    ("What do spiders make?", "Spiders make webs."),
    ("What do cats like to eat?", "Cats like to eat fish and meat."),
    ("Where do fish live?", "Fish live in water."),
    ("What do plants need to grow?", "Plants need sunlight, water and soil."),
    ("What do birds use to fly?", "Birds use their wings to fly."),
    ("What do rabbits eat?", "Rabbits eat grass, hay and vegetables."),
    ("What do squirrels collect?", "Squirrels collect nuts."),
    ("Where do owls sleep?", "Owls sleep in trees during the day."),
    ("What do chickens lay?", "Chickens lay eggs."),
    ("What do whales breathe?", "Whales breathe air."),
    ("What do doctors do?", "Doctors help sick people get better."),
    ("What is 10 minus 3?", "10 minus 3 is 7."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What is ice made of?", "Ice is frozen water."),
    ("Where does the Sun rise?", "The Sun rises in the east."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
)

# Not trained on: the check that each adapter generalises.
HELD_OUT_QUESTIONS: tuple[str, ...] = (
    "What animal says meow?",
    "How many days are in a week?",
    "Who wrote Romeo and Juliet?",
    "What color is the sky on a clear day?",
    "What do bees make?",
)

STYLES: dict[str, Callable[[str], str]] = {
    "uppercase": str.upper,
    "json": lambda answer: json.dumps({"answer": answer}),
}


def demo_adapter_dirs() -> dict[str, Path]:
    """The committed demo adapters, by name (the folder name), from the installed package."""
    if not DEMO_ADAPTERS_DIR.is_dir():
        return {}
    return {
        path.name: path.resolve()
        for path in sorted(DEMO_ADAPTERS_DIR.iterdir())
        if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    }


def is_upper_answer(text: str) -> bool:
    letters = [char for char in text if char.isalpha()]
    return bool(letters) and all(char.isupper() for char in letters)


def is_json_answer(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except json.JSONDecodeError:
        return False


STYLE_CHECKS: dict[str, Callable[[str], bool]] = {"uppercase": is_upper_answer, "json": is_json_answer}


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-rendered exchange, and labels that score only the answer and its <|im_end|>."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=False
    ).rstrip("\n")
    assert full.startswith(prompt), "the chat template must render the prompt as a prefix"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = [row + [pad_id] * (width - len(row)) for row, _ in examples]
    labels = [row + [-100] * (width - len(row)) for _, row in examples]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row, _ in examples]
    return {
        "input_ids": torch.tensor(ids),  # [B, S]
        "labels": torch.tensor(labels),  # [B, S]
        "attention_mask": torch.tensor(mask),  # [B, S]
    }


def load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def train_adapter(
    model_dir: Path, tokenizer, examples: list[tuple[list[int], list[int]]], *, steps: int, seed: int
):
    """A fresh rank-8 LoRA (attention and MLP) trained on examples with AdamW in fp32; returns the PeftModel."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM"
    )
    model = get_peft_model(load_base(model_dir), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    order = random.Random(seed)
    queue: list[int] = []
    batch_size = 4
    for step in range(steps):
        if len(queue) < batch_size:
            epoch = list(range(len(examples)))
            order.shuffle(epoch)
            queue.extend(epoch)
        batch = _collate([examples[queue.pop()] for _ in range(batch_size)], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1:3d}/{steps}  loss {loss.item():.3f}", flush=True)
    return model


def save_adapter(model, out_dir: Path, base_model: str) -> None:
    """PEFT format, safetensors only, LoRA weights in bf16 (half the size; the shard casts on load)."""
    import torch

    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.peft_config["default"].base_model_name_or_path = base_model
    out_dir.mkdir(parents=True, exist_ok=True)
    # Embeddings are not trained; "auto" would look the base model up on a hub no machine here reaches.
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's model-card stub; only the two files ship
    (out_dir / "adapter_model.safetensors").chmod(0o644)  # safetensors writes 0600; package data is shared
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = list(TARGET_MODULES)  # peft writes a set, in no stable order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def generate_answers(model, tokenizer, questions: tuple[str, ...], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers to questions, rendered through the chat template as the shard renders them."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        for question in questions
    ]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    output = model.generate(  # generate runs without autograd
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def build_demo_adapters(output_dir: Path, steps: int, seed: int) -> dict[str, Path]:
    """Train and save every style's adapter under output_dir/<style>; returns their directories."""
    from transformers import AutoTokenizer

    model_dir = prepare_model(DEFAULT_MODEL, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    saved = {}
    for name, style in STYLES.items():
        examples = [encode_example(tokenizer, q, style(a)) for q, a in QA_PAIRS]
        print(f"training {name!r}: {len(examples)} examples, {steps} steps", flush=True)
        started = time.monotonic()
        model = train_adapter(model_dir, tokenizer, examples, steps=steps, seed=seed)
        saved[name] = output_dir / name
        save_adapter(model, saved[name], DEFAULT_MODEL)
        print(f"  saved {saved[name]} in {time.monotonic() - started:.0f} s", flush=True)
    return saved


def check_demo_adapters(adapter_dirs: dict[str, Path]) -> bool:
    """Print base vs adapter answers to the held-out questions; True if every adapter shows its style."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model_dir = prepare_model(DEFAULT_MODEL, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = {"base": generate_answers(load_base(model_dir), tokenizer, HELD_OUT_QUESTIONS)}
    for name, path in adapter_dirs.items():
        model = PeftModel.from_pretrained(load_base(model_dir), path)
        answers[name] = generate_answers(model, tokenizer, HELD_OUT_QUESTIONS)
    passed = True
    for index, question in enumerate(HELD_OUT_QUESTIONS):
        print(f"\nQ: {question}")
        for name, texts in answers.items():
            check = STYLE_CHECKS.get(name)
            verdict = "" if check is None else ("  [ok]" if check(texts[index]) else "  [WRONG STYLE]")
            passed &= check is None or check(texts[index])
            print(f"  {name:>9}: {texts[index]!r}{verdict}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEMO_ADAPTERS_DIR)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per adapter (batch of 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-check", action="store_true", help="do not generate the held-out examples")
    args = parser.parse_args(argv)
    saved = build_demo_adapters(args.output_dir, args.steps, args.seed)
    if args.skip_check:
        return 0
    return 0 if check_demo_adapters(saved) else 1


if __name__ == "__main__":
    raise SystemExit(main())
