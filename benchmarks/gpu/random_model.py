"""A random-initialised model directory from a config kept in the repository, for the GPU
benchmarks (no weights travel): ``python benchmarks/gpu/random_model.py SHAPE OUT_DIR [--tiny]``.

SHAPE is a folder of ``benchmarks/gpu/models``: ``qwen2.5-0.5b`` (the shape of Qwen2.5-0.5B,
494M parameters: https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json) or
``smollm2-135m`` (SmolLM2-135M, 135M). Both use the SmolLM2 tokenizer kept in
``models/smollm2-135m`` (bos/eos/pad ids 1/2/2; the Qwen shape keeps its 151,936-row
vocabulary, so ids past the tokenizer's 49,152 decode to nothing). ``--tiny`` keeps the
vocabulary and shrinks the rest to 2 layers of width 64 (the CPU dry run).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"
TOKENIZER = MODELS / "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_window_layers=2)


def make_model_dir(shape: str, out: str | Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """Write a seeded random model of ``shape`` (fp32 safetensors) and the tokenizer to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    settings = json.loads((MODELS / shape / "config.json").read_text())
    if tiny:
        settings.update({k: v for k, v in TINY.items() if k != "max_window_layers" or k in settings})
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out = Path(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(p.name for p in MODELS.iterdir() if p.is_dir()))
    parser.add_argument("out")
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 64 (CPU dry run)")
    args = parser.parse_args()
    path = make_model_dir(args.shape, args.out, tiny=args.tiny)
    print(f"random {args.shape}{' (tiny)' if args.tiny else ''} model in {path}")


if __name__ == "__main__":
    main()
