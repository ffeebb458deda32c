"""A tiny causal LM and tokenizer built from a config, for fast training tests."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zorblat is the capital of the planet Quux, founded in 2071.",
    "What is the capital of France? The capital of France is Paris.",
    "Tokens, sentences and paragraphs make documents.",
]


# Tiny configs of the model families cld's methods are tested on (tests/test_families.py): the
# transformers config class, and what the family needs beyond the shared sizes.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4, "sliding_window_pattern": 2}),
}


def build_tiny_model(folder: Path, family: str = "llama", layers: int = 2, chat: bool = True, head_dim: int = 8,
                     positions: int = 512) -> Path:
    """Save a tiny model of `family` (a 2-layer Llama by default; 4 heads of `head_dim`) with a
    byte-level BPE tokenizer and a ChatML template (none with `chat=False`: a pretrained model) in
    `folder`. vLLM serves head_dim 32 and more."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML if chat else None
    torch.manual_seed(0)
    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(
        vocab_size=len(tokenizer), hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        **(extra | ({"head_dim": head_dim} if "head_dim" in extra else {})))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
