"""Make a tiny random Llama model and tokenizer that a real vLLM on the CPU can serve.

No model can be downloaded on these machines, so the tests make one: a byte-level BPE tokenizer
(vocab 512, with a chat template) trained on a few sentences, and a randomly initialised
``LlamaForCausalLM`` (hidden 256, 4 heads -> head size 64, 2 layers, intermediate 512; ~6 MB in
float32). Its text is gibberish; the protocol around it is real.

Run it with the vLLM venv's python (it needs ``torch``, ``transformers`` and ``tokenizers``)::

    ~/.cache/gpupool/vllm-venv/bin/python scripts/make_tiny_model.py [DIR]

DIR defaults to ``$GPUPOOL_CACHE/tiny-model`` (``~/.cache/gpupool/tiny-model``). A directory that
already holds a complete model is re-used as it is; ``--force`` makes it anew. The directory's
path is printed on the last line of standard output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

VOCAB_SIZE = 512
HIDDEN = 256
HEADS = 4  # head size 64: the CPU attention kernel rejects 16
LAYERS = 2
INTERMEDIATE = 512
MAX_POSITIONS = 512
SEED = 1234

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]

# A plain role-tagged template: enough for /v1/chat/completions and /v1/messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ text }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "The pool sells seats on a shared model by the hour, in three blocks of eight hours.",
    "Asia opens at midnight, Europe at eight in the morning, the Americas at four.",
    "A customer buys a seat in a block and gets a key that opens only while that block is current.",
    "The gateway checks every request against the key, the block and the limits of the key.",
    "Hello! How are you today? I am fine, thank you. What would you like to know?",
    "Tell me a short story about a small robot who learned to paint the sea at night.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation: , . ; : ! ? ' \" ( ) [ ] { }",
    "<|system|> <|user|> <|assistant|> you are a helpful assistant.",
]

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def default_dir() -> Path:
    cache = os.environ.get("GPUPOOL_CACHE") or os.path.expanduser("~/.cache/gpupool")
    return Path(cache) / "tiny-model"


def is_complete(path: Path) -> bool:
    if not all((path / f).is_file() for f in REQUIRED_FILES):
        return False
    return any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = fast.bos_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id

    # Write into a sibling temporary directory and rename, so a crash never leaves a half model
    # that a later run would take for complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=None,
                        help="output directory (default: $GPUPOOL_CACHE/tiny-model)")
    parser.add_argument("--force", action="store_true", help="rebuild even when present")
    args = parser.parse_args(argv)
    out: Path = (args.dir or default_dir()).expanduser().resolve()
    if args.force or not is_complete(out):
        build(out)
        print(f"tiny model: made in {out}", file=sys.stderr)
    else:
        print(f"tiny model: cached in {out}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
