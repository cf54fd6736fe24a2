"""Tiny random models and real PEFT adapters written to temp dirs: the engine's test fixtures.

Everything here is produced by HF transformers and PEFT themselves, so the engine is checked
against files it did not write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
            rope_theta=10000.0)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Ahoy matey, the sea be calm and the wind be fair!",
    "Multi-tenant LoRA serving shares one base model across many adapters.",
    "Ünïcödé text: café, naïve, 日本語, emoji 🎉🚀 and more.",
] * 20


def write_tokenizer(path: Path, vocab_size: int = 512) -> dict[str, int]:
    """A small byte-level BPE tokenizer with ChatML specials, trained here; returns the special ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    settings = {"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


def write_tiny_model(
    path: Path, arch: str = "llama", seed: int = 0, with_tokenizer: bool = False, **overrides: Any
) -> Path:
    """A random HF model directory (config.json + model.safetensors); arch: llama | mistral | qwen2."""
    import transformers

    if with_tokenizer:
        specials = write_tokenizer(path)
        overrides.setdefault("eos_token_id", specials["<|im_end|>"])
        overrides.setdefault("bos_token_id", specials["<|endoftext|>"])

    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[arch]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[arch]
    settings = {**TINY, "tie_word_embeddings": False, **overrides}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings))
    with torch.no_grad():  # make the norms non-trivial so that a missed weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_adapter(
    base_dir: Path,
    path: Path,
    *,
    r: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    seed: int = 1,
    b_std: float = 0.1,
    safe: bool = True,
    **lora_kwargs: Any,
) -> Path:
    """A PEFT LoRA adapter saved by PEFT, with random non-zero B so that it changes the output."""
    import transformers
    from peft import LoraConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_kwargs.pop("lora_alpha", 2 * r), target_modules=list(target_modules),
                        lora_dropout=0.0, **lora_kwargs)
    return save_random_adapter(model, config, path, seed=seed, b_std=b_std, safe=safe)


def save_random_adapter(model: Any, config: Any, path: Path, *, seed: int, b_std: float, safe: bool = True) -> Path:
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
            elif "lora_A" in name:
                param.normal_(0, 1.0 / param.shape[1] ** 0.5)
    peft_model.save_pretrained(path, safe_serialization=safe)
    return path


def cast_adapter_file(path: Path, dtype: torch.dtype) -> Path:
    """Rewrite an adapter's safetensors in another dtype, as training in that dtype saves it."""
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    save_file({name: tensor.to(dtype) for name, tensor in load_file(file).items()}, file)
    return path


class PeftReference:
    """HF transformers + PEFT with several adapters loaded: what the engine must reproduce."""

    def __init__(self, base: Any, adapters: dict[str, Path]) -> None:
        from peft import PeftModel

        self.names = list(adapters)
        first, *rest = self.names
        self.model = PeftModel.from_pretrained(base, adapters[first], adapter_name=first)
        for name in rest:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()

    @classmethod
    def from_dir(cls, base_dir: Path, adapters: dict[str, Path]) -> PeftReference:
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return cls(base, adapters)

    def _context(self, adapter: str | None) -> Any:
        import contextlib

        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.no_grad()
    def next_token_logits(self, prompt: list[int], adapter: str | None) -> torch.Tensor:
        with self._context(adapter):
            return self.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        """Plain greedy decoding with HF's KV cache: no logits processors, EOS is just a token."""
        tokens: list[int] = []
        past = None
        step_input = torch.tensor([prompt])
        with self._context(adapter):
            for _ in range(max_new_tokens):
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
                step_input = torch.tensor([[tokens[-1]]])
        return tokens


def pool_bytes(model_dir: Path, ranks: list[int], *, max_lora_rank: int = 64, dtype: torch.dtype = torch.float32) -> int:
    """The `lora_pool_bytes` that holds adapters of these ranks on `model_dir`'s model at once."""
    import json

    from engine_daemon.adapter_pool import pool_bytes_for
    from engine_daemon.peft_format import descriptor_from_config

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return pool_bytes_for(descriptor_from_config("test", config), ranks, max_lora_rank, dtype)
