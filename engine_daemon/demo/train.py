"""Train the demo adapters with PEFT on the bundled SmolLM2 (about 25 s each on a 2-core CPU).

    python -m engine_daemon.demo.train var/demo-adapters        # trains what is not there yet

Each adapter is an r=8 LoRA on q/k/v/o, 60 steps over eight handwritten question → answer
pairs (``<name>.json`` beside this file), with the loss on the answer tokens only. The result is
an ordinary PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), uploaded to
the portal like any tenant's adapter.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
DEMOS = ("pirate", "shouty")


def demo_examples(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def train(name: str, out_dir: Path, steps: int = 60, rank: int = 8, seed: int = 0) -> Path:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from engine_daemon.model_source import bundled_gguf_path

    torch.manual_seed(seed)
    gguf = bundled_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, config)
    examples = [_example(tokenizer, question, answer) for question, answer in demo_examples(name)["examples"]]
    input_ids, labels, mask = _pad(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in tqdm(range(steps), desc=f"training {name}", unit="step"):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss  # all eight pairs in one batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    target = out_dir / name
    model.save_pretrained(target, safe_serialization=True)
    return target


def _example(tokenizer, question: str, answer: str):
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor(prompt_ids + answer_ids)
    labels = torch.tensor([-100] * len(prompt_ids) + answer_ids)  # learn the answers only
    return input_ids, labels


def _pad(examples):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, (ids, target) in enumerate(examples):  # right padding: positions stay those of the real text
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def ensure_demo_adapters(out_dir: Path) -> dict[str, Path]:
    """Train the demo adapters that are not cached in out_dir yet."""
    paths = {}
    for name in DEMOS:
        path = out_dir / name
        if not (path / "adapter_model.safetensors").is_file():
            started = time.monotonic()
            train(name, out_dir)
            print(f"trained demo adapter {name!r} in {time.monotonic() - started:.0f} s", flush=True)
        paths[name] = path
    return paths


if __name__ == "__main__":
    ensure_demo_adapters(Path(sys.argv[1] if len(sys.argv) > 1 else "var/demo-adapters"))
