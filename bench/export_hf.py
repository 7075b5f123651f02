"""Write a model pdserve serves from a GGUF file (the bundled SmolLM2 by default) as an HF
folder — config.json, tokenizer files and safetensors weights — for engines that read only
HF folders (vLLM's CPU build in `bench/vllm_cpu_compare.sh`), so both sides serve the same
weights.

HF transformers does the conversion (it dequantizes the GGUF and undoes llama.cpp's Q/K row
permutation: the same reference our engine's tests compare against), fp32.

Run: `python -m pdserve.bench.export_hf OUT_DIR [--model smollm2-135m-instruct]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def export(model: str, out: Path) -> Path:
    """Write `model` (a name our registry resolves to a GGUF file) into `out`; returns it."""
    import torch
    import transformers

    from pdserve.engine.loader.registry import resolve_model_path

    path = resolve_model_path(model)
    if not str(path).endswith(".gguf"):
        raise ValueError(f"{model} resolves to {path}, not a GGUF file: it is already a folder")
    where, name = os.path.dirname(path), os.path.basename(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name,
                                                           dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    # The loaded model still carries its GGUF origin, which save_pretrained refuses; its
    # weights are plain fp32 already, so a fresh model of the same config takes them.
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.generation_config = hf.generation_config
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write (created)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args(argv)
    out = export(args.model, args.out)
    print(f"wrote {sorted(f.name for f in out.iterdir())} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
